//! The kernel registry: every WGSL file in `kernels/` embedded once, and a typed
//! launcher per op that checks shapes before it records a dispatch.
//!
//! Letters used in shapes (see docs/ARCHITECTURE.md): B batch, T tokens, C hidden,
//! NH / NKV heads, HS head size, V vocabulary, R LoRA rank, N a flat count.
//! Each launcher has a CPU twin of the same name and argument order in
//! `crate::reference`.

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod dpo;
pub mod elementwise;
pub mod embedding;
pub mod lora;
pub mod matmul;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;

pub use adamw::{adamw_step, grad_norm, AdamW};
pub use attention::{attention_backward, attention_forward, Attention, RopeOnLoad};
pub use cross_entropy::{cross_entropy_backward, cross_entropy_backward_scaled, cross_entropy_forward, cross_entropy_forward_backward, cross_entropy_sequence_logps};
pub use dpo::{dpo_backward, dpo_forward, Dpo, DpoLoss};
pub use elementwise::{add, add_bias, axpy, bias_backward, scale};
pub use embedding::{embedding_backward, embedding_forward};
pub use lora::{lora_backward, lora_backward_group, lora_down, lora_down_group, Lora};
pub use matmul::{fills_wide, matmul, matmul_group, split_ranges, matmul_swiglu_back, matmul_with, DropOn, Dropout, Glu, GluOn, Matmul, Second, SwigluBack};
pub use rmsnorm::{rmsnorm_backward, rmsnorm_forward, rmsnorm_forward_lora_down, LoraDh};
pub use rope::{rope_backward, rope_forward};
pub use swiglu::{swiglu_backward, swiglu_forward};

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};

/// One WGSL source file.
pub use crate::gpu::{Kernel, PROBE};

macro_rules! kernel {
    ($id:ident, $file:literal) => {
        pub const $id: Kernel = Kernel { name: $file, source: include_str!(concat!("../../kernels/", $file)) };
    };
    // A file that calls `hash` (dropout masks), with kernels/hash.wgsl in front.
    ($id:ident, $file:literal, hashed) => {
        pub const $id: Kernel = Kernel { name: $file, source: concat!(include_str!("../../kernels/hash.wgsl"), include_str!(concat!("../../kernels/", $file))) };
    };
}

kernel!(ADAMW, "adamw.wgsl");
kernel!(ATTENTION, "attention.wgsl");
kernel!(CROSS_ENTROPY, "cross_entropy.wgsl");
kernel!(DPO, "dpo.wgsl");
kernel!(ELEMENTWISE, "elementwise.wgsl");
kernel!(EMBEDDING, "embedding.wgsl");
kernel!(MATMUL, "matmul.wgsl", hashed);
kernel!(QUANT, "quant.wgsl");
kernel!(RMSNORM, "rmsnorm.wgsl", hashed);
kernel!(ROPE, "rope.wgsl");
kernel!(SWIGLU, "swiglu.wgsl");

/// kernels/hash.wgsl: `fn hash`, put in front of the files that draw dropout masks.
pub const HASH: Kernel = Kernel { name: "hash.wgsl", source: include_str!("../../kernels/hash.wgsl") };

/// Every kernel file, for validation and pipeline warm-up.
pub const ALL: &[Kernel] = &[ADAMW, ATTENTION, CROSS_ENTROPY, DPO, ELEMENTWISE, EMBEDDING, MATMUL, PROBE, RMSNORM, ROPE, SWIGLU];

/// The variant of a kernel that reads its weight operand as f16: the weight's binding
/// (`array<BElem>` or `array<WElem>`) becomes `array<u32>`, two halves a word, and the
/// file's `fn weight` (and `fn weight4`) read words and widen them (`unpack2x16float`)
/// rather than 16-bit elements one at a time, which CPU drivers turn into slow gathers
/// (lavapipe: 1.3–1.4× faster this way, README). Exact: every half widens to the same f32.
/// Built once per kernel; the f16 weights themselves are kept where the adapter has
/// `shader-f16`.
pub fn f16_variant(k: &Kernel) -> &'static Kernel {
    variant(k, "f16 weights", || {
        let (decl, load, buf) = weight_binding(k);
        let half = load.replace(&format!("f32({buf}[i])"), &format!("unpack2x16float({buf}[i >> 1u] >> ((i & 1u) * 16u)).x"));
        assert_ne!(half, load, "{}: `fn weight` does not read `{buf}[i]`", k.name);
        let mut body = k.source.replace(decl, &decl.replace("array<BElem>", "array<u32>").replace("array<WElem>", "array<u32>")).replace(load, &half);
        if let Some(load4) = k.source.lines().find(|l| l.starts_with("fn weight4(i: u32, slot: u32)")) {
            let four = format!("fn weight4(i: u32, slot: u32) -> vec4<f32> {{ return vec4<f32>(unpack2x16float({buf}[i >> 1u]), unpack2x16float({buf}[(i >> 1u) + 1u])); }}");
            body = body.replace(load4, &four);
        }
        body
    })
}

