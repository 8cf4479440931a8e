// Shared harness of the headless-Chromium tests (chat.test.mjs, dashboard.test.mjs): find and
// start a real warren on free ports, wait for its listeners, stop it, launch Chromium, collect
// page errors, save screenshots, and run a test under an overall budget with cleanup and a
// one-line verdict.
//
// tests/node/harness.mjs does much the same for the Node tests, but tests/browser and tests/node
// are separate npm packages, so this file stays self-contained rather than importing across them.

import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, rmSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

/** The repository root (tests/browser/harness.mjs -> two levels up): warren runs from here. */
export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
/** Where screenshots land, so a reader can look at what the page showed. */
export const SHOT_DIR = path.join(REPO_ROOT, 'target', 'browser');
/** Budget for the server to open its ports. */
export const STARTUP_TIMEOUT_MS = 15_000;
/** Budget for a process to exit after SIGTERM before it is killed. */
export const SHUTDOWN_TIMEOUT_MS = 5_000;

/** The binary to test: $WARREN_BIN, else target/release/warren, else target/debug/warren. */
export function findWarren() {
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

/** `bin` as the "starting ..." line shows it: relative to the repository when inside it. */
export function shownPath(bin) {
  const shown = path.relative(REPO_ROOT, bin);
  return shown.startsWith('..') ? bin : shown;
}

/** Asks the OS for `n` distinct free TCP ports on 127.0.0.1, for warren's listeners. */
export async function freePorts(n) {
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

/**
 * Starts a child process (warren serve, warren bench) and keeps the end of its output so a
 * failure can show it. `exited` resolves to {code, signal} (or {error}); `exitInfo()` is that
 * once known, else null.
 */
export function start(bin, args, name) {
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

/** Polls until every port accepts a TCP connection, failing early if the process dies. */
export async function waitForPorts(proc, ports) {
  const deadline = Date.now() + STARTUP_TIMEOUT_MS;
  for (const port of ports) {
    for (;;) {
      const info = proc.exitInfo();
      if (info) {
        throw new Error(
          `${proc.name} exited during startup (${info.error ? info.error.message : `code ${info.code}, signal ${info.signal}`})`,
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

/** Sends SIGTERM and waits for the exit, killing after SHUTDOWN_TIMEOUT_MS; returns {code, signal}. */
export async function stop(proc) {
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

/** Launches headless Chromium ($CHROMIUM, else Debian's /usr/bin/chromium) quiet and offline. */
export function launchChromium(timeout) {
  return chromium.launch({
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
    timeout,
  });
}

/**
 * Records the page's uncaught errors and console errors in `problems` (each prefixed with
 * `prefix`), so a test can assert at the end that the page reported none. Console errors whose
 * text matches `ignore` are expected and skipped.
 */
export function collectProblems(page, problems, { prefix = '', ignore = null } = {}) {
  page.on('pageerror', (err) => problems.push(`${prefix}page error: ${err.message}`));
  page.on('console', (msg) => {
    if (msg.type() === 'error' && !(ignore && ignore.test(msg.text()))) {
      problems.push(`${prefix}console error: ${msg.text()}`);
    }
  });
}

/**
 * Waits for `predicate(arg)` to hold in the page; on timeout the error says `what` was awaited
 * and what `pageState(page)` reports, which is what a reader of a failure needs.
 */
export async function waitInPage(page, what, predicate, arg, { timeout, polling, pageState }) {
  try {
    await page.waitForFunction(predicate, arg, polling === undefined ? { timeout } : { timeout, polling });
  } catch (err) {
    throw new Error(
      `${what} (not seen within ${timeout} ms)\n  page: ${JSON.stringify(await pageState(page))}\n  cause: ${err.message.split('\n')[0]}`,
    );
  }
}

/** Saves a screenshot as SHOT_DIR/`file` (creating the directory). */
export async function screenshot(page, file, options = {}) {
  mkdirSync(SHOT_DIR, { recursive: true });
  await page.screenshot({ ...options, path: path.join(SHOT_DIR, file) });
}

/**
 * Runs `run(state)` within `overallTimeoutMs`, then cleans up whatever it left in `state`
 * (sockets, browser, child processes, warren, temporary directory), prints the failure with the
 * page problems and the end of warren's output, prints `browser: N passed, M failed` (which
 * scripts/test reads) and exits. If cleanup itself hangs, the process is killed
 * `cleanupGraceMs` after the budget.
 *
 * `state` is {warren, browser, children, sockets, problems, dir}; `run` fills in what it uses.
 */
export async function runTest(run, { overallTimeoutMs, cleanupGraceMs }) {
  const state = { warren: null, browser: null, children: [], sockets: [], problems: [], dir: null };
  let timer;
  const overall = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`test did not finish within ${overallTimeoutMs / 1000} s`)), overallTimeoutMs);
  });
  // Last resort if cleanup itself hangs: never outlive the budget by much.
  setTimeout(() => {
    for (const p of [state.warren, ...state.children]) {
      p?.child.kill('SIGKILL');
    }
    console.error('FAIL: cleanup hung; killed warren');
    console.log('browser: 0 passed, 1 failed');
    process.exit(1);
  }, overallTimeoutMs + cleanupGraceMs).unref();
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
