// The page: reads the options (or query parameters), talks to the training worker,
// draws the loss chart (and DPO's reward margin and accuracy) and keeps #status
// (data-state, data-step, data-loss; data-margins, data-accuracies for DPO) current so
// scripts and tests can follow a run.
import uPlot from './vendor/uPlot.esm.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const losses = [];
// DPO's per-step means, under TRL's names: rewards/margins and rewards/accuracies.
const margins = [];
const accuracies = [];
window.webtune = { losses, margins, accuracies };

function setStatus(state, text) {
  const s = $('status');
  s.dataset.state = state;
  s.textContent = text;
}

function log(text) {
  const l = $('log');
  l.textContent += text + '\n';
  l.scrollTop = l.scrollHeight;
}

// ---- the worker, as an async call interface -------------------------------------
const worker = new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });
let nextId = 1;
const pending = new Map();
let workerFailed = null; // why the worker could not load: every call fails with it
function call(cmd, args = {}) {
  if (workerFailed) return Promise.reject(workerFailed);
  const id = nextId++;
  return new Promise((resolve, reject) => {
    pending.set(id, { resolve, reject });
    worker.postMessage({ id, cmd, ...args });
  });
}
// A worker script or wasm package that fails to load (web/pkg not built, or not served
// beside the page) says so instead of leaving the page at "starting…".
worker.onerror = (e) => {
  e.preventDefault();
  workerFailed = new Error(`the page's worker or its wasm package failed to load${e.message ? ` (${e.message})` : ''}: build it with scripts/build-web.sh, and serve web/pkg beside the page (webtune serve does)`);
  for (const p of pending.values()) p.reject(workerFailed);
  pending.clear();
};
worker.onmessage = (e) => {
  const m = e.data;
  if (m.id) {
    const p = pending.get(m.id);
    pending.delete(m.id);
    m.ok ? p.resolve(m.result) : p.reject(new Error(m.error));
  } else if (m.event === 'step') {
    onStep(m.stats, m.total, m.memory, m.heap);
  } else if (m.event === 'kernels') {
    onKernels(m.step, m.kernels);
  } else if (m.event === 'state') {
    onState(m.state);
  } else if (m.event === 'log') {
    log(m.text);
  } else if (m.event === 'progress') {
    onProgress(m);
  } else if (m.event === 'recovered') {
    onRecovered(m.step, m.total);
  }
};

// ---- options ------------------------------------------------------------------------
// The defaults and the demo's preset come from Rust (`RunOptions`, `Session::presets`);
// the form shows them and query parameters override them.
let presets = null;
const FIELDS = { rank: 'lora_rank', alpha: 'lora_alpha', dropout: 'lora_dropout', lr: 'lr', steps: 'steps', epochs: 'epochs', batch: 'batch_size', seq: 'max_seq_len', seed: 'seed', beta: 'beta', smoothing: 'label_smoothing', rpo: 'rpo_alpha' };
const num = (id, param) => Number(params.get(param) ?? $(id).value);

function showPreset(p) {
  for (const [id, key] of Object.entries(FIELDS)) {
    const v = p[key];
    // f32 options arrive widened (0.1 → 0.10000000149…): show 6 significant digits.
    $(id).value = params.get(id) ?? (v == null ? 0 : Number(v.toPrecision(6)));
  }
  $('loss').value = params.get('loss') ?? p.dpo_loss;
  const targets = p.lora_targets === 'all-linear' ? presets.targets : p.lora_targets.split(',');
  $('targets').replaceChildren();
  for (const t of presets.targets) {
    const l = document.createElement('label');
    l.innerHTML = `<input type="checkbox" value="${t}"${targets.includes(t) ? ' checked' : ''}> ${t}`;
    $('targets').appendChild(l);
  }
}

// The training method (sft or dpo): a choice of its own, which picks the preset.
const method = () => params.get('method') || $('method').value;

// The preset of the chosen model and method: the demo's (or its DPO stage's) for the
// demo model, the real-model demo's for SmolLM2's tool calls, else the defaults.
function preset() {
  const m = params.get('model') || radio('model');
  if (m === 'smollm2' && method() === 'sft') return presets.tools;
  if (m !== 'demo') return presets.default;
  return method() === 'dpo' ? presets.demo_dpo : presets.demo;
}

// The real model the "Real model" preset tunes (?real= names another source: a Hub id
// or a URL, as the Hub field takes them).
const REAL_MODEL = 'HuggingFaceTB/SmolLM2-135M-Instruct';

function showMethod() {
  $('dpoOptions').hidden = method() !== 'dpo';
  showPreset(preset());
}

