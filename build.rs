//! The page inside the binary: where `web/pkg` is built (`scripts/build-web.sh`),
//! `webtune serve` carries `index.html` and every file under `web/`, so a copied or
//! `cargo install`ed binary serves a working page. Writes `$OUT_DIR/page.rs`, a list of
//! (path, bytes) that `src/serve.rs` includes; empty for wasm, where there is no
//! `serve`, and when `WEBTUNE_EMBED_PAGE=0` (a development shortcut: editing the page
//! then rebuilds nothing, and `serve --root` reads it from disk).

use std::path::{Path, PathBuf};

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files(&p, out);
        } else if p.is_file() {
            out.push(p);
        }
    }
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("page.rs");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=WEBTUNE_EMBED_PAGE");
    let wasm = std::env::var("CARGO_CFG_TARGET_ARCH").is_ok_and(|a| a == "wasm32");
    let off = std::env::var("WEBTUNE_EMBED_PAGE").is_ok_and(|v| v == "0");
    let mut list = Vec::new();
    if !wasm && !off {
        println!("cargo:rerun-if-changed=index.html");
        println!("cargo:rerun-if-changed=web");
        if root.join("web/pkg/webtune_bg.wasm").is_file() {
            list.push(root.join("index.html"));
            files(&root.join("web"), &mut list);
        }
    }
    let mut src = String::from("/// The page's files (path from the root, bytes), built in by `build.rs`.\npub const PAGE: &[(&str, &[u8])] = &[\n");
    for p in &list {
        let rel = p.strip_prefix(&root).expect("under the root").to_string_lossy().replace('\\', "/");
        src.push_str(&format!("    ({rel:?}, include_bytes!({:?})),\n", p.display().to_string()));
    }
    src.push_str("];\n");
    std::fs::write(&out, src).expect("write page.rs");
}
