// Causal self-attention with grouped-query heads, flash-attention style.
// Shapes (HS a multiple of 4, at most 128; NH a multiple of NKV):
//   q, o, dq, do   [B, T, NH, HS]    (the layout a q_proj output already has)
//   k, v, dk, dv   [B, TK, NKV, HS]  (TK = T in training; in decoding the KV cache,
//                  whose last T positions are the queries' own: query t sits at t + TK − T)
//   seg            [B, TK] u32: a key s is visible to query t when s <= t + TK − T and
//                  sees(seg[t + TK − T], seg[s]): the same example (packed examples
//                  never see each other) and, in a DPO pair laid out as prompt, chosen,
//                  rejected, the shared prompt or the query's own side (the branch in
//                  the top two bits: 0 shared, 1 chosen, 2 rejected; src/data/batch.rs)
//   lse            [B, NH, T]: log-sum-exp of the scaled scores, saved for backward
//   stats          [2, B, NH, T]: lse (copied in by the backward launcher), then
//                  dsum = do·o per row, which the dq pass writes and the dk/dv pass
//                  reads (one binding for both keeps each pass within 8 storage buffers)
// The forward keeps a running max and sum (online softmax) and never writes a T×T
// matrix; the backward recomputes probabilities from lse. Backward adds into dq, dk, dv.
// Two variants of each pass, chosen by the launcher from the adapter (`Caps::variant`):
// `*_row` kernels run one invocation per row reading keys straight from memory (no
// barriers: CPU drivers); `*_tiled` kernels are FlashAttention-2: a workgroup owns 64
// query rows (or 64 keys for dk/dv) and stages tiles of the other side in workgroup
// memory, so each key (query) is read from memory once per 64 rows, not once per row.
// Each dispatch covers the range r0..r1 of the loop axis (keys for the forward and dq,
// queries for dk/dv): the launcher splits long sequences into ranges that fit the
// driver's loop budget. The forward resumes from the (o, lse) of the previous range,
// which are exactly the online softmax state with the running sum normalised to 1.
// Sorted segments (`sorted`, training batches: each row's examples contiguous, in
// ascending order of the segment's low 30 bits, padding last): a query's keys start at
// its example's first position and a key's queries end after its example's last, found
// by binary search (`lower_bound`), so a packed row's other examples cost nothing.
// RoPE on load (`ROPE`, the tiled kernels in training): q and k are stored before the
// rotation, and each pass rotates them as it loads them, as kernels/rope.wgsl does
// (rotate_half, angle = position · inv_freq[i]); the backward rotates dq and dk back
// before adding them, so no rope pass runs. `seg` then holds the positions too, from
// `pos_off` on ([B, T] u32), and `inv_freq` [HS/2] rides in the uniform.

struct Params {
    b: u32, t: u32, nh: u32, nkv: u32,
    hs: u32, scale: f32, tk: u32, r0: u32,
    r1: u32, pos_off: u32, sorted: u32, _p: u32,
    inv_freq: array<vec4<f32>, 16>,
}

override ROPE: bool = false;

const MAX_HS4: u32 = 32u;

@group(0) @binding(0) var<uniform> p: Params;

// ---- forward ---------------------------------------------------------------
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> seg: array<u32>;
@group(0) @binding(5) var<storage, read_write> o: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;

fn q_base(bi: u32, t: u32, h: u32) -> u32 { return ((bi * p.t + t) * p.nh + h) * (p.hs / 4u); }
fn kv_base(bi: u32, s: u32, g: u32) -> u32 { return ((bi * p.tk + s) * p.nkv + g) * (p.hs / 4u); }

// ROPE: vec4 i of a head row, x, rotated with its partner (vec4 i ± HS/8 of the row)
// by position `ps` (sign 1), or back (sign −1, the transpose); as kernels/rope.wgsl.
fn rope4(x: vec4<f32>, partner: vec4<f32>, i: u32, ps: u32, sign: f32) -> vec4<f32> {
    let half4 = p.hs / 8u;
    let angle = f32(ps) * p.inv_freq[i % half4];
    let c = cos(angle);
    let s = sin(angle) * sign;
    if (i < half4) { return x * c - partner * s; }
    return x * c + partner * s;
}