function runOptions() {
  const steps = num('steps', 'steps');
  const p = preset();
  return {
    ...p,
    lora_rank: num('rank', 'rank'),
    lora_alpha: num('alpha', 'alpha'),
    lora_dropout: num('dropout', 'dropout'),
    lora_targets: [...$('targets').querySelectorAll('input:checked')].map((i) => i.value).join(','),
    max_seq_len: num('seq', 'seq'),
    lr: num('lr', 'lr'),
    schedule: params.get('schedule') || p.schedule,
    warmup: Number(params.get('warmup') ?? p.warmup),
    batch_size: num('batch', 'batch'),
    epochs: num('epochs', 'epochs'),
    steps: steps > 0 ? steps : null,
    seed: num('seed', 'seed'),
    quantize: params.get('quantize') ?? ($('quantize').value || p.quantize || null),
    // The memory a step may use (the Memory budget field, or ?budget=2GiB): the run plans
    // its micro-batches, checkpointing and frozen-weight format to fit it.
    memory_budget: $('budget').value.trim() || null,
    method: method(),
    beta: num('beta', 'beta'),
    dpo_loss: params.get('loss') ?? $('loss').value,
    label_smoothing: num('smoothing', 'smoothing'),
    rpo_alpha: num('rpo', 'rpo'),
  };
}

// A run continued from the last one keeps its adapter's shape (the library sets it;
// the page says so in the options it keeps for a reload).
const LORA_KEYS = ['lora_rank', 'lora_alpha', 'lora_dropout', 'lora_targets', 'rslora', 'full'];
let lastOptions = null; // the options of the run the session holds

function radio(name) {
  return document.querySelector(`input[name=${name}]:checked`).value;
}

// The chosen model files as File objects: a File crosses to the worker as a handle,
// not a copy, and the loader reads a weights file's bytes from disk a tensor at a time.
function modelFiles() {
  // A GGUF file chosen on its own, else the chosen folder's.
  const files = [...$('gguffile').files, ...$('modelfiles').files];
  const gguf = files.find((f) => f.name.toLowerCase().endsWith('.gguf'));
  if (gguf) return { name: gguf.name, gguf };
  const shards = files.filter((f) => f.name.endsWith('.safetensors')).sort((a, b) => a.name.localeCompare(b.name));
  if (!shards.length) throw new Error('the chosen files have no .safetensors weights and no .gguf file');
  // The small files go to the Rust loader, which reads those it knows and says what is missing.
  const small = files.filter((f) => /\.(json|jinja)$/.test(f.name));
  return {
    name: (files[0].webkitRelativePath || files[0].name).split('/')[0],
    names: small.map((f) => f.name),
    bytes: small,
    shards,
  };
}

async function dataSource() {
  const choice = params.get('data') || radio('data');
  if (['demo', 'demo-dpo', 'tools'].includes(choice)) return { source: choice };
  if (choice === 'file') {
    const f = $('datafile').files[0];
    if (!f) throw new Error('choose a JSONL file');
    return { source: 'file', bytes: new Uint8Array(await f.arrayBuffer()), name: f.name };
  }
  return { source: 'paste', text: $('datatext').value, name: 'pasted records' };
}

// ---- a run ---------------------------------------------------------------------------
let started = 0;
let modelSource = null; // 'demo', 'smollm2' (the real-model preset), 'files' or a Hub id, once a run starts
const stepTimes = [];
function onStep(s, total, memory, heap) {
  losses.push(s.loss);
  const dpo = s['rewards/margins'] != null;
  if (dpo) {
    margins.push(s['rewards/margins']);
    accuracies.push(s['rewards/accuracies']);
  }
  stepTimes.push(s.tokens / s.tokens_per_s);
  drawBars($('times'), stepTimes.slice(-60), (v) => `${(1000 * v).toFixed(0)} ms`);
  const st = $('status');
  st.dataset.step = s.step;
  st.dataset.total = total;
  st.dataset.loss = s.loss.toFixed(6);
  st.dataset.heap = heap;
  st.dataset.losses = JSON.stringify(losses);
  if (dpo) {
    st.dataset.margins = JSON.stringify(margins);
    st.dataset.accuracies = JSON.stringify(accuracies);
  }
  setStatus('training', `step ${s.step}/${total} · loss ${s.loss.toFixed(4)}`);
  const elapsed = (performance.now() - started) / 1000;
  const eta = (elapsed / Math.max(1, losses.length)) * (total - s.step);
  const rewards = dpo ? ` · reward margin ${s['rewards/margins'].toFixed(4)} · accuracy ${s['rewards/accuracies'].toFixed(3)}` : '';
  $('stats').textContent = `step ${s.step}/${total} · loss ${s.loss.toFixed(4)}${rewards} · lr ${s.lr.toExponential(2)} · grad norm ${s.grad_norm.toFixed(3)} · ${s.tokens_per_s.toFixed(0)} tokens/s · ETA ${eta.toFixed(0)} s`;
  $('memory').textContent = `GPU memory held by the model: ${(memory / 2 ** 20).toFixed(1)} MiB`;
  drawChart();
}

function onState(state) {
  const training = state === 'training';
  $('pause').disabled = !training;
  $('continue').disabled = state !== 'paused';
  $('download').disabled = training || losses.length === 0;
  $('ask').disabled = training;
  $('demoTest').disabled = training || !heldOutTask();
  for (const id of ['showLosses', 'showAttention', 'showNorms']) $(id).disabled = training;
  $('showChange').disabled = training || !lastOptions || lastOptions.full || losses.length === 0;
  $('train').disabled = training;
  $('continueAdapter').disabled = training || !lastOptions || lastOptions.full || losses.length === 0;
  if ($('continueAdapter').disabled) $('continueAdapter').checked = false;
  const st = $('status');
  if (state === 'done') setStatus('done', `done: ${st.dataset.step} steps, final loss ${st.dataset.loss}`);
  if (state === 'paused') setStatus('paused', `paused at step ${st.dataset.step}`);
}

