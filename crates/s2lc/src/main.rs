//! `s2lc`: the S2LC command line.
#![forbid(unsafe_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

mod adapters;
mod analyze;
mod compress;
mod serve;
mod store;

// The plumbing every command shares, and the commands that live with the benches (they share
// the held-out protocol and the reports): reachable as `crate::...` from the command modules.
pub use s2lc_bench::common::{load_model, parse_kv, parse_weights, progress_bar, ModelArg};
use s2lc_bench::{experts, router, BenchCommand};

use s2lc_model::eval::{perplexity, perplexity_streamed};
use s2lc_model::generate::{generate, Sampler, SamplingParams};
use s2lc_model::kv::KvSpec;
use s2lc_model::llama::LlamaModel;
use s2lc_model::model::apply_chat_template;
use s2lc_model::source::WeightStorage;
use s2lc_model::speed::{decode_after, decode_speed, dense_kv_bytes};
use s2lc_model::tokenizer::{read_text_file, Tokenizer};
use s2lc_model::ModelSource;

/// S2LC: spectral low-rank compression and serving of language models.
#[derive(Parser)]
#[command(name = "s2lc", version, about)]
struct Cli {
    /// Worker threads for the math (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt.
    Generate(GenerateArgs),
    /// Perplexity on a text file, plus prefill and decode speed.
    Eval(EvalArgs),
    /// Architecture, tensor table, dtypes and parameter counts of a model.
    Info {
        /// A .gguf file or a Hugging Face model directory [default: SmolLM2-135M-Instruct in
        /// $S2LC_HOME].
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Singular values of every linear weight: ranks per energy threshold, JSON report and plots.
    Analyze(analyze::AnalyzeArgs),
    /// Replace linear layers by low-rank factors and save the model.
    Compress(compress::CompressArgs),
    /// Inspect LoRA adapters (PEFT layout) and re-rank them by their spectra.
    #[command(subcommand)]
    Adapters(adapters::AdaptersCommand),
    /// Domain FFN expert sets (MoE residuals built from the dense model).
    #[command(subcommand)]
    Experts(experts::ExpertsCommand),
    /// The Adapter Store: content-addressed blobs, semantic versions, local or S3.
    Store(store::StoreArgs),
    /// Serve the base model and the store's adapters over an OpenAI-style HTTP API
    /// (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics).
    Serve(serve::ServeArgs),
    /// The Context Router's centroids (`build`) and routing accuracy on held-out text (`eval`).
    #[command(subcommand)]
    Router(router::RouterCommand),
    /// Write the last-position logits of a prompt (raw little-endian f32, vocabulary order) and
    /// print the top tokens: for cross-checks against other runtimes.
    Logits(LogitsArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Args)]
struct GenerateArgs {
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

#[derive(Args)]
struct EvalArgs {
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

#[derive(Args)]
struct LogitsArgs {
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

fn main() -> ExitCode {
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Output piped into a reader that stopped early (`s2lc info ... | head`) is not an error: a
/// write to stdout failed with a broken pipe and came back through `?` as the error itself. A
/// broken pipe among an error's causes (a store server closing a connection mid-request) is a
/// real failure and is reported.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

fn try_main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("setting the thread count")?;
        s2lc_model::kernels::pool::init_global(n);
    }
    match cli.command {
        Command::Generate(args) => cmd_generate(&args),
        Command::Eval(args) => cmd_eval(&args),
        Command::Info { model } => cmd_info(&model.unwrap_or_else(s2lc_model::assets::smollm2)),
        Command::Compress(args) => compress::run(&args),
        Command::Analyze(args) => analyze::run(&args),
        Command::Adapters(cmd) => adapters::run(&cmd),
        Command::Experts(cmd) => experts::run(&cmd),
        Command::Store(args) => store::run(&args),
        Command::Serve(args) => serve::run(&args),
        Command::Router(cmd) => router::run(&cmd),
        Command::Logits(args) => cmd_logits(&args),
        Command::Bench(cmd) => s2lc_bench::run(&cmd),
    }
}

/// How the runtime stores weight matrices (`--weights`) and which LoRA adapters it applies.
#[derive(Args, Clone)]
pub struct WeightsArg {
    /// Weight storage: f32 (dequantized reference), f16, q8_0, or native (the file's own
    /// quantized blocks; f32 for unquantized files).
    #[arg(long = "weights", default_value = "native", value_parser = parse_weights)]
    pub storage: WeightStorage,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors), applied
    /// unmerged; repeat the flag to stack several.
    #[arg(long = "adapter")]
    pub adapters: Vec<PathBuf>,
    /// Swap this FFN of an expert set (`--expert-set`) into its layers, dense f32, before any
    /// adapter is attached: an expert's name, or `base` for the set's base FFN.
    #[arg(long, requires = "expert_set")]
    pub expert: Option<String>,
    /// The expert set directory of `--expert`.
    #[arg(long, requires = "expert")]
    pub expert_set: Option<PathBuf>,
}

impl WeightsArg {
    /// Loads the model in the chosen storage, with the expert FFN swapped in and the adapters
    /// attached.
    fn load(&self, path: &Path) -> Result<(ModelSource, LlamaModel, Tokenizer)> {
        let (source, mut model, tokenizer) = load_model(path, self.storage)?;
        if let (Some(name), Some(dir)) = (&self.expert, &self.expert_set) {
            let set = s2lc_model::experts::ExpertSet::open(dir)
                .with_context(|| format!("opening the expert set {}", dir.display()))?;
            let ffn = if name == "base" {
                set.base().context("reading the base FFN")?
            } else {
                set.expert(name)
                    .with_context(|| format!("reading expert '{name}'"))?
            };
            ffn.swap_into(&mut model)
                .with_context(|| format!("swapping the FFN of '{name}' in"))?;
            eprintln!("expert {name}: FFN of layers {:?} swapped in", set.layers);
        }
        for dir in &self.adapters {
            let adapter = s2lc_bench::adapter_io::load_adapter(dir)?;
            model
                .attach_adapter(&adapter)
                .with_context(|| format!("attaching the adapter {}", dir.display()))?;
            eprintln!(
                "adapter {}: rank {}, scale {}, {} layers adapted",
                dir.display(),
                adapter.rank,
                adapter.scale,
                adapter.n_deltas()
            );
        }
        Ok((source, model, tokenizer))
    }
}

fn cmd_generate(args: &GenerateArgs) -> Result<()> {
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

fn cmd_eval(args: &EvalArgs) -> Result<()> {
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

fn cmd_logits(args: &LogitsArgs) -> Result<()> {
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

fn cmd_info(path: &Path) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let source = ModelSource::open(path).context("opening the model")?;
    writeln!(out, "model:        {}", path.display())?;
    writeln!(out, "format:       {}", source.format_name())?;
    writeln!(out, "architecture: {}", source.architecture()?)?;
    match source.config() {
        Ok(cfg) => writeln!(
            out,
            "config:       d={} ffn={} layers={} heads={}/{} head_dim={} vocab={} rope_theta={} tied={}",
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.n_layers,
            cfg.n_heads,
            cfg.n_kv_heads,
            cfg.head_dim,
            cfg.vocab_size,
            cfg.rope_theta,
            cfg.tie_embeddings
        )?,
        Err(e) => writeln!(out, "config:       not runnable here ({e})")?,
    }
    let tensors = source.tensors().describe();
    let mut by_dtype: std::collections::BTreeMap<String, (usize, u64, u64)> = Default::default();
    writeln!(
        out,
        "\n{:<48} {:>16} {:>6} {:>12}",
        "tensor", "shape", "dtype", "bytes"
    )?;
    for t in &tensors {
        let n: u64 = t.shape.iter().map(|&d| d as u64).product();
        let e = by_dtype.entry(t.dtype.clone()).or_default();
        e.0 += 1;
        e.1 += n;
        e.2 += t.bytes;
        writeln!(
            out,
            "{:<48} {:>16} {:>6} {:>12}",
            t.name,
            format!("{:?}", t.shape),
            t.dtype,
            t.bytes
        )?;
    }
    writeln!(out)?;
    let (mut params, mut bytes) = (0u64, 0u64);
    for (dtype, (count, n, b)) in &by_dtype {
        writeln!(
            out,
            "{dtype:>6}: {count:>4} tensors, {n:>12} parameters, {b:>12} bytes"
        )?;
        params += n;
        bytes += b;
    }
    writeln!(
        out,
        " total: {:>4} tensors, {params:>12} parameters, {bytes:>12} bytes ({:.2} bits/parameter)",
        tensors.len(),
        8.0 * bytes as f64 / params.max(1) as f64
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::is_broken_pipe;
    use std::io::{Error, ErrorKind};

    #[test]
    fn only_a_closed_stdout_counts_as_a_broken_pipe() {
        let pipe = || Error::new(ErrorKind::BrokenPipe, "broken pipe");
        // `writeln!(out, ...)?` into a closed pipe.
        assert!(is_broken_pipe(&anyhow::Error::from(pipe())));
        // A store request whose connection broke: a failure, whatever the context says.
        let store = s2lc_store::StoreError::Io {
            path: "s3://fleet/blobs/x".into(),
            source: pipe(),
        };
        assert!(!is_broken_pipe(
            &anyhow::Error::from(store).context("pushing alice@1.0.0")
        ));
    }
}
