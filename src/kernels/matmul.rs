//! Launcher for `kernels/matmul.wgsl`.

use super::{check, check_binding, f16_variant, groups, loop_span, packed_variant, spans, MATMUL};
use crate::error::Result;
use crate::gpu::{Bind, DType, Gpu, Recorder, Tensor, Variant};

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

    /// Elements each operand must hold.
    pub fn extents(&self) -> (usize, usize, usize) {
        let last = self.batch.saturating_sub(1);
        let (lda, ldb, ldc) = self.strides();
        let (ra, ca) = if self.trans_a { (self.k, self.m) } else { (self.m, self.k) };
        let (rb, cb) = if self.trans_b { (self.n, self.k) } else { (self.k, self.n) };
        (
            self.a_off + last * self.a_stride + (ra - 1) * lda + ca,
            self.b_off + last * self.b_stride + (rb - 1) * ldb + cb,
            self.c_off + last * self.c_stride + (self.m - 1) * ldc + self.n,
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
}

/// Record `C = alpha·op(A)·op(B) + beta·C`; the variant (register-blocked or tiled)
/// follows the adapter.
pub fn matmul(gpu: &Gpu, rec: &mut Recorder, mm: &Matmul, a: &Tensor, b: &Tensor, c: &Tensor) -> Result<()> {
    matmul_with(gpu, rec, mm, a, b, c, None)
}

/// `matmul`, with the operands (A2, B2) of `mm.second` when it has one.
pub fn matmul_with(gpu: &Gpu, rec: &mut Recorder, mm: &Matmul, a: &Tensor, b: &Tensor, c: &Tensor, second: Option<(&Tensor, &Tensor)>) -> Result<()> {
    let op = "matmul";
    check(mm.m > 0 && mm.n > 0 && mm.k > 0 && mm.batch > 0, op, || format!("empty product {mm:?}"))?;
    check(mm.second.is_some() == second.is_some(), op, || format!("a second product needs its two operands: {mm:?}"))?;
    check(mm.batch == 1 || (mm.second.is_none() && mm.dropout.is_none()), op, || format!("a fused product is not batched: {mm:?}"))?;
    if let Some(d) = mm.dropout {
        check((0.0..1.0).contains(&d.p), op, || format!("dropout probability {} must be in [0, 1)", d.p))?;
        check(d.on != DropOn::Second || mm.second.is_some(), op, || format!("dropout on a second product that is absent: {mm:?}"))?;
    }
    let (k2, (lda2, ldb2)) = mm.second.map_or((0, (0, 0)), |s| (s.k, s.strides(mm)));
    if let (Some(s), Some((a2, b2))) = (mm.second, second) {
        check(s.k > 0 && lda2 >= if mm.trans_a { mm.m } else { s.k } && ldb2 >= if mm.trans_b { s.k } else { mm.n }, op, || {
            format!("second product narrower than its rows in {mm:?}")
        })?;
        let (ea2, eb2) = s.extents(mm);
        for (t, name, need) in [(a2, "a2", ea2), (b2, "b2", eb2)] {
            check(t.dtype == DType::F32 && t.numel() >= need, op, || {
                format!("`{name}` ({}) is {:?} {:?}, needs {need} f32 elements for {mm:?}", t.label, t.dtype, t.shape)
            })?;
        }
        check(ea2 <= u32::MAX as usize && eb2 <= u32::MAX as usize, op, || "operands exceed 2^32 elements".into())?;
        check_binding(gpu, op, &[a2, b2])?;
    }
    let (lda, ldb, ldc) = mm.strides();
    let (ca, cb) = (if mm.trans_a { mm.m } else { mm.k }, if mm.trans_b { mm.k } else { mm.n });
    check(lda >= ca && ldb >= cb && ldc >= mm.n, op, || format!("row strides narrower than the rows in {mm:?}"))?;
    let (ea, eb, ec) = mm.extents();
    // B may be an f16 or packed weight; A and C are f32 activations.
    check(b.dtype != DType::F16 || gpu.caps.shader_f16, op, || format!("`b` ({}) is f16 but the device has no shader-f16", b.label))?;
    for (t, name, need) in [(a, "a", ea), (b, "b", eb), (c, "c", ec)] {
        let dtype_ok = t.dtype == DType::F32 || (name == "b" && matches!(t.dtype, DType::F16 | DType::Q(_)));
        check(dtype_ok && t.numel() >= need, op, || {
            format!("`{name}` ({}) is {:?} {:?}, needs {need} f32 elements for {mm:?}", t.label, t.dtype, t.shape)
        })?;
    }
    check(ec <= u32::MAX as usize && ea <= u32::MAX as usize && eb <= u32::MAX as usize, op, || {
        "operands exceed 2^32 elements".into()
    })?;
    check_binding(gpu, op, &[a, b, c])?;
    let drop = mm.dropout.map_or(0, |d| match d.on {
        DropOn::A => 1,
        DropOn::B => 2,
        DropOn::Second => 3,
    });
    let mut constants = vec![("TRANS_A", mm.trans_a as u32 as f64), ("TRANS_B", mm.trans_b as u32 as f64), ("DROP", drop as f64)];
    // The register variant loops once per k; the tiled one 21 times per 16 k (a
    // slab load of 4, 16 products, the k0 step). The second product's loop runs
    // beside the last k-range.
    let (entry, tile, k_span) = match gpu.caps.variant {
        Variant::Register => ("matmul_reg", 32, loop_span(gpu, 1, 64 + k2)),
        Variant::Tiled => ("matmul_tiled", 64, loop_span(gpu, 21, 64 + 21 * k2.div_ceil(16)) * 16),
    };
    let kernel = match b.dtype {
        DType::F16 => f16_variant(&MATMUL),
        DType::Q(q) => {
            constants.push(("QTYPE", q.id() as f64));
            packed_variant(&MATMUL)
        }
        _ => &MATMUL,
    };
    let pipeline = gpu.pipeline(kernel, entry, &constants);
    // A long inner dimension (dx = dlogits·W over a 128k vocabulary) is summed in
    // k-ranges that fit the loop budget, each adding into C after the first.
    let ranges: Vec<_> = spans(mm.k, k_span).collect();
    let (a2, b2) = second.unwrap_or((a, a));
    let d = mm.dropout.unwrap_or(Dropout { p: 0.0, seed: 0, on: DropOn::A });
    for &(k0, k1) in &ranges {
        let last = k1 == mm.k;
        let s = mm.second.filter(|_| last).unwrap_or(Second::new(0, 0.0));
        let params = Params {
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
            beta: if k0 == 0 { mm.beta } else { 1.0 },
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
        };
        let grid = [groups(mm.n, tile), groups(mm.m, tile), mm.batch as u32];
        let binds = [(1, a.into()), (2, b.into()), (3, Bind::from(c)), (4, a2.into()), (5, b2.into())];
        gpu.dispatch(rec, &pipeline, entry, &params, &binds, grid)?;
    }
    Ok(())
}