// The loss chart: uPlot (vendored by the web build) gives axes, the values under the
// cursor and sharp lines on high-DPI screens. A DPO run adds a second chart: the
// reward margin (left axis) and the accuracy (right axis, 0 to 1) per step.
let chart = null;
let dpoChart = null;
const fixed = (d) => (u, v) => (v == null ? '–' : v.toFixed(d));
function drawChart() {
  const steps = losses.map((_, i) => i + 1 + (Number($('status').dataset.resumedFrom) || 0));
  const width = Math.min(640, $('chart').clientWidth || 640);
  if (!chart) {
    chart = new uPlot({
      width,
      height: 240,
      scales: { x: { time: false } },
      axes: [{ label: 'step' }, { label: 'loss' }],
      series: [{ label: 'step' }, { label: margins.length ? 'DPO loss' : 'training loss', stroke: '#2b6cb0', width: 2, value: fixed(4) }],
    }, [steps, losses.slice()], $('chart'));
  } else {
    chart.setData([steps, losses.slice()]);
  }
  if (!margins.length) return;
  $('dpoChart').hidden = false;
  const data = [steps, margins.slice(), accuracies.slice()];
  if (!dpoChart) {
    dpoChart = new uPlot({
      width,
      height: 200,
      scales: { x: { time: false }, margin: {}, accuracy: { range: [0, 1] } },
      axes: [{ label: 'step' }, { label: 'reward margin', scale: 'margin' }, { label: 'accuracy', scale: 'accuracy', side: 1, grid: { show: false } }],
      series: [
        { label: 'step' },
        { label: 'reward margin (chosen − rejected)', scale: 'margin', stroke: '#2f855a', width: 2, value: fixed(4) },
        { label: 'accuracy (chosen rewarded above rejected)', scale: 'accuracy', stroke: '#c05621', width: 2, value: fixed(3) },
      ],
    }, data, $('dpoChart'));
  } else {
    dpoChart.setData(data);
  }
}

// A new run starts its charts and figures afresh.
function resetCharts() {
  for (const c of [chart, dpoChart]) c?.destroy();
  chart = dpoChart = null;
  $('dpoChart').hidden = true;
  losses.length = margins.length = accuracies.length = 0;
  const st = $('status');
  for (const k of ['losses', 'margins', 'accuracies', 'resumedFrom']) delete st.dataset[k];
}

// The worker rebuilt the run on a new GPU device from its checkpoint at `step` (0: from
// the start): the figures after it are dropped, and the run's steps follow on.
function onRecovered(step, total) {
  const st = $('status');
  const keep = Math.max(0, step - Number(st.dataset.resumedFrom || 0));
  losses.length = Math.min(losses.length, keep);
  margins.length = Math.min(margins.length, keep);
  accuracies.length = Math.min(accuracies.length, keep);
  st.dataset.step = step;
  st.dataset.total = total;
  st.dataset.recovered = step;
  st.dataset.losses = JSON.stringify(losses);
  if (margins.length || accuracies.length) {
    st.dataset.margins = JSON.stringify(margins);
    st.dataset.accuracies = JSON.stringify(accuracies);
  }
  drawChart();
}

// Download progress, a line per file; window.webtune.downloads keeps the figures.
const mb = (b) => (b / 2 ** 20).toFixed(1);
window.webtune.downloads = {};
function onProgress({ file, received, total, stored }) {
  window.webtune.downloads[file] = { received, total, stored: !!stored };
  $('downloadProgress').textContent = stored
    ? `${file}: ${mb(received)} MB, stored in this browser`
    : `downloading ${file}: ${mb(received)}${total ? ` of ${mb(total)} MB (${((100 * received) / total).toFixed(0)}%)` : ' MB'}`;
  if (stored || (total && received === total)) log($('downloadProgress').textContent);
}

// What this browser keeps, and a way to clear it.
async function showStored() {
  const { files, usage, quota } = await call('stored');
  $('storedList').replaceChildren(...files.map((f) => Object.assign(document.createElement('li'), { textContent: `${f.url} — ${mb(f.bytes)} MB` })));
  $('storedList').dataset.count = String(files.length);
  $('storedUsage').textContent = files.length ? `${files.length} files; this site uses ${mb(usage)} MB of ${mb(quota)} MB the browser allows` : 'nothing stored';
}
$('clearStored').onclick = async () => {
  await call('clearStored');
  await showStored();
};

async function prepare(model, data) {
  if (model) await loadModel(model);
  return loadData(data);
}

async function loadModel(model) {
  setStatus('loading', 'loading the model…');
  // A new model drops the session's run: nothing to continue from until one trains.
  lastOptions = null;
  $('continueAdapter').checked = false;
  $('continueAdapter').disabled = true;
  // The Hub endpoint (?endpoint=, as HF_ENDPOINT natively) and token go to the worker
  // only, never into the saved run.
  const loaded = await call('loadModel', { ...model, endpoint: params.get('endpoint') || undefined, token: params.get('token') || $('hubToken').value.trim() });
  if (model.source !== 'demo' && model.source !== 'files') showStored().catch(() => {});
  log(loaded.template);
  log(`model loaded; the wasm heap is ${(loaded.heap / 2 ** 20).toFixed(0)} MiB`);
  $('status').dataset.heap = loaded.heap;
}

