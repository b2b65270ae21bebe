//! Packed frozen weights (QLoRA): the block formats the packed kernels read
//! (`kernels/quant.wgsl`), and the host side that makes and reads them.
//!
//! A packed matrix `[rows, cols]` is its blocks in row order, each block `E` elements
//! of one row in `B` bytes, exactly as GGUF stores them (so a GGUF base is uploaded as
//! it is read):
//!
//! | type | E | B | element j of a block |
//! |------|---|---|----------------------|
//! | Q8_0 | 32 | 34 | f16 d, i8 qs[32]: d·qs[j] |
//! | Q4_0 | 32 | 18 | f16 d, u8 qs[16]: d·(nibble − 8), low nibbles first |
//! | Q4_1 | 32 | 20 | f16 d, f16 m, u8 qs[16]: d·nibble + m |
//! | Q4_K | 256 | 144 | f16 d, f16 dmin, 6-bit scales and mins, u8 qs[128] |
//! | NF4 | 64 | 36 | f32 absmax, u8 codes[32]: absmax·NF4[code], high nibble first |
//!
//! NF4 is bitsandbytes' NormalFloat4 (`quantize_4bit(quant_type="nf4", blocksize=64)`
//! without double quantization): the same codes, absmax and packing order.

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QType {
    Q8_0,
    Q4_0,
    Q4_1,
    Q4K,
    Nf4,
}

/// bitsandbytes' NF4 code book (`bitsandbytes.functional.get_4bit_type("nf4")`).
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

impl QType {
    pub const ALL: [QType; 5] = [QType::Q8_0, QType::Q4_0, QType::Q4_1, QType::Q4K, QType::Nf4];

    /// The GGUF type of the same blocks (none for NF4).
    pub fn ggml(self) -> Option<GgmlType> {
        match self {
            QType::Q8_0 => Some(GgmlType::Q8_0),
            QType::Q4_0 => Some(GgmlType::Q4_0),
            QType::Q4_1 => Some(GgmlType::Q4_1),
            QType::Q4K => Some(GgmlType::Q4K),
            QType::Nf4 => None,
        }
    }

    /// (elements, bytes) of one block.
    pub fn block(self) -> (usize, usize) {
        self.ggml().map_or((64, 36), |g| g.block())
    }

    /// Bytes of `n` elements (a whole number of blocks).
    pub fn bytes(self, n: usize) -> usize {
        let (e, b) = self.block();
        n / e * b
    }

    /// The type's number in `kernels/quant.wgsl` (`QTYPE`).
    pub fn id(self) -> u32 {
        self as u32
    }

    pub fn name(self) -> &'static str {
        match self {
            QType::Q8_0 => "q8_0",
            QType::Q4_0 => "q4_0",
            QType::Q4_1 => "q4_1",
            QType::Q4K => "q4_k",
            QType::Nf4 => "nf4",
        }
    }

    /// The GGUF types kept packed on the GPU.
    pub fn of_ggml(t: GgmlType) -> Option<QType> {
        QType::ALL.into_iter().find(|q| q.ggml() == Some(t))
    }

    /// What `--quantize` takes: `q8` (Q8_0), `q4` (Q4_0), `nf4`.
    pub fn parse_quantize(s: &str) -> Result<QType> {
        match s {
            "q8" | "q8_0" => Ok(QType::Q8_0),
            "q4" | "q4_0" => Ok(QType::Q4_0),
            "nf4" => Ok(QType::Nf4),
            other => Err(Error::Options(format!("--quantize `{other}` is not one webtune makes (q8, q4, nf4; or f16, f32 to dequantize)"))),
        }
    }

    /// Whether a row of `cols` elements is a whole number of blocks.
    pub fn fits(self, cols: usize) -> bool {
        cols.is_multiple_of(self.block().0)
    }
}

fn f16_bytes(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_le_bytes()
}

/// `x` (a whole number of blocks) packed as `q`: llama.cpp's reference quantizers for
/// Q8_0, Q4_0 and Q4_1 (`quantize_row_*_ref`), bitsandbytes' for NF4. Q4_K is read from
/// GGUF files only.
pub fn quantize(q: QType, x: &[f32]) -> Result<Vec<u8>> {
    let (e, _) = q.block();
    if !x.len().is_multiple_of(e) {
        return Err(Error::Config(format!("{} packs blocks of {e} values; {} is not a multiple", q.name(), x.len())));
    }
    let mut out = Vec::with_capacity(q.bytes(x.len()));
    for b in x.chunks(e) {
        match q {
            QType::Q8_0 => {
                let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16_bytes(d));
                out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
            }
            QType::Q4_0 => {
                // The value of largest magnitude, with its sign, maps to −8.
                let (mut amax, mut max) = (0f32, 0f32);
                for &v in b {
                    if v.abs() > amax {
                        (amax, max) = (v.abs(), v);
                    }
                }
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16_bytes(d));
                let q4 = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
                out.extend((0..16).map(|j| q4(b[j]) | (q4(b[j + 16]) << 4)));
            }
            QType::Q4_1 => {
                let min = b.iter().cloned().fold(f32::INFINITY, f32::min);
                let max = b.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16_bytes(d));
                out.extend(f16_bytes(min));
                let q4 = |v: f32| (((v - min) * id + 0.5) as i8).min(15) as u8;
                out.extend((0..16).map(|j| q4(b[j]) | (q4(b[j + 16]) << 4)));
            }
            QType::Q4K => return Err(Error::Config("Q4_K weights are read from GGUF files; webtune quantizes to q8, q4 or nf4".into())),
            QType::Nf4 => {
                let absmax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                // As bitsandbytes' `quantize_4bit`: scale by the reciprocal of the absmax
                // (at least 1e-38), then count the code book's midpoints (in f32) below.
                let inv = 1.0 / absmax.max(1e-38);
                let code = |v: f32| (0..15).filter(|&i| v * inv > (NF4[i] + NF4[i + 1]) / 2.0).count() as u8;
                out.extend(absmax.to_le_bytes());
                out.extend((0..32).map(|j| (code(b[2 * j]) << 4) | code(b[2 * j + 1])));
            }
        }
    }
    Ok(out)
}

