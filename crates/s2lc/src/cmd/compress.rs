//! `s2lc compress`: low-rank decomposition of a model's linear layers, saved as safetensors.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

use s2lc_model::compress::{
    calibration_windows, compress, save_model_dir, CompressOptions, Method, RankPolicy,
};
use s2lc_model::tokenizer::read_text_file;
use s2lc_model::ModelError;

use s2lc_model::source::WeightStorage;

use crate::{load_weights, progress_bar, ModelArg};
use s2lc_bench::common::s2lc_home;

/// Factorization method on the command line.
#[derive(Clone, Copy, ValueEnum)]
pub enum MethodArg {
    /// Plain truncated SVD of each weight.
    Svd,
    /// Activation-aware SVD (SVD-LLM): whitened by calibration activations.
    Whitened,
}

/// Options of `s2lc compress`.
#[derive(Args)]
pub struct CompressArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Output directory (config.json, model.safetensors, tokenizer.json, s2lc_compression.json).
    #[arg(short, long)]
    output: PathBuf,
    /// Keep this fraction of each matrix's spectral energy (0 < E <= 1).
    #[arg(long, conflicts_with = "keep_params")]
    energy: Option<f64>,
    /// Keep this fraction of the linear-layer parameters, allocated globally.
    #[arg(long)]
    keep_params: Option<f64>,
    /// Factorization method.
    #[arg(long, value_enum, default_value_t = MethodArg::Whitened)]
    method: MethodArg,
    /// Calibration text for whitening [default: alice29.txt from $S2LC_HOME].
    #[arg(long)]
    calib_text: Option<PathBuf>,
    /// Calibration windows.
    #[arg(long, default_value_t = 8)]
    calib_samples: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 512)]
    calib_window: usize,
    /// Seed choosing the calibration windows.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Whiten every block with dense-model activations instead of those of the compressed prefix.
    #[arg(long)]
    no_sequential: bool,
    /// Refit each left factor by least squares so the compressed layer reproduces the dense
    /// model's outputs from the compressed model's inputs (sequential whitening only).
    #[arg(long, conflicts_with = "no_sequential")]
    refit: bool,
}

/// Runs `s2lc compress`.
pub fn run(args: &CompressArgs) -> Result<()> {
    let policy = match (args.energy, args.keep_params) {
        (Some(e), None) => RankPolicy::Energy(e),
        (None, Some(k)) => RankPolicy::KeepParams(k),
        (None, None) => bail!("give a rank policy: --energy E or --keep-params P"),
        (Some(_), Some(_)) => unreachable!("clap rejects both"),
    };
    if let RankPolicy::KeepParams(k) = policy {
        if !(k > 0.0 && k <= 1.0) {
            bail!("--keep-params {k} is outside (0, 1]");
        }
    }
    let model_path = args.model.path();
    let (source, mut model) = load_weights(&model_path, WeightStorage::F32)?;
    let method = match args.method {
        MethodArg::Svd => Method::Svd,
        MethodArg::Whitened => Method::Whitened,
    };
    // Whitening tokenizes the calibration text; plain SVD needs the weights alone, and a model
    // without a tokenizer is saved without one.
    let tokenizer = match source.tokenizer() {
        Ok(t) => Some(t),
        Err(ModelError::MissingTokenizer(_)) if method == Method::Svd => None,
        Err(e) => {
            return Err(e).context(
                "building the tokenizer (whitened compression tokenizes the calibration text)",
            )
        }
    };
    let calib_path = args
        .calib_text
        .clone()
        .unwrap_or_else(|| s2lc_home().join("text/canterbury/alice29.txt"));
    let calibration = if method == Method::Whitened {
        let text = read_text_file(&calib_path).context("reading the calibration text")?;
        let tokens = tokenizer
            .as_ref()
            .context("whitened compression needs a tokenizer")?
            .encode(&text, false)
            .context("tokenizing the calibration text")?;
        calibration_windows(&tokens, args.calib_samples, args.calib_window, args.seed)
            .context("choosing calibration windows")?
    } else {
        Vec::new()
    };
    let opts = CompressOptions {
        policy,
        method,
        calibration,
        sequential: !args.no_sequential,
        refit: args.refit,
    };
    let start = Instant::now();
    let bar = progress_bar(model.config().n_layers as u64, "compressing");
    let report = compress(&mut model, &opts, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .context("compressing")?;
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();

    let source_bytes = std::fs::read(&model_path).unwrap_or_default();
    let record = serde_json::json!({
        "tool": "s2lc",
        "tool_version": env!("CARGO_PKG_VERSION"),
        "source": model_path.display().to_string(),
        "source_blake3": if source_bytes.is_empty() { String::new() } else { blake3::hash(&source_bytes).to_hex().to_string() },
        "method": method.name(),
        "policy": match policy {
            RankPolicy::Energy(e) => serde_json::json!({"energy": e}),
            RankPolicy::KeepParams(k) => serde_json::json!({"keep_params": k}),
        },
        "sequential_calibration": opts.sequential && method == Method::Whitened,
        "refit": opts.refit && opts.sequential && method == Method::Whitened,
        "calibration": if method == Method::Whitened { serde_json::json!({
            "text": calib_path.display().to_string(),
            "samples": args.calib_samples,
            "window": args.calib_window,
            "seed": args.seed,
            "tokens": report.calibration_tokens,
        }) } else { serde_json::Value::Null },
        "params_before": report.params_before,
        "params_after": report.params_after,
        "matrices": report.matrices,
    });
    save_model_dir(&model, tokenizer.as_ref(), &args.output, &record)
        .with_context(|| format!("saving to {}", args.output.display()))?;
    for note in &report.notes {
        eprintln!("note: {note}");
    }
    let low_rank = report.matrices.iter().filter(|m| m.rank.is_some()).count();
    println!(
        "compressed {low_rank} of {} matrices ({}) in {elapsed:.1} s",
        report.matrices.len(),
        method.name()
    );
    println!(
        "linear parameters: {} -> {} ({:.1}% kept)",
        report.params_before,
        report.params_after,
        100.0 * report.params_after as f64 / report.params_before.max(1) as f64
    );
    println!("saved: {}", args.output.display());
    Ok(())
}
