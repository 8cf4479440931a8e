// End-to-end test of the dashboard (the admin listener's page) in headless Chromium.
//
// Starts a real `warren serve` with an `[admin]` listener that needs a token, opens the page,
// gives it the token when it asks, sees the node listed, runs `warren bench` (publish/subscribe
// and request/reply) and sees messages/s and the request latency move, then connects an MQTT
// client as user carol, finds her session by uid, kicks it with the page's button, and sees
// the session gone and the client's connection closed. Run from the repository root:
//
//   npm ci --prefix tests/browser && node tests/browser/dashboard.test.mjs
//
// Environment: WARREN_BIN (else target/release/warren, else target/debug/warren) and CHROMIUM
// (else /usr/bin/chromium).

import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

/** Whole-test budget. */
const OVERALL_TIMEOUT_MS = 90_000;
/** Budget for one waited-for condition in the page. */
const STEP_TIMEOUT_MS = 15_000;
/** Budget for the server to open its ports. */
const STARTUP_TIMEOUT_MS = 15_000;
/** Budget for the server to exit after SIGTERM before it is killed. */
const SHUTDOWN_TIMEOUT_MS = 5_000;
/** Seconds each `warren bench` run measures. */
const BENCH_SECONDS = 6;

const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const SHOT_DIR = path.join(REPO_ROOT, 'target', 'browser');
const TOKEN = 'dashboard-test-token';
const NODE_ID = 'dash1';

// ------------------------------------------------------------------ helpers

function findWarren() {
  if (process.env.WARREN_BIN) {
    const bin = path.resolve(REPO_ROOT, process.env.WARREN_BIN);
    if (!existsSync(bin)) {
      throw new Error(`WARREN_BIN=${process.env.WARREN_BIN} does not exist`);
    }
    return bin;
  }
  for (const rel of ['target/release/warren', 'target/debug/warren']) {
    const bin = path.join(REPO_ROOT, rel);
    if (existsSync(bin)) {
      return bin;
    }
  }
  throw new Error('warren binary not found: set WARREN_BIN or run `cargo build --release` first');
}

/** Asks the OS for `n` distinct free TCP ports on 127.0.0.1. */
async function freePorts(n) {
  const servers = [];
  try {
    for (let i = 0; i < n; i += 1) {
      const srv = net.createServer();
      servers.push(srv);
      await new Promise((resolve, reject) => {
        srv.once('error', reject);
        srv.listen(0, '127.0.0.1', resolve);
      });
    }
    return servers.map((s) => s.address().port);
  } finally {
    await Promise.all(servers.map((s) => new Promise((resolve) => s.close(resolve))));
  }
}

function canConnect(port) {
  return new Promise((resolve) => {
    const sock = net.connect({ host: '127.0.0.1', port });
    sock.once('connect', () => {
      sock.destroy();
      resolve(true);
    });
    sock.once('error', () => resolve(false));
  });
}

/** Starts a child process and keeps the end of its output so a failure can show it. */
function start(bin, args, name) {
  const child = spawn(bin, args, {
    cwd: REPO_ROOT,
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG || 'info' },
  });
  const output = [];
  const keep = (chunk) => {
    output.push(chunk.toString());
    if (output.length > 200) {
      output.shift();
    }
  };
  child.stdout.on('data', keep);
  child.stderr.on('data', keep);
  let exitInfo = null;
  const exited = new Promise((resolve) => {
    child.once('exit', (code, signal) => resolve({ code, signal }));
    child.once('error', (err) => resolve({ code: null, signal: null, error: err }));
  }).then((info) => {
    exitInfo = info;
    return info;
  });
  return { name, child, exited, exitInfo: () => exitInfo, log: () => output.join('') };
}

