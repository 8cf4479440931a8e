// End-to-end tests of warren's pomelo listener (docs/protocols/pomelo.md) with the npm
// `pomelo-protocol` encoders and decoders, over raw TCP and over WebSocket on the same port.
//
// Run from the repository root: `npm ci --prefix tests/node && node --test tests/node/`
// (WARREN_BIN picks the binary; else target/release/warren, else target/debug/warren).

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { freePort, listenUrl, portOf, sleep, startWarren, withWarren } from './harness.mjs';
import { Message, Package, PomeloClient, Protocol } from './pomelo_client.mjs';

const TRANSPORTS = ['tcp', 'ws'];

/** A ready warren with one pomelo listener (settings from `query`); returns [warren, port]. */
async function pomeloServer(t, query = {}) {
  const url = await listenUrl('pomelo', query);
  const w = await startWarren(t, { listen: [url] });
  return [w, portOf(url)];
}

/** A started (handshaken, acknowledged) client on `port`, closed when the test ends. */
async function client(t, transport, port) {
  const c = await PomeloClient.connect(transport, port);
  t.after(() => c.close());
  await c.start();
  return c;
}

/** A started client logged in as `user`. */
async function loggedIn(t, transport, port, user) {
  const c = await client(t, transport, port);
  assert.equal(await c.request('Login.HD_Login', { userName: user, passWord: 'x' }), `login success ${user}`);
  return c;
}

const text = (s) => Buffer.from(s, 'utf8');

test('handshake, ack and heartbeats over TCP and WebSocket on one port', withWarren(async (t) => {
  const [, port] = await pomeloServer(t, { heartbeat_s: 3 });
  for (const transport of TRANSPORTS) {
    const c = await PomeloClient.connect(transport, port);
    t.after(() => c.close());
    const hs = await c.handshake();
    // docs/protocols/pomelo.md, "Connecting": the handshake response with heartbeat 3, byte for
    // byte.
    assert.deepEqual(hs.json(), { code: 200, sys: { heartbeat: 3 } }, transport);
    assert.deepEqual(
      Buffer.concat(c.rawBytes).subarray(0, 4 + 0x22),
      Buffer.concat([Buffer.from([0x01, 0x00, 0x00, 0x22]), text('{"code":200,"sys":{"heartbeat":3}}')]),
      `${transport}: handshake response bytes`,
    );
    // After the ack the server sends one heartbeat …
    c.ack();
    const first = await c.nextHeartbeat();
    assert.equal(first.body.length, 0);
    // … and answers each client heartbeat at once.
    for (let i = 0; i < 3; i += 1) {
      c.heartbeat();
      const hb = await c.nextHeartbeat();
      assert.equal(hb.body.length, 0);
    }
    assert.equal(c.isClosed, false, `${transport}: still connected`);
    if (transport === 'ws') {
      assert.equal(c.textFrames, 0, 'pomelo over WebSocket uses binary frames only');
    }
  }
}));

test('the handshake response reflects heartbeat_s (default 10, 0 = off)', withWarren(async (t) => {
  const plain = await listenUrl('pomelo');
  const off = await listenUrl('pomelo', { heartbeat_s: 0 });
  await startWarren(t, { listen: [plain, off] });
  const a = await PomeloClient.connect('tcp', portOf(plain));
  const b = await PomeloClient.connect('ws', portOf(off));
  t.after(() => {
    a.close();
    b.close();
  });
  assert.deepEqual((await a.handshake()).json(), { code: 200, sys: { heartbeat: 10 } });
  const offResponse = (await b.handshake()).json();
  assert.equal(offResponse.code, 200);
  assert.equal('heartbeat' in offResponse.sys, false, JSON.stringify(offResponse));
}));

test('a handshake that is not JSON or has no sys object gets code 500 and a close', withWarren(async (t) => {
  const [, port] = await pomeloServer(t);
  for (const transport of TRANSPORTS) {
    for (const body of ['not json', '{"user":{}}', '{"sys":1}']) {
      const c = await PomeloClient.connect(transport, port);
      t.after(() => c.close());
      c.sendPackage(Package.TYPE_HANDSHAKE, Protocol.strencode(body));
      const hs = await c.next((p) => p.type === Package.TYPE_HANDSHAKE, 'a handshake response');
      assert.equal(hs.json().code, 500, `${transport} ${body}: ${hs.body}`);
      assert.equal(await c.closedWithin(), true, `${transport} ${body}: not closed`);
    }
    // A client whose sys carries other fields (another client library) is fine.
    const other = await PomeloClient.connect(transport, port);
    t.after(() => other.close());
    const hs = await other.handshake({ sys: { type: 'pinus-client', version: '1.2.3', protoVersion: 0 } });
    assert.equal(hs.json().code, 200);
  }
}));

