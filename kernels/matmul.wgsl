// Batched matrix multiply with optional transposes and accumulation:
//   C[b] = alpha * op(A[b]) · op(B[b]) + beta * C[b]
// op(A) is [M, K]: A is stored [M, K], or [K, M] when TRANS_A.
// op(B) is [K, N]: B is stored [K, N], or [N, K] when TRANS_B.
// C is [M, N]. Batch b starts at `*_off + b * *_stride` (a stride of 0 broadcasts).
// lda, ldb, ldc are the row strides of A, B, C as stored (a column block of a wider
// matrix has ld > its width: the parts of a weight split by rows, a logits chunk).
// Linear layer y = x·Wᵀ: A = x [BT, in], B = W [out, in], TRANS_B.
//   dx += dy·W: A = dy [BT, out], B = W [out, in].  dW += dyᵀ·x: A = dy, TRANS_A, B = x.
//
// Two fusions serve LoRA (batch 1), so a pair costs no dispatches of its own:
// - a second product of the same M×N and transposes, `+ alpha2 · op(A2)·op(B2)` over
//   its own K2 (0 = none): the up product s·h·Bᵀ in the base layer's y = x·Wᵀ, and
//   dx' = dh·A in dx += dy·W;
// - inverted dropout (`DROP`): on A as loaded (h = x'·Aᵀ), on B as loaded
//   (dA += dhᵀ·x'), or on the second product (dx += mask(dh·A)). Element i of the
//   operand (its stored index less `drop_base`) is kept, as x[i] / (1 − p), where
//   hash(i ^ key) / 2³² ≥ p; the launcher passes key = hash(seed).
//
// SwiGLU on an operand as loaded (`GLU`: 1 on A, 2 on B): element i is silu(v[i]) ·
// v[i + glu_up], the gate and up outputs lying in one buffer, so the products that read
// the MLP's hidden h = silu(gate)·up (down's, LoRA's down and dA) make it themselves and
// no pass stores it.
//
// SwiGLU's backward in the store (`EPI` 1): the product is dh, the gradient of
// h = silu(gate)·up, at (m, n) of an [M, N] matrix laid out as gate and up are (row
// stride ldc). `aux` holds gate from `epi_g` and up `glu_up` further on; the store adds
// dgate into C and dup `epi_du` elements further on, as kernels/swiglu.wgsl does, and
// no pass stores dh (down's dx product).
//
// A group (`GROUPED`) is up to 8 unbatched products of one kind (transposes, dropout
// operand, second product or not) over the same five bindings, each with its own
// Params: the grid is every product's tiles in turn (product i's are tile0 ..
// tile0 + tiles, tiles_n to a row), a flat workgroup index over x, then y past 65,535,
// so products of different shapes launch no idle workgroups. LoRA's products for the projections that share an input (q/k/v,
// gate/up) run as one dispatch this way. A group may hold two operand sets (`ALT`):
// a product with `alt` set reads its A and B from a2 and b2 (it has no second
// product), so LoRA's dA += dhᵀ·x' and dB += s·dyᵀ·h run as one dispatch.

// The element type of B. For frozen weights stored in f16 (B is always the weight)
// the registry builds a variant whose B is `array<u32>`, two halves a word, that
// `weight` and `weight4` widen (`kernels::f16_variant`).
alias BElem = f32;

struct Params {
    m: u32, n: u32, k: u32, batch: u32,
    a_off: u32, b_off: u32, c_off: u32, lda: u32,
    a_stride: u32, b_stride: u32, c_stride: u32, ldb: u32,
    alpha: f32, beta: f32, ldc: u32, k2: u32,
    a2_off: u32, b2_off: u32, lda2: u32, ldb2: u32,
    alpha2: f32, drop_p: f32, drop_key: u32, drop_base: u32,
    alt: u32, glu_up: u32, epi_g: u32, epi_du: u32,
    tile0: u32, tiles: u32, tiles_n: u32, pad0: u32,
}

