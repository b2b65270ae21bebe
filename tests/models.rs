//! Parity with PyTorch + transformers + PEFT on the committed fixtures
//! (tests/reference/gen_reference.py): logits, loss, every LoRA gradient, five AdamW
//! steps' losses, and greedy generation, for Llama, Qwen2 and Qwen3.

mod common;

use std::path::PathBuf;

use common::*;
use webtune::gpu::Gpu;
use webtune::kernels::AdamW;
use webtune::model::generate::Sampling;
use webtune::model::{weights, Config, Inputs, Model, Shape, TensorMap};

struct Fixture {
    cfg: Config,
    weights: TensorMap,
    adapter: TensorMap,
    lora: webtune::model::LoraConfig,
    expected: TensorMap,
    json: serde_json::Value,
}

fn fixture(name: &str) -> Fixture {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    let text = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    let cfg = Config::parse(&text("model/config.json"), "config.json", Some(&text("model/generation_config.json"))).unwrap();
    let mut adapter = TensorMap::new();
    weights::parse(&std::fs::read(root.join("adapter/adapter_model.safetensors")).unwrap(), "adapter", &mut adapter).unwrap();
    let mut expected = TensorMap::new();
    weights::parse(&std::fs::read(root.join("expected.safetensors")).unwrap(), "expected", &mut expected).unwrap();
    Fixture {
        weights: weights::read_dir(&root.join("model")).unwrap(),
        lora: webtune::peft::parse_config(&text("adapter/adapter_config.json"), "adapter_config.json").unwrap(),
        json: serde_json::from_str(&text("expected.json")).unwrap(),
        cfg,
        adapter,
        expected,
    }
}

fn rows(v: &serde_json::Value) -> Vec<Vec<i64>> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()).collect()
}

/// The batch of the fixture, and HF's shifted targets (label of the next token).
fn batch(g: &Gpu, f: &Fixture) -> (Inputs, Vec<i32>, Vec<i64>) {
    let ids = rows(&f.json["input_ids"]);
    let labels = rows(&f.json["labels"]);
    let mask: Vec<i64> = rows(&f.json["attention_mask"]).concat();
    let (b, t) = (ids.len(), ids[0].len());
    let flat: Vec<u32> = ids.concat().iter().map(|&x| x as u32).collect();
    let targets: Vec<i32> = labels.iter().flat_map(|r| (0..t).map(move |i| if i + 1 < t { r[i + 1] as i32 } else { -100 })).collect();
    (Inputs::sequences(g, Shape { b, t }, &flat).unwrap(), targets, mask)
}

fn model(g: &Gpu, f: &Fixture, lora: bool) -> Model {
    let m = Model::load(g, f.cfg.clone(), &f.weights, lora.then(|| f.lora.clone()), 0).unwrap();
    if lora {
        m.set_params(g, &f.adapter).unwrap();
    }
    m
}

fn scale_of(targets: &[i32]) -> f32 {
    1.0 / targets.iter().filter(|&&t| t >= 0).count() as f32
}

fn parity(name: &str, g: &Gpu) {
    let f = fixture(name);
    let m = model(g, &f, true);
    let (inp, targets, mask) = batch(g, &f);
    let v = f.cfg.vocab;

    // Logits at the real (unpadded) positions.
    let logits = futures::executor::block_on(m.logits(g, &inp)).unwrap();
    let want = &f.expected["logits"].data;
    let keep: Vec<usize> = (0..mask.len()).filter(|&i| mask[i] == 1).flat_map(|i| i * v..(i + 1) * v).collect();
    let (got_k, want_k): (Vec<f32>, Vec<f32>) = keep.iter().map(|&i| (logits[i], want[i])).unzip();
    let mag = want_k.iter().fold(0f32, |a, b| a.max(b.abs()));
    close(&format!("{name} logits"), &got_k, &want_k, 1e-4 * mag, 1e-4);

    // Loss and every LoRA gradient.
    let loss = m.forward_backward(g, &inp, &targets, scale_of(&targets)).unwrap();
    close(&format!("{name} loss"), &read(g, &loss), &f.expected["loss"].data, 0.0, 1e-4);
    let params = m.params();
    assert_eq!(params.len(), 2 * 7 * f.cfg.layers);
    for p in params {
        let key = format!("grad.{}", p.name.replace(".weight", ".default.weight"));
        let want = &f.expected[&key].data;
        let mag = want.iter().fold(0f32, |a, b| a.max(b.abs()));
        close(&format!("{name} {key}"), &read(g, &p.grad), want, 1e-4 * mag, 1e-3);
    }

    // Five AdamW steps from the adapter, clipped at norm 1.0.
    let m = model(g, &f, true);
    let adamw = &f.json["adamw"];
    let opt = AdamW {
        lr: adamw["lr"].as_f64().unwrap() as f32,
        weight_decay: adamw["weight_decay"].as_f64().unwrap() as f32,
        ..AdamW::default()
    };
    let want: Vec<f32> = adamw["losses"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    let mut got = Vec::new();
    for step in 1..=want.len() as u64 {
        m.zero_grads(g);
        let loss = m.forward_backward(g, &inp, &targets, scale_of(&targets)).unwrap();
        m.optimizer_step(g, &opt, step, adamw["max_grad_norm"].as_f64().unwrap() as f32).unwrap();
        got.push(read(g, &loss)[0]);
    }
    close(&format!("{name} AdamW losses"), &got, &want, 0.0, 1e-4);

    // Greedy generation, token for token, with the base model and with the adapter.
    let gen = &f.json["generate"];
    let prompt: Vec<u32> = gen["prompt"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    let max_new = gen["max_new_tokens"].as_u64().unwrap() as usize;
    for (which, lora) in [("base", false), ("lora", true)] {
        let m = model(g, &f, lora);
        let want: Vec<u32> = gen[which].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let got = futures::executor::block_on(m.generate(g, &prompt, max_new, &Sampling::default(), |_| {})).unwrap();
        assert_eq!(got, want, "{name} {which} greedy generation");
    }
}

#[test]
fn llama_matches_pytorch() {
    parity("llama", gpu());
}

#[test]
fn qwen2_matches_pytorch() {
    parity("qwen2", gpu());
}

#[test]
fn qwen3_matches_pytorch() {
    parity("qwen3", gpu());
}

