// A small pomelo client for the tests, over raw TCP or WebSocket.
//
// The bytes are made and read by the npm `pomelo-protocol` package (Package/Message/Protocol
// encoders and decoders), the code pomelo's own clients use; this file only moves them over a
// socket. On TCP it cuts the byte stream into whole packages with the 4-byte package head
// (type, 3-byte big-endian length) before handing each package to `Package.decode`.

import net from 'node:net';
import { createRequire } from 'node:module';
import WebSocket from 'ws';
import { within } from './harness.mjs';

const require = createRequire(import.meta.url);
/** pomelo-protocol 0.1.6: `{Package, Message, strencode, strdecode}`. */
export const Protocol = require('pomelo-protocol');
export const { Package, Message } = Protocol;

/** The handshake body of pomelo's js-websocket client (docs/protocols/pomelo.md, "Connecting"). */
export const CLIENT_HANDSHAKE = {
  sys: { type: 'js-websocket', version: '0.0.1', rsa: {} },
  user: {},
};

const WAIT_MS = 5_000;

/** One received package: its type, its body bytes, and for data packages the decoded message. */
class Received {
  constructor(type, body, seq) {
    this.type = type;
    /** Arrival order on this connection (0, 1, 2, …). */
    this.seq = seq;
    this.body = body ? Buffer.from(body) : Buffer.alloc(0);
    this.msg = null;
    if (type === Package.TYPE_DATA) {
      const m = Message.decode(this.body);
      this.msg = { ...m, body: Buffer.from(m.body) };
    }
  }

  /** The body parsed as JSON (the message body for data packages). */
  json() {
    const bytes = this.msg ? this.msg.body : this.body;
    return JSON.parse(Protocol.strdecode(bytes));
  }
}

/** One pomelo connection. Build it with `PomeloClient.connect('tcp' | 'ws', port)`. */
export class PomeloClient {
  constructor(transport) {
    this.transport = transport;
    this.received = [];
    this.arrived = 0;
    this.waiters = [];
    this.reqId = 0;
    this.isClosed = false;
    this.closeCode = null;
    this.rawBytes = [];
    this.closed = new Promise((resolve) => {
      this.markClosed = (code) => {
        if (!this.isClosed) {
          this.isClosed = true;
          this.closeCode = code ?? null;
          this.wake();
          resolve(code ?? null);
        }
      };
    });
  }

  /** Opens a connection to 127.0.0.1:`port` over `transport` ('tcp' or 'ws', path `path`). */
  static async connect(transport, port, path = '/') {
    const c = new PomeloClient(transport);
    if (transport === 'tcp') {
      await c.openTcp(port);
    } else {
      await c.openWs(port, path);
    }
    return c;
  }

  async openTcp(port) {
    let pending = Buffer.alloc(0);
    this.sock = net.connect({ host: '127.0.0.1', port });
    this.sock.setNoDelay(true);
    this.sock.on('data', (chunk) => {
      this.rawBytes.push(Buffer.from(chunk));
      pending = Buffer.concat([pending, chunk]);
      while (pending.length >= 4) {
        const len = pending.readUIntBE(1, 3);
        if (pending.length < 4 + len) {
          break;
        }
        this.onPackages(pending.subarray(0, 4 + len));
        pending = pending.subarray(4 + len);
      }
    });
    this.sock.on('error', () => this.markClosed(null));
    this.sock.on('close', () => this.markClosed(null));
    await within(WAIT_MS, new Promise((resolve, reject) => {
      this.sock.once('connect', resolve);
      this.sock.once('error', reject);
    }), 'the TCP connection');
  }

  async openWs(port, path) {
    this.ws = new WebSocket(`ws://127.0.0.1:${port}${path}`);
    this.ws.on('message', (data, isBinary) => {
      const buf = Buffer.isBuffer(data) ? data : Buffer.concat(data);
      this.rawBytes.push(buf);
      this.frames = (this.frames ?? 0) + 1;
      this.textFrames = (this.textFrames ?? 0) + (isBinary ? 0 : 1);
      this.onPackages(buf);
    });
    this.ws.on('error', () => this.markClosed(null));
    this.ws.on('close', (code) => this.markClosed(code));
    await within(WAIT_MS, new Promise((resolve, reject) => {
      this.ws.once('open', resolve);
      this.ws.once('error', reject);
    }), 'the WebSocket upgrade');
  }

  /** Decodes whole packages with `Package.decode` (one object, or an array of several). */
  onPackages(bytes) {
    const decoded = Package.decode(bytes);
    for (const p of Array.isArray(decoded) ? decoded : [decoded]) {
      this.received.push(new Received(p.type, p.body, this.arrived));
      this.arrived += 1;
    }
    this.wake();
  }

  wake() {
    for (const w of this.waiters.splice(0)) {
      w();
    }
  }