async function loadData(data) {
  setStatus('loading', 'reading the data…');
  const summary = await call('loadData', { ...data, maxSeqLen: num('seq', 'seq'), pack: false });
  const pairs = summary.pairs != null ? ` (${summary.pairs} preference pairs)` : '';
  log(`data: ${summary.records} records → ${summary.sequences} sequences${pairs}, ${summary.skipped} skipped, ${summary.trained_tokens} trained tokens`);
  showPreview(summary.preview);
  showPrompts(summary.prompts);
  return summary;
}

// The method has to fit the data: said here in the page's words (the library's errors
// name the command line's flag).
function checkMethod(summary, m) {
  if (summary.pairs != null && m !== 'dpo') throw new Error('the data holds preference pairs (chosen + rejected): choose the training method DPO');
  if (summary.pairs == null && m === 'dpo') throw new Error('DPO trains on preference pairs ({"prompt", "chosen", "rejected"}, or {"chosen", "rejected"} conversations) and this data holds none: choose SFT, or preference data');
}

// The records as the model sees them, trained tokens highlighted, and the summary.
function showPreview(p) {
  $('inspect').hidden = false;
  const recs = $('records');
  recs.replaceChildren();
  const counts = (r) => `${r.tokens} tokens, ${r.trained} trained${r.truncated ? `, ${r.truncated} cut` : ''}`;
  const sequence = (runs) => {
    const pre = document.createElement('pre');
    for (const [text, trained] of runs) {
      const span = document.createElement(trained ? 'mark' : 'span');
      span.textContent = text;
      pre.appendChild(span);
    }
    return pre;
  };
  for (const r of p.records) {
    const h = document.createElement('div');
    h.className = 'muted';
    if (!r.pair) {
      h.textContent = `${r.place} · ${r.format} · ${counts(r)}`;
      recs.append(h, sequence(r.runs));
      continue;
    }
    // A preference pair: its chosen and its rejected sequence in two columns.
    h.textContent = `${r.place} · ${r.format} · a preference pair`;
    const cols = document.createElement('div');
    cols.className = 'pair';
    for (const side of r.pair) {
      const col = document.createElement('div');
      col.dataset.side = side.side;
      const label = Object.assign(document.createElement('div'), { className: `muted side-${side.side}`, textContent: `${side.side} · ${counts(side)}` });
      col.append(label, sequence(side.runs));
      cols.appendChild(col);
    }
    recs.append(h, cols);
  }
  const s = p.summary;
  const l = s.lengths;
  const items = [
    `records: ${s.records} (${Object.entries(s.formats).map(([k, v]) => `${k} ${v}`).join(', ')})`,
    `skipped (nothing to train): ${s.skipped_nothing_trained}`,
    `tokens per record: min ${l.min}, median ${l.median}, p95 ${l.p95}, max ${l.max}`,
    `truncated: ${s.truncated} records, ${s.truncated_tokens} tokens cut at ${s.max_seq_len}`,
    `trained: ${s.trained_tokens} of ${s.tokens} tokens (${(100 * s.trained_fraction).toFixed(1)}%)`,
    `duplicates: ${s.exact_duplicates.length} exact, ${s.near_duplicates.length} near-exact groups`,
    `tokens per epoch: ${s.tokens_per_epoch}`,
  ];
  if (s.packing_efficiency != null) items.push(`packing: ${s.sequences} sequences, ${(100 * s.packing_efficiency).toFixed(1)}% real tokens`);
  const ul = $('summary');
  ul.replaceChildren();
  for (const t of items) ul.appendChild(Object.assign(document.createElement('li'), { textContent: t }));
  for (const w of s.warnings) ul.appendChild(Object.assign(document.createElement('li'), { textContent: `warning: ${w}`, className: 'warn' }));
}

async function train() {
  try {
    // Continuing keeps the session's model and its adapter: only the data is read.
    const continued = $('continueAdapter').checked && !$('continueAdapter').disabled;
    let model = null;
    if (!continued) {
      const source = params.get('model') || radio('model');
      model = source === 'demo' ? { source: 'demo' } : source === 'files' ? { source: 'files', files: modelFiles() }
        : source === 'smollm2' ? { source: params.get('real') || REAL_MODEL, task: 'tools' } : { source: source === 'hub' ? $('hub').value : source };
      setModelSource(model.task ? 'smollm2' : model.source);
    }
    const data = await dataSource();
    const summary = await prepare(model, data);
    // The options are read once the worker has answered: its presets fill them (a
    // click right after the page opens comes before they arrive).
    let options = runOptions();
    if (continued) {
      options = { ...options, ...Object.fromEntries(LORA_KEYS.map((k) => [k, lastOptions[k]])) };
      log(`continuing from the adapter just trained (LoRA rank ${options.lora_rank}, alpha ${options.lora_alpha}, dropout ${options.lora_dropout})`);
    }
    checkMethod(summary, options.method);
    resetCharts();
    await showEstimate(options, continued);
    prefRun = options.method === 'dpo' ? await beforeDpo(summary.prompts, continued) : null;
    if (!prefRun) $('prefBox').hidden = true;
    const what = { options, data: { source: data.source } };
    const { total } = continued ? await call('startContinued', what) : await call('start', { ...what, model: model.source === 'files' ? null : model });
    lastOptions = options;
    log(`training ${total} steps`);
    started = performance.now();
    await runToEnd(prefRun);
  } catch (err) {
    fail(err);
  }
}

