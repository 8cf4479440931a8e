// End-to-end tests of warren's pomelo-rpc listeners (docs/protocols/pomelo-rpc.md): the npm
// `pomelo-rpc` 1.0.7 client against `pomelo-rpc://` (MQTT transport), the byte vectors of 8.7
// over a raw socket, and stream-pkg frames (8.6) against `pomelo-rpc+tcp://`.
//
// Run from the repository root: `npm ci --prefix tests/node && node --test tests/node/`.

import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import net from 'node:net';
import path from 'node:path';
import { test } from 'node:test';
import { freePort, listenUrl, portOf, sleep, startWarren, within, withWarren } from './harness.mjs';

const require = createRequire(import.meta.url);
const RpcClient = require('pomelo-rpc').client;
// stream-pkg's Composer, resolved from pomelo-rpc itself: the framing its TCP mailbox uses.
const Composer = createRequire(require.resolve('pomelo-rpc'))('stream-pkg');
const SAMPLE_REMOTE = path.join(path.dirname(require.resolve('pomelo-rpc')), 'sample', 'remote', 'test');

/** The argument of upstream's sample client (docs/protocols/pomelo-rpc.md, "Messages"). */
const SAMPLE_ARG = ['onReloadSkill', ['210108'], { type: 'push', userOptions: {}, isPush: true }];
const SERVER_ID = 'warren-rpc-1';

const text = (s) => Buffer.from(s, 'utf8');
const hex = (s) => Buffer.from(s.replace(/\s+/g, ''), 'hex');
const dump = (b) => [...b].map((x) => x.toString(16).padStart(2, '0')).join(' ');

/** A vector as docs/protocols/pomelo-rpc.md writes it: strings are hex, Buffers literal. */
function v(...parts) {
  return Buffer.concat(parts.map((p) => (typeof p === 'string' ? hex(p) : p)));
}

/** A started pomelo-rpc client aimed at 127.0.0.1:`port`; stopped (timers too) when the test ends. */
async function rpcClient(t, port, opts = {}) {
  const servers = [{ id: SERVER_ID, serverType: 'test', host: '127.0.0.1', port }];
  const client = RpcClient.create({
    routeContext: servers,
    router: (routeParam, msg, routeContext, cb) => cb(null, routeContext[0].id),
    context: { serverId: 'node-test-client' },
    ...opts,
  });
  await new Promise((resolve, reject) => client.start((err) => (err ? reject(err) : resolve())));
  client.addServers(servers);
  t.after(() => {
    client.stop(true);
    // The MQTT mailbox leaves its keepalive interval running after close: clear it.
    for (const mb of Object.values(client._station.mailboxes)) {
      clearInterval(mb.keepaliveTimer);
      clearInterval(mb._interval);
      for (const timer of Object.values(mb.timeout ?? {})) {
        clearTimeout(timer);
      }
    }
  });
  return client;
}

/** `rpcInvoke` as a promise of the callback's arguments `[err, ...results]`. */
function invoke(client, msg, ms = 10_000) {
  return within(ms, new Promise((resolve) => {
    client.rpcInvoke(SERVER_ID, { serverType: 'test', ...msg }, (...args) => resolve(args));
  }), `the reply to ${JSON.stringify(msg)}`);
}

/**
 * A pomelo-rpc listener with the Echo module; returns [warren, port]. The listener admits only
 * 127.0.0.1, so its peers are trusted servers and may call RPC-only handlers such as `echo`.
 */
async function rpcServer(t, scheme = 'pomelo-rpc', query = {}) {
  const url = await listenUrl(scheme, { allow: '127.0.0.1', ...query });
  const w = await startWarren(t, { listen: [url], args: ['--module', 'Echo'] });
  return [w, portOf(url)];
}

/** The same with a config file mapping the sample's service name `service` onto `Echo`. */
async function mappedServer(t, extra = []) {
  const port = await freePort();
  const config = [
    '[[listener]]',
    'protocol = "pomelo-rpc"',
    'transport = "mqtt"',
    `addr = "127.0.0.1:${port}"`,
    'service_map = { service = "Echo" }',
    'allow = ["127.0.0.1"]',
    ...extra,
    '',
    '[[module]]',
    'type = "Echo"',
    '',
  ].join('\n');
  const w = await startWarren(t, { config, ports: [port] });
  return [w, port];
}

// ------------------------------------------------------------------ raw socket helpers