async function waitForPorts(proc, ports) {
  const deadline = Date.now() + STARTUP_TIMEOUT_MS;
  for (const port of ports) {
    while (!(await canConnect(port))) {
      const info = proc.exitInfo();
      if (info) {
        throw new Error(`${proc.name} exited during startup (code ${info.code}, signal ${info.signal})`);
      }
      if (Date.now() > deadline) {
        throw new Error(`port ${port} did not accept connections within ${STARTUP_TIMEOUT_MS} ms`);
      }
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  }
}

async function stop(proc) {
  if (proc.exitInfo()) {
    return proc.exitInfo();
  }
  proc.child.kill('SIGTERM');
  const timer = new Promise((resolve) => setTimeout(resolve, SHUTDOWN_TIMEOUT_MS, null));
  const info = await Promise.race([proc.exited, timer]);
  if (info === null) {
    proc.child.kill('SIGKILL');
    await proc.exited;
    return { code: null, signal: 'SIGKILL', forced: true };
  }
  return info;
}

/** An MQTT string: two length bytes, then UTF-8. */
function mqttString(s) {
  const b = Buffer.from(s, 'utf8');
  return Buffer.concat([Buffer.from([b.length >> 8, b.length & 0xff]), b]);
}

/**
 * A bare MQTT 3.1.1 client that CONNECTs with a user name and password, waits for CONNACK
 * 0, and then only watches its socket: `closed` resolves when the server closes it.
 */
async function mqttClient(port, clientId, user, password) {
  const sock = net.connect({ host: '127.0.0.1', port });
  await new Promise((resolve, reject) => {
    sock.once('connect', resolve);
    sock.once('error', reject);
  });
  const payload = Buffer.concat([mqttString(clientId), mqttString(user), mqttString(password)]);
  // protocol name, level 4, flags: user name + password + clean session, keepalive 120 s
  const variable = Buffer.concat([mqttString('MQTT'), Buffer.from([4, 0xc2, 0, 120])]);
  const body = Buffer.concat([variable, payload]);
  assert.ok(body.length < 128, 'one length byte');
  sock.write(Buffer.concat([Buffer.from([0x10, body.length]), body]));
  const closed = new Promise((resolve) => sock.once('close', resolve));
  const connack = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('no CONNACK within 5 s')), 5000);
    sock.once('data', (d) => {
      clearTimeout(timer);
      resolve(d);
    });
  });
  assert.deepEqual([...connack.subarray(0, 4)], [0x20, 2, 0, 0], `CONNACK accepted: ${connack.toString('hex')}`);
  let isClosed = false;
  closed.then(() => {
    isClosed = true;
  });
  return { sock, closed, isClosed: () => isClosed };
}

/** The admin API as the test sees it (to check what the page did). */
async function admin(adminPort, pathAndQuery) {
  const res = await fetch(`http://127.0.0.1:${adminPort}${pathAndQuery}`, {
    headers: { Authorization: `Bearer ${TOKEN}` },
  });
  assert.ok(res.ok, `GET ${pathAndQuery}: ${res.status}`);
  return res.json();
}

/** What the page shows, for failure messages. */
async function pageState(page) {
  try {
    return await page.evaluate(() => {
      const v = (id) => document.querySelector(id)?.dataset.value;
      return {
        status: document.querySelector('#status')?.textContent,
        error: document.querySelector('#error')?.textContent,
        note: document.querySelector('#metrics-note')?.textContent,
        nodes: [...document.querySelectorAll('#nodes tbody tr')].map((r) => r.dataset.node),
        sessions: [...document.querySelectorAll('#sessions tbody tr')].map((r) => `${r.dataset.session}:${r.dataset.uid}`),
        stats: { in: v('#stat-in'), out: v('#stat-out'), p50: v('#stat-p50'), p99: v('#stat-p99'), conns: v('#stat-connections') },
      };
    });
  } catch (err) {
    return { unavailable: err.message };
  }
}

/** Waits for `predicate(arg)` to hold in the page; explains the page state on timeout. */
async function waitInPage(page, what, predicate, arg, timeout = STEP_TIMEOUT_MS) {
  try {
    await page.waitForFunction(predicate, arg, { timeout, polling: 200 });
  } catch (err) {
    throw new Error(
      `${what} (not seen within ${timeout} ms)\n  page: ${JSON.stringify(await pageState(page))}\n  cause: ${err.message.split('\n')[0]}`,
    );
  }
}

