//! `s2lc eval`: perplexity on a text file, plus prefill and decode speed.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use s2lc_model::eval::{perplexity, perplexity_streamed};
use s2lc_model::kv::KvSpec;
use s2lc_model::llama::LlamaModel;
use s2lc_model::speed::{decode_after, decode_speed, dense_kv_bytes};
use s2lc_model::tokenizer::read_text_file;

use super::WeightsArg;
use crate::{parse_kv, progress_bar, ModelArg};

/// Options of `s2lc eval`.
#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    weights: WeightsArg,
    /// A UTF-8 text file (CRLF is read as LF).
    #[arg(long)]
    text: PathBuf,
    /// Tokens per window; each window starts from an empty cache.
    #[arg(long, default_value_t = 512)]
    window: usize,
    /// Tokens between window starts (equal to --window: independent windows).
    #[arg(long, default_value_t = 512)]
    stride: usize,
    /// Read at most this many tokens of the text.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Tokens to decode for the decode-speed figure (0 skips it).
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Score the text as one sequence through this KV cache (same syntax as `generate --kv`;
    /// `dense` for the uncompressed baseline) in chunks of `--chunk` tokens, instead of
    /// independent windows.
    #[arg(long, value_parser = parse_kv)]
    kv: Option<KvSpec>,
    /// Tokens per chunk with `--kv`.
    #[arg(long, default_value_t = 256)]
    chunk: usize,
}

/// `eval --kv`: the text as one sequence through the chosen cache, then decode at that context.
fn eval_streamed(args: &EvalArgs, spec: &KvSpec, model: &LlamaModel, tokens: &[u32]) -> Result<()> {
    let limit = tokens.len() + args.decode_tokens + 1;
    let mut cache = spec
        .cache(model.config().n_layers, model.attn_shape(), limit)
        .context("checking --kv against the model")?;
    let bar = progress_bar(
        tokens.len().div_ceil(args.chunk.max(1)) as u64,
        "scoring chunks",
    );
    let report = perplexity_streamed(model, tokens, cache.as_mut(), args.chunk, |_, _| bar.inc(1))
        .with_context(|| format!("scoring {}", args.text.display()))?;
    bar.finish_and_clear();
    println!("perplexity: {:.4}", report.perplexity());
    println!(
        "tokens scored: {} (one sequence of {}, chunks of {}, KV cache {})",
        report.predictions,
        tokens.len(),
        args.chunk,
        spec.name()
    );
    println!(
        "KV cache: {:.2} MB ({:.2}x smaller than dense f16, {:.2}x than dense f32)",
        cache.bytes() as f64 / 1e6,
        dense_kv_bytes(model, cache.len(), 2) as f64 / cache.bytes() as f64,
        dense_kv_bytes(model, cache.len(), 4) as f64 / cache.bytes() as f64
    );
    println!("prefill: {:.1} tok/s", report.prefill_tok_s());
    if args.decode_tokens > 0 {
        let speed = decode_after(model, cache.as_mut(), tokens, args.decode_tokens)
            .context("timing decode")?;
        println!(
            "decode at {} tokens of context: {speed:.1} tok/s",
            tokens.len()
        );
    }
    Ok(())
}

/// Runs `s2lc eval`.
pub fn run(args: &EvalArgs) -> Result<()> {
    let text = read_text_file(&args.text).context("reading the evaluation text")?;
    let (_source, model, tokenizer) = args.weights.load(&args.model.path())?;
    let mut tokens = tokenizer
        .encode(&text, false)
        .context("tokenizing the text")?;
    if let Some(max) = args.max_tokens {
        tokens.truncate(max);
    }
    if let Some(spec) = &args.kv {
        return eval_streamed(args, spec, &model, &tokens);
    }
    let windows = s2lc_model::eval::windows(tokens.len(), args.window, args.stride).len();
    let bar = progress_bar(windows as u64, "scoring windows");
    let report = perplexity(&model, &tokens, args.window, args.stride, |_, _| bar.inc(1))
        .with_context(|| format!("scoring {}", args.text.display()))?;
    bar.finish_and_clear();
    println!("perplexity: {:.4}", report.perplexity());
    println!(
        "tokens scored: {} (of {} read, window {}, stride {})",
        report.predictions,
        tokens.len(),
        args.window,
        args.stride
    );
    println!("prefill: {:.1} tok/s", report.prefill_tok_s());
    if args.decode_tokens > 0 {
        let speed = decode_speed(&model, &tokens, args.decode_tokens).context("timing decode")?;
        println!("decode: {speed:.1} tok/s");
    }
    Ok(())
}