override TRANS_A: bool = false;
override TRANS_B: bool = false;
// Dropout: 0 none, 1 on A as loaded, 2 on B as loaded, 3 on the second product.
override DROP: u32 = 0u;
// Workgroup z picks the product (ps[z]) instead of the batch.
override GROUPED: bool = false;
// Products of the group may read A and B from a2 and b2 (their `alt`).
override ALT: bool = false;
// SwiGLU on A as loaded (1), or on B (2).
override GLU: u32 = 0u;
// SwiGLU's backward in the store (1).
override EPI: u32 = 0u;
const GROUP_MAX: u32 = 8u;

@group(0) @binding(0) var<uniform> ps: array<Params, GROUP_MAX>;

// The product workgroup `wid` computes (x; GROUP_MAX for a group's spare workgroup)
// and its tile's column and row of tiles (y, z): in a group, flat tile
// wid.y·65535 + wid.x of the products' tiles in turn; else (0, wid.x, wid.y).
// No early returns: kernels/coop.wgsl calls it before cooperative operations, which
// naga allows only in uniform control flow.
fn product_tile(wid: vec3<u32>) -> vec3<u32> {
    var r = vec3<u32>(0u, wid.x, wid.y);
    if (GROUPED) {
        r = vec3<u32>(GROUP_MAX, 0u, 0u);
        let t = wid.y * 65535u + wid.x;
        for (var i = 0u; i < GROUP_MAX; i++) {
            if (r.x == GROUP_MAX && t >= ps[i].tile0 && t < ps[i].tile0 + ps[i].tiles) {
                let lt = t - ps[i].tile0;
                r = vec3<u32>(i, lt % ps[i].tiles_n, lt / ps[i].tiles_n);
            }
        }
    }
    return r;
}
// The product this invocation computes (ps[0], or ps[z] in a group), for the loads'
// and stores' indexing; loop bounds read the uniform copy, so barriers stay uniform.
var<private> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;       // op(A) [M, K] per batch
@group(0) @binding(2) var<storage, read> b: array<BElem>;     // op(B) [K, N] per batch
@group(0) @binding(3) var<storage, read_write> c: array<f32>; // C [M, N] per batch
@group(0) @binding(4) var<storage, read> a2: array<f32>;      // op(A2) [M, K2]
@group(0) @binding(5) var<storage, read> b2: array<f32>;      // op(B2) [K2, N]
@group(0) @binding(6) var<storage, read> aux: array<f32>;     // EPI 1: gate, up

// hash(v): lowbias32, from kernels/hash.wgsl, which the registry puts in front.

// v, the operand's element at stored index i, after inverted dropout.
fn dropped(i: u32, v: f32) -> f32 {
    // p = 0 keeps every element as it is (a group's products without dropout).
    if (p.drop_p == 0.0) { return v; }
    let u = f32(hash((i - p.drop_base) ^ p.drop_key)) / 4294967296.0;
    return select(0.0, v / (1.0 - p.drop_p), u >= p.drop_p);
}

// As kernels/swiglu.wgsl: never forms exp(+large).
fn sigmoid(g: f32) -> f32 {
    if (g >= 0.0) { return 1.0 / (1.0 + exp(-g)); }
    let e = exp(g);
    return e / (1.0 + e);
}

// silu(g) · u, as kernels/swiglu.wgsl makes it.
fn glu(g: f32, u: f32) -> f32 {
    return g * sigmoid(g) * u;
}

// Element i of A as stored (of a2 for an `alt` product; through SwiGLU under GLU 1).
fn a_elem(i: u32) -> f32 {
    if (ALT && p.alt != 0u) { return a2[i]; }
    if (GLU == 1u) { return glu(a[i], a[i + p.glu_up]); }
    return a[i];
}

fn a_at(base: u32, m: u32, k: u32) -> f32 {
    var i = base + m * p.lda + k;
    if (TRANS_A) { i = base + k * p.lda + m; }
    if (DROP == 1u) { return dropped(i, a_elem(i)); }
    return a_elem(i);
}

fn a2_at(m: u32, k: u32) -> f32 {
    if (TRANS_A) { return a2[p.a2_off + k * p.lda2 + m]; }
    return a2[p.a2_off + m * p.lda2 + k];
}