test('WebSocket upgrade works on any path', withWarren(async (t) => {
  const [, port] = await pomeloServer(t);
  for (const [i, path] of ['/', '/pomelo', '/some/deep/path?x=1'].entries()) {
    const c = await PomeloClient.connect('ws', port, path);
    t.after(() => c.close());
    await c.start();
    // one user name per live connection: a second login of a held uid is refused
    const user = `pathy${i}`;
    assert.equal(await c.request('Login.HD_Login', { userName: user, passWord: 'x' }), `login success ${user}`);
  }
}));

test('requests get responses matched by id, errors as {code:500,msg}', withWarren(async (t) => {
  const [, port] = await pomeloServer(t);
  for (const transport of TRANSPORTS) {
    const user = `req-${transport}`;
    const c = await client(t, transport, port);
    // Before login the demo refuses to join: a handler error.
    assert.deepEqual(await c.request('Chat.HD_JoinChat', { roomName: 'r1' }), { code: 500, msg: 'Not Logined' });
    assert.equal(await c.request('Login.HD_Login', { userName: user, passWord: 'x' }), `login success ${user}`);
    // Two requests to one module sent back to back: one session's requests reach a module in
    // order, so the say sees the join; each response carries its request's id.
    const ids = [
      c.sendRequest('Chat.HD_JoinChat', { roomName: `room-${transport}` }),
      c.sendRequest('Chat.HD_Say', { roomName: `room-${transport}`, target: '*', content: 'hey' }),
    ];
    assert.deepEqual(ids, [3, 4]);
    const [say, join] = [await c.response(4), await c.response(3)];
    assert.deepEqual(join, { users: [user] });
    assert.equal(say, 'say success');
    // The say pushed to its own session too.
    assert.deepEqual(await c.push('Chat.OnChat'), {
      from: user, msg: 'hey', roomName: `room-${transport}`, target: '*',
    });
    // Errors: a handler error, an unknown module, a handler that is not client-visible, a
    // route with no dot.
    assert.deepEqual(await c.request('Chat.HD_Say', { roomName: 'nope', content: 'x' }), { code: 500, msg: 'No room' });
    for (const route of ['Nope.HD_X', 'Login.getRand', 'nodot']) {
      const r = await c.request(route, {});
      assert.equal(r.code, 500, `${route}: ${JSON.stringify(r)}`);
      assert.equal(typeof r.msg, 'string', `${route}: ${JSON.stringify(r)}`);
      assert.notEqual(r.msg, '', route);
    }
    // Ids above 127 take a two-byte varint: still matched.
    while (c.reqId < 300) {
      c.reqId += 1;
    }
    assert.equal(await c.request('Login.HD_Login', { userName: user, passWord: 'x' }), `login success ${user}`);
    assert.equal(c.isClosed, false);
  }
}));

test('a notify runs its handler and never gets a response', withWarren(async (t) => {
  const [, port] = await pomeloServer(t);
  for (const transport of TRANSPORTS) {
    const user = `nina-${transport}`;
    const room = `n-${transport}`;
    const c = await loggedIn(t, transport, port, user);
    assert.deepEqual(await c.request('Chat.HD_JoinChat', { roomName: room }), { users: [user] });
    // The notify ran: its say comes back as a push to this member.
    c.notify('Chat.HD_Say', { roomName: room, target: '*', content: 'by notify' });
    assert.deepEqual(await c.push('Chat.OnChat'), { from: user, msg: 'by notify', roomName: room, target: '*' });
    // A failing notify gets no response either.
    c.notify('Chat.HD_Say', { roomName: 'nope', content: 'x' });
    c.notify('Nope.HD_X', {});
    c.notify('nodot', {});
    assert.equal(await c.request('Chat.HD_Say', { roomName: room, target: '*', content: 'last' }), 'say success');
    await sleep(200);
    assert.deepEqual(c.responses().map((p) => p.msg.id), [], 'no response to a notify');
    assert.equal(c.isClosed, false);
  }
}));

