//! Reading a GGUF file: its header, metadata and tensor table up front, a tensor's
//! rows when the loader asks (`Tensors`), under Hugging Face names.

use std::collections::BTreeMap;

use super::{gguf_name, hf_name, Value, MAGIC};
use crate::error::{Error, Result};
use crate::model::weights::{Bytes, Tensors};
use crate::quant::{dequantize_ggml as dequantize, type_name, GgmlType};


/// One tensor of the file: its name in the file, its ggml dims (fastest first), type
/// and offset from the start of the data section.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<usize>,
    pub ty: GgmlType,
    pub offset: u64,
}

impl TensorInfo {
    /// The shape as Hugging Face and webtune write it: the dims reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().cloned().collect()
    }
}

/// A cursor over the header bytes; running out asks for more (`Short`).
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

/// The header did not fit the bytes read so far.
struct Short;

impl Reader<'_> {
    fn take(&mut self, n: usize) -> std::result::Result<&[u8], Short> {
        let s = self.b.get(self.pos..self.pos + n).ok_or(Short)?;
        self.pos += n;
        Ok(s)
    }

    fn u32(&mut self) -> std::result::Result<u32, Short> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> std::result::Result<u64, Short> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    fn string(&mut self) -> std::result::Result<String, Short> {
        let n = self.u64()? as usize;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }

    fn value(&mut self, ty: u32) -> std::result::Result<std::result::Result<Value, String>, Short> {
        let b = |r: &mut Self, n| -> std::result::Result<Vec<u8>, Short> { Ok(r.take(n)?.to_vec()) };
        Ok(Ok(match ty {
            0 => Value::U8(b(self, 1)?[0]),
            1 => Value::I8(b(self, 1)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(b(self, 2)?.try_into().unwrap())),
            3 => Value::I16(i16::from_le_bytes(b(self, 2)?.try_into().unwrap())),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(self.u32()? as i32),
            6 => Value::F32(f32::from_bits(self.u32()?)),
            7 => Value::Bool(b(self, 1)?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                let (ty, n) = (self.u32()?, self.u64()? as usize);
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    match self.value(ty)? {
                        Ok(v) => items.push(v),
                        Err(e) => return Ok(Err(e)),
                    }
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            _ => return Ok(Err(format!("metadata value type {ty} is not a GGUF type"))),
        }))
    }
}

/// A GGUF file: metadata and tensor table, the tensors' bytes left where they are.
pub struct Gguf {
    pub name: String,
    pub version: u32,
    pub meta: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    data_start: u64,
    bytes: Box<dyn Bytes>,
}

impl Gguf {
    /// Read the header of `bytes` (`name` names the file in errors).
    pub fn open(bytes: Box<dyn Bytes>, name: &str) -> Result<Gguf> {
        let bad = |m: String| Error::Weights(format!("{name}: {m}"));
        let mut want = (1usize << 20).min(bytes.len() as usize);
        loop {
            let head = bytes.read(0, want)?;
            match Self::parse(&head, bytes.len()) {
                Ok(Ok((version, meta, tensors, data_start))) => {
                    return Ok(Gguf { name: name.to_string(), version, meta, tensors, data_start, bytes });
                }
                Ok(Err(m)) => return Err(bad(m)),
                Err(Short) if want < bytes.len() as usize => want = (want * 4).min(bytes.len() as usize),
                Err(Short) => return Err(bad("the file ends inside its header".into())),
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn parse(b: &[u8], file_len: u64) -> std::result::Result<std::result::Result<(u32, BTreeMap<String, Value>, Vec<TensorInfo>, u64), String>, Short> {
        let mut r = Reader { b, pos: 0 };
        if r.take(4)? != MAGIC {
            return Ok(Err("not a GGUF file (no GGUF magic)".into()));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Ok(Err(format!("GGUF version {version} is not supported (2 and 3 are)")));
        }
        let (n_tensors, n_kv) = (r.u64()?, r.u64()?);
        let mut meta = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            match r.value(ty)? {
                Ok(v) => meta.insert(key, v),
                Err(e) => return Ok(Err(format!("`{key}`: {e}"))),
            };
        }
        let mut tensors = Vec::new();
        for _ in 0..n_tensors {
            let name = r.string()?;
            let nd = r.u32()? as usize;
            let mut dims = Vec::with_capacity(nd);
            for _ in 0..nd {
                dims.push(r.u64()? as usize);
            }
            let id = r.u32()?;
            let offset = r.u64()?;
            let Some(ty) = GgmlType::from_id(id) else {
                return Ok(Err(format!(
                    "tensor `{name}` is {}, which webtune does not read (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K)",
                    type_name(id)
                )));
            };
            if dims[0] % ty.block().0 != 0 {
                return Ok(Err(format!("tensor `{name}`: a row of {} values is not whole {} blocks", dims[0], ty.name().to_uppercase())));
            }
            tensors.push(TensorInfo { name, dims, ty, offset });
        }
        let align = meta.get("general.alignment").and_then(|v| v.as_u64()).unwrap_or(32).max(1);
        let data_start = (r.pos as u64).div_ceil(align) * align;
        for t in &tensors {
            let end = data_start + t.offset + t.ty.bytes(t.dims.iter().product()) as u64;
            if end > file_len {
                return Ok(Err(format!("tensor `{}` runs past the end of the file ({end} > {file_len} bytes)", t.name)));
            }
        }
        Ok(Ok((version, meta, tensors, data_start)))
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta.get(key)
    }

    /// `general.architecture`.
    pub fn arch(&self) -> Result<&str> {
        self.get("general.architecture").and_then(|v| v.as_str()).ok_or_else(|| Error::Config(format!("{}: no `general.architecture`", self.name)))
    }

    pub(super) fn info(&self, file_name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == file_name)
    }

    /// Rows `r0..r1` of a tensor as stored (rows of its fastest dim), dequantized.
    pub fn file_rows(&self, t: &TensorInfo, r0: usize, r1: usize) -> Result<Vec<f32>> {
        Ok(dequantize(t.ty, &self.file_raw(t, r0, r1)?))
    }

    /// Rows `r0..r1` of a tensor as stored, in its type's blocks.
    fn file_raw(&self, t: &TensorInfo, r0: usize, r1: usize) -> Result<Vec<u8>> {
        let row = t.ty.bytes(t.dims[0]);
        self.bytes.read(self.data_start + t.offset + (r0 * row) as u64, (r1 - r0) * row)
    }

    /// The llama.cpp tensor name of a Hugging Face one, and for `llama`'s q and k
    /// projections the head count their rows were permuted by.
    fn file_name(&self, hf: &str) -> Option<(String, Option<usize>)> {
        let permute = |key: &str| -> Option<usize> {
            if self.arch().ok()? != "llama" {
                return None;
            }
            self.get(&format!("llama.attention.{key}")).and_then(|v| v.as_u64()).map(|v| v as usize)
        };
        let file = gguf_name(hf)?;
        let heads = if file.ends_with(".attn_q.weight") {
            permute("head_count")
        } else if file.ends_with(".attn_k.weight") {
            permute("head_count_kv").or_else(|| permute("head_count"))
        } else {
            None
        };
        Some((file, heads))
    }
}

impl Tensors for Gguf {
    fn names(&self) -> Vec<String> {
        self.tensors.iter().filter_map(|t| hf_name(&t.name)).collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let (file, _) = self.file_name(name)?;
        self.info(&file).map(|t| t.shape())
    }