  /** Writes raw bytes (a whole package, or anything at all for the bad-input tests). */
  sendRaw(bytes) {
    if (this.transport === 'tcp') {
      this.sock.write(bytes);
    } else {
      this.ws.send(bytes, { binary: true });
    }
  }

  /** Encodes and writes one package. */
  sendPackage(type, body) {
    this.sendRaw(Package.encode(type, body ?? null));
  }

  /**
   * Removes and returns the earliest received package matching `pred`; waits up to `ms`.
   * Throws when the connection closes or the time runs out first.
   */
  async next(pred, what, ms = WAIT_MS) {
    const deadline = Date.now() + ms;
    for (;;) {
      const i = this.received.findIndex(pred);
      if (i >= 0) {
        return this.received.splice(i, 1)[0];
      }
      if (this.isClosed) {
        throw new Error(`connection closed while waiting for ${what}; left unread: ${this.describe()}`);
      }
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new Error(`no ${what} within ${ms} ms; left unread: ${this.describe()}`);
      }
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }

  describe() {
    return JSON.stringify(
      this.received.map((p) => (p.msg
        ? { type: p.type, msgType: p.msg.type, id: p.msg.id, route: p.msg.route, body: Protocol.strdecode(p.msg.body) }
        : { type: p.type, body: p.body.toString() })),
    );
  }

  /** Sends the handshake (`body`, else the js-websocket one) and returns the response package. */
  async handshake(body = CLIENT_HANDSHAKE) {
    this.sendPackage(Package.TYPE_HANDSHAKE, Protocol.strencode(JSON.stringify(body)));
    return this.next((p) => p.type === Package.TYPE_HANDSHAKE, 'a handshake response');
  }

  /** Sends the handshake ack. */
  ack() {
    this.sendPackage(Package.TYPE_HANDSHAKE_ACK);
  }

  /** Sends a heartbeat. */
  heartbeat() {
    this.sendPackage(Package.TYPE_HEARTBEAT);
  }

  /** Waits for a heartbeat from the server. */
  nextHeartbeat(ms = WAIT_MS) {
    return this.next((p) => p.type === Package.TYPE_HEARTBEAT, 'a heartbeat', ms);
  }

  /** Handshake, check code 200, ack, and take the server's first heartbeat: ready for data. */
  async start() {
    const hs = (await this.handshake()).json();
    if (hs.code !== 200) {
      throw new Error(`handshake refused: ${JSON.stringify(hs)}`);
    }
    this.ack();
    await this.nextHeartbeat();
    return hs;
  }

  /** Sends a request; returns its id without waiting (`route` a string, or a dictionary code). */
  sendRequest(route, body) {
    this.reqId += 1;
    const compressed = typeof route === 'number';
    const msg = Message.encode(
      this.reqId, Message.TYPE_REQUEST, compressed ? 1 : 0, route,
      Protocol.strencode(JSON.stringify(body)),
    );
    this.sendPackage(Package.TYPE_DATA, msg);
    return this.reqId;
  }

  /** Waits for the response to request `id` and returns its parsed JSON body. */
  async response(id, ms = WAIT_MS) {
    const p = await this.next(
      (x) => x.msg && x.msg.type === Message.TYPE_RESPONSE && x.msg.id === id,
      `the response to request ${id}`,
      ms,
    );
    return p.json();
  }

  /** Request → response. */
  async request(route, body, ms = WAIT_MS) {
    return this.response(this.sendRequest(route, body), ms);
  }

  /** Sends a notify (which never gets a response). */
  notify(route, body) {
    const msg = Message.encode(0, Message.TYPE_NOTIFY, 0, route, Protocol.strencode(JSON.stringify(body)));
    this.sendPackage(Package.TYPE_DATA, msg);
  }

  /** Waits for a push on `route` (and matching `pred`) and returns its parsed body. */
  async push(route, pred = () => true, ms = WAIT_MS) {
    const p = await this.next(
      (x) => x.msg && x.msg.type === Message.TYPE_PUSH && x.msg.route === route && pred(x.json()),
      `a push on ${route}`,
      ms,
    );
    return p.json();
  }

  /** Responses received so far (not yet taken). */
  responses() {
    return this.received.filter((x) => x.msg && x.msg.type === Message.TYPE_RESPONSE);
  }

  /** True when the server closes the connection within `ms`. */
  async closedWithin(ms = WAIT_MS) {
    let timer;
    const t = new Promise((resolve) => {
      timer = setTimeout(() => resolve(false), ms);
    });
    const r = await Promise.race([this.closed.then(() => true), t]);
    clearTimeout(timer);
    return r;
  }

  /** Closes our end. */
  close() {
    if (this.sock) {
      this.sock.destroy();
    }
    if (this.ws) {
      this.ws.terminate();
    }
  }
}
