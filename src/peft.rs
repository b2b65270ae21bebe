//! PEFT LoRA adapters: `adapter_config.json` and `adapter_model.safetensors`.

use serde_json::Value;

use crate::error::{Error, Result};
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
