// Subgroup versions of the GPU row kernels' workgroup reductions (`Caps::subgroup_sums`,
// where the adapter has subgroups): `kernels::subgroup_variant` puts each function below
// in place of the kernel's function of the same name (rmsnorm.wgsl: `workgroup_sum`,
// `sum_cols`; cross_entropy.wgsl: `row_lse`; adamw.wgsl: `reduce`), over the same
// workgroup arrays. A tree in workgroup memory takes log2(workgroup) barriers; here each
// subgroup adds its invocations' values in registers (`subgroupAdd`), its first
// invocation leaves the sum in the array (the others a zero, so no subgroup index is
// needed: WGSL does not say how invocations map to subgroups), and after one barrier
// every subgroup adds the array up the same way, so every invocation returns the same
// total. Lanes and widths come from `subgroupExclusiveAdd(1u)` and `subgroupAdd(1u)`
// (any subgroup size, partial subgroups included). Not a module of its own: the names it
// uses are the kernels'. Uniform control flow only, as the functions it replaces.

// rmsnorm.wgsl: the sum of every invocation's `v` over the 64 (all return it).
fn workgroup_sum(lid: u32, v: f32) -> f32 {
    let lane = subgroupExclusiveAdd(1u);
    let width = subgroupAdd(1u);
    let s = subgroupAdd(v);
    red[lid] = select(0.0, s, lane == 0u);
    workgroupBarrier();
    var t = 0.0;
    for (var i = lane; i < 64u; i += width) { t += red[i]; }
    let total = subgroupAdd(t);
    workgroupBarrier();
    return total;
}

// rmsnorm.wgsl: each invocation's DH_COLS partial sums added over the 64: invocation j
// (< DH_COLS) returns column j's total.
fn sum_cols(lid: u32, acc: array<f32, DH_COLS>) -> f32 {
    let lane = subgroupExclusiveAdd(1u);
    let width = subgroupAdd(1u);
    for (var j = 0u; j < DH_COLS; j++) {
        let s = subgroupAdd(acc[j]);
        red_dh[j * 64u + lid] = select(0.0, s, lane == 0u);
    }
    workgroupBarrier();
    var mine = 0.0;
    for (var j = 0u; j < DH_COLS; j++) {
        var t = 0.0;
        for (var i = lane; i < 64u; i += width) { t += red_dh[j * 64u + i]; }
        let total = subgroupAdd(t);
        if (lid == j) { mine = total; }
    }
    workgroupBarrier();
    return mine;
}

// cross_entropy.wgsl: the row's lse from each of the 256 invocations' online max and
// sum: the row's max first (no exp in the loops), then the sums rescaled to it.
fn row_lse(lid: u32, mx: f32, sum: f32) -> f32 {
    let lane = subgroupExclusiveAdd(1u);
    let width = subgroupAdd(1u);
    wmax[lid] = select(-3.0e38, subgroupMax(mx), lane == 0u);
    workgroupBarrier();
    var m = -3.0e38;
    for (var i = lane; i < 256u; i += width) { m = max(m, wmax[i]); }
    let gm = subgroupMax(m);
    wsum[lid] = select(0.0, subgroupAdd(sum * exp(mx - gm)), lane == 0u);
    workgroupBarrier();
    var t = 0.0;
    for (var i = lane; i < 256u; i += width) { t += wsum[i]; }
    return gm + log(subgroupAdd(t));
}

// adamw.wgsl: the sum of every invocation's `value` over the 256.
fn reduce(lid: u32, value: f32) -> f32 {
    let lane = subgroupExclusiveAdd(1u);
    let width = subgroupAdd(1u);
    let s = subgroupAdd(value);
    part[lid] = select(0.0, s, lane == 0u);
    workgroupBarrier();
    var t = 0.0;
    for (var i = lane; i < 256u; i += width) { t += part[i]; }
    return subgroupAdd(t);
}
