//! Models from the Hugging Face Hub (`webtune::hub`) against a loopback Hub: a small
//! HTTP server on 127.0.0.1 that answers the Hub's URL layout as the Hub does —
//! `/api/models/{repo}/revision/{rev}` listing the files, `/{repo}/resolve/{rev}/{file}`
//! with `ETag` / `X-Repo-Commit` for small files and a redirect to a CDN with
//! `X-Linked-Etag` / `X-Linked-Size` for weights, `X-Error-Code` on refusals — serving the
//! demo model, single and sharded. Each test has its own server and cache directory.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use webtune::hub::{Hub, RepoRef};
use webtune::model::{weights, TensorMap, Tensors};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const TOKEN: &str = "hf_test_token";

#[derive(Default)]
struct State {
    /// repo → (gated, files)
    repos: BTreeMap<String, (bool, BTreeMap<String, Vec<u8>>)>,
    /// Every request: "METHOD path" plus " range=…" and " auth" where sent.
    log: Vec<String>,
    /// Cut the next CDN download of this etag after this many bytes.
    cut: Option<(String, usize)>,
    /// Serve the next CDN download of this etag with its last byte changed.
    corrupt: Option<String>,
}

struct LoopbackHub {
    endpoint: String,
    state: Arc<Mutex<State>>,
}

/// The Hub's etag of a file: an LFS file's SHA-256 (which the client checks), and for
/// a small file a content hash standing in for its git blob sha1.
fn etag(file: &str, data: &[u8]) -> String {
    if is_lfs(file) {
        return ring::digest::digest(&ring::digest::SHA256, data).as_ref().iter().map(|b| format!("{b:02x}")).collect();
    }
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in data {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}{:016x}", data.len())
}

fn is_lfs(file: &str) -> bool {
    file.ends_with(".safetensors") || file.ends_with(".gguf")
}

impl LoopbackHub {
    fn start() -> LoopbackHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let state = Arc::new(Mutex::new(State::default()));
        let (s, e) = (state.clone(), endpoint.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (s, e) = (s.clone(), e.clone());
                std::thread::spawn(move || serve(stream, &s, &e));
            }
        });
        LoopbackHub { endpoint, state }
    }

    fn add(&self, repo: &str, gated: bool, files: Vec<(String, Vec<u8>)>) {
        self.state.lock().unwrap().repos.insert(repo.into(), (gated, files.into_iter().collect()));
    }

    fn log(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }

    fn hub(&self, cache: &Path) -> Hub {
        Hub { endpoint: self.endpoint.clone(), token: None, cache: cache.to_path_buf(), offline: false, progress: false }
    }
}

fn respond(stream: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8], head: bool) {
    let mut out = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        out += &format!("{k}: {v}\r\n");
    }
    if !headers.iter().any(|(k, _)| *k == "Content-Length") {
        out += &format!("Content-Length: {}\r\n", body.len());
    }
    out += "\r\n";
    let _ = stream.write_all(out.as_bytes());
    if !head {
        let _ = stream.write_all(body);
    }
}

