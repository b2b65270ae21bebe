//! Launcher for `kernels/matmul.wgsl`.

use super::{check, check_binding, coop_variant, f16_variant, groups, loop_span, packed_variant, spans, MATMUL};
use crate::error::Result;
use crate::gpu::{Bind, DType, Gpu, Recorder, Tensor, Variant, WideMatmul};

/// `C[b] = alpha · op(A[b]) · op(B[b]) + beta · C[b]` for b in 0..batch.
///
/// - op(A) `[M, K]`: A stored `[M, K]`, or `[K, M]` when `trans_a`
/// - op(B) `[K, N]`: B stored `[K, N]`, or `[N, K]` when `trans_b`
/// - C `[M, N]`
///
/// Offsets, batch strides and row strides (`lda`, `ldb`, `ldc`; 0 = packed) are in
/// elements; a batch stride of 0 broadcasts.
///
/// Two fusions serve LoRA (one product, no batch): a `second` product summed into the
/// same C (`matmul_with` binds its operands), and inverted `dropout` on A or B as
/// loaded, or on the second product.
#[derive(Clone, Debug, PartialEq)]
pub struct Matmul {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub alpha: f32,
    pub beta: f32,
    pub a_off: usize,
    pub b_off: usize,
    pub c_off: usize,
    pub a_stride: usize,
    pub b_stride: usize,
    pub c_stride: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub second: Option<Second>,
    pub dropout: Option<Dropout>,
    /// In a group (`matmul_group`): A and B are the group's second operand pair
    /// (bindings 4 and 5), so one dispatch serves products over two sets of operands.
    pub alt: bool,
    /// SwiGLU on A or B as loaded (see `Glu`).
    pub glu: Option<Glu>,
    /// SwiGLU's backward in the store (see `SwigluBack`; `matmul_swiglu_back`).
    pub swiglu_back: Option<SwigluBack>,
}

/// SwiGLU's backward in a product's store: the product is dh, the gradient of
/// `h = silu(gate)·up`, at (m, n) of an [M, N] matrix laid out as gate and up are (row
/// stride ldc); the store reads gate at element `g` of its extra operand and up `up`
/// further on, and adds dgate into C and dup `du` elements further on (as
/// `swiglu_backward`), so no pass stores dh. Down's dx product with SwiGLU's backward.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SwigluBack {
    pub g: usize,
    pub up: usize,
    pub du: usize,
}

/// SwiGLU on an operand as loaded: its element i is `silu(v[i]) · v[i + up]`, where the
/// stored operand holds the gate and, `up` elements further on, the up outputs. The
/// products that read the MLP's hidden `silu(gate)·up` make it so, and no pass stores it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Glu {
    pub on: GluOn,
    pub up: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GluOn {
    A,
    B,
}

/// A second product `+ alpha · op(A2)·op(B2)` of the same M×N and transposes, over its
/// own inner dimension `k`, with its own offsets and row strides (0 = packed).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Second {
    pub k: usize,
    pub alpha: f32,
    pub a_off: usize,
    pub b_off: usize,
    pub lda: usize,
    pub ldb: usize,
}

impl Second {
    pub fn new(k: usize, alpha: f32) -> Second {
        Second { k, alpha, a_off: 0, b_off: 0, lda: 0, ldb: 0 }
    }

    /// Row strides as stored for an M×N product, with 0 meaning packed.
    pub fn strides(&self, mm: &Matmul) -> (usize, usize) {
        let lda = if self.lda > 0 { self.lda } else if mm.trans_a { mm.m } else { self.k };
        let ldb = if self.ldb > 0 { self.ldb } else if mm.trans_b { self.k } else { mm.n };
        (lda, ldb)
    }

    /// Elements A2 and B2 must hold.
    pub fn extents(&self, mm: &Matmul) -> (usize, usize) {
        let (lda, ldb) = self.strides(mm);
        let (ra, ca) = if mm.trans_a { (self.k, mm.m) } else { (mm.m, self.k) };
        let (rb, cb) = if mm.trans_b { (mm.n, self.k) } else { (self.k, mm.n) };
        (self.a_off + (ra - 1) * lda + ca, self.b_off + (rb - 1) * ldb + cb)
    }
}

