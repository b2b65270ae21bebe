// The training worker: owns the wasm Session (a shim over the library's `Run`) so the
// page stays responsive, and keeps checkpoints in the Origin Private File System.
// Messages in: {id, cmd, ...}; out: {id, ok, result|error} replies and
// {event: 'step' | 'kernels' | 'state' | 'log', ...} notices.
import init, { Session } from './pkg/webtune.js';

let wasm; // the module's exports: its memory is the wasm heap the page reports

let session = null;
let running = false;
let runInfo = null; // what the page needs to rebuild this run after a reload
// What a lost GPU device needs to rebuild the run in a new session: the model and data
// as last loaded, and whether this run has saved a checkpoint yet.
let lastModel = null;
let lastData = null;
let savedThisRun = false;
// Test hooks (`?test-oom-at=N`, `?test-lose-device-at=N`): before step N, an injected
// out-of-memory, or a lost device.
let hooks = {};

const post = (m) => self.postMessage(m);
const log = (text) => post({ event: 'log', text });

async function opfs() {
  return navigator.storage && navigator.storage.getDirectory ? navigator.storage.getDirectory() : null;
}

// Keep `data` as `name`; false where there is no OPFS, or no room (a full storage quota
// is a warning: training goes on without what a reload would resume from).
async function saveFile(name, data) {
  const dir = await opfs();
  if (!dir) return false;
  try {
    const handle = await dir.getFileHandle(name, { create: true });
    const w = await handle.createWritable();
    await w.write(data);
    await w.close();
    return true;
  } catch (e) {
    if (e.name !== 'QuotaExceededError') throw e;
    await removeFiles([name]);
    log(`warning: ${name} is not kept in this browser: this site's storage quota is full (clear stored models to make room); a reload cannot resume from it`);
    return false;
  }
}

async function readFile(name) {
  const dir = await opfs();
  if (!dir) return null;
  try {
    const f = await (await dir.getFileHandle(name)).getFile();
    return new Uint8Array(await f.arrayBuffer());
  } catch (e) {
    return null;
  }
}

async function readJson(name) {
  const bytes = await readFile(name);
  return bytes ? JSON.parse(new TextDecoder().decode(bytes)) : null;
}

async function removeFiles(names) {
  const dir = await opfs();
  for (const f of names) {
    try { await dir.removeEntry(f); } catch (e) { /* not there */ }
  }
}

// A checkpoint is the run's `checkpoint` files, kept as `checkpoint-{step}-{name}`;
// run.json names them once they are all written, and only then is the previous one
// removed, so a reload always finds a whole checkpoint.
async function checkpoint() {
  const files = await session.files('checkpoint');
  const step = session.step_count();
  const before = await readJson('run.json');
  const stored = [];
  for (const [name, bytes] of files) {
    stored.push(`checkpoint-${step}-${name}`);
    if (!(await saveFile(stored.at(-1), bytes))) {
      await removeFiles(stored);
      return;
    }
  }
  if (!(await saveFile('run.json', JSON.stringify({ ...runInfo, step, files: files.map(([n]) => n), stored })))) return removeFiles(stored);
  if (before && before.stored && before.step !== step) await removeFiles(before.stored);
  session.saved(`step ${step}, kept in this browser`);
  savedThisRun = true;
}

// The GPU device was lost (`why`): a new session on a new device, the same model, data
// and options, and the run continues from its last checkpoint in OPFS (from its start
// when it has saved none). The page then drops the steps after that checkpoint.
async function recover(why) {
  log(`the GPU device was lost (${why}): starting a new one; the run goes on from its last checkpoint`);
  const old = session;
  session = await Session.create();
  try {
    old.free();
  } catch {
    // already gone with its device
  }
  const { options, model, data, continued } = runInfo;
  if (continued && !savedThisRun) throw new Error(`the GPU device was lost (${why}) before this run, continued from the adapter trained before it, saved a checkpoint: that adapter is gone with the device; train again`);
  await commands.loadModel(lastModel);
  await commands.loadData(lastData);
  const hadSaved = savedThisRun;
  await commands.start({ options, model, data, continued });
  let step = 0;
  if (hadSaved) {
    const r = await commands.resumeSaved();
    log(r.note);
    step = r.step;
    savedThisRun = true;
  }
  post({ event: 'recovered', step, total: session.total_steps() });
}