// The index of vec4 i's partner in a head row (ROPE).
fn partner(i: u32) -> u32 { let h = p.hs / 8u; return select(i - h, i + h, i < h); }

// The position of token t of sequence bi (ROPE; training, so TK = T).
fn position(bi: u32, t: u32) -> u32 { return seg[p.pos_off + bi * p.t + t]; }

// Whether a query of segment qs sees a key of segment ks (causality aside).
fn sees(qs: u32, ks: u32) -> bool {
    let kb = ks >> 30u;
    return example(qs) == example(ks) && (kb == 0u || kb == qs >> 30u);
}

// The example of segment x (its low 30 bits; the top two are a DPO pair's side).
fn example(x: u32) -> u32 { return x & 0x3FFFFFFFu; }

// The first position in a..b of the row whose segments start at seg[base] whose
// example is at least e, or b (segments sorted).
fn lower_bound(base: u32, a: u32, b: u32, e: u32) -> u32 {
    var lo = a;
    var hi = max(a, b);
    while (lo < hi) {
        let m = (lo + hi) / 2u;
        if (example(seg[base + m]) < e) { lo = m + 1u; } else { hi = m; }
    }
    return lo;
}

// Where a query of segment st starts looping over keys a..b of its row: at its
// example's first key with sorted segments, else at a.
fn keys_from(base: u32, a: u32, b: u32, st: u32) -> u32 {
    if (p.sorted == 0u) { return a; }
    return lower_bound(base, a, b, example(st));
}

// Where a key of segment ss stops looping over queries a..b of its row: after its
// example's last query with sorted segments, else at b.
fn queries_to(base: u32, a: u32, b: u32, ss: u32) -> u32 {
    if (p.sorted == 0u) { return b; }
    return lower_bound(base, a, b, example(ss) + 1u);
}

// One invocation per query row. Grid: (ceil(T/64), NH, B).
@compute @workgroup_size(64, 1, 1)
fn attention_forward_row(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.x; let h = gid.y; let bi = gid.z;
    if (t >= p.t) { return; }
    let g = h / (p.nh / p.nkv);
    let hs4 = p.hs / 4u;
    let qb = q_base(bi, t, h);
    var qr: array<vec4<f32>, MAX_HS4>;
    var acc: array<vec4<f32>, MAX_HS4>;
    for (var i = 0u; i < hs4; i++) { qr[i] = q[qb + i] * p.scale; }
    let tpos = t + p.tk - p.t;
    let s_end = min(tpos + 1u, p.r1);
    if (p.r0 >= s_end) { return; }
    let st = seg[bi * p.tk + tpos];
    let row = (bi * p.nh + h) * p.t + t;
    var mx = -3.0e38;
    var l = 0.0;
    if (p.r0 > 0u && lse[row] > -1.0e38) {
        mx = lse[row];
        l = 1.0;
        for (var i = 0u; i < hs4; i++) { acc[i] = o[qb + i]; }
    }
    for (var s = keys_from(bi * p.tk, p.r0, s_end, st); s < s_end; s++) {
        if (!sees(st, seg[bi * p.tk + s])) { continue; }
        let kb = kv_base(bi, s, g);
        var score = 0.0;
        for (var i = 0u; i < hs4; i++) { score += dot(qr[i], k[kb + i]); }
        let m_new = max(mx, score);
        let corr = exp(mx - m_new);
        let e = exp(score - m_new);
        l = l * corr + e;
        for (var i = 0u; i < hs4; i++) { acc[i] = acc[i] * corr + e * v[kb + i]; }
        mx = m_new;
    }
    // A range with no visible key yet (another segment) leaves the sentinel state.
    let inv = select(0.0, 1.0 / l, l > 0.0);
    for (var i = 0u; i < hs4; i++) { o[qb + i] = acc[i] * inv; }
    lse[row] = select(-3.0e38, mx + log(l), l > 0.0);
}

