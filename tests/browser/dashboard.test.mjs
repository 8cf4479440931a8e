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
import { spawnSync } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import {
  REPO_ROOT,
  SHOT_DIR,
  SHUTDOWN_TIMEOUT_MS,
  collectProblems,
  findWarren,
  freePorts,
  launchChromium,
  runTest,
  screenshot,
  shownPath,
  start,
  waitForPorts,
  waitInPage as waitInPageFor,
} from './harness.mjs';

/** Whole-test budget. */
const OVERALL_TIMEOUT_MS = 90_000;
/** Budget for one waited-for condition in the page. */
const STEP_TIMEOUT_MS = 15_000;
/** Seconds each `warren bench` run measures. */
const BENCH_SECONDS = 6;

const TOKEN = 'dashboard-test-token';
const NODE_ID = 'dash1';

// ------------------------------------------------------------------ helpers

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
function waitInPage(page, what, predicate, arg, timeout = STEP_TIMEOUT_MS) {
  return waitInPageFor(page, what, predicate, arg, { timeout, polling: 200, pageState });
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
  console.log(`starting ${shownPath(bin)} serve --config ${config}`);
  state.warren = start(bin, ['serve', '--config', config], 'warren');
  await waitForPorts(state.warren, [mqttPort, mqantPort, adminPort]);

  const base = `http://127.0.0.1:${adminPort}`;
  // The page and its files need no token; the API does.
  for (const p of ['/', '/dashboard', '/dashboard/dashboard.js', '/dashboard/vendor/uPlot.iife.min.js']) {
    const res = await fetch(base + p);
    assert.equal(res.status, 200, `GET ${p} without a token`);
  }
  assert.equal((await fetch(`${base}/admin/nodes`)).status, 401, '/admin/nodes without a token');

  state.browser = await launchChromium(STEP_TIMEOUT_MS);
  const context = await state.browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  // the API's 401 before the token is given is expected; anything else is a problem
  collectProblems(page, state.problems, { ignore: /401 \(Unauthorized\)/ });
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

  await screenshot(page, 'dashboard.png', { fullPage: true });

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

  await screenshot(page, 'dashboard-kicked.png', { fullPage: true });
  console.log(`screenshots in ${path.relative(REPO_ROOT, SHOT_DIR)}/dashboard.png, dashboard-kicked.png`);
  assert.deepEqual(state.problems, [], 'the page reported errors');
}

runTest(run, { overallTimeoutMs: OVERALL_TIMEOUT_MS, cleanupGraceMs: 3 * SHUTDOWN_TIMEOUT_MS });