fn serve(mut stream: TcpStream, state: &Mutex<State>, endpoint: &str) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_lowercase(), v.trim().to_string());
        }
    }
    let head = method == "HEAD";
    let auth = headers.get("authorization").cloned();
    let range = headers.get("range").and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.trim_end_matches('-').parse::<usize>().ok());
    let mut st = state.lock().unwrap();
    st.log.push(format!("{method} {path}{}{}", range.map(|r| format!(" range={r}")).unwrap_or_default(), if auth.is_some() { " auth" } else { "" }));
    let not_found = |code: &str| vec![("X-Error-Code", code.to_string()), ("X-Error-Message", format!("{code} (loopback Hub)"))];

    if let Some(rest) = path.strip_prefix("/api/models/") {
        // {org}/{name}/revision/{rev}
        let segs: Vec<&str> = rest.splitn(4, '/').collect();
        let repo = format!("{}/{}", segs[0], segs.get(1).unwrap_or(&""));
        let Some((_, files)) = st.repos.get(&repo) else { return respond(&mut stream, "404 Not Found", &not_found("RepoNotFound"), b"", head) };
        let rev = segs.get(3).copied().unwrap_or("main");
        if rev != "main" && rev != COMMIT {
            return respond(&mut stream, "404 Not Found", &not_found("RevisionNotFound"), b"", head);
        }
        let siblings: Vec<serde_json::Value> = files.keys().map(|f| serde_json::json!({"rfilename": f})).collect();
        let body = serde_json::json!({"id": repo, "sha": COMMIT, "siblings": siblings}).to_string();
        return respond(&mut stream, "200 OK", &[("Content-Type", "application/json".into())], body.as_bytes(), head);
    }
    if let Some(tag) = path.strip_prefix("/cdn/") {
        // The CDN: no token wanted, ranges honoured.
        let Some(mut data) = st.repos.values().flat_map(|(_, f)| f.iter()).find(|(f, d)| etag(f, d) == tag).map(|(_, d)| d.clone()) else {
            return respond(&mut stream, "404 Not Found", &[], b"", head);
        };
        if st.corrupt.as_deref() == Some(tag) {
            st.corrupt = None;
            *data.last_mut().unwrap() ^= 1;
        }
        let from = range.unwrap_or(0).min(data.len());
        let (status, extra) = if range.is_some() { ("206 Partial Content", vec![("Content-Range", format!("bytes {from}-{}/{}", data.len() - 1, data.len()))]) } else { ("200 OK", vec![]) };
        let body = &data[from..];
        if let Some((_, n)) = st.cut.clone().filter(|(t, _)| t == tag) {
            // Announce the whole body, send part of it, and hang up.
            st.cut = None;
            drop(st);
            let mut h = extra.clone();
            h.push(("Content-Length", body.len().to_string()));
            let mut out = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
            for (k, v) in &h {
                out += &format!("{k}: {v}\r\n");
            }
            out += "\r\n";
            let _ = stream.write_all(out.as_bytes());
            let _ = stream.write_all(&body[..n.min(body.len())]);
            let _ = stream.flush();
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return;
        }
        return respond(&mut stream, status, &extra, body, head);
    }
    // /{org}/{name}/resolve/{rev}/{file...}
    let segs: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    if segs.len() < 5 || segs[2] != "resolve" {
        return respond(&mut stream, "404 Not Found", &[], b"", head);
    }
    let repo = format!("{}/{}", segs[0], segs[1]);
    let (rev, file) = (segs[3], segs[4]);
    let Some((gated, files)) = st.repos.get(&repo) else { return respond(&mut stream, "404 Not Found", &not_found("RepoNotFound"), b"", head) };
    if *gated && auth.as_deref() != Some(&format!("Bearer {TOKEN}")) {
        let status = if auth.is_some() { "403 Forbidden" } else { "401 Unauthorized" };
        return respond(&mut stream, status, &[("X-Error-Code", "GatedRepo".into()), ("X-Error-Message", format!("Access to model {repo} is restricted."))], b"", head);
    }
    if rev != "main" && rev != COMMIT {
        return respond(&mut stream, "404 Not Found", &not_found("RevisionNotFound"), b"", head);
    }
    let Some(data) = files.get(file) else {
        let mut h = not_found("EntryNotFound");
        h.push(("X-Repo-Commit", COMMIT.into()));
        return respond(&mut stream, "404 Not Found", &h, b"", head);
    };
    let tag = etag(file, data);
    if is_lfs(file) {
        let h = [
            // The CDN is another host, as the Hub's is (localhost: the same server).
            ("Location", format!("{}/cdn/{tag}", endpoint.replace("127.0.0.1", "localhost"))),
            ("X-Repo-Commit", COMMIT.into()),
            ("X-Linked-Etag", format!("\"{tag}\"")),
            ("X-Linked-Size", data.len().to_string()),
            ("ETag", "\"pointer\"".into()),
        ];
        return respond(&mut stream, "302 Found", &h, b"redirecting", head);
    }
    let h = [("X-Repo-Commit", COMMIT.into()), ("ETag", format!("\"{tag}\""))];
    let body = data.clone();
    respond(&mut stream, "200 OK", &h, &body, head)
}

