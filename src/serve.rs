//! `webtune serve`: the page and its files on 127.0.0.1 only. It serves `index.html`
//! and what is under `web/` (the scripts, styles and the built wasm package), nothing
//! else: no directory listings, no paths outside those.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") | Some("mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("wasm") => "application/wasm",
        Some("json") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        _ => "application/octet-stream",
    }
}

/// The file a request path maps to, if it is one the app serves.
pub fn resolve(root: &Path, url_path: &str) -> Option<PathBuf> {
    let path = url_path.split(['?', '#']).next().unwrap_or("");
    if path == "/" || path == "/index.html" {
        return Some(root.join("index.html"));
    }
    let rel = path.strip_prefix("/web/")?;
    let rel = Path::new(rel);
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return None;
    }
    let full = root.join("web").join(rel);
    full.is_file().then_some(full)
}

fn respond(mut stream: TcpStream, root: &Path) {
    let mut line = String::new();
    if BufReader::new(&stream).read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let found = if method == "GET" || method == "HEAD" { resolve(root, path) } else { None };
    let (status, body, ctype) = match found.as_ref().map(|p| (p, std::fs::read(p))) {
        Some((p, Ok(bytes))) => ("200 OK", bytes, content_type(p)),
        _ => ("404 Not Found", b"not found\n".to_vec(), "text/plain"),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    if method != "HEAD" {
        let _ = stream.write_all(&body);
    }
}

/// Serve until the process ends; `root` holds index.html and web/.
pub fn serve(root: &Path, port: u16) -> Result<()> {
    if !root.join("index.html").is_file() {
        return Err(Error::Io(format!("{}: no index.html to serve", root.display())));
    }
    if !root.join("web/pkg/webtune_bg.wasm").is_file() {
        eprintln!("warning: web/pkg is not built; run scripts/build-web.sh");
    }
    let listener = TcpListener::bind(("127.0.0.1", port)).map_err(|e| Error::Io(format!("127.0.0.1:{port}: {e}")))?;
    println!("serving http://127.0.0.1:{}/", listener.local_addr().map(|a| a.port()).unwrap_or(port));
    for stream in listener.incoming().flatten() {
        let root = root.to_path_buf();
        std::thread::spawn(move || respond(stream, &root));
    }
    Ok(())
}
