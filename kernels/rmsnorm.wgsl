// RMSNorm in the Hugging Face Llama convention: y = w · x / sqrt(mean(x²) + eps).
//   x, y, dy, dx  [R, C]   (R rows: B·T tokens, or B·T·NH heads for Qwen3's q/k norm)
//   w, dw         [C]
//   rstd          [R]: 1 / sqrt(mean(x²) + eps), saved for the backward
// Backward adds into dx and dw.
// Two variants, chosen from the adapter (`Caps::variant`): `*_row` kernels run one
// invocation per row (no barriers: CPU drivers); `*_tiled` kernels run a workgroup of
// 64 per row, reading it coalesced and reducing in workgroup memory (GPUs), and sum
// dw in two passes: 64 columns × a block of rows per workgroup, then the blocks.
// LoRA's down products in the forward (`rmsnorm_forward_down_*`): where y is the
// input of linear layers with LoRA pairs (q/k/v after the input norm, gate/up after
// the post-attention norm), the row kernel also makes each pair's
//   h [R, RANK] = dropout(y) · Aᵀ,   A [RANK, C]
// (up to 4 pairs of one rank, A's and h's at offsets into one binding each; dropout as
// kernels/matmul.wgsl makes it on A as loaded: element i of y is kept, as y / (1 − p),
// where hash(i ^ key) / 2³² ≥ p, with each pair's key), so no product computes them.
// LoRA's dh in the backward (`*_dx_dh_*`): where dx is the output gradient of a linear layer
// with a LoRA pair (the post-attention norm's dx is o_proj's, the input norm's is the
// previous layer's down_proj's), the row kernel also makes the pair's
//   dh [R, RANK] = s · dx · B,   B [C, RANK]
// from the finished row of dx, so no product of its own computes it.

struct Params {
    rows: u32, c: u32, eps: f32, r0: u32,
    rank: u32, s: f32, pairs: u32, drop_p: f32,
    a_off: vec4<u32>, h_off: vec4<u32>, key: vec4<u32>,
}


@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read_write> rstd: array<f32>;
@group(0) @binding(5) var<storage, read> rstd_in: array<f32>;
@group(0) @binding(6) var<storage, read> dy: array<f32>;
@group(0) @binding(7) var<storage, read_write> dx: array<f32>;
@group(0) @binding(8) var<storage, read_write> dw: array<f32>;
@group(0) @binding(9) var<storage, read_write> part: array<f32>;  // [ceil(R/DW_ROWS), C]
@group(0) @binding(10) var<storage, read> part_in: array<f32>;
@group(0) @binding(11) var<storage, read> lora_b: array<f32>;      // DH: B [C, RANK]
@group(0) @binding(12) var<storage, read_write> dh: array<f32>;    // DH: [R, RANK]
@group(0) @binding(13) var<storage, read> lora_a: array<f32>;      // down: A's [RANK, C]
@group(0) @binding(14) var<storage, read_write> lora_h: array<f32>; // down: h's [R, RANK]

// hash(v): lowbias32, from kernels/hash.wgsl, which the registry puts in front.

// Element i of y (at stored index i of [R, C]) through pair g's dropout.
fn dropped(g: u32, i: u32, v: f32) -> f32 {
    if (p.drop_p == 0.0) { return v; }
    let u = f32(hash(i ^ p.key[g])) / 4294967296.0;
    return select(0.0, v / (1.0 - p.drop_p), u >= p.drop_p);
}

// One row's norm, by one invocation: y and rstd.
fn forward_row(r: u32) {
    let base = r * p.c;
    var ss = 0.0;
    for (var i = 0u; i < p.c; i++) { let xi = x[base + i]; ss += xi * xi; }
    let rs = inverseSqrt(ss / f32(p.c) + p.eps);
    for (var i = 0u; i < p.c; i++) { y[base + i] = w[i] * (x[base + i] * rs); }
    rstd[r] = rs;
}

// One invocation per row. Grid: (ceil(R/64), 1, 1).
@compute @workgroup_size(64, 1, 1)
fn rmsnorm_forward_row(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.x < p.rows) { forward_row(gid.x); }
}

// The same, then the LoRA pairs' h from the finished row. Grid as above.
@compute @workgroup_size(64, 1, 1)
fn rmsnorm_forward_down_row(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    if (r >= p.rows) { return; }
    forward_row(r);
    let base = r * p.c;
    for (var g = 0u; g < p.pairs; g++) {
        for (var j0 = 0u; j0 < p.rank; j0 += DH_COLS) {
            var acc = zeros();
            let nj = min(DH_COLS, p.rank - j0);
            for (var i = 0u; i < p.c; i++) {
                let v = dropped(g, base + i, y[base + i]);
                for (var j = 0u; j < nj; j++) { acc[j] += v * lora_a[p.a_off[g] + (j0 + j) * p.c + i]; }
            }
            for (var j = 0u; j < nj; j++) { lora_h[p.h_off[g] + r * p.rank + j0 + j] = acc[j]; }
        }
    }
}

