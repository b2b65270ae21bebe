// Fused softmax cross-entropy over the vocabulary, with ignored positions.
//   logits  [N, V]     (bound a chunk of rows at a time when N·V exceeds one binding;
//                       `row0` is the first row of the chunk in the other arrays)
//   targets [N] i32    −100 (any negative) = ignored
//   losses  [N]        lse − logit[target], 0 when ignored
//   lse     [N]        saved for the backward
//   loss    [1]        += Σ losses · scale, scale = 1 / (tokens counted by the caller)
//                      (a batch's chunks add into one loss)
// The backward overwrites the logits in place with dlogits = (softmax − onehot) · scale
// (zeros on ignored rows), as llm.c does: the logits are not needed afterwards. In
// training the forward and backward of a row are one kernel
// (`cross_entropy_forward_backward*`): the row's lse, then its logits overwritten.
// Per sequence (DPO: a row's sequence is the chosen or rejected side of a pair; a
// pair's shared prompt rows are never targets, so their entry does not matter):
//   row_seq    [N] u32 the sequence of each global row
//   seq_logps  [S]     −= Σ losses of each sequence's rows = Σ log p(target); the sum
//                      entry reads `row0` as the chunk's first global row
//   seq_scale  [S]     the scaled backward's extra factor for the rows of sequence s

struct Params {
    rows: u32, v: u32, row0: u32, _p1: u32,
    scale: f32, g0: u32, _p2: u32, _p3: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<i32>;
@group(0) @binding(3) var<storage, read_write> losses: array<f32>;
@group(0) @binding(4) var<storage, read_write> lse: array<f32>;
@group(0) @binding(5) var<storage, read_write> dlogits: array<f32>;
@group(0) @binding(6) var<storage, read> lse_in: array<f32>;
@group(0) @binding(7) var<storage, read> losses_in: array<f32>;
@group(0) @binding(8) var<storage, read_write> loss: array<f32>;
@group(0) @binding(9) var<storage, read> seq_scale: array<f32>;
@group(0) @binding(10) var<storage, read_write> seq_logps: array<f32>;
@group(0) @binding(11) var<storage, read> row_seq: array<u32>;

// One invocation per row of the chunk, online max and sum in one pass: for
// vocabularies within the loop budget that are too small to fill a workgroup per row.
// Grid: (ceil(rows/64), 1, 1).
@compute @workgroup_size(64, 1, 1)
fn cross_entropy_forward_row(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    if (r >= p.rows) { return; }
    let base = r * p.v;
    var mx = -3.0e38;
    var sum = 0.0;
    for (var j = 0u; j < p.v; j++) {
        let z = logits[base + j];
        if (z > mx) { sum = sum * exp(mx - z); mx = z; }
        sum += exp(z - mx);
    }
    write_row(r, mx + log(sum), logits[base + target_index(r)]);
}

// Where row r of the chunk's target logit lies in the row (0 when it is ignored).
fn target_index(r: u32) -> u32 {
    let tgt = targets[p.row0 + r];
    return select(0u, u32(tgt), tgt >= 0 && u32(tgt) < p.v);
}

// lse l and the loss of row r of the chunk, whose target logit is zt.
fn write_row(r: u32, l: f32, zt: f32) {
    let row = p.row0 + r;
    lse[row] = l;
    let tgt = targets[row];
    losses[row] = select(l - zt, 0.0, tgt < 0 || u32(tgt) >= p.v);
}

// The forward and then the backward of a row, by one invocation (training; CPU
// drivers and small vocabularies): its lse and loss, then its logits overwritten with
// (softmax − onehot) · scale. Grid: (ceil(rows/64), 1, 1).
@compute @workgroup_size(64, 1, 1)
fn cross_entropy_forward_backward_row(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    if (r >= p.rows) { return; }
    let base = r * p.v;
    var mx = -3.0e38;
    var sum = 0.0;
    for (var j = 0u; j < p.v; j++) {
        let z = dlogits[base + j];
        if (z > mx) { sum = sum * exp(mx - z); mx = z; }
        sum += exp(z - mx);
    }
    let l = mx + log(sum);
    write_row(r, l, dlogits[base + target_index(r)]);
    for (var j = 0u; j < p.v; j++) { dlogits[base + j] = dlogit(r, j, dlogits[base + j], l) * p.scale; }
}

// One workgroup per row of the chunk: each invocation keeps an online max and sum
// over every 256th logit (V/256 loop iterations, within any driver's loop budget),
// then the pairs are combined in workgroup memory. Grid: (rows, 1, 1).
var<workgroup> wmax: array<f32, 256>;
var<workgroup> wsum: array<f32, 256>;
@compute @workgroup_size(256, 1, 1)
fn cross_entropy_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = wid.x;
    let base = r * p.v;
    var mx = -3.0e38;
    var sum = 0.0;
    for (var j = lid.x; j < p.v; j += 256u) {
        let z = logits[base + j];
        if (z > mx) { sum = sum * exp(mx - z); mx = z; }
        sum += exp(z - mx);
    }
    let l = row_lse(lid.x, mx, sum);
    if (lid.x == 0u && r < p.rows) { write_row(r, l, logits[base + target_index(r)]); }
}

