// Shared harness of the Node end-to-end tests: start a real `warren serve` on free ports, wait
// for its listeners, stop it, and show its log when a test fails.
//
// Every test starts its own server, so test files are independent and may run in parallel.

import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** The repository root: tests/node/harness.mjs -> two levels up. */
export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

/** Budget for the server to open its ports. */
const STARTUP_TIMEOUT_MS = 20_000;
/** Budget for the server to exit after a signal before it is killed. */
const SHUTDOWN_TIMEOUT_MS = 15_000;
/** How much of the log a failure message shows. */
const LOG_TAIL_CHARS = 6_000;

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
  throw new Error('warren binary not found: set WARREN_BIN or run `cargo build --release -p warren-cli`');
}

const given = new Set();

/**
 * `n` distinct TCP ports on 127.0.0.1 that are free now and not handed out before here. They come
 * from below the kernel's ephemeral range (32768+), so outgoing connections cannot take one
 * between the moment it is chosen and the moment warren binds it.
 */
export async function freePorts(n) {
  const out = [];
  while (out.length < n) {
    const port = 20000 + Math.floor(Math.random() * 12000);
    if (given.has(port)) continue;
    const srv = net.createServer();
    const ok = await new Promise((resolve) => {
      srv.once('error', () => resolve(false));
      srv.listen(port, '127.0.0.1', () => resolve(true));
    });
    if (!ok) continue;
    await new Promise((resolve) => srv.close(resolve));
    given.add(port);
    out.push(port);
  }
  return out;
}

/** One free port. */
export async function freePort() {
  return (await freePorts(1))[0];
}

/** Resolves after `ms` milliseconds. */
export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Races `promise` against a timer; the error names `what` was awaited. */
export async function within(ms, promise, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
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
 * One `warren serve` process. `listen` holds `--listen` URLs; `config` is the text of a TOML
 * config file (written to a temporary directory); `ports` are extra ports to wait for (those of
 * the config file's listeners); `args` are further command-line arguments.
 */
export class Warren {
  constructor({ listen = [], args = [], config = null, ports = [] } = {}) {
    this.bin = findWarren();
    this.listen = listen;
    this.ports = [...ports];
    for (const url of listen) {
      this.ports.push(Number(new URL(url).port));
    }
    this.args = ['serve', '--no-demo-listeners', '--no-http'];
    if (config !== null) {
      const dir = mkdtempSync(path.join(os.tmpdir(), 'warren-node-'));
      this.configPath = path.join(dir, 'warren.toml');
      writeFileSync(this.configPath, config);
      this.args.push('--config', this.configPath);
    }
    for (const url of listen) {
      this.args.push('--listen', url);
    }
    this.args.push(...args);
    this.output = '';
    this.exitInfo = null;
    this.child = spawn(this.bin, this.args, {
      cwd: REPO_ROOT,
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, RUST_LOG: 'info', NO_COLOR: '1' },
    });
    const keep = (chunk) => {
      this.output += chunk.toString();
      if (this.output.length > 4 * LOG_TAIL_CHARS) {
        this.output = this.output.slice(-2 * LOG_TAIL_CHARS);
      }
    };
    this.child.stdout.on('data', keep);
    this.child.stderr.on('data', keep);
    this.exited = new Promise((resolve) => {
      this.child.once('exit', (code, signal) => resolve({ code, signal }));
      this.child.once('error', (error) => resolve({ code: null, signal: null, error }));
    });
    this.exited.then((info) => {
      this.exitInfo = info;
    });
  }

  /** True while the process has not exited. */
  running() {
    return this.exitInfo === null;
  }

  /** Waits until every listener port accepts TCP connections. */
  async ready() {
    const deadline = Date.now() + STARTUP_TIMEOUT_MS;
    for (const port of this.ports) {
      for (;;) {
        if (!this.running()) {
          throw new Error(`warren exited during startup: ${JSON.stringify(this.exitInfo)}\n${this.tail()}`);
        }
        if (await canConnect(port)) {
          break;
        }
        if (Date.now() > deadline) {
          throw new Error(`port ${port} not accepting within ${STARTUP_TIMEOUT_MS} ms\n${this.tail()}`);
        }
        await sleep(50);
      }
    }
    return this;
  }

  /** Sends `signal` and waits for the exit (killing on timeout); returns {code, signal}. */
  async stop(signal = 'SIGTERM') {
    if (!this.running()) {
      return this.exitInfo;
    }
    this.child.kill(signal);
    const timer = sleep(SHUTDOWN_TIMEOUT_MS).then(() => null);
    const info = await Promise.race([this.exited, timer]);
    if (info === null) {
      this.child.kill('SIGKILL');
      await this.exited;
      throw new Error(`warren did not exit within ${SHUTDOWN_TIMEOUT_MS} ms of ${signal}\n${this.tail()}`);
    }
    return info;
  }

  /** Kills the process at once (no drain). */
  async kill() {
    if (this.running()) {
      this.child.kill('SIGKILL');
      await this.exited;
    }
  }

  /** The command and the last lines of output, for failure messages. */
  tail() {
    return `--- warren ${this.args.join(' ')} ---\n${this.output.slice(-LOG_TAIL_CHARS)}`;
  }
}

/**
 * Starts a ready warren for test context `t` and kills it when the test ends. When the test body
 * fails, `withWarren` (below) appends the server's log to the error.
 */
export async function startWarren(t, opts) {
  const w = new Warren(opts);
  t.after(() => w.kill());
  (t.warrens ??= []).push(w);
  await w.ready();
  return w;
}

/**
 * Wraps a test body so a failure carries the log of every warren the test started (node:test
 * shows the error message, which is where a reader needs the server's side of the story).
 */
export function withWarren(fn) {
  return async (t) => {
    try {
      await fn(t);
    } catch (err) {
      const logs = (t.warrens ?? []).map((w) => w.tail()).join('\n');
      if (logs && err instanceof Error) {
        err.message += `\n${logs}`;
      }
      throw err;
    }
  };
}

/** `scheme://127.0.0.1:<free port>?k=v&…` for `--listen`. */
export async function listenUrl(scheme, query = {}) {
  const port = await freePort();
  const qs = new URLSearchParams(Object.entries(query).map(([k, v]) => [k, String(v)])).toString();
  return `${scheme}://127.0.0.1:${port}${qs ? `?${qs}` : ''}`;
}

/** The port of a listener URL. */
export function portOf(url) {
  return Number(new URL(url).port);
}
