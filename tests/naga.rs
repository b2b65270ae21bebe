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

#[test]
fn f16_variants_validate() {
    for k in webtune::kernels::WITH_F16 {
        let v = webtune::kernels::f16_variant(k);
        let module = naga::front::wgsl::parse_str(v.source)
            .unwrap_or_else(|e| panic!("{}: {}", v.name, e.emit_to_string(v.source)));
        Validator::new(ValidationFlags::all(), Capabilities::SHADER_FLOAT16)
            .validate(&module)
            .unwrap_or_else(|e| panic!("{}: {}", v.name, e.emit_to_string(v.source)));
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
    let mut registered: Vec<String> = webtune::kernels::ALL.iter().map(|k| k.name.to_string()).collect();
    registered.sort();
    assert_eq!(files, registered);
    assert_eq!(files.len(), 10);
}
