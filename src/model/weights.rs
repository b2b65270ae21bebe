//! Safetensors on the host. A model is read through [`Tensors`] one tensor (or a range
//! of its rows) at a time: [`Checkpoint`] reads only the headers up front and each
//! tensor's bytes when the loader asks, so no f32 copy of the whole model is ever on
//! the host. Small files (adapters, checkpoints, fixtures) are read whole into a
//! [`TensorMap`] of f32.

use std::collections::BTreeMap;

use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// A model's tensors as the loader reads them.
pub trait Tensors {
    /// Every tensor name.
    fn names(&self) -> Vec<String>;
    /// The shape of `name`, if there is such a tensor.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// Rows `r0..r1` of `name` (along its first dimension; a vector's rows are its
    /// elements) as f32.
    fn rows(&self, name: &str, r0: usize, r1: usize) -> Result<Vec<f32>>;
    /// The block type of a matrix stored in blocks the packed kernels read as they are
    /// (a GGUF's Q8_0, Q4_0, Q4_1, Q4_K); `None` for anything else.
    fn packed_type(&self, _name: &str) -> Option<crate::quant::QType> {
        None
    }
    /// Rows `r0..r1` of a matrix `packed_type` names, as its blocks.
    fn packed_rows(&self, name: &str, _r0: usize, _r1: usize) -> Result<Vec<u8>> {
        Err(Error::Weights(format!("tensor `{name}` is not stored in blocks")))
    }
}

impl Tensors for TensorMap {
    fn names(&self) -> Vec<String> {
        self.keys().cloned().collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.get(name).map(|t| t.shape.clone())
    }

    fn rows(&self, name: &str, r0: usize, r1: usize) -> Result<Vec<f32>> {
        let t = self.get(name).ok_or_else(|| Error::Weights(format!("tensor `{name}` is missing")))?;
        let row: usize = t.shape.iter().skip(1).product();
        Ok(t.data[r0 * row..r1 * row].to_vec())
    }
}

/// Every tensor of `w` as f32 in memory (merging, and small models).
pub fn to_map(w: &dyn Tensors) -> Result<TensorMap> {
    w.names()
        .into_iter()
        .map(|name| {
            let shape = w.shape(&name).expect("listed");
            let data = w.rows(&name, 0, shape.first().copied().unwrap_or(1))?;
            Ok((name, HostTensor { shape, data }))
        })
        .collect()
}

/// Where a checkpoint's bytes are read from: a file, a browser's array, memory.
pub trait Bytes {
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// `len` bytes from `offset`.
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>>;
}

impl Bytes for Vec<u8> {
    fn len(&self) -> u64 {
        Vec::len(self) as u64
    }

    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        Ok(self[offset as usize..offset as usize + len].to_vec())
    }
}

/// A file read at offsets (natively).
#[cfg(not(target_arch = "wasm32"))]
pub struct FileBytes {
    file: std::sync::Mutex<std::fs::File>,
    len: u64,
    path: std::path::PathBuf,
}

#[cfg(not(target_arch = "wasm32"))]
impl FileBytes {
    pub fn open(path: &std::path::Path) -> Result<FileBytes> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        Ok(FileBytes { file: std::sync::Mutex::new(file), len, path: path.to_path_buf() })
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl Bytes for FileBytes {
    fn len(&self) -> u64 {
        self.len
    }

    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = self.file.lock().expect("not poisoned");
        let mut out = vec![0u8; len];
        f.seek(SeekFrom::Start(offset)).and_then(|_| f.read_exact(&mut out)).map_err(|e| Error::io(&self.path, e))?;
        Ok(out)
    }
}

/// One tensor of a checkpoint: which file, its dtype and shape, and where its bytes are.
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: u64,
}

/// Safetensors files (one, or the shards of one model) opened lazily: `add` reads a
/// file's header, `rows` reads and converts the bytes of the rows asked for.
#[derive(Default)]
pub struct Checkpoint {
    files: Vec<(String, Box<dyn Bytes>)>,
    index: BTreeMap<String, Entry>,
}

fn element_size(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::F32 => Some(4),
        Dtype::F16 | Dtype::BF16 => Some(2),
        _ => None,
    }
}

/// Little-endian f32, f16 or bf16 bytes as f32.
fn widen(dtype: Dtype, raw: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F32 => raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F16 => raw.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::BF16 => raw.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        _ => unreachable!("checked when the header was read"),
    }
}