/// The demo model as a Hub repository: its small files and its weights, in one
/// safetensors file or in two shards with an index.
fn demo_repo(sharded: bool) -> (Vec<(String, Vec<u8>)>, TensorMap) {
    let mut files = webtune::demo::files();
    let w = webtune::demo::weights(1).unwrap();
    if sharded {
        let names: Vec<&String> = w.keys().collect();
        let (a, b) = names.split_at(names.len() / 2);
        let mut index = serde_json::Map::new();
        for (shard, part) in [("model-00001-of-00002.safetensors", a), ("model-00002-of-00002.safetensors", b)] {
            let t: TensorMap = part.iter().map(|n| ((*n).clone(), w[*n].clone())).collect();
            for n in part {
                index.insert((*n).clone(), shard.into());
            }
            files.push((shard.into(), weights::serialize(&t, None).unwrap()));
        }
        files.push(("model.safetensors.index.json".into(), serde_json::json!({"metadata": {}, "weight_map": index}).to_string().into_bytes()));
    } else {
        files.push(("model.safetensors".into(), weights::serialize(&w, None).unwrap()));
    }
    (files, w)
}

fn tmp(name: &str) -> PathBuf {
    common::fresh_dir(&format!("hub-{name}"))
}

fn repo(s: &str) -> RepoRef {
    RepoRef::parse(s).unwrap()
}

fn weight_gets(log: &[String]) -> usize {
    log.iter().filter(|l| l.starts_with("GET /cdn/")).count()
}

#[test]
fn repo_ids_parse_as_the_hub_names_them() {
    assert_eq!(repo("org/name"), RepoRef { repo: "org/name".into(), revision: "main".into(), file: None });
    assert_eq!(repo("HuggingFaceTB/SmolLM2-135M-Instruct@v1.0"), RepoRef { repo: "HuggingFaceTB/SmolLM2-135M-Instruct".into(), revision: "v1.0".into(), file: None });
    assert_eq!(repo("org/m-GGUF@abc:m.Q4_0.gguf").file.as_deref(), Some("m.Q4_0.gguf"));
    for not in ["name", "a/b/c", "./a/b", "../a/b", "org/", "/abs/path", "org/name@", "org/name:", "C:\\models\\x"] {
        assert_eq!(RepoRef::parse(not), None, "{not}");
    }
}

/// A first download fills the cache in huggingface_hub's layout; a second run asks
/// which commit `main` is and requests nothing else; a commit needs no request at all;
/// offline, the cache alone serves it, and what it lacks is named.
#[test]
fn a_model_downloads_once_into_the_hugging_face_cache() {
    let server = LoopbackHub::start();
    let (files, w) = demo_repo(false);
    server.add("org/demo", false, files.clone());
    let cache = tmp("once");
    let hub = server.hub(&cache);

    let dir = hub.fetch(&repo("org/demo")).unwrap();
    let root = cache.join("models--org--demo");
    assert_eq!(dir, root.join("snapshots").join(COMMIT));
    assert_eq!(std::fs::read_to_string(root.join("refs/main")).unwrap(), COMMIT);
    for (name, data) in &files {
        let link = dir.join(name);
        assert_eq!(std::fs::read_link(&link).unwrap(), PathBuf::from(format!("../../blobs/{}", etag(name, data))), "{name}: a relative link into blobs/");
        assert_eq!(&std::fs::read(&link).unwrap(), data, "{name}");
    }
    assert!(std::fs::read_dir(root.join("blobs")).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".incomplete")));
    let log = server.log();
    assert_eq!(weight_gets(&log), 1, "{log:#?}");
    assert!(log.iter().all(|l| !l.contains(" auth")), "no token, none sent");
    let md = webtune::cli::ModelDir::open(&dir).unwrap();
    assert_eq!(md.weights.rows("model.norm.weight", 0, w["model.norm.weight"].shape[0]).unwrap(), w["model.norm.weight"].data);

    let before = server.log().len();
    assert_eq!(hub.fetch(&repo("org/demo")).unwrap(), dir);
    assert_eq!(server.log()[before..], ["GET /api/models/org/demo/revision/main".to_string()], "the second run requests only the commit of main");
    assert_eq!(hub.fetch(&repo(&format!("org/demo@{COMMIT}"))).unwrap(), dir);
    assert_eq!(server.log().len(), before + 1, "a cached commit needs no request");

    let offline = Hub { offline: true, endpoint: "http://127.0.0.1:9".into(), ..hub.clone() };
    assert_eq!(offline.fetch(&repo("org/demo")).unwrap(), dir);
    let err = offline.fetch(&repo("org/other")).unwrap_err().to_string();
    assert!(err.contains("HF_HUB_OFFLINE") && err.contains("org/other") && err.contains("no copy"), "{err}");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let err = offline.fetch(&repo("org/demo")).unwrap_err().to_string();
    assert!(err.contains("HF_HUB_OFFLINE") && err.contains("model.safetensors is not in the cache"), "{err}");
    // Online again, only the missing file is fetched (its blob is still there: no GET).
    let before = server.log().len();
    hub.fetch(&repo("org/demo")).unwrap();
    let log = server.log()[before..].to_vec();
    assert_eq!(log.len(), 2, "the commit and one HEAD: {log:#?}");
    assert!(log[1].starts_with("HEAD /org/demo/resolve/") && log[1].ends_with("/model.safetensors"), "{log:#?}");
    std::fs::remove_dir_all(&cache).unwrap();
}

