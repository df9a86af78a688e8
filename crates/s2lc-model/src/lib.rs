//! Model formats and the S2LC transformer runtime.
//!
//! Loading goes through one [`source::TensorSource`] (GGUF, safetensors directory, in-memory map);
//! weights are dequantized to f32 on load and the runtime runs on `faer`.
#![deny(missing_docs)]

pub mod gguf;
pub mod quant;
pub mod tokenizer;
