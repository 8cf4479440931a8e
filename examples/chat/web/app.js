// warren chat demo client.
//
// Speaks the mqant v1.1 chat contract (examples/chat/README.md and
// docs/protocols/mqtt.md) over MQTT on a
// WebSocket, using the vendored MQTT.js bundle (global `mqtt`). Requests are
// QoS 1 publishes to `<Module>/<Handler>/<n>`; the gate answers on the identical
// topic with `{"Error":"…","Result":…}`. Pushes arrive on `Chat/OnChat`,
// `Chat/OnJoin` and `Chat/OnLeave` without any SUBSCRIBE.
//
// All user-supplied text is put into the page with `textContent` only.
'use strict';

(() => {
  /** How long to wait for a reply before giving up on a request. */
  const REQUEST_TIMEOUT_MS = 10000;
  /** The password the demo Login module expects (it is not checked). */
  const DEMO_PASSWORD = 'Hello,anyone!';
  /** Topics that carry server pushes rather than replies. */
  const PUSH_TOPICS = new Set(['Chat/OnChat', 'Chat/OnJoin', 'Chat/OnLeave']);

  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $('status'),
    loginForm: $('login-form'),
    user: $('user'),
    room: $('room'),
    login: $('login'),
    whoami: $('whoami'),
    error: $('error'),
    members: $('members'),
    messages: $('messages'),
    composer: $('composer'),
    target: $('target'),
    text: $('text'),
    send: $('send'),
  };
  const decoder = new TextDecoder();

  /** The MQTT.js client, once `/config.json` has been read. */
  let client = null;
  /** Whether the MQTT connection is currently up. */
  let online = false;
  /** Per-connection request counter: the `<n>` of `<Module>/<Handler>/<n>`. */
  let counter = 0;
  /** Outstanding requests, keyed by their exact topic. */
  const pending = new Map();
  /** `{user, room}` once logged in and joined; kept across reconnects to rejoin. */
  let joined = null;
  /** Whether a login/join sequence is running. */
  let busy = false;
  /** Room members in join order. */
  let members = [];

  // ---------------------------------------------------------------- view

  function setStatus(state, text) {
    ui.status.dataset.state = state;
    ui.status.textContent = text;
  }

  function showError(text) {
    ui.error.textContent = text;
    ui.error.hidden = false;
  }

  function clearError() {
    ui.error.textContent = '';
    ui.error.hidden = true;
  }

  function refreshControls() {
    ui.login.disabled = !online || busy;
    const canChat = online && joined !== null && !busy;
    ui.text.disabled = !canChat;
    ui.send.disabled = !canChat;
    ui.target.disabled = !canChat;
    ui.whoami.textContent = joined ? `${joined.user} in ${joined.room}` : '';
  }

  /**
   * Appends one `<div class="line">` to the message log.
   * `parts` is a list of `[className, text]`; plain strings become text nodes.
   */
  function addLine(kind, parts) {
    const line = document.createElement('div');
    line.className = `line ${kind}`;
    const time = document.createElement('time');
    time.textContent = new Date().toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
    line.append(time, ' ');
    for (const part of parts) {
      if (typeof part === 'string') {
        line.append(part);
      } else {
        const span = document.createElement('span');
        span.className = part[0];
        span.textContent = part[1];
        line.append(span);
      }
    }
    const atBottom =
      ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight < 40;
    ui.messages.append(line);
    if (atBottom) {
      ui.messages.scrollTop = ui.messages.scrollHeight;
    }
  }

  function renderMembers() {
    const items = members.map((name) => {
      const li = document.createElement('li');
      li.textContent = name;
      if (joined && name === joined.user) {
        li.classList.add('me');
      }
      return li;
    });
    ui.members.replaceChildren(...items);

    const previous = ui.target.value;
    const options = [new Option('everyone', '*')];
    for (const name of members) {
      if (!joined || name !== joined.user) {
        options.push(new Option(`${name} (whisper)`, name));
      }
    }
    ui.target.replaceChildren(...options);
    ui.target.value = options.some((o) => o.value === previous) ? previous : '*';
  }

  function addMember(name) {
    if (!members.includes(name)) {
      members.push(name);
      renderMembers();
    }
  }

  function removeMember(name) {
    const before = members.length;
    members = members.filter((m) => m !== name);
    if (members.length !== before) {
      renderMembers();
    }
  }

  // ---------------------------------------------------------------- requests

  /**
   * Publishes a request and resolves with its `Result`, or rejects with an
   * Error carrying the reply's `Error` text.
   */
  function request(module, handler, body) {
    return new Promise((resolve, reject) => {
      if (!client || !online) {
        reject(new Error('not connected'));
        return;
      }
      counter += 1;
      const topic = `${module}/${handler}/${counter}`;
      const timer = setTimeout(() => {
        pending.delete(topic);
        reject(new Error(`no reply to ${topic} within ${REQUEST_TIMEOUT_MS / 1000} s`));
      }, REQUEST_TIMEOUT_MS);
      pending.set(topic, { resolve, reject, timer });
      client.publish(topic, JSON.stringify(body), { qos: 1 }, (err) => {
        if (err) {
          clearTimeout(timer);
          pending.delete(topic);
          reject(new Error(`publish failed: ${err.message}`));
        }
      });
    });
  }

  function failAllPending(reason) {
    for (const [topic, p] of pending) {
      clearTimeout(p.timer);
      p.reject(new Error(`${reason} (${topic})`));
    }
    pending.clear();
  }

  function handleReply(p, text) {
    clearTimeout(p.timer);
    let reply;
    try {
      reply = JSON.parse(text);
    } catch {
      p.reject(new Error('reply is not JSON'));
      return;
    }
    if (reply === null || typeof reply !== 'object') {
      p.reject(new Error('reply is not a JSON object'));
    } else if (typeof reply.Error === 'string' && reply.Error !== '') {
      p.reject(new Error(reply.Error));
    } else {
      p.resolve(reply.Result);
    }
  }

  // ---------------------------------------------------------------- pushes

  function handlePush(topic, text) {
    let body;
    try {
      body = JSON.parse(text);
    } catch {
      return;
    }
    if (body === null || typeof body !== 'object') {
      return;
    }
    const str = (v) => (typeof v === 'string' ? v : String(v ?? ''));
    if (topic === 'Chat/OnChat') {
      const from = str(body.from);
      const target = body.target === undefined ? '*' : str(body.target);
      if (target === '*') {
        addLine('chat', [['from', from], ': ', ['msg', str(body.msg)]]);
      } else {
        addLine('chat whisper', [['from', from], ' → you (whisper): ', ['msg', str(body.msg)]]);
      }
    } else if (topic === 'Chat/OnJoin') {
      const user = str(body.user);
      addLine('event join', [['who', user], ' joined']);
      addMember(user);
    } else if (topic === 'Chat/OnLeave') {
      const user = str(body.user);
      addLine('event leave', [['who', user], ' left']);
      removeMember(user);
    }
  }

  function onMessage(topic, payload) {
    const text = decoder.decode(payload);
    const p = pending.get(topic);
    if (p) {
      pending.delete(topic);
      handleReply(p, text);
    } else if (PUSH_TOPICS.has(topic)) {
      handlePush(topic, text);
    }
  }

  // ---------------------------------------------------------------- actions

  /** Logs in as `user` and joins `room`; used by the form and after a reconnect. */
  async function loginAndJoin(user, room) {
    busy = true;
    refreshControls();
    clearError();
    try {
      const loginResult = await request('Login', 'HD_Login', {
        userName: user,
        passWord: DEMO_PASSWORD,
      });
      // The demo reports bad input as a Result with an empty Error.
      if (typeof loginResult !== 'string' || !loginResult.startsWith('login success')) {
        throw new Error(`login failed: ${typeof loginResult === 'string' ? loginResult : JSON.stringify(loginResult)}`);
      }
      const joinResult = await request('Chat', 'HD_JoinChat', { roomName: room });
      const users = joinResult && Array.isArray(joinResult.users) ? joinResult.users : [];
      joined = { user, room };
      members = users.map(String);
      if (!members.includes(user)) {
        members.push(user);
      }
      renderMembers();
      addLine('event self', [`You joined room ${room} as `, ['who', user]]);
      ui.text.focus();
    } catch (err) {
      showError(err.message);
    } finally {
      busy = false;
      refreshControls();
    }
  }

  async function say() {
    if (!joined) {
      return;
    }
    const content = ui.text.value;
    if (content.trim() === '') {
      return;
    }
    const target = ui.target.value || '*';
    clearError();
    ui.text.value = '';
    try {
      await request('Chat', 'HD_Say', {
        roomName: joined.room,
        from: joined.user,
        target,
        content,
      });
      // A whisper is pushed to its target only, so echo it here.
      if (target !== '*') {
        addLine('chat whisper', ['you → ', ['to', target], ' (whisper): ', ['msg', content]]);
      }
    } catch (err) {
      showError(err.message);
      if (ui.text.value === '') {
        ui.text.value = content;
      }
    }
  }

  ui.loginForm.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const user = ui.user.value.trim();
    const room = ui.room.value.trim();
    if (user === '' || room === '') {
      showError('user name and room name are required');
      return;
    }
    loginAndJoin(user, room);
  });

  ui.composer.addEventListener('submit', (ev) => {
    ev.preventDefault();
    say();
  });

  // ---------------------------------------------------------------- connection

  function connect(wsUrl) {
    setStatus('connecting', `connecting to ${wsUrl}…`);
    client = mqtt.connect(wsUrl, {
      protocolVersion: 4,
      clientId: `web-${Math.random().toString(16).slice(2, 10)}`,
      clean: true,
      keepalive: 60,
      username: 'admin',
      password: 'password',
      reconnectPeriod: 2000,
    });

    client.on('connect', () => {
      online = true;
      counter = 0;
      setStatus('connected', 'connected');
      clearError();
      refreshControls();
      if (joined) {
        // A new connection is a new session: log in and join again.
        const { user, room } = joined;
        joined = null;
        loginAndJoin(user, room);
      }
    });
    client.on('reconnect', () => {
      setStatus('connecting', 'reconnecting…');
    });
    client.on('close', () => {
      if (online) {
        addLine('event lost', ['connection lost']);
      }
      online = false;
      failAllPending('connection lost');
      setStatus('offline', 'offline, retrying…');
      refreshControls();
    });
    client.on('error', (err) => {
      showError(`connection error: ${err.message}`);
    });
    client.on('message', onMessage);
  }

  async function start() {
    refreshControls();
    let config;
    try {
      const res = await fetch('/config.json', { cache: 'no-store' });
      if (!res.ok) {
        throw new Error(`HTTP ${res.status}`);
      }
      config = await res.json();
    } catch (err) {
      setStatus('offline', 'no server configuration');
      showError(`cannot read /config.json: ${err.message}`);
      return;
    }
    if (!config || typeof config.ws_url !== 'string' || config.ws_url === '') {
      setStatus('offline', 'no server configuration');
      showError('/config.json has no ws_url');
      return;
    }
    connect(config.ws_url);
  }

  window.addEventListener('pagehide', () => {
    if (client) {
      client.end(true);
    }
  });

  start();
})();