/// Which operand LoRA's dropout applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropOn {
    /// A as loaded (element i counted from `a_off`): h = dropout(x)·Aᵀ.
    A,
    /// B as loaded (from `b_off`): dA += dhᵀ·dropout(x).
    B,
    /// The second product, per element of C (from `c_off`): dx += dropout(dh·A).
    Second,
}

/// Inverted dropout with drop probability `p`: element i is kept, as v / (1 − p),
/// where `hash(i ^ hash(seed)) / 2³² ≥ p` (`crate::rng::hash`), so a mask depends only
/// on (seed, i) and the forward's mask is found again in the backward.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f32,
    pub seed: u32,
    pub on: DropOn,
}

impl Dropout {
    /// Whether element `i` is kept.
    pub fn keeps(&self, i: usize) -> bool {
        let key = crate::rng::hash(self.seed);
        crate::rng::hash(i as u32 ^ key) as f32 / 4294967296.0 >= self.p
    }

    /// `v`, element `i`, after dropout.
    pub fn apply(&self, i: usize, v: f32) -> f32 {
        if self.keeps(i) {
            v / (1.0 - self.p)
        } else {
            0.0
        }
    }
}

impl Matmul {
    /// A single `[M, K]·[K, N]` product that overwrites C.
    pub fn new(m: usize, n: usize, k: usize) -> Matmul {
        Matmul {
            m,
            n,
            k,
            batch: 1,
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            beta: 0.0,
            a_off: 0,
            b_off: 0,
            c_off: 0,
            a_stride: 0,
            b_stride: 0,
            c_stride: 0,
            lda: 0,
            ldb: 0,
            ldc: 0,
            second: None,
            dropout: None,
            alt: false,
            glu: None,
            swiglu_back: None,
        }
    }

    /// Row strides as stored, with 0 meaning packed.
    pub fn strides(&self) -> (usize, usize, usize) {
        let lda = if self.lda > 0 { self.lda } else if self.trans_a { self.m } else { self.k };
        let ldb = if self.ldb > 0 { self.ldb } else if self.trans_b { self.k } else { self.n };
        let ldc = if self.ldc > 0 { self.ldc } else { self.n };
        (lda, ldb, ldc)
    }

    /// `y = x·Wᵀ` for x `[rows, din]` and W `[dout, din]` (a linear layer).
    pub fn linear(rows: usize, din: usize, dout: usize) -> Matmul {
        Matmul { trans_b: true, ..Matmul::new(rows, dout, din) }
    }

    pub fn trans_a(mut self) -> Self {
        self.trans_a = true;
        self
    }

    pub fn trans_b(mut self) -> Self {
        self.trans_b = true;
        self
    }

    /// Add into C instead of overwriting it (beta = 1).
    pub fn accumulate(mut self) -> Self {
        self.beta = 1.0;
        self
    }

    pub fn alpha(mut self, alpha: f32) -> Self {
        self.alpha = alpha;
        self
    }

    /// `batch` products; the strides step from one to the next (0 broadcasts).
    pub fn batched(mut self, batch: usize, a_stride: usize, b_stride: usize, c_stride: usize) -> Self {
        self.batch = batch;
        self.a_stride = a_stride;
        self.b_stride = b_stride;
        self.c_stride = c_stride;
        self
    }

    /// Elements each operand must hold (an operand under SwiGLU holds its up
    /// outputs too).
    pub fn extents(&self) -> (usize, usize, usize) {
        let last = self.batch.saturating_sub(1);
        let (lda, ldb, ldc) = self.strides();
        let (ra, ca) = if self.trans_a { (self.k, self.m) } else { (self.m, self.k) };
        let (rb, cb) = if self.trans_b { (self.n, self.k) } else { (self.k, self.n) };
        let up = |on: GluOn| self.glu.filter(|g| g.on == on).map_or(0, |g| g.up);
        (
            self.a_off + last * self.a_stride + (ra - 1) * lda + ca + up(GluOn::A),
            self.b_off + last * self.b_stride + (rb - 1) * ldb + cb + up(GluOn::B),
            self.c_off + last * self.c_stride + (self.m - 1) * ldc + self.n + self.swiglu_back.map_or(0, |e| e.du),
        )
    }

    /// Plus a second product (see `Second`).
    pub fn plus(mut self, second: Second) -> Self {
        self.second = Some(second);
        self
    }

    /// Through dropout (see `Dropout`).
    pub fn dropout(mut self, dropout: Dropout) -> Self {
        self.dropout = Some(dropout);
        self
    }