// The worker's loop until the run is done or paused; a DPO run then answers its
// prompts again.
async function runToEnd(pref) {
  // Test hooks: an out-of-memory, or a lost device, injected before step N.
  const hook = (name) => (params.get(name) ? Number(params.get(name)) : null);
  const { done } = await call('run', { testHooks: { oomAt: hook('test-oom-at'), loseAt: hook('test-lose-device-at') } });
  if (done && pref) await afterDpo(pref);
}

async function resumeSaved(saved) {
  try {
    if (!saved.model) throw new Error('this run used files from disk; choose them again and train');
    const data = ['demo', 'demo-dpo', 'tools'].includes(saved.data.source) ? { source: saved.data.source } : { source: 'saved', text: await call('savedData'), name: 'saved data' };
    setModelSource(saved.model.task ? 'smollm2' : saved.model.source);
    const summary = await prepare(saved.model, data);
    resetCharts();
    // A continued run's answers before come from the adapter it started from, which its
    // checkpoint holds (null, unknown, from an older checkpoint that does not).
    prefRun = saved.options.method === 'dpo' ? { prompts: (summary.prompts || []).slice(0, PREF_PROMPTS), before: saved.continued ? null : undefined } : null;
    if (prefRun) showPrefAnswers(prefRun, null);
    // Steps set above the saved run's total continue it past its end (the learning-rate
    // schedule then spans the new total, as transformers' Trainer does).
    // (The field as the person set it, or ?steps=: a preset's value does not count.)
    const more = Number(params.get('steps') ?? ($('steps').dataset.edited ? $('steps').value : 0));
    const options = more > (saved.total || 0) ? { ...saved.options, steps: more } : saved.options;
    await call('start', { options, model: saved.model, data: saved.data, continued: saved.continued });
    lastOptions = options;
    const { step, note } = await call('resumeSaved');
    log(note);
    if (prefRun && saved.continued && prefRun.prompts.length) {
      prefRun.before = await call('answers', { prompts: prefRun.prompts.map((p) => p.prompt), maxNew: ANSWER_TOKENS, start: true });
      showPrefAnswers(prefRun, null);
    }
    $('status').dataset.step = step;
    $('status').dataset.resumedFrom = step;
    started = performance.now();
    await runToEnd(prefRun);
  } catch (err) {
    fail(err);
  }
}

// Browsers do not say how much GPU memory a tab may use; past this, warn.
const WARN_MIB = 4096;
// A continued DPO run keeps the adapter it starts from as its reference: counted too.
async function showEstimate(options, continued) {
  const m = await call('memory', { options, continued });
  const e = $('estimate');
  e.dataset.trainingState = m.training_state;
  e.textContent = `Estimated GPU memory for a step: ${m.total.toFixed(0)} MiB (weights ${m.weights.toFixed(0)}, training state ${m.training_state.toFixed(0)}, activations ${m.activations.toFixed(0)})`;
  e.className = m.total > WARN_MIB ? 'error' : 'muted';
  if (m.total > WARN_MIB) e.textContent += ` — more than browsers usually give a tab (${WARN_MIB} MiB): this model may not fit. Try 4-bit frozen weights (QLoRA), a smaller batch or sequence length, LoRA instead of full tuning, or the native webtune.`;
}

function fail(err) {
  setStatus('error', `error: ${err.message}`);
  $('status').dataset.error = err.message;
  log(`error: ${err.message}`);
}

function download(name, data, type) {
  const a = document.createElement('a');
  a.href = URL.createObjectURL(new Blob([data], { type }));
  a.download = name;
  document.body.appendChild(a);
  a.click();
  a.remove();
}

$('train').onclick = train;
// Choosing files from disk picks that model source.
for (const id of ['modelfiles', 'gguffile']) $(id).addEventListener('change', () => { document.querySelector('input[name=model][value=files]').checked = true; });
$('pause').onclick = () => call('pause');
$('continue').onclick = async () => { try { await runToEnd(prefRun); } catch (e) { fail(e); } };
// What the run hands back (the library's `Export`): the adapter or the merged model,
// as safetensors or GGUF.
$('download').onclick = async () => {
  try {
    const { files } = await call('files', { what: $('exportWhat').value });
    for (const [name, bytes] of files) download(name, bytes, 'application/octet-stream');
  } catch (e) {
    fail(e);
  }
};
// ---- DPO: the data's prompts answered before and after -------------------------------
// The first prompts of the pairs (their last user turn), answered greedily as the run
// starts and as it ends, next to the chosen and the rejected answer.
const PREF_PROMPTS = 4;
const ANSWER_TOKENS = 48;
let prefRun = null; // the DPO run's {prompts, before}; before: answers, undefined (the base's, asked at the end) or null (unknown)

const answers = (prompts, adapter) => call('answers', { prompts: prompts.map((p) => p.prompt), maxNew: ANSWER_TOKENS, adapter });

