//! `s2lc logits`: the last-position logits of a prompt, for cross-checks against other runtimes.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::WeightsArg;
use crate::ModelArg;

/// Options of `s2lc logits`.
#[derive(Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    weights: WeightsArg,
    /// The prompt text, tokenized as is (no chat template).
    #[arg(long)]
    prompt: String,
    /// Output file.
    #[arg(short, long)]
    out: PathBuf,
}

/// Runs `s2lc logits`.
pub fn run(args: &LogitsArgs) -> Result<()> {
    let (_source, model, tokenizer) = args.weights.load(&args.model.path())?;
    let ids = tokenizer
        .encode(&args.prompt, true)
        .context("tokenizing the prompt")?;
    if ids.is_empty() {
        bail!("the prompt is empty");
    }
    let mut cache = model.dense_cache(ids.len());
    let mut logits = Vec::new();
    model
        .forward_last(
            &ids,
            &mut cache,
            &mut s2lc_model::llama::ForwardScratch::default(),
            &mut logits,
        )
        .context("running the prompt")?;
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&args.out, bytes).with_context(|| format!("writing {}", args.out.display()))?;
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    println!("prompt ids: {ids:?}");
    for &id in order.iter().take(5) {
        let piece = tokenizer.decode(&[id as u32], false).unwrap_or_default();
        println!("{id:>6} {:>10.4} {piece:?}", logits[id]);
    }
    println!("{} logits written to {}", logits.len(), args.out.display());
    Ok(())
}