// ---- models from the Hub or a URL, kept in this browser -----------------------------
// Downloads are kept in Cache Storage (`webtune-models`), keyed by URL, so a reload
// trains without downloading again. A Hub repo's files are fetched at the commit its
// revision points to now (`/api/models/{repo}/revision/{rev}`): a stored file is exact,
// and a moved branch fetches what changed. Progress goes out in bytes; each failure
// says what to do (a gated model's token, the missing file, CORS, the storage quota).
const STORE = 'webtune-models';
const REF = '/webtune-ref/'; // stored {commit, siblings} of repo@revision, for offline reloads
let hub = { endpoint: 'https://huggingface.co', token: '' };

const mb = (b) => (b / 2 ** 20).toFixed(1);
const store = async () => (self.caches ? caches.open(STORE) : null);
const authFor = (url) => (hub.token && url.startsWith(hub.endpoint) ? { Authorization: `Bearer ${hub.token}` } : {});

function gated(what, status) {
  return new Error(`${what}: HTTP ${status}: this model is gated or private. Accept its conditions on its Hugging Face page, then paste a token with access (huggingface.co/settings/tokens) into the Hub token field`);
}

function blocked(url, e) {
  return new Error(`${url}: the browser could not fetch it (${e.message}). The server is down, or it does not allow this page's origin (CORS); download the files and choose them from disk instead`);
}

// A small file's bytes (a File chosen in the page, or a downloaded Blob). Weights are
// not read here: the loader reads their Blobs a tensor at a time.
const bytesOf = async (f) => new Uint8Array(await f.arrayBuffer());

// Downloads stream into this browser's store in parts of this size, so the tab holds
// a part at a time, never the whole file.
const PART = 64 << 20;

