// AdamW with torch semantics, and the global gradient norm that clips it.
//   param, grad, m, v   [N]        one parameter tensor
//   partial             [P]        per-workgroup sums of squares, one slot range per tensor
//   norm                [2]        norm = sqrt(Σ partial), clip = min(1, max_norm / (norm + 1e-6))
// torch.optim.AdamW step t (bias corrections bc1 = 1 − β1ᵗ, bc2 = 1 − β2ᵗ from the host):
//   p ← p · (1 − lr·wd);  m ← lerp(m, g, 1 − β1);  v ← β2·v + (1 − β2)·g²
//   p ← p − (lr / bc1) · m / (sqrt(v) / sqrt(bc2) + eps)
// with g = grad · clip, as torch.nn.utils.clip_grad_norm_ leaves it.

struct Params {
    n: u32, slot: u32, max_norm: f32, _p0: u32,
    lr: f32, beta1: f32, beta2: f32, eps: f32,
    decay: f32, step_size: f32, bc2_sqrt: f32, _p1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> partial: array<f32>;
@group(0) @binding(3) var<storage, read> partial_in: array<f32>;
@group(0) @binding(4) var<storage, read_write> norm: array<f32>;
@group(0) @binding(5) var<storage, read> norm_in: array<f32>;
@group(0) @binding(6) var<storage, read_write> param: array<f32>;
@group(0) @binding(7) var<storage, read_write> m: array<f32>;
@group(0) @binding(8) var<storage, read_write> v: array<f32>;

var<workgroup> part: array<f32, 256>;

fn reduce(lid: u32, value: f32) -> f32 {
    part[lid] = value;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) { part[lid] += part[lid + s]; }
        workgroupBarrier();
    }
    return part[0];
}

// partial[slot + w] = Σ grad² over workgroup w's stride. Grid: (W, 1, 1), W ≤ 256.
@compute @workgroup_size(256, 1, 1)
fn sumsq_partial(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>) {
    var acc = 0.0;
    for (var i = wid.x * 256u + lid.x; i < p.n; i += nwg.x * 256u) { let g = grad[i]; acc += g * g; }
    let total = reduce(lid.x, acc);
    if (lid.x == 0u) { partial[p.slot + wid.x] = total; }
}

// norm = [sqrt(Σ partial[0..n]), clip factor]. One workgroup.
@compute @workgroup_size(256, 1, 1)
fn grad_norm_finalize(@builtin(local_invocation_id) lid: vec3<u32>) {
    var acc = 0.0;
    for (var i = lid.x; i < p.n; i += 256u) { acc += partial_in[i]; }
    let total = reduce(lid.x, acc);
    if (lid.x == 0u) {
        let nrm = sqrt(total);
        norm[0] = nrm;
        norm[1] = min(1.0, p.max_norm / (nrm + 1e-6));
    }
}

// Grid: 1-D over N as in elementwise.wgsl.
@compute @workgroup_size(256, 1, 1)
fn adamw_step(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.y * 65535u * 256u + gid.x;
    if (i >= p.n) { return; }
    let g = grad[i] * norm_in[1];
    let mi = m[i] + (1.0 - p.beta1) * (g - m[i]);
    let vi = p.beta2 * v[i] + (1.0 - p.beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    let pd = param[i] * p.decay;
    param[i] = pd - p.step_size * mi / (sqrt(vi) / p.bc2_sqrt + p.eps);
}
