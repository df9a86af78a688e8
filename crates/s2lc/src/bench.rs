//! `s2lc bench ...`: speed measured against this machine's limits in the same run.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use s2lc_model::generate::{generate, Sampler, SamplingParams};
use s2lc_model::kv::DenseKvCache;
use s2lc_model::tokenizer::read_text_file;

use crate::{load_model, s2lc_home, ModelArg};

/// Options of `s2lc bench decode`.
#[derive(Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Prompt length (tokens of the prompt text).
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens to decode.
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// Prompt text file [default: alice29.txt from $S2LC_HOME].
    #[arg(long)]
    text: Option<PathBuf>,
    /// Timed repetitions (the best is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// Runs `s2lc bench decode`.
pub fn decode(args: &DecodeArgs) -> Result<()> {
    let path = args.model.path();
    let (_source, model, tokenizer) = load_model(&path)?;
    let text_path = args
        .text
        .clone()
        .unwrap_or_else(|| s2lc_home().join("text/canterbury/alice29.txt"));
    let text = read_text_file(&text_path).context("reading the prompt text")?;
    let mut prompt = tokenizer
        .encode(&text, false)
        .context("tokenizing the prompt")?;
    prompt.truncate(args.prompt_tokens.max(1));
    let cfg = model.config();
    let run = || -> Result<_> {
        let mut cache = DenseKvCache::new(cfg.n_layers, model.attn_shape(), cfg.max_seq_len);
        let mut sampler = Sampler::new(SamplingParams::default());
        Ok(generate(
            &model,
            &mut cache,
            &prompt,
            args.new_tokens + 1,
            &mut sampler,
            &[],
            |_| true,
        )?)
    };
    run().context("warm-up run")?;
    let mut best_prefill = 0.0f64;
    let mut best_decode = 0.0f64;
    for _ in 0..args.runs.max(1) {
        let s = run().context("timed run")?;
        best_prefill = best_prefill.max(s.prefill_tok_s());
        best_decode = best_decode.max(s.decode_tok_s());
    }
    let bytes = model.weight_bytes_per_token() as f64;
    let bw = s2lc_model::perf::read_bandwidth(5);
    let bound = bw / bytes;
    println!(
        "model: {} ({} parameters, f32 runtime)",
        path.display(),
        model.n_params()
    );
    println!("threads: {}", rayon::current_num_threads());
    println!(
        "prefill: {best_prefill:.1} tok/s ({} prompt tokens)",
        prompt.len()
    );
    println!("weight bytes per token: {:.1} MB", bytes / 1e6);
    println!("memory read bandwidth: {:.1} GB/s", bw / 1e9);
    println!("bandwidth bound: {bound:.1} tok/s");
    println!(
        "decode: {best_decode:.1} tok/s ({} new tokens, {:.0}% of the bandwidth bound)",
        args.new_tokens,
        100.0 * best_decode / bound
    );
    Ok(())
}
