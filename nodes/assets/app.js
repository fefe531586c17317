// twinmesh dashboard: reads the node's /api, and follows the mesh live through the node's
// server-sent event streams (its Zenoh subscriptions, bridged), without polling.
'use strict';

const $ = (id) => document.getElementById(id);
const esc = (s) => String(s ?? '').replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
const num = (v) => (v === undefined || v === null ? NaN : Number(v));
const fmt = (v) => (Number.isFinite(num(v)) ? Number(v).toPrecision(6).replace(/\.?0+$/, '') : '—');
const clock = (ns) => new Date(num(ns) / 1e6).toLocaleTimeString();

// A bearer token (with --auth-*): from `#token=...` in the address (then removed from
// it), or asked for with the token button; kept for this tab only.
let token = sessionStorage.getItem('twinmesh-token');
{
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    token = decodeURIComponent(m[1]);
    sessionStorage.setItem('twinmesh-token', token);
    history.replaceState(null, '', location.pathname);
  }
}
$('token-button').onclick = () => {
  const t = prompt('Bearer token (JWT) for this node, empty to forget it:', token || '');
  if (t === null) return;
  token = t.trim() || null;
  if (token) sessionStorage.setItem('twinmesh-token', token); else sessionStorage.removeItem('twinmesh-token');
  location.reload();
};
const headers = (extra) => Object.assign(token ? { Authorization: 'Bearer ' + token } : {}, extra || {});

function notice(msg) { $('notice').textContent = msg || ''; }

// The error a failed call explains itself with (the same message as over gRPC).
async function failure(r) {
  let msg = await r.text();
  try { msg = JSON.parse(msg).message || msg; } catch (_) { /* plain text */ }
  if (r.status === 401) msg += ' (use the token button)';
  return new Error(msg || r.status + ' ' + r.statusText);
}

async function api(path) {
  const r = await fetch(path, { headers: headers() });
  if (!r.ok) throw await failure(r);
  return r.json();
}

async function post(path, body) {
  const r = await fetch(path, { method: 'POST', headers: headers({ 'Content-Type': 'application/json' }), body: JSON.stringify(body) });
  if (!r.ok) throw await failure(r);
  return r.json();
}

// Follows a server-sent event stream with fetch (EventSource cannot send a token);
// reconnects with backoff. Returns a function that stops it.
function follow(path, onEvent, onState) {
  let stopped = false, backoff = 500, ctrl = null;
  (async function run() {
    while (!stopped) {
      ctrl = new AbortController();
      try {
        const r = await fetch(path, { headers: headers({ Accept: 'text/event-stream' }), signal: ctrl.signal });
        if (!r.ok) throw await failure(r);
        onState(true);
        backoff = 500;
        const reader = r.body.getReader();
        const dec = new TextDecoder();
        let buf = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += dec.decode(value, { stream: true });
          let cut;
          while ((cut = buf.indexOf('\n\n')) >= 0) {
            const block = buf.slice(0, cut);
            buf = buf.slice(cut + 2);
            let ev = 'message', data = '';
            for (const line of block.split('\n')) {
              if (line.startsWith('event:')) ev = line.slice(6).trim();
              else if (line.startsWith('data:')) data += line.slice(5).trim();
            }
            if (data) {
              try { onEvent(ev, JSON.parse(data)); } catch (e) { console.warn('bad event', ev, e); }
            }
          }
        }
      } catch (e) {
        if (stopped) return;
        notice('live updates: ' + e.message);
      }
      onState(false);
      if (stopped) return;
      await new Promise((res) => setTimeout(res, backoff));
      backoff = Math.min(backoff * 2, 10000);
    }
  })();
  return () => { stopped = true; if (ctrl) ctrl.abort(); };
}

// ---- charts (uPlot) ----

