// Element-wise ops on flat f32 arrays, and the per-feature bias (Qwen2's q/k/v).
//   a, b, out, x, y   [N]
//   bias, dbias       [C];  rows of y / dy are [R, C]
// Index for 1-D grids: y·65535·256 + x (the launcher spills past 65535 workgroups into y).

// `aux` is bias_backward's first row.
struct Params {
    n: u32, c: u32, alpha: f32, aux: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> x: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
@group(0) @binding(6) var<storage, read> bias: array<f32>;
@group(0) @binding(7) var<storage, read_write> dbias: array<f32>;
@group(0) @binding(8) var<storage, read> dy: array<f32>;

fn index(gid: vec3<u32>) -> u32 { return gid.y * 65535u * 256u + gid.x; }

// out = a + b (the residual connection).
@compute @workgroup_size(256, 1, 1)
fn add(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = index(gid);
    if (i >= p.n) { return; }
    out[i] = a[i] + b[i];
}

// y += alpha · x (gradient accumulation, residual gradients).
@compute @workgroup_size(256, 1, 1)
fn axpy(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = index(gid);
    if (i >= p.n) { return; }
    y[i] += p.alpha * x[i];
}

// y = alpha · y.
@compute @workgroup_size(256, 1, 1)
fn scale(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = index(gid);
    if (i >= p.n) { return; }
    y[i] = p.alpha * y[i];
}

// y[r, c] += bias[c], N = R·C elements.
@compute @workgroup_size(256, 1, 1)
fn add_bias(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = index(gid);
    if (i >= p.n) { return; }
    y[i] += bias[i % p.c];
}

// dbias[c] += Σ_r dy[r, c] over rows aux..n/c: one invocation per column; the launcher
// calls it on row ranges that fit the loop budget. Grid: (ceil(C/256), 1, 1).
@compute @workgroup_size(256, 1, 1)
fn bias_backward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    if (c >= p.c) { return; }
    var acc = 0.0;
    for (var i = p.aux * p.c + c; i < p.n; i += p.c) { acc += dy[i]; }
    dbias[c] += acc;
}