    pub fn flops(&self) -> f64 {
        2.0 * ((self.k + self.second.map_or(0, |s| s.k)) * self.m * self.n * self.batch) as f64
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    batch: u32,
    a_off: u32,
    b_off: u32,
    c_off: u32,
    lda: u32,
    a_stride: u32,
    b_stride: u32,
    c_stride: u32,
    ldb: u32,
    alpha: f32,
    beta: f32,
    ldc: u32,
    k2: u32,
    a2_off: u32,
    b2_off: u32,
    lda2: u32,
    ldb2: u32,
    alpha2: f32,
    drop_p: f32,
    drop_key: u32,
    drop_base: u32,
    alt: u32,
    glu_up: u32,
    epi_g: u32,
    epi_du: u32,
    tile0: u32,
    tiles: u32,
    tiles_n: u32,
    pad: u32,
}

/// Products one grouped dispatch computes at most (`ps` in `kernels/matmul.wgsl`).
pub const GROUP_MAX: usize = 8;

/// Record `C = alpha·op(A)·op(B) + beta·C`; the variant (register-blocked or tiled)
/// follows the adapter.
pub fn matmul(gpu: &Gpu, rec: &mut Recorder, mm: &Matmul, a: &Tensor, b: &Tensor, c: &Tensor) -> Result<()> {
    matmul_with(gpu, rec, mm, a, b, c, None)
}

/// `matmul`, with the operands (A2, B2) of `mm.second` when it has one.
pub fn matmul_with(gpu: &Gpu, rec: &mut Recorder, mm: &Matmul, a: &Tensor, b: &Tensor, c: &Tensor, second: Option<(&Tensor, &Tensor)>) -> Result<()> {
    check(mm.swiglu_back.is_none(), "matmul", || format!("SwiGLU's backward needs its gate and up (matmul_swiglu_back): {mm}"))?;
    matmul_on(gpu, rec, mm, a, b, c, second, None)
}

/// `matmul_with` of a product with SwiGLU's backward in its store (`mm.swiglu_back`),
/// reading gate and up from `aux`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_swiglu_back(gpu: &Gpu, rec: &mut Recorder, mm: &Matmul, a: &Tensor, b: &Tensor, c: &Tensor, second: Option<(&Tensor, &Tensor)>, aux: &Tensor) -> Result<()> {
    let op = "matmul";
    let Some(e) = mm.swiglu_back else { return check(false, op, || format!("no SwiGLU backward in {mm}")) };
    check(mm.batch == 1 && mm.beta == 0.0 && !mm.alt, op, || format!("SwiGLU's backward in an unbatched product that overwrites dh: {mm}"))?;
    let (_, _, ldc) = mm.strides();
    aux.expect_min(op, "aux", DType::F32, e.g + e.up + (mm.m - 1) * ldc + mm.n)?;
    check_binding(gpu, op, &[aux])?;
    matmul_on(gpu, rec, mm, a, b, c, second, Some(aux))
}

#[allow(clippy::too_many_arguments)]
fn matmul_on(gpu: &Gpu, rec: &mut Recorder, mm: &Matmul, a: &Tensor, b: &Tensor, c: &Tensor, second: Option<(&Tensor, &Tensor)>, aux: Option<&Tensor>) -> Result<()> {
    if mm.alt {
        let Some((a2, b2)) = second else { return check(false, "matmul", || format!("a product on the second operands needs them: {mm}")) };
        return matmul_with(gpu, rec, &Matmul { alt: false, ..mm.clone() }, a2, b2, c, None);
    }
    validate(gpu, mm, a, b, c, second)?;
    let wide = wide(gpu, std::iter::once(mm));
    // Split-K decides before a pipeline is built: it runs the grouped kernel only.
    let (_, tile, k_span) = Launch::kernel(gpu, mm, b, wide);
    if let Some(ranges) = split_ranges(gpu, mm, tile, k_span) {
        return matmul_split(gpu, rec, mm, &ranges, wide, a, b, c, second);
    }
    let launch = Launch::new(gpu, mm, b, false, false, wide);
    // A long inner dimension (dx = dlogits·W over a 128k vocabulary) is summed in
    // k-ranges that fit the loop budget, each adding into C after the first.
    for (k0, k1) in spans(mm.k, launch.k_span) {
        let mut params = [Params::zeroed(); GROUP_MAX];
        params[0] = Params::of(mm, k0, k1);
        launch.record(gpu, rec, &params, [groups(mm.n, launch.tile), groups(mm.m, launch.tile), mm.batch as u32], a, b, c, second, aux)?;
    }
    Ok(())
}