async function beforeDpo(prompts, continued) {
  const pref = { prompts: (prompts || []).slice(0, PREF_PROMPTS), before: undefined };
  // A fresh adapter starts as the base (LoRA's B is zero), so the base's answers, asked
  // at the end, are those before; a continued run starts from the adapter it continues.
  if (continued && pref.prompts.length) pref.before = await answers(pref.prompts, true);
  showPrefAnswers(pref, null);
  return pref;
}

async function afterDpo(pref) {
  if (!pref.prompts.length) return;
  if (pref.before === undefined) pref.before = await answers(pref.prompts, false);
  showPrefAnswers(pref, await answers(pref.prompts, true));
}

function showPrefAnswers(pref, after) {
  $('prefBox').hidden = !pref.prompts.length;
  const table = $('prefAnswers');
  table.replaceChildren();
  for (const k of ['before', 'after', 'chosenBefore', 'chosenAfter']) delete table.dataset[k];
  const row = (cells, tag) => {
    const tr = document.createElement('tr');
    for (const c of cells) tr.appendChild(Object.assign(document.createElement(tag), { textContent: c }));
    table.appendChild(tr);
  };
  const same = (a, b) => a.trim() === b.trim();
  // ✓ the chosen answer, ✗ the rejected one, · neither.
  const mark = (a, p) => (a == null ? '' : `${same(a, p.chosen) ? '✓' : same(a, p.rejected) ? '✗' : '·'} ${a.trim() || '(no text)'}`);
  row(['prompt', 'chosen', 'rejected', 'before', 'after'], 'th');
  pref.prompts.forEach((p, i) => row([p.prompt, p.chosen, p.rejected, pref.before ? mark(pref.before[i], p) : pref.before === null ? '(not kept across a reload)' : '…', after ? mark(after[i], p) : '…'], 'td'));
  const chosen = (a) => pref.prompts.filter((p, i) => same(a[i], p.chosen)).length;
  if (!after) {
    $('prefScore').textContent = 'answered again when the run is done';
    return;
  }
  table.dataset.after = JSON.stringify(after);
  table.dataset.chosenAfter = chosen(after);
  let score = `the chosen answer, word for word: ${chosen(after)} of ${pref.prompts.length} after`;
  if (pref.before) {
    table.dataset.before = JSON.stringify(pref.before);
    table.dataset.chosenBefore = chosen(pref.before);
    score += `, ${chosen(pref.before)} before`;
  }
  $('prefScore').textContent = score;
}

// The preference data's prompts, to ask both models.
function showPrompts(prompts) {
  const list = prompts || [];
  $('promptPick').replaceChildren(new Option('choose…', ''), ...list.map((p) => new Option(p.prompt, p.prompt)));
  $('promptPickBox').hidden = !list.length;
  if (list.length) $('prompt').value = list[0].prompt;
}
$('promptPick').onchange = () => { if ($('promptPick').value) $('prompt').value = $('promptPick').value; };

// A demo's held-out test, shown when the demo model is loaded (its tasks) or the real
// model (its tool calls).
const heldOutTask = () => ({ demo: 'demo', smollm2: 'tools' })[modelSource];
function setModelSource(source) {
  modelSource = source;
  $('demoTestBox').hidden = !heldOutTask();
  for (const p of $('demoTestBox').querySelectorAll('p[data-task]')) p.hidden = p.dataset.task !== heldOutTask();
}
$('demoTest').onclick = async () => {
  const score = $('demoScore');
  score.textContent = 'answering…';
  $('demoTest').disabled = true;
  try {
    const { base, tuned } = await call('demoTest', { task: heldOutTask(), n: Number(params.get('heldout') || 16) });
    const pct = (a) => `${(100 * a).toFixed(0)}%`;
    score.textContent = `exact answers: base ${pct(base.accuracy)}, fine-tuned ${pct(tuned.accuracy)}`;
    Object.assign(score.dataset, { base: base.accuracy, tuned: tuned.accuracy });
    // After a DPO run: the DPO stage's held-out measures, as `webtune` reports them.
    const d = $('demoDpo');
    d.textContent = '';
    delete d.dataset.base;
    delete d.dataset.tuned;
    if (base.dpo && tuned.dpo) {
      const m = (x) => `brief ask ${pct(x.prefers_brief)}, plain ${pct(x.prefers_plain)}`;
      d.textContent = `DPO, held out: pairs whose chosen answer the model finds likelier — base ${m(base.dpo)}; fine-tuned ${m(tuned.dpo)}. Greedy answers — brief requests answered with a bare result: base ${pct(base.dpo.bare_form)}, fine-tuned ${pct(tuned.dpo.bare_form)} (the right one: ${pct(base.dpo.bare)}, ${pct(tuned.dpo.bare)}); plain requests answered with the sentence: base ${pct(base.dpo.sentence_form)}, fine-tuned ${pct(tuned.dpo.sentence_form)}; garbled: base ${pct(base.dpo.garbled)}, fine-tuned ${pct(tuned.dpo.garbled)}.`;
      d.dataset.base = JSON.stringify(base.dpo);
      d.dataset.tuned = JSON.stringify(tuned.dpo);
    }
    const table = $('demoAnswers');
    table.replaceChildren();
    const row = (cells, tag) => {
      const tr = document.createElement('tr');
      for (const c of cells) tr.appendChild(Object.assign(document.createElement(tag), { textContent: c }));
      table.appendChild(tr);
    };
    row(['request', 'expected', 'base', 'fine-tuned'], 'th');
    base.answers.forEach((b, i) => {
      const t = tuned.answers[i];
      const mark = (a) => `${a.right ? '✓' : '✗'} ${a.answer.trim()}`;
      row([b.question, b.expected, mark(b), mark(t)], 'td');
    });
  } catch (e) {
    fail(e);
  } finally {
    $('demoTest').disabled = false;
  }
};
$('ask').onclick = async () => {
  $('base').textContent = $('tuned').textContent = '…';
  try {
    const r = await call('generate', { prompt: $('prompt').value, maxNew: 48 });
    const show = (t) => t || '(no text: the model ended its answer at once)';
    $('base').textContent = show(r.base);
    $('tuned').textContent = show(r.tuned);
  } catch (e) {
    fail(e);
  }
};

