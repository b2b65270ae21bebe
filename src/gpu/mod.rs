//! The GPU context: adapter, device, queue and limits behind one async path that
//! serves native and wasm; the pipeline cache; uploads and readback.
//!
//! Every launcher in `crate::kernels` records into a [`Recorder`] (one command
//! encoder); [`Gpu::submit`] sends it. Reading back is async (`map_async` + await):
//! natively the device is polled once with a blocking wait, in the browser the
//! event loop resolves the map, so no code ever spins.

pub mod profile;
mod tensor;

pub use profile::KernelTime;
pub use tensor::{DType, Tensor};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use wgpu::util::DeviceExt;

use crate::error::{Error, Result};
use crate::kernels::Kernel;

/// Which matmul (and other tile-shaped) kernel variants suit this adapter.
///
/// CPU drivers (lavapipe, SwiftShader) pay dearly for workgroup barriers, so they get
/// barrier-free register-blocked kernels; real GPUs get workgroup-memory tiling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Register,
    Tiled,
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
}

/// Options for [`Gpu::new_with`].
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Cap the storage binding size below the device limit (tests of the chunked paths).
    pub max_binding: Option<u64>,
    /// Force a kernel variant instead of choosing by `device_type`.
    pub variant: Option<Variant>,
    /// Do not use `shader-f16` even where offered (frozen weights then stay f32).
    pub no_f16: bool,
    /// Cap the loop budget below the driver's (tests of the split paths on any driver).
    pub max_loop: Option<u32>,
}

type PipelineKey = (&'static str, &'static str, Vec<(&'static str, u64)>);

/// A compiled entry point of a kernel, named `file::entry` (the name GPU timings use).
pub struct Pipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub name: Arc<str>,
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
}

/// One storage binding of a dispatch: a whole tensor or a byte range of its buffer.
pub struct Bind<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub offset: u64,
    pub size: Option<u64>,
}

impl<'a> From<&'a Tensor> for Bind<'a> {
    fn from(t: &'a Tensor) -> Self {
        Bind { buffer: &t.buffer, offset: 0, size: None }
    }
}