/// Variant `tag` of kernel `k` (named `FILE (TAG)` in pipelines and tallies), its
/// source made by `build` once per process and kept (pipelines hold `&'static` kernels).
fn variant(k: &Kernel, tag: &'static str, build: impl FnOnce() -> String) -> &'static Kernel {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    type Cache = HashMap<(&'static str, &'static str), &'static Kernel>;
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    let mut cache = CACHE.get_or_init(Mutex::default).lock().unwrap();
    cache.entry((k.name, tag)).or_insert_with(|| {
        let name: &'static str = Box::leak(format!("{} ({tag})", k.name).into_boxed_str());
        Box::leak(Box::new(Kernel { name, source: Box::leak(build().into_boxed_str()) }))
    })
}

/// A kernel's weight binding declaration, its `fn weight` line, and the binding's name.
fn weight_binding(k: &Kernel) -> (&'static str, &'static str, &'static str) {
    let decl = k.source.lines().find(|l| l.contains(": array<BElem>;") || l.contains(": array<WElem>;"));
    let load = k.source.lines().find(|l| l.starts_with("fn weight(i: u32"));
    let (Some(decl), Some(load)) = (decl, load) else { panic!("{} has no weight binding and `fn weight`", k.name) };
    // `var<storage, read> NAME: array<..>;`
    let buf = decl.split("var<storage, read> ").nth(1).and_then(|r| r.split(':').next()).expect("a named binding").trim();
    (decl, load, buf)
}

/// The kernels that have an f16-weight variant, and a packed one.
pub const WITH_F16: &[Kernel] = &[MATMUL, EMBEDDING];

/// The variant of a kernel that reads its frozen weight packed in blocks: the weight's
/// binding (`array<BElem>` or `array<WElem>`) becomes `array<u32>`, the file's
/// `fn weight(i[, slot])` reads through `kernels/quant.wgsl`'s `q_load(i)` or
/// `q_load_slot(i, slot)` (appended, reading that binding), and the `QTYPE` override
/// picks the block format. Built once per kernel.
pub fn packed_variant(k: &Kernel) -> &'static Kernel {
    variant(k, "packed weights", || {
        let (decl, load, buf) = weight_binding(k);
        // `f32(NAME[i])` becomes a dequantizing load (with the caller's slot, if it has one).
        let packed_load = load.replace(&format!("f32({buf}[i])"), if load.contains("slot") { "q_load_slot(i, slot)" } else { "q_load(i)" });
        assert_ne!(packed_load, load, "{}: `fn weight` does not read `{buf}[i]`", k.name);
        let mut body = k.source.replace(decl, &decl.replace("array<BElem>", "array<u32>").replace("array<WElem>", "array<u32>")).replace(load, &packed_load);
        // `fn weight4` (four neighbours at once), where the kernel has one.
        if let Some(load4) = k.source.lines().find(|l| l.starts_with("fn weight4(i: u32, slot: u32)")) {
            body = body.replace(load4, "fn weight4(i: u32, slot: u32) -> vec4<f32> { return q_load4(i, slot); }");
        }
        format!("{body}\n{}", QUANT.source.replace("QW", buf))
    })
}

/// The kernels whose workgroup reductions have subgroup versions (kernels/subgroups.wgsl).
pub const WITH_SUBGROUPS: &[Kernel] = &[RMSNORM, CROSS_ENTROPY, ADAMW];

/// `kernels/subgroups.wgsl`: functions that replace the row kernels' reductions.
pub const SUBGROUPS: Kernel = Kernel { name: "subgroups.wgsl", source: include_str!("../../kernels/subgroups.wgsl") };

