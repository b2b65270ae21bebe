//! The GPU context: adapter, device, queue and limits behind one async path that
//! serves native and wasm; the pipeline cache; uploads and readback.
//!
//! Every launcher in `crate::kernels` records into a [`Recorder`] (one command
//! encoder); [`Gpu::submit`] sends it. Reading back is async (`map_async` + await):
//! natively the device is polled once with a blocking wait, in the browser the
//! event loop resolves the map, so no code ever spins.

pub mod profile;
pub mod reuse;
mod tensor;

pub use profile::KernelTime;
pub use reuse::Counters;
pub use tensor::{dims, DType, Tensor};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// A WGSL file: its name (`matmul.wgsl`) and source. `crate::kernels` registers them.
pub struct Kernel {
    pub name: &'static str,
    pub source: &'static str,
}

/// The loop-budget probe `Gpu::new` runs (`Caps::max_loop`).
pub const PROBE: Kernel = Kernel { name: "probe.wgsl", source: include_str!("../../kernels/probe.wgsl") };

/// Which matmul (and other tile-shaped) kernel variants suit this adapter.
///
/// CPU drivers (lavapipe, SwiftShader) pay dearly for workgroup barriers, so they get
/// barrier-free register-blocked kernels; real GPUs get workgroup-memory tiling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Register,
    Tiled,
}

/// Which products run matmul's wide kernel (`matmul_wide` in kernels/matmul.wgsl:
/// 128×128 of C a workgroup, 8×8 an invocation, double-buffered slabs) instead of the
/// variant's own (`matmul_reg`, 32×32; `matmul_tiled`, 64×64).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WideMatmul {
    /// None.
    Off,
    /// Products that fill its tiles (`kernels::fills_wide`): at least 128 rows and
    /// columns, at most 30% more work in padding. LoRA's narrow products keep the
    /// variant's kernel.
    Large,
    /// Every product (the tests run each shape through it).
    All,
}

impl WideMatmul {
    /// The default for a variant: `Large` with the CPU drivers' kernels, where it was
    /// measured faster for large products (lavapipe and SwiftShader, `bench kernels`);
    /// `Off` with the GPU kernels until a GPU measures it (`scripts/bench-gpu.sh` runs
    /// both).
    pub fn of(variant: Variant) -> WideMatmul {
        match variant {
            Variant::Register => WideMatmul::Large,
            Variant::Tiled => WideMatmul::Off,
        }
    }
}

/// What the device granted, recorded so callers can choose kernels.
#[derive(Clone, Debug)]
pub struct Caps {
    pub adapter: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
    pub shader_f16: bool,
    pub subgroups: bool,
    pub timestamps: bool,
    /// Largest storage binding a launcher may use, in bytes (the device limit, or a
    /// smaller cap set by [`GpuOptions::max_binding`] to exercise the split paths).
    pub max_binding: u64,
    /// Loop iterations one invocation may run in all (every loop of the kernel
    /// counted together). Mesa's llvmpipe (lavapipe) silently ends an invocation's
    /// loops after 65,535 iterations; `Gpu::new` measures such a cap once with
    /// `kernels/probe.wgsl` and keeps half of it, and launchers split longer work
    /// into several dispatches. `u32::MAX` where the driver has no cap.
    pub max_loop: u32,
    pub variant: Variant,
    /// Which products run matmul's wide kernel (see [`WideMatmul`]).
    pub wide_matmul: WideMatmul,
    /// The row kernels' workgroup reductions (RMSNorm, cross-entropy's rows, the
    /// gradient norm) add within subgroups (`subgroupAdd`, kernels/subgroups.wgsl) and
    /// meet in workgroup memory once, instead of a tree of barriers: where the adapter
    /// has subgroups, by default with the GPU kernels (`Variant::Tiled`). The page has
    /// none: wgpu 30's WebGPU backend does not map the browser's `subgroups` feature
    /// (Chrome offers it, even on SwiftShader), so its adapters never report it.
    pub subgroup_sums: bool,
    /// The cooperative-matrix shapes the adapter offers (tensor cores; native Vulkan
    /// and Metal only, wgpu's experimental `EXPERIMENTAL_COOPERATIVE_MATRIX`): M×N×K,
    /// operand and accumulator types. Empty where it offers none.
    pub coop_shapes: Vec<wgpu::CooperativeMatrixProperties>,
    /// The products whose B is a frozen weight (f16 or packed) run on cooperative
    /// matrices (`matmul_coop`, kernels/coop.wgsl): 16×16 or 8×8 blocks, f16 operands
    /// and f32 sums. By default with the GPU kernels, where the adapter offers such a
    /// shape, shader-f16, and subgroups of a fixed size that suits (`coop_choice`).
    pub coop_matrix: Option<Coop>,
    /// Products with few tiles and a long inner dimension run their k-ranges at once
    /// (split-K, see [`SplitK`]); None: each product's tiles sum their whole k.
    pub split_k: Option<SplitK>,
    /// See [`GpuOptions::no_reuse`].
    pub no_reuse: bool,
    /// The largest device-local memory heap the driver reports (Vulkan), in bytes;
    /// None where wgpu says nothing (Metal, DX12, WebGPU).
    pub device_heap: Option<u64>,
}

impl Caps {
    /// The memory a run may plan for on this device, where known: on a CPU adapter
    /// (lavapipe, SwiftShader; its device memory is the host's) 90% of what the host
    /// has available (the rest for the process's own host copies: staging, uploads,
    /// the driver); else 90% of the largest device-local heap (the rest for the driver
    /// and what else shares the GPU).
    pub fn memory(&self) -> Option<u64> {
        if self.adapter.device_type == wgpu::DeviceType::Cpu {
            return available_memory().map(|m| m / 10 * 9);
        }
        self.device_heap.map(|h| h / 10 * 9)
    }

    /// The most bytes a logits chunk binds: a binding, at most 64 MiB.
    pub fn chunk_bytes(&self) -> u64 {
        Caps::chunk_bytes_of(self.max_binding)
    }

    pub fn chunk_bytes_of(max_binding: u64) -> u64 {
        max_binding.min(64 << 20)
    }
}

/// Temporaries sized for the largest batch of a loop (`Gpu::sizing`); as they come
/// again once dropped.
pub struct Sizing<'a> {
    gpu: &'a Gpu,
    largest: usize,
}

