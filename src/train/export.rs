//! The one export path: what a run hands back as named files (bytes in memory). The
//! command line writes them atomically into a directory (`write_dir`); the page
//! downloads them or keeps them in the Origin Private File System.
//!
//! - `Output`: the PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`),
//!   or with full tuning the whole model (f32, with the base's small files);
//! - `Checkpoint`: the output plus the AdamW moments and `trainer_state.json`, all a
//!   resume needs (`checkpoint::load_files` reads it back);
//! - `Merged`: the base with the adapter merged in, stored in the base's dtype (full
//!   tuning: the trained model); a base quantized on load (QLoRA) is dequantized first,
//!   as PEFT advises, rather than merged into the original weights or re-quantized;
//! - `MergedGguf(type)`: the same as one GGUF file (f32, f16, q8_0, q4_0 or q4_1) that llama.cpp,
//!   Ollama and LM Studio run;
//! - `LoraGguf`: the adapter as a llama.cpp LoRA adapter GGUF (`--lora`).

use super::checkpoint::{read_state, trained_tensors, TrainerState};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::model::gguf::{self, GgmlType};
use crate::model::source::Source;
use crate::model::{weights, LoraConfig, Model, TensorMap, Tuning};

/// Named files, in the order they are written.
pub type Files = Vec<(String, Vec<u8>)>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Export {
    Output,
    Checkpoint,
    Merged,
    MergedGguf(GgmlType),
    LoraGguf,
}

impl std::str::FromStr for Export {
    type Err = String;
    /// `output` (or `adapter`), `checkpoint`, `merged`, `merged-gguf-{f32,f16,q8_0,q4_0,q4_1}`, `lora-gguf`.
    fn from_str(s: &str) -> std::result::Result<Export, String> {
        match s {
            "output" | "adapter" => Ok(Export::Output),
            "checkpoint" => Ok(Export::Checkpoint),
            "merged" => Ok(Export::Merged),
            "lora-gguf" => Ok(Export::LoraGguf),
            _ => match s.strip_prefix("merged-gguf-").map(gguf::export_type) {
                Some(Ok(ty)) => Ok(Export::MergedGguf(ty)),
                Some(Err(e)) => Err(e.to_string()),
                None => Err(format!("unknown export `{s}` (output, checkpoint, merged, merged-gguf-f16, merged-gguf-q8_0, merged-gguf-q4_0, merged-gguf-q4_1, merged-gguf-f32 or lora-gguf)")),
            },
        }
    }
}

/// The model's name for file names and GGUF's `general.name`: the last part of its
/// path or URL, without `.gguf`.
fn stem(source: &Source) -> String {
    let last = source.name.trim_end_matches('/').rsplit(['/', '\\']).next().unwrap_or("model");
    let stem = last.strip_suffix(".gguf").unwrap_or(last);
    if stem.is_empty() { "model".into() } else { stem.to_string() }
}

/// `weights` (the base with an adapter merged in, or a fully tuned model) as the files
/// of a model: safetensors in `dtype` with the base's small files, or with `gguf` one
/// GGUF file of that type, named after the base.
pub fn model_files(source: &Source, weights: &TensorMap, dtype: safetensors::Dtype, gguf: Option<GgmlType>) -> Result<Files> {
    let Some(ty) = gguf else { return crate::peft::model_files(&source.files, weights, dtype) };
    let tokenizer = source.files.iter().find(|(n, _)| n == "tokenizer.json").map(|(_, b)| b.as_slice()).unwrap_or_default();
    let name = stem(source);
    let base = match &source.weights {
        crate::model::source::Weights::Gguf(g) => Some(&g.meta),
        _ => None,
    };
    let bytes = gguf::model_file(&name, &source.cfg, &source.tokenizer, tokenizer, weights, ty, base)?;
    Ok(vec![(format!("{name}-merged.{}.gguf", ty.name()), bytes)])
}

/// A PEFT adapter of `source` as a llama.cpp LoRA adapter GGUF, named after the base.
pub fn lora_gguf(source: &Source, lora: &LoraConfig, adapter: &TensorMap) -> Result<Files> {
    let name = format!("{}-lora", stem(source));
    Ok(vec![(format!("{name}.gguf"), gguf::lora_file(&name, &source.cfg, lora, adapter)?)])
}