    fn rows(&self, name: &str, r0: usize, r1: usize) -> Result<Vec<f32>> {
        let (t, _) = self.lookup(name)?;
        if t.dims.len() == 1 {
            // A vector: its rows are its elements.
            return Ok(self.file_rows(t, 0, 1)?[r0..r1].to_vec());
        }
        Ok(dequantize(t.ty, &self.raw_rows(name, r0, r1)?))
    }

    fn packed_type(&self, name: &str) -> Option<crate::quant::QType> {
        let (t, _) = self.lookup(name).ok()?;
        crate::quant::QType::of_ggml(t.ty).filter(|_| t.dims.len() == 2)
    }

    fn packed_rows(&self, name: &str, r0: usize, r1: usize) -> Result<Vec<u8>> {
        self.raw_rows(name, r0, r1)
    }
}

impl Gguf {
    /// The file tensor holding the Hugging Face tensor `name`, and the head count its
    /// rows were permuted by (llama's q and k).
    fn lookup(&self, name: &str) -> Result<(&TensorInfo, Option<usize>)> {
        let (file, heads) = self.file_name(name).ok_or_else(|| Error::Weights(format!("{}: tensor `{name}` is missing", self.name)))?;
        let t = self.info(&file).ok_or_else(|| Error::Weights(format!("{}: tensor `{name}` (`{file}`) is missing", self.name)))?;
        Ok((t, heads))
    }

    /// Rows `r0..r1` of the Hugging Face matrix `name` as the file stores them (its
    /// type's blocks), in Hugging Face row order (llama's q/k permutation undone by
    /// moving whole rows).
    fn raw_rows(&self, name: &str, r0: usize, r1: usize) -> Result<Vec<u8>> {
        let (t, heads) = self.lookup(name)?;
        let n_rows: usize = t.dims[1..].iter().product::<usize>().max(1);
        let raw_of = |a: usize, b: usize| self.file_raw(t, a, b);
        if r1 > n_rows {
            return Err(Error::Weights(format!("{}: rows {r0}..{r1} of `{name}` ({n_rows} rows)", self.name)));
        }
        let Some(heads) = heads else { return raw_of(r0, r1) };
        // llama.cpp stores each head's rows as (pairs, 2) where Hugging Face has
        // (2, pairs): Hugging Face row h·HS + i·HS/2 + j is file row h·HS + 2j + i.
        let hs = n_rows / heads;
        let mut out = Vec::with_capacity((r1 - r0) * t.ty.bytes(t.dims[0]));
        for r in r0..r1 {
            let (h, k) = (r / hs, r % hs);
            let (i, j) = (k / (hs / 2), k % (hs / 2));
            let f = h * hs + 2 * j + i;
            out.extend(raw_of(f, f + 1)?);
        }
        Ok(out)
    }
}