/// A cache laid out by Python's huggingface_hub (blobs, relative snapshot links, refs)
/// is used as it is, offline.
#[test]
fn a_cache_python_filled_is_used_as_it_is() {
    let cache = tmp("python");
    let (files, _) = demo_repo(true);
    let root = cache.join("models--someone--demo");
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    std::fs::create_dir_all(root.join("refs")).unwrap();
    std::fs::create_dir_all(root.join("snapshots").join(COMMIT)).unwrap();
    std::fs::write(root.join("refs/main"), COMMIT).unwrap();
    for (name, data) in &files {
        std::fs::write(root.join("blobs").join(etag(name, data)), data).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{}", etag(name, data)), root.join("snapshots").join(COMMIT).join(name)).unwrap();
    }
    let hub = Hub { endpoint: "http://127.0.0.1:9".into(), token: None, cache: cache.clone(), offline: true, progress: false };
    let dir = hub.fetch(&repo("someone/demo")).unwrap();
    webtune::cli::ModelDir::open(&dir).unwrap();
    std::fs::remove_dir_all(&cache).unwrap();
}

/// A gated model: without a token the error says how to give one, with a wrong one
/// that it lacks access; with the right one it downloads, and the token goes to the Hub
/// only, never to the CDN.
#[test]
fn a_gated_model_needs_a_token() {
    let server = LoopbackHub::start();
    server.add("org/gated", true, demo_repo(false).0);
    let cache = tmp("gated");
    let hub = server.hub(&cache);
    let err = hub.fetch(&repo("org/gated")).unwrap_err().to_string();
    assert!(err.contains("org/gated is gated") && err.contains("HF_TOKEN"), "{err}");
    let err = Hub { token: Some("hf_wrong".into()), ..hub.clone() }.fetch(&repo("org/gated")).unwrap_err().to_string();
    assert!(err.contains("has no access"), "{err}");
    let dir = Hub { token: Some(TOKEN.into()), ..hub }.fetch(&repo("org/gated")).unwrap();
    assert!(dir.join("model.safetensors").is_file());
    let log = server.log();
    assert!(log.iter().rfind(|l| l.contains("/resolve/")).unwrap().ends_with(" auth"));
    assert!(log.iter().filter(|l| l.starts_with("GET /cdn/")).all(|l| !l.contains(" auth")), "{log:#?}");
    std::fs::remove_dir_all(&cache).unwrap();
}

/// A missing file, repository or revision is an error naming it.
#[test]
fn missing_files_repositories_and_revisions_are_named() {
    let server = LoopbackHub::start();
    server.add("org/demo", false, demo_repo(false).0);
    let cache = tmp("missing");
    let hub = server.hub(&cache);
    let err = hub.fetch(&repo("org/demo:model.Q4_0.gguf")).unwrap_err().to_string();
    assert!(err.contains("no file `model.Q4_0.gguf`"), "{err}");
    let err = hub.fetch(&repo("org/nothing")).unwrap_err().to_string();
    assert!(err.contains("org/nothing: not found"), "{err}");
    let err = hub.fetch(&repo("org/demo@v9")).unwrap_err().to_string();
    assert!(err.contains("no revision `v9`"), "{err}");
    std::fs::remove_dir_all(&cache).unwrap();
}

