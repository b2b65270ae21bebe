//! What a checkpoint holds and how it is read back: the trained tensors (PEFT names
//! or the Hugging Face names), the AdamW moments and the trainer state needed to
//! resume exactly. `export` makes the files; `write_atomic` writes one.

use std::path::Path;

use super::Options;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::model::weights::{self, HostTensor, TensorMap};
use crate::model::{Model, Param, Tuning};

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainerState {
    pub step: u64,
    pub total_steps: u64,
    pub options: Options,
    pub base_model: String,
    /// "lora" or "full".
    pub tuning: String,
    /// DPO with full tuning: the reference log-probabilities of each pair (chosen,
    /// rejected), taken before the first step; a resumed run keeps them. (LoRA runs
    /// take them as steps first use the pairs, and a resume takes them again.)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reference: Vec<[f32; 2]>,
    /// DPO: the same for the validation pairs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub valid_reference: Vec<[f32; 2]>,
    /// DPO with LoRA from a trained adapter: the checkpoint holds that adapter
    /// (`reference_adapter.safetensors`), the reference a resume computes from.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reference_adapter: bool,
}

/// Write `bytes` to `path` through a temporary file and a rename (`replace`).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    replace(path, |tmp| std::fs::write(tmp, bytes))
}

/// Make `path` by `make`-ing a file beside it and renaming that over it, so a reader
/// sees the old file or the new one, never none or half of one. Each call makes its own
/// temporary (process id and a counter), so writers in several processes or threads
/// (a shared Hub cache) never write into one another's.
pub fn replace(path: &Path, make: impl FnOnce(&Path) -> std::io::Result<()>) -> Result<()> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path.file_name().and_then(|f| f.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    make(&tmp).and_then(|_| std::fs::rename(&tmp, path)).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

async fn host(gpu: &Gpu, t: &Tensor, shape: &[usize]) -> Result<HostTensor> {
    Ok(HostTensor { shape: shape.to_vec(), data: gpu.read::<f32>(t).await? })
}

/// The trained weights as the output format wants them: PEFT names for LoRA, the
/// Hugging Face names (row-parts joined) for full tuning.
pub async fn trained_tensors(gpu: &Gpu, model: &Model) -> Result<TensorMap> {
    let mut out = TensorMap::new();
    match model.tuning {
        Tuning::Full => {
            for (name, parts) in model.weights_by_name() {
                let mut data = Vec::new();
                for p in &parts {
                    data.extend(gpu.read::<f32>(&p.value).await?);
                }
                let mut shape = parts[0].shape.clone();
                shape[0] = parts.iter().map(|p| p.shape[0]).sum();
                out.insert(name, HostTensor { shape, data });
            }
        }
        _ => {
            for p in model.params() {
                out.insert(p.name.clone(), host(gpu, &p.value, &p.shape).await?);
            }
        }
    }
    Ok(out)
}

/// Load a checkpoint (`export::Export::Checkpoint`'s files, read by `get`) into
/// `model` (values and moments) and return its state; `place` names it in errors.
pub fn load_files(get: &dyn Fn(&str) -> Result<Vec<u8>>, place: &str, gpu: &Gpu, model: &Model) -> Result<TrainerState> {
    let state: TrainerState =
        serde_json::from_slice(&get("trainer_state.json")?).map_err(|e| Error::Config(format!("{place}/trainer_state.json: {e}")))?;
    let mut values = TensorMap::new();
    let file = if model.tuning == Tuning::Full { "model.safetensors" } else { "adapter_model.safetensors" };
    weights::parse(&get(file)?, &format!("{place}/{file}"), &mut values)?;
    let mut moments = TensorMap::new();
    weights::parse(&get("optimizer.safetensors")?, &format!("{place}/optimizer.safetensors"), &mut moments)?;
    let missing = |n: &str| Error::Weights(format!("{place}: `{n}` is missing"));
    if model.tuning == Tuning::Full {
        for (name, parts) in model.weights_by_name() {
            let t = values.get(&name).ok_or_else(|| missing(&name))?;
            let cols: usize = parts[0].shape[1..].iter().product();
            let mut r0 = 0;
            for p in parts {
                let rows = p.shape[0];
                gpu.write(&p.value, &t.data[r0 * cols..(r0 + rows) * cols])?;
                r0 += rows;
            }
        }
    } else {
        model.set_params(gpu, &values)?;
    }
    write_state(gpu, model, &moments, false, place)?;
    Ok(state)
}

/// Load a checkpoint directory (`out/checkpoint-N`) into `model`.
#[cfg(not(target_arch = "wasm32"))]
pub fn load_checkpoint(dir: &Path, gpu: &Gpu, model: &Model) -> Result<TrainerState> {
    let get = |f: &str| -> Result<Vec<u8>> { std::fs::read(dir.join(f)).map_err(|e| Error::io(&dir.join(f), e)) };
    load_files(&get, &dir.display().to_string(), gpu, model)
}

/// The tensors of each trainable param a resume needs, by suffix: its AdamW moments
/// (`exp_avg`, `exp_avg_sq`), and its value (`value`) when `with_value`.
fn state_tensors(p: &Param, with_value: bool) -> Vec<(&'static str, &Tensor)> {
    let t = p.train.as_ref().expect("params() are trainable");
    let mut out = vec![("exp_avg", &t.m), ("exp_avg_sq", &t.v)];
    if with_value {
        out.insert(0, ("value", &p.value));
    }
    out
}

/// Read the training state of every trainable param as `{name}.{suffix}` tensors.
pub async fn read_state(gpu: &Gpu, model: &Model, with_value: bool) -> Result<TensorMap> {
    let mut out = TensorMap::new();
    for p in model.params() {
        for (suffix, t) in state_tensors(p, with_value) {
            out.insert(format!("{}.{suffix}", p.name), host(gpu, t, &p.shape).await?);
        }
    }
    Ok(out)
}

/// Write back what `read_state` read; every tensor must be there (`source` names the
/// checkpoint in errors).
pub fn write_state(gpu: &Gpu, model: &Model, state: &TensorMap, with_value: bool, source: &str) -> Result<()> {
    for p in model.params() {
        for (suffix, t) in state_tensors(p, with_value) {
            let key = format!("{}.{suffix}", p.name);
            let src = state.get(&key).ok_or_else(|| Error::Weights(format!("{source}: `{key}` is missing")))?;
            gpu.write(t, &src.data)?;
        }
    }
    Ok(())
}
