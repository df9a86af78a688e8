//! Model formats and the S2LC transformer runtime.
//!
//! Loading goes through one [`source::TensorSource`] (GGUF, safetensors directory, in-memory map)
//! behind [`model::ModelSource`]; weights are dequantized to f32 on load and the runtime
//! ([`llama::LlamaModel`]) runs on `faer` with a caller-owned [`kv::KvCache`].
#![deny(missing_docs)]

pub mod compress;
pub mod config;
pub mod error;
pub mod eval;
pub mod generate;
pub mod gguf;
pub mod kernels;
pub mod kv;
pub mod linear;
pub mod llama;
pub mod model;
pub mod perf;
pub mod quant;
pub mod source;
pub mod tokenizer;

pub use config::{Arch, ModelConfig};
pub use error::ModelError;
pub use model::ModelSource;