fn b2_at(k: u32, n: u32) -> f32 {
    if (TRANS_B) { return b2[p.b2_off + n * p.ldb2 + k]; }
    return b2[p.b2_off + k * p.ldb2 + n];
}

// Element i of B as stored. `slot` (0–3) tells apart the invocation's loads that
// walk different rows of the weight; the packed variant keeps a block scale per slot.
fn weight(i: u32, slot: u32) -> f32 { return f32(b[i]); }
// Elements i..i+3 of B, i a multiple of 4 (the packed variant decodes them at once).
fn weight4(i: u32, slot: u32) -> vec4<f32> { return vec4<f32>(f32(b[i]), f32(b[i + 1u]), f32(b[i + 2u]), f32(b[i + 3u])); }

// `weight`, or b2's element i for an `alt` product; through SwiGLU under GLU 2.
fn b_elem(i: u32, slot: u32) -> f32 {
    if (ALT && p.alt != 0u) { return b2[i]; }
    if (GLU == 2u) { return glu(weight(i, slot), weight(i + p.glu_up, slot)); }
    return weight(i, slot);
}

fn b_at(base: u32, k: u32, n: u32, slot: u32) -> f32 {
    var i = base + k * p.ldb + n;
    if (TRANS_B) { i = base + n * p.ldb + k; }
    if (DROP == 2u) { return dropped(i, b_elem(i, slot)); }
    return b_elem(i, slot);
}

// `weight4` (b2's for an `alt` product) with B's dropout.
fn b4_at(i: u32, slot: u32) -> vec4<f32> {
    var w: vec4<f32>;
    if ((ALT && p.alt != 0u) || GLU == 2u) {
        w = vec4<f32>(b_elem(i, slot), b_elem(i + 1u, slot), b_elem(i + 2u, slot), b_elem(i + 3u, slot));
    } else {
        w = weight4(i, slot);
    }
    if (DROP == 2u) { return vec4<f32>(dropped(i, w.x), dropped(i + 1u, w.y), dropped(i + 2u, w.z), dropped(i + 3u, w.w)); }
    return w;
}

// Write a 4×4 block at (m0, n0): alpha·acc + beta·C + alpha2·acc2 (the second
// product, through dropout under DROP 3); rows and columns past the edge are dropped.
fn store_block(base: u32, m0: u32, n0: u32, acc: array<vec4<f32>, 4>, acc2: array<vec4<f32>, 4>) {
    for (var i = 0u; i < 4u; i++) {
        let m = m0 + i;
        if (m >= p.m) { return; }
        for (var j = 0u; j < 4u; j++) {
            let n = n0 + j;
            if (n < p.n) {
                let idx = base + m * p.ldc + n;
                var v = p.alpha * acc[i][j];
                if (p.beta != 0.0) { v += p.beta * c[idx]; }
                if (p.k2 > 0u) {
                    var s = p.alpha2 * acc2[i][j];
                    if (DROP == 3u) { s = dropped(idx, s); }
                    v += s;
                }
                if (EPI == 1u) {
                    let e = m * p.ldc + n;
                    let g = aux[p.epi_g + e];
                    let u = aux[p.epi_g + p.glu_up + e];
                    let sg = sigmoid(g);
                    c[idx] += v * u * sg * (1.0 + g * (1.0 - sg));
                    c[idx + p.epi_du] += v * g * sg;
                } else {
                    c[idx] = v;
                }
            }
        }
    }
}

// The second product op(A2)·op(B2) of a 4×4 block at rows `ms`, columns `ns` (clamped
// in bounds), summed in registers over K2 (none where K2 is 0).
fn second_block(ms: vec4<u32>, ns: vec4<u32>) -> array<vec4<f32>, 4> {
    var acc2: array<vec4<f32>, 4>;
    for (var k2 = 0u; k2 < p.k2; k2++) {
        let av = vec4<f32>(a2_at(ms.x, k2), a2_at(ms.y, k2), a2_at(ms.z, k2), a2_at(ms.w, k2));
        let bv = vec4<f32>(b2_at(k2, ns.x), b2_at(k2, ns.y), b2_at(k2, ns.z), b2_at(k2, ns.w));
        acc2[0] += av.x * bv;
        acc2[1] += av.y * bv;
        acc2[2] += av.z * bv;
        acc2[3] += av.w * bv;
    }
    return acc2;
}

