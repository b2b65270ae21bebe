// The training worker: owns the wasm Session (GPU, model, data, trainer) so the page
// stays responsive. Messages in: {id, cmd, ...}; out: {id, ok, result|error} replies
// and {event: 'step' | 'state' | 'log', ...} notices.
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

async function checkpoint() {
  const bytes = await session.checkpoint();
  await saveFile('checkpoint.safetensors', bytes);
  await saveFile('run.json', JSON.stringify({ ...runInfo, step: session.step_count() }));
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
    return { adapter: session.adapter(), timestamps: session.timestamps(), saved: JSON.parse(new TextDecoder().decode((await readFile('run.json')) || new TextEncoder().encode('null'))) };
  },
  async loadModel({ source, files }) {
    if (source === 'demo') {
      session.load_demo_model();
    } else if (source === 'files') {
      session.load_model(files.name, files.names, files.bytes, files.shards);
    } else {
      const f = await hfFiles(source);
      session.load_model(source, f.names, f.bytes, f.shards);
    }
    return { model: source, template: session.chat_template(), heap: wasm.memory.buffer.byteLength };
  },
  async loadData({ source, text, bytes, name, maxSeqLen, pack }) {
    // A file's bytes are decoded in Rust, so bytes that are not UTF-8 name their line.
    const body = source === 'demo' ? Session.demo_data() : bytes ? Session.data_text(bytes, name) : text;
    const summary = JSON.parse(session.load_data(body, name || source, maxSeqLen, !!pack));
    const preview = JSON.parse(session.inspect(body, name || source, maxSeqLen, !!pack, 3));
    await saveFile('data.jsonl', body);
    return { ...summary, preview };
  },
  async start({ options, model, data }) {
    const total = session.start(JSON.stringify(options));
    runInfo = { options, model, data, total };
    return { total };
  },
  async memory({ options }) {
    return JSON.parse(session.memory_estimate(JSON.stringify(options)));
  },
  async merged() {
    return { files: await session.merged_model_files() };
  },
  async tokenLosses({ index }) {
    return JSON.parse(await session.token_losses(index));
  },
  async attention({ prompt, layer, head }) {
    return JSON.parse(await session.attention_map(prompt, layer, head));
  },
  async gradNorms() {
    return JSON.parse(await session.layer_grad_norms());
  },
  async resumeSaved() {
    const bytes = await readFile('checkpoint.safetensors');
    if (!bytes) throw new Error('no saved checkpoint');
    return { step: session.resume(bytes) };
  },
  async savedData() {
    const bytes = await readFile('data.jsonl');
    return bytes ? new TextDecoder().decode(bytes) : null;
  },
  async run({ checkpointEvery }) {
    running = true;
    post({ event: 'state', state: 'training' });
    while (running && session.step_count() < session.total_steps()) {
      await exclusive(async () => {
        // Time each kernel of step 3 (past the first steps' pipeline compilation) and
        // of every 25th step, where the adapter has timestamp queries.
        const next = session.step_count() + 1;
        const timed = (next === 3 || next % 25 === 0) && session.set_profiling(true);
        const stats = JSON.parse(await session.step());
        post({ event: 'step', stats, total: session.total_steps(), memory: session.resident_bytes(), heap: wasm.memory.buffer.byteLength });
        if (timed) {
          session.set_profiling(false);
          post({ event: 'kernels', step: stats.step, kernels: JSON.parse(await session.kernel_times()) });
        }
        if (!Number.isFinite(stats.loss)) {
          running = false;
          throw new Error(`the loss became ${stats.loss} at step ${stats.step}`);
        }
        if (checkpointEvery && stats.step % checkpointEvery === 0) await checkpoint();
      });
    }
    const done = session.step_count() >= session.total_steps();
    await exclusive(checkpoint);
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
    const base = JSON.parse(await session.demo_test(n, false));
    const tuned = JSON.parse(await session.demo_test(n, true));
    return { base, tuned };
  },
  async adapter() {
    const a = await session.adapter_files();
    return { config: a.config, weights: a.weights };
  },
  async clearSaved() {
    const dir = await opfs();
    for (const f of ['run.json', 'checkpoint.safetensors', 'data.jsonl']) {
      try { await dir.removeEntry(f); } catch (e) { /* not there */ }
    }
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
