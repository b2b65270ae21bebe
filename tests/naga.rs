//! Every WGSL file parses and validates with naga (no GPU needed), and every file in
//! kernels/ is registered in `webtune::kernels::ALL`.

use naga::valid::{Capabilities, ValidationFlags, Validator};

#[test]
fn every_kernel_validates() {
    for k in webtune::kernels::ALL {
        let module = naga::front::wgsl::parse_str(k.source)
            .unwrap_or_else(|e| panic!("{}: {}", k.name, e.emit_to_string(k.source)));
        Validator::new(ValidationFlags::all(), Capabilities::default())
            .validate(&module)
            .unwrap_or_else(|e| panic!("{}: {}", k.name, e.emit_to_string(k.source)));
        assert!(!module.entry_points.is_empty(), "{} has no entry point", k.name);
    }
}

fn validates(k: &webtune::kernels::Kernel, caps: Capabilities) {
    let module = naga::front::wgsl::parse_str(k.source).unwrap_or_else(|e| panic!("{}: {}", k.name, e.emit_to_string(k.source)));
    Validator::new(ValidationFlags::all(), caps).validate(&module).unwrap_or_else(|e| panic!("{}: {}", k.name, e.emit_to_string(k.source)));
}

/// The f16-weight variants read two halves a word and widen them with
/// `unpack2x16float`, so they need no 16-bit types in the shader.
#[test]
fn f16_variants_validate() {
    for k in webtune::kernels::WITH_F16 {
        let v = webtune::kernels::f16_variant(k);
        assert!(!v.source.contains("enable f16") && v.source.contains("unpack2x16float"), "{}", v.name);
        validates(v, Capabilities::SHADER_FLOAT16_IN_FLOAT32);
    }
}

/// The packed variants read f16 scales with `unpack2x16float` (core WGSL; naga asks
/// for it as a capability, which wgpu grants every WebGPU and Vulkan adapter).
#[test]
fn packed_variants_validate() {
    for k in webtune::kernels::WITH_F16 {
        validates(webtune::kernels::packed_variant(k), Capabilities::SHADER_FLOAT16_IN_FLOAT32);
    }
}

/// The subgroup variants of the row kernels: each swaps in kernels/subgroups.wgsl's
/// reductions (one named as in the kernel at least), and validates with subgroups.
#[test]
fn subgroup_variants_validate() {
    for k in webtune::kernels::WITH_SUBGROUPS {
        let v = webtune::kernels::subgroup_variant(k);
        assert!(v.source.contains("subgroupAdd(") && !k.source.contains("subgroupAdd("), "{}", v.name);
        // Every reduction the kernel has of those kernels/subgroups.wgsl replaces.
        let mut swapped = 0;
        for name in ["workgroup_sum", "sum_cols", "row_lse", "reduce"] {
            let head = format!("\nfn {name}(");
            if let Some(i) = v.source.find(&head) {
                let body = &v.source[i..][..v.source[i + 1..].find("\nfn ").map_or(v.source.len() - i, |j| j + 1)];
                assert!(body.contains("subgroupAdd("), "{}: {name} is not the subgroup version:\n{body}", v.name);
                swapped += 1;
            }
        }
        assert!(swapped > 0, "{}", v.name);
        validates(v, Capabilities::SUBGROUP);
    }
}

/// Matmul's cooperative-matrix variants, over f32, f16 and packed weights, at both
/// block sizes: `matmul_coop` is there and validates with cooperative matrices, f16
/// and subgroups (its loads and sums in uniform control flow, its workgroup flat, as
/// naga asks of `subgroup_id`). The GPU tests (tests/coop.rs) run them where a driver
/// has cooperative matrices.
#[test]
fn coop_variants_validate() {
    use webtune::kernels::{coop_variant, f16_variant, packed_variant, MATMUL};
    for base in [&MATMUL, f16_variant(&MATMUL), packed_variant(&MATMUL)] {
        for size in [8, 16] {
            let v = coop_variant(base, size);
            assert!(v.source.starts_with("enable f16;\nenable wgpu_cooperative_matrix;\n"), "{}", v.name);
            assert!(v.source.contains("fn matmul_coop(") && v.source.contains(&format!("coop_mat{size}x{size}<f16, A>")), "{}", v.name);
            validates(v, Capabilities::COOPERATIVE_MATRIX | Capabilities::SHADER_FLOAT16 | Capabilities::SHADER_FLOAT16_IN_FLOAT32 | Capabilities::SUBGROUP);
            // The workgroup memory it declares is what the adapter is asked to allow.
            let module = naga::front::wgsl::parse_str(v.source).unwrap();
            let bytes: u32 = module
                .global_variables
                .iter()
                .filter(|(_, g)| g.space == naga::AddressSpace::WorkGroup && g.name.as_deref().is_some_and(|n| n.starts_with("coop_")))
                .map(|(_, g)| module.types[g.ty].inner.size(module.to_ctx()))
                .sum();
            assert_eq!(bytes, webtune::gpu::COOP_WORKGROUP_BYTES, "{}", v.name);
        }
    }
}

#[test]
fn every_file_is_registered() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".wgsl"))
        .collect();
    files.sort();
    // quant.wgsl, subgroups.wgsl, coop.wgsl and hash.wgsl are not modules of their
    // own: the packed variants append the first, the subgroup variants take functions
    // from the second, matmul's cooperative-matrix variants append the third, and the
    // fourth is put in front of matmul.wgsl and rmsnorm.wgsl.
    let mut registered: Vec<String> = webtune::kernels::ALL
        .iter()
        .chain([&webtune::kernels::QUANT, &webtune::kernels::SUBGROUPS, &webtune::kernels::COOP, &webtune::kernels::HASH])
        .map(|k| k.name.to_string())
        .collect();
    registered.sort();
    assert_eq!(files, registered);
    assert_eq!(files.len(), 15);
}