// Register-blocked variant for CPU drivers: each invocation owns a 4×4 block of C and
// reads A and B straight from memory; no workgroup memory, no barriers.
// Grid: (ceil(N/32), ceil(M/32), batch), or a group's tiles (`product_tile`); a
// workgroup covers 32×32 of C.
@compute @workgroup_size(8, 8, 1)
fn matmul_reg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let pt = product_tile(wid);
    if (pt.x >= GROUP_MAX) { return; }
    p = ps[pt.x];
    let blk = pt.yz * 8u + lid.xy;
    let n0 = blk.x * 4u;
    let m0 = blk.y * 4u;
    let bi = select(wid.z, 0u, GROUPED);
    if (m0 >= p.m || n0 >= p.n || bi >= p.batch) { return; }
    let ab = p.a_off + bi * p.a_stride;
    let bb = p.b_off + bi * p.b_stride;
    // Clamp edge rows/columns so every load stays in bounds; their results are dropped.
    let ms = vec4<u32>(m0, min(m0 + 1u, p.m - 1u), min(m0 + 2u, p.m - 1u), min(m0 + 3u, p.m - 1u));
    let ns = vec4<u32>(n0, min(n0 + 1u, p.n - 1u), min(n0 + 2u, p.n - 1u), min(n0 + 3u, p.n - 1u));
    var acc: array<vec4<f32>, 4>;
    var k = 0u;
    // Where B's rows hold whole fours at multiples of 4, read four at a time (`weight4`:
    // a word of blocks decoded at once), summing in the same order as below.
    if ((bb & 3u) == 0u && (p.ldb & 3u) == 0u) {
        if (TRANS_B) {
            // Four weight rows, four steps of k each: w[j] is row ns[j] at k..k+3.
            for (; k + 4u <= p.k; k += 4u) {
                let w = transpose(mat4x4<f32>(b4_at(bb + ns.x * p.ldb + k, 0u), b4_at(bb + ns.y * p.ldb + k, 1u),
                                              b4_at(bb + ns.z * p.ldb + k, 2u), b4_at(bb + ns.w * p.ldb + k, 3u)));
                for (var kk = 0u; kk < 4u; kk++) {
                    let av = vec4<f32>(a_at(ab, ms.x, k + kk), a_at(ab, ms.y, k + kk), a_at(ab, ms.z, k + kk), a_at(ab, ms.w, k + kk));
                    acc[0] += av.x * w[kk];
                    acc[1] += av.y * w[kk];
                    acc[2] += av.z * w[kk];
                    acc[3] += av.w * w[kk];
                }
            }
        } else if (n0 + 3u < p.n) {
            for (; k < p.k; k++) {
                let av = vec4<f32>(a_at(ab, ms.x, k), a_at(ab, ms.y, k), a_at(ab, ms.z, k), a_at(ab, ms.w, k));
                let bv = b4_at(bb + k * p.ldb + n0, 0u);
                acc[0] += av.x * bv;
                acc[1] += av.y * bv;
                acc[2] += av.z * bv;
                acc[3] += av.w * bv;
            }
        }
    }
    for (; k < p.k; k++) {
        let av = vec4<f32>(a_at(ab, ms.x, k), a_at(ab, ms.y, k), a_at(ab, ms.z, k), a_at(ab, ms.w, k));
        // Transposed, the four columns are four weight rows read along k (a slot each);
        // otherwise four neighbours in one row, one block.
        var bv: vec4<f32>;
        if (TRANS_B) {
            bv = vec4<f32>(b_at(bb, k, ns.x, 0u), b_at(bb, k, ns.y, 1u), b_at(bb, k, ns.z, 2u), b_at(bb, k, ns.w, 3u));
        } else {
            bv = vec4<f32>(b_at(bb, k, ns.x, 0u), b_at(bb, k, ns.y, 0u), b_at(bb, k, ns.z, 0u), b_at(bb, k, ns.w, 0u));
        }
        acc[0] += av.x * bv;
        acc[1] += av.y * bv;
        acc[2] += av.z * bv;
        acc[3] += av.w * bv;
    }
    store_block(p.c_off + bi * p.c_stride, m0, n0, acc, second_block(ms, ns));
}