/// The top-level functions of WGSL source `src`: (name, text from `fn` to its closing
/// brace, braces in `//` comments not counted).
fn functions(src: &'static str) -> Vec<(&'static str, &'static str)> {
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(at) = rest.find("\nfn ").map(|i| i + 1).or_else(|| rest.starts_with("fn ").then_some(0)) {
        let f = &rest[at..];
        let name = f[3..].split('(').next().expect("a function's name").trim();
        let (mut depth, mut comment, mut end) = (0, false, f.len());
        let bytes = f.as_bytes();
        for (i, &b) in bytes.iter().enumerate() {
            match b {
                b'\n' => comment = false,
                b'/' if !comment && bytes.get(i + 1) == Some(&b'/') => comment = true,
                b'{' if !comment => depth += 1,
                b'}' if !comment => {
                    depth -= 1;
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        out.push((name, &f[..end]));
        rest = &f[end..];
    }
    out
}

/// The variant of a row kernel (`WITH_SUBGROUPS`) whose reductions add within
/// subgroups: each function of kernels/subgroups.wgsl takes the place of the kernel's
/// function of the same name (`Caps::subgroup_sums`). Built once per kernel. Native
/// only: naga takes subgroup operations without `enable subgroups;` (it refuses the
/// directive), and the page never has subgroups (see `Caps::subgroup_sums`).
pub fn subgroup_variant(k: &Kernel) -> &'static Kernel {
    variant(k, "subgroup sums", || {
        let theirs = functions(k.source);
        let mut body = k.source.to_string();
        let mut swapped = 0;
        for (name, f) in functions(SUBGROUPS.source) {
            if let Some((_, old)) = theirs.iter().find(|(n, _)| *n == name) {
                body = body.replace(old, f);
                swapped += 1;
            }
        }
        assert!(swapped > 0, "{}: no reduction of kernels/subgroups.wgsl", k.name);
        body
    })
}

/// `kernels/coop.wgsl`: matmul on cooperative matrices, appended to matmul's source.
pub const COOP: Kernel = Kernel { name: "coop.wgsl", source: include_str!("../../kernels/coop.wgsl") };

/// The variant of matmul (or of its f16 or packed variant, `k`) with the entry point
/// `matmul_coop` on `size`×`size` f16 cooperative matrices with f32 sums
/// (kernels/coop.wgsl, `Caps::coop_matrix`): native Vulkan and Metal only, where the
/// device was granted wgpu's experimental `EXPERIMENTAL_COOPERATIVE_MATRIX`.
pub fn coop_variant(k: &Kernel, size: u32) -> &'static Kernel {
    assert!(size == 8 || size == 16, "cooperative matrices are 8×8 or 16×16, not {size}");
    let tag = if size == 8 { "coop 8" } else { "coop 16" };
    variant(k, tag, || {
        let coop = COOP.source.replace("COOP_SIZE", &size.to_string()).replace("CSxCS", &format!("{size}x{size}"));
        format!("enable f16;
enable wgpu_cooperative_matrix;
{}
{coop}", k.source)
    })
}

/// `k`, or its subgroup variant where the adapter's reductions add within subgroups.
pub(crate) fn reducing(gpu: &Gpu, k: &'static Kernel) -> &'static Kernel {
    if gpu.caps.subgroup_sums { subgroup_variant(k) } else { k }
}

/// Workgroups covering `n` items of `per` each.
pub(crate) fn groups(n: usize, per: usize) -> u32 {
    n.div_ceil(per) as u32
}

/// A 1-D grid of 256-wide workgroups over `n` elements that spills past the
/// 65,535-workgroup dimension limit into y (kernels index `y·65535·256 + x`).
pub(crate) fn grid_1d(n: usize) -> [u32; 3] {
    let wg = n.div_ceil(256);
    if wg <= 65535 {
        [wg as u32, 1, 1]
    } else {
        [65535, wg.div_ceil(65535) as u32, 1]
    }
}

/// Iterations of work that one invocation may loop over when each costs `per`
/// iterations of its loops and `fixed` more run around them: the launchers split
/// longer work into several dispatches (see `Caps::max_loop`). At least 1.
pub(crate) fn loop_span(gpu: &Gpu, per: usize, fixed: usize) -> usize {
    ((gpu.caps.max_loop as usize).saturating_sub(fixed) / per.max(1)).max(1)
}

/// `0..n` in consecutive ranges of at most `span`.
pub fn spans(n: usize, span: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n).step_by(span.max(1)).map(move |a| (a, (a + span).min(n)))
}

/// Every tensor must fit one storage binding of this device.
pub(crate) fn check_binding(gpu: &Gpu, op: &str, tensors: &[&Tensor]) -> Result<()> {
    for t in tensors {
        if t.bytes() > gpu.caps.max_binding {
            return Err(Error::TooLarge(format!(
                "{op}: `{}` is {} bytes, more than this adapter's largest storage binding ({} bytes); split it",
                t.label,
                t.bytes(),
                gpu.caps.max_binding
            )));
        }
    }
    Ok(())
}

pub(crate) fn check(cond: bool, op: &str, msg: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::Shape(format!("{op}: {}", msg())))
    }
}