/** The largest value a tile showed while `during` ran (sampled every 200 ms). */
async function watchTile(page, id, during) {
  let max = 0;
  let done = false;
  const sampler = (async () => {
    while (!done) {
      const v = Number((await page.$eval(id, (el) => el.dataset.value)) || 0);
      max = Math.max(max, v);
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  })();
  try {
    await during;
  } finally {
    done = true;
    await sampler;
  }
  return max;
}

// ------------------------------------------------------------------ the test

async function run(state) {
  const bin = findWarren();
  const [mqttPort, mqantPort, adminPort] = await freePorts(3);
  const dir = mkdtempSync(path.join(os.tmpdir(), 'warren-dashboard-'));
  state.dir = dir;
  const passwd = path.join(dir, 'passwd');
  const made = spawnSync(bin, ['passwd', '-b', passwd, 'carol', 'carol-pw'], { encoding: 'utf8' });
  assert.equal(made.status, 0, `warren passwd: ${made.stderr}`);
  const config = path.join(dir, 'warren.toml');
  writeFileSync(
    config,
    [
      '[node]',
      `id = "${NODE_ID}"`,
      '',
      '[[listener]]',
      'protocol = "mqtt"',
      'mode = "default"',
      `addr = "127.0.0.1:${mqttPort}"`,
      '',
      '[[listener]]',
      'protocol = "mqtt"',
      'mode = "mqant"',
      `addr = "127.0.0.1:${mqantPort}"`,
      '',
      '[[module]]',
      'type = "Echo"',
      'id = "Echo001"',
      '',
      '[http]',
      'enabled = false',
      '',
      '[admin]',
      `addr = "127.0.0.1:${adminPort}"`,
      `token = "${TOKEN}"`,
      '',
      '[auth]',
      `password_file = "${passwd}"`,
      'anonymous = true   # the bench clients present nothing',
      '',
    ].join('\n'),
  );
  const shown = path.relative(REPO_ROOT, bin);
  console.log(`starting ${shown.startsWith('..') ? bin : shown} serve --config ${config}`);
  state.warren = start(bin, ['serve', '--config', config], 'warren');
  await waitForPorts(state.warren, [mqttPort, mqantPort, adminPort]);

  const base = `http://127.0.0.1:${adminPort}`;
  // The page and its files need no token; the API does.
  for (const p of ['/', '/dashboard', '/dashboard/dashboard.js', '/dashboard/vendor/uPlot.iife.min.js']) {
    const res = await fetch(base + p);
    assert.equal(res.status, 200, `GET ${p} without a token`);
  }
  assert.equal((await fetch(`${base}/admin/nodes`)).status, 401, '/admin/nodes without a token');

  state.browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-quic',
      '--no-first-run',
      '--disable-component-update',
      '--disable-sync',
    ],
    timeout: STEP_TIMEOUT_MS,
  });
  const context = await state.browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.on('pageerror', (err) => state.problems.push(`page error: ${err.message}`));
  page.on('console', (msg) => {
    // the API's 401 before the token is given is expected; anything else is a problem
    if (msg.type() === 'error' && !/401 \(Unauthorized\)/.test(msg.text())) {
      state.problems.push(`console error: ${msg.text()}`);
    }
  });
  const res = await page.goto(`${base}/`, { timeout: STEP_TIMEOUT_MS });
  assert.ok(res && res.ok(), `GET / answered ${res ? res.status() : 'nothing'}`);
  assert.equal(await page.title(), 'warren dashboard');

  // The API answers 401: the page asks for the token.
  await page.waitForSelector('#token-dialog[open]', { timeout: STEP_TIMEOUT_MS });
  // a wrong token: refused, and the page asks again
  await page.fill('#token', 'not-the-token');
  await page.click('#token-save');
  await waitInPage(
    page,
    'the page asks again, saying the token was refused',
    () => document.querySelector('#token-dialog').open && document.querySelector('#token-why').textContent.includes('refused'),
  );
  await page.fill('#token', TOKEN);
  await page.click('#token-save');
  await waitInPage(page, 'the token dialog closes', () => !document.querySelector('#token-dialog').open);
  console.log('ok: the page asked for the token, refused a wrong one and took the right one');

  // The node is listed.
  await waitInPage(
    page,
    `node ${NODE_ID} listed`,
    (id) => [...document.querySelectorAll('#nodes tbody tr')].some((r) => r.dataset.node === id),
    NODE_ID,
  );
  await waitInPage(page, 'status live', () => document.querySelector('#status').textContent === 'live');
  console.log(`ok: node ${NODE_ID} listed, metrics live`);

  // Load: publish/subscribe at a fixed rate and request/reply to Echo, side by side.
  const common = ['--duration', String(BENCH_SECONDS), '--warmup', '0.5', '--quiet', '--json', '--threads', '1'];
  const pubsub = start(
    bin,
    ['bench', 'pubsub', '--target', `127.0.0.1:${mqttPort}`, '--subscribers', '2', '--rate', '2000', ...common],
    'bench pubsub',
  );
  const request = start(
    bin,
    ['bench', 'request', '--target', `127.0.0.1:${mqantPort}`, '--clients', '2', '--inflight', '2', ...common],
    'bench request',
  );
  state.children.push(pubsub, request);
  const benches = Promise.all([pubsub.exited, request.exited]);
  const [maxIn, maxOut, maxP50] = await Promise.all([
    watchTile(page, '#stat-in', benches),
    watchTile(page, '#stat-out', benches),
    watchTile(page, '#stat-p50', benches),
  ]);
  for (const b of [pubsub, request]) {
    assert.equal(b.exitInfo().code, 0, `${b.name} failed:\n${b.log()}`);
  }
  console.log(`ok: under warren bench the page showed up to ${maxIn.toFixed(0)} messages/s in, ${maxOut.toFixed(0)} out, p50 ${maxP50.toFixed(3)} ms`);
  assert.ok(maxIn > 0, `messages/s in never moved: ${JSON.stringify(await pageState(page))}`);
  assert.ok(maxOut > 0, `messages/s out never moved: ${JSON.stringify(await pageState(page))}`);
  assert.ok(maxP50 > 0, `request latency never shown: ${JSON.stringify(await pageState(page))}`);

  mkdirSync(SHOT_DIR, { recursive: true });
  await page.screenshot({ path: path.join(SHOT_DIR, 'dashboard.png'), fullPage: true });

  // A client as carol: find her by uid, kick her.
  const carol = await mqttClient(mqttPort, 'carol-phone', 'carol', 'carol-pw');
  state.sockets.push(carol.sock);
  const listed = await admin(adminPort, '/admin/sessions?uid=carol');
  assert.equal(listed.sessions.length, 1, `one session of carol: ${JSON.stringify(listed)}`);
  const sid = listed.sessions[0].id;
  await page.fill('#search-uid', 'carol');
  await page.click('#search');
  await waitInPage(
    page,
    `carol's session ${sid} listed`,
    (id) => [...document.querySelectorAll('#sessions tbody tr')].some((r) => r.dataset.session === id),
    sid,
  );
  const button = page.locator(`#sessions tbody tr[data-session="${sid}"] button.kick`);
  await button.click(); // arms it
  assert.equal(await button.textContent(), 'Kick?');
  assert.ok(!carol.isClosed(), 'one click does not kick');
  await button.click(); // kicks
  await Promise.race([
    carol.closed,
    new Promise((_, reject) => setTimeout(() => reject(new Error("carol's connection stayed open after the kick")), STEP_TIMEOUT_MS)),
  ]);
  await waitInPage(
    page,
    `carol's session ${sid} gone from the list`,
    (id) => ![...document.querySelectorAll('#sessions tbody tr')].some((r) => r.dataset.session === id),
    sid,
  );
  const after = await admin(adminPort, '/admin/sessions?uid=carol');
  assert.equal(after.sessions.length, 0, `no session of carol after the kick: ${JSON.stringify(after)}`);
  console.log(`ok: carol's session ${sid} kicked from the page; her client saw the close`);

  await page.screenshot({ path: path.join(SHOT_DIR, 'dashboard-kicked.png'), fullPage: true });
  console.log(`screenshots in ${path.relative(REPO_ROOT, SHOT_DIR)}/dashboard.png, dashboard-kicked.png`);
  assert.deepEqual(state.problems, [], 'the page reported errors');
}