/// Several products of one kind (the same transposes, dropout operand, and second
/// product or none) over the same five tensors, each with its own shape, offsets,
/// scale and dropout seed, in one dispatch per `GROUP_MAX` (a grid of each product's
/// tiles in turn): LoRA's products for the projections that share an input. Products are
/// unbatched; where one needs its k split for the loop budget, each runs alone.
/// Products that write C must not overlap (they run at once). `second` holds the
/// second products' operands, or, for products marked `alt` (which have none), their
/// A and B.
pub fn matmul_group(gpu: &Gpu, rec: &mut Recorder, mms: &[Matmul], a: &Tensor, b: &Tensor, c: &Tensor, second: Option<(&Tensor, &Tensor)>) -> Result<()> {
    let op = "matmul_group";
    let Some(first) = mms.first() else { return Ok(()) };
    let alt = mms.iter().any(|mm| mm.alt);
    for mm in mms {
        match (mm.alt, second) {
            (true, Some((a2, b2))) => validate(gpu, &Matmul { alt: false, ..mm.clone() }, a2, b2, c, None)?,
            (true, None) => check(false, op, || format!("a product on the second operands needs them: {mm}"))?,
            (false, _) if alt => validate(gpu, mm, a, b, c, None)?,
            (false, _) => validate(gpu, mm, a, b, c, second)?,
        }
        check(!alt || (mm.second.is_none() && b.dtype == DType::F32), op, || format!("a group over two operand sets has f32 operands and no second products: {mm}"))?;
        check(mm.batch == 1, op, || format!("a grouped product is not batched: {mm}"))?;
        // SwiGLU is of the kind too: checked below over the products on the first
        // operands (an `alt` product reads its own, never through SwiGLU).
        let kind = |m: &Matmul| (m.trans_a, m.trans_b, m.dropout.map(|d| d.on), m.second.is_some());
        check(kind(mm) == kind(first), op, || format!("products of different kinds in one group: {first} and {mm}"))?;
        check(!mm.alt || mm.glu.is_none(), op, || format!("SwiGLU on the second operands in {mm}"))?;
        check(mm.swiglu_back.is_none(), op, || format!("SwiGLU's backward in a grouped product: {mm}"))?;
    }
    // Alone, a product binds the second operands only as its own A and B, or as
    // its second product's.
    let own = |mm: &Matmul| if alt && !mm.alt { None } else { second };
    if mms.len() == 1 {
        return matmul_with(gpu, rec, first, a, b, c, own(first));
    }
    let glu = mms.iter().filter(|m| !m.alt).find_map(|m| m.glu);
    check(mms.iter().filter(|m| !m.alt).all(|m| m.glu.map(|g| g.on) == glu.map(|g| g.on)), op, || format!("products with and without SwiGLU in one group: {}", mms.iter().map(|m| m.to_string()).collect::<Vec<_>>().join("; ")))?;
    let launch = Launch::new(gpu, &Matmul { glu, ..first.clone() }, b, true, alt, wide(gpu, mms.iter()));
    if mms.iter().any(|mm| mm.k > launch.k_span) {
        return mms.iter().try_for_each(|mm| matmul_with(gpu, rec, mm, a, b, c, own(mm)));
    }
    for chunk in mms.chunks(GROUP_MAX) {
        // Each product's tiles in turn, as one flat grid (`product_tile` in the kernel).
        let mut params = [Params::zeroed(); GROUP_MAX];
        let mut total = 0u32;
        for (p, mm) in params.iter_mut().zip(chunk) {
            *p = Params::of(mm, 0, mm.k);
            (p.tile0, p.tiles_n) = (total, groups(mm.n, launch.tile));
            p.tiles = p.tiles_n * groups(mm.m, launch.tile);
            total += p.tiles;
        }
        let grid = [total.min(65535), total.div_ceil(65535), 1];
        launch.record(gpu, rec, &params, grid, a, b, c, second, None)?;
    }
    Ok(())
}

