//! "What did LoRA change?": per layer and projection, the size of the adapter's update
//! ‖ΔW‖ = ‖s·B·A‖ (Frobenius) against the base's ‖W‖, and, for a prompt and an
//! answer, the next-token top-k of the base and of the tuned model side by side.
//! Both come from the adapter on the GPU; no merged copy of a weight is made.

use serde::Serialize;

use super::{Model, Tensors};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu};
use crate::kernels::{self as k, Matmul};

/// One LoRA pair's update against its base weight.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProjectionChange {
    pub layer: usize,
    /// `q_proj`, `k_proj`, … `down_proj`.
    pub projection: String,
    /// ‖s·B·A‖_F
    pub delta: f32,
    /// ‖W‖_F of the base weight.
    pub weight: f32,
    /// delta / weight
    pub relative: f32,
}

/// ‖s·B·A‖_F of every LoRA pair of `model`, and ‖W‖_F of its base weight (read from
/// `base`, the weights the model was loaded from, a block of rows at a time).
///
/// On the GPU, without forming the `[dout, din]` update: ‖B·A‖²_F = tr(Aᵀ·Bᵀ·B·A) =
/// Σᵢⱼ (BᵀB)ᵢⱼ (A·Aᵀ)ᵢⱼ, two r×r products and their dot product (a third product,
/// 1×1 over r² values), per pair; one read-back for all of them.
pub async fn lora_change(gpu: &Gpu, model: &Model, base: &dyn Tensors) -> Result<Vec<ProjectionChange>> {
    let pairs: Vec<_> = model
        .layers
        .iter()
        .enumerate()
        .flat_map(|(li, layer)| layer.linears.iter().filter_map(move |lin| lin.lora.as_ref().map(|l| (li, lin, l))))
        .collect();
    if pairs.is_empty() {
        return Err(Error::Options("the model has no LoRA adapter: nothing changed to show".into()));
    }
    let squares = gpu.zeros("‖BA‖²", DType::F32, &[pairs.len()])?;
    let mut rec = gpu.recorder("lora change");
    for (i, (_, lin, l)) in pairs.iter().enumerate() {
        let r = l.r;
        let gb = gpu.temp(&mut rec, "BᵀB", DType::F32, &[r, r])?;
        let ga = gpu.temp(&mut rec, "AAᵀ", DType::F32, &[r, r])?;
        // BᵀB: B [dout, r]; A·Aᵀ: A [r, din].
        k::matmul(gpu, &mut rec, &Matmul::new(r, r, lin.dout).trans_a(), &l.b.value, &l.b.value, &gb)?;
        k::matmul(gpu, &mut rec, &Matmul::new(r, r, lin.din).trans_b(), &l.a.value, &l.a.value, &ga)?;
        // Σ (BᵀB) ∘ (AAᵀ): [1, r²] · [r², 1] into slot i.
        let mut dot = Matmul::new(1, 1, r * r);
        (dot.ldb, dot.c_off) = (1, i);
        k::matmul(gpu, &mut rec, &dot, &gb, &ga, &squares)?;
    }
    gpu.submit(rec);
    let sq = gpu.read::<f32>(&squares).await?;
    let mut out = Vec::with_capacity(pairs.len());
    for ((li, lin, l), s2) in pairs.iter().zip(sq) {
        let name = format!("{}.weight", lin.name);
        let weight = frobenius(base, &name, lin.dout)?;
        let delta = l.scale.abs() * s2.max(0.0).sqrt();
        let projection = lin.name.rsplit('.').next().unwrap_or(&lin.name).to_string();
        out.push(ProjectionChange { layer: *li, projection, delta, weight, relative: if weight > 0.0 { delta / weight } else { 0.0 } });
    }
    Ok(out)
}

/// ‖W‖_F of `name` (`rows` rows), read 256 rows at a time.
fn frobenius(base: &dyn Tensors, name: &str, rows: usize) -> Result<f32> {
    let mut sum = 0f64;
    for r0 in (0..rows).step_by(256) {
        sum += base.rows(name, r0, (r0 + 256).min(rows))?.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>();
    }
    Ok(sum.sqrt() as f32)
}

/// The next-token candidates at one position of an answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Candidates {
    /// The position in the sequence (prompt and answer) whose next token this is.
    pub position: usize,
    /// The answer's token there.
    pub token: u32,
    /// The base's (adapter off) and the tuned model's top-k: (token, probability).
    pub base: Vec<(u32, f32)>,
    pub tuned: Vec<(u32, f32)>,
}

/// For each token of `ids[from..]` (an answer after its prompt), the top `k` next
/// tokens the base and the tuned model give at the position before it, with their
/// probabilities: two passes of the whole sequence through a KV cache (in pieces where
/// it is long), the adapter off, then on (it is on again afterwards).
pub async fn next_token_top(gpu: &Gpu, model: &mut Model, ids: &[u32], from: usize, k: usize) -> Result<Vec<Candidates>> {
    if from == 0 || from >= ids.len() {
        return Err(Error::Options(format!("an answer needs a prompt before it and a token after it: it starts at {from} of {} tokens", ids.len())));
    }
    // Through a KV cache, as decoding runs a prompt: a sequence longer than a binding
    // holds runs in pieces, and only the answer's rows of logits are computed and read
    // back (a long prompt's every row would be gigabytes with a 150k vocabulary).
    let n = ids.len();
    let (pos, seg): (Vec<u32>, Vec<u32>) = ((0..n as u32).collect(), vec![0; n]);
    let mut cache = model.kv_cache(gpu, n)?;
    model.adapter_enabled = false;
    let base = model.decode_rows(gpu, &mut cache, ids, &pos, &seg, from - 1..n - 1).await;
    model.adapter_enabled = true;
    let base = base?;
    cache.len = 0;
    let tuned = model.decode_rows(gpu, &mut cache, ids, &pos, &seg, from - 1..n - 1).await?;
    let v = model.cfg.vocab;
    Ok((from..n)
        .map(|i| {
            let row = |l: &[f32]| top_k(&l[(i - from) * v..(i - from + 1) * v], k);
            Candidates { position: i - 1, token: ids[i], base: row(&base), tuned: row(&tuned) }
        })
        .collect())
}

/// `prompt` as a user turn with the chat template, then `answer` (its tokens), or the
/// model's greedy answer of up to 24 tokens where none is given: the ids, and where the
/// answer starts (what `next_token_top` takes).
pub async fn prompt_and_answer(gpu: &Gpu, model: &Model, tok: &crate::data::Tokenizer, prompt: &str, answer: Option<&str>) -> Result<(Vec<u32>, usize)> {
    let mut ids = tok.prompt_ids(prompt, true)?;
    let from = ids.len();
    let given = answer.is_some();
    let answer = match answer {
        Some(a) => tok.encode(a, false)?.0,
        None => model.generate(gpu, &ids, 24, &super::generate::Sampling::default(), |_| {}).await?,
    };
    if answer.is_empty() {
        let why = if given { "the answer given has no tokens" } else { "the model ended its answer at once: there is no answer to follow" };
        return Err(Error::Options(why.into()));
    }
    ids.extend(answer);
    Ok((ids, from))
}

/// The `k` most probable tokens of one row of logits, with their softmax probabilities.
pub fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    idx.select_nth_unstable_by(k.saturating_sub(1), |&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    idx.truncate(k);
    idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    idx.into_iter().map(|i| (i, (((logits[i as usize] - max) as f64).exp() / z) as f32)).collect()
}
