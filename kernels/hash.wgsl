// lowbias32 (Chris Wellons): a good 32-bit integer hash, the one `crate::rng::hash`
// computes on the CPU. Not a module of its own: the kernels that draw dropout masks
// (matmul.wgsl, rmsnorm.wgsl) are registered with it in front (`kernels::MATMUL`).
fn hash(v: u32) -> u32 {
    var h = v;
    h ^= h >> 16u;
    h *= 0x7feb352du;
    h ^= h >> 15u;
    h *= 0x846ca68bu;
    h ^= h >> 16u;
    return h;
}
