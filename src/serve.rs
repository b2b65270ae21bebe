//! `webtune serve`: the page and its files on 127.0.0.1 only. It serves `index.html`
//! and what is under `web/` (the scripts, styles and the built wasm package), nothing
//! else: no directory listings, no paths outside those. They come from the binary
//! itself (built in by `build.rs` where `web/pkg` was built), or from `--root`.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::borrow::Cow;
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

mod built_in {
    include!(concat!(env!("OUT_DIR"), "/page.rs"));
}

/// Where the page's files come from.
#[derive(Clone, Debug)]
pub enum Root {
    /// Built into this binary (`build.rs`).
    BuiltIn,
    /// A directory holding `index.html` and `web/`.
    Dir(PathBuf),
}

impl Root {
    /// `--root` when given; else the page built into this binary, or, in a binary
    /// built before `web/pkg` was, the source tree it was built from.
    pub fn choose(dir: Option<PathBuf>) -> Root {
        match dir {
            Some(d) => Root::Dir(d),
            None if !built_in::PAGE.is_empty() => Root::BuiltIn,
            None => Root::Dir(PathBuf::from(env!("CARGO_MANIFEST_DIR"))),
        }
    }

    /// The page's path (`index.html`, `web/…`) a request path maps to, if it is one
    /// the app serves.
    pub fn resolve(url_path: &str) -> Option<String> {
        let path = url_path.split(['?', '#']).next().unwrap_or("");
        if path == "/" || path == "/index.html" {
            return Some("index.html".into());
        }
        let rel = path.strip_prefix("/web/")?;
        if Path::new(rel).components().any(|c| !matches!(c, Component::Normal(_))) {
            return None;
        }
        Some(format!("web/{rel}"))
    }

    /// The bytes of a page path, if it exists (a directory does not read).
    pub fn read(&self, rel: &str) -> Option<Cow<'static, [u8]>> {
        match self {
            Root::BuiltIn => built_in::PAGE.iter().find(|(p, _)| *p == rel).map(|(_, b)| Cow::Borrowed(*b)),
            Root::Dir(d) => std::fs::read(d.join(rel)).ok().map(Cow::Owned),
        }
    }

    fn has(&self, rel: &str) -> bool {
        match self {
            Root::BuiltIn => built_in::PAGE.iter().any(|(p, _)| *p == rel),
            Root::Dir(d) => d.join(rel).is_file(),
        }
    }
}

impl std::fmt::Display for Root {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Root::BuiltIn => write!(f, "the page built into this binary"),
            Root::Dir(d) => write!(f, "{}", d.display()),
        }
    }
}

fn respond(mut stream: TcpStream, root: &Root) {
    let mut line = String::new();
    if BufReader::new(&stream).read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let found = if method == "GET" || method == "HEAD" { Root::resolve(path) } else { None };
    let (status, body, ctype) = match found.and_then(|p| root.read(&p).map(|b| (p, b))) {
        Some((p, bytes)) => ("200 OK", bytes, content_type(Path::new(&p))),
        None => ("404 Not Found", Cow::Borrowed(&b"not found\n"[..]), "text/plain"),
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

/// Serve until the process ends: index.html and web/ from `root`.
pub fn serve(root: &Root, port: u16) -> Result<()> {
    if !root.has("index.html") {
        return Err(Error::Io(format!("{root}: no index.html to serve")));
    }
    if !root.has("web/pkg/webtune_bg.wasm") {
        eprintln!("warning: {root} has no web/pkg (the page's wasm); run scripts/build-web.sh, then rebuild webtune to build it in");
    }
    let listener = TcpListener::bind(("127.0.0.1", port)).map_err(|e| Error::Io(format!("127.0.0.1:{port}: {e}")))?;
    println!("serving http://127.0.0.1:{}/", listener.local_addr().map(|a| a.port()).unwrap_or(port));
    for stream in listener.incoming().flatten() {
        let root = root.clone();
        std::thread::spawn(move || respond(stream, &root));
    }
    Ok(())
}
