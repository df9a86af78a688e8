//! `s2lc bench decode` and `s2lc bench compress-sweep`: speed measured against this machine's
//! limits in the same run, and the dense model against its low-rank variants.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use s2lc_model::llama::{ForwardScratch, LlamaModel, Part};
use s2lc_model::source::WeightStorage;
use s2lc_model::speed::{batched_decode, decode_speed, prefill_and_decode, PrefillDecode};
use s2lc_model::tokenizer::read_text_file;

use crate::common::{load_model, parse_weights, s2lc_home, ModelArg};

/// Options of `s2lc bench decode`.
#[derive(Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Weight storages to measure, one model load each.
    #[arg(long, value_delimiter = ',', default_value = "f32,f16,q8_0,native", value_parser = parse_weights)]
    weights: Vec<WeightStorage>,
    /// Prompt length (tokens of the prompt text), run as one prefill.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens decoded (greedy) for the decode speed.
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// Context already in the cache when decode timing starts (1 = from the start, like
    /// llama-bench's `tg` test).
    #[arg(long, default_value_t = 1)]
    decode_context: usize,
    /// Prompt text file [default: alice29.txt from $S2LC_HOME].
    #[arg(long)]
    text: Option<PathBuf>,
    /// Timed repetitions (the best is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Also print where a decode step spends its time, per part of the forward pass.
    #[arg(long)]
    profile: bool,
    /// Also measure batched decode: for each count, that many sequences decode together (one
    /// forward pass per step, as the server batches requests), e.g. `--batch 1,2,4,8`.
    #[arg(long, value_delimiter = ',')]
    batch: Vec<usize>,
}

/// Runs `s2lc bench decode`: per weight storage, prefill and decode speed, bytes per token and
/// the fraction of the memory-bandwidth bound, measured in one process.
pub fn decode(args: &DecodeArgs) -> Result<()> {
    let path = args.model.path();
    let text_path = args
        .text
        .clone()
        .unwrap_or_else(|| s2lc_home().join("text/canterbury/alice29.txt"));
    let text = read_text_file(&text_path).context("reading the prompt text")?;
    let bw = s2lc_model::perf::read_bandwidth(10);
    println!("model: {}", path.display());
    println!(
        "threads: {}, SIMD kernels: {}",
        s2lc_model::kernels::pool::global().threads(),
        if s2lc_model::kernels::dot::simd() {
            "AVX2"
        } else {
            "portable"
        }
    );
    println!("memory read bandwidth: {:.1} GB/s", bw / 1e9);
    let mut rows = Vec::new();
    let mut profiles = Vec::new();
    let mut batched = Vec::new();
    for &storage in &args.weights {
        let (_source, model, tokenizer) = load_model(&path, storage)?;
        let mut prompt = tokenizer
            .encode(&text, false)
            .context("tokenizing the prompt")?;
        prompt.truncate(args.prompt_tokens.max(1));
        let mut scratch = ForwardScratch::default();
        prefill_and_decode(&model, &prompt, args.decode_context, 8, &mut scratch, false)
            .context("warm-up run")?;
        let (mut prefill, mut decode) = (0.0f64, 0.0f64);
        for _ in 0..args.runs.max(1) {
            let PrefillDecode {
                prefill: p,
                decode: d,
                ..
            } = prefill_and_decode(
                &model,
                &prompt,
                args.decode_context,
                args.new_tokens,
                &mut scratch,
                false,
            )
            .context("timed run")?;
            prefill = prefill.max(p);
            decode = decode.max(d);
        }
        if args.profile {
            // An extra run: the stopwatch calls stay out of the timed ones.
            let p = prefill_and_decode(
                &model,
                &prompt,
                args.decode_context,
                args.new_tokens,
                &mut scratch,
                true,
            )
            .context("profiled run")?
            .profile;
            profiles.push((
                storage_name(storage, &model),
                p.unwrap_or_default(),
                args.new_tokens,
            ));
        }
        let bytes = model.weight_bytes_per_token() as f64;
        let context = &prompt[..args.decode_context.clamp(1, prompt.len())];
        for &n in &args.batch {
            if n == 0 {
                bail!("--batch counts must be at least 1");
            }
            let rate = batched_decode(&model, context, n, args.new_tokens, args.runs, &mut scratch)
                .context("batched decode")?;
            batched.push((storage_name(storage, &model), n, rate));
        }
        rows.push((storage_name(storage, &model), bytes, prefill, decode));
    }
    println!(
        "\nprefill: {} prompt tokens in one pass; decode: {} tokens after {} of context; best of {} runs\n",
        args.prompt_tokens, args.new_tokens, args.decode_context, args.runs
    );
    println!("| weights | MB read per token | prefill tok/s | decode tok/s | bandwidth bound tok/s | % of bound |");
    println!("|---|---|---|---|---|---|");
    for (name, bytes, prefill, decode) in &rows {
        let bound = bw / bytes;
        println!(
            "| {name} | {:.1} | {prefill:.1} | {decode:.1} | {bound:.1} | {:.0}% |",
            bytes / 1e6,
            100.0 * decode / bound
        );
    }
    if !batched.is_empty() {
        println!(
            "\nbatched decode: n sequences, {} tokens each after {} of context, one forward pass per step\n",
            args.new_tokens, args.decode_context
        );
        println!("| weights | sequences | aggregate tok/s | per sequence tok/s | aggregate vs 1 sequence |");
        println!("|---|---|---|---|---|");
        let single = |name: &str| {
            batched
                .iter()
                .find(|b| b.0 == name && b.1 == 1)
                .map(|b| b.2)
        };
        for (name, n, rate) in &batched {
            let vs = single(name).map_or("".into(), |one| format!("{:.2}x", rate / one));
            println!(
                "| {name} | {n} | {rate:.1} | {:.1} | {vs} |",
                rate / *n as f64
            );
        }
    }
    for (name, p, tokens) in &profiles {
        let total: f64 = p.secs.iter().sum();
        println!(
            "\ndecode profile, {name} ({:.3} ms per token):",
            1e3 * total / *tokens as f64
        );
        for (part, secs) in Part::ALL.iter().zip(&p.secs) {
            println!(
                "  {:<16} {:>8.3} ms/token {:>5.1}%",
                part.name(),
                1e3 * secs / *tokens as f64,
                100.0 * secs / total
            );
        }
    }
    Ok(())
}

/// `native` shown with the format the linears actually ended up in (e.g. `native (q4_1)`).
fn storage_name(storage: WeightStorage, model: &LlamaModel) -> String {
    let name = storage.name();
    match (storage, model.blocks().first()) {
        (WeightStorage::Native, Some(b)) => format!("{name} ({})", b.q_proj.format()),
        _ => name.to_string(),
    }
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

    let (_source, dense, tokenizer) = load_model(&args.model.path(), WeightStorage::F32)?;
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