// dx += rstd · (g − n · mean(g · n)), with g = dy · w and n = x · rstd.
// One invocation per row. Grid: (ceil(R/64), 1, 1).
@compute @workgroup_size(64, 1, 1)
fn rmsnorm_backward_dx_row(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.x < p.rows) { dx_row(gid.x); }
}

// The same, then LoRA's dh from the finished row (DH). Grid as above.
@compute @workgroup_size(64, 1, 1)
fn rmsnorm_backward_dx_dh_row(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    if (r >= p.rows) { return; }
    dx_row(r);
    let base = r * p.c;
    // dh[r, j] = s · Σ_i dx[r, i] · B[i, j], DH_COLS columns at a time.
    for (var j0 = 0u; j0 < p.rank; j0 += DH_COLS) {
        var acc = zeros();
        let nj = min(DH_COLS, p.rank - j0);
        for (var i = 0u; i < p.c; i++) {
            let v = dx[base + i];
            for (var j = 0u; j < nj; j++) { acc[j] += v * lora_b[i * p.rank + j0 + j]; }
        }
        for (var j = 0u; j < nj; j++) { dh[r * p.rank + j0 + j] = p.s * acc[j]; }
    }
}

// Row r of dx, by one invocation.
fn dx_row(r: u32) {
    let base = r * p.c;
    let rs = rstd_in[r];
    var gn = 0.0;
    for (var i = 0u; i < p.c; i++) { gn += dy[base + i] * w[i] * x[base + i] * rs; }
    let mean_gn = gn / f32(p.c);
    for (var i = 0u; i < p.c; i++) {
        let n = x[base + i] * rs;
        dx[base + i] += rs * (dy[base + i] * w[i] - n * mean_gn);
    }
}

// Columns of dh a row kernel sums at once (DH).
const DH_COLS: u32 = 16u;

// DH_COLS zeros, stored one by one: Chromium's WGSL compiler (on SwiftShader at least)
// zeroes a `var` declared without a value in a loop once, not at every iteration as
// WGSL says, so a second pair or block of columns would add onto the first.
fn zeros() -> array<f32, DH_COLS> {
    var z: array<f32, DH_COLS>;
    for (var j = 0u; j < DH_COLS; j++) { z[j] = 0.0; }
    return z;
}

// dw[c] += Σ_r dy[r, c] · x[r, c] · rstd[r] over rows r0..rows: one invocation per
// column, so no atomics; the launcher calls it on row ranges that fit the loop budget.
// Grid: (ceil(C/64), 1, 1).
@compute @workgroup_size(64, 1, 1)
fn rmsnorm_backward_dw_row(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= p.c) { return; }
    var acc = 0.0;
    for (var r = p.r0; r < p.rows; r++) { acc += dy[r * p.c + i] * x[r * p.c + i] * rstd_in[r]; }
    dw[i] += acc;
}

// ---- tiled (GPU) -------------------------------------------------------------
const DW_ROWS: u32 = 64u; // rows one dw workgroup sums
var<workgroup> red: array<f32, 64>;

// Row r of a grid that spills past 65,535 workgroups into y.
fn row_of(wid: vec3<u32>) -> u32 { return wid.y * 65535u + wid.x; }

// The sum of every invocation's `v` (all 64 return it). Uniform control flow only.
fn workgroup_sum(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var w = 32u; w > 0u; w >>= 1u) {
        if (lid < w) { red[lid] += red[lid + w]; }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
}

// A workgroup per row. Grid: (min(R, 65535), ceil(R/65535), 1).
@compute @workgroup_size(64, 1, 1)
fn rmsnorm_forward_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let r = row_of(wid);
    if (r < p.rows) { forward_tiled(r, lid3.x); }
}

// Row r's norm, by the workgroup (invocation lid).
fn forward_tiled(r: u32, lid: u32) {
    let base = r * p.c;
    var ss = 0.0;
    for (var i = lid; i < p.c; i += 64u) { let xi = x[base + i]; ss += xi * xi; }
    let rs = inverseSqrt(workgroup_sum(lid, ss) / f32(p.c) + p.eps);
    for (var i = lid; i < p.c; i += 64u) { y[base + i] = w[i] * (x[base + i] * rs); }
    if (lid == 0u) { rstd[r] = rs; }
}

