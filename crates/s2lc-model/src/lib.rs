//! Model formats and the S2LC transformer runtime.
//!
//! Loading goes through one [`source::TensorSource`] (GGUF, safetensors directory, in-memory map)
//! behind [`model::ModelSource`]; weight matrices are kept as f32, f16, Q8_0 or the file's own
//! quantized blocks ([`source::WeightStorage`]) and multiplied by the [`kernels`] (SIMD GEMV, tiled
//! faer GEMM, a persistent thread pool); the runtime ([`llama::LlamaModel`]) takes a caller-owned
//! [`kv::KvCache`].
#![deny(missing_docs)]
// Unsafe code is confined to the SIMD kernels, the thread pool, the disjoint writes of pool jobs
// and the memory maps of model files: every unsafe operation sits in an `unsafe` block with a
// `// SAFETY:` comment saying why it holds, and safe functions check in release builds, once per
// call, what their unsafe loops rely on.
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

pub mod assets;
pub mod atomic;
pub mod compress;
pub mod config;
pub mod digest;
pub mod encoder;
pub mod error;
pub mod eval;
pub mod expert_eval;
pub mod experts;
pub mod generate;
pub mod gguf;
pub mod gpt2;
pub mod heldout;
pub mod kernels;
pub mod kv;
pub mod linear;
pub mod llama;
pub mod lora;
pub mod model;
pub mod perf;
pub mod quant;
pub mod source;
pub mod speed;
pub mod tokenizer;

pub use config::{Arch, ModelConfig};
pub use error::ModelError;
pub use model::ModelSource;