test('pushes reach pomelo sessions on TCP and WebSocket with route Chat.OnX', withWarren(async (t) => {
  const [, port] = await pomeloServer(t);
  const room = 'pomelo-room';
  const alice = await loggedIn(t, 'tcp', port, 'alice');
  const bob = await loggedIn(t, 'ws', port, 'bob');
  assert.deepEqual(await alice.request('Chat.HD_JoinChat', { roomName: room }), { users: ['alice'] });
  assert.deepEqual(await bob.request('Chat.HD_JoinChat', { roomName: room }), { users: ['alice', 'bob'] });
  assert.deepEqual(await alice.push('Chat.OnJoin'), { roomName: room, user: 'bob' });

  const sayId = alice.sendRequest('Chat.HD_Say', { roomName: room, from: 'alice', target: '*', content: 'hi' });
  const response = await alice.next((x) => x.msg && x.msg.type === Message.TYPE_RESPONSE && x.msg.id === sayId, 'the say response');
  assert.equal(response.json(), 'say success');
  const expected = '{"from":"alice","msg":"hi","roomName":"mqant","target":"*"}'.replace('mqant', room);
  for (const c of [alice, bob]) {
    const p = await c.next((x) => x.msg && x.msg.type === Message.TYPE_PUSH && x.msg.route === 'Chat.OnChat', 'Chat.OnChat');
    // The push body is the demo's JSON, unchanged (alphabetical keys, examples/chat/README.md).
    assert.equal(Protocol.strdecode(p.msg.body), expected);
    assert.equal(p.msg.compressRoute, 0);
    if (c === alice) {
      assert.ok(p.seq < response.seq, 'a handler\'s push to its own session precedes its response');
    }
  }

  // A targeted say reaches only its target.
  assert.equal(await bob.request('Chat.HD_Say', { roomName: room, target: 'alice', content: 'yo' }), 'say success');
  assert.deepEqual(await alice.push('Chat.OnChat'), { from: 'bob', msg: 'yo', roomName: room, target: 'alice' });

  // Departure: bob's connection closes, alice is told.
  bob.close();
  assert.deepEqual(await alice.push('Chat.OnLeave'), { roomName: room, user: 'bob' });
  assert.equal(
    bob.received.filter((x) => x.msg && x.msg.type === Message.TYPE_PUSH && x.msg.route === 'Chat.OnChat').length,
    0,
    'bob got no copy of the targeted say',
  );
}));

test('a silent client is disconnected after the heartbeat timeout; a beating one stays', withWarren(async (t) => {
  const [, port] = await pomeloServer(t, { heartbeat_s: 1 });
  for (const transport of TRANSPORTS) {
    const silent = await client(t, transport, port);
    const beating = await client(t, transport, port);
    const timer = setInterval(() => beating.heartbeat(), 500);
    t.after(() => clearInterval(timer));
    // heartbeat_timeout_s defaults to 2 × heartbeat_s: the silent client goes, the other stays.
    assert.equal(await silent.closedWithin(15_000), true, `${transport}: silent client still connected`);
    assert.equal(beating.isClosed, false, `${transport}: the beating client was disconnected`);
    assert.equal(
      await beating.request('Login.HD_Login', { userName: `beat-${transport}`, passWord: 'x' }),
      `login success beat-${transport}`,
    );
    clearInterval(timer);
  }
}));

test('heartbeat_timeout_s is honoured: a client silent after its ack is disconnected', withWarren(async (t) => {
  // heartbeat_s 1 with an explicit 3 s timeout: a client silent after its ack still goes.
  const [, port] = await pomeloServer(t, { heartbeat_s: 1, heartbeat_timeout_s: 3 });
  const c = await client(t, 'tcp', port);
  assert.equal(await c.closedWithin(20_000), true, 'silent client still connected');
}));

test('SIGTERM kicks every pomelo session with {"reason":…} before closing', withWarren(async (t) => {
  const [w, port] = await pomeloServer(t);
  const clients = [await client(t, 'tcp', port), await client(t, 'ws', port)];
  const exit = w.stop('SIGTERM');
  for (const c of clients) {
    const kick = await c.next((p) => p.type === Package.TYPE_KICK, `a kick on ${c.transport}`, 15_000);
    const body = kick.json();
    assert.equal(typeof body.reason, 'string', JSON.stringify(body));
    assert.equal(await c.closedWithin(15_000), true, `${c.transport}: not closed after the kick`);
  }
  const info = await exit;
  assert.equal(info.code, 0, `exit ${JSON.stringify(info)}`);
}));