// The same, then the LoRA pairs' h from the finished row: each invocation sums its own
// columns (which it just wrote) for DH_COLS columns of h, then the workgroup adds the
// 64 partial sums (as the dh kernel below). Grid as above.
@compute @workgroup_size(64, 1, 1)
fn rmsnorm_forward_down_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let lid = lid3.x;
    let r = row_of(wid);
    if (r >= p.rows) { return; }
    forward_tiled(r, lid);
    let base = r * p.c;
    for (var g = 0u; g < p.pairs; g++) {
        for (var j0 = 0u; j0 < p.rank; j0 += DH_COLS) {
            var acc = zeros();
            let nj = min(DH_COLS, p.rank - j0);
            for (var i = lid; i < p.c; i += 64u) {
                let v = dropped(g, base + i, y[base + i]);
                for (var j = 0u; j < nj; j++) { acc[j] += v * lora_a[p.a_off[g] + (j0 + j) * p.c + i]; }
            }
            let sums = sum_cols(lid, acc);
            if (lid < nj) { lora_h[p.h_off[g] + r * p.rank + j0 + lid] = sums; }
        }
    }
}

// Each invocation's DH_COLS partial sums added over the workgroup: invocation j (< DH_COLS)
// returns column j's total. Uniform control flow only.
fn sum_cols(lid: u32, acc: array<f32, DH_COLS>) -> f32 {
    for (var j = 0u; j < DH_COLS; j++) { red_dh[j * 64u + lid] = acc[j]; }
    workgroupBarrier();
    for (var h = 32u; h > 0u; h >>= 1u) {
        if (lid < h) {
            for (var j = 0u; j < DH_COLS; j++) { red_dh[j * 64u + lid] += red_dh[j * 64u + lid + h]; }
        }
        workgroupBarrier();
    }
    let total = red_dh[min(lid, DH_COLS - 1u) * 64u];
    workgroupBarrier();
    return total;
}

// A workgroup per row. Grid: (min(R, 65535), ceil(R/65535), 1).
@compute @workgroup_size(64, 1, 1)
fn rmsnorm_backward_dx_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let r = row_of(wid);
    if (r < p.rows) { dx_tiled(r, lid3.x); }
}

// The same, then LoRA's dh from the finished row (DH): each invocation sums its own
// columns of the row (which it just wrote) for DH_COLS columns of dh, then the
// workgroup adds the 64 partial sums. Grid as above.
@compute @workgroup_size(64, 1, 1)
fn rmsnorm_backward_dx_dh_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let lid = lid3.x;
    let r = row_of(wid);
    if (r >= p.rows) { return; }
    dx_tiled(r, lid);
    let base = r * p.c;
    for (var j0 = 0u; j0 < p.rank; j0 += DH_COLS) {
        var acc = zeros();
        let nj = min(DH_COLS, p.rank - j0);
        for (var i = lid; i < p.c; i += 64u) {
            let v = dx[base + i];
            for (var j = 0u; j < nj; j++) { acc[j] += v * lora_b[i * p.rank + j0 + j]; }
        }
        let sums = sum_cols(lid, acc);
        if (lid < nj) { dh[r * p.rank + j0 + lid] = p.s * sums; }
    }
}

var<workgroup> red_dh: array<f32, 1024>; // [DH_COLS, 64] partial sums of dh

// Row r of dx, by the workgroup (invocation lid).
fn dx_tiled(r: u32, lid: u32) {
    let base = r * p.c;
    let rs = rstd_in[r];
    var gn = 0.0;
    for (var i = lid; i < p.c; i += 64u) { gn += dy[base + i] * w[i] * x[base + i] * rs; }
    let mean_gn = workgroup_sum(lid, gn) / f32(p.c);
    for (var i = lid; i < p.c; i += 64u) {
        let n = x[base + i] * rs;
        dx[base + i] += rs * (dy[base + i] * w[i] - n * mean_gn);
    }
}

// part[blk, c] = Σ dy[r, c] · x[r, c] · rstd[r] over the block's DW_ROWS rows.
// Grid: (ceil(C/64), blocks, 1).
@compute @workgroup_size(64, 1, 1)
fn rmsnorm_backward_dw_part(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= p.c) { return; }
    let r0 = gid.y * DW_ROWS;
    var acc = 0.0;
    for (var r = r0; r < min(r0 + DW_ROWS, p.rows); r++) { acc += dy[r * p.c + i] * x[r * p.c + i] * rstd_in[r]; }
    part[gid.y * p.c + i] = acc;
}

// dw[c] += Σ part[blk, c] over blocks r0..rows (here `rows` counts blocks).
// Grid: (ceil(C/64), 1, 1).
@compute @workgroup_size(64, 1, 1)
fn rmsnorm_backward_dw_sum(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= p.c) { return; }
    var acc = 0.0;
    for (var b = p.r0; b < p.rows; b++) { acc += part_in[b * p.c + i]; }
    dw[i] += acc;
}
