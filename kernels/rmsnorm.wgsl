// RMSNorm in the Hugging Face Llama convention: y = w · x / sqrt(mean(x²) + eps).
//   x, y, dy, dx  [R, C]   (R rows: B·T tokens, or B·T·NH heads for Qwen3's q/k norm)
//   w, dw         [C]
//   rstd          [R]: 1 / sqrt(mean(x²) + eps), saved for the backward
// Backward adds into dx and dw.

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

// One invocation per row. Grid: (ceil(R/64), 1, 1).
@compute @workgroup_size(64, 1, 1)
fn rmsnorm_forward(@builtin(global_invocation_id) gid: vec3<u32>) {
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
fn rmsnorm_backward_dx(@builtin(global_invocation_id) gid: vec3<u32>) {
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
fn rmsnorm_backward_dw(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= p.c) { return; }
    var acc = 0.0;
    for (var r = p.r0; r < p.rows; r++) { acc += dy[r * p.c + i] * x[r * p.c + i] * rstd_in[r]; }
    dw[i] += acc;
}
