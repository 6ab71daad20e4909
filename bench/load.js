'use strict';
// Load generator for bench/run.py: one scenario per invocation, Node's `ws` library.
//
//   node bench/load.js '{"scenario":"saturate","urls":["ws://127.0.0.1:P/ws/chat?token=…"],…}'
//
// It talks to the harness over stdin/stdout in JSON lines so that the harness can read
// the proxy's CPU and memory exactly at the edges of the measured window:
//
//   load.js  -> {"event":"ready",…}     connections open and warmed up; nothing in flight
//   harness  -> go                      (the harness samples the proxy first)
//   load.js  -> {"event":"done",…}      window over, every message in flight answered
//
// The idle scenario has one more step: after "go" it opens the sessions and reports
// {"event":"opened",…}; the harness samples memory and answers "close".
//
// Every phase is bounded in time (opts.maxSeconds overall); the process exits by itself.

const WebSocket = require('ws');
const readline = require('readline');
const { performance } = require('perf_hooks');

const opts = Object.assign({
  scenario: 'saturate',   // saturate | latency | idle | setup
  urls: [],               // one per user (token in the URL); connection i uses urls[i % n]
  conns: 100,             // saturate, latency: open connections; setup: concurrent loops
  inflight: 10,           // saturate: messages outstanding per connection
  size: 64,               // payload bytes
  binary: false,          // text frames (chat) unless asked
  deflate: false,         // offer permessage-deflate
  deflateThreshold: 0,    // ws compresses only messages at least this big (its default is 1024)
  rate: 2000,             // latency: messages per second, all connections together
  warmup: 1,              // seconds of the same load before "ready", not measured
  duration: 5,            // seconds measured
  sessions: 5000,         // idle: sessions to open
  openConcurrency: 200,   // idle: handshakes in flight while opening
  openSeconds: 60,        // idle: bound on opening them all
  settle: 1,              // idle: seconds to wait once all are open, before "opened"
  setupMode: 'echo',      // setup: 'open' closes at once on open; 'echo' closes after one echo
  maxSeconds: 300,        // hard bound on the whole process
}, JSON.parse(process.argv[2] || '{}'));

const hardStop = setTimeout(() => {
  emit({ event: 'error', error: `load generator exceeded ${opts.maxSeconds}s` });
  process.exit(3);
}, opts.maxSeconds * 1000);
hardStop.unref();

function emit(obj) { process.stdout.write(JSON.stringify(obj) + '\n'); }
function now() { return performance.now(); }
function sleep(ms) { return new Promise(r => setTimeout(r, ms)); }

const commands = [];
const waiters = [];
readline.createInterface({ input: process.stdin }).on('line', line => {
  const cmd = line.trim();
  const w = waiters.shift();
  if (w) w(cmd); else commands.push(cmd);
}).on('close', () => { // the harness went away: nothing left to do
  setTimeout(() => process.exit(4), 100);
});
function command() {
  return commands.length ? Promise.resolve(commands.shift()) : new Promise(r => waiters.push(r));
}

const payload = Buffer.alloc(opts.size, 'x');
const sendOpts = { binary: opts.binary };
const wsOpts = {
  perMessageDeflate: opts.deflate ? { threshold: opts.deflateThreshold } : false,
  skipUTF8Validation: true, // the load generator's own cost; it checks lengths instead
  handshakeTimeout: 10000,
  maxPayload: 16 * 1024 * 1024,
};
const stats = { errors: 0, unexpectedCloses: 0, badEchoes: 0, errorSamples: [] };
function noteError(what) {
  stats.errors += 1;
  if (stats.errorSamples.length < 5) stats.errorSamples.push(String(what));
}

function percentile(sorted, p) {
  if (!sorted.length) return null;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil(p / 100 * sorted.length) - 1));
  return sorted[i];
}

function cpu() { const u = process.cpuUsage(); return (u.user + u.system) / 1e6; }

// Open one connection; resolves to the socket once open (or null on failure).
function open(i) {
  return new Promise(resolve => {
    const ws = new WebSocket(opts.urls[i % opts.urls.length], wsOpts);
    let settled = false;
    ws.on('open', () => { settled = true; resolve(ws); });
    ws.on('error', e => { noteError(e.message); if (!settled) { settled = true; resolve(null); } });
    ws.on('close', () => { if (!settled) { settled = true; resolve(null); } });
  });
}

async function openAll(n, concurrency, boundMs) {
  const sockets = [];
  let next = 0, failed = 0;
  const deadline = now() + boundMs;
  async function worker() {
    while (next < n && now() < deadline) {
      const ws = await open(next++);
      if (ws) sockets.push(ws); else failed += 1;
    }
  }
  await Promise.all(Array.from({ length: Math.min(concurrency, n) }, worker));
  return { sockets, failed };
}

