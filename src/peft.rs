//! PEFT LoRA adapters: `adapter_config.json` and `adapter_model.safetensors`.

use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::weights::TensorMap;
use safetensors::Dtype;
use crate::model::LoraConfig;

/// Read the LoRA settings of an `adapter_config.json` (`source` names it in errors).
pub fn parse_config(text: &str, source: &str) -> Result<LoraConfig> {
    let v: Value = serde_json::from_str(text).map_err(|e| Error::Config(format!("{source}: {e}")))?;
    let field = |f: &str| v.get(f).filter(|x| !x.is_null());
    let bad = |f: &str, msg: &str| Error::Config(format!("{source}: `{f}` {msg}"));
    if let Some(t) = field("peft_type").and_then(|t| t.as_str()) {
        if t != "LORA" {
            return Err(bad("peft_type", &format!("is {t}; only LORA adapters are supported")));
        }
    }
    if field("use_dora").and_then(|d| d.as_bool()) == Some(true) {
        return Err(bad("use_dora", "is true; DoRA is not supported"));
    }
    let r = field("r").and_then(|r| r.as_u64()).ok_or_else(|| bad("r", "must be a positive integer"))? as usize;
    let alpha = field("lora_alpha").and_then(|a| a.as_f64()).ok_or_else(|| bad("lora_alpha", "must be a number"))? as f32;
    let targets = match field("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|t| t.as_str().map(String::from).ok_or_else(|| bad("target_modules", "must list module names")))
            .collect::<Result<Vec<_>>>()?,
        Some(Value::String(s)) if s == "all-linear" => LoraConfig::ALL_TARGETS.iter().map(|s| s.to_string()).collect(),
        _ => return Err(bad("target_modules", "must be a list of module names or \"all-linear\"")),
    };
    let mut targets: Vec<String> = LoraConfig::ALL_TARGETS.iter().filter(|t| targets.iter().any(|x| x == *t)).map(|t| t.to_string()).collect();
    targets.dedup();
    Ok(LoraConfig {
        r,
        alpha,
        dropout: field("lora_dropout").and_then(|d| d.as_f64()).unwrap_or(0.0) as f32,
        targets,
        use_rslora: field("use_rslora").and_then(|d| d.as_bool()).unwrap_or(false),
    })
}

/// `adapter_config.json` for a LoRA adapter on `base_model`, as PEFT writes it.
pub fn config_json(l: &LoraConfig, base_model: &str) -> String {
    let v = serde_json::json!({
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "lora_alpha": l.alpha,
        "lora_dropout": l.dropout,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": l.r,
        "target_modules": l.targets,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": l.use_rslora,
    });
    serde_json::to_string_pretty(&v).expect("serialisable")
}

/// Merge a LoRA adapter into base weights in place: W += s·B·A for each pair
/// (`adapter` holds PEFT-named tensors; `source` names it in errors).
pub fn merge_into(base: &mut TensorMap, adapter: &TensorMap, lora: &LoraConfig, source: &str) -> Result<()> {
    let scale = lora.scale() as f64;
    for (name, a) in adapter.iter().filter(|(n, _)| n.ends_with(".lora_A.weight")) {
        let module = name.trim_start_matches("base_model.model.").trim_end_matches(".lora_A.weight");
        let b_name = name.replace(".lora_A.weight", ".lora_B.weight");
        let b = adapter.get(&b_name).ok_or_else(|| Error::Weights(format!("{source}: `{b_name}` is missing")))?;
        let wname = format!("{module}.weight");
        let target = base.get_mut(&wname).ok_or_else(|| Error::Weights(format!("the base model has no `{wname}` for {name}")))?;
        let (r, din, dout) = (a.shape[0], a.shape[1], b.shape[0]);
        if target.shape != [dout, din] || b.shape[1] != r {
            return Err(Error::Weights(format!("{name}: shapes {} · {} do not fit `{wname}` {}", crate::gpu::dims(&b.shape), crate::gpu::dims(&a.shape), crate::gpu::dims(&target.shape))));
        }
        for o in 0..dout {
            for i in 0..din {
                let acc: f64 = (0..r).map(|j| b.data[o * r + j] as f64 * a.data[j * din + i] as f64).sum();
                target.data[o * din + i] += (scale * acc) as f32;
            }
        }
    }
    Ok(())
}

/// A merged model's `config.json`: the base's, with the dtype the weights now have
/// (`dtype` as transformers 5 writes it, `torch_dtype` as earlier versions did).
pub fn merged_config(base_config: &str, dtype: Dtype) -> Result<String> {
    let mut cfg: serde_json::Value = serde_json::from_str(base_config).map_err(|e| Error::Config(e.to_string()))?;
    let name = match dtype {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        _ => "float32",
    };
    cfg["torch_dtype"] = name.into();
    if cfg.get("dtype").is_some() {
        cfg["dtype"] = name.into();
    }
    Ok(serde_json::to_string_pretty(&cfg).expect("json"))
}

/// The files of a merged (or fully tuned) model: the base's small files (config.json
/// with the new dtype) and `model.safetensors` with `weights` stored as `dtype`, the
/// base's own for a LoRA merge as PEFT's `merge_and_unload` keeps it. The CLI and the
/// page both write these.
pub fn model_files(base_files: &[(String, Vec<u8>)], weights: &TensorMap, dtype: Dtype) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::with_capacity(base_files.len() + 1);
    for (name, bytes) in base_files {
        let bytes = if name == "config.json" { merged_config(&String::from_utf8_lossy(bytes), dtype)?.into_bytes() } else { bytes.clone() };
        out.push((name.clone(), bytes));
    }
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    out.push(("model.safetensors".into(), crate::model::weights::serialize_as(weights, dtype, Some(meta))?));
    Ok(out)
}
