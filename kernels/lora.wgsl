// LoRA on a linear layer: y += s · (x·Aᵀ)·Bᵀ, with s = alpha / r (or alpha / √r).
//   x, dx   [N, IN]     A, dA  [R, IN]     B, dB  [OUT, R]
//   h, dh   [N, R]      h = x·Aᵀ is saved for the backward
//   y, dy   [N, OUT]
// R is small (8-64), so every kernel loops over the short axis or over N; each output
// element belongs to one invocation, so no atomics. Backward adds into dA, dB, dx.

struct Params {
    n: u32, din: u32, dout: u32, r: u32,
    s: f32, _p0: u32, _p1: u32, _p2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> la: array<f32>;
@group(0) @binding(3) var<storage, read> lb: array<f32>;
@group(0) @binding(4) var<storage, read_write> h: array<f32>;
@group(0) @binding(5) var<storage, read> h_in: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;
@group(0) @binding(7) var<storage, read> dy: array<f32>;
@group(0) @binding(8) var<storage, read_write> dh: array<f32>;
@group(0) @binding(9) var<storage, read> dh_in: array<f32>;
@group(0) @binding(10) var<storage, read_write> dla: array<f32>;
@group(0) @binding(11) var<storage, read_write> dlb: array<f32>;
@group(0) @binding(12) var<storage, read_write> dx: array<f32>;

// h[n, j] = Σ_i x[n, i] A[j, i]. Grid: (ceil(R/16), ceil(N/16), 1).
@compute @workgroup_size(16, 16, 1)
fn lora_down(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x; let n = gid.y;
    if (j >= p.r || n >= p.n) { return; }
    var acc = 0.0;
    for (var i = 0u; i < p.din; i++) { acc += x[n * p.din + i] * la[j * p.din + i]; }
    h[n * p.r + j] = acc;
}

// y[n, o] += s · Σ_j h[n, j] B[o, j]. Grid: (ceil(OUT/16), ceil(N/16), 1).
@compute @workgroup_size(16, 16, 1)
fn lora_up(@builtin(global_invocation_id) gid: vec3<u32>) {
    let o = gid.x; let n = gid.y;
    if (o >= p.dout || n >= p.n) { return; }
    var acc = 0.0;
    for (var j = 0u; j < p.r; j++) { acc += h_in[n * p.r + j] * lb[o * p.r + j]; }
    y[n * p.dout + o] += p.s * acc;
}

// dh[n, j] = s · Σ_o dy[n, o] B[o, j] (a fresh temporary). Grid: (ceil(R/16), ceil(N/16), 1).
@compute @workgroup_size(16, 16, 1)
fn lora_backward_dh(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x; let n = gid.y;
    if (j >= p.r || n >= p.n) { return; }
    var acc = 0.0;
    for (var o = 0u; o < p.dout; o++) { acc += dy[n * p.dout + o] * lb[o * p.r + j]; }
    dh[n * p.r + j] = p.s * acc;
}

// dB[o, j] += s · Σ_n dy[n, o] h[n, j]. Grid: (ceil(R/16), ceil(OUT/16), 1).
@compute @workgroup_size(16, 16, 1)
fn lora_backward_db(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x; let o = gid.y;
    if (j >= p.r || o >= p.dout) { return; }
    var acc = 0.0;
    for (var n = 0u; n < p.n; n++) { acc += dy[n * p.dout + o] * h_in[n * p.r + j]; }
    dlb[o * p.r + j] += p.s * acc;
}

// dA[j, i] += Σ_n dh[n, j] x[n, i]. Grid: (ceil(IN/16), ceil(R/16), 1).
@compute @workgroup_size(16, 16, 1)
fn lora_backward_da(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x; let j = gid.y;
    if (i >= p.din || j >= p.r) { return; }
    var acc = 0.0;
    for (var n = 0u; n < p.n; n++) { acc += dh_in[n * p.r + j] * x[n * p.din + i]; }
    dla[j * p.din + i] += acc;
}

// dx[n, i] += Σ_j dh[n, j] A[j, i]. Grid: (ceil(IN/16), ceil(N/16), 1).
@compute @workgroup_size(16, 16, 1)
fn lora_backward_dx(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x; let n = gid.y;
    if (i >= p.din || n >= p.n) { return; }
    var acc = 0.0;
    for (var j = 0u; j < p.r; j++) { acc += dh_in[n * p.r + j] * la[j * p.din + i]; }
    dx[n * p.din + i] += acc;
}
