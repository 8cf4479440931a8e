// warren dashboard: what the admin listener of a node shows an operator in a browser.
//
// Everything comes from the admin API of the node that serves this page (docs/admin-api.md):
// `/metrics` once a second (the Prometheus text, parsed here: rates from counters, p50/p99
// from the histogram's buckets), `/admin/nodes` and `/admin/sessions` every few seconds, and
// `POST /admin/sessions/{id}/kick` from the Kick buttons. When the API answers 401 the page
// asks for the `[admin] token` and keeps it in sessionStorage (this tab only), sending it as
// `Authorization: Bearer <token>`. No build step and no network beyond this node: uPlot is
// vendored next to this file.
'use strict';

(() => {
  /** Where the token lives: this tab only, gone when it closes. */
  const TOKEN_KEY = 'warren.admin.token';
  /** Points each chart keeps: two minutes at one a second (the arrays never grow past it). */
  const POINTS = 120;
  const METRICS_EVERY_MS = 1000;
  const NODES_EVERY_MS = 5000;
  const SESSIONS_EVERY_MS = 5000;
  /** Sessions one search lists (the API allows up to 1000). */
  const SESSIONS_LIMIT = 200;
  /** How long a Kick button waits for its confirming second click. */
  const CONFIRM_MS = 4000;

  /**
   * What each number is read from, in the Prometheus text: the first entry whose metric the
   * node exports wins (docs/metrics.md lists them). `labels` keeps only the samples with those
   * label values; every other label is summed over.
   */
  const SOURCES = {
    connections: [{ name: 'warren_connections_active' }, { name: 'warren_connections_open' }],
    sessions: [{ name: 'warren_sessions_active' }],
    messagesIn: [
      { name: 'warren_messages_received_total' },
      { name: 'warren_messages_in_total' },
      { name: 'warren_messages_total', labels: { direction: 'in' } },
    ],
    messagesOut: [
      { name: 'warren_messages_sent_total' },
      { name: 'warren_messages_out_total' },
      { name: 'warren_messages_total', labels: { direction: 'out' } },
    ],
    latency: [
      { name: 'warren_request_duration_seconds' },
      { name: 'warren_requests_duration_seconds' },
      { name: 'warren_handler_duration_seconds' },
    ],
  };

  const $ = (sel) => document.querySelector(sel);

  // ---------------------------------------------------------------- the admin API

  /** An answer of the API that is not a success: its status and `{"error":{code,message}}`. */
  class ApiError extends Error {
    constructor(status, code, message) {
      super(message || `HTTP ${status}`);
      this.status = status;
      this.code = code || `http_${status}`;
    }
  }

  let token = sessionStorage.getItem(TOKEN_KEY) || '';
  /** True while the token dialog is open: requests wait instead of failing again. */
  let needToken = false;

  /** `fetch` with the bearer token; a 401 opens the token dialog and throws. */
  async function api(path, init = {}) {
    const headers = new Headers(init.headers || {});
    if (token) {
      headers.set('Authorization', `Bearer ${token}`);
    }
    const res = await fetch(path, { ...init, headers, cache: 'no-store' });
    if (res.status === 401) {
      let why = '';
      try {
        why = (await res.json()).error.message;
      } catch (_) {
        // not the API's JSON error: keep the generic message
      }
      askToken(token ? `The token was refused: ${why || 'unauthorized'}` : '');
      throw new ApiError(401, 'unauthorized', why || 'this admin API needs a token');
    }
    return res;
  }

  /** The JSON answer of `path`, or an ApiError with the API's code and message. */
  async function apiJson(path, init) {
    const res = await api(path, init);
    let body = null;
    try {
      body = await res.json();
    } catch (_) {
      body = null;
    }
    if (!res.ok) {
      const e = body && body.error;
      throw new ApiError(res.status, e && e.code, e && e.message);
    }
    return body;
  }

  function askToken(why) {
    needToken = true;
    setStatus('bad', 'needs a token');
    $('#token-why').textContent = why;
    const dialog = $('#token-dialog');
    if (!dialog.open) {
      dialog.showModal();
      $('#token').focus();
    }
  }

  // Escape would close the dialog with no token, and every request would fail: keep it open.
  $('#token-dialog').addEventListener('cancel', (ev) => ev.preventDefault());

  $('#token-form').addEventListener('submit', () => {
    token = $('#token').value.trim();
    sessionStorage.setItem(TOKEN_KEY, token);
    $('#token').value = '';
    needToken = false;
    $('#forget-token').hidden = !token;
    refreshNow();
  });

  $('#forget-token').hidden = !token;
  $('#forget-token').addEventListener('click', () => {
    token = '';
    sessionStorage.removeItem(TOKEN_KEY);
    $('#forget-token').hidden = true;
    refreshNow();
  });

  // ---------------------------------------------------------------- showing things

  function setStatus(kind, text) {
    const el = $('#status');
    el.className = `status ${kind}`;
    el.textContent = text;
  }

  /** Messages of the last failures, one per source, so one fixed problem clears its line. */
  const errors = new Map();
  function setError(source, err) {
    if (err) {
      errors.set(source, `${source}: ${err.code ? `${err.code}: ` : ''}${err.message}`);
    } else {
      errors.delete(source);
    }
    $('#error').textContent = [...errors.values()].join('\n');
  }

  function fmtCount(v) {
    if (v == null || !Number.isFinite(v)) {
      return '–';
    }
    if (Math.abs(v) >= 1e6) {
      return `${(v / 1e6).toFixed(2)} M`;
    }
    if (Math.abs(v) >= 1e4) {
      return `${(v / 1e3).toFixed(1)} k`;
    }
    return v >= 100 || Number.isInteger(v) ? String(Math.round(v)) : v.toFixed(1);
  }

  function fmtMs(v) {
    if (v == null || !Number.isFinite(v)) {
      return '–';
    }
    if (v >= 1000) {
      return `${(v / 1000).toFixed(2)} s`;
    }
    return `${v < 1 ? v.toFixed(3) : v < 10 ? v.toFixed(2) : v.toFixed(0)} ms`;
  }

  /** A tile shows the number formatted and keeps the raw one in `data-value` (tests read it). */
  function setTile(id, value, fmt) {
    const el = $(id);
    el.textContent = fmt(value);
    el.dataset.value = value == null || !Number.isFinite(value) ? '' : String(value);
  }

  function cell(text, cls) {
    const td = document.createElement('td');
    td.textContent = text == null ? '–' : String(text);
    if (cls) {
      td.className = cls;
    }
    return td;
  }

  // ---------------------------------------------------------------- the Prometheus text

  /** Parses the exposition format into `Map(name → [{labels, value}])`. */
  function parseMetrics(text) {
    const out = new Map();
    const labelRe = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
    for (const raw of text.split('\n')) {
      const line = raw.trim();
      if (line === '' || line.startsWith('#')) {
        continue;
      }
      const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
      if (!m) {
        continue;
      }
      const labels = {};
      for (const l of (m[2] || '').matchAll(labelRe)) {
        labels[l[1]] = l[2].replace(/\\(.)/g, (_, c) => (c === 'n' ? '\n' : c));
      }
      const value = parseValue(m[3]);
      if (!out.has(m[1])) {
        out.set(m[1], []);
      }
      out.get(m[1]).push({ labels, value });
    }
    return out;
  }

  function parseValue(s) {
    if (s === '+Inf') {
      return Infinity;
    }
    if (s === '-Inf') {
      return -Infinity;
    }
    return Number(s);
  }

  function matches(labels, want) {
    return !want || Object.entries(want).every(([k, v]) => labels[k] === v);
  }

  /** The sum of `source`'s samples, or null when the node does not export it. */
  function total(metrics, source) {
    const samples = metrics.get(source.name);
    if (!samples) {
      return null;
    }
    let sum = 0;
    for (const s of samples) {
      if (matches(s.labels, source.labels) && Number.isFinite(s.value)) {
        sum += s.value;
      }
    }
    return sum;
  }

  /** The first of `sources` the node exports. */
  function pick(metrics, sources, suffix = '') {
    return sources.find((s) => metrics.has(s.name + suffix)) || null;
  }

  /** A histogram's cumulative buckets summed over its other labels: `[[le, count]…]` by le. */
  function buckets(metrics, source) {
    const byLe = new Map();
    for (const s of metrics.get(`${source.name}_bucket`) || []) {
      if (!matches(s.labels, source.labels) || s.labels.le === undefined) {
        continue;
      }
      const le = parseValue(s.labels.le);
      byLe.set(le, (byLe.get(le) || 0) + s.value);
    }
    return [...byLe.entries()].sort((a, b) => a[0] - b[0]);
  }

  /**
   * The `q` quantile of the observations between two readings of a histogram's buckets, as
   * Prometheus' histogram_quantile computes it (linear within the bucket); null when nothing
   * was observed in between.
   */
  function quantile(q, now, before) {
    const prev = new Map(before || []);
    const delta = now.map(([le, c]) => {
      const d = c - (prev.get(le) || 0);
      // a counter that went back (the node restarted) counts from zero
      return [le, d < 0 ? c : d];
    });
    if (delta.length === 0) {
      return null;
    }
    const count = delta[delta.length - 1][1];
    if (!(count > 0)) {
      return null;
    }
    const rank = q * count;
    let lower = 0;
    let below = 0;
    for (const [le, c] of delta) {
      if (c >= rank) {
        if (le === Infinity) {
          return lower;
        }
        const inBucket = c - below;
        return inBucket > 0 ? lower + ((le - lower) * (rank - below)) / inBucket : le;
      }
      lower = le;
      below = c;
    }
    return lower;
  }

  /** A summary's own quantile (when the exporter renders the latency as a summary). */
  function summaryQuantile(metrics, source, q) {
    let best = null;
    for (const s of metrics.get(source.name) || []) {
      if (matches(s.labels, source.labels) && Number(s.labels.quantile) === q && Number.isFinite(s.value)) {
        best = best == null ? s.value : Math.max(best, s.value);
      }
    }
    return best;
  }

  // ---------------------------------------------------------------- charts

  const css = getComputedStyle(document.documentElement);
  const colour = (name) => css.getPropertyValue(name).trim();

  /** An axis label: the number alone (the caption gives the unit), k and M for large ones. */
  function fmtAxis(v) {
    if (Math.abs(v) >= 1e6) {
      return `${+(v / 1e6).toFixed(2)}M`;
    }
    if (Math.abs(v) >= 1e3) {
      return `${+(v / 1e3).toFixed(1)}k`;
    }
    return String(+v.toFixed(3));
  }

  /** A uPlot chart with `series` and its data arrays, at most POINTS long. */
  function makeChart(el, series, fmt) {
    const data = [[], ...series.map(() => [])];
    const opts = {
      width: Math.max(el.clientWidth, 200),
      height: 200,
      cursor: { drag: { x: false, y: false } },
      legend: { live: false },
      // from zero, with room above the highest point; 0..1 while there is nothing to show
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, max > 0 ? max * 1.15 : 1] } },
      axes: [{}, { size: 56, values: (u, ticks) => ticks.map(fmtAxis) }],
      series: [
        {},
        ...series.map((s) => ({
          label: s.label,
          stroke: s.stroke,
          width: 2,
          value: (u, v) => fmt(v),
        })),
      ],
    };
    const plot = new uPlot(opts, data, el);
    return { el, plot, data };
  }

  function push(chart, t, values) {
    chart.data[0].push(t);
    values.forEach((v, i) => chart.data[i + 1].push(v == null || !Number.isFinite(v) ? null : v));
    while (chart.data[0].length > POINTS) {
      chart.data.forEach((a) => a.shift());
    }
    chart.plot.setData(chart.data);
  }

  const charts = {
    conns: makeChart(
      $('#chart-conns'),
      [
        { label: 'connections', stroke: colour('--accent') },
        { label: 'sessions', stroke: colour('--ok') },
      ],
      fmtCount,
    ),
    msgs: makeChart(
      $('#chart-msgs'),
      [
        { label: 'in', stroke: colour('--accent') },
        { label: 'out', stroke: colour('--ok') },
      ],
      fmtCount,
    ),
    latency: makeChart(
      $('#chart-latency'),
      [
        { label: 'p50', stroke: colour('--accent') },
        { label: 'p99', stroke: colour('--bad') },
      ],
      (v) => (v == null ? '–' : fmtMs(v)),
    ),
  };

  window.addEventListener('resize', () => {
    for (const c of Object.values(charts)) {
      c.plot.setSize({ width: Math.max(c.el.clientWidth, 200), height: 200 });
    }
  });

  // ---------------------------------------------------------------- the metrics loop

  /** The previous reading: counters and buckets to take differences from. */
  let last = null;

  async function refreshMetrics() {
    const res = await api('/metrics');
    if (!res.ok) {
      throw new ApiError(res.status, res.status === 404 ? 'not_found' : null, 'this node serves no /metrics');
    }
    const metrics = parseMetrics(await res.text());
    const at = performance.now();
    const conns = pick(metrics, SOURCES.connections);
    const sess = pick(metrics, SOURCES.sessions);
    const inSrc = pick(metrics, SOURCES.messagesIn);
    const outSrc = pick(metrics, SOURCES.messagesOut);
    const latHist = pick(metrics, SOURCES.latency, '_bucket');
    const latSummary = latHist ? null : pick(metrics, SOURCES.latency);
    const now = {
      at,
      in: inSrc && total(metrics, inSrc),
      out: outSrc && total(metrics, outSrc),
      buckets: latHist ? buckets(metrics, latHist) : null,
    };
    const rate = (key) => {
      if (!last || now[key] == null || last[key] == null) {
        return null;
      }
      const dt = (now.at - last.at) / 1000;
      const d = now[key] - last[key];
      return dt > 0 ? (d < 0 ? now[key] : d) / dt : null;
    };
    const connections = conns && total(metrics, conns);
    const sessions = sess && total(metrics, sess);
    const rIn = rate('in');
    const rOut = rate('out');
    let p50 = null;
    let p99 = null;
    if (latHist && last && last.buckets) {
      p50 = quantile(0.5, now.buckets, last.buckets);
      p99 = quantile(0.99, now.buckets, last.buckets);
    } else if (latSummary) {
      p50 = summaryQuantile(metrics, latSummary, 0.5);
      p99 = summaryQuantile(metrics, latSummary, 0.99);
    }
    const ms = (s) => (s == null ? null : s * 1000);
    last = now;

    setTile('#stat-connections', connections, fmtCount);
    setTile('#stat-sessions', sessions, fmtCount);
    setTile('#stat-in', rIn, fmtCount);
    setTile('#stat-out', rOut, fmtCount);
    setTile('#stat-p50', ms(p50), fmtMs);
    setTile('#stat-p99', ms(p99), fmtMs);
    const missing = [];
    if (!conns) missing.push('connections');
    if (!inSrc || !outSrc) missing.push('messages');
    if (!latHist && !latSummary) missing.push('request latency');
    $('#metrics-note').textContent = missing.length
      ? `not exported by this node yet: ${missing.join(', ')}`
      : '';

    const t = Date.now() / 1000;
    push(charts.conns, t, [connections, sessions]);
    push(charts.msgs, t, [rIn, rOut]);
    push(charts.latency, t, [ms(p50), ms(p99)]);
  }

  // ---------------------------------------------------------------- nodes

  async function refreshNodes() {
    const body = await apiJson('/admin/nodes');
    $('#node').textContent = body.node ? `node ${body.node}` : '';
    const tbody = $('#nodes tbody');
    const rows = (body.nodes || []).map((n) => {
      const tr = document.createElement('tr');
      tr.dataset.node = n.id;
      if (n.self) {
        tr.className = 'self';
      }
      const types = new Map();
      for (const m of n.modules || []) {
        types.set(m.type, (types.get(m.type) || 0) + 1);
      }
      const modules = [...types.entries()].map(([t, c]) => (c > 1 ? `${t}×${c}` : t)).join(', ');
      tr.append(
        cell(n.id, 'mono'),
        cell(n.addr, 'mono'),
        cell(n.version),
        cell(modules || '–'),
        cell(n.sessions),
      );
      return tr;
    });
    tbody.replaceChildren(...rows);
    const unreachable = body.unreachable || [];
    $('#nodes-unreachable').textContent = unreachable.length
      ? `not answering: ${unreachable.join(', ')}`
      : '';
  }

  // ---------------------------------------------------------------- sessions

  /** The uid of the last search ('' for every session). */
  let searchedUid = '';

  async function refreshSessions() {
    if (document.querySelector('#sessions button.kick[data-armed="yes"]')) {
      return; // a Kick button waits for its second click: keep its row where it is
    }
    const q = new URLSearchParams({ limit: String(SESSIONS_LIMIT) });
    if (searchedUid) {
      q.set('uid', searchedUid);
    }
    const body = await apiJson(`/admin/sessions?${q}`);
    const list = body.sessions || [];
    const tbody = $('#sessions tbody');
    const rows = list.map((s) => {
      const tr = document.createElement('tr');
      tr.dataset.session = s.id;
      tr.dataset.uid = s.uid == null ? '' : s.uid;
      const kick = document.createElement('button');
      kick.type = 'button';
      kick.className = 'kick';
      kick.textContent = 'Kick';
      kick.title = 'close this session (click twice)';
      kick.addEventListener('click', () => onKick(kick, s));
      const td = document.createElement('td');
      td.append(kick);
      tr.append(
        cell(s.id, 'mono'),
        cell(s.node, 'mono'),
        cell(s.uid),
        cell(s.protocol),
        cell(s.listener, 'mono'),
        cell(s.peer, 'mono'),
        cell(s.connected_at ? new Date(s.connected_at).toLocaleTimeString() : null),
        td,
      );
      return tr;
    });
    tbody.replaceChildren(...rows);
    const what = searchedUid ? `uid ${searchedUid}` : 'all';
    $('#sessions-total').textContent = `${what}: ${list.length} of ${body.total ?? list.length}`;
    const unreachable = body.unreachable || [];
    $('#sessions-note').textContent = unreachable.length
      ? `nodes not answering (their sessions are missing): ${unreachable.join(', ')}`
      : '';
  }

  /** First click arms the button, the second (within CONFIRM_MS) kicks. */
  async function onKick(button, session) {
    if (button.dataset.armed !== 'yes') {
      button.dataset.armed = 'yes';
      button.textContent = 'Kick?';
      setTimeout(() => {
        if (button.isConnected && button.dataset.armed === 'yes') {
          button.dataset.armed = '';
          button.textContent = 'Kick';
        }
      }, CONFIRM_MS);
      return;
    }
    button.disabled = true;
    try {
      const r = await apiJson(`/admin/sessions/${encodeURIComponent(session.id)}/kick`, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ reason: 'kicked from the dashboard' }),
      });
      setError('kick', null);
      $('#sessions-note').textContent = `kicked ${session.id} on ${r.node || session.node}`;
      button.closest('tr')?.remove();
    } catch (err) {
      if (err.status === 404) {
        $('#sessions-note').textContent = `${session.id} was already gone`;
        button.closest('tr')?.remove();
      } else {
        setError('kick', err);
        button.disabled = false;
        button.dataset.armed = '';
        button.textContent = 'Kick';
      }
    }
  }

  $('#search-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    searchedUid = $('#search-uid').value.trim();
    loops.sessions.now();
  });

  // ---------------------------------------------------------------- the loops

  /**
   * Runs `step` every `every` ms, one run at a time (a slow answer delays the next run, never
   * stacks them; a run asked for meanwhile follows at once); pauses while the token dialog is
   * open.
   */
  function loop(name, every, step, onOk) {
    let timer = null;
    let running = false;
    /** Asked to run while running (a new search): run again as soon as this run ends. */
    let again = false;
    async function run() {
      clearTimeout(timer);
      if (running) {
        again = true;
        return;
      }
      again = false;
      if (!needToken) {
        running = true;
        try {
          await step();
          setError(name, null);
          if (onOk) {
            onOk();
          }
        } catch (err) {
          if (err.status !== 401) {
            setError(name, err);
          }
          if (name === 'metrics' && err.status !== 401) {
            setStatus('bad', err instanceof ApiError ? 'no metrics' : 'no answer');
          }
        } finally {
          running = false;
        }
      }
      timer = setTimeout(run, again ? 0 : every);
    }
    return { start: run, now: run };
  }

  const loops = {
    metrics: loop('metrics', METRICS_EVERY_MS, refreshMetrics, () => setStatus('ok', 'live')),
    nodes: loop('nodes', NODES_EVERY_MS, refreshNodes),
    sessions: loop('sessions', SESSIONS_EVERY_MS, refreshSessions),
  };

  function refreshNow() {
    for (const l of Object.values(loops)) {
      l.now();
    }
  }

  refreshNow();
})();