/// The files of `what` for `model`, trained from `source`; `state` names the base
/// (`base_model_name_or_path`) and, for a checkpoint, is saved with it.
pub async fn files(gpu: &Gpu, source: &Source, model: &Model, state: &TrainerState, what: Export) -> Result<Files> {
    let trained = trained_tensors(gpu, model).await?;
    let mut out = match (&model.tuning, what) {
        (Tuning::Frozen, _) => return Err(Error::Config("nothing is trained, so there is nothing to save".into())),
        (Tuning::Lora(l), Export::Merged | Export::MergedGguf(_)) => {
            let mut w = weights::to_map(&source.weights)?;
            model.frozen.dequantize_into(&mut w, &source.weights)?;
            crate::peft::merge_into(&mut w, &trained, l, "adapter")?;
            model_files(source, &w, source.weights.weights_dtype(), gguf_type(what))?
        }
        (Tuning::Lora(l), Export::LoraGguf) => lora_gguf(source, l, &trained)?,
        (Tuning::Full, Export::LoraGguf) => return Err(Error::Config("a fully tuned model has no adapter to export as a LoRA GGUF".into())),
        (Tuning::Lora(l), _) => vec![
            ("adapter_config.json".to_string(), crate::peft::config_json(l, &state.base_model).into_bytes()),
            ("adapter_model.safetensors".to_string(), weights::serialize(&trained, None)?),
        ],
        // Trained weights stay f32; config.json says so.
        (Tuning::Full, _) => model_files(source, &trained, safetensors::Dtype::F32, gguf_type(what))?,
    };
    if what == Export::Checkpoint {
        out.push(("optimizer.safetensors".into(), weights::serialize(&read_state(gpu, model, false).await?, None)?));
        out.push(("trainer_state.json".into(), serde_json::to_string_pretty(state).expect("serialisable").into_bytes()));
    }
    Ok(out)
}

/// `files` as one ZIP archive, stored uncompressed (the page's "multi-GPU run" download:
/// one file where a folder would be many). Names keep their `/` folders; each file and
/// the archive stay under 4 GiB (no ZIP64).
pub fn zip(files: &Files) -> Result<Vec<u8>> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
            }
        }
        !crc
    }
    let too_large = || Error::Io("the run's files exceed the 4 GiB a ZIP archive holds without ZIP64: export it with `webtune export-run` instead".into());
    let (mut out, mut central) = (Vec::new(), Vec::new());
    // Version 2.0, UTF-8 names (flag bit 11), stored, 1980-01-01 00:00.
    let common = |crc: u32, size: u32, name: &str| {
        let mut h = Vec::new();
        for v in [20u16, 0x0800, 0, 0, 0x21] {
            h.extend(v.to_le_bytes());
        }
        for v in [crc, size, size] {
            h.extend(v.to_le_bytes());
        }
        h.extend((name.len() as u16).to_le_bytes());
        h.extend(0u16.to_le_bytes());
        h
    };
    for (name, bytes) in files {
        let size = u32::try_from(bytes.len()).map_err(|_| too_large())?;
        let offset = u32::try_from(out.len()).map_err(|_| too_large())?;
        let fields = common(crc32(bytes), size, name);
        out.extend(0x0403_4b50u32.to_le_bytes());
        out.extend(&fields);
        out.extend(name.as_bytes());
        out.extend(bytes);
        central.extend(0x0201_4b50u32.to_le_bytes());
        central.extend(20u16.to_le_bytes());
        central.extend(&fields);
        // Comment length, disk, internal and external attributes, the local header.
        central.extend([0u8; 2 + 2 + 2 + 4]);
        central.extend(offset.to_le_bytes());
        central.extend(name.as_bytes());
    }
    let (start, size) = (u32::try_from(out.len()).map_err(|_| too_large())?, central.len() as u32);
    out.extend(central);
    out.extend(0x0605_4b50u32.to_le_bytes());
    let n = files.len() as u16;
    for v in [0u16, 0, n, n] {
        out.extend(v.to_le_bytes());
    }
    out.extend(size.to_le_bytes());
    out.extend(start.to_le_bytes());
    out.extend(0u16.to_le_bytes());
    Ok(out)
}

fn gguf_type(what: Export) -> Option<GgmlType> {
    match what {
        Export::MergedGguf(ty) => Some(ty),
        _ => None,
    }
}

/// Write `files` into `dir`: into a temporary directory beside it, then renamed over
/// it, so `dir` is either the old files or all the new ones, never half of them.
#[cfg(not(target_arch = "wasm32"))]
pub fn write_dir(dir: &std::path::Path, files: &Files) -> Result<()> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let tmp = parent.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    for (f, bytes) in files {
        let path = tmp.join(f);
        if let Some(sub) = path.parent().filter(|p| *p != tmp) {
            std::fs::create_dir_all(sub).map_err(|e| Error::io(sub, e))?;
        }
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))
}

/// Write `files` into `dir` (created if needed) beside what is there, each file
/// atomically (the final output of a run, next to its checkpoints and metrics).
#[cfg(not(target_arch = "wasm32"))]
pub fn write_files(dir: &std::path::Path, files: &Files) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    for (f, bytes) in files {
        super::checkpoint::write_atomic(&dir.join(f), bytes)?;
    }
    Ok(())
}