impl Checkpoint {
    pub fn new() -> Checkpoint {
        Checkpoint::default()
    }

    /// A checkpoint of one safetensors file held in memory (the demo's, tests').
    pub fn from_bytes(bytes: Vec<u8>, source: &str) -> Result<Checkpoint> {
        let mut c = Checkpoint::new();
        c.add(source, Box::new(bytes))?;
        Ok(c)
    }

    /// Read the header of one safetensors file (`source` names it in errors) and
    /// index its tensors; their bytes stay where they are.
    pub fn add(&mut self, source: &str, bytes: Box<dyn Bytes>) -> Result<()> {
        let bad = |msg: String| Error::Weights(format!("{source}: {msg}"));
        let total = bytes.len();
        if total < 8 {
            return Err(bad(format!("{total} bytes is too short for a safetensors file")));
        }
        let n = u64::from_le_bytes(bytes.read(0, 8)?.try_into().expect("8 bytes"));
        if n > 100 << 20 || 8 + n > total {
            return Err(bad(format!("header length {n} does not fit a file of {total} bytes (not safetensors?)")));
        }
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&bytes.read(8, n as usize)?).map_err(|e| bad(format!("header: {e}")))?;
        let data_start = 8 + n;
        let file = self.files.len();
        for (name, info) in header {
            if name == "__metadata__" {
                continue;
            }
            let info: safetensors::tensor::TensorInfo =
                serde_json::from_value(info).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
            let size = element_size(info.dtype)
                .ok_or_else(|| bad(format!("tensor `{name}` is {}; f32, f16 or bf16 expected", info.dtype)))?;
            let (a, b) = info.data_offsets;
            let numel: usize = info.shape.iter().product();
            if b < a || b - a != numel * size || data_start + b as u64 > total {
                return Err(bad(format!("tensor `{name}`: bytes {a}..{b} do not hold {} {} within the file", info.dtype, crate::gpu::dims(&info.shape))));
            }
            if self.index.contains_key(&name) {
                return Err(bad(format!("tensor `{name}` is also in {}", self.files[self.index[&name].file].0)));
            }
            self.index.insert(name, Entry { file, dtype: info.dtype, shape: info.shape, start: data_start + a as u64 });
        }
        self.files.push((source.to_string(), bytes));
        Ok(())
    }

    /// `model.safetensors`, or every shard that `model.safetensors.index.json` names.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn open_dir(dir: &std::path::Path) -> Result<Checkpoint> {
        let mut c = Checkpoint::new();
        for f in shard_files(dir)? {
            c.add(&f.display().to_string(), Box::new(FileBytes::open(&f)?))?;
        }
        Ok(c)
    }

    /// The dtype the checkpoint's floating-point weights are stored in: the widest
    /// when they differ (f32 over f16 or bf16), f32 for an empty checkpoint.
    pub fn weights_dtype(&self) -> Dtype {
        let mut dtypes = self.index.values().map(|e| e.dtype);
        match dtypes.next() {
            Some(first) if dtypes.all(|d| d == first) => first,
            _ => Dtype::F32,
        }
    }
}

impl Tensors for Checkpoint {
    fn names(&self) -> Vec<String> {
        self.index.keys().cloned().collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.index.get(name).map(|e| e.shape.clone())
    }

    fn rows(&self, name: &str, r0: usize, r1: usize) -> Result<Vec<f32>> {
        let e = self.index.get(name).ok_or_else(|| Error::Weights(format!("tensor `{name}` is missing")))?;
        let row_bytes = e.shape.iter().skip(1).product::<usize>() * element_size(e.dtype).expect("checked");
        let raw = self.files[e.file].1.read(e.start + (r0 * row_bytes) as u64, (r1 - r0) * row_bytes)?;
        Ok(widen(e.dtype, &raw))
    }
}

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
        if element_size(view.dtype()).is_none() {
            return Err(Error::Weights(format!("{source}: tensor `{name}` is {}; f32, f16 or bf16 expected", view.dtype())));
        }
        out.insert(name, HostTensor { shape: view.shape().to_vec(), data: widen(view.dtype(), view.data()) });
    }
    Ok(())
}

