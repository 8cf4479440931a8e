// Authentication on warren's pomelo and pomelo-rpc listeners (issue 11 item 6): the pomelo
// handshake's `user` data is checked by the node's `[auth]` (a password file made here with
// `warren passwd`), a refusal is pomelo's handshake error `{"code":500}` and a close; the login
// rule refuses calls before login; a pomelo-rpc peer may call RPC-only handlers only when it
// authenticated in its CONNECT or the listener restricts who connects.
//
// Run from the repository root: `npm ci --prefix tests/node && node --test tests/node/`.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { findWarren, listenUrl, portOf, sleep, startWarren, within, withWarren } from './harness.mjs';
import { CLIENT_HANDSHAKE, PomeloClient } from './pomelo_client.mjs';

/** A password file with alice / wonderland. */
function passwordFile() {
  const file = path.join(mkdtempSync(path.join(os.tmpdir(), 'warren-auth-')), 'passwd');
  execFileSync(findWarren(), ['passwd', '-b', file, 'alice', 'wonderland']);
  return file;
}

/** A ready warren with the demo modules, this `[auth]` body and these listeners. */
async function authServer(t, auth, listen) {
  const config = ['[[module]]', 'type = "Login"', '', '[[module]]', 'type = "Chat"', '',
    '[[module]]', 'type = "Echo"', '', '[auth]', auth, ''].join('\n');
  return startWarren(t, { config, listen });
}

test('pomelo handshake user data is checked: refused with code 500 and a close, accepted binds the uid', withWarren(async (t) => {
  const url = await listenUrl('pomelo');
  await authServer(t, `password_file = "${passwordFile()}"`, [url]);
  const port = portOf(url);
  for (const transport of ['tcp', 'ws']) {
    for (const user of [{ username: 'alice', password: 'guess' }, { username: 'eve', password: 'wonderland' }, {}]) {
      const c = await PomeloClient.connect(transport, port);
      t.after(() => c.close());
      const hs = await c.handshake({ ...CLIENT_HANDSHAKE, user });
      assert.deepEqual(hs.json(), { code: 500 }, `${transport} ${JSON.stringify(user)}`);
      assert.equal(await c.closedWithin(), true, `${transport}: closed after the refusal`);
    }
    const c = await PomeloClient.connect(transport, port);
    t.after(() => c.close());
    const hs = await c.handshake({ ...CLIENT_HANDSHAKE, user: { username: 'alice', password: 'wonderland' } });
    assert.equal(hs.json().code, 200);
    c.ack();
    await c.nextHeartbeat();
    // bound to alice at the handshake: no Login call needed
    assert.deepEqual(await c.request('Chat.HD_JoinChat', { roomName: `p-${transport}` }), { users: ['alice'] });
    c.close();
    await sleep(100);
  }
}));

test('without [auth] methods the handshake lets everyone in, and calls wait for login', withWarren(async (t) => {
  const url = await listenUrl('pomelo');
  await startWarren(t, { listen: [url] });
  const c = await PomeloClient.connect('tcp', portOf(url));
  t.after(() => c.close());
  await c.start();
  assert.deepEqual(await c.request('Chat.HD_JoinChat', { roomName: 'r' }), { code: 500, msg: 'Not Logined' });
  assert.equal(await c.request('Login.HD_Login', { userName: 'ann', passWord: 'x' }), 'login success ann');
  assert.deepEqual(await c.request('Chat.HD_JoinChat', { roomName: 'r' }), { users: ['ann'] });
}));

// ------------------------------------------------------------------ pomelo-rpc

function remLen(n) {
  const out = [];
  do {
    let b = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) b |= 0x80;
    out.push(b);
  } while (n > 0);
  return Buffer.from(out);
}

function str(s) {
  const b = Buffer.from(s, 'utf8');
  return Buffer.concat([Buffer.from([b.length >> 8, b.length & 0xff]), b]);
}

function connect(clientId, username, password) {
  let flags = 0x02;
  let payload = str(clientId);
  if (username !== undefined) {
    flags |= 0x80;
    payload = Buffer.concat([payload, str(username)]);
  }
  if (password !== undefined) {
    flags |= 0x40;
    payload = Buffer.concat([payload, str(password)]);
  }
  const body = Buffer.concat([str('MQTT'), Buffer.from([4, flags, 0, 60]), payload]);
  return Buffer.concat([Buffer.from([0x10]), remLen(body.length), body]);
}

function publishRpc(json) {
  const body = Buffer.concat([str('rpc'), Buffer.from(json, 'utf8')]);
  return Buffer.concat([Buffer.from([0x30]), remLen(body.length), body]);
}

