//! One error type for the crate. Messages say what to do where we know it.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no GPU adapter found ({0}). On Linux without a GPU install Mesa's CPU Vulkan driver: \
         `apt-get install -y mesa-vulkan-drivers`; in a browser enable WebGPU"
    )]
    NoAdapter(String),
    #[error("the GPU adapter refused the device request: {0}")]
    RequestDevice(String),
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("tensor too large: {0}")]
    TooLarge(String),
    #[error("cannot launch kernel: {0}")]
    Launch(String),
    #[error("bad model config: {0}")]
    Config(String),
    /// Options that cannot run as given (a resume's changed options, a plan that does
    /// not fit); the message names them.
    #[error("{0}")]
    Options(String),
    /// The device ran out of memory during a step (a run steps down: `Run::next`).
    #[error("out of GPU memory: {0}")]
    OutOfMemory(String),
    #[error("bad weights: {0}")]
    Weights(String),
    #[error("{0}")]
    Io(String),
    #[error("bad data: {0}")]
    Data(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("GPU readback failed: {0}")]
    Map(String),
    /// The GPU device was lost (a driver reset, a browser reclaiming the GPU); the
    /// message says where to resume.
    #[error("{0}")]
    DeviceLost(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A file-system error that names the path.
    pub fn io(path: &std::path::Path, e: impl std::fmt::Display) -> Error {
        Error::Io(format!("{}: {e}", path.display()))
    }
}