function chart(el, series, opts) {
  const width = Math.max(320, el.clientWidth || 480);
  const u = new uPlot(Object.assign({
    width, height: 200,
    scales: { x: { time: !(opts && opts.notime) } },
    series: [{}].concat(series.map((s, i) => ({ label: s, stroke: PALETTE[i % PALETTE.length], width: 1.5, points: { show: false } }))),
    legend: { live: false },
  }, opts || {}), [[]].concat(series.map(() => [])), el);
  el.dataset.points = '0';
  return u;
}
const PALETTE = ['#0969da', '#cf222e', '#1a7f37', '#9a6700', '#8250df', '#bf3989', '#1b7c83', '#953800'];

// A rolling chart: points [t, ...values] kept for `keep` seconds.
class Rolling {
  constructor(el, series, keep) { this.el = el; this.series = series; this.keep = keep; this.rows = []; this.u = chart(el, series); }
  push(t, values) {
    this.rows.push([t].concat(values));
    const from = t - this.keep;
    while (this.rows.length && this.rows[0][0] < from) this.rows.shift();
    const cols = this.series.map((_, i) => this.rows.map((r) => r[i + 1]));
    this.u.setData([this.rows.map((r) => r[0])].concat(cols));
    this.el.dataset.points = String(this.rows.length);
  }
  destroy() { this.u.destroy(); }
}

// ---- the mesh ----

const nodes = new Map();   // node → {info, load, live, rate}
const twins = new Map();   // twin → summary
let sites = new Set(), kinds = new Set();

function renderNodes() {
  const rows = [...nodes.values()].sort((a, b) => (a.info.tier + a.info.node).localeCompare(b.info.tier + b.info.node));
  $('nodes').tBodies[0].innerHTML = rows.map((n) => {
    const i = n.info, l = n.load || {};
    const drain = (i.tier === 'edge' || i.tier === 'cloud') ? `<button data-drain="${esc(i.node)}">drain</button>` : '';
    return `<tr><td>${esc(i.node)}</td><td>${esc(i.tier)}</td><td>${esc(i.site)}</td>` +
      `<td class="${n.live ? 'live' : 'lost'}">${n.live ? 'live' : 'lost'}</td><td>${esc(l.twins ?? i.twins ?? 0)}</td>` +
      `<td>${n.rate === undefined ? '—' : n.rate.toFixed(1)}</td><td>${esc(l.spoolFrames ?? 0)}</td><td>${drain}</td></tr>`;
  }).join('');
  $('migrate-node').innerHTML = rows.filter((n) => n.info.tier !== 'iot').map((n) => `<option value="${esc(n.info.node)}">${esc(n.info.node)}</option>`).join('');
}

function renderTwins() {
  const rows = [...twins.values()].sort((a, b) => a.twinId.localeCompare(b.twinId));
  $('twin-list').tBodies[0].innerHTML = rows.map((t) =>
    `<tr class="${t.twinId === selected ? 'selected' : ''}"><td><a href="#" data-twin="${esc(t.twinId)}">${esc(t.twinId)}</a></td>` +
    `<td>${esc(t.kind)}</td><td>${esc(t.node)}</td><td class="${esc(t.status)}">${esc(t.status)}</td><td>${esc(t.revision)}</td></tr>`).join('');
}

function options(select, values) {
  const keep = select.value;
  select.innerHTML = '<option value="">all</option>' + [...values].sort().map((v) => `<option value="${esc(v)}">${esc(v)}</option>`).join('');
  select.value = keep;
}

function logLine(list, ns, html, cls, max) {
  const li = document.createElement('li');
  if (cls) li.className = cls;
  li.innerHTML = `<time>${esc(clock(ns))}</time>${html}`;
  li.dataset.ns = String(ns);
  list.prepend(li);
  while (list.children.length > (max || 200)) list.lastChild.remove();
  return li;
}

function addEvent(e) {
  const site = (e.twinId || '').split('/')[0];
  sites.add(site); kinds.add(e.kind);
  options($('filter-site'), sites); options($('filter-kind'), kinds);
  const li = logLine($('events'), e.timestampNs,
    `<b>${esc(e.kind)}</b> <a href="#" data-twin="${esc(e.twinId)}">${esc(e.twinId)}</a> ${esc(e.message)}`,
    e.kind === 'alarm' ? 'alarm' : '');
  li.dataset.site = site; li.dataset.kind = e.kind;
  filterEvents();
  if (e.kind === 'alarm' && twins.has(e.twinId)) { twins.get(e.twinId).status = 'alarm'; renderTwins(); }
}