/// The k-ranges split-K runs `mm` in at once (`Caps::split_k`), or None where its
/// tiles sum their whole k: it is unbatched, makes fewer tiles (of `tile`² outputs)
/// than split-K aims for and a k of at least twice its least range. As many ranges
/// as bring the tiles up to that aim, each at least `min_k` long, a multiple of 32,
/// and within the loop budget (`k_span`); none where their slices would pass a
/// logits chunk's bytes (at most 64 MiB), or fewer than 2.
pub fn split_ranges(gpu: &Gpu, mm: &Matmul, tile: usize, k_span: usize) -> Option<Vec<(usize, usize)>> {
    let s = gpu.caps.split_k?;
    let tiles = mm.n.div_ceil(tile) * mm.m.div_ceil(tile);
    if mm.batch != 1 || mm.swiglu_back.is_some() || mm.alt || mm.m > 65535 || tiles >= s.tiles || mm.k < 2 * s.min_k.max(1) {
        return None;
    }
    let parts = (s.tiles / tiles).min(mm.k / s.min_k.max(1));
    let len = mm.k.div_ceil(parts.max(1)).next_multiple_of(32).min(k_span);
    let ranges: Vec<_> = spans(mm.k, len).collect();
    let (_, _, ldc) = mm.strides();
    let bytes = (ranges.len() * mm.m * ldc * 4) as u64;
    (ranges.len() >= 2 && bytes <= gpu.caps.chunk_bytes() && (ranges.len() as u64) < gpu.caps.max_loop as u64).then_some(ranges)
}

/// Split-K: `mm`'s k-ranges at once, as groups of up to `GROUP_MAX` (each range a
/// product of the group over the same operands, writing into its own slice of a
/// scratch buffer laid out as C, beta 0, the second product beside the last range),
/// then `matmul_split_sum` adds the slices in order into C with its beta.
#[allow(clippy::too_many_arguments)]
fn matmul_split(gpu: &Gpu, rec: &mut Recorder, mm: &Matmul, ranges: &[(usize, usize)], wide: bool, a: &Tensor, b: &Tensor, c: &Tensor, second: Option<(&Tensor, &Tensor)>) -> Result<()> {
    let (_, _, ldc) = mm.strides();
    let slice = mm.m * ldc;
    let slices = gpu.pooled("matmul split-K slices", DType::F32, &[ranges.len() * slice])?;
    let launch = Launch::new(gpu, mm, b, true, false, wide);
    let tiles_n = groups(mm.n, launch.tile);
    let tiles = tiles_n * groups(mm.m, launch.tile);
    for (i, chunk) in ranges.chunks(GROUP_MAX).enumerate() {
        let mut params = [Params::zeroed(); GROUP_MAX];
        for (j, (p, &(k0, k1))) in params.iter_mut().zip(chunk).enumerate() {
            *p = Params::of(mm, k0, k1);
            p.c_off = ((i * GROUP_MAX + j) * slice) as u32;
            p.beta = 0.0;
            // A mask on the second product counts from its slice as from C.
            if mm.dropout.is_some_and(|d| d.on == DropOn::Second) {
                p.drop_base = p.c_off;
            }
            (p.tile0, p.tiles_n, p.tiles) = (j as u32 * tiles, tiles_n, tiles);
        }
        let total = chunk.len() as u32 * tiles;
        launch.record(gpu, rec, &params, [total.min(65535), total.div_ceil(65535), 1], a, b, &slices, second, None)?;
    }
    let mut params = [Params::zeroed(); GROUP_MAX];
    params[0] = Params { m: mm.m as u32, n: mm.n as u32, k: ranges.len() as u32, c_off: mm.c_off as u32, ldc: ldc as u32, beta: mm.beta, a_stride: slice as u32, ..Params::zeroed() };
    let sum = gpu.pipeline(&MATMUL, "matmul_split_sum", &[]);
    gpu.dispatch(rec, &sum, "matmul_split_sum", &params, &[(1, Bind::from(&slices)), (3, c.into())], [groups(mm.n, 64), mm.m as u32, 1])
}

/// Whether products of these shapes run the wide kernel on this adapter
/// (`Caps::wide_matmul`).
fn wide<'a>(gpu: &Gpu, mms: impl Iterator<Item = &'a Matmul>) -> bool {
    match gpu.caps.wide_matmul {
        WideMatmul::Off => false,
        WideMatmul::All => true,
        WideMatmul::Large => fills_wide(mms.map(|mm| (mm.m, mm.n))),
    }
}

