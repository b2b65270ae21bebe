// RMSNorm in the Hugging Face Llama convention: y = w · x / sqrt(mean(x²) + eps).
//   x, y, dy, dx  [R, C]   (R rows: B·T tokens, or B·T·NH heads for Qwen3's q/k norm)
//   w, dw         [C]
//   rstd          [R]: 1 / sqrt(mean(x²) + eps), saved for the backward
// Backward adds into dx and dw.
// Two variants, chosen from the adapter (`Caps::variant`): `*_row` kernels run one
// invocation per row (no barriers: CPU drivers); `*_tiled` kernels run a workgroup of
// 64 per row, reading it coalesced and reducing in workgroup memory (GPUs), and sum
// dw in two passes: 64 columns × a block of rows per workgroup, then the blocks.

struct Params {
    rows: u32, c: u32, eps: f32, r0: u32,
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

// One invocation per row. Grid: (ceil(R/64), 1, 1).
@compute @workgroup_size(64, 1, 1)
fn rmsnorm_forward_row(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    if (r >= p.rows) { return; }
    let base = r * p.c;
    var ss = 0.0;
    for (var i = 0u; i < p.c; i++) { let xi = x[base + i]; ss += xi * xi; }
    let rs = inverseSqrt(ss / f32(p.c) + p.eps);
    for (var i = 0u; i < p.c; i++) { y[base + i] = w[i] * (x[base + i] * rs); }
    rstd[r] = rs;
}

// dx += rstd · (g − n · mean(g · n)), with g = dy · w and n = x · rstd.
// One invocation per row. Grid: (ceil(R/64), 1, 1).
@compute @workgroup_size(64, 1, 1)
fn rmsnorm_backward_dx_row(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    if (r >= p.rows) { return; }
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
    let lid = lid3.x;
    let r = row_of(wid);
    if (r >= p.rows) { return; }
    let base = r * p.c;
    var ss = 0.0;
    for (var i = lid; i < p.c; i += 64u) { let xi = x[base + i]; ss += xi * xi; }
    let rs = inverseSqrt(workgroup_sum(lid, ss) / f32(p.c) + p.eps);
    for (var i = lid; i < p.c; i += 64u) { y[base + i] = w[i] * (x[base + i] * rs); }
    if (lid == 0u) { rstd[r] = rs; }
}

// A workgroup per row. Grid: (min(R, 65535), ceil(R/65535), 1).
@compute @workgroup_size(64, 1, 1)
fn rmsnorm_backward_dx_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let lid = lid3.x;
    let r = row_of(wid);
    if (r >= p.rows) { return; }
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
