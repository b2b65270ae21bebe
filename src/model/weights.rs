//! Safetensors on the host: one file's bytes, or a directory (single file or a
//! sharded `model.safetensors.index.json`), converted to f32.

use std::collections::BTreeMap;

use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// A tensor on the host, row-major f32.
#[derive(Clone, Debug)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

pub type TensorMap = BTreeMap<String, HostTensor>;

/// Every tensor of one safetensors file (`source` names it in errors), as f32.
pub fn parse(bytes: &[u8], source: &str, out: &mut TensorMap) -> Result<()> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| Error::Weights(format!("{source}: {e}")))?;
    for (name, view) in st.tensors() {
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => raw.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => raw.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => return Err(Error::Weights(format!("{source}: tensor `{name}` is {other:?}; f32, f16 or bf16 expected"))),
        };
        out.insert(name, HostTensor { shape: view.shape().to_vec(), data });
    }
    Ok(())
}

/// Write f32 tensors as one safetensors file's bytes.
pub fn serialize(tensors: &TensorMap, metadata: Option<std::collections::HashMap<String, String>>) -> Result<Vec<u8>> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, t)| {
            safetensors::tensor::TensorView::new(Dtype::F32, t.shape.clone(), bytemuck::cast_slice(&t.data))
                .map(|v| (k.clone(), v))
                .map_err(|e| Error::Weights(format!("{k}: {e}")))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize(views, metadata).map_err(|e| Error::Weights(e.to_string()))
}

/// Read `model.safetensors`, or every shard named by `model.safetensors.index.json`.
#[cfg(not(target_arch = "wasm32"))]
pub fn read_dir(dir: &std::path::Path) -> Result<TensorMap> {
    let mut out = TensorMap::new();
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<std::path::PathBuf> = if single.exists() {
        vec![single]
    } else if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::Weights(format!("{}: {e}", index.display())))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Weights(format!("{}: `weight_map` is missing", index.display())))?;
        let mut shards: Vec<String> = map.values().filter_map(|s| s.as_str().map(String::from)).collect();
        shards.sort();
        shards.dedup();
        shards.into_iter().map(|s| dir.join(s)).collect()
    } else {
        return Err(Error::Io(format!(
            "{}: no model.safetensors or model.safetensors.index.json (only safetensors weights are read)",
            dir.display()
        )));
    };
    for f in files {
        let bytes = std::fs::read(&f).map_err(|e| Error::io(&f, e))?;
        parse(&bytes, &f.display().to_string(), &mut out)?;
    }
    Ok(out)
}