function filterEvents() {
  const s = $('filter-site').value, k = $('filter-kind').value;
  for (const li of $('events').children) li.hidden = (s && li.dataset.site !== s) || (k && li.dataset.kind !== k);
}
$('filter-site').onchange = filterEvents;
$('filter-kind').onchange = filterEvents;

function onPlacement(p) {
  const t = twins.get(p.twinId);
  const before = t ? t.node : null;
  if (t) { t.node = p.node; t.tier = p.tier; if (p.status === 'stale') t.status = 'stale'; }
  else twins.set(p.twinId, { twinId: p.twinId, kind: p.kind, node: p.node, tier: p.tier, status: p.status || 'ok', revision: '' });
  renderTwins();
  if (before && before !== p.node) {
    logLine($('moves'), Date.now() * 1e6, `<a href="#" data-twin="${esc(p.twinId)}">${esc(p.twinId)}</a> ${esc(before)} → ${esc(p.node)} (epoch ${esc(p.epoch)}${p.reason ? ', ' + esc(p.reason) : ''})`);
  } else if (p.status === 'stale') {
    logLine($('moves'), Date.now() * 1e6, `<a href="#" data-twin="${esc(p.twinId)}">${esc(p.twinId)}</a> stale: ${esc(p.reason)}`, 'stale');
  }
}

function onLoad(l) {
  const n = nodes.get(l.node);
  if (!n) { loadMesh(); return; }
  if (n.load && num(l.timestampNs) > num(n.load.timestampNs)) {
    n.rate = (num(l.framesIn) - num(n.load.framesIn)) / ((num(l.timestampNs) - num(n.load.timestampNs)) / 1e9);
  }
  n.load = l; n.live = true;
  renderNodes();
}

async function loadMesh() {
  try {
    const [ns, ts] = await Promise.all([api('/api/nodes'), api('/api/twins')]);
    for (const i of ns) {
      const n = nodes.get(i.node) || {};
      nodes.set(i.node, Object.assign(n, { info: i, live: true }));
    }
    for (const t of ts.twins || []) twins.set(t.twinId, t);
    renderNodes(); renderTwins();
    notice('');
  } catch (e) { notice('mesh: ' + e.message); }
}

follow('/api/live', (ev, d) => {
  if (ev === 'event') addEvent(d);
  else if (ev === 'placement') onPlacement(d);
  else if (ev === 'load') onLoad(d);
  else if (ev === 'node') {
    const n = nodes.get(d.node);
    if (n) { n.live = d.live; renderNodes(); } else if (d.live) loadMesh();
  }
}, (up) => {
  $('live').textContent = up ? 'live' : 'offline';
  $('live').className = 'badge ' + (up ? 'live' : 'lost');
  if (up) loadMesh();
});

// ---- one twin ----

let selected = null, stopTwin = null, liveChart = null, featureChart = null, healthChart = null, waveChart = null;
let twin = null, rawView = false, refetching = null;
const latestFeatures = new Map();

document.addEventListener('click', (e) => {
  const t = e.target.closest('[data-twin]');
  if (t) { e.preventDefault(); select(t.dataset.twin); return; }
  const d = e.target.closest('[data-drain]');
  if (d) { e.preventDefault(); act(() => post('/api/nodes/' + encodeURIComponent(d.dataset.drain) + '/drain', {}), 'drain ' + d.dataset.drain); }
});

function act(call, what) {
  $('action-result').className = '';
  $('action-result').textContent = what + '…';
  call().then((r) => {
    $('action-result').className = 'ok';
    $('action-result').textContent = what + ': done' + (r && r.message ? ' (' + r.message + ')' : '');
    if (selected) refetch();
  }, (e) => {
    $('action-result').className = 'error';
    $('action-result').textContent = what + ' refused: ' + e.message;
  });
}

function destroyCharts() {
  for (const c of [liveChart, featureChart, healthChart, waveChart]) if (c) c.destroy();
  liveChart = featureChart = healthChart = waveChart = null;
}