// ---- teaching views --------------------------------------------------------------------
function drawBars(c, values, label) {
  const g = c.getContext('2d');
  g.clearRect(0, 0, c.width, c.height);
  if (!values.length) return;
  const max = Math.max(...values) || 1;
  const w = (c.width - 10) / values.length;
  g.fillStyle = '#2b6cb0';
  values.forEach((v, i) => {
    const h = (v / max) * (c.height - 20);
    g.fillRect(5 + i * w, c.height - 5 - h, Math.max(1, w - 2), h);
  });
  g.fillStyle = '#5b6470';
  g.fillText(`max ${label(max)}`, 5, 12);
}

// GPU time per kernel of one profiled step: a horizontal bar per kernel entry point.
function onKernels(step, kernels) {
  const c = $('kernels');
  c.dataset.kernels = JSON.stringify(kernels);
  c.dataset.step = step;
  const total = kernels.reduce((a, k) => a + k.ms, 0);
  $('kernelTotal').textContent = `step ${step}: ${total.toFixed(1)} ms of GPU time in ${kernels.reduce((a, k) => a + k.calls, 0)} dispatches`;
  const shown = kernels.slice(0, 12);
  const g = c.getContext('2d');
  const row = 18;
  c.height = 10 + row * shown.length;
  g.clearRect(0, 0, c.width, c.height);
  const max = Math.max(...shown.map((k) => k.ms), 1e-9);
  g.font = '11px sans-serif';
  shown.forEach((k, i) => {
    const y = 5 + i * row;
    g.fillStyle = '#2b6cb0';
    g.fillRect(200, y + 2, ((c.width - 320) * k.ms) / max, row - 6);
    g.fillStyle = '#1a202c';
    g.fillText(k.kernel, 0, y + 12);
    g.fillText(`${k.ms.toFixed(2)} ms · ${k.calls}×`, 205 + ((c.width - 320) * k.ms) / max, y + 12);
  });
}

$('showLosses').onclick = async () => {
  try {
    const toks = await call('tokenLosses', { index: 0 });
    const pre = $('tokenLosses');
    pre.replaceChildren();
    for (const [text, loss] of toks) {
      const span = document.createElement('span');
      span.textContent = text;
      if (loss === null) {
        span.className = 'masked';
        span.title = 'masked: not trained';
      } else {
        const t = Math.min(1, loss / 5);
        span.style.background = `rgb(${Math.round(90 + 165 * t)}, ${Math.round(220 - 150 * t)}, 120)`;
        span.title = `loss ${loss.toFixed(3)}`;
        span.className = 'trained';
      }
      pre.appendChild(span);
    }
  } catch (e) {
    fail(e);
  }
};

$('showAttention').onclick = async () => {
  try {
    const r = await call('attention', { prompt: $('prompt').value, layer: Number($('layer').value || 0), head: Number($('head').value || 0) });
    for (const [sel, n] of [[$('layer'), r.layers], [$('head'), r.heads]]) {
      if (sel.options.length !== n) {
        const keep = sel.value;
        sel.replaceChildren(...Array.from({ length: n }, (_, i) => new Option(String(i), String(i))));
        if (keep) sel.value = keep;
      }
    }
    const c = $('attention');
    const g = c.getContext('2d');
    const t = r.tokens.length;
    const cell = (c.width - 60) / t;
    g.clearRect(0, 0, c.width, c.height);
    for (let i = 0; i < t; i++) {
      for (let j = 0; j <= i; j++) {
        const w = r.weights[i * t + j];
        g.fillStyle = `rgba(43, 108, 176, ${w})`;
        g.fillRect(60 + j * cell, 60 + i * cell, cell, cell);
      }
    }
    g.fillStyle = '#1d232a';
    g.font = `${Math.max(6, Math.min(11, cell))}px monospace`;
    r.tokens.forEach((tok, i) => {
      const s = JSON.stringify(tok).slice(1, -1).slice(0, 6);
      g.fillText(s, 2, 60 + (i + 0.8) * cell);
    });
    c.dataset.tokens = String(t);
  } catch (e) {
    fail(e);
  }
};

