// The training worker: owns the wasm Session (a shim over the library's `Run`) so the
// page stays responsive, and keeps checkpoints in the Origin Private File System.
// Messages in: {id, cmd, ...}; out: {id, ok, result|error} replies and
// {event: 'step' | 'kernels' | 'state' | 'log', ...} notices.
import init, { Session } from './pkg/webtune.js';

let wasm; // the module's exports: its memory is the wasm heap the page reports

let session = null;
let running = false;
let runInfo = null; // what the page needs to rebuild this run after a reload

const post = (m) => self.postMessage(m);
const log = (text) => post({ event: 'log', text });

async function opfs() {
  return navigator.storage && navigator.storage.getDirectory ? navigator.storage.getDirectory() : null;
}

async function saveFile(name, data) {
  const dir = await opfs();
  if (!dir) return false;
  const handle = await dir.getFileHandle(name, { create: true });
  const w = await handle.createWritable();
  await w.write(data);
  await w.close();
  return true;
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
    await saveFile(stored.at(-1), bytes);
  }
  await saveFile('run.json', JSON.stringify({ ...runInfo, step, files: files.map(([n]) => n), stored }));
  if (before && before.stored && before.step !== step) await removeFiles(before.stored);
  session.saved(`step ${step}, kept in this browser`);
}

async function hfFiles(repo) {
  // A repo id (org/name) or a URL of a folder that holds the files.
  const base = /^https?:/.test(repo) ? repo.replace(/\/$/, '') : `https://huggingface.co/${repo}/resolve/main`;
  const get = async (f, optional) => {
    const r = await fetch(`${base}/${f}`);
    if (!r.ok) {
      if (optional) return null;
      throw new Error(`${base}/${f}: HTTP ${r.status}`);
    }
    return r;
  };
  const text = async (f, optional) => { const r = await get(f, optional); return r ? r.text() : null; };
  // The small files the Rust loader reads (config.json and tokenizer.json required).
  const names = [];
  const bytes = [];
  for (const f of Session.model_file_names()) {
    const r = await get(f, f !== 'config.json' && f !== 'tokenizer.json');
    if (r) {
      names.push(f);
      bytes.push(new Uint8Array(await r.arrayBuffer()));
    }
  }
  let shards = [];
  const single = await get('model.safetensors', true);
  if (single) {
    shards.push(new Uint8Array(await single.arrayBuffer()));
  } else {
    const index = JSON.parse(await text('model.safetensors.index.json'));
    for (const f of [...new Set(Object.values(index.weight_map))].sort()) {
      log(`fetching ${f}`);
      shards.push(new Uint8Array(await (await get(f)).arrayBuffer()));
    }
  }
  return { names, bytes, shards };
}

const commands = {
  async init() {
    wasm = await init();
    session = await Session.create();
    return { adapter: session.adapter(), timestamps: session.timestamps(), presets: Session.presets(), saved: await readJson('run.json') };
  },
  async loadModel({ source, files }) {
    if (source === 'demo') {
      session.load_demo_model();
    } else if (source === 'files' && files.gguf) {
      session.load_gguf(files.name, files.gguf);
    } else if (source === 'files') {
      session.load_model(files.name, files.names, files.bytes, files.shards);
    } else if (/\.gguf(\?.*)?$/i.test(source)) {
      // A GGUF file's URL: one file holds weights, tokenizer and chat template.
      const r = await fetch(source);
      if (!r.ok) throw new Error(`${source}: HTTP ${r.status}`);
      session.load_gguf(source, new Uint8Array(await r.arrayBuffer()));
    } else {
      const f = await hfFiles(source);
      session.load_model(source, f.names, f.bytes, f.shards);
    }
    return { model: source, template: session.chat_template(), heap: wasm.memory.buffer.byteLength };
  },
  async loadData({ source, text, bytes, name, maxSeqLen, pack }) {
    // A file's bytes are decoded in Rust, so bytes that are not UTF-8 name their line.
    const body = source === 'demo' ? Session.demo_data() : bytes ? Session.data_text(bytes, name) : text;
    const summary = session.load_data(body, name || source, maxSeqLen, !!pack);
    const preview = session.inspect(body, name || source, maxSeqLen, !!pack, 3);
    await saveFile('data.jsonl', body);
    return { ...summary, preview };
  },
  async start({ options, model, data }) {
    const total = session.start(options);
    runInfo = { options, model, data, total };
    return { total };
  },
  memory: ({ options }) => session.memory_estimate(options),
  files: async ({ what }) => ({ files: await session.files(what) }),
  tokenLosses: ({ index }) => session.token_losses(index),
  attention: ({ prompt, layer, head }) => session.attention_map(prompt, layer, head),
  gradNorms: () => session.layer_grad_norms(),
  async resumeSaved() {
    const saved = await readJson('run.json');
    if (!saved || !saved.stored) throw new Error('no saved checkpoint');
    const bytes = [];
    for (const name of saved.stored) {
      const b = await readFile(name);
      if (!b) throw new Error(`the saved checkpoint has no ${name}`);
      bytes.push(b);
    }
    return { step: session.resume(saved.files, bytes) };
  },
  async savedData() {
    const bytes = await readFile('data.jsonl');
    return bytes ? new TextDecoder().decode(bytes) : null;
  },
  // The loop: one `Run` step per turn (so pause gets through); the run says when a
  // checkpoint is due, which kernels it timed, and when it is done.
  async run() {
    running = true;
    post({ event: 'state', state: 'training' });
    let done = session.step_count() >= session.total_steps();
    while (running && !done) {
      await exclusive(async () => {
        const e = await session.step();
        done = e.done;
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
  async demoTest({ n }) {
    return { base: await session.demo_test(n, false), tuned: await session.demo_test(n, true) };
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