// ---- backward --------------------------------------------------------------
// Bindings 1-4 are q, k, v, seg as above.
@group(0) @binding(7) var<storage, read> o_in: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read> stats: array<f32>;
@group(0) @binding(9) var<storage, read> dout: array<vec4<f32>>;
@group(0) @binding(10) var<storage, read_write> stats_rw: array<f32>;
@group(0) @binding(11) var<storage, read_write> dq: array<vec4<f32>>;
@group(0) @binding(12) var<storage, read_write> dk: array<vec4<f32>>;
@group(0) @binding(13) var<storage, read_write> dv: array<vec4<f32>>;

fn n_rows() -> u32 { return p.b * p.nh * p.t; }

// dsum_t = do_t · o_t, which the dq pass computes for its row and writes to
// stats[1, b, h, t] (in its first key range) for the dk/dv pass.
fn dsum(qb: u32, dor: ptr<function, array<vec4<f32>, MAX_HS4>>) -> f32 {
    var d = 0.0;
    for (var i = 0u; i < p.hs / 4u; i++) { d += dot((*dor)[i], o_in[qb + i]); }
    return d;
}

// dq_t += scale · Σ_s P_ts (do_t·v_s − dsum_t) k_s, and stats' dsum_t.
// Grid: (ceil(T/64), NH, B).
@compute @workgroup_size(64, 1, 1)
fn attention_backward_dq_row(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.x; let h = gid.y; let bi = gid.z;
    if (t >= p.t) { return; }
    let g = h / (p.nh / p.nkv);
    let hs4 = p.hs / 4u;
    let qb = q_base(bi, t, h);
    var qr: array<vec4<f32>, MAX_HS4>;
    var dor: array<vec4<f32>, MAX_HS4>;
    var acc: array<vec4<f32>, MAX_HS4>;
    for (var i = 0u; i < hs4; i++) { qr[i] = q[qb + i] * p.scale; dor[i] = dout[qb + i]; }
    let row = (bi * p.nh + h) * p.t + t;
    let l = stats_rw[row];
    let d = dsum(qb, &dor);
    if (p.r0 == 0u) { stats_rw[n_rows() + row] = d; }
    let st = seg[bi * p.t + t];
    let s_end = min(t + 1u, p.r1);
    for (var s = keys_from(bi * p.t, p.r0, s_end, st); s < s_end; s++) {
        if (!sees(st, seg[bi * p.t + s])) { continue; }
        let kb = kv_base(bi, s, g);
        var score = 0.0;
        var dp = 0.0;
        for (var i = 0u; i < hs4; i++) { score += dot(qr[i], k[kb + i]); dp += dot(dor[i], v[kb + i]); }
        let ds = exp(score - l) * (dp - d);
        for (var i = 0u; i < hs4; i++) { acc[i] += ds * k[kb + i]; }
    }
    for (var i = 0u; i < hs4; i++) { dq[qb + i] += acc[i] * p.scale; }
}