/// Whether M×N products (one, or a group's) fill the wide kernel's 128×128 tiles: each
/// at least 128 rows and columns, and at most 30% more outputs computed than kept over
/// them all (q/k/v's group on SmolLM2: 576, 192 and 192 columns, 1.2; a logits chunk
/// of 341 rows by 576, the head's dx, 1.25). On lavapipe the wide kernel runs large
/// products 1.2–2.1× as fast as the register one.
pub fn fills_wide(shapes: impl IntoIterator<Item = (usize, usize)>) -> bool {
    let (mut kept, mut computed) = (0, 0);
    for (m, n) in shapes {
        if m < 128 || n < 128 {
            return false;
        }
        kept += m * n;
        computed += m.next_multiple_of(128) * n.next_multiple_of(128);
    }
    kept > 0 && 10 * computed <= 13 * kept
}

/// The shape and operand checks of one product.
fn validate(gpu: &Gpu, mm: &Matmul, a: &Tensor, b: &Tensor, c: &Tensor, second: Option<(&Tensor, &Tensor)>) -> Result<()> {
    let op = "matmul";
    check(mm.m > 0 && mm.n > 0 && mm.k > 0 && mm.batch > 0, op, || format!("empty product {mm}"))?;
    check(mm.second.is_some() == second.is_some(), op, || format!("a second product needs its two operands: {mm}"))?;
    check(mm.batch == 1 || (mm.second.is_none() && mm.dropout.is_none()), op, || format!("a fused product is not batched: {mm}"))?;
    if let Some(d) = mm.dropout {
        check((0.0..1.0).contains(&d.p), op, || format!("dropout probability {} must be in [0, 1)", d.p))?;
        check(d.on != DropOn::Second || mm.second.is_some(), op, || format!("dropout on a second product that is absent: {mm}"))?;
    }
    if let (Some(s), Some((a2, b2))) = (mm.second, second) {
        let (lda2, ldb2) = s.strides(mm);
        check(s.k > 0 && lda2 >= if mm.trans_a { mm.m } else { s.k } && ldb2 >= if mm.trans_b { s.k } else { mm.n }, op, || {
            format!("second product narrower than its rows in {mm}")
        })?;
        let (ea2, eb2) = s.extents(mm);
        for (t, name, need) in [(a2, "a2", ea2), (b2, "b2", eb2)] {
            check(t.dtype == DType::F32 && t.numel() >= need, op, || {
                format!("`{name}` ({}) is {} {}, needs {need} f32 elements for {mm}", t.label, t.dtype, crate::gpu::dims(&t.shape))
            })?;
        }
        check(ea2 <= u32::MAX as usize && eb2 <= u32::MAX as usize, op, || "operands exceed 2^32 elements".into())?;
        check_binding(gpu, op, &[a2, b2])?;
    }
    let (lda, ldb, ldc) = mm.strides();
    let (ca, cb) = (if mm.trans_a { mm.m } else { mm.k }, if mm.trans_b { mm.k } else { mm.n });
    check(lda >= ca && ldb >= cb && ldc >= mm.n, op, || format!("row strides narrower than the rows in {mm}"))?;
    let (ea, eb, ec) = mm.extents();
    // B may be an f16 or packed weight; A and C are f32 activations.
    check(b.dtype != DType::F16 || gpu.caps.shader_f16, op, || format!("`b` ({}) is f16 but the device has no shader-f16", b.label))?;
    check(mm.glu.is_none_or(|g| g.on == GluOn::A || b.dtype == DType::F32), op, || format!("SwiGLU on a weight ({}) in {mm}", b.label))?;
    for (t, name, need) in [(a, "a", ea), (b, "b", eb), (c, "c", ec)] {
        let dtype_ok = t.dtype == DType::F32 || (name == "b" && matches!(t.dtype, DType::F16 | DType::Q(_)));
        check(dtype_ok && t.numel() >= need, op, || {
            format!("`{name}` ({}) is {} {}, needs {need} f32 elements for {mm}", t.label, t.dtype, crate::gpu::dims(&t.shape))
        })?;
    }
    check(ec <= u32::MAX as usize && ea <= u32::MAX as usize && eb <= u32::MAX as usize, op, || {
        "operands exceed 2^32 elements".into()
    })?;
    check_binding(gpu, op, &[a, b, c])
}

