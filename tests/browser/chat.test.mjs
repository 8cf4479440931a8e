// End-to-end test of the chat demo page in headless Chromium.
//
// Starts a real `warren serve` on free ports, opens the page in two browser
// contexts (alice and bob), and drives login, join, chat and departure through
// the page's stable element ids. Run from the repository root:
//
//   npm ci --prefix tests/browser && node tests/browser/chat.test.mjs
//
// Environment: WARREN_BIN (else target/release/warren, else target/debug/warren)
// and CHROMIUM (else /usr/bin/chromium).

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

/** Whole-test budget. */
const OVERALL_TIMEOUT_MS = 60_000;
/** Budget for one waited-for condition in the page. */
const STEP_TIMEOUT_MS = 10_000;
/** Budget for the server to open its ports. */
const STARTUP_TIMEOUT_MS = 15_000;
/** Budget for the server to exit after SIGTERM before it is killed. */
const SHUTDOWN_TIMEOUT_MS = 5_000;

const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const SHOT_DIR = path.join(REPO_ROOT, 'target', 'browser');
const ROOM = 'mqant';

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
  throw new Error(
    'warren binary not found: set WARREN_BIN or run `cargo build --release` first',
  );
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

/** Starts warren and records its output so a failure can show it. */
function startWarren(bin, args) {
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
  const exited = new Promise((resolve) => {
    child.once('exit', (code, signal) => resolve({ code, signal }));
    child.once('error', (err) => resolve({ code: null, signal: null, error: err }));
  });
  let exitInfo = null;
  exited.then((info) => {
    exitInfo = info;
  });
  return {
    child,
    exited,
    hasExited: () => exitInfo !== null,
    exitInfo: () => exitInfo,
    log: () => output.join(''),
  };
}

/** Polls until every port accepts a TCP connection or warren dies. */
async function waitForPorts(warren, ports) {
  const deadline = Date.now() + STARTUP_TIMEOUT_MS;
  for (const port of ports) {
    for (;;) {
      if (warren.hasExited()) {
        const info = warren.exitInfo();
        throw new Error(
          `warren exited during startup (${info.error ? info.error.message : `code ${info.code}, signal ${info.signal}`})`,
        );
      }
      if (await canConnect(port)) {
        break;
      }
      if (Date.now() > deadline) {
        throw new Error(`port ${port} did not accept connections within ${STARTUP_TIMEOUT_MS} ms`);
      }
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  }
}

async function stopWarren(warren) {
  if (warren.hasExited()) {
    return warren.exitInfo();
  }
  warren.child.kill('SIGTERM');
  const timer = new Promise((resolve) => setTimeout(resolve, SHUTDOWN_TIMEOUT_MS, null));
  const info = await Promise.race([warren.exited, timer]);
  if (info === null) {
    warren.child.kill('SIGKILL');
    await warren.exited;
    return { code: null, signal: 'SIGKILL', forced: true };
  }
  return info;
}

/** What the page shows, for failure messages. */
async function pageState(page) {
  try {
    return await page.evaluate(() => ({
      status: document.querySelector('#status')?.textContent,
      error: document.querySelector('#error')?.textContent,
      members: [...document.querySelectorAll('#members li')].map((li) => li.textContent.trim()),
      lines: [...document.querySelectorAll('#messages .line')].map((l) => l.textContent.trim()),
    }));
  } catch (err) {
    return { unavailable: err.message };
  }
}

/** Waits for `predicate(arg)` to hold in the page; explains the page state on timeout. */
async function waitInPage(who, page, what, predicate, arg) {
  try {
    await page.waitForFunction(predicate, arg, { timeout: STEP_TIMEOUT_MS });
  } catch (err) {
    const state = await pageState(page);
    throw new Error(
      `${who}: ${what} (not seen within ${STEP_TIMEOUT_MS} ms)\n  page: ${JSON.stringify(state)}\n  cause: ${err.message.split('\n')[0]}`,
    );
  }
}

function waitForConnected(who, page) {
  return waitInPage(who, page, '#status should say connected', () =>
    (document.querySelector('#status')?.textContent || '').includes('connected'),
  );
}

function waitForLine(who, page, text) {
  return waitInPage(
    who,
    page,
    `a #messages .line containing ${JSON.stringify(text)}`,
    (t) => [...document.querySelectorAll('#messages .line')].some((l) => l.textContent.includes(t)),
    text,
  );
}

function waitForMembers(who, page, expected) {
  return waitInPage(
    who,
    page,
    `#members should be exactly ${JSON.stringify(expected)}`,
    (want) => {
      const got = [...document.querySelectorAll('#members li')].map((li) => li.textContent.trim());
      return got.length === want.length && want.every((w) => got.includes(w));
    },
    expected,
  );
}

async function assertNoError(who, page) {
  const error = (await page.textContent('#error')) || '';
  assert.equal(error.trim(), '', `${who}: #error shows ${JSON.stringify(error)}`);
}

async function login(who, page, user) {
  await page.waitForSelector('#login:not([disabled])', { timeout: STEP_TIMEOUT_MS });
  await page.fill('#user', user);
  await page.fill('#room', ROOM);
  await page.click('#login');
  await page.waitForSelector('#text:not([disabled])', { timeout: STEP_TIMEOUT_MS }).catch(async (err) => {
    throw new Error(
      `${who}: login/join did not complete: ${JSON.stringify(await pageState(page))} (${err.message.split('\n')[0]})`,
    );
  });
}

async function openUser(browser, base, user, problems) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 700 } });
  const page = await context.newPage();
  page.on('pageerror', (err) => problems.push(`${user}: page error: ${err.message}`));
  page.on('console', (msg) => {
    if (msg.type() === 'error') {
      problems.push(`${user}: console error: ${msg.text()}`);
    }
  });
  const res = await page.goto(base, { timeout: STEP_TIMEOUT_MS });
  assert.ok(res && res.ok(), `${user}: GET ${base} answered ${res ? res.status() : 'nothing'}`);
  assert.equal(await page.title(), 'warren chat', `${user}: unexpected page title`);
  await waitForConnected(user, page);
  return { context, page };
}