// For key s of kv head g, summed over the NH/NKV query heads that share it:
//   dv_s += Σ_t P_ts do_t,   dk_s += scale · Σ_t P_ts (do_t·v_s − dsum_t) q_t.
// Grid: (ceil(T/64), NKV, B).
@compute @workgroup_size(64, 1, 1)
fn attention_backward_dkv_row(@builtin(global_invocation_id) gid: vec3<u32>) {
    let s = gid.x; let g = gid.y; let bi = gid.z;
    if (s >= p.t) { return; }
    let group = p.nh / p.nkv;
    let hs4 = p.hs / 4u;
    let kb = kv_base(bi, s, g);
    var kr: array<vec4<f32>, MAX_HS4>;
    var vr: array<vec4<f32>, MAX_HS4>;
    var dk_acc: array<vec4<f32>, MAX_HS4>;
    var dv_acc: array<vec4<f32>, MAX_HS4>;
    for (var i = 0u; i < hs4; i++) { kr[i] = k[kb + i] * p.scale; vr[i] = v[kb + i]; }
    let ss = seg[bi * p.t + s];
    let t_start = max(s, p.r0);
    let t_end = queries_to(bi * p.t, t_start, min(p.t, p.r1), ss);
    for (var hh = 0u; hh < group; hh++) {
        let h = g * group + hh;
        for (var t = t_start; t < t_end; t++) {
            if (!sees(seg[bi * p.t + t], ss)) { continue; }
            let qb = q_base(bi, t, h);
            let row = (bi * p.nh + h) * p.t + t;
            var score = 0.0;
            var dp = 0.0;
            for (var i = 0u; i < hs4; i++) { score += dot(kr[i], q[qb + i]); dp += dot(vr[i], dout[qb + i]); }
            let pr = exp(score - stats[row]);
            let ds = pr * (dp - stats[n_rows() + row]);
            for (var i = 0u; i < hs4; i++) {
                dv_acc[i] += pr * dout[qb + i];
                dk_acc[i] += ds * q[qb + i];
            }
        }
    }
    for (var i = 0u; i < hs4; i++) {
        dk[kb + i] += dk_acc[i] * p.scale;
        dv[kb + i] += dv_acc[i];
    }
}

// ---- FlashAttention-2 tiles ----------------------------------------------------
// A tile is TILE4 vec4s of each staged operand: 512 / (HS/4) rows of it (32 at HS 64).
// Both tiles together take 16 KiB, WebGPU's guaranteed workgroup memory.
const TILE4: u32 = 512u;
var<workgroup> tile_a: array<vec4<f32>, TILE4>; // k (forward, dq) or q (dk/dv): [rows, HS/4]
var<workgroup> tile_b: array<vec4<f32>, TILE4>; // v (forward, dq) or do (dk/dv)

fn tile_rows() -> u32 { return TILE4 / (p.hs / 4u); }

// How many of a tile's n keys from s0 on a query at position tpos sees (keys ≤ tpos).
fn keys_seen(n: u32, s0: u32, tpos: u32) -> u32 { return select(0u, min(n, tpos + 1u - s0), tpos >= s0); }

// vec4 i of the query row at qb (token t of sequence bi), rotated under ROPE.
fn load_q(qb: u32, i: u32, bi: u32, t: u32) -> vec4<f32> {
    if (ROPE) { return rope4(q[qb + i], q[qb + partner(i)], i, position(bi, t), 1.0); }
    return q[qb + i];
}

// Stage keys s0..s0+n of kv head g (k into tile_a, v into tile_b).
fn stage_kv(lid: u32, bi: u32, g: u32, s0: u32, n: u32) {
    let hs4 = p.hs / 4u;
    for (var e = lid; e < n * hs4; e += 64u) {
        let kb = kv_base(bi, s0 + e / hs4, g) + e % hs4;
        if (ROPE) {
            let i = e % hs4;
            tile_a[e] = rope4(k[kb], k[kb - i + partner(i)], i, position(bi, s0 + e / hs4), 1.0);
        } else {
            tile_a[e] = k[kb];
        }
        tile_b[e] = v[kb];
    }
}