// The file at `url` as a Blob (`what` names it in progress and errors): from this
// browser's store, else downloaded with progress and stored. The download goes into the
// store a part at a time (under `url` + `?webtune-part=N`); the parts then become the
// one stored file (a Blob of stored Blobs: the browser copies them, not the tab). The
// Blob's bytes stay with the browser; the loader reads them a tensor at a time. A
// download cut in the middle keeps its parts, and the next try asks only for the rest
// (`Range`). Without a store (or with its quota full) the bytes are gathered in memory
// and handed to the browser as a Blob. `optional`: null on a 404.
async function download(url, what, optional = false) {
  let cache = await store();
  const hit = cache && (await cache.match(url));
  if (hit) {
    const blob = await hit.blob();
    post({ event: 'progress', file: what, received: blob.size, total: blob.size, stored: true });
    return blob;
  }
  const partKey = (i) => `${url}${url.includes('?') ? '&' : '?'}webtune-part=${i}`;
  // The parts a cut download left: consecutive, as Blobs (their bytes stay in the store).
  const parts = [];
  for (let i = 0; cache; i++) {
    const r = await cache.match(partKey(i));
    if (!r) break;
    parts.push(await r.blob());
  }
  const dropParts = async () => {
    for (let i = 0; cache; i++) if (!(await cache.delete(partKey(i)))) break;
  };
  const start = parts.reduce((n, b) => n + b.size, 0);
  let r;
  try {
    r = await fetch(url, { headers: { ...authFor(url), ...(start ? { Range: `bytes=${start}-` } : {}) } });
  } catch (e) {
    throw blocked(url, e);
  }
  if (r.status === 401 || r.status === 403) throw gated(what, r.status);
  if (r.status === 404) {
    if (optional) return null;
    throw new Error(`${what}: not found (HTTP 404 for ${url})`);
  }
  if (!r.ok) throw new Error(`${what}: HTTP ${r.status} for ${url}`);
  let received = start;
  if (start && r.status !== 206) {
    // The whole file again: the stored parts are dropped.
    parts.length = 0;
    received = 0;
    await dropParts();
  }
  const total = received + (Number(r.headers.get('content-length')) || 0);
  if (received) log(`${what}: resuming after ${mb(received)} MB`);
  // Held in memory when the store cannot take it: the whole file, grown as needed.
  let held = null;
  const notKept = (e) => {
    const why = e.name === 'QuotaExceededError' ? "this site's storage quota is full: clear stored models to make room" : e.message;
    log(`warning: ${what} is not kept in this browser (${why}); it will be downloaded again next time`);
  };
  const hold = async (e) => {
    notKept(e);
    held = new Uint8Array(Math.max(total, received));
    let at = 0;
    for (const b of parts) {
      held.set(new Uint8Array(await b.arrayBuffer()), at);
      at += b.size;
    }
    parts.length = 0;
    await dropParts();
    cache = null;
  };
  // The part being filled: at most PART, or what is left of a file that announced its size.
  let buf = null;
  let filled = 0;
  // The buffer into the store as the next part (or into `held`).
  const flush = async () => {
    if (!filled) return;
    if (cache) {
      // (The Response takes a copy of the bytes, so the buffer is free again.)
      try {
        const key = partKey(parts.length);
        await cache.put(key, new Response(buf.subarray(0, filled)));
        parts.push(await (await cache.match(key)).blob());
      } catch (e) {
        await hold(e);
      }
    }
    if (!cache) {
      const at = received - filled;
      if (!held) held = new Uint8Array(Math.max(total, received));
      if (held.length < received) {
        const grown = new Uint8Array(Math.max(2 * held.length, received));
        grown.set(held.subarray(0, at));
        held = grown;
      }
      held.set(buf.subarray(0, filled), at);
    }
    filled = 0;
  };
  const cut = async (why) => {
    await flush().catch(() => {});
    return new Error(`${what}: the download stopped after ${mb(received)} of ${mb(total)} MB (${why}); start again to resume it`);
  };
  const reader = r.body.getReader();
  let shown = 0;
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (e) {
      throw await cut(e.message);
    }
    const { done, value } = chunk;
    if (done) break;
    for (let off = 0; off < value.length; ) {
      if (!buf) buf = new Uint8Array(Math.min(PART, total > received ? total - received : PART));
      const n = Math.min(value.length - off, buf.length - filled);
      buf.set(value.subarray(off, off + n), filled);
      (filled += n), (off += n), (received += n);
      if (filled === buf.length) {
        await flush();
        if (buf.length < PART) buf = null;
      }
    }
    if (performance.now() - shown > 200) {
      post({ event: 'progress', file: what, received, total });
      shown = performance.now();
    }
  }
  post({ event: 'progress', file: what, received, total });
  if (total && received !== total) throw await cut('the connection closed early');
  await flush();
  buf = null;
  // (A Blob of the held bytes: the browser takes them, and the tab's copy is dropped.)
  if (held) return new Blob([held.subarray(0, received)]);
  // The parts become the stored file, which the loader reads a tensor at a time.
  const whole = new Blob(parts, { type: 'application/octet-stream' });
  try {
    await cache.put(url, new Response(whole, { headers: { 'Content-Length': String(received) } }));
  } catch (e) {
    // Not stored: the bytes come into the tab, once, so the parts can go.
    notKept(e);
    const blob = new Blob([await whole.arrayBuffer()]);
    await dropParts();
    return blob;
  }
  const stored = await (await cache.match(url)).blob();
  await dropParts();
  return stored;
}