// Tiled variant for GPUs: a 16×16 workgroup computes a 64×64 tile of C, staging
// 64×16 slabs of op(A) and op(B) in workgroup memory; each invocation owns 4×4.
// Grid: (ceil(N/64), ceil(M/64), batch), or a group's tiles (`product_tile`).
const TS: u32 = 64u;
const BK: u32 = 16u;
var<workgroup> tile_a: array<f32, 1024>; // [BK][TS]: tile_a[k * TS + m]
var<workgroup> tile_b: array<f32, 1024>; // [BK][TS]: tile_b[k * TS + n]

// Element e of a slab `depth` deep and TS wide: (k, m) of op(A), (k, n) of op(B).
// Loads walk k fastest where the stored operand is contiguous in k, else m or n.
fn slab_a(e: u32, depth: u32) -> vec2<u32> {
    if (TRANS_A) { return vec2<u32>(e / TS, e % TS); }
    return vec2<u32>(e % depth, e / depth);
}

fn slab_b(e: u32, depth: u32) -> vec2<u32> {
    if (TRANS_B) { return vec2<u32>(e % depth, e / depth); }
    return vec2<u32>(e / TS, e % TS);
}

@compute @workgroup_size(16, 16, 1)
fn matmul_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let pt = product_tile(wid);
    if (pt.x >= GROUP_MAX) { return; }
    let q = ps[pt.x];
    p = q;
    let tm = pt.z * TS;
    let tn = pt.y * TS;
    if (tm >= q.m || tn >= q.n) { return; }
    let bi = select(wid.z, 0u, GROUPED);
    let ab = p.a_off + bi * p.a_stride;
    let bb = p.b_off + bi * p.b_stride;
    let tid = lid.y * 16u + lid.x;
    // Phase 0 sums op(A)·op(B) over K, phase 1 op(A2)·op(B2) over K2 (if any).
    var acc1: array<vec4<f32>, 4>;
    var acc: array<vec4<f32>, 4>;
    for (var ph = 0u; ph < 2u; ph++) {
        let kn = select(q.k, q.k2, ph == 1u);
        for (var k0 = 0u; k0 < kn; k0 += BK) {
            for (var r = 0u; r < 4u; r++) {
                let e = tid + r * 256u;
                let sa = slab_a(e, BK);
                let kk = sa.x;
                let mm = sa.y;
                let gm = tm + mm;
                let gk = k0 + kk;
                var va: f32;
                if (ph == 0u) { va = a_at(ab, min(gm, p.m - 1u), min(gk, kn - 1u)); } else { va = a2_at(min(gm, p.m - 1u), min(gk, kn - 1u)); }
                tile_a[kk * TS + mm] = select(0.0, va, gm < p.m && gk < kn);
                let sb = slab_b(e, BK);
                let kb = sb.x;
                let nn = sb.y;
                let gn = tn + nn;
                let gkb = k0 + kb;
                var vb: f32;
                if (ph == 0u) { vb = b_at(bb, min(gkb, kn - 1u), min(gn, p.n - 1u), r); } else { vb = b2_at(min(gkb, kn - 1u), min(gn, p.n - 1u)); }
                tile_b[kb * TS + nn] = select(0.0, vb, gn < p.n && gkb < kn);
            }
            workgroupBarrier();
            for (var kk = 0u; kk < BK; kk++) {
                let ao = kk * TS + lid.y * 4u;
                let bo = kk * TS + lid.x * 4u;
                let av = vec4<f32>(tile_a[ao], tile_a[ao + 1u], tile_a[ao + 2u], tile_a[ao + 3u]);
                let bv = vec4<f32>(tile_b[bo], tile_b[bo + 1u], tile_b[bo + 2u], tile_b[bo + 3u]);
                acc[0] += av.x * bv;
                acc[1] += av.y * bv;
                acc[2] += av.z * bv;
                acc[3] += av.w * bv;
            }
            workgroupBarrier();
        }
        if (ph == 0u) {
            acc1 = acc;
            acc = array<vec4<f32>, 4>();
        }
    }
    if (bi < p.batch) {
        store_block(p.c_off + bi * p.c_stride, tm + lid.y * 4u, tn + lid.x * 4u, acc1, acc);
    }
}