impl Sizing<'_> {
    /// The next batch has `rows` token rows.
    pub fn batch(&self, rows: usize) {
        self.gpu.set_scale((self.largest as f64 / rows.max(1) as f64).max(1.0));
    }
}

impl Drop for Sizing<'_> {
    fn drop(&mut self) {
        self.gpu.set_scale(1.0);
    }
}

/// Split-K (`Caps::split_k`): an unbatched product that launches fewer than `tiles`
/// workgroups, over an inner dimension of at least twice `min_k`, runs as up to
/// `tiles` / its tiles k-ranges of at least `min_k` at once (one dispatch, a group of
/// the ranges, each into its own slice of a scratch buffer), and `matmul_split_sum`
/// adds the slices into C in order, so results do not depend on timing. Off by
/// default on every adapter until a GPU measures it (`--split-k on` in `bench`;
/// `scripts/bench-gpu.sh` runs both): the head's dx over a 49,152-word vocabulary
/// makes 54 tiles of 64×64 a chunk, each summing 49,152 terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitK {
    pub tiles: usize,
    pub min_k: usize,
}

impl SplitK {
    /// What `--split-k on` asks for: 256 workgroups (an H100 has 132 multiprocessors,
    /// a laptop GPU 8 to 40 compute units), k-ranges of at least 512.
    pub const ON: SplitK = SplitK { tiles: 256, min_k: 512 };
}

/// The workgroup memory `matmul_coop` declares (kernels/coop.wgsl: A and B slabs of
/// 64×32 halves, the tile's 64×64 sums, rows' maxima and scales), which the adapter
/// must allow.
pub const COOP_WORKGROUP_BYTES: u32 = 2 * 2048 * 2 + 4096 * 4 + 256 * 4 + 64 * 4;

/// How `matmul_coop` runs on cooperative matrices (`Caps::coop_matrix`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Coop {
    /// The blocks' size: 16×16 or 8×8, f16 operands and f32 sums.
    pub size: u32,
    /// Blocks of the workgroup's 64×64 tile each subgroup multiplies (its 256
    /// invocations make 256 / the subgroup size subgroups).
    pub blocks: u32,
}

/// The cooperative matrices `matmul_coop` uses among the adapter's `shapes`: square,
/// 16 (else 8) with f16 operands and f32 sums, where the subgroup size is fixed
/// (`subgroup_min` = `subgroup_max`) and shares the tile's blocks out at 1 to 4 a
/// subgroup (`coop_blocks`).
pub fn coop_choice(shapes: &[wgpu::CooperativeMatrixProperties], subgroup_min: u32, subgroup_max: u32) -> Option<Coop> {
    if subgroup_min != subgroup_max {
        return None;
    }
    [16, 8].into_iter().find_map(|size| {
        let offered = shapes.iter().any(|p| {
            (p.m_size, p.n_size, p.k_size) == (size, size, size)
                && p.ab_type == wgpu::CooperativeScalarType::F16
                && p.cr_type == wgpu::CooperativeScalarType::F32
        });
        Some(Coop { size, blocks: coop_blocks(size, subgroup_max)? }).filter(|_| offered)
    })
}

/// `size`² blocks of a 64×64 tile each subgroup of `subgroup` invocations multiplies
/// when 256 share it out exactly, if 1 to 4: 16×16 blocks with subgroups of 16 to 64
/// (NVIDIA's 32: 2), 8×8 with 4 to 16 (lavapipe's 8: 2).
pub fn coop_blocks(size: u32, subgroup: u32) -> Option<u32> {
    let blocks = (64 / size) * (64 / size);
    let subgroups = 256 / subgroup.max(1);
    (subgroup.is_power_of_two() && subgroup <= 256 && blocks.is_multiple_of(subgroups) && (1..=4).contains(&(blocks / subgroups))).then(|| blocks / subgroups)
}

/// A cooperative-matrix shape as `webtune info` prints it: `16×16×16 f16→f32`.
pub fn coop_shape(p: &wgpu::CooperativeMatrixProperties) -> String {
    let ty = |t: wgpu::CooperativeScalarType| match t {
        wgpu::CooperativeScalarType::F32 => "f32",
        wgpu::CooperativeScalarType::F16 => "f16",
        wgpu::CooperativeScalarType::I32 => "i32",
        wgpu::CooperativeScalarType::U32 => "u32",
    };
    format!("{}×{}×{} {}→{}", p.m_size, p.n_size, p.k_size, ty(p.ab_type), ty(p.cr_type))
}

/// A capability as the adapter line says it.
fn yes(on: bool) -> &'static str {
    if on { "yes" } else { "no" }
}

/// `MemAvailable` from /proc/meminfo (Linux), in bytes.
fn available_memory() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let info = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// The size of the adapter's largest device-local heap, from the Vulkan driver
/// (`vkGetPhysicalDeviceMemoryProperties`); None on other backends.
#[cfg(any(target_os = "linux", target_os = "windows", target_os = "android"))]
fn device_heap(adapter: &wgpu::Adapter) -> Option<u64> {
    // SAFETY: the raw instance and physical device are only read, while `adapter`
    // (which owns them) lives.
    let hal = unsafe { adapter.as_hal::<wgpu::hal::api::Vulkan>() }?;
    let props = unsafe { hal.shared_instance().raw_instance().get_physical_device_memory_properties(hal.raw_physical_device()) };
    let heaps = &props.memory_heaps[..props.memory_heap_count as usize];
    heaps.iter().filter(|h| h.flags.contains(ash::vk::MemoryHeapFlags::DEVICE_LOCAL)).map(|h| h.size).max()
}

#[cfg(not(any(target_os = "linux", target_os = "windows", target_os = "android")))]
fn device_heap(_adapter: &wgpu::Adapter) -> Option<u64> {
    None
}

/// Options for [`Gpu::new_with`].
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Cap the storage binding size below the device limit (tests of the chunked paths).
    pub max_binding: Option<u64>,
    /// Force a kernel variant instead of choosing by `device_type`.
    pub variant: Option<Variant>,
    /// Force which products run matmul's wide kernel (default: `WideMatmul::of`).
    pub wide_matmul: Option<WideMatmul>,
    /// Force the subgroup reductions on or off (see [`Caps::subgroup_sums`]; never on
    /// an adapter without subgroups).
    pub subgroup_sums: Option<bool>,
    /// Force matmul on cooperative matrices on or off (see [`Caps::coop_matrix`]; never
    /// on an adapter without them).
    pub coop_matrix: Option<bool>,
    /// Split-K for products with few tiles and a long k (see [`SplitK`]; default: off).
    pub split_k: Option<SplitK>,
    /// Do not use `shader-f16` even where offered (frozen weights then stay f32).
    pub no_f16: bool,
    /// Cap the loop budget below the driver's (tests of the split paths on any driver).
    pub max_loop: Option<u32>,
    /// Build everything per use, as before `gpu::reuse`: a new buffer per temporary, a
    /// uniform buffer and a bind group per dispatch, a compute pass per dispatch
    /// (`webtune bench train --no-reuse` measures what reuse saves).
    pub no_reuse: bool,
}