/// A product as errors name it: `matmul 37×70 over k 45 (Bᵀ), alpha 1, beta 0, plus a
/// second product over k 4, dropout 0.25 on it`.
impl std::fmt::Display for Matmul {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let ts = match (self.trans_a, self.trans_b) {
            (false, false) => "",
            (true, false) => " (Aᵀ)",
            (false, true) => " (Bᵀ)",
            (true, true) => " (Aᵀ, Bᵀ)",
        };
        write!(f, "matmul {}×{} over k {}{ts}, alpha {}, beta {}", self.m, self.n, self.k, self.alpha, self.beta)?;
        if self.batch > 1 {
            write!(f, ", batch {} (strides {}, {}, {})", self.batch, self.a_stride, self.b_stride, self.c_stride)?;
        }
        let (lda, ldb, ldc) = self.strides();
        write!(f, ", offsets {}, {}, {}, row strides {lda}, {ldb}, {ldc}", self.a_off, self.b_off, self.c_off)?;
        if let Some(s) = self.second {
            write!(f, ", plus a second product over k {}", s.k)?;
        }
        if let Some(d) = self.dropout {
            let on = match d.on {
                DropOn::A => "A",
                DropOn::B => "B",
                DropOn::Second => "the second product",
            };
            write!(f, ", dropout {} on {on}", d.p)?;
        }
        if let Some(g) = self.glu {
            write!(f, ", SwiGLU on {}", if g.on == GluOn::A { "A" } else { "B" })?;
        }
        if self.swiglu_back.is_some() {
            f.write_str(", SwiGLU's backward in the store")?;
        }
        if self.alt {
            f.write_str(", on the second operands")?;
        }
        Ok(())
    }
}

impl Params {
    fn zeroed() -> Params {
        bytemuck::Zeroable::zeroed()
    }

    /// The uniform of `mm`'s k-range `k0..k1` (the second product rides on the last).
    fn of(mm: &Matmul, k0: usize, k1: usize) -> Params {
        let (lda, ldb, ldc) = mm.strides();
        let last = k1 == mm.k;
        let s = mm.second.filter(|_| last).unwrap_or(Second::new(0, 0.0));
        let (lda2, ldb2) = mm.second.map_or((0, 0), |s| s.strides(mm));
        let d = mm.dropout.unwrap_or(Dropout { p: 0.0, seed: 0, on: DropOn::A });
        Params {
            m: mm.m as u32,
            n: mm.n as u32,
            k: (k1 - k0) as u32,
            batch: mm.batch as u32,
            a_off: (mm.a_off + if mm.trans_a { k0 * lda } else { k0 }) as u32,
            b_off: (mm.b_off + if mm.trans_b { k0 } else { k0 * ldb }) as u32,
            c_off: mm.c_off as u32,
            lda: lda as u32,
            a_stride: mm.a_stride as u32,
            b_stride: mm.b_stride as u32,
            c_stride: mm.c_stride as u32,
            ldb: ldb as u32,
            alpha: mm.alpha,
            // Each k-range adds its share (C holds no earlier share under SwiGLU's
            // backward, which adds a function linear in it).
            beta: if k0 == 0 || mm.swiglu_back.is_some() { mm.beta } else { 1.0 },
            ldc: ldc as u32,
            k2: s.k as u32,
            a2_off: s.a_off as u32,
            b2_off: s.b_off as u32,
            lda2: lda2 as u32,
            ldb2: ldb2 as u32,
            alpha2: s.alpha,
            drop_p: d.p,
            drop_key: crate::rng::hash(d.seed),
            drop_base: match d.on {
                DropOn::A => mm.a_off,
                DropOn::B => mm.b_off,
                DropOn::Second => mm.c_off,
            } as u32,
            alt: mm.alt as u32,
            glu_up: mm.glu.map(|g| g.up).or(mm.swiglu_back.map(|e| e.up)).unwrap_or(0) as u32,
            epi_g: mm.swiglu_back.map_or(0, |e| e.g) as u32,
            epi_du: mm.swiglu_back.map_or(0, |e| e.du) as u32,
            // A group's tiles (`matmul_group` sets them).
            tile0: 0,
            tiles: 0,
            tiles_n: 1,
            pad: 0,
        }
    }
}