// A Hub repo's commit and files at `rev`; when the Hub is out of reach, what this
// browser stored the last time.
async function hubRevision(repo, rev) {
  const cache = await store();
  const key = `${hub.endpoint}${REF}${repo}/${rev}`;
  let r;
  try {
    r = await fetch(`${hub.endpoint}/api/models/${repo}/revision/${encodeURIComponent(rev)}`, { headers: authFor(hub.endpoint) });
  } catch (e) {
    const stored = cache && (await cache.match(key));
    if (stored) {
      log(`${hub.endpoint} is out of reach; using ${repo}@${rev} as stored in this browser`);
      return stored.json();
    }
    throw blocked(hub.endpoint, e);
  }
  if (r.status === 401 || r.status === 403) throw gated(repo, r.status);
  if (r.status === 404) throw new Error(`${repo}@${rev}: no such model or revision on ${hub.endpoint} (HTTP 404)`);
  if (!r.ok) throw new Error(`${repo}@${rev}: HTTP ${r.status} from ${hub.endpoint}`);
  const j = await r.json();
  const info = { commit: j.sha, siblings: (j.siblings || []).map((s) => s.rfilename) };
  if (cache) await cache.put(key, new Response(JSON.stringify(info))).catch(() => {});
  return info;
}

// A model from the Hub (a repo id) or from a URL: a folder's files, or one GGUF file.
async function remoteModel(source) {
  // `org/name[@revision][:file]`, parsed by the library (`hub::RepoRef`).
  const id = /^https?:/.test(source) ? null : Session.repo_id(source);
  if (!id && !/^https?:/.test(source)) throw new Error(`${source}: not a Hugging Face repo id (org/name, org/name@revision, org/name:file.gguf) or a URL`);
  let base;
  let has = () => true;
  if (id) {
    const info = await hubRevision(id.repo, id.revision);
    base = `${hub.endpoint}/${id.repo}/resolve/${info.commit}`;
    has = (f) => info.siblings.includes(f);
    if (id.file) {
      if (!has(id.file)) throw new Error(`${source}: the repository has no file ${id.file}`);
      return { name: `${id.repo}/${id.file}`, gguf: await download(`${base}/${id.file}`, id.file) };
    }
    if (!has('model.safetensors') && !has('model.safetensors.index.json')) {
      const ggufs = info.siblings.filter((f) => f.endsWith('.gguf'));
      throw new Error(`${source}: the repository has no model.safetensors${ggufs.length ? `; for a GGUF file name it ${id.repo}:${ggufs[0]}` : ''}`);
    }
  } else if (/\.gguf(\?.*)?$/i.test(source)) {
    return { name: source, gguf: await download(source, source.split('/').pop()) };
  } else {
    base = source.replace(/\/$/, '');
  }
  // The small files the Rust loader reads (config.json and tokenizer.json required).
  const names = [];
  const bytes = [];
  for (const f of Session.model_file_names()) {
    if (!has(f)) continue;
    const b = await download(`${base}/${f}`, f, f !== 'config.json' && f !== 'tokenizer.json');
    if (b) {
      names.push(f);
      bytes.push(await bytesOf(b));
    }
  }
  const shards = [];
  const single = has('model.safetensors') ? await download(`${base}/model.safetensors`, 'model.safetensors', !id) : null;
  if (single) {
    shards.push(single);
  } else {
    const index = JSON.parse(await (await download(`${base}/model.safetensors.index.json`, 'model.safetensors.index.json')).text());
    for (const f of [...new Set(Object.values(index.weight_map))].sort()) shards.push(await download(`${base}/${f}`, f));
  }
  return { name: id ? id.repo : source, names, bytes, shards };
}

