//! `s2lc generate`: text from a prompt, streamed to stdout.

use std::io::Write;

use anyhow::{bail, Context, Result};
use clap::Args;

use s2lc_model::generate::{generate, Sampler, SamplingParams};
use s2lc_model::kv::KvSpec;
use s2lc_model::model::apply_chat_template;
use s2lc_model::speed::dense_kv_bytes;

use super::WeightsArg;
use crate::{parse_kv, ModelArg};

/// Options of `s2lc generate`.
#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    weights: WeightsArg,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling threshold (1 keeps every token).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Send the prompt raw instead of wrapped in the model's chat template.
    #[arg(long)]
    raw: bool,
    /// KV cache: `dense` (f32), or `spectral|q8|q4[:energy=E,rank=R,block=B,window=W,keys=C,values=C]`
    /// (older blocks compressed, the recent window dense; e.g. `spectral:energy=0.99,block=512,window=256`).
    #[arg(long, default_value = "dense", value_parser = parse_kv)]
    kv: KvSpec,
}

/// Runs `s2lc generate`.
pub fn run(args: &GenerateArgs) -> Result<()> {
    let (source, model, tokenizer) = args.weights.load(&args.model.path())?;
    let template = source.chat_template();
    let text = if args.raw {
        args.prompt.clone()
    } else {
        apply_chat_template(template.as_deref(), &args.prompt)
    };
    let prompt = tokenizer
        .encode(&text, true)
        .context("tokenizing the prompt")?;
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let mut cache = args
        .kv
        .cache(
            model.config().n_layers,
            model.attn_shape(),
            model.config().max_seq_len,
        )
        .context("setting up the KV cache")?;
    let mut sampler = Sampler::new(SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    });
    let stop = tokenizer.stop_ids();
    let mut stream = tokenizer.stream_decoder();
    let mut out = std::io::stdout().lock();
    let mut failed = None;
    let stats = generate(
        &model,
        cache.as_mut(),
        &prompt,
        args.max_tokens,
        &mut sampler,
        &stop,
        |id| {
            if stop.contains(&id) {
                return false;
            }
            match stream.push(id) {
                Ok(Some(piece)) => {
                    let _ = out.write_all(piece.as_bytes());
                    let _ = out.flush();
                }
                Ok(None) => {}
                Err(e) => failed = Some(e),
            }
            failed.is_none()
        },
    )
    .context("generating")?;
    if let Some(e) = failed {
        return Err(e).context("decoding generated tokens");
    }
    writeln!(out)?;
    out.flush()?;
    eprintln!(
        "prompt: {} tokens, prefill {:.1} tok/s; generated {} tokens, decode {:.1} tok/s",
        stats.prompt_tokens,
        stats.prefill_tok_s(),
        stats.generated.len(),
        stats.decode_tok_s()
    );
    eprintln!(
        "KV cache: {} ({:.2} MB; a dense f16 cache would hold {:.2} MB)",
        args.kv.name(),
        cache.bytes() as f64 / 1e6,
        dense_kv_bytes(&model, cache.len(), 2) as f64 / 1e6
    );
    Ok(())
}