/// A command encoder that launchers record dispatches into (and, while profiling,
/// the timestamp queries of its passes).
pub struct Recorder {
    pub encoder: wgpu::CommandEncoder,
    profiled: bool,
    timed: Option<profile::Timed>,
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
        let features = offered & wanted;
        // The adapter's own maxima (buffer and binding sizes above all), not the defaults.
        let limits = adapter.limits();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("webtune device"),
                required_features: features,
                required_limits: limits.clone(),
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| Error::RequestDevice(e.to_string()))?;
        let device_max = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
        let max_binding = opts.max_binding.map_or(device_max, |m| m.min(device_max));
        let variant = opts.variant.unwrap_or(match info.device_type {
            wgpu::DeviceType::Cpu => Variant::Register,
            _ => Variant::Tiled,
        });
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
        };
        let mut gpu = Gpu { device, queue, caps, modules: Mutex::default(), pipelines: Mutex::default(), profiler: Mutex::default() };
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
        let pipeline = self.pipeline(&crate::kernels::PROBE, "loop_probe", &[]);
        let mut rec = self.recorder("loop probe");
        self.dispatch(&mut rec, &pipeline, "loop_probe", &[PROBE_LOOPS, 0, 0, 0], &[(1, Bind::from(&count))], [1, 1, 1])?;
        self.submit(rec);
        let ran = self.read::<u32>(&count).await?[0];
        Ok((ran < PROBE_LOOPS).then_some(ran))
    }

    /// One line naming the adapter, its driver and what was granted.
    pub fn describe(&self) -> String {
        let a = &self.caps.adapter;
        format!(
            "{} ({:?}, {:?}, driver {} {}); max binding {} MiB, max buffer {} MiB; shader-f16 {}, subgroups {}, timestamps {}; kernels {:?}; loop budget {}",
            a.name,
            a.device_type,
            a.backend,
            a.driver,
            a.driver_info,
            self.caps.max_binding >> 20,
            self.caps.limits.max_buffer_size >> 20,
            self.caps.shader_f16,
            self.caps.subgroups,
            self.caps.timestamps,
            self.caps.variant,
            if self.caps.max_loop == u32::MAX { "unlimited".to_string() } else { format!("{} iterations per invocation", self.caps.max_loop) }
        )
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
        let label = format!("{}::{}", kernel.name.replace(".wgsl", ""), entry);
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions { constants, zero_initialize_workgroup_memory: true },
            cache: None,
        });
        let pipeline = Arc::new(Pipeline { pipeline, name: label.into() });
        self.pipelines.lock().unwrap().insert(key, pipeline.clone());
        pipeline
    }

    pub fn recorder(&self, label: &str) -> Recorder {
        Recorder {
            encoder: self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) }),
            profiled: self.profiler.lock().unwrap().on,
            timed: None,
        }
    }

    /// Submit a recorder. While profiling, its timestamps are resolved into a buffer
    /// that [`Gpu::kernel_times`] reads.
    pub fn submit(&self, rec: Recorder) {
        let Recorder { mut encoder, timed, .. } = rec;
        let Some(timed) = timed else {
            self.queue.submit([encoder.finish()]);
            return;
        };
        let n = 2 * timed.names.len() as u32;
        let size = n as u64 * 8;
        let resolve = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamps"),
            size,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let staging = self.staging("timestamps readback", size);
        encoder.resolve_query_set(&timed.queries, 0..n, &resolve, 0);
        encoder.copy_buffer_to_buffer(&resolve, 0, &staging, 0, size);
        self.queue.submit([encoder.finish()]);
        self.profiler.lock().unwrap().pending.push((staging, timed.names));
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

    /// Record one dispatch: `params` go to binding 0 as a uniform buffer, each
    /// `(binding, tensor)` of `binds` to its binding number.
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
            return Err(Error::Launch(format!("{label}: dispatch {workgroups:?} exceeds {max} workgroups per dimension")));
        }
        if workgroups.contains(&0) {
            return Ok(());
        }
        let mut bytes = bytemuck::bytes_of(params).to_vec();
        bytes.resize(bytes.len().div_ceil(16) * 16, 0);
        let uniform = self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: &bytes,
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let mut entries = vec![wgpu::BindGroupEntry { binding: 0, resource: uniform.as_entire_binding() }];
        for (binding, b) in binds {
            entries.push(wgpu::BindGroupEntry {
                binding: *binding,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: b.buffer,
                    offset: b.offset,
                    size: b.size.and_then(wgpu::BufferSize::new),
                }),
            });
        }
        let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(label),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        if rec.profiled && rec.timed.is_none() {
            let queries = self.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("kernel timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2 * profile::PASSES_PER_RECORDER,
            });
            rec.timed = Some(profile::Timed { queries, names: Vec::new() });
        }
        let timestamp_writes = match &mut rec.timed {
            Some(t) if (t.names.len() as u32) < profile::PASSES_PER_RECORDER => {
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
        let mut pass = rec.encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some(label), timestamp_writes });
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &group, &[]);
        pass.dispatch_workgroups(workgroups[0], workgroups[1], workgroups[2]);
        Ok(())
    }

    /// A new f16 storage tensor holding `data` rounded to f16 (frozen weights).
    pub fn upload_f16(&self, label: &str, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        let halves: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
        self.upload(label, &halves, shape)
    }

    /// A new storage tensor holding `data`.
    pub fn upload<T: bytemuck::Pod>(&self, label: &str, data: &[T], shape: &[usize]) -> Result<Tensor> {
        let t = Tensor::new(self, label, DType::of::<T>(), shape)?;
        if t.numel() != data.len() {
            return Err(Error::Shape(format!("{label}: {} values for shape {shape:?}", data.len())));
        }
        self.write_padded(&t.buffer, 0, bytemuck::cast_slice(data));
        Ok(t)
    }

    /// Queue writes must be a multiple of 4 bytes (odd-length f16 data is not); the
    /// buffer is padded to 16 bytes, so the padded tail fits.
    fn write_padded(&self, buffer: &wgpu::Buffer, offset: u64, bytes: &[u8]) {
        if bytes.len() % 4 == 0 {
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
        if t.dtype != DType::of::<T>() || offset + data.len() > t.numel() || (offset * size) % 4 != 0 {
            return Err(Error::Shape(format!("{}: writing {} values at {offset} into {:?} {:?}", t.label, data.len(), t.dtype, t.shape)));
        }
        self.write_padded(&t.buffer, (offset * size) as u64, bytemuck::cast_slice(data));
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
            return Err(Error::Shape(format!("{}: writing {} values into {:?} {:?}", t.label, data.len(), t.dtype, t.shape)));
        }
        self.write_at(t, 0, data)
    }

    /// Copy a tensor back to the host. Async: awaits the buffer map.
    pub async fn read<T: bytemuck::Pod>(&self, t: &Tensor) -> Result<Vec<T>> {
        if t.dtype != DType::of::<T>() {
            return Err(Error::Shape(format!("{}: reading {:?} as {:?}", t.label, t.dtype, DType::of::<T>())));
        }
        let bytes = self.read_bytes(&t.buffer, 0, t.bytes()).await?;
        Ok(bytemuck::cast_slice(&bytes).to_vec())
    }

    /// Copy `size` bytes at `offset` of `buffer` back to the host.
    pub async fn read_bytes(&self, buffer: &wgpu::Buffer, offset: u64, size: u64) -> Result<Vec<u8>> {
        let staging = self.staging("readback", size);
        let mut rec = self.recorder("readback");
        rec.encoder.copy_buffer_to_buffer(buffer, offset, &staging, 0, size);
        self.submit(rec);
        self.map_read(&staging).await
    }

    fn staging(&self, label: &str, size: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
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
        let data = staging.get_mapped_range(..).map_err(|e| Error::Map(format!("{e:?}")))?.to_vec();
        staging.unmap();
        Ok(data)
    }

    /// Natively, block until submitted work is done (callbacks fire). In the browser
    /// this is a no-op: the event loop drives completion.
    pub fn wait(&self) -> Result<()> {
        #[cfg(not(target_arch = "wasm32"))]
        self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| Error::Map(e.to_string()))?;
        Ok(())
    }
}