function watchCloses(sockets) {
  for (const ws of sockets) ws.on('close', () => { if (!ws._benchClosing) stats.unexpectedCloses += 1; });
}

function closeAll(sockets) {
  for (const ws of sockets) { ws._benchClosing = true; ws.terminate(); }
}

// -- saturation: every connection keeps `inflight` messages outstanding ------------------
async function saturate() {
  const { sockets, failed } = await openAll(opts.conns, opts.conns, 20000);
  if (!sockets.length) return { error: 'no connection opened', failed };
  watchCloses(sockets);
  let running = false, sent = 0, echoed = 0, drained = null, lastEcho = 0;
  for (const ws of sockets) {
    ws.on('message', data => {
      echoed += 1; lastEcho = now();
      if (data.length !== opts.size) stats.badEchoes += 1;
      if (running) { ws.send(payload, sendOpts); sent += 1; } else if (echoed === sent && drained) drained();
    });
  }
  async function phase(seconds) {
    sent = 0; echoed = 0; running = true;
    const t0 = now();
    for (const ws of sockets) for (let k = 0; k < opts.inflight; k++) { ws.send(payload, sendOpts); sent += 1; }
    await sleep(seconds * 1000);
    running = false;
    if (echoed < sent) {
      await Promise.race([new Promise(r => { drained = r; }), sleep(10000)]);
      drained = null;
    }
    return { echoed, sent, seconds: ((echoed === sent ? lastEcho : now()) - t0) / 1000 };
  }
  if (opts.warmup > 0) await phase(opts.warmup);
  emit({ event: 'ready', conns: sockets.length, failed });
  await command();
  const c0 = cpu();
  const r = await phase(opts.duration);
  const loadgenCpu = cpu() - c0;
  const result = {
    event: 'done', conns: sockets.length, failed, echoed: r.echoed, sent: r.sent, seconds: r.seconds,
    msgs_per_s: r.echoed / r.seconds, loadgen_cpu_s: loadgenCpu, lost: r.sent - r.echoed,
  };
  closeAll(sockets);
  return result;
}

// -- latency: an open-loop fixed rate spread over the connections ------------------------
async function latency() {
  const { sockets, failed } = await openAll(opts.conns, opts.conns, 20000);
  if (!sockets.length) return { error: 'no connection opened', failed };
  watchCloses(sockets);
  const queues = sockets.map(() => []);
  let record = null, sent = 0, echoed = 0, drained = null;
  sockets.forEach((ws, i) => {
    ws.on('message', data => {
      const t = queues[i].shift();
      echoed += 1;
      if (data.length !== opts.size) stats.badEchoes += 1;
      if (record && t !== undefined) record.push(now() - t);
      if (echoed === sent && drained) drained();
    });
  });
  async function phase(seconds, samples) {
    record = samples; sent = 0; echoed = 0;
    const t0 = now(), end = t0 + seconds * 1000;
    await new Promise(resolve => {
      (function tick() {
        const t = now();
        const due = Math.min(Math.floor((Math.min(t, end) - t0) * opts.rate / 1000), Math.round(seconds * opts.rate));
        while (sent < due) {
          const i = sent % sockets.length;
          queues[i].push(now());
          sockets[i].send(payload, sendOpts);
          sent += 1;
        }
        if (t >= end) resolve(); else setTimeout(tick, 1);
      })();
    });
    if (echoed < sent) { await Promise.race([new Promise(r => { drained = r; }), sleep(10000)]); drained = null; }
    return { sent, echoed, seconds: (now() - t0) / 1000 };
  }
  if (opts.warmup > 0) await phase(opts.warmup, null);
  emit({ event: 'ready', conns: sockets.length, failed });
  await command();
  const samples = [];
  const c0 = cpu();
  const r = await phase(opts.duration, samples);
  const loadgenCpu = cpu() - c0;
  samples.sort((a, b) => a - b);
  const result = {
    event: 'done', conns: sockets.length, failed, sent: r.sent, echoed: r.echoed, seconds: r.seconds,
    msgs_per_s: r.echoed / r.seconds, loadgen_cpu_s: loadgenCpu, lost: r.sent - r.echoed,
    rtt_ms: { p50: percentile(samples, 50), p90: percentile(samples, 90), p99: percentile(samples, 99),
              max: samples.length ? samples[samples.length - 1] : null, samples: samples.length },
  };
  closeAll(sockets);
  return result;
}