async function main() {
  const state = { warren: null, browser: null, children: [], sockets: [], problems: [], dir: null };
  let timer;
  const overall = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`test did not finish within ${OVERALL_TIMEOUT_MS / 1000} s`)), OVERALL_TIMEOUT_MS);
  });
  // Last resort if cleanup itself hangs: never outlive the budget by much.
  setTimeout(() => {
    for (const p of [state.warren, ...state.children]) {
      p?.child.kill('SIGKILL');
    }
    console.error('FAIL: cleanup hung; killed warren');
    console.log('browser: 0 passed, 1 failed');
    process.exit(1);
  }, OVERALL_TIMEOUT_MS + 3 * SHUTDOWN_TIMEOUT_MS).unref();
  let failure = null;
  try {
    await Promise.race([run(state), overall]);
  } catch (err) {
    failure = err;
  } finally {
    clearTimeout(timer);
    for (const s of state.sockets) {
      s.destroy();
    }
    if (state.browser) {
      await state.browser.close().catch(() => {});
    }
    for (const c of state.children) {
      await stop(c);
    }
    if (state.warren) {
      const info = await stop(state.warren);
      console.log(`warren stopped (code ${info.code}, signal ${info.signal}${info.forced ? ', killed after timeout' : ''})`);
    }
    if (state.dir) {
      rmSync(state.dir, { recursive: true, force: true });
    }
  }

  if (failure) {
    console.error(`\nFAIL: ${failure.message}`);
    if (state.problems.length > 0) {
      console.error(`page problems:\n  ${state.problems.join('\n  ')}`);
    }
    if (state.warren) {
      console.error(`last warren output:\n${state.warren.log().trimEnd().split('\n').slice(-40).join('\n')}`);
    }
    console.log('browser: 0 passed, 1 failed');
    process.exit(1);
  }
  console.log('browser: 1 passed, 0 failed');
  process.exit(0);
}

main();