// The row's lse from each invocation's online max and sum (every invocation returns
// it). Uniform control flow only.
fn row_lse(lid: u32, mx: f32, sum: f32) -> f32 {
    wmax[lid] = mx;
    wsum[lid] = sum;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) {
            let m2 = max(wmax[lid], wmax[lid + s]);
            wsum[lid] = wsum[lid] * exp(wmax[lid] - m2) + wsum[lid + s] * exp(wmax[lid + s] - m2);
            wmax[lid] = m2;
        }
        workgroupBarrier();
    }
    return wmax[0] + log(wsum[0]);
}

// The forward and then the backward of a row, by a workgroup (as above; the target
// logit is read before any invocation overwrites the row). Grid: (rows, 1, 1).
@compute @workgroup_size(256, 1, 1)
fn cross_entropy_forward_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = wid.x;
    let base = r * p.v;
    var mx = -3.0e38;
    var sum = 0.0;
    for (var j = lid.x; j < p.v; j += 256u) {
        let z = dlogits[base + j];
        if (z > mx) { sum = sum * exp(mx - z); mx = z; }
        sum += exp(z - mx);
    }
    let l = row_lse(lid.x, mx, sum);
    if (lid.x == 0u) { write_row(r, l, dlogits[base + target_index(r)]); }
    storageBarrier();
    for (var j = lid.x; j < p.v; j += 256u) { dlogits[base + j] = dlogit(r, j, dlogits[base + j], l) * p.scale; }
}

// d(loss)/d(logit j) of row r of the chunk, before any scale: softmax − onehot, 0 on
// ignored rows.
fn grad(r: u32, j: u32) -> f32 {
    return dlogit(r, j, dlogits[r * p.v + j], lse_in[p.row0 + r]);
}

// The same for logit z of the row, whose lse is l.
fn dlogit(r: u32, j: u32, z: f32, l: f32) -> f32 {
    let tgt = targets[p.row0 + r];
    if (tgt < 0 || u32(tgt) >= p.v) { return 0.0; }
    var g = exp(z - l);
    if (u32(tgt) == j) { g -= 1.0; }
    return g;
}

// Grid: (ceil(V/256), rows, 1).
@compute @workgroup_size(256, 1, 1)
fn cross_entropy_backward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x; let r = gid.y;
    if (j >= p.v || r >= p.rows) { return; }
    dlogits[r * p.v + j] = grad(r, j) * p.scale;
}

// The backward with each row also scaled by its sequence's factor
// seq_scale[row_seq[g0 + row0 + r]] (g0: the global row of the logits' first row;
// DPO: −d(loss)/d(log p of the sequence)).
// Grid: (ceil(V/256), rows, 1).
@compute @workgroup_size(256, 1, 1)
fn cross_entropy_backward_scaled(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x; let r = gid.y;
    if (j >= p.v || r >= p.rows) { return; }
    dlogits[r * p.v + j] = grad(r, j) * p.scale * seq_scale[row_seq[p.g0 + p.row0 + r]];
}

// seq_logps[s] −= Σ losses_in over the chunk's rows of sequence s: one workgroup per
// sequence, each scanning the chunk (global rows row0 .. row0 + rows) for its rows,
// losses_in holding the chunk's rows from 0. Grid: (S, 1, 1).
@compute @workgroup_size(256, 1, 1)
fn cross_entropy_sequence_logps(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let s = wid.x;
    var acc = 0.0;
    for (var i = lid.x; i < p.rows; i += 256u) {
        if (row_seq[p.row0 + i] == s) { acc += losses_in[i]; }
    }
    part[lid.x] = acc;
    workgroupBarrier();
    for (var k = 128u; k > 0u; k >>= 1u) {
        if (lid.x < k) { part[lid.x] += part[lid.x + k]; }
        workgroupBarrier();
    }
    if (lid.x == 0u) { seq_logps[s] -= part[0]; }
}

// loss[0] += scale · Σ losses, one workgroup (tree reduction in workgroup memory).
var<workgroup> part: array<f32, 256>;
@compute @workgroup_size(256, 1, 1)
fn cross_entropy_sum(@builtin(local_invocation_id) lid: vec3<u32>) {
    var acc = 0.0;
    for (var i = lid.x; i < p.rows; i += 256u) { acc += losses_in[i]; }
    part[lid.x] = acc;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid.x < s) { part[lid.x] += part[lid.x + s]; }
        workgroupBarrier();
    }
    if (lid.x == 0u) { loss[0] += part[0] * p.scale; }
}