// The forward for 64 query rows of head h. Barriers sit in loops whose bounds are the
// same for the whole workgroup; rows past T compute on a clamped row and write nothing.
// Grid: (ceil(T/64), NH, B).
@compute @workgroup_size(64, 1, 1)
fn attention_forward_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let lid = lid3.x;
    let t0 = wid.x * 64u; let h = wid.y; let bi = wid.z;
    let live = t0 + lid < p.t;
    let t = min(t0 + lid, p.t - 1u);
    let g = h / (p.nh / p.nkv);
    let hs4 = p.hs / 4u;
    let qb = q_base(bi, t, h);
    var qr: array<vec4<f32>, MAX_HS4>;
    var acc: array<vec4<f32>, MAX_HS4>;
    for (var i = 0u; i < hs4; i++) { qr[i] = load_q(qb, i, bi, t) * p.scale; }
    let tpos = t + p.tk - p.t;
    let st = seg[bi * p.tk + tpos];
    let row = (bi * p.nh + h) * p.t + t;
    var mx = -3.0e38;
    var l = 0.0;
    if (p.r0 > 0u && lse[row] > -1.0e38) {
        mx = lse[row];
        l = 1.0;
        for (var i = 0u; i < hs4; i++) { acc[i] = o[qb + i]; }
    }
    // Keys up to the workgroup's last row, within this dispatch's range.
    let s_end = min(min(t0 + 63u, p.t - 1u) + p.tk - p.t + 1u, p.r1);
    let nk = tile_rows();
    // From the first key of the workgroup's first row's example (sorted segments).
    for (var s0 = keys_from(bi * p.tk, p.r0, s_end, seg[bi * p.tk + t0 + p.tk - p.t]); s0 < s_end; s0 += nk) {
        let n = min(nk, s_end - s0);
        stage_kv(lid, bi, g, s0, n);
        workgroupBarrier();
        // This row sees keys s0..=tpos of its own segment.
        let mine = keys_seen(n, s0, tpos);
        for (var j = 0u; j < mine; j++) {
            if (!sees(st, seg[bi * p.tk + s0 + j])) { continue; }
            var score = 0.0;
            for (var i = 0u; i < hs4; i++) { score += dot(qr[i], tile_a[j * hs4 + i]); }
            let m_new = max(mx, score);
            let corr = exp(mx - m_new);
            let e = exp(score - m_new);
            l = l * corr + e;
            for (var i = 0u; i < hs4; i++) { acc[i] = acc[i] * corr + e * tile_b[j * hs4 + i]; }
            mx = m_new;
        }
        workgroupBarrier();
    }
    // Rows with no key in this range keep the previous range's state.
    if (live && p.r0 < min(tpos + 1u, p.r1)) {
        let inv = select(0.0, 1.0 / l, l > 0.0);
        for (var i = 0u; i < hs4; i++) { o[qb + i] = acc[i] * inv; }
        lse[row] = select(-3.0e38, mx + log(l), l > 0.0);
    }
}

// dq for 64 query rows of head h, staging k and v tiles. Grid: (ceil(T/64), NH, B).
@compute @workgroup_size(64, 1, 1)
fn attention_backward_dq_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let lid = lid3.x;
    let t0 = wid.x * 64u; let h = wid.y; let bi = wid.z;
    let live = t0 + lid < p.t;
    let t = min(t0 + lid, p.t - 1u);
    let g = h / (p.nh / p.nkv);
    let hs4 = p.hs / 4u;
    let qb = q_base(bi, t, h);
    var qr: array<vec4<f32>, MAX_HS4>;
    var dor: array<vec4<f32>, MAX_HS4>;
    var acc: array<vec4<f32>, MAX_HS4>;
    for (var i = 0u; i < hs4; i++) { qr[i] = load_q(qb, i, bi, t) * p.scale; dor[i] = dout[qb + i]; }
    let row = (bi * p.nh + h) * p.t + t;
    let l = stats_rw[row];
    let d = dsum(qb, &dor);
    if (live && p.r0 == 0u) { stats_rw[n_rows() + row] = d; }
    let st = seg[bi * p.t + t];
    let s_end = min(min(t0 + 63u, p.t - 1u) + 1u, p.r1);
    let nk = tile_rows();
    for (var s0 = keys_from(bi * p.t, p.r0, s_end, seg[bi * p.t + t0]); s0 < s_end; s0 += nk) {
        let n = min(nk, s_end - s0);
        stage_kv(lid, bi, g, s0, n);
        workgroupBarrier();
        let mine = keys_seen(n, s0, t);
        for (var j = 0u; j < mine; j++) {
            if (!sees(st, seg[bi * p.t + s0 + j])) { continue; }
            var score = 0.0;
            var dp = 0.0;
            for (var i = 0u; i < hs4; i++) { score += dot(qr[i], tile_a[j * hs4 + i]); dp += dot(dor[i], tile_b[j * hs4 + i]); }
            let ds = exp(score - l) * (dp - d);
            for (var i = 0u; i < hs4; i++) { acc[i] += ds * tile_a[j * hs4 + i]; }
        }
        workgroupBarrier();
    }
    if (live) {
        if (ROPE) {
            let ps = position(bi, t);
            for (var i = 0u; i < hs4; i++) { dq[qb + i] += rope4(acc[i], acc[partner(i)], i, ps, -1.0) * p.scale; }
        } else {
            for (var i = 0u; i < hs4; i++) { dq[qb + i] += acc[i] * p.scale; }
        }
    }
}

