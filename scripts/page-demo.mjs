// The demo in the page, end to end, in headless Chromium (SwiftShader): train with the
// page's default (the demo's) options, run the held-out test, open every teaching view,
// and save screenshots. Prints the figures. Needs web/pkg (scripts/build-web.sh) and
// target/release/webtune. Usage: node scripts/page-demo.mjs [screenshot dir]
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const out = process.argv[2] || fs.mkdtempSync(path.join(os.tmpdir(), 'webtune-page-demo-'));
fs.mkdirSync(out, { recursive: true });
const server = spawn(path.join(root, 'target/release/webtune'), ['serve', '--port', '0', '--root', root], { stdio: ['ignore', 'pipe', 'inherit'] });
const base = await new Promise((resolve, reject) => {
  server.stdout.on('data', (d) => {
    const m = /serving (http:\/\/127\.0\.0\.1:\d+\/)/.exec(String(d));
    if (m) resolve(m[1]);
  });
  server.on('exit', (c) => reject(new Error(`webtune serve exited with ${c}`)));
});
const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'webtune-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: '/usr/bin/chromium',
  headless: true,
  viewport: { width: 1100, height: 900 },
  args: ['--headless=new', '--no-sandbox', '--enable-unsafe-webgpu', '--enable-features=Vulkan', '--use-vulkan=swiftshader',
    '--use-webgpu-adapter=swiftshader', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'],
});
try {
  const page = context.pages()[0] || (await context.newPage());
  const t0 = Date.now();
  await page.goto(`${base}?model=demo&data=demo&autostart=1`);
  await page.waitForFunction(() => ['done', 'error'].includes(document.querySelector('#status').dataset.state), null, { timeout: 3_600_000 });
  const st = await page.evaluate(() => ({ ...document.querySelector('#status').dataset }));
  if (st.state === 'error') throw new Error(`the page failed: ${st.error}`);
  console.log(`trained ${st.step} steps in ${((Date.now() - t0) / 1000).toFixed(0)} s: ${await page.textContent('#stats')}`);
  await page.click('#demoTest');
  await page.waitForFunction(() => document.querySelector('#demoScore').dataset.tuned != null, null, { timeout: 1_800_000 });
  console.log(`held-out test (16 requests): ${await page.textContent('#demoScore')}`);
  for (const id of ['#ask', '#showLosses', '#showAttention', '#showNorms']) await page.click(id);
  await page.waitForFunction(() => document.querySelector('#tuned').textContent.length > 1, null, { timeout: 300_000 });
  await page.waitForTimeout(10_000);
  await page.screenshot({ path: path.join(out, 'page.png'), fullPage: true });
  for (const id of ['try', 'inside', 'progress']) await page.locator(`#${id}`).screenshot({ path: path.join(out, `${id}.png`) });
  console.log(`screenshots in ${out}`);
} finally {
  await context.close();
  server.kill();
  fs.rmSync(profile, { recursive: true, force: true });
}
