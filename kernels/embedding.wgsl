// Token embedding gather and its scatter-add backward.
//   ids     [N] u32      token ids (N = B·T)
//   w       [VP, C]      one row-part of the table: token ids v0 .. v0 + VP (a table
//                        larger than one binding is split by rows)
//   dw      [V, C]
//   out, dout [N, C]
// The backward needs no atomics: the launcher groups positions by token on the host
// (order: positions sorted by id; starts[u]..starts[u+1] are the positions of the u-th
// distinct id uniq[u]), so each (distinct id, column) is summed by one invocation.

// The element type of the table; the registry's f16 variant stores it in f16, its
// packed variant in blocks (quant.wgsl's `q_load` in place of `weight`).
alias WElem = f32;

// The backward sums positions skip..skip+span of each id's run (one dispatch per span
// of the longest run, within the loop budget).
struct Params {
    n: u32, c: u32, v: u32, n_uniq: u32,
    v0: u32, skip: u32, span: u32, _p0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> w: array<WElem>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> order: array<u32>;
@group(0) @binding(5) var<storage, read> starts: array<u32>;
@group(0) @binding(6) var<storage, read> uniq: array<u32>;
@group(0) @binding(7) var<storage, read> dout: array<f32>;
@group(0) @binding(8) var<storage, read_write> dw: array<f32>;

// Element i of the table part as stored.
fn weight(i: u32) -> f32 { return f32(w[i]); }

// out[t, c] = w[ids[t] − v0, c] for the ids this part holds; other rows are left as
// they are (the launcher zeroes out first). Grid: (ceil(C/64), N, 1), N spilling past
// 65,535 into z: t = z·65535 + y.
@compute @workgroup_size(64, 1, 1)
fn embedding_forward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x; let t = gid.z * 65535u + gid.y;
    if (c >= p.c || t >= p.n) { return; }
    let id = ids[t];
    if (id >= p.v0 && id - p.v0 < p.v) { out[t * p.c + c] = weight((id - p.v0) * p.c + c); }
}

// dw[uniq[u], c] += Σ over positions t of that id of dout[t, c]. Grid: (ceil(C/64), U, 1),
// U spilling past 65,535 into z: u = z·65535 + y.
@compute @workgroup_size(64, 1, 1)
fn embedding_backward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x; let u = gid.z * 65535u + gid.y;
    if (c >= p.c || u >= p.n_uniq) { return; }
    var acc = 0.0;
    let first = starts[u] + p.skip;
    for (var j = first; j < min(starts[u + 1u], first + p.span); j++) { acc += dout[order[j] * p.c + c]; }
    dw[uniq[u] * p.c + c] += acc;
}