type PipelineKey = (&'static str, &'static str, Vec<(&'static str, u64)>);

/// A compiled entry point of a kernel, named `file::entry` (the name GPU timings use).
pub struct Pipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub name: Arc<str>,
    /// Its bind group layout (group 0), asked for once.
    pub layout: wgpu::BindGroupLayout,
}

impl std::ops::Deref for Pipeline {
    type Target = wgpu::ComputePipeline;
    fn deref(&self) -> &wgpu::ComputePipeline {
        &self.pipeline
    }
}

pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub caps: Caps,
    modules: Mutex<HashMap<&'static str, Arc<wgpu::ShaderModule>>>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<Pipeline>>>,
    profiler: Mutex<profile::Profiler>,
    state: Arc<Mutex<reuse::State>>,
    /// Readback staging buffers by size class, mapped and unmapped again.
    staging: Mutex<HashMap<u64, Vec<wgpu::Buffer>>>,
    /// Errors no scope caught (wgpu's default handler panics): `Gpu::scoped` reports them.
    uncaptured: Arc<Mutex<Vec<String>>>,
    /// Why the device was lost, once it is (its lost callback).
    lost: Arc<Mutex<Option<String>>>,
    /// Test hook: the pool's next allocation fails as out-of-memory (`fail_next_allocation`).
    fail_next: std::sync::atomic::AtomicBool,
}

/// One storage binding of a dispatch: a whole tensor or a byte range of its buffer.
pub struct Bind<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub offset: u64,
    pub size: Option<u64>,
}

impl<'a> From<&'a Tensor> for Bind<'a> {
    /// The tensor's bytes, or its whole pooled buffer (`reuse::Lease::bind`).
    fn from(t: &'a Tensor) -> Self {
        Bind { buffer: &t.buffer, offset: t.offset, size: Some(t.bind_size()) }
    }
}

/// A command encoder that launchers record dispatches into: one compute pass runs
/// until a copy or clear needs the encoder (while profiling, a pass per dispatch with
/// its timestamp queries); the parameters and small uploads it staged in the arena
/// are written when it is submitted.
pub struct Recorder {
    encoder: Option<wgpu::CommandEncoder>,
    pass: Option<wgpu::ComputePass<'static>>,
    profiled: bool,
    timed: Option<profile::Timed>,
    /// Arena writes to make before the commands run: (arena buffer, offset, bytes).
    staged: Vec<(wgpu::Buffer, u64, Vec<u8>)>,
    /// Creation order (`reuse::State::open`).
    seq: u64,
    state: Arc<Mutex<reuse::State>>,
}

impl Recorder {
    /// The command encoder, for copies and clears (the open compute pass ends).
    pub fn encoder(&mut self) -> &mut wgpu::CommandEncoder {
        self.pass = None;
        self.encoder.as_mut().expect("a recorder's encoder lives until submit")
    }

    fn stage(&mut self, buffer: &wgpu::Buffer, offset: u64, bytes: &[u8]) {
        match self.staged.last_mut() {
            Some((b, o, data)) if b == buffer && *o + data.len() as u64 == offset => data.extend_from_slice(bytes),
            _ => self.staged.push((buffer.clone(), offset, bytes.to_vec())),
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        // Submitted or abandoned (an error while recording): either way no longer open.
        let mut st = self.state.lock().unwrap();
        st.open.remove(&self.seq);
    }
}

impl Gpu {
    /// The adapter wgpu prefers (a discrete GPU when present), with its own maximum
    /// buffer and binding sizes and the optional features it offers.
    pub async fn new() -> Result<Gpu> {
        Self::new_with(GpuOptions::default()).await
    }

