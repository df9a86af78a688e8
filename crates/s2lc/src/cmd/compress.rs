//! `s2lc compress`: low-rank decomposition of a model's linear layers, or low-bit quantization
//! with a low-rank correction (`--method quant-lr`), saved as safetensors.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

use s2lc_model::compress::{
    calibration_windows, compress, quantize_lowrank, save_model_dir, CompressOptions, Method,
    QuantLrOptions, RankPolicy,
};
use s2lc_model::tokenizer::read_text_file;
use s2lc_model::ModelError;

use s2lc_model::source::WeightStorage;

use crate::{load_model, load_weights, progress_bar, ModelArg};
use s2lc_bench::common::s2lc_home;

/// Factorization method on the command line.
#[derive(Clone, Copy, ValueEnum)]
pub enum MethodArg {
    /// Plain truncated SVD of each weight.
    Svd,
    /// Activation-aware SVD (SVD-LLM): whitened by calibration activations.
    Whitened,
    /// Low-bit rows (2–4 bits, error feedback) plus a low-rank correction of their whitened
    /// error, bits and ranks allocated under `--bits-per-weight`.
    QuantLr,
}

/// Options of `s2lc compress`.
#[derive(Args)]
pub struct CompressArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Output directory (config.json, model.safetensors, tokenizer.json, s2lc_compression.json).
    #[arg(short, long)]
    output: PathBuf,
    /// quant-lr: bytes budget of the block linears in bits per weight (rows, scales and
    /// correction factors all counted).
    #[arg(long)]
    bits_per_weight: Option<f64>,
    /// quant-lr: candidate bit widths of the rows.
    #[arg(long, value_delimiter = ',', default_value = "2,3,4")]
    bits: Vec<usize>,
    /// quant-lr: candidate correction ranks (0: none).
    #[arg(long, value_delimiter = ',', default_value = "0,8,16,32,64")]
    ranks: Vec<usize>,
    /// quant-lr: alternating refits of quantization and correction after the first fit.
    #[arg(long, default_value_t = 1)]
    iters: usize,
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
    if let MethodArg::QuantLr = args.method {
        return run_quant_lr(args);
    }
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
        MethodArg::Whitened | MethodArg::QuantLr => Method::Whitened,
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
    let calib_path = calibration_path(args);
    let calibration = if method == Method::Whitened {
        let tokenizer = tokenizer
            .as_ref()
            .context("whitened compression needs a tokenizer")?;
        calibration(args, tokenizer)?
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

fn calibration_path(args: &CompressArgs) -> PathBuf {
    args.calib_text
        .clone()
        .unwrap_or_else(|| s2lc_home().join("text/canterbury/alice29.txt"))
}

/// The calibration windows `args` ask for, from the calibration text.
fn calibration(
    args: &CompressArgs,
    tokenizer: &s2lc_model::tokenizer::Tokenizer,
) -> Result<Vec<Vec<u32>>> {
    let path = calibration_path(args);
    let text = read_text_file(&path)
        .with_context(|| format!("reading the calibration text {}", path.display()))?;
    let tokens = tokenizer
        .encode(&text, false)
        .context("tokenizing the calibration text")?;
    calibration_windows(&tokens, args.calib_samples, args.calib_window, args.seed)
        .context("choosing calibration windows")
}

/// `s2lc compress --method quant-lr`.
fn run_quant_lr(args: &CompressArgs) -> Result<()> {
    let Some(bits_per_weight) = args.bits_per_weight else {
        bail!("--method quant-lr needs a budget: --bits-per-weight B (e.g. 3.0)");
    };
    if args.energy.is_some() || args.keep_params.is_some() {
        bail!("--method quant-lr takes --bits-per-weight, not --energy or --keep-params");
    }
    let model_path = args.model.path();
    let (_source, mut model, tokenizer) = load_model(&model_path, WeightStorage::F32)?;
    let opts = QuantLrOptions {
        bits_per_weight,
        bits: args.bits.clone(),
        ranks: args.ranks.clone(),
        iters: args.iters,
        calibration: calibration(args, &tokenizer)?,
    };
    let start = Instant::now();
    let bar = progress_bar(1, "quantizing");
    let report = quantize_lowrank(&mut model, &opts, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .context("quantizing with a low-rank correction")?;
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();
    let record = serde_json::json!({
        "tool": "s2lc",
        "tool_version": env!("CARGO_PKG_VERSION"),
        "source": model_path.display().to_string(),
        "method": "quant-lr",
        "budget_bits_per_weight": bits_per_weight,
        "candidate_bits": opts.bits,
        "candidate_ranks": opts.ranks,
        "iters": opts.iters,
        "calibration": {
            "text": calibration_path(args).display().to_string(),
            "samples": args.calib_samples,
            "window": args.calib_window,
            "seed": args.seed,
            "tokens": report.calibration_tokens,
        },
        "report": report,
    });
    save_model_dir(&model, Some(&tokenizer), &args.output, &record)
        .with_context(|| format!("saving to {}", args.output.display()))?;
    let mean = |f: &dyn Fn(&s2lc_model::compress::QuantLrMatrix) -> f64| {
        report.matrices.iter().map(f).sum::<f64>() / report.matrices.len().max(1) as f64
    };
    println!(
        "quantized {} matrices in {elapsed:.1} s: {:.3} bits per weight (budget {bits_per_weight}), \
         mean relative output error {:.4} (rows alone {:.4})",
        report.matrices.len(),
        report.bits_per_weight,
        mean(&|m| m.rel_error),
        mean(&|m| m.rel_error_quant),
    );
    for bits in [2, 3, 4] {
        let of: Vec<_> = report.matrices.iter().filter(|m| m.bits == bits).collect();
        if !of.is_empty() {
            let ranks: usize = of.iter().map(|m| m.rank).sum();
            println!(
                "  {bits}-bit rows: {} matrices, mean correction rank {:.1}",
                of.len(),
                ranks as f64 / of.len() as f64
            );
        }
    }
    println!("saved: {}", args.output.display());
    Ok(())
}
