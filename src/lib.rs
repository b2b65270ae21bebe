//! webtune: fine-tune small language models with hand-written WGSL kernels.
//!
//! Map of the crate (see docs/ARCHITECTURE.md):
//! - [`gpu`]: device, limits, pipeline cache, uploads and readback
//! - [`kernels`]: the WGSL registry and a typed launcher per op
//! - [`reference`]: the CPU twin of every launcher
//! - [`bench`]: the kernel benchmark behind `webtune bench kernels`

#[cfg(not(target_arch = "wasm32"))]
pub mod alloc;
pub mod bench;
pub mod check;
pub mod clock;
#[cfg(not(target_arch = "wasm32"))]
pub mod cli;
pub mod data;
pub mod demo;
pub mod error;
pub mod gpu;
pub mod hub;
pub mod kernels;
pub mod model;
pub mod peft;
pub mod quant;
pub mod reference;
pub mod rng;
#[cfg(not(target_arch = "wasm32"))]
pub mod serve;
pub mod train;

pub use error::{Error, Result};
#[cfg(target_arch = "wasm32")]
pub mod web;