    pub async fn new_with(opts: GpuOptions) -> Result<Gpu> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                force_fallback_adapter: false,
                compatible_surface: None,
                apply_limit_buckets: false,
            })
            .await
            .map_err(|e| Error::NoAdapter(e.to_string()))?;
        let info = adapter.get_info();
        let offered = adapter.features();
        let mut wanted = wgpu::Features::SUBGROUP | wgpu::Features::TIMESTAMP_QUERY;
        if !opts.no_f16 {
            wanted |= wgpu::Features::SHADER_F16;
        }
        // The adapter's own maxima (buffer and binding sizes above all), not the defaults.
        let limits = adapter.limits();
        let coop_shapes = adapter.cooperative_matrix_properties();
        let variant = opts.variant.unwrap_or(match info.device_type {
            wgpu::DeviceType::Cpu => Variant::Register,
            _ => Variant::Tiled,
        });
        let coop_matrix = match opts.coop_matrix.unwrap_or(variant == Variant::Tiled) {
            true if !opts.no_f16
                && offered.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX | wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP)
                && limits.max_compute_workgroup_storage_size >= COOP_WORKGROUP_BYTES =>
            {
                coop_choice(&coop_shapes, info.subgroup_min_size, info.subgroup_max_size)
            }
            _ => None,
        };
        if coop_matrix.is_some() {
            wanted |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        }
        let features = offered & wanted;
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("webtune device"),
                required_features: features,
                required_limits: limits.clone(),
                // SAFETY: wgpu's experimental features may hold bugs; the only one asked
                // for is cooperative matrices, where `coop_matrix` chose them.
                experimental_features: if coop_matrix.is_some() { unsafe { wgpu::ExperimentalFeatures::enabled() } } else { wgpu::ExperimentalFeatures::disabled() },
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| Error::RequestDevice(e.to_string()))?;
        let device_max = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
        let max_binding = opts.max_binding.map_or(device_max, |m| m.min(device_max));
        let caps = Caps {
            adapter: info,
            shader_f16: features.contains(wgpu::Features::SHADER_F16),
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            timestamps: features.contains(wgpu::Features::TIMESTAMP_QUERY),
            limits,
            features,
            max_binding,
            max_loop: u32::MAX,
            variant,
            wide_matmul: opts.wide_matmul.unwrap_or(WideMatmul::of(variant)),
            subgroup_sums: features.contains(wgpu::Features::SUBGROUP)
                && opts.subgroup_sums.unwrap_or(variant == Variant::Tiled),
            coop_shapes,
            coop_matrix,
            split_k: opts.split_k,
            no_reuse: opts.no_reuse,
            device_heap: device_heap(&adapter),
        };
        // An error no scope catches is kept for `scoped` to report, not a panic.
        let uncaptured: Arc<Mutex<Vec<String>>> = Arc::default();
        let kept = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| kept.lock().unwrap().push(e.to_string())));
        let lost: Arc<Mutex<Option<String>>> = Arc::default();
        let told = lost.clone();
        device.set_device_lost_callback(move |reason, message| {
            let why = match reason {
                wgpu::DeviceLostReason::Destroyed => "destroyed".to_string(),
                wgpu::DeviceLostReason::Unknown if message.is_empty() => "no reason given".to_string(),
                wgpu::DeviceLostReason::Unknown => message,
            };
            *told.lock().unwrap() = Some(why);
        });
        let mut gpu = Gpu {
            device,
            queue,
            caps,
            modules: Mutex::default(),
            pipelines: Mutex::default(),
            profiler: Mutex::default(),
            state: Arc::default(),
            staging: Mutex::default(),
            uncaptured,
            lost,
            fail_next: Default::default(),
        };
        let measured = match gpu.loop_cap().await? {
            Some(cap) => cap / 2,
            None => u32::MAX,
        };
        gpu.caps.max_loop = opts.max_loop.map_or(measured, |m| m.min(measured));
        Ok(gpu)
    }

    /// The driver's cap on loop iterations per invocation, if it has one: the probe
    /// asks for `PROBE_LOOPS` and counts how many ran.
    async fn loop_cap(&self) -> Result<Option<u32>> {
        const PROBE_LOOPS: u32 = 1 << 20;
        let count = Tensor::new(self, "loop probe count", DType::U32, &[1])?;
        let pipeline = self.pipeline(&PROBE, "loop_probe", &[]);
        let mut rec = self.recorder("loop probe");
        self.dispatch(&mut rec, &pipeline, "loop_probe", &[PROBE_LOOPS, 0, 0, 0], &[(1, Bind::from(&count))], [1, 1, 1])?;
        self.submit(rec);
        let ran = self.read::<u32>(&count).await?[0];
        Ok((ran < PROBE_LOOPS).then_some(ran))
    }

    /// One line naming the adapter, its driver and what was granted.
    pub fn describe(&self) -> String {
        let a = &self.caps.adapter;
        let kind = match a.device_type {
            wgpu::DeviceType::Cpu => "CPU",
            wgpu::DeviceType::DiscreteGpu => "discrete GPU",
            wgpu::DeviceType::IntegratedGpu => "integrated GPU",
            wgpu::DeviceType::VirtualGpu => "virtual GPU",
            wgpu::DeviceType::Other => "other device",
        };
        // The browser names neither the adapter nor its driver.
        let driver = format!("{} {}", a.driver, a.driver_info);
        let driver = if driver.trim().is_empty() { String::new() } else { format!(", driver {}", driver.trim()) };
        let name = if a.name.is_empty() { "the browser's WebGPU adapter" } else { &a.name };
        format!(
            "{name} ({kind}, {}{driver}); max binding {} MiB, max buffer {} MiB; shader-f16 {}, subgroups {}, timestamps {}; kernels {}{}{}{}{}; loop budget {}",
            a.backend,
            self.caps.max_binding >> 20,
            self.caps.limits.max_buffer_size >> 20,
            yes(self.caps.shader_f16),
            yes(self.caps.subgroups),
            yes(self.caps.timestamps),
            match self.caps.variant {
                Variant::Register => "register (CPU drivers)",
                Variant::Tiled => "tiled (GPUs)",
            },
            match self.caps.wide_matmul {
                WideMatmul::Off => "",
                WideMatmul::Large => ", wide matmul for large products",
                WideMatmul::All => ", wide matmul for every product",
            },
            if self.caps.subgroup_sums { ", subgroup sums" } else { "" },
            match self.caps.coop_matrix {
                Some(c) => format!(", frozen-weight products on {0}×{0} cooperative matrices", c.size),
                None => String::new(),
            },
            match self.caps.split_k {
                Some(s) => format!(", split-K below {} tiles", s.tiles),
                None => String::new(),
            },
            if self.caps.max_loop == u32::MAX { "unlimited".to_string() } else { format!("{} iterations per invocation", self.caps.max_loop) }
        ) + &self.caps.device_heap.map_or(String::new(), |h| format!("; device-local heap {} MiB", h >> 20))
    }

    /// The compute pipeline for `entry` of `kernel` with the given override constants,
    /// compiled once and cached by (kernel, entry point, constants).
    pub fn pipeline(
        &self,
        kernel: &Kernel,
        entry: &'static str,
        constants: &[(&'static str, f64)],
    ) -> Arc<Pipeline> {
        let key: PipelineKey = (kernel.name, entry, constants.iter().map(|(k, v)| (*k, v.to_bits())).collect());
        if let Some(p) = self.pipelines.lock().unwrap().get(&key) {
            return p.clone();
        }
        let module = self
            .modules
            .lock()
            .unwrap()
            .entry(kernel.name)
            .or_insert_with(|| {
                Arc::new(self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(kernel.name),
                    source: wgpu::ShaderSource::Wgsl(kernel.source.into()),
                }))
            })
            .clone();
        // The overrides set (non-zero) tell apart a kernel's variants in the tallies.
        let set: Vec<String> = constants.iter().filter(|(_, v)| *v != 0.0).map(|(k, v)| if *v == 1.0 { k.to_string() } else { format!("{k} {v}") }).collect();
        let label = match set.is_empty() {
            true => format!("{}::{}", kernel.name.replace(".wgsl", ""), entry),
            false => format!("{}::{} ({})", kernel.name.replace(".wgsl", ""), entry, set.join(", ")),
        };
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions { constants, zero_initialize_workgroup_memory: true },
            cache: None,
        });
        let layout = pipeline.get_bind_group_layout(0);
        let pipeline = Arc::new(Pipeline { pipeline, name: label.into(), layout });
        self.pipelines.lock().unwrap().insert(key, pipeline.clone());
        pipeline
    }

    pub fn recorder(&self, label: &str) -> Recorder {
        let mut st = self.state.lock().unwrap();
        if st.open.is_empty() {
            // A top-level recorder: everything before it is submitted, so the arenas
            // start again, and what idled long enough is let go.
            (st.params.cursor, st.uploads.cursor) = (0, 0);
            st.generation += 1;
            if st.generation.is_multiple_of(reuse::IDLE_GENERATIONS) {
                reuse::sweep(&mut st, false);
            }
        }
        st.created += 1;
        let seq = st.created;
        st.open.insert(seq);
        Recorder {
            encoder: Some(self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) })),
            pass: None,
            profiled: self.profiler.lock().unwrap().on,
            timed: None,
            staged: Vec::new(),
            seq,
            state: self.state.clone(),
        }
    }

    /// Submit a recorder: its staged arena bytes first, then its commands. While
    /// profiling, its timestamps are resolved into a buffer that [`Gpu::kernel_times`] reads.
    pub fn submit(&self, mut rec: Recorder) {
        self.finish(&mut rec);
    }

    /// Submit what `rec` holds and go on recording into it afresh (a long pass kept in
    /// several command buffers): the temporaries dropped so far can serve what follows.
    pub fn flush(&self, rec: &mut Recorder, label: &str) {
        self.finish(rec);
        let fresh = self.recorder(label);
        let old = std::mem::replace(rec, fresh);
        drop(old);
    }

    fn finish(&self, rec: &mut Recorder) {
        let start = crate::clock::now();
        rec.pass = None;
        for (buffer, offset, bytes) in std::mem::take(&mut rec.staged) {
            self.queue.write_buffer(&buffer, offset, &bytes);
        }
        let mut encoder = rec.encoder.take().expect("submitted once");
        if let Some(timed) = rec.timed.take() {
            let n = 2 * timed.names.len() as u32;
            let size = n as u64 * 8;
            let resolve = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("timestamps"),
                size,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let staging = self.staging_buffer(size);
            encoder.resolve_query_set(&timed.queries, 0..n, &resolve, 0);
            encoder.copy_buffer_to_buffer(&resolve, 0, &staging, 0, size);
            self.profiler.lock().unwrap().pending.push((staging, timed.names));
        }
        self.queue.submit([encoder.finish()]);
        let mut st = self.state.lock().unwrap();
        // No longer open: what was freed while it was can be handed out again.
        st.open.remove(&rec.seq);
        st.counters.submits += 1;
        st.counters.submit_s += crate::clock::now() - start;
    }

    /// What this context created and recorded so far.
    pub fn counters(&self) -> Counters {
        self.state.lock().unwrap().counters
    }

    /// Dispatches recorded so far by kernel entry point (`file::entry`).
    pub fn dispatches_by_kernel(&self) -> HashMap<String, u64> {
        self.state.lock().unwrap().by_kernel.iter().map(|(k, n)| (k.to_string(), *n)).collect()
    }

    /// Run `work` (recording and submitting) with the device's errors caught: an
    /// out-of-memory becomes `Error::OutOfMemory` (the caller may retry smaller), any
    /// other error the device reports an `Error::Launch`, never a panic.
    pub async fn scoped<T>(&self, work: impl FnOnce() -> Result<T>) -> Result<T> {
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let out = work();
        let (oom, validation) = (oom.pop().await, validation.pop().await);
        let uncaptured = std::mem::take(&mut *self.uncaptured.lock().unwrap());
        if let Some(e) = oom {
            return Err(Error::OutOfMemory(e.to_string()));
        }
        let out = out?;
        match validation.map(|e| e.to_string()).or_else(|| uncaptured.into_iter().next()) {
            Some(e) => Err(Error::Launch(e)),
            None => Ok(out),
        }
    }

    /// Test hook: the pool's next allocation fails as the device's out-of-memory would.
    pub fn fail_next_allocation(&self) {
        self.fail_next.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Why the device was lost (a driver reset, a browser reclaiming the GPU), once it
    /// is: nothing recorded on it runs any more, and a new `Gpu` is needed.
    pub fn lost(&self) -> Option<String> {
        self.lost.lock().unwrap().clone()
    }

    /// Test hook: lose the device now (`destroy`), as a driver reset would.
    pub fn lose_device(&self) {
        self.device.destroy();
    }

    /// While the `Sizing` lives, temporaries are sized for a batch of `largest` token
    /// rows (`Sizing::batch` says the current one's): batches vary in length, and
    /// sized for the longest, every batch's temporaries find the same pooled buffers,
    /// so the pool holds one batch at the largest shape (what the plan estimates)
    /// rather than buffers of every length met.
    pub fn sizing(&self, largest: usize) -> Sizing<'_> {
        Sizing { gpu: self, largest }
    }

    fn set_scale(&self, scale: f64) {
        self.state.lock().unwrap().scale = scale;
    }

    /// Let go of every pooled buffer and cached bind group now (a new model replaces
    /// the old one: bind groups would keep its buffers alive).
    pub fn trim(&self) {
        let mut st = self.state.lock().unwrap();
        reuse::sweep(&mut st, true);
        self.staging.lock().unwrap().clear();
    }

    /// A zero-filled temporary from the pool (cleared inside `rec`: a pooled buffer
    /// holds what its last holder left).
    pub fn temp(&self, rec: &mut Recorder, label: &str, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let t = self.pooled(label, dtype, shape)?;
        rec.encoder().clear_buffer(&t.buffer, t.offset, Some(t.padded_bytes()));
        Ok(t)
    }

    /// Zero-filled f32 temporaries of `shapes` as views into one pooled buffer, each at
    /// the adapter's storage offset alignment, so products over all of them bind it
    /// once (`Tensor::span`); one buffer each where together they exceed a binding.
    /// Each view's region is the bytes a pooled temporary of its shape would get (for
    /// the largest batch, `Gpu::sizing`), and a binding of it covers the region: a
    /// batch of another length finds the same offsets and sizes, so the same bind
    /// groups.
    pub fn temps(&self, rec: &mut Recorder, label: &str, shapes: &[Vec<usize>]) -> Result<Vec<Tensor>> {
        let align = (self.caps.limits.min_storage_buffer_offset_alignment as u64).max(16);
        let mut regions = Vec::with_capacity(shapes.len());
        let mut end = 0u64;
        {
            let st = self.state.lock().unwrap();
            for shape in shapes {
                let start = end.div_ceil(align) * align;
                let bytes = self.pool_class(&st, Tensor::padded(DType::F32, shape), true);
                regions.push((start, bytes));
                end = start + bytes;
            }
        }
        if shapes.len() < 2 || end > self.caps.max_binding {
            return shapes.iter().map(|shape| self.temp(rec, label, DType::F32, shape)).collect();
        }
        let whole = self.pooled_as(label, DType::F32, &[(end / 4) as usize], false)?;
        rec.encoder().clear_buffer(&whole.buffer, 0, Some(end));
        let view = |&(start, bytes): &(u64, u64), shape: &Vec<usize>| Tensor { reserved: bytes, ..whole.view(label, start, shape) };
        Ok(regions.iter().zip(shapes).map(|(r, shape)| view(r, shape)).collect())
    }

    /// A temporary from the pool holding `data`, copied in inside `rec` from the arena.
    pub fn upload_in<T: bytemuck::Pod>(&self, rec: &mut Recorder, label: &str, data: &[T], shape: &[usize]) -> Result<Tensor> {
        let t = self.pooled(label, DType::of::<T>(), shape)?;
        if t.numel() != data.len() {
            return Err(Error::Shape(format!("{label}: {} values for shape {}", data.len(), dims(shape))));
        }
        let mut bytes = bytemuck::cast_slice::<T, u8>(data).to_vec();
        bytes.resize(t.padded_bytes() as usize, 0);
        let (arena, offset) = self.arena_slot(rec, &bytes, wgpu::COPY_BUFFER_ALIGNMENT, false);
        rec.encoder().copy_buffer_to_buffer(&arena, offset, &t.buffer, 0, bytes.len() as u64);
        Ok(t)
    }

    /// A temporary from the pool holding `data` (a step's inputs), written by the
    /// queue (a pooled buffer is handed out only when no unsubmitted work may use it).
    pub fn upload_temp<T: bytemuck::Pod>(&self, label: &str, data: &[T], shape: &[usize]) -> Result<Tensor> {
        let t = self.pooled(label, DType::of::<T>(), shape)?;
        if t.numel() != data.len() {
            return Err(Error::Shape(format!("{label}: {} values for shape {}", data.len(), dims(shape))));
        }
        self.write_padded(&t.buffer, t.offset, bytemuck::cast_slice(data));
        Ok(t)
    }

    /// A temporary from the pool whose contents are whatever its last holder left (for
    /// kernels that write every element before anything reads it).
    pub(crate) fn pooled(&self, label: &str, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        self.pooled_as(label, dtype, shape, true)
    }

    /// The pooled buffer size a temporary of `bytes` gets: its size class, for the
    /// largest batch (`Gpu::sizing`) where `scaled`.
    fn pool_class(&self, st: &reuse::State, bytes: u64, scaled: bool) -> u64 {
        reuse::size_class(if scaled { st.sized_for(bytes, self.caps.chunk_bytes()) } else { bytes })
    }

    /// `pooled`, its buffer sized for the largest batch (`Gpu::sizing`) where `scaled`,
    /// else for exactly `shape` (`temps`' regions are sized for it already).
    fn pooled_as(&self, label: &str, dtype: DType, shape: &[usize], scaled: bool) -> Result<Tensor> {
        if self.fail_next.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::OutOfMemory(format!("{label}: allocation refused (injected by Gpu::fail_next_allocation)")));
        }
        if self.caps.no_reuse {
            return Tensor::new(self, label, dtype, shape);
        }
        let bytes = Tensor::padded(dtype, shape);
        let taken = {
            let mut st = self.state.lock().unwrap();
            let class = self.pool_class(&st, bytes, scaled);
            st.take(class).ok_or(class)
        };
        let (buffer, class, index) = match taken {
            Ok(t) => t,
            Err(class) => {
                let b = self.create_storage(label, class)?;
                (b.clone(), class, self.state.lock().unwrap().add(class, b))
            }
        };
        let bind = if class <= self.caps.max_binding { class } else { bytes };
        let lease = reuse::Lease { class, index, bind, state: self.state.clone() };
        Ok(Tensor { buffer, offset: 0, shape: shape.to_vec(), dtype, label: label.to_string(), lease: Some(Arc::new(lease)), whole: true, reserved: 0 })
    }

    /// A new storage buffer (counted), checked against the adapter's maximum.
    pub(crate) fn create_storage(&self, label: &str, bytes: u64) -> Result<wgpu::Buffer> {
        if bytes > self.caps.limits.max_buffer_size {
            return Err(Error::TooLarge(format!(
                "{label}: {bytes} bytes exceeds the adapter's max buffer size {}",
                self.caps.limits.max_buffer_size
            )));
        }
        self.count_buffer(bytes);
        Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        }))
    }

    fn count_buffer(&self, bytes: u64) {
        let mut st = self.state.lock().unwrap();
        st.counters.buffers += 1;
        st.counters.buffer_bytes += bytes;
    }

    /// Room for `bytes` at `align` in the parameter arena (`params`) or the upload
    /// arena, staged in `rec` for its submit.
    fn arena_slot(&self, rec: &mut Recorder, bytes: &[u8], align: u64, params: bool) -> (wgpu::Buffer, u64) {
        if self.caps.no_reuse {
            let size = (bytes.len() as u64).div_ceil(16) * 16;
            self.count_buffer(size);
            let b = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("parameters"),
                size,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            rec.stage(&b, 0, bytes);
            return (b, 0);
        }
        let mut guard = self.state.lock().unwrap();
        let st = &mut *guard;
        let arena = if params { &mut st.params } else { &mut st.uploads };
        let offset = arena.cursor.div_ceil(align) * align;
        let end = offset + bytes.len() as u64;
        let size = arena.buffer.as_ref().map_or(0, |a| a.size());
        let (buffer, offset) = if end <= size {
            arena.cursor = end;
            (arena.buffer.clone().expect("sized"), offset)
        } else {
            // A bigger arena; the old one lives on in the bind groups that use it.
            let size = (2 * size).max(1 << 20).max(bytes.len() as u64 * 2).div_ceil(256) * 256;
            let usage = if params { wgpu::BufferUsages::UNIFORM } else { wgpu::BufferUsages::COPY_SRC } | wgpu::BufferUsages::COPY_DST;
            let label = if params { "parameter arena" } else { "upload arena" };
            let a = self.device.create_buffer(&wgpu::BufferDescriptor { label: Some(label), size, usage, mapped_at_creation: false });
            arena.buffer = Some(a.clone());
            arena.cursor = bytes.len() as u64;
            st.counters.buffers += 1;
            st.counters.buffer_bytes += size;
            (a, 0)
        };
        let arena = buffer;
        drop(guard);
        rec.stage(&arena, offset, bytes);
        (arena, offset)
    }

    /// Time every dispatch from now on with timestamp queries (or stop). Returns
    /// whether timing is on: the adapter must offer `timestamp-query`.
    pub fn set_profiling(&self, on: bool) -> bool {
        let mut p = self.profiler.lock().unwrap();
        p.on = on && self.caps.timestamps;
        p.on
    }

    /// GPU time per kernel of everything submitted while profiling since the last
    /// call, slowest first (empty when nothing was timed).
    pub async fn kernel_times(&self) -> Result<Vec<KernelTime>> {
        let pending = std::mem::take(&mut self.profiler.lock().unwrap().pending);
        let mut passes = Vec::new();
        for (staging, names) in pending {
            let bytes = self.map_read(&staging).await?;
            let ticks: &[u64] = bytemuck::cast_slice(&bytes);
            passes.extend(names.into_iter().zip(ticks.chunks_exact(2)).map(|(n, t)| (n, t[0], t[1])));
        }
        Ok(profile::summarize(passes, self.queue.get_timestamp_period()))
    }

    /// Record one dispatch: `params` go to binding 0 (a slot of the arena), each
    /// `(binding, tensor)` of `binds` to its binding number; the bind group is cached.
    pub fn dispatch<P: bytemuck::Pod>(
        &self,
        rec: &mut Recorder,
        pipeline: &Pipeline,
        label: &str,
        params: &P,
        binds: &[(u32, Bind<'_>)],
        workgroups: [u32; 3],
    ) -> Result<()> {
        let max = self.caps.limits.max_compute_workgroups_per_dimension;
        if workgroups.iter().any(|&w| w > max) {
            return Err(Error::Launch(format!("{label}: dispatch {}×{}×{} exceeds {max} workgroups per dimension", workgroups[0], workgroups[1], workgroups[2])));
        }
        if workgroups.contains(&0) {
            return Ok(());
        }
        let start = crate::clock::now();
        let mut bytes = bytemuck::bytes_of(params).to_vec();
        bytes.resize(bytes.len().div_ceil(16) * 16, 0);
        let align = self.caps.limits.min_uniform_buffer_offset_alignment as u64;
        let (arena, offset) = self.arena_slot(rec, &bytes, align, true);
        let mut entries: Vec<reuse::BindEntry> = vec![(0, arena, offset, bytes.len() as u64)];
        for (binding, b) in binds {
            entries.push((*binding, b.buffer.clone(), b.offset, b.size.unwrap_or(b.buffer.size() - b.offset)));
        }
        let key = (pipeline as *const Pipeline as usize, entries);
        let mut st = self.state.lock().unwrap();
        let generation = st.generation;
        let group = match st.binds.get_mut(&key).filter(|_| !self.caps.no_reuse) {
            Some((g, used)) => {
                *used = generation;
                g.clone()
            }
            None => {
                let resources: Vec<wgpu::BindGroupEntry> = key
                    .1
                    .iter()
                    .map(|(binding, buffer, offset, size)| wgpu::BindGroupEntry {
                        binding: *binding,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding { buffer, offset: *offset, size: wgpu::BufferSize::new(*size) }),
                    })
                    .collect();
                let g = self.device.create_bind_group(&wgpu::BindGroupDescriptor { label: Some(label), layout: &pipeline.layout, entries: &resources });
                st.counters.bind_groups += 1;
                if !self.caps.no_reuse {
                    st.binds.insert(key, (g.clone(), generation));
                }
                g
            }
        };
        st.counters.dispatches += 1;
        *st.by_kernel.entry(pipeline.name.clone()).or_default() += 1;
        let own_pass = rec.profiled || self.caps.no_reuse;
        if own_pass || rec.pass.is_none() {
            st.counters.passes += 1;
        }
        drop(st);
        if own_pass {
            if rec.profiled && rec.timed.is_none() {
                let queries = self.device.create_query_set(&wgpu::QuerySetDescriptor {
                    label: Some("kernel timestamps"),
                    ty: wgpu::QueryType::Timestamp,
                    count: 2 * profile::PASSES_PER_RECORDER,
                });
                rec.timed = Some(profile::Timed { queries, names: Vec::new() });
            }
            rec.pass = None;
            let encoder = rec.encoder.as_mut().expect("open");
            let timestamp_writes = match &mut rec.timed {
                Some(t) if rec.profiled && (t.names.len() as u32) < profile::PASSES_PER_RECORDER => {
                    let i = 2 * t.names.len() as u32;
                    t.names.push(pipeline.name.clone());
                    Some(wgpu::ComputePassTimestampWrites {
                        query_set: &t.queries,
                        beginning_of_pass_write_index: Some(i),
                        end_of_pass_write_index: Some(i + 1),
                    })
                }
                _ => None,
            };
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some(label), timestamp_writes });
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, &group, &[]);
            pass.dispatch_workgroups(workgroups[0], workgroups[1], workgroups[2]);
        } else {
            if rec.pass.is_none() {
                let encoder = rec.encoder.as_mut().expect("open");
                rec.pass = Some(encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("kernels"), timestamp_writes: None }).forget_lifetime());
            }
            let pass = rec.pass.as_mut().expect("just begun");
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, &group, &[]);
            pass.dispatch_workgroups(workgroups[0], workgroups[1], workgroups[2]);
        }
        self.state.lock().unwrap().counters.record_s += crate::clock::now() - start;
        Ok(())
    }

    /// A new f16 storage tensor holding `data` rounded to f16 (frozen weights).
    pub fn upload_f16(&self, label: &str, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        let halves: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
        self.upload(label, &halves, shape)
    }

    /// A packed tensor of `shape` holding `blocks` (of `q`, row-major).
    pub fn upload_packed(&self, label: &str, q: crate::quant::QType, blocks: &[u8], shape: &[usize]) -> Result<Tensor> {
        let t = self.zeros(label, DType::Q(q), shape)?;
        self.write_bytes_at(&t, 0, blocks)?;
        Ok(t)
    }

    /// A new storage tensor holding `data`.
    pub fn upload<T: bytemuck::Pod>(&self, label: &str, data: &[T], shape: &[usize]) -> Result<Tensor> {
        let t = Tensor::new(self, label, DType::of::<T>(), shape)?;
        if t.numel() != data.len() {
            return Err(Error::Shape(format!("{label}: {} values for shape {}", data.len(), dims(shape))));
        }
        self.write_padded(&t.buffer, t.offset, bytemuck::cast_slice(data));
        Ok(t)
    }

    /// Queue writes must be a multiple of 4 bytes (odd-length f16 data is not); the
    /// buffer is padded to 16 bytes, so the padded tail fits.
    fn write_padded(&self, buffer: &wgpu::Buffer, offset: u64, bytes: &[u8]) {
        if bytes.len().is_multiple_of(4) {
            self.queue.write_buffer(buffer, offset, bytes);
        } else {
            let mut padded = bytes.to_vec();
            padded.resize(bytes.len().div_ceil(4) * 4, 0);
            self.queue.write_buffer(buffer, offset, &padded);
        }
    }

    /// Write `data` into `t` from element `offset` on (a chunk of a larger upload). The
    /// byte offset must be a multiple of 4; a tail that is not is padded.
    pub fn write_at<T: bytemuck::Pod>(&self, t: &Tensor, offset: usize, data: &[T]) -> Result<()> {
        let size = t.dtype.size();
        if t.dtype != DType::of::<T>() || offset + data.len() > t.numel() || !(offset * size).is_multiple_of(4) {
            return Err(Error::Shape(format!("{}: writing {} values at {offset} into {} {}", t.label, data.len(), t.dtype, dims(&t.shape))));
        }
        self.write_padded(&t.buffer, t.offset + (offset * size) as u64, bytemuck::cast_slice(data));
        Ok(())
    }

    /// Write packed bytes into `t` (a `DType::Q` tensor) from byte `offset` on, a
    /// multiple of 4 (a chunk of an even number of block rows).
    pub fn write_bytes_at(&self, t: &Tensor, offset: usize, bytes: &[u8]) -> Result<()> {
        if !matches!(t.dtype, DType::Q(_)) || !offset.is_multiple_of(4) || (offset + bytes.len()) as u64 > t.bytes() {
            return Err(Error::Shape(format!("{}: writing {} bytes at {offset} into {} {}", t.label, bytes.len(), t.dtype, dims(&t.shape))));
        }
        self.write_padded(&t.buffer, t.offset + offset as u64, bytes);
        Ok(())
    }

    /// Send the queued writes now and let finished staging memory go (a model load
    /// calls it after each weight, so staging holds one weight, not the model).
    pub fn flush_writes(&self) {
        self.queue.submit([]);
        #[cfg(not(target_arch = "wasm32"))]
        let _ = self.device.poll(wgpu::PollType::Poll);
    }

    /// A new zero-filled storage tensor.
    pub fn zeros(&self, label: &str, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        Tensor::new(self, label, dtype, shape)
    }

    /// Overwrite a tensor's contents from the host.
    pub fn write<T: bytemuck::Pod>(&self, t: &Tensor, data: &[T]) -> Result<()> {
        if t.numel() != data.len() || t.dtype != DType::of::<T>() {
            return Err(Error::Shape(format!("{}: writing {} values into {} {}", t.label, data.len(), t.dtype, dims(&t.shape))));
        }
        self.write_at(t, 0, data)
    }

    /// Copy a tensor back to the host. Async: awaits the buffer map.
    pub async fn read<T: bytemuck::Pod>(&self, t: &Tensor) -> Result<Vec<T>> {
        if t.dtype != DType::of::<T>() {
            return Err(Error::Shape(format!("{}: reading {} as {}", t.label, t.dtype, DType::of::<T>())));
        }
        let bytes = self.read_bytes(&t.buffer, t.offset, t.bytes()).await?;
        Ok(bytemuck::cast_slice(&bytes).to_vec())
    }

    /// Copy `size` bytes at `offset` of `buffer` back to the host.
    pub async fn read_bytes(&self, buffer: &wgpu::Buffer, offset: u64, size: u64) -> Result<Vec<u8>> {
        let staging = self.staging_buffer(size);
        let mut rec = self.recorder("readback");
        rec.encoder().copy_buffer_to_buffer(buffer, offset, &staging, 0, size);
        self.submit(rec);
        let mut out = self.map_read(&staging).await?;
        out.truncate(size as usize);
        Ok(out)
    }

    /// A MAP_READ buffer of at least `size` bytes, from those read before when one is free.
    fn staging_buffer(&self, size: u64) -> wgpu::Buffer {
        let class = reuse::size_class(size);
        if let Some(b) = self.staging.lock().unwrap().get_mut(&class).and_then(|l| l.pop()).filter(|_| !self.caps.no_reuse) {
            return b;
        }
        self.count_buffer(class);
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: class,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Map a submitted staging buffer and copy its contents out.
    async fn map_read(&self, staging: &wgpu::Buffer) -> Result<Vec<u8>> {
        let (tx, rx) = futures::channel::oneshot::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.await.map_err(|_| Error::Map("map callback dropped".into()))?.map_err(|e| Error::Map(e.to_string()))?;
        let data = staging.get_mapped_range(..).map_err(|e| Error::Map(e.to_string()))?.to_vec();
        staging.unmap();
        self.staging.lock().unwrap().entry(staging.size()).or_default().push(staging.clone());
        Ok(data)
    }

    /// Wait until the queue has done what was submitted. In the browser this lets the
    /// event loop run, which hands back the transfer memory of the uploads so far (a
    /// synchronous load holds all of it until it returns); natively uploads hold
    /// nothing afterwards, so it returns at once.
    pub async fn settle(&self) -> Result<()> {
        #[cfg(target_arch = "wasm32")]
        {
            let (tx, rx) = futures::channel::oneshot::channel();
            self.queue.on_submitted_work_done(move || {
                let _ = tx.send(());
            });
            rx.await.map_err(|_| Error::Map("the queue's done callback was dropped".into()))?;
        }
        Ok(())
    }

    /// Natively, block until submitted work is done (callbacks fire). In the browser
    /// this is a no-op: the event loop drives completion.
    pub fn wait(&self) -> Result<()> {
        #[cfg(not(target_arch = "wasm32"))]
        self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| Error::Map(e.to_string()))?;
        Ok(())
    }
}