// Wide tiled variant for GPUs (`Caps::wide_matmul`): a 16×16 workgroup computes a
// 128×128 tile of C and each invocation 8×8 of it, as four 4×4 blocks 64 rows and
// columns apart, so its reads of workgroup memory are vec4s that neighbours share or
// take side by side. Slabs 8 deep of op(A) and op(B) are double-buffered in workgroup
// memory (16 KiB, WebGPU's default limit): the next slab is loaded from memory into
// registers while this one is summed, then stored into the other buffer, one barrier a
// slab. Each invocation loads four neighbours of each operand a slab, a vec4 of memory
// (`wide_slot`; a weight's four along k decoded at once). The slabs of the second
// product follow the first's.
// Grid: (ceil(N/128), ceil(M/128), batch), or a group's tiles (`product_tile`).
const WS: u32 = 128u;
const WK: u32 = 8u;
var<workgroup> wide_a: array<vec4<f32>, 512>; // [2][WK][WS/4]: rows 4g..4g+3 at k in [buf·256 + k·32 + g]
var<workgroup> wide_b: array<vec4<f32>, 512>; // [2][WK][WS/4]: columns 4g..4g+3

// Where invocation `tid` loads in a slab: (first k, row or column). An operand stored
// with k fastest (`k_fast`) gives each invocation four neighbours along k of one row
// (tid / 2, from k (tid % 2)·4); another four neighbouring rows or columns (4·(tid % 32),
// at k tid / 32). Either way a vec4 of memory.
fn wide_slot(tid: u32, k_fast: bool) -> vec2<u32> {
    if (k_fast) { return vec2<u32>((tid % 2u) * 4u, tid / 2u); }
    return vec2<u32>(tid / (WS / 4u), (tid % (WS / 4u)) * 4u);
}

// op(A)'s element (m, k) of phase `ph` (op(A2) in phase 1), zero past the edges.
fn wide_a_elem(ab: u32, ph: u32, kn: u32, m: u32, k: u32) -> f32 {
    let cm = min(m, p.m - 1u);
    let ck = min(k, kn - 1u);
    var v: f32;
    if (ph == 0u) { v = a_at(ab, cm, ck); } else { v = a2_at(cm, ck); }
    return select(0.0, v, m < p.m && k < kn);
}

// op(B)'s element (k, n) of phase `ph` (op(B2) in phase 1), zero past the edges.
fn wide_b_elem(bb: u32, ph: u32, kn: u32, k: u32, n: u32, slot: u32) -> f32 {
    let ck = min(k, kn - 1u);
    let cn = min(n, p.n - 1u);
    var v: f32;
    if (ph == 0u) { v = b_at(bb, ck, cn, slot); } else { v = b2_at(ck, cn); }
    return select(0.0, v, n < p.n && k < kn);
}

