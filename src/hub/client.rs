//! The Hub client (native): requests, the cache, downloads and their locks.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::RepoRef;
use crate::train::checkpoint::{replace, write_atomic};
use crate::error::{Error, Result};
use crate::model::source::SMALL_FILES;
use crate::model::weights::index_shards;

/// Where and how to reach the Hub.
#[derive(Clone, Debug)]
pub struct Hub {
    /// `https://huggingface.co`, or `HF_ENDPOINT` (a mirror, a test server).
    pub endpoint: String,
    /// Sent as `Authorization: Bearer` to the endpoint (gated and private repositories).
    pub token: Option<String>,
    /// The hub cache directory (`.../huggingface/hub`).
    pub cache: PathBuf,
    /// Use the cache only (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// A progress bar per downloaded file on stderr.
    pub progress: bool,
}

fn env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

impl Hub {
    /// The settings `huggingface_hub` would use in this environment.
    pub fn from_env() -> Hub {
        let home = env("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache = env("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env("HOME").unwrap_or_else(|| ".".into())).join(".cache"));
            cache.join("huggingface")
        });
        let token = env("HF_TOKEN")
            .or_else(|| std::fs::read_to_string(env("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| home.join("token"))).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        Hub {
            endpoint: env("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into()).trim_end_matches('/').to_string(),
            token,
            cache: env("HF_HUB_CACHE").or_else(|| env("HUGGINGFACE_HUB_CACHE")).map(PathBuf::from).unwrap_or_else(|| home.join("hub")),
            offline: env("HF_HUB_OFFLINE").is_some_and(|v| ["1", "on", "yes", "true"].contains(&v.to_lowercase().as_str())),
            progress: true,
        }
    }
}

const INDEX: &str = "model.safetensors.index.json";

fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Why a request failed: the Hub could not be reached (the cache may stand in), or it
/// answered no.
enum Failure {
    Unreachable(Error),
    Refused(Error),
}
use Failure::{Refused, Unreachable};

fn header<'a>(r: &'a ureq::http::Response<ureq::Body>, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

impl Hub {
    fn repo_dir(&self, repo: &str) -> PathBuf {
        self.cache.join(format!("models--{}", repo.replace('/', "--")))
    }

    /// The local path of `r`: its snapshot directory, or for `:file` that file, with
    /// whatever the cache lacks downloaded first (offline: an error naming it).
    pub fn fetch(&self, r: &RepoRef) -> Result<PathBuf> {
        let dir = self.repo_dir(&r.repo);
        // The commit the cache has for the revision (a commit is its own).
        let cached = if is_commit(&r.revision) { Some(r.revision.clone()) } else { std::fs::read_to_string(dir.join("refs").join(&r.revision)).ok().map(|s| s.trim().to_string()) };
        let from_cache = || cached.as_ref().ok_or_else(|| Error::Io(format!("the cache {} has no copy of {r}", dir.display()))).and_then(|c| self.complete(r, &dir.join("snapshots").join(c)));
        // A commit never changes: when the cache has its files, no request at all.
        if is_commit(&r.revision) {
            if let Ok(path) = from_cache() {
                return Ok(path);
            }
        }
        if self.offline {
            return from_cache().map_err(|e| Error::Io(format!("{r}: HF_HUB_OFFLINE is set and {e}; download it once online, or unset HF_HUB_OFFLINE")));
        }
        // A branch or tag: ask which commit it is now (one small request), then fetch
        // only what that snapshot lacks. A Hub out of reach falls back to the cache.
        let (commit, siblings) = match self.info(r) {
            Ok(info) => info,
            Err(Unreachable(e)) => {
                return from_cache().inspect(|_p| {
                    eprintln!("warning: {e}; using the cached {r}");
                }).map_err(|_| e)
            }
            Err(Refused(e)) => return Err(e),
        };
        if commit != r.revision {
            let refs = dir.join("refs").join(&r.revision);
            std::fs::create_dir_all(refs.parent().expect("a parent")).map_err(|e| Error::io(&refs, e))?;
            write_atomic(&refs, commit.as_bytes())?;
        }
        let snapshot = dir.join("snapshots").join(&commit);
        if let Ok(path) = self.complete(r, &snapshot) {
            return Ok(path);
        }
        let has = |f: &str| siblings.iter().any(|s| s == f);
        let ggufs = || siblings.iter().filter(|s| s.ends_with(".gguf")).collect::<Vec<_>>();
        if let Some(file) = &r.file {
            if !has(file) {
                return Err(Error::Io(format!("{r}: the repository has no file `{file}` (its GGUF files: {})", ggufs().iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "))));
            }
            return self.file(r, &commit, file);
        }
        // The small files the loader reads (`source::SMALL_FILES`), where the repository has them.
        for f in SMALL_FILES.iter().filter(|f| has(f)) {
            self.file(r, &commit, f)?;
        }
        if has("model.safetensors") {
            self.file(r, &commit, "model.safetensors")?;
        } else if has(INDEX) {
            let index = self.file(r, &commit, INDEX)?;
            for shard in index_shards(&index)? {
                self.file(r, &commit, &shard)?;
            }
        } else {
            let ggufs = ggufs();
            let hint = if ggufs.is_empty() { String::new() } else { format!("; for a GGUF file name it: {}:{}", r.repo, ggufs[0]) };
            return Err(Error::Io(format!("{r}: the repository has no model.safetensors and no {INDEX}{hint}")));
        }
        Ok(snapshot)
    }

    /// `snapshot`'s path for `r` when every file it needs is cached.
    fn complete(&self, r: &RepoRef, snapshot: &Path) -> Result<PathBuf> {
        let missing = |f: &str| Error::Io(format!("{} is not in the cache ({})", f, snapshot.display()));
        if let Some(file) = &r.file {
            let p = snapshot.join(file);
            return if p.is_file() { Ok(p) } else { Err(missing(file)) };
        }
        if !snapshot.join("config.json").is_file() {
            return Err(missing("config.json"));
        }
        if !snapshot.join("model.safetensors").is_file() {
            let index = snapshot.join(INDEX);
            if !index.is_file() {
                return Err(missing("model.safetensors"));
            }
            if let Some(s) = index_shards(&index)?.into_iter().find(|s| !snapshot.join(s).is_file()) {
                return Err(missing(&s));
            }
        }
        Ok(snapshot.to_path_buf())
    }

    fn agent(&self, redirects: u32) -> ureq::Agent {
        let loopback = ["http://127.0.0.1", "http://localhost", "http://[::1]"].iter().any(|p| self.endpoint.starts_with(p));
        let mut cfg = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(redirects)
            .max_redirects_will_error(false)
            .timeout_connect(Some(std::time::Duration::from_secs(30)));
        if loopback {
            // Proxy settings are for the outside world; a Hub on this machine is reached directly.
            cfg = cfg.proxy(None);
        }
        ureq::Agent::new_with_config(cfg.build())
    }

    fn authorize(&self, req: ureq::RequestBuilder<ureq::typestate::WithoutBody>, url: &str) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        match &self.token {
            // The token goes to the Hub only, never to a CDN it redirects to.
            Some(t) if url.starts_with(&self.endpoint) => req.header("Authorization", format!("Bearer {t}")),
            _ => req,
        }
    }

    /// The error a refused request means, as the Hub's `X-Error-Code` says it.
    fn refused(&self, r: &RepoRef, what: &str, resp: &ureq::http::Response<ureq::Body>) -> Error {
        let status = resp.status().as_u16();
        let code = header(resp, "x-error-code").unwrap_or("");
        let message = header(resp, "x-error-message").map(|m| format!(" ({m})")).unwrap_or_default();
        let text = match (status, code) {
            (401 | 403, "GatedRepo") if self.token.is_none() => format!("{} is gated: accept its conditions on its Hub page, then give webtune a token with access (HF_TOKEN=hf_..., or `huggingface-cli login`){message}", r.repo),
            (401 | 403, "GatedRepo") => format!("{} is gated and the token in HF_TOKEN has no access to it: accept its conditions on its Hub page with that account{message}", r.repo),
            (401 | 403, _) if self.token.is_none() => format!("{}: the Hub refused {what} (HTTP {status}): a private or gated repository needs a token (HF_TOKEN=hf_...){message}", r.repo),
            (401 | 403, _) => format!("{}: the Hub refused {what} with the token given (HTTP {status}){message}", r.repo),
            (404, "RevisionNotFound") => format!("{}: no revision `{}`{message}", r.repo, r.revision),
            (404, "EntryNotFound") => format!("{r}: the repository has no file `{what}`{message}"),
            (404, _) => format!("{}: not found on {} (HTTP 404 for {what}){message}", r.repo, self.endpoint),
            _ => format!("{r}: HTTP {status} for {what}{message}"),
        };
        Error::Io(text)
    }

    /// The commit `r.revision` points to and the repository's files there.
    fn info(&self, r: &RepoRef) -> std::result::Result<(String, Vec<String>), Failure> {
        let url = format!("{}/api/models/{}/revision/{}", self.endpoint, r.repo, r.revision.replace('/', "%2F"));
        let io = |e: ureq::Error| Unreachable(Error::Io(format!("{r}: cannot reach {}: {e}", self.endpoint)));
        let mut resp = self.authorize(self.agent(5).get(&url), &url).call().map_err(io)?;
        if !resp.status().is_success() {
            return Err(Refused(self.refused(r, "the file list", &resp)));
        }
        let body = resp.body_mut().read_to_string().map_err(io)?;
        let bad = |what: String| Refused(Error::Io(format!("{r}: the Hub's file list {what}")));
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| bad(format!("is not JSON ({e})")))?;
        let sha = v["sha"].as_str().filter(|s| is_commit(s)).ok_or_else(|| bad("has no commit `sha`".into()))?;
        let files = v["siblings"].as_array().map(|a| a.iter().filter_map(|s| s["rfilename"].as_str().map(str::to_string)).collect()).unwrap_or_default();
        Ok((sha.to_string(), files))
    }

    /// `file` of `r` at `commit`: its snapshot link, made once its blob is complete.
    fn file(&self, r: &RepoRef, commit: &str, file: &str) -> Result<PathBuf> {
        let dir = self.repo_dir(&r.repo);
        let link = dir.join("snapshots").join(commit).join(file);
        if link.is_file() {
            return Ok(link);
        }
        // Where the bytes are and which they are: a HEAD that follows only the Hub's own
        // (relative) redirects, as huggingface_hub does.
        let mut url = format!("{}/{}/resolve/{}/{}", self.endpoint, r.repo, commit, file);
        let agent = self.agent(0);
        let io = |e: ureq::Error| Error::Io(format!("{r}: cannot reach {}: {e}", self.endpoint));
        let mut hops = 0;
        let resp = loop {
            let resp = self.authorize(agent.head(&url), &url).header("Accept-Encoding", "identity").call().map_err(io)?;
            match header(&resp, "location") {
                Some(loc) if resp.status().is_redirection() && loc.starts_with('/') && hops < 5 => {
                    url = format!("{}{}", self.endpoint, loc);
                    hops += 1;
                }
                _ => break resp,
            }
        };
        if !(resp.status().is_success() || resp.status().is_redirection()) {
            return Err(self.refused(r, file, &resp));
        }
        let etag = header(&resp, "x-linked-etag")
            .or_else(|| header(&resp, "etag"))
            .map(|e| e.trim_start_matches("W/").trim_matches('"').to_string())
            .filter(|e| !e.is_empty() && !e.contains('/'))
            .ok_or_else(|| Error::Io(format!("{r}: the Hub gave no ETag for {file}")))?;
        let size: u64 = header(&resp, "x-linked-size")
            .or_else(|| if resp.status().is_redirection() { None } else { header(&resp, "content-length") })
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::Io(format!("{r}: the Hub gave no size for {file}")))?;
        let source = match header(&resp, "location") {
            Some(loc) if resp.status().is_redirection() => loc.to_string(),
            _ => url,
        };
        let blob = dir.join("blobs").join(&etag);
        // Another process (or thread) may be making this blob: wait for it, then use it.
        let _lock = self.lock(&r.repo, &etag)?;
        if !blob.is_file() {
            self.download(r, file, &source, &blob, &etag, size)?;
        }
        std::fs::create_dir_all(link.parent().expect("a parent")).map_err(|e| Error::io(&link, e))?;
        #[cfg(unix)]
        {
            let up = "../".repeat(2 + file.matches('/').count());
            replace(&link, |tmp| std::os::unix::fs::symlink(format!("{up}blobs/{etag}"), tmp))?;
        }
        #[cfg(not(unix))]
        replace(&link, |tmp| std::fs::copy(&blob, tmp).map(|_| ()))?;
        Ok(link)
    }

    /// The exclusive lock `huggingface_hub` takes on a blob (`filelock`, an `flock` on
    /// `.locks/models--org--name/<etag>.lock`), held until the file is dropped.
    fn lock(&self, repo: &str, etag: &str) -> Result<std::fs::File> {
        let path = self.cache.join(".locks").join(format!("models--{}", repo.replace('/', "--"))).join(format!("{etag}.lock"));
        std::fs::create_dir_all(path.parent().expect("a parent")).map_err(|e| Error::io(&path, e))?;
        let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(|e| Error::io(&path, e))?;
        f.lock().map_err(|e| Error::io(&path, e))?;
        Ok(f)
    }

    /// Download `size` bytes from `url` into `blob`, through `blob.incomplete`: resumed
    /// from what an earlier, cut download left there, checked against `size` (and
    /// against `etag` where it is a SHA-256, as LFS files' are), then renamed into place.
    /// The caller holds the blob's lock.
    fn download(&self, r: &RepoRef, file: &str, url: &str, blob: &Path, etag: &str, size: u64) -> Result<()> {
        let part = PathBuf::from(format!("{}.incomplete", blob.display()));
        std::fs::create_dir_all(blob.parent().expect("a parent")).map_err(|e| Error::io(blob, e))?;
        let mut have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        if have > size {
            have = 0;
        }
        let bar = if self.progress { indicatif::ProgressBar::new(size) } else { indicatif::ProgressBar::hidden() };
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {eta}").expect("a valid template"),
        );
        bar.set_message(file.to_string());
        let cut = |got: u64, e: &dyn std::fmt::Display| Error::Io(format!("{r}: downloading {file} stopped after {got} of {size} bytes ({e}); run again to resume"));
        if have < size {
            let mut req = self.authorize(self.agent(5).get(url), url);
            if have > 0 {
                req = req.header("Range", format!("bytes={have}-"));
            }
            let resp = req.call().map_err(|e| cut(have, &e))?;
            let status = resp.status().as_u16();
            // A resumed range, or the whole file again (a server that ignores ranges).
            let resumed = status == 206 && header(&resp, "content-range").is_some_and(|c| c.starts_with(&format!("bytes {have}-")));
            if !resumed {
                if status != 200 {
                    return Err(self.refused(r, file, &resp));
                }
                have = 0;
            }
            let mut out = std::fs::OpenOptions::new().create(true).append(resumed).write(true).truncate(!resumed).open(&part).map_err(|e| Error::io(&part, e))?;
            bar.set_position(have);
            let mut body = resp.into_body().into_reader();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = match body.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        out.flush().ok();
                        bar.abandon();
                        return Err(cut(have, &e));
                    }
                };
                out.write_all(&buf[..n]).map_err(|e| Error::io(&part, e))?;
                have += n as u64;
                bar.set_position(have);
            }
            out.sync_all().map_err(|e| Error::io(&part, e))?;
        }
        if have != size {
            bar.abandon();
            return Err(cut(have, &"the connection closed early"));
        }
        bar.finish();
        if etag.len() == 64 && etag.bytes().all(|b| b.is_ascii_hexdigit()) {
            let got = sha256(&part)?;
            if !got.eq_ignore_ascii_case(etag) {
                let _ = std::fs::remove_file(&part);
                return Err(Error::Io(format!("{r}: the downloaded {file} has SHA-256 {got}, the Hub announced {etag}; it was discarded, run again")));
            }
        }
        std::fs::rename(&part, blob).map_err(|e| Error::io(blob, e))
    }
}

/// The SHA-256 of a file, in hex.
fn sha256(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf).map_err(|e| Error::io(path, e))? {
            0 => break,
            n => ctx.update(&buf[..n]),
        }
    }
    Ok(ctx.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect())
}