async function select(id) {
  if (stopTwin) stopTwin();
  destroyCharts();
  selected = id; twin = null;
  latestFeatures.clear();
  renderTwins();
  $('twin').hidden = false;
  $('twin-title').textContent = id;
  $('twin-events').innerHTML = '';
  $('action-result').textContent = '';
  try {
    twin = await api('/api/twins/' + id);
  } catch (e) { $('twin-meta').textContent = 'GetTwin refused: ' + e.message; return; }
  // The caller sees raw values (on the site, with the role): refetch on changes.
  rawView = (twin.withheld || []).length === 0;
  render(twin);
  const signals = Object.keys(twin.reported || {}).sort();
  liveChart = new Rolling($('chart-live'), signals, 300);
  healthChart = new Rolling($('chart-health'), ['anomaly score'], 900);
  $('history-signal').innerHTML = Object.keys(twin.reported || {}).concat(Object.keys(twin.derived || {})).sort().map((s) => `<option value="${esc(s)}">${esc(s)}</option>`).join('');
  // The set-points: the writable properties of the twin's Thing Description.
  api('/api/twins/' + id + '/td').then((td) => {
    const props = JSON.parse(td.json).properties || {};
    const names = Object.keys(props).filter((k) => props[k].readOnly === false).sort();
    $('desired-property').innerHTML = names.map((s) => `<option value="${esc(s)}">${esc(s)}</option>`).join('');
  }, (e) => { $('action-result').textContent = 'Thing Description: ' + e.message; });
  stopTwin = follow('/api/twins/' + id + '/live', onTwinEvent, () => {});
}

function render(t) {
  const p = t.placement || {}, h = t.health || {};
  $('twin-meta').innerHTML = `${esc(t.kind)} on <b>${esc(p.node)}</b> (${esc(p.tier)}, epoch ${esc(p.epoch)}) · revision ${esc(t.revision)} · status <span class="${esc(h.status)}">${esc(h.status || 'ok')}</span>`;
  const withheld = t.withheld || [];
  $('withheld').hidden = withheld.length === 0;
  $('withheld').textContent = withheld.length ? 'Withheld from this view by the twin\'s privacy policy (you are off its site, or your role may not see raw values): ' + withheld.join(', ') + '. Ask a data owner on the site, or use a privacy release.' : '';
  $('reported').tBodies[0].innerHTML = Object.entries(t.reported || {}).sort().map(([k, v]) =>
    `<tr><td>${esc(k)}</td><td>${esc(fmt(v.value))}</td><td>seq ${esc(v.seq)}</td><td>${esc(clock(v.timestampNs))}</td></tr>`).join('');
  $('desired').tBodies[0].innerHTML = Object.entries(t.desired || {}).sort().map(([k, v]) =>
    `<tr><td>${esc(k)}</td><td>${esc(fmt(v.value))}</td><td class="${/DELIVERED/.test(v.status) ? 'ok' : /REFUSED|UNREACHABLE/.test(v.status) ? 'error' : 'warn'}">${esc(String(v.status || '').replace('DELIVERY_STATUS_', '').toLowerCase())}</td><td>${esc(v.reason)}</td></tr>`).join('');
  $('health').textContent = `score ${fmt(h.anomalyScore)} · ${h.status || 'ok'}\nmodel ${h.modelId || '(none)'} v${h.modelVersion || 0}\nlast alarm: ${h.lastAlarm || '(none)'}`;
  $('chain').textContent = ((t.chain || {}).stages || []).map((s) => `${s.tier.padEnd(6)} ${s.op.padEnd(10)} ${s.signal} ${Object.entries(s.params || {}).map(([k, v]) => k + '=' + v).join(' ')}`).join('\n') || '(default)';
  const b = t.budget || {};
  $('policy').textContent = Object.entries((t.policy || {}).signals || {}).sort().map(([k, v]) =>
    `${k.padEnd(22)} ${String(v.sensitivity || '').replace('SENSITIVITY_', '').toLowerCase().padEnd(9)} ${v.mechanism || ''}`).join('\n') +
    `\n\nε spent ${fmt(b.epsilonSpent || 0)} of ${fmt(b.epsilonTotal || 0)} · ${b.releases || 0} releases`;
}

