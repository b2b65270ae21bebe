// Packed frozen weights (QLoRA), appended to the kernels that read a frozen weight
// (matmul's B, the embedding table) to make their packed variant: the weight binding
// becomes array<u32> holding a row-part of the matrix as its blocks in row order, as
// GGUF stores them (src/quant.rs), and the kernel's `weight(i)` becomes `q_load(i)`:
// element i (row-major) of the part, dequantized. The registry writes the binding's
// name for QW. Blocks never straddle rows, so row-parts split at block boundaries.
//
// QTYPE (QType::id): 0 Q8_0, 1 Q4_0, 2 Q4_1, 3 Q4_K, 4 NF4.
//   Q8_0  32 per 34 bytes: f16 d, i8 qs[32]                       → d·qs[j]
//   Q4_0  32 per 18 bytes: f16 d, u8 qs[16] (low nibbles first)    → d·(q − 8)
//   Q4_1  32 per 20 bytes: f16 d, f16 m, u8 qs[16]                 → d·q + m
//   Q4_K 256 per 144 bytes: f16 d, f16 dmin, u8 scales[12], u8 qs[128]
//                          → d·sc·q − dmin·m, 6-bit sc and m per 32
//   NF4   64 per 36 bytes: f32 absmax, u8 codes[32] (high nibble first) → absmax·NF4[code]
override QTYPE: u32 = 0u;

// NF4's code book (bitsandbytes), chosen by selects: a dynamically indexed constant
// array becomes a per-invocation copy in memory on CPU drivers.
fn nf4(code: u32) -> f32 {
    let hi = code >> 2u;
    var v = vec4<f32>(-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453);
    v = select(v, vec4<f32>(-0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0), hi == 1u);
    v = select(v, vec4<f32>(0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224), hi == 2u);
    v = select(v, vec4<f32>(0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0), hi == 3u);
    let lo = code & 3u;
    var x = select(v.x, v.y, lo == 1u);
    x = select(x, v.z, lo == 2u);
    return select(x, v.w, lo == 3u);
}

// Byte o of the part.
fn q_byte(o: u32) -> u32 {
    return (QW[o >> 2u] >> ((o & 3u) * 8u)) & 0xffu;
}

// The f16 at byte o (o even).
fn q_half(o: u32) -> f32 {
    let v = unpack2x16float(QW[o >> 2u]);
    return select(v.x, v.y, (o & 2u) != 0u);
}

// 4-bit value j of 32 packed low nibbles first: qs[j % 16], high nibble for j ≥ 16.
fn q_nibble(qs: u32, j: u32) -> f32 {
    return f32((q_byte(qs + (j & 15u)) >> ((j >> 4u) * 4u)) & 15u);
}

// Element i is scale·value + offset, with (scale, offset) shared by its group of 32
// (a block of Q8_0, Q4_0, Q4_1, a sub-block of Q4_K, half a block of NF4).
fn q_group(i: u32) -> vec2<f32> {
    switch QTYPE {
        case 0u: { return vec2<f32>(q_half((i >> 5u) * 34u), 0.0); }
        case 1u: { return vec2<f32>(q_half((i >> 5u) * 18u), 0.0); }
        case 2u: {
            let o = (i >> 5u) * 20u;
            return vec2<f32>(q_half(o), q_half(o + 2u));
        }
        case 3u: {
            let o = (i >> 8u) * 144u;
            let s = (i & 255u) >> 5u;
            var sc: u32;
            var m: u32;
            if (s < 4u) {
                sc = q_byte(o + 4u + s) & 63u;
                m = q_byte(o + 8u + s) & 63u;
            } else {
                sc = (q_byte(o + 8u + s) & 15u) | ((q_byte(o + s) >> 6u) << 4u);
                m = (q_byte(o + 8u + s) >> 4u) | ((q_byte(o + 4u + s) >> 6u) << 4u);
            }
            return vec2<f32>(q_half(o) * f32(sc), -(q_half(o + 2u) * f32(m)));
        }
        default: { return vec2<f32>(bitcast<f32>(QW[((i >> 6u) * 36u) >> 2u]), 0.0); }
    }
}

