//! Models from the Hugging Face Hub, natively: `org/name[@revision]` (a model's config,
//! tokenizer, chat template and safetensors, single or sharded) and
//! `org/name[@revision]:file.gguf` (one file), in the standard Hugging Face cache in
//! `huggingface_hub`'s own layout, so files Python downloaded are used as they are and
//! the other way round:
//!
//! ```text
//! $HF_HUB_CACHE/models--org--name/blobs/<etag>            a file's bytes
//!                                /snapshots/<commit>/<file> → ../../blobs/<etag>
//!                                /refs/<revision>          the revision's commit
//! ```
//!
//! Settings as `huggingface_hub` reads them: `HF_ENDPOINT`, `HF_TOKEN` (else
//! `$HF_HOME/token`), `HF_HUB_CACHE` (else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`), `HF_HUB_OFFLINE=1` (the cache only). A download goes to
//! `blobs/<etag>.incomplete`, resumes from there with a range request, is checked against
//! the size the Hub announced (and for LFS files, whose etag is one, the SHA-256) and
//! only then renamed into place: the cache never holds a partial blob. Processes that
//! share a cache wait for each other: a blob and its snapshot link are made under an
//! exclusive lock on `.locks/models--org--name/<etag>.lock`, the file (and the `flock`)
//! `huggingface_hub` takes, so Python and webtune respect each other's; links and refs
//! are replaced by a rename. The Hub's `X-Error-Code` (gated, missing file or revision)
//! becomes an error that says what to do.
//!
//! `RepoRef` (the repo-id grammar) builds for every target: the page parses ids with
//! it too (`Session::repo_id`). The client builds natively.

mod repo;
pub use repo::RepoRef;

#[cfg(not(target_arch = "wasm32"))]
mod client;
#[cfg(not(target_arch = "wasm32"))]
pub use client::*;
