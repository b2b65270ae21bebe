//! The loader's host memory at a real size: a Qwen3-0.6B-shaped random bf16 checkpoint
//! (1.2 GB, written here from Rust) loads with its own peak host allocations below the
//! largest tensor's f32 size plus 64 MiB, counted by the crate's counting allocator.
//! GPU buffers are not counted (on lavapipe they live in host memory too).

mod common;

use std::path::PathBuf;

use common::*;
use webtune::model::weights::{self, Checkpoint, Tensors};
use webtune::model::{Config, Model, Tuning};

#[global_allocator]
static ALLOC: webtune::alloc::Counting = webtune::alloc::Counting;

#[test]
fn a_qwen3_0_6b_shaped_bf16_checkpoint_loads_without_a_host_f32_copy() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("configs/Qwen3-0.6B.json")).unwrap();
    let cfg = Config::parse(&text, "configs/Qwen3-0.6B.json", None).unwrap();
    let dir = std::env::temp_dir().join(format!("webtune-qwen3-0.6b-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("model.safetensors");
    let shapes = cfg.tensor_shapes();
    weights::write_random_bf16(&file, &shapes, 0.02, 1).unwrap();
    let params: usize = shapes.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    let file_bytes = std::fs::metadata(&file).unwrap().len();
    assert!((590_000_000..610_000_000).contains(&params), "{params} parameters");
    let largest = shapes.iter().map(|(_, s)| 4 * s.iter().product::<usize>()).max().unwrap();
    assert_eq!(largest, 151_936 * 1024 * 4);

    let g = gpu();
    let mark = webtune::alloc::mark();
    let ckpt = Checkpoint::open_dir(&dir).unwrap();
    let model = Model::load(g, cfg.clone(), &ckpt, Tuning::Frozen, 0).unwrap();
    g.wait().unwrap();
    let peak = webtune::alloc::peak_since(&mark).expect("the counting allocator is installed");
    let bound = largest + (64 << 20);
    eprintln!(
        "{params} parameters, {:.0} MiB file: peak host allocations of the load {:.1} MiB (bound {:.0} MiB), {:.0} MiB on the GPU",
        file_bytes as f64 / 1048576.0,
        peak as f64 / 1048576.0,
        bound as f64 / 1048576.0,
        model.resident_bytes() as f64 / 1048576.0
    );
    assert!(peak < bound, "peak {peak} bytes, bound {bound}");
    // The counter sees what a whole-tensor read costs: the embedding widened at once.
    let mark = webtune::alloc::mark();
    let embed = ckpt.rows("model.embed_tokens.weight", 0, cfg.vocab).unwrap();
    assert!(webtune::alloc::peak_since(&mark).unwrap() >= largest, "the counting allocator missed a {largest}-byte read");
    drop(embed);

    // The weights arrived: rows on both sides of a part boundary of the embedding and
    // the last layer's down_proj, read back against the file.
    let by_name = model.weights_by_name();
    for (name, rows) in [("model.embed_tokens.weight", [0, 65535, 65536, 151935]), ("model.layers.27.mlp.down_proj.weight", [0, 1, 511, 1023])] {
        let parts = &by_name.iter().find(|(n, _)| n == name).unwrap().1;
        let cols = ckpt.shape(name).unwrap()[1];
        for r in rows {
            let (mut r0, mut part) = (0, parts[0]);
            for p in parts.iter() {
                if r < r0 + p.shape[0] {
                    part = p;
                    break;
                }
                r0 += p.shape[0];
            }
            let want = ckpt.rows(name, r, r + 1).unwrap();
            let got: Vec<f32> = if part.value.dtype == webtune::gpu::DType::F16 {
                let bytes = futures::executor::block_on(g.read_bytes(&part.value.buffer, ((r - r0) * cols * 2) as u64, (cols * 2) as u64)).unwrap();
                bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
            } else {
                let bytes = futures::executor::block_on(g.read_bytes(&part.value.buffer, ((r - r0) * cols * 4) as u64, (cols * 4) as u64)).unwrap();
                bytemuck::cast_slice(&bytes).to_vec()
            };
            let want: Vec<f32> = want.iter().map(|&x| if part.value.dtype == webtune::gpu::DType::F16 { half::f16::from_f32(x).to_f32() } else { x }).collect();
            close(&format!("{name} row {r}"), &got, &want, 0.0, 0.0);
        }
    }
    drop(model);
    std::fs::remove_dir_all(&dir).unwrap();
}