// -- idle sessions: open many, each used once, then leave them quiet ----------------------
function openUsed(i) {
  return new Promise(resolve => {
    const ws = new WebSocket(opts.urls[i % opts.urls.length], wsOpts);
    let settled = false;
    const finish = ok => { if (!settled) { settled = true; resolve(ok ? ws : null); } };
    ws.on('open', () => ws.send(payload, sendOpts));
    ws.once('message', () => finish(true));
    ws.on('error', e => { noteError(e.message); finish(false); });
    ws.on('close', () => finish(false));
  });
}

async function idle() {
  // Warm the path (lazy imports, first-use allocations) with a few sessions, then let go.
  const warm = [];
  for (let i = 0; i < Math.min(100, opts.sessions); i++) warm.push(openUsed(i));
  closeAll((await Promise.all(warm)).filter(Boolean));
  await sleep(1000);
  emit({ event: 'ready' });
  await command();
  const sockets = [];
  let next = 0, failed = 0;
  const t0 = now(), deadline = t0 + opts.openSeconds * 1000;
  async function worker() {
    while (next < opts.sessions && now() < deadline) {
      const ws = await openUsed(next++);
      if (ws) sockets.push(ws); else failed += 1;
    }
  }
  await Promise.all(Array.from({ length: Math.min(opts.openConcurrency, opts.sessions) }, worker));
  const openSeconds = (now() - t0) / 1000;
  watchCloses(sockets);
  await sleep(opts.settle * 1000);
  emit({ event: 'opened', opened: sockets.length, failed, open_seconds: openSeconds,
         timed_out: sockets.length + failed < opts.sessions });
  await command();
  const stillOpen = sockets.filter(ws => ws.readyState === WebSocket.OPEN).length;
  closeAll(sockets);
  return { event: 'done', opened: sockets.length, failed, still_open: stillOpen, open_seconds: openSeconds };
}

// -- set-up: concurrent loops of open -> (one echo) -> close -------------------------------
async function setup() {
  let running = false, completed = 0, failures = 0, active = 0, idleResolve = null;
  let handshakeMs = null;
  function loop(i) {
    if (!running) { active -= 1; if (!active && idleResolve) idleResolve(); return; }
    const t0 = now();
    const ws = new WebSocket(opts.urls[i % opts.urls.length], wsOpts);
    let failed = false;
    ws.on('open', () => {
      if (handshakeMs) handshakeMs.push(now() - t0);
      if (opts.setupMode === 'echo') ws.send(payload, sendOpts); else ws.close(1000);
    });
    ws.on('message', () => ws.close(1000));
    ws.on('error', e => { failed = true; noteError(e.message); });
    ws.on('close', code => {
      if (failed || code !== 1000) failures += 1; else completed += 1;
      setImmediate(loop, i + opts.conns);
    });
  }
  async function phase(seconds, samples) {
    completed = 0; failures = 0; handshakeMs = samples; running = true; active = opts.conns;
    const t0 = now();
    for (let i = 0; i < opts.conns; i++) loop(i);
    await sleep(seconds * 1000);
    running = false;
    await Promise.race([new Promise(r => { idleResolve = r; }), sleep(15000)]);
    idleResolve = null;
    return { completed, failures, seconds: (now() - t0) / 1000 };
  }
  if (opts.warmup > 0) await phase(opts.warmup, null);
  emit({ event: 'ready' });
  await command();
  const samples = [];
  const c0 = cpu();
  const r = await phase(opts.duration, samples);
  const loadgenCpu = cpu() - c0;
  samples.sort((a, b) => a - b);
  return {
    event: 'done', loops: opts.conns, completed: r.completed, failures: r.failures, seconds: r.seconds,
    handshakes_per_s: r.completed / r.seconds, loadgen_cpu_s: loadgenCpu,
    open_ms: { p50: percentile(samples, 50), p99: percentile(samples, 99) },
  };
}

const scenarios = { saturate, latency, idle, setup };

(async () => {
  const run = scenarios[opts.scenario];
  if (!run) { emit({ event: 'error', error: `unknown scenario ${opts.scenario}` }); process.exit(2); }
  let result;
  try {
    result = await run();
  } catch (e) {
    result = { event: 'error', error: String(e && e.stack || e) };
  }
  if (!result.event) result.event = 'error';
  Object.assign(result, { errors: stats.errors, unexpected_closes: stats.unexpectedCloses,
                          bad_echoes: stats.badEchoes, error_samples: stats.errorSamples });
  emit(result);
  process.exit(result.event === 'error' ? 1 : 0);
})();