/// A loopback Hub serving the single-file demo as `org/demo`, with its weights' bytes
/// and etag.
fn demo_server() -> (LoopbackHub, Vec<u8>, String) {
    let server = LoopbackHub::start();
    let (files, _) = demo_repo(false);
    let weights = files.iter().find(|(n, _)| n == "model.safetensors").unwrap().1.clone();
    let tag = etag("model.safetensors", &weights);
    server.add("org/demo", false, files);
    (server, weights, tag)
}

/// A download cut in the middle leaves `blobs/<etag>.incomplete`, never a blob or a
/// snapshot link; the next run resumes it with a range request and completes it.
#[test]
fn a_cut_download_resumes() {
    let (server, weights, tag) = demo_server();
    let half = weights.len() / 2;
    server.state.lock().unwrap().cut = Some((tag.clone(), half));
    let cache = tmp("cut");
    let hub = server.hub(&cache);
    let err = hub.fetch(&repo("org/demo")).unwrap_err().to_string();
    assert!(err.contains("model.safetensors") && err.contains("run again to resume"), "{err}");
    let blobs = cache.join("models--org--demo/blobs");
    assert_eq!(std::fs::metadata(blobs.join(format!("{tag}.incomplete"))).unwrap().len(), half as u64);
    assert!(!blobs.join(&tag).exists(), "no partial blob in the cache");
    let snapshot = cache.join("models--org--demo/snapshots").join(COMMIT);
    assert!(!snapshot.join("model.safetensors").exists());

    let dir = hub.fetch(&repo("org/demo")).unwrap();
    assert_eq!(std::fs::read(dir.join("model.safetensors")).unwrap(), weights);
    assert!(!blobs.join(format!("{tag}.incomplete")).exists());
    let log = server.log();
    assert!(log.iter().any(|l| l == &format!("GET /cdn/{tag} range={half}")), "{log:#?}");
    std::fs::remove_dir_all(&cache).unwrap();
}

/// Three processes' worth of fetches of one model on an empty cache, at once, several
/// times over: each succeeds, each blob is fetched once (the others wait on its lock
/// and use it), every cached file equals the served one, and the cache is in
/// huggingface_hub's layout, its `.locks` included.
#[test]
fn concurrent_downloads_share_the_cache() {
    let server = LoopbackHub::start();
    let (files, _) = demo_repo(false);
    server.add("org/demo", false, files.clone());
    for round in 0..4 {
        let cache = tmp(&format!("concurrent-{round}"));
        let before = server.log().len();
        let dirs: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3).map(|_| s.spawn(|| server.hub(&cache).fetch(&repo("org/demo")))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let root = cache.join("models--org--demo");
        for d in dirs {
            assert_eq!(d.unwrap(), root.join("snapshots").join(COMMIT), "round {round}");
        }
        let log = &server.log()[before..];
        for (name, data) in &files {
            let tag = etag(name, data);
            let gets = log.iter().filter(|l| l.starts_with("GET ") && (l.ends_with(&format!("/{name}")) || l.ends_with(&format!("/cdn/{tag}")))).count();
            assert_eq!(gets, 1, "round {round}: {name} fetched {gets} times: {log:#?}");
            assert_eq!(&std::fs::read(root.join("snapshots").join(COMMIT).join(name)).unwrap(), data, "round {round}: {name}");
            assert_eq!(std::fs::read_link(root.join("snapshots").join(COMMIT).join(name)).unwrap(), PathBuf::from(format!("../../blobs/{tag}")));
            assert!(cache.join(".locks/models--org--demo").join(format!("{tag}.lock")).is_file(), "huggingface_hub's lock file for {name}");
        }
        assert_eq!(std::fs::read_to_string(root.join("refs/main")).unwrap(), COMMIT);
        let strays: Vec<_> = std::fs::read_dir(root.join("blobs")).unwrap().flatten().map(|e| e.file_name()).filter(|n| n.to_string_lossy().contains('.')).collect();
        assert!(strays.is_empty(), "round {round}: {strays:?}");
        std::fs::remove_dir_all(&cache).unwrap();
    }
}

