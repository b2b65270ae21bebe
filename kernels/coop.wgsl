// Matmul on cooperative matrices (tensor cores; `Caps::coop_matrix`), appended to
// kernels/matmul.wgsl (or its f16 or packed variant) by `kernels::coop_variant`, which
// puts `enable f16; enable wgpu_cooperative_matrix;` first and CS in place: the
// adapter's square f16 shape with f32 accumulation, 8 or 16. Only for products whose
// B is a frozen weight (f16 or packed), so B's halves are exact; A is rounded to f16.
//
// A workgroup of 256 computes a 64×64 tile of C, as tiled does. First it finds each
// of its 64 rows' largest |op(A)| over K and picks a power of two that brings it to
// [2^13, 2^14), so the row, scaled, rounds to f16 with f16's relative precision and
// neither overflows nor underflows (gradients of 1e-7 keep their 11 bits); the scale
// divides out of the sums exactly. Then, slab by slab (CK deep), the invocations stage
// op(A)·scale and op(B) as f16 in workgroup memory and each subgroup multiplies its
// COOP_BLOCKS CS×CS blocks of C, side by side in a row of blocks (`subgroup_id`; the
// launcher sets COOP_BLOCKS from the adapter's fixed subgroup size, so the blocks are
// shared out exactly and a row of blocks holds a whole number of subgroups' blocks),
// summing in f32 matrices. The blocks go to workgroup memory once, and each invocation stores its
// 4×4 as every variant does (`store_block`: alpha, beta, the second product summed
// here in f32, dropout on it, SwiGLU's backward).
// Cooperative operations must run in uniform control flow: no invocation returns
// early (a spare workgroup of a group, or one past the edges, computes and stores
// nothing) and their loops' bounds are uniform.
// Grid: (ceil(N/64), ceil(M/64), batch), or a group's tiles (`product_tile`).
const CS: u32 = COOP_SIZEu;
const CK: u32 = 32u;
override COOP_BLOCKS: u32 = 1u;
var<workgroup> coop_a: array<f16, 2048>;  // [TS][CK]: coop_a[m * CK + k]
var<workgroup> coop_b: array<f16, 2048>;  // [CK][TS]: coop_b[k * TS + n]
var<workgroup> coop_c: array<f32, 4096>;  // [TS][TS]: the tile's sums, scaled
var<workgroup> coop_max: array<f32, 256>; // a quarter row's largest |op(A)|
var<workgroup> coop_scale: array<f32, 64>;

// The power of two that brings a row's largest magnitude `big` to [2^13, 2^14).
fn row_scale(big: f32) -> f32 {
    return select(1.0, exp2(13.0 - floor(log2(big))), big > 0.0 && big <= 3.0e38);
}

// One-dimensional (naga takes `subgroup_id` only so), lid as tiled's 16×16.
@compute @workgroup_size(256, 1, 1)
fn matmul_coop(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32,
               @builtin(subgroup_id) sg: u32) {
    let lid = vec2<u32>(tid % 16u, tid / 16u);
    let pt = product_tile(wid);
    var q = ps[min(pt.x, GROUP_MAX - 1u)];
    let tm = pt.z * TS;
    let tn = pt.y * TS;
    let bi = select(wid.z, 0u, GROUPED);
    // A spare workgroup sums nothing (k 0) and stores nothing.
    let live = pt.x < GROUP_MAX && tm < q.m && tn < q.n && bi < q.batch;
    if (!live) { q.k = 0u; q.k2 = 0u; }
    p = q;
    let ab = p.a_off + bi * p.a_stride;
    let bb = p.b_off + bi * p.b_stride;
    // Each row's largest |op(A)|: four invocations a row, every fourth k each.
    let row = tm + tid / 4u;
    var big = 0.0;
    if (row < p.m) {
        for (var k = tid % 4u; k < p.k; k += 4u) { big = max(big, abs(a_at(ab, row, k))); }
    }
    coop_max[tid] = big;
    workgroupBarrier();
    if (tid < TS) {
        let i = tid * 4u;
        coop_scale[tid] = row_scale(max(max(coop_max[i], coop_max[i + 1u]), max(coop_max[i + 2u], coop_max[i + 3u])));
    }
    workgroupBarrier();
    // This subgroup's blocks: COOP_BLOCKS side by side in one row of blocks, so each
    // step loads its A block once for all of them.
    let j0 = sg * COOP_BLOCKS;
    let r0 = (j0 / (TS / CS)) * CS;
    let c0 = (j0 % (TS / CS)) * CS;
    var acc: array<coop_matCSxCS<f32, C>, 4>;
    for (var k0 = 0u; k0 < q.k; k0 += CK) {
        for (var r = 0u; r < 8u; r++) {
            let e = tid + r * 256u;
            let sa = slab_a(e, CK);
            let gm = tm + sa.y;
            let gk = k0 + sa.x;
            let va = a_at(ab, min(gm, p.m - 1u), min(gk, p.k - 1u)) * coop_scale[sa.y];
            coop_a[sa.y * CK + sa.x] = f16(select(0.0, va, gm < p.m && gk < p.k));
            let sb = slab_b(e, CK);
            let gkb = k0 + sb.x;
            let gn = tn + sb.y;
            let vb = b_at(bb, min(gkb, p.k - 1u), min(gn, p.n - 1u), r & 3u);
            coop_b[sb.x * TS + sb.y] = f16(select(0.0, vb, gn < p.n && gkb < p.k));
        }
        workgroupBarrier();
        for (var kk = 0u; kk < CK; kk += CS) {
            let am = coopLoadT<coop_matCSxCS<f16, A>>(&coop_a[r0 * CK + kk], CK);
            for (var i = 0u; i < COOP_BLOCKS; i++) {
                let bm = coopLoadT<coop_matCSxCS<f16, B>>(&coop_b[kk * TS + c0 + i * CS], TS);
                acc[i] = coopMultiplyAdd(am, bm, acc[i]);
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < COOP_BLOCKS; i++) {
        coopStoreT(acc[i], &coop_c[r0 * TS + c0 + i * CS], TS);
    }
    workgroupBarrier();
    // This invocation's 4×4: the first product unscaled, the second summed in f32.
    let m0 = tm + lid.y * 4u;
    let n0 = tn + lid.x * 4u;
    var acc1: array<vec4<f32>, 4>;
    for (var i = 0u; i < 4u; i++) {
        let o = (lid.y * 4u + i) * TS + lid.x * 4u;
        acc1[i] = vec4<f32>(coop_c[o], coop_c[o + 1u], coop_c[o + 2u], coop_c[o + 3u]) / coop_scale[lid.y * 4u + i];
    }
    let ms = vec4<u32>(min(m0, p.m - 1u), min(m0 + 1u, p.m - 1u), min(m0 + 2u, p.m - 1u), min(m0 + 3u, p.m - 1u));
    let ns = vec4<u32>(min(n0, p.n - 1u), min(n0 + 1u, p.n - 1u), min(n0 + 2u, p.n - 1u), min(n0 + 3u, p.n - 1u));
    let acc2 = second_block(ms, ns);
    if (live) {
        store_block(p.c_off + bi * p.c_stride, m0, n0, acc1, acc2);
    }
}