// Slab t's four elements of op(A) for invocation tid (slabs of the second product
// after the first's `nt0`), and of op(B); `wide_slot` says which.
fn wide_load_a(ab: u32, t: u32, nt0: u32, tm: u32, tid: u32) -> vec4<f32> {
    let ph = select(0u, 1u, t >= nt0);
    let kn = select(p.k, p.k2, ph == 1u);
    let s = wide_slot(tid, !TRANS_A);
    let k = (t - select(0u, nt0, ph == 1u)) * WK + s.x;
    let m = tm + s.y;
    if (!TRANS_A) {
        return vec4<f32>(wide_a_elem(ab, ph, kn, m, k), wide_a_elem(ab, ph, kn, m, k + 1u),
                         wide_a_elem(ab, ph, kn, m, k + 2u), wide_a_elem(ab, ph, kn, m, k + 3u));
    }
    return vec4<f32>(wide_a_elem(ab, ph, kn, m, k), wide_a_elem(ab, ph, kn, m + 1u, k),
                     wide_a_elem(ab, ph, kn, m + 2u, k), wide_a_elem(ab, ph, kn, m + 3u, k));
}

fn wide_load_b(bb: u32, t: u32, nt0: u32, tn: u32, tid: u32) -> vec4<f32> {
    let ph = select(0u, 1u, t >= nt0);
    let kn = select(p.k, p.k2, ph == 1u);
    let s = wide_slot(tid, TRANS_B);
    let k = (t - select(0u, nt0, ph == 1u)) * WK + s.x;
    let n = tn + s.y;
    if (TRANS_B) {
        // Four k of weight row n, at once where they lie in a whole four (`b4_at`: a
        // word of f16 pairs or of packed blocks decoded together).
        if (ph == 0u && (bb & 3u) == 0u && (p.ldb & 3u) == 0u && k + 3u < kn && n < p.n) {
            return b4_at(bb + n * p.ldb + k, 0u);
        }
        return vec4<f32>(wide_b_elem(bb, ph, kn, k, n, 0u), wide_b_elem(bb, ph, kn, k + 1u, n, 0u),
                         wide_b_elem(bb, ph, kn, k + 2u, n, 0u), wide_b_elem(bb, ph, kn, k + 3u, n, 0u));
    }
    return vec4<f32>(wide_b_elem(bb, ph, kn, k, n, 0u), wide_b_elem(bb, ph, kn, k, n + 1u, 0u),
                     wide_b_elem(bb, ph, kn, k, n + 2u, 0u), wide_b_elem(bb, ph, kn, k, n + 3u, 0u));
}

// An invocation's four loads into buffer `buf` of the slabs: a vec4 along m (n), or
// four neighbours along k each in its own row of the slab.
fn wide_store_a(buf: u32, s: vec2<u32>, v: vec4<f32>) {
    let i = buf + s.x * 32u + s.y / 4u;
    if (TRANS_A) { wide_a[i] = v; return; }
    let c = s.y % 4u;
    wide_a[i][c] = v.x;
    wide_a[i + 32u][c] = v.y;
    wide_a[i + 64u][c] = v.z;
    wide_a[i + 96u][c] = v.w;
}

fn wide_store_b(buf: u32, s: vec2<u32>, v: vec4<f32>) {
    let i = buf + s.x * 32u + s.y / 4u;
    if (!TRANS_B) { wide_b[i] = v; return; }
    let c = s.y % 4u;
    wide_b[i][c] = v.x;
    wide_b[i + 32u][c] = v.y;
    wide_b[i + 64u][c] = v.z;
    wide_b[i + 96u][c] = v.w;
}

// acc += the outer product of a (four rows) and b (four columns).
fn outer4(acc: ptr<function, array<vec4<f32>, 4>>, a: vec4<f32>, b: vec4<f32>) {
    (*acc)[0] += a.x * b;
    (*acc)[1] += a.y * b;
    (*acc)[2] += a.z * b;
    (*acc)[3] += a.w * b;
}

