// Rotary position embedding, Hugging Face Llama convention (rotate_half): for each
// head vector split into halves x1 = x[:HS/2], x2 = x[HS/2:],
//   out1 = x1·cos − x2·sin,   out2 = x2·cos + x1·sin,   angle = pos · inv_freq[i].
//   x      [N, H, HS]   rotated in place (N = B·T tokens, H heads of this tensor)
//   pos    [N] u32      position of each token (restarts per packed example)
//   inv_freq [HS/2]     from rope_theta and rope_scaling, computed on the host
// The backward applies the inverse rotation to the gradient, in place.

struct Params {
    n: u32, h: u32, hs: u32, _p0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> pos: array<u32>;
@group(0) @binding(3) var<storage, read> inv_freq: array<f32>;

// One invocation per rotated pair, flat over [N, H, HS/2]: index = y·65535·256 + x
// (the launcher spills past 65,535 workgroups into y, so any number of tokens fits).
fn rotate(gid: vec3<u32>, sign: f32) {
    let half = p.hs / 2u;
    let idx = gid.y * 65535u * 256u + gid.x;
    if (idx >= p.n * p.h * half) { return; }
    let i = idx % half;
    let hd = (idx / half) % p.h;
    let tok = idx / (half * p.h);
    let angle = f32(pos[tok]) * inv_freq[i];
    let c = cos(angle);
    let s = sin(angle) * sign;
    let base = (tok * p.h + hd) * p.hs;
    let x1 = x[base + i];
    let x2 = x[base + i + half];
    x[base + i] = x1 * c - x2 * s;
    x[base + i + half] = x2 * c + x1 * s;
}

// Grid: (ceil(N·H·HS/2 / 256), 1, 1), 2-D past 65,535 workgroups.
@compute @workgroup_size(256, 1, 1)
fn rope_forward(@builtin(global_invocation_id) gid: vec3<u32>) { rotate(gid, 1.0); }

// The transpose of the rotation is the rotation by −angle. Grid as forward.
@compute @workgroup_size(256, 1, 1)
fn rope_backward(@builtin(global_invocation_id) gid: vec3<u32>) { rotate(gid, -1.0); }
