//! `s2lc bench ...`: speed measured against this machine's limits in the same run.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use s2lc_model::generate::{generate, Sampler, SamplingParams};
use s2lc_model::llama::LlamaModel;
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
        let mut cache = model.dense_cache(cfg.max_seq_len);
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

/// Greedy decode speed (tokens/s after the first) generating `generated` tokens from the first
/// 64 of `tokens`; what `eval` and `compress-sweep` report as decode speed.
pub fn decode_speed(model: &LlamaModel, tokens: &[u32], generated: usize) -> Result<f64> {
    let prompt = &tokens[..tokens.len().min(64)];
    let mut cache = model.dense_cache(model.config().max_seq_len);
    let mut sampler = Sampler::new(SamplingParams::default());
    let stats = generate(
        model,
        &mut cache,
        prompt,
        generated,
        &mut sampler,
        &[],
        |_| true,
    )?;
    Ok(stats.decode_tok_s())
}

/// Options of `s2lc bench compress-sweep`.
#[derive(Args)]
pub struct SweepArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Held-out evaluation text [default: lcet10.txt from $S2LC_HOME].
    #[arg(long)]
    text: Option<PathBuf>,
    /// Tokens of the evaluation text scored (independent 512-token windows).
    #[arg(long, default_value_t = 2048)]
    eval_tokens: usize,
    /// Calibration text for whitening [default: alice29.txt from $S2LC_HOME].
    #[arg(long)]
    calib_text: Option<PathBuf>,
    /// Calibration windows of 512 tokens.
    #[arg(long, default_value_t = 8)]
    calib_samples: usize,
    /// Energy thresholds to try.
    #[arg(long, value_delimiter = ',', default_value = "0.8,0.85,0.9,0.95")]
    energies: Vec<f64>,
    /// Fractions of linear parameters to remove.
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.2,0.3,0.4")]
    removed: Vec<f64>,
    /// Tokens decoded for the decode-speed column.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
}

/// One measured variant.
struct SweepRow {
    name: String,
    params: usize,
    bytes: usize,
    ppl: f64,
    prefill: f64,
    decode: f64,
}

fn measure(
    name: String,
    model: &LlamaModel,
    eval: &[u32],
    decode_tokens: usize,
) -> Result<SweepRow> {
    let report = s2lc_model::eval::perplexity(model, eval, 512, 512, |_, _| {})?;
    let decode = decode_speed(model, eval, decode_tokens + 1)?;
    let params = model.linear_params();
    Ok(SweepRow {
        name,
        params,
        bytes: model.weight_bytes_per_token(),
        ppl: report.perplexity(),
        prefill: report.prefill_tok_s(),
        decode,
    })
}

/// Runs `s2lc bench compress-sweep` and prints a Markdown table.
pub fn compress_sweep(args: &SweepArgs) -> Result<()> {
    use s2lc_model::compress::{
        calibration_windows, compress, CompressOptions, Method, RankPolicy,
    };

    let (_source, dense, tokenizer) = load_model(&args.model.path())?;
    let read = |p: &Option<PathBuf>, default: &str| -> Result<Vec<u32>> {
        let path = p.clone().unwrap_or_else(|| s2lc_home().join(default));
        let text = read_text_file(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(tokenizer.encode(&text, false)?)
    };
    let mut eval = read(&args.text, "text/canterbury/lcet10.txt")?;
    eval.truncate(args.eval_tokens);
    let calib_tokens = read(&args.calib_text, "text/canterbury/alice29.txt")?;
    let calibration = calibration_windows(&calib_tokens, args.calib_samples, 512, 0)?;

    let mut variants: Vec<(String, RankPolicy, Method)> = Vec::new();
    for method in [Method::Svd, Method::Whitened] {
        for &e in &args.energies {
            variants.push((
                format!("{} {:.0}% energy", method.name(), e * 100.0),
                RankPolicy::Energy(e),
                method,
            ));
        }
        for &r in &args.removed {
            variants.push((
                format!("{} −{:.0}% params", method.name(), r * 100.0),
                RankPolicy::KeepParams(1.0 - r),
                method,
            ));
        }
    }
    let mut rows = vec![measure("dense".into(), &dense, &eval, args.decode_tokens)?];
    eprintln!("dense: ppl {:.2}", rows[0].ppl);
    for (name, policy, method) in variants {
        let mut model = dense.clone();
        let opts = CompressOptions {
            policy,
            method,
            calibration: calibration.clone(),
            sequential: true,
            refit: false,
        };
        let t = std::time::Instant::now();
        compress(&mut model, &opts, |_, _| {}).with_context(|| format!("compressing ({name})"))?;
        let row = measure(name, &model, &eval, args.decode_tokens)?;
        eprintln!(
            "{}: ppl {:.2} (compressed in {:.0} s)",
            row.name,
            row.ppl,
            t.elapsed().as_secs_f64()
        );
        rows.push(row);
    }
    let d = &rows[0];
    let (dp, db, dppl, dpre, ddec) = (d.params as f64, d.bytes as f64, d.ppl, d.prefill, d.decode);
    println!(
        "held-out text: {} tokens of {}, independent 512-token windows; calibration: {} × 512 tokens, sequential whitening",
        eval.len(),
        args.text.as_ref().map_or("lcet10.txt".into(), |p| p.display().to_string()),
        args.calib_samples
    );
    println!();
    println!("| variant | linear params | weight bytes/token | perplexity | prefill tok/s | decode tok/s |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.1} M ({:.2}x) | {:.0} MB ({:.2}x) | {:.2} ({:.2}x) | {:.0} ({:.2}x) | {:.1} ({:.2}x) |",
            r.name,
            r.params as f64 / 1e6,
            r.params as f64 / dp,
            r.bytes as f64 / 1e6,
            r.bytes as f64 / db,
            r.ppl,
            r.ppl / dppl,
            r.prefill,
            r.prefill / dpre,
            r.decode,
            r.decode / ddec
        );
    }
    Ok(())
}