/// Write a safetensors file of random bf16 tensors, a megabyte at a time (the file is
/// never in memory): norm weights (names ending in `norm.weight`) are 1, the rest
/// uniform in ±`scale`, from `seed`. For trying a model's shape without its weights
/// (`webtune random-model`) and for the loader's memory tests.
#[cfg(not(target_arch = "wasm32"))]
pub fn write_random_bf16(path: &std::path::Path, tensors: &[(String, Vec<usize>)], scale: f32, seed: u64) -> Result<()> {
    use std::io::Write;
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let bytes = 2 * shape.iter().product::<usize>();
        header.insert(name.clone(), serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes]}));
        offset += bytes;
    }
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut head = serde_json::to_vec(&header).expect("json");
    head.resize(head.len().div_ceil(8) * 8, b' ');
    let tmp = path.with_extension("partial");
    let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let io = |e| Error::io(&tmp, e);
    out.write_all(&(head.len() as u64).to_le_bytes()).map_err(io)?;
    out.write_all(&head).map_err(io)?;
    let mut rng = crate::rng::Rng::new(seed);
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    for (name, shape) in tensors {
        let ones = name.ends_with("norm.weight");
        let mut left: usize = shape.iter().product();
        while left > 0 {
            let n = left.min(1 << 19);
            buf.clear();
            for _ in 0..n {
                let x = if ones { 1.0 } else { (2.0 * rng.unit() - 1.0) * scale };
                buf.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes());
            }
            out.write_all(&buf).map_err(io)?;
            left -= n;
        }
    }
    out.into_inner().map_err(|e| Error::io(&tmp, e.error()))?.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Write f32 tensors as one safetensors file's bytes, stored as `dtype` (f32, or f16
/// and bf16 rounded to nearest even).
pub fn serialize_as(tensors: &TensorMap, dtype: Dtype, metadata: Option<std::collections::HashMap<String, String>>) -> Result<Vec<u8>> {
    use std::borrow::Cow;
    // f32 is written from the tensors' own bytes; f16 and bf16 are narrowed copies.
    fn stored(t: &HostTensor, dtype: Dtype) -> Cow<'_, [u8]> {
        match dtype {
            Dtype::BF16 => Cow::Owned(t.data.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect()),
            Dtype::F16 => Cow::Owned(t.data.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect()),
            _ => Cow::Borrowed(bytemuck::cast_slice(&t.data)),
        }
    }
    if !matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
        return Err(Error::Weights(format!("cannot write {dtype} weights; f32, f16 or bf16")));
    }
    let bytes: Vec<(String, Cow<'_, [u8]>, Vec<usize>)> = tensors.iter().map(|(k, t)| (k.clone(), stored(t, dtype), t.shape.clone())).collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(k, b, shape)| {
            safetensors::tensor::TensorView::new(dtype, shape.clone(), b).map(|v| (k.clone(), v)).map_err(|e| Error::Weights(format!("{k}: {e}")))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize(views, metadata).map_err(|e| Error::Weights(e.to_string()))
}

/// Write f32 tensors as one safetensors file's bytes.
pub fn serialize(tensors: &TensorMap, metadata: Option<std::collections::HashMap<String, String>>) -> Result<Vec<u8>> {
    serialize_as(tensors, Dtype::F32, metadata)
}

/// The safetensors files of a model directory: `model.safetensors`, or every shard
/// named by `model.safetensors.index.json`.
#[cfg(not(target_arch = "wasm32"))]
pub fn shard_files(dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.exists() {
        return Ok(vec![single]);
    }
    if !index.exists() {
        return Err(Error::Io(format!(
            "{}: no model.safetensors or model.safetensors.index.json (only safetensors weights are read)",
            dir.display()
        )));
    }
    Ok(index_shards(&index)?.into_iter().map(|s| dir.join(s)).collect())
}

/// The shard files a `model.safetensors.index.json` names, sorted, each once.
#[cfg(not(target_arch = "wasm32"))]
pub fn index_shards(index: &std::path::Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Weights(format!("{}: {e}", index.display())))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Weights(format!("{}: `weight_map` is missing", index.display())))?;
    let mut shards: Vec<String> = map.values().filter_map(|s| s.as_str().map(String::from)).collect();
    shards.sort();
    shards.dedup();
    Ok(shards)
}

/// Every tensor of a model directory as f32 in memory (tests, small models).
#[cfg(not(target_arch = "wasm32"))]
pub fn read_dir(dir: &std::path::Path) -> Result<TensorMap> {
    to_map(&Checkpoint::open_dir(dir)?)
}
