// Measures the driver's cap on loop iterations per invocation. Mesa's llvmpipe
// (lavapipe) ends every loop of an invocation after 65,535 iterations in total, with
// no error: a kernel that loops over a 128k vocabulary silently sees half of it.
// `Gpu::new` runs this once; launchers split their work so that no invocation loops
// more than `Caps::max_loop` times (docs/ARCHITECTURE.md, "Loop budget").
//   count  [1] u32: the iterations that ran of the `n` asked for

struct Params { n: u32, _p0: u32, _p1: u32, _p2: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> count: array<u32>;

// One invocation. Grid: (1, 1, 1).
@compute @workgroup_size(1, 1, 1)
fn loop_probe() {
    var c = 0u;
    for (var i = 0u; i < p.n; i++) { c += 1u; }
    count[0] = c;
}
