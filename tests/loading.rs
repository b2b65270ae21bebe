//! Weights in other layouts and dtypes than the fixtures: sharded checkpoints, f16 and
//! bf16 files; and the sampler.

mod common;

use std::path::PathBuf;

use webtune::check::Rng;
use webtune::model::generate::{sample, Sampling};
use webtune::model::weights::{self, TensorMap};

fn fixture_weights() -> TensorMap {
    weights::read_dir(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/model")).unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    common::fresh_dir(&format!("test-{name}"))
}

#[test]
fn sharded_checkpoints_load_like_one_file() {
    let all = fixture_weights();
    let dir = temp_dir("shards");
    let (mut a, mut b) = (TensorMap::new(), TensorMap::new());
    let mut map = serde_json::Map::new();
    for (i, (k, t)) in all.iter().enumerate() {
        let (shard, file) = if i % 2 == 0 { (&mut a, "model-00001-of-00002.safetensors") } else { (&mut b, "model-00002-of-00002.safetensors") };
        shard.insert(k.clone(), t.clone());
        map.insert(k.clone(), file.into());
    }
    std::fs::write(dir.join("model-00001-of-00002.safetensors"), weights::serialize(&a, None).unwrap()).unwrap();
    std::fs::write(dir.join("model-00002-of-00002.safetensors"), weights::serialize(&b, None).unwrap()).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let loaded = weights::read_dir(&dir).unwrap();
    assert_eq!(loaded.len(), all.len());
    for (k, t) in &all {
        assert_eq!(loaded[k].data, t.data, "{k}");
        assert_eq!(loaded[k].shape, t.shape, "{k}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn f16_and_bf16_files_are_widened_to_f32() {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let vals = [1.0f32, -2.5, 0.333_333_34, 65504.0, 1e-3];
    let f16: Vec<u8> = vals.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect();
    let bf16: Vec<u8> = vals.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect();
    let views = vec![
        ("a".to_string(), TensorView::new(Dtype::F16, vec![5], &f16).unwrap()),
        ("b".to_string(), TensorView::new(Dtype::BF16, vec![5], &bf16).unwrap()),
    ];
    let bytes = safetensors::serialize(views, None).unwrap();
    let mut out = TensorMap::new();
    weights::parse(&bytes, "mixed.safetensors", &mut out).unwrap();
    let want_f16: Vec<f32> = vals.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect();
    let want_bf16: Vec<f32> = vals.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
    assert_eq!(out["a"].data, want_f16);
    assert_eq!(out["b"].data, want_bf16);
    assert!((out["b"].data[2] - 0.333_333_34).abs() < 2e-3);

    let i8s = [1u8, 2, 3];
    let bad = safetensors::serialize(vec![("c".to_string(), TensorView::new(Dtype::I8, vec![3], &i8s).unwrap())], None).unwrap();
    let err = weights::parse(&bad, "bad.safetensors", &mut out).unwrap_err().to_string();
    assert!(err.contains("bad.safetensors") && err.contains("`c`") && err.contains("I8"), "{err}");
}

#[test]
fn a_missing_checkpoint_says_what_was_looked_for() {
    let dir = temp_dir("empty");
    let err = weights::read_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("model.safetensors") && err.contains(&dir.display().to_string()), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sampling_follows_temperature_top_k_and_top_p() {
    let logits = [2.0f32, 1.0, 0.5, -1.0, 3.0];
    let mut rng = Rng::new(1);
    assert_eq!(sample(&logits, &Sampling::default(), &mut rng), 4, "greedy takes the argmax");
    // Temperature 1, no cut: frequencies follow softmax(logits).
    let s = Sampling { temperature: 1.0, ..Sampling::default() };
    let n = 40_000;
    let mut counts = [0usize; 5];
    for _ in 0..n {
        counts[sample(&logits, &s, &mut rng) as usize] += 1;
    }
    let z: f32 = logits.iter().map(|l| l.exp()).sum();
    for (i, &c) in counts.iter().enumerate() {
        let p = logits[i].exp() / z;
        assert!((c as f32 / n as f32 - p).abs() < 0.01, "token {i}: {} vs {p}", c as f32 / n as f32);
    }
    // top-k = 2 keeps tokens 4 and 0 only.
    let s = Sampling { temperature: 1.0, top_k: 2, ..Sampling::default() };
    assert!((0..2000).all(|_| matches!(sample(&logits, &s, &mut rng), 4 | 0)));
    // top-p = 0.6: softmax gives 0.63 to token 4 alone, so only it survives.
    let s = Sampling { temperature: 1.0, top_p: 0.6, ..Sampling::default() };
    assert!((0..2000).all(|_| sample(&logits, &s, &mut rng) == 4));
    // The same seed gives the same tokens.
    let s = Sampling { temperature: 0.8, top_k: 3, top_p: 0.95, seed: 9 };
    let run = || {
        let mut r = Rng::new(s.seed);
        (0..50).map(|_| sample(&logits, &s, &mut r)).collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
    // Settings no sampler can use are refused by name.
    assert!(s.check().is_ok() && Sampling::default().check().is_ok());
    for (bad, want) in [
        (Sampling { temperature: -1.0, ..Sampling::default() }, "--temperature -1"),
        (Sampling { temperature: f32::NAN, ..Sampling::default() }, "--temperature NaN"),
        (Sampling { top_p: 0.0, ..Sampling::default() }, "--top-p 0"),
        (Sampling { top_p: 1.5, ..Sampling::default() }, "--top-p 1.5"),
    ] {
        let err = bad.check().unwrap_err().to_string();
        assert!(err.starts_with(want), "{want}: {err}");
    }
}

/// One loader for every source: the command line's directory and the page's files go
/// through `model::source::open`, which reads the small files it knows, keeps them for
/// derived models, and names what is missing.
#[test]
fn a_model_source_reads_its_small_files_and_names_what_is_missing() {
    use webtune::model::{source, Checkpoint};
    let ckpt = || Checkpoint::from_bytes(weights::serialize(&fixture_weights(), None).unwrap(), "model.safetensors").unwrap();
    let config = std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/model/config.json")).unwrap();
    let tok = webtune::demo::tokenizer_json().into_bytes();
    let files = vec![
        ("config.json".to_string(), config.clone()),
        ("tokenizer.json".to_string(), tok.clone()),
        ("tokenizer_config.json".to_string(), br#"{"eos_token": "</s>"}"#.to_vec()),
        ("chat_template.jinja".to_string(), b"J:{{ messages[0].content }}".to_vec()),
        ("model.safetensors.index.json".to_string(), b"{}".to_vec()),
    ];
    let s = source::open("mine", files, ckpt()).unwrap();
    assert_eq!(s.cfg.layers, 2);
    assert!(s.tokenizer.template.origin.ends_with("mine/chat_template.jinja"), "{}", s.tokenizer.template.origin);
    let kept: Vec<&str> = s.files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(kept, ["config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]);
    let err = source::open("mine", vec![("tokenizer.json".into(), tok.clone())], ckpt()).err().unwrap().to_string();
    assert!(err.contains("mine: no config.json"), "{err}");
    let err = source::open("mine", vec![("config.json".into(), config)], ckpt()).err().unwrap().to_string();
    assert!(err.contains("mine: no tokenizer.json"), "{err}");
}