function refetch() {
  if (refetching) return;
  refetching = setTimeout(async () => {
    refetching = null;
    try { twin = await api('/api/twins/' + selected); render(twin); } catch (e) { /* the live view stays */ }
  }, 300);
}

function onTwinEvent(ev, d) {
  if (ev === 'state') {
    const t = d.twin || {};
    const ts = num(d.timestampNs) / 1e9;
    if (liveChart) liveChart.push(ts, liveChart.series.map((s) => (t.reported && t.reported[s] ? num(t.reported[s].value) : null)));
    if (healthChart && t.health) healthChart.push(ts, [num(t.health.anomalyScore)]);
    if (rawView) refetch(); else { twin = Object.assign(twin || {}, t); render(twin); }
  } else if (ev === 'features') {
    // Each window's features come per signal: the chart follows the first eight features
    // seen, each at its latest value.
    for (const [k, v] of Object.entries(d.features || {})) latestFeatures.set(k, num(v));
    if (!featureChart) {
      const names = [...latestFeatures.keys()].sort().slice(0, 8);
      featureChart = new Rolling($('chart-features'), names, 900);
    } else if (featureChart.series.length < 8) {
      const names = [...latestFeatures.keys()].sort().slice(0, 8);
      if (names.join() !== featureChart.series.join()) {
        featureChart.destroy();
        featureChart = new Rolling($('chart-features'), names, 900);
      }
    }
    featureChart.push(num(d.windowEndNs) / 1e9, featureChart.series.map((n) => latestFeatures.get(n) ?? null));
  } else if (ev === 'event') {
    logLine($('twin-events'), d.timestampNs, `<b>${esc(d.kind)}</b> ${esc(d.message)}`, d.kind === 'alarm' ? 'alarm' : '', 50);
  } else if (ev === 'wave') {
    $('wave-caption').textContent = `waveform ${d.signal} (latest frame, ${d.samples.length} of ${d.total} samples)`;
    if (waveChart) waveChart.destroy();
    waveChart = chart($('chart-wave'), [d.signal], { scales: { x: { time: false } } });
    const step = num(d.periodNs) / 1e6;
    waveChart.setData([d.samples.map((_, i) => i * step), d.samples]);
    $('chart-wave').dataset.points = String(d.samples.length);
  }
}

$('history-form').onsubmit = async (e) => {
  e.preventDefault();
  const now = Date.now() * 1e6, range = Number($('history-range').value) * 1e9;
  const q = new URLSearchParams({
    signal: $('history-signal').value, start_ns: String(now - range), end_ns: String(now),
    bucket_ns: String(Number($('history-bucket').value) * 1e9), aggregation: $('history-agg').value,
  });
  $('chart-history').innerHTML = '';
  try {
    const r = await api('/api/twins/' + selected + '/history?' + q);
    const buckets = r.buckets || [];
    const u = chart($('chart-history'), [$('history-signal').value]);
    u.setData([buckets.map((b) => num(b.startNs) / 1e9), buckets.map((b) => num(b.value))]);
    $('history-note').textContent = `${buckets.length} buckets`;
  } catch (err) { $('history-note').textContent = 'history refused: ' + err.message; }
};

$('desired-form').onsubmit = (e) => {
  e.preventDefault();
  const property = $('desired-property').value, value = Number($('desired-value').value);
  act(() => post('/api/twins/' + selected + '/desired', { property, value }), `set ${property} = ${value}`);
};
$('migrate-form').onsubmit = (e) => {
  e.preventDefault();
  const node = $('migrate-node').value;
  act(() => post('/api/twins/' + selected + '/migrate', { targetNode: node }), 'migrate to ' + node);
};
$('deploy-form').onsubmit = (e) => {
  e.preventDefault();
  const modelId = $('deploy-model').value, version = $('deploy-version').value;
  act(() => post('/api/models/deploy', { modelId, version, twinIds: [selected] }), 'deploy ' + modelId);
};
