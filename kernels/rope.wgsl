// Rotary position embedding, Hugging Face Llama convention (rotate_half): for each
// head vector split into halves x1 = x[:HS/2], x2 = x[HS/2:],
//   out1 = x1·cos − x2·sin,   out2 = x2·cos + x1·sin,   angle = pos · inv_freq[i].
//   q      [N, H, HS]   rotated in place (N = B·T tokens, H query heads)
//   k      [N, HK, HS]  rotated in place in the same dispatch (HK key heads)
//   pos    [N] u32      position of each token (restarts per packed example)
//   inv_freq [HS/2]     from rope_theta and rope_scaling, computed on the host
// The backward applies the inverse rotation to the gradients, in place.

struct Params {
    n: u32, h: u32, hs: u32, hk: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> q: array<f32>;
@group(0) @binding(2) var<storage, read> pos: array<u32>;
@group(0) @binding(3) var<storage, read> inv_freq: array<f32>;
@group(0) @binding(4) var<storage, read_write> k: array<f32>;

// One invocation per rotated pair, flat over [N, H, HS/2] of q then [N, HK, HS/2] of
// k: index = y·65535·256 + x (the launcher spills past 65,535 workgroups into y, so
// any number of tokens fits).
fn rotate(gid: vec3<u32>, sign: f32) {
    let half = p.hs / 2u;
    var idx = gid.y * 65535u * 256u + gid.x;
    let in_q = idx < p.n * p.h * half;
    var h = p.h;
    if (!in_q) {
        idx -= p.n * p.h * half;
        h = p.hk;
        if (idx >= p.n * h * half) { return; }
    }
    let i = idx % half;
    let hd = (idx / half) % h;
    let tok = idx / (half * h);
    let angle = f32(pos[tok]) * inv_freq[i];
    let c = cos(angle);
    let s = sin(angle) * sign;
    let base = (tok * h + hd) * p.hs;
    if (in_q) {
        let x1 = q[base + i];
        let x2 = q[base + i + half];
        q[base + i] = x1 * c - x2 * s;
        q[base + i + half] = x2 * c + x1 * s;
    } else {
        let x1 = k[base + i];
        let x2 = k[base + i + half];
        k[base + i] = x1 * c - x2 * s;
        k[base + i + half] = x2 * c + x1 * s;
    }
}

// Grid: (ceil(N·(H + HK)·HS/2 / 256), 1, 1), 2-D past 65,535 workgroups.
@compute @workgroup_size(256, 1, 1)
fn rope_forward(@builtin(global_invocation_id) gid: vec3<u32>) { rotate(gid, 1.0); }

// The transpose of the rotation is the rotation by −angle. Grid as forward.
@compute @workgroup_size(256, 1, 1)
fn rope_backward(@builtin(global_invocation_id) gid: vec3<u32>) { rotate(gid, -1.0); }