// The first `n` preference pairs' prompts (the last user turn; a string prompt as it
// is) with their chosen and rejected answers, for the page to ask before and after.
function preferencePrompts(body, n) {
  const out = [];
  const content = (m) => (m && typeof m.content === 'string' ? m.content : null);
  const last = (msgs, role) => content(msgs.filter((m) => m && m.role === role).at(-1));
  const answer = (v) => (typeof v === 'string' ? v : Array.isArray(v) ? last(v, 'assistant') : null);
  for (const line of body.split('\n')) {
    if (out.length >= n) break;
    let r;
    try { r = JSON.parse(line); } catch (e) { continue; }
    if (!r || r.chosen == null || r.rejected == null) continue;
    // Without a prompt (TRL's implicit form), the chosen conversation holds it.
    const prompt = r.prompt ?? (Array.isArray(r.chosen) ? r.chosen.slice(0, -1) : null);
    const user = typeof prompt === 'string' ? prompt : Array.isArray(prompt) ? last(prompt, 'user') : null;
    const [chosen, rejected] = [answer(r.chosen), answer(r.rejected)];
    if (user && chosen != null && rejected != null) out.push({ prompt: user, chosen, rejected });
  }
  return out;
}

const commands = {
  async init() {
    wasm = await init();
    session = await Session.create();
    return { adapter: session.adapter(), timestamps: session.timestamps(), presets: Session.presets(), saved: await readJson('run.json') };
  },
  async loadModel(args) {
    const { source, files, endpoint, token } = args;
    lastModel = args;
    hub = { endpoint: (endpoint || 'https://huggingface.co').replace(/\/$/, ''), token: token || '' };
    if (source === 'demo') {
      session.load_demo_model();
    } else if (source === 'files' && files.gguf) {
      session.load_gguf(files.name, files.gguf);
    } else if (source === 'files') {
      session.load_model(files.name, files.names, await Promise.all(files.bytes.map(bytesOf)), files.shards);
    } else {
      const m = await remoteModel(source);
      if (m.gguf) session.load_gguf(m.name, m.gguf);
      else session.load_model(m.name, m.names, m.bytes, m.shards);
    }
    return { model: source, template: session.chat_template(), heap: wasm.memory.buffer.byteLength };
  },
  async loadData(args) {
    const { source, text, bytes, name, maxSeqLen, pack } = args;
    lastData = args;
    // The text comes from Rust as the CLI's does: a built-in set by its name, or a
    // file's bytes decoded there (bytes that are not UTF-8 name their line).
    const builtin = ['demo', 'demo-dpo', 'tools'].includes(source);
    const body = builtin ? Session.data_text(source) : bytes ? Session.data_text(name, bytes) : text;
    const summary = session.load_data(body, name || source, maxSeqLen, !!pack);
    const preview = session.inspect(body, name || source, maxSeqLen, !!pack, 3);
    await saveFile('data.jsonl', body);
    return { ...summary, preview, prompts: summary.pairs != null ? preferencePrompts(body, 8) : [] };
  },
  async start({ options, model, data, continued }) {
    savedThisRun = false;
    const total = await session.start(options);
    const note = session.plan_note();
    if (note) log(note);
    runInfo = { options, model, data, total, ...(continued ? { continued } : {}) };
    return { total };
  },
  // A run from the adapter the session's run trained (DPO after SFT), on the same model.
  async startContinued({ options, data }) {
    const total = await session.start_continued(options);
    const note = session.plan_note();
    if (note) log(note);
    runInfo = { options, model: runInfo ? runInfo.model : null, data, total, continued: true };
    return { total };
  },
  memory: ({ options, continued }) => session.memory_estimate(options, !!continued),
  // What this browser keeps: the stored model files and their sizes, and the site's usage.
  async stored() {
    const cache = await store();
    const files = [];
    for (const req of cache ? await cache.keys() : []) {
      if (req.url.includes(REF)) continue;
      const r = await cache.match(req);
      files.push({ url: req.url, bytes: Number(r.headers.get('content-length')) || (await r.blob()).size });
    }
    const estimate = navigator.storage && navigator.storage.estimate ? await navigator.storage.estimate() : {};
    return { files, usage: estimate.usage || 0, quota: estimate.quota || 0 };
  },
  clearStored: async () => (self.caches ? caches.delete(STORE) : false),
  files: async ({ what }) => ({ files: await session.files(what) }),
  tokenLosses: ({ index }) => session.token_losses(index),
  attention: ({ prompt, layer, head }) => session.attention_map(prompt, layer, head),
  gradNorms: () => session.layer_grad_norms(),
  loraChange: async ({ prompt, k }) => ({ changes: await session.lora_change(), top: await session.next_token_top(prompt, k) }),
  async resumeSaved() {
    const saved = await readJson('run.json');
    if (!saved || !saved.stored) throw new Error('no saved checkpoint');
    const bytes = [];
    for (const name of saved.stored) {
      const b = await readFile(name);
      if (!b) throw new Error(`the saved checkpoint has no ${name}`);
      bytes.push(b);
    }
    return session.resume(saved.files, bytes);
  },
  async savedData() {
    const bytes = await readFile('data.jsonl');
    return bytes ? new TextDecoder().decode(bytes) : null;
  },
  // The loop: one `Run` step per turn (so pause gets through); the run says when a
  // checkpoint is due, which kernels it timed, and when it is done.
  async run({ testHooks } = {}) {
    if (testHooks) hooks = { ...testHooks };
    running = true;
    post({ event: 'state', state: 'training' });
    let done = session.step_count() >= session.total_steps();
    while (running && !done) {
      await exclusive(async () => {
        const next = session.step_count() + 1;
        if (hooks.oomAt === next) {
          hooks.oomAt = null;
          session.fail_next_allocation();
        }
        if (hooks.loseAt === next) {
          hooks.loseAt = null;
          session.lose_device();
        }
        let e;
        try {
          e = await session.step();
        } catch (err) {
          const why = session.device_lost();
          if (!why) throw err;
          return recover(why);
        }
        done = e.done;
        if (e.note) log(e.note);
        post({ event: 'step', stats: e.stats, total: e.total, memory: session.resident_bytes(), heap: wasm.memory.buffer.byteLength });
        if (e.kernels.length) post({ event: 'kernels', step: e.stats.step, kernels: e.kernels });
        if (e.save) await checkpoint();
      }).catch((err) => { running = false; throw err; });
    }
    if (!done) await exclusive(checkpoint);
    running = false;
    post({ event: 'state', state: done ? 'done' : 'paused' });
    return { done };
  },
  async pause() {
    running = false;
    return {};
  },
  async generate({ prompt, maxNew }) {
    const base = await session.generate(prompt, maxNew, false);
    const tuned = await session.generate(prompt, maxNew, true);
    return { base, tuned };
  },
  // Greedy answers to `prompts` (user turns), with or without the adapter, or (`start`)
  // with the adapter the run started from, where it keeps one (else null).
  async answers({ prompts, maxNew, adapter, start }) {
    if (start) return session.keeps_starting_adapter() ? session.answers_start(prompts, maxNew) : null;
    const out = [];
    for (const p of prompts) out.push(await session.generate(p, maxNew, adapter));
    return out;
  },
  async demoTest({ task, n }) {
    return { base: await session.demo_test(task, n, false), tuned: await session.demo_test(task, n, true) };
  },
  async clearSaved() {
    const saved = await readJson('run.json');
    await removeFiles(['run.json', 'data.jsonl', ...((saved && saved.stored) || [])]);
    return {};
  },
};

// The wasm Session is one Rust object: two of its async methods must not interleave
// (wasm-bindgen throws "recursive use of an object"), so commands take turns. `run`
// takes a turn per step, so `pause`, which touches no session, always gets through.
let turn = Promise.resolve();
function exclusive(fn) {
  const result = turn.then(fn);
  turn = result.catch(() => {});
  return result;
}

self.onmessage = async (e) => {
  const { id, cmd } = e.data;
  try {
    const result = cmd === 'run' || cmd === 'pause' ? await commands[cmd](e.data) : await exclusive(() => commands[cmd](e.data));
    post({ id, ok: true, result });
  } catch (err) {
    post({ id, ok: false, error: String(err && err.message ? err.message : err) });
  }
};