test('a bad package type closes only that connection', withWarren(async (t) => {
  const [, port] = await pomeloServer(t);
  for (const [badTransport, goodTransport] of [['tcp', 'ws'], ['ws', 'tcp']]) {
    const good = await loggedIn(t, goodTransport, port, `good-${goodTransport}`);
    const bad = await client(t, badTransport, port);
    bad.sendRaw(Buffer.from([0x09, 0x00, 0x00, 0x00]));
    assert.equal(await bad.closedWithin(), true, `${badTransport}: type 9 did not close the connection`);
    good.heartbeat();
    await good.nextHeartbeat();
    assert.deepEqual(
      await good.request('Chat.HD_JoinChat', { roomName: `survivors-${goodTransport}` }),
      { users: [`good-${goodTransport}`] },
    );
  }
}));

test('data before the handshake ack closes the connection', withWarren(async (t) => {
  const [, port] = await pomeloServer(t);
  const data = () => Package.encode(
    Package.TYPE_DATA,
    Message.encode(1, Message.TYPE_REQUEST, 0, 'Login.HD_Login', Protocol.strencode('{"userName":"a","passWord":"b"}')),
  );
  for (const transport of TRANSPORTS) {
    // Before the handshake …
    const early = await PomeloClient.connect(transport, port);
    t.after(() => early.close());
    early.sendRaw(data());
    assert.equal(await early.closedWithin(), true, `${transport}: data before the handshake`);
    // … and between the handshake and its ack.
    const unacked = await PomeloClient.connect(transport, port);
    t.after(() => unacked.close());
    assert.equal((await unacked.handshake()).json().code, 200);
    unacked.sendRaw(data());
    assert.equal(await unacked.closedWithin(), true, `${transport}: data before the ack`);
    assert.equal(unacked.responses().length, 0);
  }
}));

test('a package over max_package closes that connection only', withWarren(async (t) => {
  const [, port] = await pomeloServer(t, { max_package: 1024 });
  const good = await loggedIn(t, 'tcp', port, 'small');
  for (const transport of TRANSPORTS) {
    const big = await client(t, transport, port);
    const body = JSON.stringify({ userName: 'x'.repeat(2000), passWord: 'y' });
    big.sendPackage(Package.TYPE_DATA, Message.encode(1, Message.TYPE_REQUEST, 0, 'Login.HD_Login', Protocol.strencode(body)));
    assert.equal(await big.closedWithin(), true, `${transport}: oversize package did not close`);
    assert.equal(big.responses().length, 0);
  }
  // Just under the limit is fine.
  const fits = JSON.stringify({ userName: 'z'.repeat(900), passWord: 'y' });
  assert.equal(await good.request('Login.HD_Login', JSON.parse(fits)), `login success ${'z'.repeat(900)}`);
}));

test('a first byte that is neither a package type nor a letter closes the connection', withWarren(async (t) => {
  const [, port] = await pomeloServer(t);
  const c = await PomeloClient.connect('tcp', port);
  t.after(() => c.close());
  c.sendRaw(Buffer.from([0x00, 0x00, 0x00, 0x00]));
  assert.equal(await c.closedWithin(), true);
}));

test('a route dictionary from the config file is offered and accepted', withWarren(async (t) => {
  const port = await freePort();
  const config = [
    '[[listener]]',
    'protocol = "pomelo"',
    `addr = "127.0.0.1:${port}"`,
    'heartbeat_s = 3',
    'route_dict = { "Chat.HD_Say" = 1, "Login.HD_Login" = 2 }',
    '',
    '[[module]]',
    'type = "Login"',
    '',
    '[[module]]',
    'type = "Chat"',
    '',
  ].join('\n');
  await startWarren(t, { config, ports: [port] });
  for (const transport of TRANSPORTS) {
    const c = await PomeloClient.connect(transport, port);
    t.after(() => c.close());
    const hs = (await c.handshake()).json();
    assert.deepEqual(hs, { code: 200, sys: { heartbeat: 3, dict: { 'Chat.HD_Say': 1, 'Login.HD_Login': 2 } } });
    c.ack();
    await c.nextHeartbeat();
    // Route code 2 = Login.HD_Login (a compressed route, flag bit 0).
    assert.equal(await c.request(2, { userName: `dict-${transport}`, passWord: 'x' }), `login success dict-${transport}`);
    // Plain routes keep working next to the dictionary.
    assert.deepEqual(await c.request('Chat.HD_JoinChat', { roomName: `d-${transport}` }), { users: [`dict-${transport}`] });
    assert.equal(await c.request(1, { roomName: `d-${transport}`, target: '*', content: 'packed' }), 'say success');
  }
}));