/// A download whose bytes do not have the SHA-256 the Hub announced is discarded, never
/// cached; the next run downloads it again, whole.
#[test]
fn a_corrupted_download_is_discarded() {
    let (server, weights, tag) = demo_server();
    server.state.lock().unwrap().corrupt = Some(tag.clone());
    let cache = tmp("corrupt");
    let err = server.hub(&cache).fetch(&repo("org/demo")).unwrap_err().to_string();
    assert!(err.contains("model.safetensors") && err.contains(&format!("the Hub announced {tag}")) && err.contains("run again"), "{err}");
    let blobs = cache.join("models--org--demo/blobs");
    assert!(!blobs.join(&tag).exists() && !blobs.join(format!("{tag}.incomplete")).exists());
    let dir = server.hub(&cache).fetch(&repo("org/demo")).unwrap();
    assert_eq!(std::fs::read(dir.join("model.safetensors")).unwrap(), weights);
    std::fs::remove_dir_all(&cache).unwrap();
}

/// A sharded checkpoint: the index, then each shard it names; the model loads.
#[test]
fn a_sharded_checkpoint_downloads_every_shard() {
    let server = LoopbackHub::start();
    let (files, w) = demo_repo(true);
    server.add("org/sharded", false, files);
    let cache = tmp("sharded");
    let dir = server.hub(&cache).fetch(&repo("org/sharded")).unwrap();
    for f in ["model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    assert_eq!(weight_gets(&server.log()), 2);
    let md = webtune::cli::ModelDir::open(&dir).unwrap();
    for name in w.keys() {
        let rows = w[name].shape[0];
        assert_eq!(md.weights.rows(name, 0, rows).unwrap(), w[name].data, "{name}");
    }
    std::fs::remove_dir_all(&cache).unwrap();
}

/// One file of a GGUF repository (`org/name:file.gguf`).
#[test]
fn one_gguf_file_of_a_repository() {
    let server = LoopbackHub::start();
    let gguf = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qlora/model.gguf")).unwrap();
    server.add("org/tiny-GGUF", false, vec![("tiny.Q4_0.gguf".into(), gguf.clone()), ("README.md".into(), b"# tiny".to_vec())]);
    let cache = tmp("gguf");
    let path = server.hub(&cache).fetch(&repo("org/tiny-GGUF:tiny.Q4_0.gguf")).unwrap();
    assert_eq!(path, cache.join("models--org--tiny-GGUF/snapshots").join(COMMIT).join("tiny.Q4_0.gguf"));
    assert_eq!(std::fs::read(&path).unwrap(), gguf);
    let err = server.hub(&cache).fetch(&repo("org/tiny-GGUF")).unwrap_err().to_string();
    assert!(err.contains("org/tiny-GGUF:tiny.Q4_0.gguf"), "the error shows how to name the file: {err}");
    std::fs::remove_dir_all(&cache).unwrap();
}

/// `webtune train --model org/name` through the loopback Hub (HF_ENDPOINT, HF_HUB_CACHE):
/// it trains, names the base as PEFT does, and a second run downloads no weights.
#[test]
fn webtune_train_takes_a_hub_id() {
    let server = LoopbackHub::start();
    server.add("org/demo", false, demo_repo(false).0);
    let cache = tmp("cli");
    let run = |out: &str| {
        let out = cache.join(out);
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_webtune"))
            .args(["train", "--model", "org/demo", "--data", "demo", "--steps", "1", "--batch-size", "2", "--max-seq-len", "32", "--out"])
            .arg(&out)
            .env("HF_ENDPOINT", &server.endpoint)
            .env("HF_HUB_CACHE", cache.join("hub"))
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("HF_TOKEN")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(cfg["base_model_name_or_path"], "org/demo");
    };
    run("a");
    assert_eq!(weight_gets(&server.log()), 1);
    run("b");
    assert_eq!(weight_gets(&server.log()), 1, "the second run downloads no weights");
    std::fs::remove_dir_all(&cache).unwrap();
}