// ------------------------------------------------------------------ the test

async function run(state) {
  const bin = findWarren();
  const [mqttPort, wsPort, httpPort] = await freePorts(3);
  const args = [
    'serve',
    '--no-demo-listeners',
    '--listen',
    `mqtt+mqant://127.0.0.1:${mqttPort}`,
    '--listen',
    `ws+mqant://127.0.0.1:${wsPort}`,
    '--http',
    `127.0.0.1:${httpPort}`,
  ];
  const shown = path.relative(REPO_ROOT, bin);
  console.log(`starting ${shown.startsWith('..') ? bin : shown} ${args.join(' ')}`);
  state.warren = startWarren(bin, args);
  await waitForPorts(state.warren, [httpPort, wsPort]);

  const base = `http://127.0.0.1:${httpPort}/`;
  const config = await (await fetch(`${base}config.json`)).json();
  assert.ok(
    typeof config.ws_url === 'string' && config.ws_url.startsWith(`ws://127.0.0.1:${wsPort}`),
    `/config.json should point at the ws+mqant listener on port ${wsPort}: ${JSON.stringify(config)}`,
  );

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

  const alice = await openUser(state.browser, base, 'alice', state.problems);
  const bob = await openUser(state.browser, base, 'bob', state.problems);

  // Both join the same room and see each other.
  await login('alice', alice.page, 'alice');
  await waitForMembers('alice', alice.page, ['alice']);
  await login('bob', bob.page, 'bob');
  await waitForMembers('bob', bob.page, ['alice', 'bob']);
  await waitForMembers('alice', alice.page, ['alice', 'bob']);
  await waitForLine('alice', alice.page, 'bob joined');
  console.log('ok: alice and bob joined and see each other');

  // alice → bob, sent with Enter.
  await alice.page.fill('#text', 'hello bob');
  await alice.page.press('#text', 'Enter');
  await waitForLine('bob', bob.page, 'alice: hello bob');
  await waitForLine('alice', alice.page, 'alice: hello bob');
  console.log('ok: bob received "hello bob"');

  // bob → alice, sent with the button.
  await bob.page.fill('#text', 'hi alice');
  await bob.page.click('#send');
  await waitForLine('alice', alice.page, 'bob: hi alice');
  await waitForLine('bob', bob.page, 'bob: hi alice');
  console.log('ok: alice received "hi alice"');

  await assertNoError('alice', alice.page);
  await assertNoError('bob', bob.page);

  mkdirSync(SHOT_DIR, { recursive: true });
  await bob.page.screenshot({ path: path.join(SHOT_DIR, 'chat-bob.png') });

  // bob leaves: alice gets OnLeave.
  await bob.context.close();
  await waitForLine('alice', alice.page, 'bob left');
  await waitForMembers('alice', alice.page, ['alice']);
  await assertNoError('alice', alice.page);
  console.log('ok: alice saw "bob left" and bob left the member list');

  await alice.page.screenshot({ path: path.join(SHOT_DIR, 'chat-alice.png') });
  console.log(`screenshots in ${path.relative(REPO_ROOT, SHOT_DIR)}/chat-alice.png, chat-bob.png`);

  assert.deepEqual(state.problems, [], 'the pages reported errors');
}

async function main() {
  const state = { warren: null, browser: null, problems: [] };
  let timer;
  const overall = new Promise((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`test did not finish within ${OVERALL_TIMEOUT_MS / 1000} s`)),
      OVERALL_TIMEOUT_MS,
    );
  });
  // Last resort if cleanup itself hangs: never outlive the budget by much.
  setTimeout(() => {
    state.warren?.child.kill('SIGKILL');
    console.error('FAIL: cleanup hung; killed warren');
    console.log('browser: 0 passed, 1 failed');
    process.exit(1);
  }, OVERALL_TIMEOUT_MS + 2 * SHUTDOWN_TIMEOUT_MS).unref();
  let failure = null;
  try {
    await Promise.race([run(state), overall]);
  } catch (err) {
    failure = err;
  } finally {
    clearTimeout(timer);
    if (state.browser) {
      await state.browser.close().catch(() => {});
    }
    if (state.warren) {
      const info = await stopWarren(state.warren);
      console.log(`warren stopped (code ${info.code}, signal ${info.signal}${info.forced ? ', killed after timeout' : ''})`);
    }
  }

  if (failure) {
    console.error(`\nFAIL: ${failure.message}`);
    if (state.problems.length > 0) {
      console.error(`page problems:\n  ${state.problems.join('\n  ')}`);
    }
    if (state.warren) {
      const log = state.warren.log().trimEnd().split('\n').slice(-40).join('\n');
      console.error(`last warren output:\n${log}`);
    }
    console.log('browser: 0 passed, 1 failed');
    process.exit(1);
  }
  console.log('browser: 1 passed, 0 failed');
  process.exit(0);
}

main();