// "What did LoRA change?": a heat map of ‖ΔW‖/‖W‖ (layers × projections) and the
// base's and tuned model's top-5 next tokens along the tuned answer.
$('showChange').onclick = async () => {
  try {
    const { changes, top } = await call('loraChange', { prompt: $('changePrompt').value, k: 5 });
    const projections = [...new Set(changes.map((c) => c.projection))];
    const layers = Math.max(...changes.map((c) => c.layer)) + 1;
    const max = Math.max(...changes.map((c) => c.relative)) || 1;
    const map = $('changeMap');
    map.replaceChildren();
    const head = map.insertRow();
    for (const h of ['layer', ...projections]) head.appendChild(Object.assign(document.createElement('th'), { textContent: h }));
    for (let l = 0; l < layers; l++) {
      const row = map.insertRow();
      row.insertCell().textContent = l;
      for (const p of projections) {
        const c = changes.find((x) => x.layer === l && x.projection === p);
        const cell = row.insertCell();
        if (!c) continue;
        cell.textContent = c.relative.toExponential(1);
        cell.dataset.relative = c.relative;
        cell.title = `layer ${l} ${p}: ‖ΔW‖ ${c.delta.toExponential(3)}, ‖W‖ ${c.weight.toFixed(3)}`;
        cell.style.background = `rgba(43, 108, 176, ${(0.9 * c.relative) / max})`;
        if (c.relative / max > 0.55) cell.style.color = '#fff';
      }
    }
    map.dataset.changes = JSON.stringify(changes);
    const t = $('changeTop');
    t.replaceChildren();
    const th = t.insertRow();
    for (const h of ['answer token', 'base: top 5', 'tuned: top 5']) th.appendChild(Object.assign(document.createElement('th'), { textContent: h }));
    const list = (c) => c.map(([text, p]) => `${JSON.stringify(text)} ${p.toFixed(2)}`).join(', ');
    for (const r of top) {
      const row = t.insertRow();
      row.insertCell().textContent = JSON.stringify(r.text);
      row.insertCell().textContent = list(r.base);
      row.insertCell().textContent = list(r.tuned);
      // The token the model wrote: where it leads the tuned list but not the base's.
      if (r.tuned[0][0] === r.text && r.base[0][0] !== r.text) row.className = 'changed';
    }
    t.dataset.top = JSON.stringify(top);
  } catch (e) {
    fail(e);
  }
};

$('showNorms').onclick = async () => {
  try {
    const norms = await call('gradNorms');
    drawBars($('norms'), norms, (v) => v.toExponential(2));
    $('norms').dataset.norms = JSON.stringify(norms);
  } catch (e) {
    fail(e);
  }
};

// ---- start ---------------------------------------------------------------------------
(async () => {
  if (!navigator.gpu) {
    $('nogpu').hidden = false;
    setStatus('error', 'error: WebGPU is not available in this browser');
    $('status').dataset.error = 'no WebGPU';
    return;
  }
  let info;
  try {
    info = await call('init');
  } catch (err) {
    $('nogpu').hidden = false;
    return fail(err);
  }
  presets = info.presets;
  if (params.get('budget')) $('budget').value = params.get('budget');
  // ?model=smollm2: the real-model preset, with its tool calls unless ?data= says otherwise.
  if (params.get('model') === 'smollm2') {
    document.querySelector('input[name=model][value=smollm2]').checked = true;
    if (!params.get('data')) document.querySelector('input[name=data][value=tools]').checked = true;
  }
  // The demo's preference pairs come with DPO, its tasks with SFT.
  $('method').value = params.get('method') || ((params.get('data') || radio('data')) === 'demo-dpo' ? 'dpo' : 'sft');
  showMethod();
  for (const r of document.querySelectorAll('input[name=model]')) {
    r.onchange = () => {
      // The real model's preset comes with its data.
      if (r.value === 'smollm2') {
        document.querySelector('input[name=data][value=tools]').checked = true;
        $('method').value = 'sft';
        return showMethod();
      }
      showPreset(preset());
    };
  }
  $('method').onchange = showMethod;
  for (const r of document.querySelectorAll('input[name=data]')) {
    r.addEventListener('change', () => {
      if (!['demo', 'demo-dpo', 'tools'].includes(r.value)) return;
      $('method').value = r.value === 'demo-dpo' ? 'dpo' : 'sft';
      showMethod();
    });
  }
  $('adapter').textContent = `GPU: ${info.adapter}`;
  $('kernels').dataset.available = String(info.timestamps);
  if (!info.timestamps) $('kernelTotal').textContent = 'This adapter offers no timestamp-query, so there is no GPU time per kernel: the wall-clock times above are all there is.';
  setStatus('ready', 'ready');
  showStored().catch(() => {});
  if (info.saved && info.saved.step) {
    const b = $('resumeSaved');
    b.hidden = false;
    b.textContent = `Resume saved run (step ${info.saved.step} of ${info.saved.total})`;
    b.title = `Set Steps above ${info.saved.total} first to train past the saved run's end`;
    $('steps').addEventListener('input', () => { $('steps').dataset.edited = '1'; });
    b.onclick = () => resumeSaved(info.saved);
    if (params.get('resume') === '1') return resumeSaved(info.saved);
  }
  if (params.get('autostart') === '1') train();
})();