/// The values of packed `raw` (the reference for the packed kernels' loads).
pub fn dequantize(q: QType, raw: &[u8]) -> Vec<f32> {
    let ggml = match q.ggml() {
        Some(g) => g,
        None => {
            return raw
                .chunks(36)
                .flat_map(|b| {
                    let absmax = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    b[4..].iter().flat_map(move |&c| [NF4[(c >> 4) as usize] * absmax, NF4[(c & 15) as usize] * absmax])
                })
                .collect()
        }
    };
    dequantize_ggml(ggml, raw)
}

// ---- GGUF block formats (ggml tensor types) and their dequantization -------------

/// The ggml tensor types webtune reads, with their ids in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    BF16,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// The name llama.cpp gives the type, lower case (`f16`, `q8_0`, `q4_k`).
    pub fn name(self) -> String {
        type_name(self.id()).to_lowercase()
    }

    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// (values per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q5K => (256, 176),
            GgmlType::Q6K => (256, 210),
        }
    }

    /// Bytes holding `n` values (`n` a whole number of blocks).
    pub fn bytes(self, n: usize) -> usize {
        let (per, size) = self.block();
        n / per * size
    }
}

/// The name of a ggml type id, for errors about the ones webtune does not read.
pub(crate) fn type_name(id: u32) -> String {
    const NAMES: [&str; 31] = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K",
        "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16",
    ];
    NAMES.get(id as usize).map_or(format!("type {id}"), |n| n.to_string())
}

fn f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Q4_K and Q5_K: the 6-bit scale and min of sub-block `j` from the 12 packed bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Dequantize `raw` (whole blocks of `ty`) to f32, as ggml's `dequantize_row_*`.
pub fn dequantize_ggml(ty: GgmlType, raw: &[u8]) -> Vec<f32> {
    let (per, size) = ty.block();
    let mut y = Vec::with_capacity(raw.len() / size * per);
    for b in raw.chunks_exact(size) {
        match ty {
            GgmlType::F32 => y.push(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            GgmlType::F16 => y.push(f16(b)),
            GgmlType::BF16 => y.push(f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)),
            GgmlType::Q8_0 => {
                let d = f16(b);
                y.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
            }
            GgmlType::Q4_0 => {
                let (d, qs) = (f16(b), &b[2..18]);
                y.extend(qs.iter().map(|&q| ((q & 0xF) as i32 - 8) as f32 * d));
                y.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
            }
            GgmlType::Q4_1 => {
                let (d, m, qs) = (f16(b), f16(&b[2..]), &b[4..20]);
                y.extend(qs.iter().map(|&q| (q & 0xF) as f32 * d + m));
                y.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
            }
            GgmlType::Q4K => {
                let (d, min, scales, qs) = (f16(b), f16(&b[2..]), &b[4..16], &b[16..144]);
                for (k, q) in qs.chunks_exact(32).enumerate() {
                    let (sc1, m1) = scale_min_k4(2 * k, scales);
                    let (sc2, m2) = scale_min_k4(2 * k + 1, scales);
                    let (d1, m1, d2, m2) = (d * sc1 as f32, min * m1 as f32, d * sc2 as f32, min * m2 as f32);
                    y.extend(q.iter().map(|&q| d1 * (q & 0xF) as f32 - m1));
                    y.extend(q.iter().map(|&q| d2 * (q >> 4) as f32 - m2));
                }
            }
            GgmlType::Q5K => {
                let (d, min, scales, qh, qs) = (f16(b), f16(&b[2..]), &b[4..16], &b[16..48], &b[48..176]);
                for (k, ql) in qs.chunks_exact(32).enumerate() {
                    let (sc1, m1) = scale_min_k4(2 * k, scales);
                    let (sc2, m2) = scale_min_k4(2 * k + 1, scales);
                    let (d1, m1, d2, m2) = (d * sc1 as f32, min * m1 as f32, d * sc2 as f32, min * m2 as f32);
                    let (u1, u2) = (1u8 << (2 * k), 2u8 << (2 * k));
                    y.extend(ql.iter().zip(qh).map(|(&q, &h)| d1 * ((q & 0xF) + if h & u1 != 0 { 16 } else { 0 }) as f32 - m1));
                    y.extend(ql.iter().zip(qh).map(|(&q, &h)| d2 * ((q >> 4) + if h & u2 != 0 { 16 } else { 0 }) as f32 - m2));
                }
            }
            GgmlType::Q6K => {
                let (ql, qh, sc, d) = (&b[0..128], &b[128..192], &b[192..208], f16(&b[208..]));
                let mut out = [0f32; 256];
                for half in 0..2 {
                    let (ql, qh, sc, y) = (&ql[64 * half..], &qh[32 * half..], &sc[8 * half..], &mut out[128 * half..]);
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * sc[is] as i8 as f32 * q1 as f32;
                        y[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
                        y[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
                        y[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
                    }
                }
                y.extend_from_slice(&out);
            }
        }
    }
    y
}