/** A raw TCP connection with a byte buffer and exact reads. */
class Raw {
  static async open(port) {
    const r = new Raw();
    r.buf = Buffer.alloc(0);
    r.isClosed = false;
    r.waiters = [];
    r.sock = net.connect({ host: '127.0.0.1', port });
    r.sock.setNoDelay(true);
    r.sock.on('data', (d) => {
      r.buf = Buffer.concat([r.buf, d]);
      r.wake();
    });
    const done = () => {
      r.isClosed = true;
      r.wake();
    };
    r.sock.on('close', done);
    r.sock.on('error', done);
    await within(5_000, new Promise((resolve, reject) => {
      r.sock.once('connect', resolve);
      r.sock.once('error', reject);
    }), 'the TCP connection');
    return r;
  }

  wake() {
    for (const w of this.waiters.splice(0)) {
      w();
    }
  }

  send(bytes) {
    this.sock.write(bytes);
  }

  /** Waits until `have(buf)` returns a length to take (or null), up to `ms`. */
  async take(have, what, ms = 5_000) {
    const deadline = Date.now() + ms;
    for (;;) {
      const n = have(this.buf);
      if (n !== null) {
        const out = this.buf.subarray(0, n);
        this.buf = this.buf.subarray(n);
        return Buffer.from(out);
      }
      if (this.isClosed) {
        throw new Error(`closed while waiting for ${what}; buffered: ${dump(this.buf)}`);
      }
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new Error(`no ${what} within ${ms} ms; buffered: ${dump(this.buf)}`);
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

  exact(n, what = `${n} bytes`) {
    return this.take((b) => (b.length >= n ? n : null), what);
  }

  /** One whole MQTT packet (fixed header + remaining length + body). */
  mqttPacket() {
    return this.take((b) => {
      let mult = 1;
      let len = 0;
      for (let i = 1; i <= 4; i += 1) {
        if (b.length <= i) {
          return null;
        }
        len += (b[i] & 0x7f) * mult;
        mult *= 128;
        if (!(b[i] & 0x80)) {
          return b.length >= 1 + i + len ? 1 + i + len : null;
        }
      }
      throw new Error(`bad remaining length: ${dump(b.subarray(0, 5))}`);
    }, 'an MQTT packet');
  }

  async closedWithin(ms = 5_000) {
    const deadline = Date.now() + ms;
    while (!this.isClosed && Date.now() < deadline) {
      await sleep(20);
    }
    return this.isClosed;
  }

  close() {
    this.sock.destroy();
  }
}

/** MQTT remaining-length bytes. */
function remLen(n) {
  const out = [];
  do {
    let b = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) {
      b |= 0x80;
    }
    out.push(b);
  } while (n > 0);
  return Buffer.from(out);
}

/** A QoS 0 PUBLISH on topic `rpc` carrying `payload`. */
function publishRpc(payload) {
  const body = Buffer.concat([hex('00 03'), text('rpc'), text(payload)]);
  return Buffer.concat([hex('30'), remLen(body.length), body]);
}

/** The payload of a QoS 0 PUBLISH packet (asserting its topic is `rpc`). */
function publishPayload(pkt) {
  assert.equal(pkt[0], 0x30, `not a QoS 0 PUBLISH: ${dump(pkt)}`);
  let i = 1;
  while (pkt[i] & 0x80) {
    i += 1;
  }
  i += 1;
  const tlen = pkt.readUInt16BE(i);
  assert.equal(pkt.subarray(i + 2, i + 2 + tlen).toString(), 'rpc');
  return pkt.subarray(i + 2 + tlen).toString();
}

/** The CONNECT of pomelo-rpc's MQTT mailbox (docs/protocols/pomelo-rpc.md, "Transports"). */
function rpcConnect() {
  return v('10 22 00 04', text('MQTT'), '04 02 00 00 00 16', text(`MQTT_RPC_${Date.now()}`));
}

/** A raw connection that has sent the mailbox's CONNECT and read the CONNACK. */
async function rawRpc(t, port) {
  const r = await Raw.open(port);
  t.after(() => r.close());
  r.send(rpcConnect());
  assert.deepEqual(await r.exact(4, 'CONNACK'), hex('20 02 00 00'));
  return r;
}

/** stream-pkg length bytes: big-endian base-128, 0x80 on every byte but the last. */
function pkgLength(n) {
  return new Composer().compose(Buffer.alloc(n, 0x20)).subarray(0, -n);
}

// ------------------------------------------------------------------ tests

test('vectors are self-consistent', () => {
  const req = '{"id":0,"msg":{"namespace":"user","serverType":"test","service":"service","method":"echo","args":[["onReloadSkill",["210108"],{"type":"push","userOptions":{},"isPush":true}],"aaa"]}}';
  assert.deepEqual(publishRpc(req).subarray(0, 3), hex('30 bb 01'));
  assert.equal(rpcConnect().length, 2 + 0x22);
  // docs/protocols/pomelo-rpc.md, "Transports": stream-pkg's own encoder gives the table's length
  // bytes.
  const table = { 5: '05', 127: '7f', 128: '81 00', 300: '82 2c', 16384: '81 80 00', 2097151: 'ff ff 7f', 2097152: '81 80 80 00' };
  for (const [n, bytes] of Object.entries(table)) {
    assert.deepEqual(pkgLength(Number(n)), hex(bytes), `length ${n}`);
  }
});

test('the pomelo-rpc client calls user.Echo.echo and gets its reply', withWarren(async (t) => {
  const [, port] = await rpcServer(t);
  const client = await rpcClient(t, port);
  const [err, result, ...rest] = await invoke(client, {
    namespace: 'user', service: 'Echo', method: 'echo', args: [SAMPLE_ARG, 'aaa'],
  });
  assert.equal(err, null);
  assert.deepEqual(result, SAMPLE_ARG);
  assert.deepEqual(rest, []);
  // Several calls in flight on one connection, each answered by id.
  const many = await Promise.all([1, 2, 3, 4, 5].map((n) => invoke(client, {
    namespace: 'user', service: 'Echo', method: 'echo', args: [{ n }, 'x'],
  })));
  assert.deepEqual(many, [1, 2, 3, 4, 5].map((n) => [null, { n }]));
  // One plain argument (not an object) is passed as the array.
  assert.deepEqual(await invoke(client, { namespace: 'user', service: 'Echo', method: 'echo', args: ['plain'] }), [null, 'plain']);
}));

test('the pomelo-rpc client sees namespace, service and method errors', withWarren(async (t) => {
  const [, port] = await rpcServer(t);
  const client = await rpcClient(t, port);
  const cases = [
    [{ namespace: 'nope', service: 'Echo', method: 'echo', args: [] }, 'no such namespace:nope'],
    [{ namespace: 'user', service: 'Nope', method: 'echo', args: [] }, 'no such service:Nope'],
    [{ namespace: 'user', service: 'Echo', method: 'nope', args: [] }, 'no such method:nope'],
  ];
  for (const [msg, why] of cases) {
    const [err, ...rest] = await invoke(client, msg);
    assert.deepEqual(err, { msg: why, stack: `Error: ${why}` }, JSON.stringify(msg));
    assert.deepEqual(rest, []);
  }
  // The connection is still good afterwards.
  assert.deepEqual(await invoke(client, { namespace: 'user', service: 'Echo', method: 'echo', args: [7, 'x'] }), [null, 7]);
}));

test('the upstream sample client runs unchanged against service_map = { service = "Echo" }', withWarren(async (t) => {
  const [, port] = await mappedServer(t);
  const client = await rpcClient(t, port);
  // Exactly sample/client.js: proxies generated from sample/remote/test, `toServer` call.
  client.addProxies([{ namespace: 'user', serverType: 'test', path: SAMPLE_REMOTE }]);
  const reply = await within(10_000, new Promise((resolve) => {
    client.proxies.user.test.service.echo.toServer(SERVER_ID, SAMPLE_ARG, 'aaa', (err, resp, data) => resolve([err, resp, data]));
  }), 'the sample echo');
  assert.deepEqual(reply, [null, SAMPLE_ARG, undefined]);
}));

test('client-side buffering (bufferMsg) sends arrays and gets every reply', withWarren(async (t) => {
  const [, port] = await rpcServer(t);
  const client = await rpcClient(t, port, { bufferMsg: true, interval: 30 });
  const replies = await Promise.all(['a', 'b', 'c'].map((x) => invoke(client, {
    namespace: 'user', service: 'Echo', method: 'echo', args: [x, 'ignored'],
  })));
  assert.deepEqual(replies, [[null, 'a'], [null, 'b'], [null, 'c']]);
}));

test('the byte vectors of docs/protocols/pomelo-rpc.md on pomelo-rpc://', withWarren(async (t) => {
  const [, port] = await mappedServer(t);
  const r = await rawRpc(t, port);
  // request → response
  r.send(v('30 bb 01 00 03', text('rpc'), text(
    '{"id":0,"msg":{"namespace":"user","serverType":"test","service":"service","method":"echo","args":[["onReloadSkill",["210108"],{"type":"push","userOptions":{},"isPush":true}],"aaa"]}}',
  )));
  const want = v('30 67 00 03', text('rpc'), text(
    '{"id":0,"resp":[null,["onReloadSkill",["210108"],{"type":"push","userOptions":{},"isPush":true}]]}',
  ));
  assert.equal(dump(await r.mqttPacket()), dump(want));
  // error
  r.send(publishRpc('{"id":1,"msg":{"namespace":"nope","serverType":"test","service":"service","method":"echo","args":[]}}'));
  const err = v('30 5f 00 03', text('rpc'), text('{"id":1,"resp":[{"msg":"no such namespace:nope","stack":"Error: no such namespace:nope"}]}'));
  assert.equal(dump(await r.mqttPacket()), dump(err));
  // ping
  r.send(hex('c0 00'));
  assert.deepEqual(await r.exact(2, 'PINGRESP'), hex('d0 00'));
  // An array of requests (client-side buffering) gets one response per request.
  r.send(publishRpc(JSON.stringify([
    { id: 2, msg: { namespace: 'user', serverType: 'test', service: 'service', method: 'echo', args: ['x'] } },
    { id: 3, msg: { namespace: 'user', serverType: 'test', service: 'Echo', method: 'echo', args: ['y'] } },
  ])));
  const got = [];
  while (got.length < 2) {
    const p = JSON.parse(publishPayload(await r.mqttPacket()));
    got.push(...(Array.isArray(p) ? p : [p]));
  }
  got.sort((a, b) => a.id - b.id);
  assert.deepEqual(got, [{ id: 2, resp: [null, 'x'] }, { id: 3, resp: [null, 'y'] }]);
}));

test('a config-file pomelo-rpc listener speaks MQTT unless told otherwise', withWarren(async (t) => {
  // docs/protocols/pomelo-rpc.md: `transport = "mqtt"` is the default (pomelo-rpc 1.0.7's).
  const port = await freePort();
  const config = `[[listener]]\nprotocol = "pomelo-rpc"\naddr = "127.0.0.1:${port}"\nallow = ["127.0.0.1"]\n\n[[module]]\ntype = "Echo"\n`;
  await startWarren(t, { config, ports: [port] });
  const r = await rawRpc(t, port);
  r.send(publishRpc('{"id":0,"msg":{"namespace":"user","serverType":"test","service":"Echo","method":"echo","args":[1,2]}}'));
  assert.equal(dump(await r.mqttPacket()), dump(publishRpc('{"id":0,"resp":[null,1]}')));
}));

test('send_connack = false sends no CONNACK; the first bytes are the reply', withWarren(async (t) => {
  const [, port] = await rpcServer(t, 'pomelo-rpc', { send_connack: false });
  const r = await Raw.open(port);
  t.after(() => r.close());
  r.send(Buffer.concat([rpcConnect(), publishRpc('{"id":0,"msg":{"namespace":"user","serverType":"test","service":"Echo","method":"echo","args":[1]}}')]));
  assert.equal(dump(await r.mqttPacket()), dump(publishRpc('{"id":0,"resp":[null,1]}')));
}));

test('buffer_msg = true flushes queued responses as one PUBLISH of an array', withWarren(async (t) => {
  const [, port] = await rpcServer(t, 'pomelo-rpc', { buffer_msg: true, interval_ms: 1000 });
  const r = await rawRpc(t, port);
  const req = (id, n) => publishRpc(JSON.stringify({
    id, msg: { namespace: 'user', serverType: 'test', service: 'Echo', method: 'echo', args: [n] },
  }));
  r.send(Buffer.concat([req(0, 1), req(1, 2)]));
  const payload = publishPayload(await r.mqttPacket());
  assert.equal(payload, '[{"id":0,"resp":[null,1]},{"id":1,"resp":[null,2]}]');
}));

test('trace = true echoes traceId, seqId and source', withWarren(async (t) => {
  const [, port] = await rpcServer(t, 'pomelo-rpc', { trace: true });
  const r = await rawRpc(t, port);
  r.send(publishRpc(JSON.stringify({
    traceId: 'tr-1', seqId: 4, source: 'connector-1', remote: 'x', id: 0,
    msg: { namespace: 'user', serverType: 'test', service: 'Echo', method: 'echo', args: ['t'] },
  })));
  const p = JSON.parse(publishPayload(await r.mqttPacket()));
  assert.deepEqual(p, { id: 0, resp: [null, 't'], traceId: 'tr-1', seqId: 4, source: 'connector-1' });
}));

test('unparseable and msg-less requests on pomelo-rpc://', withWarren(async (t) => {
  const [, port] = await rpcServer(t);
  const r = await rawRpc(t, port);
  // Unparseable: dropped (no id to answer); the connection stays.
  r.send(publishRpc('{not json'));
  // Parseable without msg: an error naming it.
  r.send(publishRpc('{"id":5}'));
  const p = JSON.parse(publishPayload(await r.mqttPacket()));
  assert.equal(p.id, 5);
  assert.equal(p.resp[0].msg, 'invalid request');
  r.send(publishRpc('{"id":6,"msg":{"namespace":"user","serverType":"test","service":"Echo","method":"echo","args":[6]}}'));
  assert.deepEqual(JSON.parse(publishPayload(await r.mqttPacket())), { id: 6, resp: [null, 6] });
}));

test('stream-pkg frames on pomelo-rpc+tcp://', withWarren(async (t) => {
  const [, port] = await rpcServer(t, 'pomelo-rpc+tcp');
  const r = await Raw.open(port);
  t.after(() => r.close());
  const composer = new Composer();
  // docs/protocols/pomelo-rpc.md, "Transports", frame example: 1b '{"id":1,"resp":[null,"ok"]}'.
  r.send(composer.compose('{"id":1,"msg":{"namespace":"user","serverType":"test","service":"Echo","method":"echo","args":["ok"]}}'));
  assert.deepEqual(await r.exact(1 + 0x1b, 'the framed reply'), v('1b', text('{"id":1,"resp":[null,"ok"]}')));

  // A body over 127 bytes has a two-byte length; replies are decoded with stream-pkg itself.
  const big = 'b'.repeat(300);
  const decoded = [];
  const feeder = new Composer();
  feeder.on('data', (buf) => decoded.push(JSON.parse(buf.toString())));
  r.sock.on('data', (d) => feeder.feed(d));
  r.send(composer.compose(JSON.stringify({ id: 2, msg: { namespace: 'user', serverType: 'test', service: 'Echo', method: 'echo', args: [big, 'x'] } })));
  // An array of requests, and an error, in one write.
  r.send(Buffer.concat([
    composer.compose(JSON.stringify([
      { id: 3, msg: { namespace: 'user', serverType: 'test', service: 'Echo', method: 'echo', args: [3] } },
      { id: 4, msg: { namespace: 'user', serverType: 'test', service: 'Echo', method: 'echo', args: [4] } },
    ])),
    composer.compose('{"id":5,"msg":{"namespace":"user","serverType":"test","service":"Echo","method":"nope","args":[]}}'),
  ]));
  const deadline = Date.now() + 5_000;
  while (decoded.flat().length < 4 && Date.now() < deadline && !r.isClosed) {
    await sleep(20);
  }
  const all = decoded.flat().sort((a, b) => a.id - b.id);
  assert.deepEqual(all, [
    { id: 2, resp: [null, big] },
    { id: 3, resp: [null, 3] },
    { id: 4, resp: [null, 4] },
    { id: 5, resp: [{ msg: 'no such method:nope', stack: 'Error: no such method:nope' }] },
  ]);
}));

test('stream-pkg: an empty body or a length over pkg_size closes the connection', withWarren(async (t) => {
  const [, port] = await rpcServer(t, 'pomelo-rpc+tcp', { pkg_size: 1024 });
  const empty = await Raw.open(port);
  t.after(() => empty.close());
  empty.send(hex('00'));
  assert.equal(await empty.closedWithin(), true, 'an empty body did not close');
  const huge = await Raw.open(port);
  t.after(() => huge.close());
  huge.send(pkgLength(4096));
  assert.equal(await huge.closedWithin(), true, 'a length over pkg_size did not close');
  // Another connection is unaffected.
  const ok = await Raw.open(port);
  t.after(() => ok.close());
  ok.send(new Composer().compose('{"id":9,"msg":{"namespace":"user","serverType":"test","service":"Echo","method":"echo","args":[9]}}'));
  assert.deepEqual(await ok.exact(1 + 0x18), v('18', text('{"id":9,"resp":[null,9]}')));
}));