// dk and dv for 64 keys of kv head g, summed over the group's query heads, staging
// tiles of q and do (queries r0..r1 at or after the workgroup's first key).
// Grid: (ceil(T/64), NKV, B).
@compute @workgroup_size(64, 1, 1)
fn attention_backward_dkv_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let lid = lid3.x;
    let sb = wid.x * 64u; let g = wid.y; let bi = wid.z;
    let live = sb + lid < p.t;
    let s = min(sb + lid, p.t - 1u);
    let group = p.nh / p.nkv;
    let hs4 = p.hs / 4u;
    let kb = kv_base(bi, s, g);
    var kr: array<vec4<f32>, MAX_HS4>;
    var vr: array<vec4<f32>, MAX_HS4>;
    var dk_acc: array<vec4<f32>, MAX_HS4>;
    var dv_acc: array<vec4<f32>, MAX_HS4>;
    for (var i = 0u; i < hs4; i++) {
        if (ROPE) { kr[i] = rope4(k[kb + i], k[kb + partner(i)], i, position(bi, s), 1.0) * p.scale; } else { kr[i] = k[kb + i] * p.scale; }
        vr[i] = v[kb + i];
    }
    let ss = seg[bi * p.t + s];
    let nq = tile_rows();
    // Up to the last query of the workgroup's last key's example (sorted segments).
    let t_start = max(sb, p.r0);
    let t_end = queries_to(bi * p.t, t_start, min(p.t, p.r1), seg[bi * p.t + min(sb + 63u, p.t - 1u)]);
    for (var hh = 0u; hh < group; hh++) {
        let h = g * group + hh;
        for (var t0 = t_start; t0 < t_end; t0 += nq) {
            let n = min(nq, t_end - t0);
            for (var e = lid; e < n * hs4; e += 64u) {
                let qe = q_base(bi, t0 + e / hs4, h) + e % hs4;
                tile_a[e] = load_q(qe - e % hs4, e % hs4, bi, t0 + e / hs4);
                tile_b[e] = dout[qe];
            }
            workgroupBarrier();
            // This key is seen by queries s.. of its own segment.
            for (var j = select(s - t0, 0u, s <= t0); j < n; j++) {
                let t = t0 + j;
                if (!sees(seg[bi * p.t + t], ss)) { continue; }
                let row = (bi * p.nh + h) * p.t + t;
                var score = 0.0;
                var dp = 0.0;
                for (var i = 0u; i < hs4; i++) { score += dot(kr[i], tile_a[j * hs4 + i]); dp += dot(vr[i], tile_b[j * hs4 + i]); }
                let pr = exp(score - stats[row]);
                let ds = pr * (dp - stats[n_rows() + row]);
                for (var i = 0u; i < hs4; i++) {
                    dv_acc[i] += pr * tile_b[j * hs4 + i];
                    dk_acc[i] += ds * tile_a[j * hs4 + i];
                }
            }
            workgroupBarrier();
        }
    }
    if (live) {
        let ps = position(bi, s);
        for (var i = 0u; i < hs4; i++) {
            if (ROPE) { dk[kb + i] += rope4(dk_acc[i], dk_acc[partner(i)], i, ps, -1.0) * p.scale; } else { dk[kb + i] += dk_acc[i] * p.scale; }
            dv[kb + i] += dv_acc[i];
        }
    }
}