/// The pipeline of one kind of product on this adapter, and how far its k may run in
/// one dispatch.
struct Launch {
    pipeline: std::sync::Arc<crate::gpu::Pipeline>,
    entry: &'static str,
    tile: usize,
    k_span: usize,
}

impl Launch {
    /// `grouped`: the grid is a group's tiles (`matmul_group`), not the batch.
    /// `alt`: some products read the second operand pair (`Matmul::alt`).
    /// `wide`: the wide kernel, whatever the variant.
    /// The entry point a product of `mm`'s kind over `b` runs on this adapter (`wide`:
    /// the wide kernel, whatever the variant), its tile's side, and how far its k may
    /// run in one dispatch; grouped or not, the same.
    fn kernel(gpu: &Gpu, mm: &Matmul, b: &Tensor, wide: bool) -> (&'static str, usize, usize) {
        let k2 = mm.second.map_or(0, |s| s.k);
        // The register variant loops once per k; the tiled one 21 times per 16 k (a
        // slab load of 4, 16 products, the k0 step); the wide one 9 times per 8 k (8
        // products, the slab step), and 88 in its stores and group lookup. The second
        // product's loop runs beside the last k-range.
        // The cooperative-matrix one 37 times per 32 k (its rows' maxima 8, a slab load
        // of 8, at most 4 blocks of 4 products, the steps), and 64 around them.
        match gpu.caps.variant {
            _ if gpu.caps.coop_matrix.is_some() && b.dtype != DType::F32 => ("matmul_coop", 64, loop_span(gpu, 37, 64 + k2) * 32),
            _ if wide => ("matmul_wide", 128, loop_span(gpu, 9, 96 + 9 * k2.div_ceil(8)) * 8),
            Variant::Register => ("matmul_reg", 32, loop_span(gpu, 1, 64 + k2)),
            Variant::Tiled => ("matmul_tiled", 64, loop_span(gpu, 21, 64 + 21 * k2.div_ceil(16)) * 16),
        }
    }

    fn new(gpu: &Gpu, mm: &Matmul, b: &Tensor, grouped: bool, alt: bool, wide: bool) -> Launch {
        let drop = mm.dropout.map_or(0, |d| match d.on {
            DropOn::A => 1,
            DropOn::B => 2,
            DropOn::Second => 3,
        });
        let glu = mm.glu.map_or(0, |g| match g.on {
            GluOn::A => 1,
            GluOn::B => 2,
        });
        let flag = |on: bool| on as u32 as f64;
        let mut constants = vec![
            ("TRANS_A", flag(mm.trans_a)),
            ("TRANS_B", flag(mm.trans_b)),
            ("DROP", drop as f64),
            ("GROUPED", flag(grouped)),
            ("ALT", flag(alt)),
            ("GLU", glu as f64),
            ("EPI", flag(mm.swiglu_back.is_some())),
        ];
        let (entry, tile, k_span) = Launch::kernel(gpu, mm, b, wide);
        let coop = gpu.caps.coop_matrix.filter(|_| b.dtype != DType::F32);
        let kernel = match b.dtype {
            DType::F16 => f16_variant(&MATMUL),
            DType::Q(q) => {
                constants.push(("QTYPE", q.id() as f64));
                packed_variant(&MATMUL)
            }
            _ => &MATMUL,
        };
        let kernel = match coop {
            Some(c) => {
                constants.push(("COOP_BLOCKS", c.blocks as f64));
                coop_variant(kernel, c.size)
            }
            None => kernel,
        };
        Launch { pipeline: gpu.pipeline(kernel, entry, &constants), entry, tile, k_span }
    }

    /// One dispatch of `params` (a product's k-range in `[0]`, or a group's products).
    #[allow(clippy::too_many_arguments)]
    fn record(&self, gpu: &Gpu, rec: &mut Recorder, params: &[Params; GROUP_MAX], grid: [u32; 3], a: &Tensor, b: &Tensor, c: &Tensor, second: Option<(&Tensor, &Tensor)>, aux: Option<&Tensor>) -> Result<()> {
        let (a2, b2) = second.unwrap_or((a, a));
        let binds = [(1, a.into()), (2, b.into()), (3, Bind::from(c)), (4, a2.into()), (5, b2.into()), (6, aux.unwrap_or(a).into())];
        gpu.dispatch(rec, &self.pipeline, self.entry, params, &binds, grid)
    }
}