/** Sends `bytes` on a new connection and collects what comes back until `enough(buf)`. */
async function exchange(port, bytes, enough) {
  const sock = net.connect({ host: '127.0.0.1', port });
  let buf = Buffer.alloc(0);
  let closed = false;
  const done = new Promise((resolve) => {
    sock.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      if (enough(buf)) resolve();
    });
    sock.on('close', () => {
      closed = true;
      resolve();
    });
    sock.on('error', () => {});
  });
  sock.write(bytes);
  await within(5_000, done, 'the server\'s answer');
  sock.destroy();
  return { buf, closed };
}

const ECHO = '{"id":1,"msg":{"namespace":"user","serverType":"test","service":"Echo","method":"echo","args":["hi"]}}';

test('pomelo-rpc peers call RPC-only handlers only when authenticated or admitted by the listener', withWarren(async (t) => {
  const open = await listenUrl('pomelo-rpc');
  const allowed = await listenUrl('pomelo-rpc', { allow: '127.0.0.1' });
  await authServer(t, `password_file = "${passwordFile()}"\nanonymous = true`, [open, allowed]);
  const answer = (b) => b.length > 4 && b.subarray(4).includes(Buffer.from('"resp"'));

  // anonymous on an open listener: a client, so `echo` (RPC-only) is not reachable
  let r = await exchange(portOf(open), Buffer.concat([connect('peer'), publishRpc(ECHO)]), answer);
  assert.deepEqual(r.buf.subarray(0, 4), Buffer.from([0x20, 0x02, 0x00, 0x00]));
  assert.match(r.buf.toString(), /"resp":\[\{"msg":"no such method:echo"/);

  // credentials in CONNECT: trusted
  r = await exchange(portOf(open), Buffer.concat([connect('peer', 'alice', 'wonderland'), publishRpc(ECHO)]), answer);
  assert.match(r.buf.toString(), /"resp":\[null,"hi"\]/);

  // wrong credentials: CONNACK 4 and a close
  r = await exchange(portOf(open), connect('peer', 'alice', 'guess'), () => false);
  assert.deepEqual(r.buf, Buffer.from([0x20, 0x02, 0x00, 0x04]));
  assert.equal(r.closed, true);

  // a listener that admits only 127.0.0.1: its peers are trusted without credentials
  r = await exchange(portOf(allowed), Buffer.concat([connect('peer'), publishRpc(ECHO)]), answer);
  assert.match(r.buf.toString(), /"resp":\[null,"hi"\]/);
}));

test('pomelo-rpc refuses anonymous peers with CONNACK 5 when anonymous is off', withWarren(async (t) => {
  const open = await listenUrl('pomelo-rpc');
  await authServer(t, `password_file = "${passwordFile()}"`, [open]);
  const r = await exchange(portOf(open), connect('peer'), () => false);
  assert.deepEqual(r.buf, Buffer.from([0x20, 0x02, 0x00, 0x05]));
  assert.equal(r.closed, true);
}));

test('a JWT in the pomelo handshake user data: sub becomes the uid, an expired one is refused', withWarren(async (t) => {
  const { createHmac } = await import('node:crypto');
  const b64 = (x) => Buffer.from(x).toString('base64url');
  const jwt = (claims) => {
    const head = b64(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
    const body = b64(JSON.stringify(claims));
    const sig = createHmac('sha256', 'node-secret').update(`${head}.${body}`).digest('base64url');
    return `${head}.${body}.${sig}`;
  };
  const url = await listenUrl('pomelo');
  await authServer(t, '[auth.jwt]\nalgorithm = "HS256"\nsecret = "node-secret"\nleeway_s = 0', [url]);
  const now = Math.floor(Date.now() / 1000);
  const expired = await PomeloClient.connect('tcp', portOf(url));
  t.after(() => expired.close());
  const refused = await expired.handshake({ ...CLIENT_HANDSHAKE, user: { token: jwt({ sub: 'kim', exp: now - 60 }) } });
  assert.deepEqual(refused.json(), { code: 500 });
  const c = await PomeloClient.connect('ws', portOf(url));
  t.after(() => c.close());
  const hs = await c.handshake({ ...CLIENT_HANDSHAKE, user: { token: jwt({ sub: 'kim', exp: now + 300 }) } });
  assert.equal(hs.json().code, 200);
  c.ack();
  await c.nextHeartbeat();
  assert.deepEqual(await c.request('Chat.HD_JoinChat', { roomName: 'jwt' }), { users: ['kim'] });
}));