fn q_value(i: u32) -> f32 {
    switch QTYPE {
        case 0u: { return f32(bitcast<i32>(q_byte((i >> 5u) * 34u + 2u + (i & 31u)) << 24u) >> 24u); }
        case 1u: { return q_nibble((i >> 5u) * 18u + 2u, i & 31u) - 8.0; }
        case 2u: { return q_nibble((i >> 5u) * 20u + 4u, i & 31u); }
        case 3u: {
            // Chunk j/64 of qs: its 32 bytes' low nibbles, then their high nibbles.
            let j = i & 255u;
            return f32((q_byte((i >> 8u) * 144u + 16u + (j >> 6u) * 32u + (j & 31u)) >> (((j >> 5u) & 1u) * 4u)) & 15u);
        }
        default: {
            let j = i & 63u;
            return nf4((q_byte((i >> 6u) * 36u + 4u + (j >> 1u)) >> select(0u, 4u, (j & 1u) == 0u)) & 15u);
        }
    }
}

fn q_load(i: u32) -> f32 {
    let g = q_group(i);
    return g.x * q_value(i) + g.y;
}

// The 4 bytes from byte o (o even) of the part, byte o lowest.
fn q_word(o: u32) -> u32 {
    let lo = QW[o >> 2u];
    if ((o & 2u) == 0u) { return lo; }
    return (lo >> 16u) | (QW[(o >> 2u) + 1u] << 16u);
}

// The four low nibbles (bits 0–3 of each byte) of word.
fn q_nibbles(word: u32) -> vec4<f32> {
    return vec4<f32>((vec4<u32>(word) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(15u));
}

// q_value of elements i..i+3 (i a multiple of 4, so one group): one or two words read
// instead of four bytes.
fn q_value4(i: u32) -> vec4<f32> {
    switch QTYPE {
        case 0u: {
            let word = q_word((i >> 5u) * 34u + 2u + (i & 31u));
            return vec4<f32>(bitcast<vec4<i32>>(vec4<u32>(word) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u));
        }
        case 1u: { return q_nibbles(q_word((i >> 5u) * 18u + 2u + (i & 15u)) >> (((i >> 4u) & 1u) * 4u)) - 8.0; }
        case 2u: { return q_nibbles(q_word((i >> 5u) * 20u + 4u + (i & 15u)) >> (((i >> 4u) & 1u) * 4u)); }
        case 3u: {
            let j = i & 255u;
            return q_nibbles(q_word((i >> 8u) * 144u + 16u + (j >> 6u) * 32u + (j & 31u)) >> (((j >> 5u) & 1u) * 4u));
        }
        default: {
            // Two bytes, each two codes high nibble first.
            let o = (i >> 6u) * 36u + 4u + ((i & 63u) >> 1u);
            let h = QW[o >> 2u] >> ((o & 2u) * 8u);
            return vec4<f32>(nf4((h >> 4u) & 15u), nf4(h & 15u), nf4((h >> 12u) & 15u), nf4((h >> 8u) & 15u));
        }
    }
}

// The group's (scale, offset) kept in one of four slots: a matmul reading along a row
// (or four elements of one group) loads each group's scale once.
var<private> q_slot_group = vec4<u32>(0xffffffffu);
var<private> q_slot_scale = vec4<f32>(0.0);
var<private> q_slot_offset = vec4<f32>(0.0);

fn q_slot(i: u32, slot: u32) {
    let group = i >> 5u;
    if (q_slot_group[slot] != group) {
        let g = q_group(i);
        q_slot_group[slot] = group;
        q_slot_scale[slot] = g.x;
        q_slot_offset[slot] = g.y;
    }
}

fn q_load_slot(i: u32, slot: u32) -> f32 {
    q_slot(i, slot);
    return q_slot_scale[slot] * q_value(i) + q_slot_offset[slot];
}

// Elements i..i+3 (i a multiple of 4), with the group's scale kept in `slot`.
fn q_load4(i: u32, slot: u32) -> vec4<f32> {
    q_slot(i, slot);
    return q_slot_scale[slot] * q_value4(i) + q_slot_offset[slot];
}