@compute @workgroup_size(16, 16, 1)
fn matmul_wide(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let pt = product_tile(wid);
    if (pt.x >= GROUP_MAX) { return; }
    let q = ps[pt.x];
    p = q;
    let tm = pt.z * WS;
    let tn = pt.y * WS;
    if (tm >= q.m || tn >= q.n) { return; }
    let bi = select(wid.z, 0u, GROUPED);
    let ab = p.a_off + bi * p.a_stride;
    let bb = p.b_off + bi * p.b_stride;
    let tid = lid.y * 16u + lid.x;
    let sa = wide_slot(tid, !TRANS_A);
    let sb = wide_slot(tid, TRANS_B);
    // Slabs of the first product, then of the second (none where K2 is 0).
    let nt0 = (q.k + WK - 1u) / WK;
    let nt = nt0 + (q.k2 + WK - 1u) / WK;
    wide_store_a(0u, sa, wide_load_a(ab, 0u, nt0, tm, tid));
    wide_store_b(0u, sb, wide_load_b(bb, 0u, nt0, tn, tid));
    workgroupBarrier();
    // The four blocks: rows (0 or 64) + 4·lid.y, columns (0 or 64) + 4·lid.x; `first`
    // keeps the first product's sums once the second's begin.
    var acc00: array<vec4<f32>, 4>;
    var acc01: array<vec4<f32>, 4>;
    var acc10: array<vec4<f32>, 4>;
    var acc11: array<vec4<f32>, 4>;
    var first00: array<vec4<f32>, 4>;
    var first01: array<vec4<f32>, 4>;
    var first10: array<vec4<f32>, 4>;
    var first11: array<vec4<f32>, 4>;
    for (var t = 0u; t < nt; t++) {
        let cur = (t & 1u) * 256u;
        let more = t + 1u < nt;
        var na = vec4<f32>();
        var nb = vec4<f32>();
        if (more) {
            na = wide_load_a(ab, t + 1u, nt0, tm, tid);
            nb = wide_load_b(bb, t + 1u, nt0, tn, tid);
        }
        for (var kk = 0u; kk < WK; kk++) {
            let o = cur + kk * 32u;
            let a0 = wide_a[o + lid.y];
            let a1 = wide_a[o + 16u + lid.y];
            let b0 = wide_b[o + lid.x];
            let b1 = wide_b[o + 16u + lid.x];
            outer4(&acc00, a0, b0);
            outer4(&acc01, a0, b1);
            outer4(&acc10, a1, b0);
            outer4(&acc11, a1, b1);
        }
        if (t + 1u == nt0) {
            first00 = acc00; first01 = acc01; first10 = acc10; first11 = acc11;
            acc00 = array<vec4<f32>, 4>(); acc01 = array<vec4<f32>, 4>();
            acc10 = array<vec4<f32>, 4>(); acc11 = array<vec4<f32>, 4>();
        }
        if (more) {
            let nxt = 256u - cur;
            wide_store_a(nxt, sa, na);
            wide_store_b(nxt, sb, nb);
        }
        workgroupBarrier();
    }
    if (bi < p.batch) {
        let base = p.c_off + bi * p.c_stride;
        let m0 = tm + lid.y * 4u;
        let n0 = tn + lid.x * 4u;
        store_block(base, m0, n0, first00, acc00);
        store_block(base, m0, n0 + 64u, first01, acc01);
        store_block(base, m0 + 64u, n0, first10, acc10);
        store_block(base, m0 + 64u, n0 + 64u, first11, acc11);
    }
}

// Split-K's sum (`Caps::split_k`): a product with few tiles and a long k runs its
// k-ranges at once, as a group whose products write alpha·op(A)·op(B) over their range
// (the second product beside the last range) each into its own slice of a scratch
// buffer, laid out as C is (row stride ldc); bound here as `a`, slice r from
// r·a_stride. This adds the slices in order, so the result does not depend on which
// range finished first, and stores C = Σ slices + beta·C. ps[0] holds m, n, ldc,
// c_off, beta, a_stride, and in k how many slices.
// Grid: (ceil(N/64), M); an invocation per element of C.
@compute @workgroup_size(64, 1, 1)
fn matmul_split_sum(@builtin(global_invocation_id) gid: vec3<u32>) {
    let q = ps[0];
    if (gid.x >= q.n || gid.y >= q.m) { return; }
    let e = gid.y * q.ldc + gid.x;
    var s = 0.0;
    for (var r = 0u; r < q.k; r++) {
        s += a[r * q.a_stride + e];
    }
    if (q.beta != 0.0) { s += q.beta * c[q.c_off + e]; }
    c[q.c_off + e] = s;
}
