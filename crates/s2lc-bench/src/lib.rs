//! The S2LC benchmark drivers behind `s2lc bench ...`, plus the commands that share their
//! held-out protocol and reporting (`experts eval`, `router build|eval|morph`).
//!
//! Each driver is a clap `Args` struct and a `run` function that prints a Markdown table (and,
//! with `--json FILE`, writes the same figures as JSON); everything is measured in one process so
//! the rows of a table are comparable. The drivers depend only on the library crates; the `s2lc`
//! binary parses its arguments and dispatches here. What they measure with lives in the libraries:
//! the held-out split ([`s2lc_model::heldout`]), the decode timers ([`s2lc_model::speed`]), the
//! expert-set scores ([`s2lc_model::expert_eval`]) and the base model's digest
//! ([`s2lc_model::digest`]).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use anyhow::Result;
use clap::Subcommand;

pub mod adapter_io;
pub mod adapters;
pub mod common;
pub mod decode;
pub mod domains;
pub mod experts;
pub mod kv;
pub mod pack;
pub mod peer;
pub mod router;
pub mod serve;
pub mod weights;

/// `s2lc bench` subcommands.
// Parsed once per process: boxing the larger argument sets would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Batch-1 prefill and decode speed against this machine's memory-bandwidth bound.
    Decode(decode::DecodeArgs),
    /// Dense vs low-rank variants (energy thresholds and parameter budgets × svd/whitened) in one
    /// process: parameters, bytes, held-out perplexity, prefill and decode speed.
    CompressSweep(decode::SweepArgs),
    /// KV caches on a long real text, one process: dense vs q8/q4 vs spectral at several
    /// energies and blocks — perplexity through the cache, KV bytes, decode speed at the context.
    Kv(kv::KvArgs),
    /// The adapter set on the real text domains, one process: a domain × adapter matrix of
    /// held-out perplexity, and prefill/decode speed of the base vs each adapter unmerged.
    Adapters(adapters::AdaptersArgs),
    /// S2LC packing of the adapter set and the expert set: bytes vs f16, error, own-domain
    /// perplexity after unpacking, unpack time — per energy × bits, with and without sharing.
    Pack(pack::PackBenchArgs),
    /// Load test of the server on loopback: many clients, many adapters, a byte budget;
    /// throughput, latency percentiles, cache hit rate, peak RSS.
    Serve(serve::ServeBenchArgs),
    /// The sentence encoder compressed (plain and whitened SVD, energies and budgets): cosine of
    /// held-out embeddings to the dense encoder's, routing accuracy, embedding time.
    Encoder(router::EncoderBenchArgs),
    /// The weight frontier: bits per linear weight vs perplexity on several texts vs decode
    /// speed, for a dense model and its quantized variants (llama.cpp's quants, S2LC quant-lr).
    Weights(weights::WeightsArgs),
}

/// Runs one benchmark.
pub fn run(cmd: &BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Decode(args) => decode::decode(args),
        BenchCommand::CompressSweep(args) => decode::compress_sweep(args),
        BenchCommand::Kv(args) => kv::run(args),
        BenchCommand::Adapters(args) => adapters::run(args),
        BenchCommand::Pack(args) => pack::run(args),
        BenchCommand::Serve(args) => serve::run(args),
        BenchCommand::Encoder(args) => router::bench_encoder(args),
        BenchCommand::Weights(args) => weights::run(args),
    }
}
