//! `s2lc bench kv`: KV caches compared on one long real text in one process, and llama.cpp's
//! caches on the same text, model and context when its `llama-perplexity` is given.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use s2lc_model::eval::{perplexity_streamed, PerplexityReport};
use s2lc_model::kv::{CompressedKvCache, KvCache, KvSpec};
use s2lc_model::speed::{decode_after, dense_kv_bytes};
use s2lc_model::tokenizer::read_text_file;

use crate::common::{parse_kv, s2lc_home, BaseModelArgs};
use crate::peer::{cache_type_bytes, llama_perplexity, LlamaRun};

/// The caches `bench kv` measures when no `--kv` is given.
const DEFAULT_SPECS: &[&str] = &[
    "dense",
    "q8",
    "q4",
    "q8:values=q4",
    "spectral:energy=1",
    "spectral:energy=0.99",
    "spectral:energy=0.9,values=q4",
    // Below int8: int4 coefficients, int8 basis, an int8 window of 128 behind blocks of 256.
    "spectral:block=256,window=128,recent=q8,basis=q8,coef=4,energy=0.9,values=q4",
    "spectral:block=256,window=128,recent=q8,basis=q8,coef=4,keys=q4,vbits=3",
    "spectral:block=256,window=128,recent=q8,basis=q8,coef=4,kbits=1.5,vbits=3",
    "spectral:block=256,window=128,recent=q8,basis=q8,coef=4,kbits=1.5,by=energy,vbits=3",
    "spectral:block=256,window=128,recent=q8,basis=q8,coef=4,kbits=1,vbits=2",
];

/// Options of `s2lc bench kv`.
#[derive(Args)]
pub struct KvArgs {
    #[command(flatten)]
    base: BaseModelArgs,
    /// Long evaluation text [default: plrabn12.txt from $S2LC_HOME].
    #[arg(long)]
    text: Option<PathBuf>,
    /// Tokens of the text read as one sequence.
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    /// Tokens per prefill chunk.
    #[arg(long, default_value_t = 256)]
    chunk: usize,
    /// Tokens decoded after the text to time decode at that context.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// A cache to measure (repeat the flag; same syntax as `generate --kv`) [default: dense,
    /// q8, q4 and several spectral settings].
    #[arg(long = "kv", value_parser = parse_kv)]
    specs: Vec<KvSpec>,
    /// llama.cpp's `llama-perplexity` (`scripts/reference/build_llama_cpp.sh` builds it): adds
    /// its rows for each `--llama-kv` type, on the same GGUF, text and context.
    #[arg(long)]
    llama_perplexity: Option<PathBuf>,
    /// The KV cache types of the llama.cpp rows.
    #[arg(long, value_delimiter = ',', default_value = "f16,q8_0,q4_0")]
    llama_kv: Vec<String>,
}

/// One measured cache.
struct Row {
    name: String,
    ppl: f64,
    /// Perplexity of the predictions `llama-perplexity -c tokens` scores (the second half).
    ppl_half: Option<f64>,
    bytes: usize,
    /// Mean spectral rank of keys and values (`None`: not spectral).
    ranks: Option<(Option<f64>, Option<f64>)>,
    compress: Duration,
    prefill: f64,
    decode: f64,
}

/// Runs `s2lc bench kv` and prints a Markdown table.
pub fn run(args: &KvArgs) -> Result<()> {
    let text_path = args
        .text
        .clone()
        .unwrap_or_else(|| s2lc_home().join("text/canterbury/plrabn12.txt"));
    let text = read_text_file(&text_path).context("reading the evaluation text")?;
    let (_source, model, tokenizer) = args.base.load()?;
    let mut tokens = tokenizer
        .encode(&text, false)
        .context("tokenizing the text")?;
    tokens.truncate(args.tokens);
    let specs: Vec<KvSpec> = if args.specs.is_empty() {
        DEFAULT_SPECS
            .iter()
            .map(|s| KvSpec::parse(s))
            .collect::<Result<_, _>>()?
    } else {
        args.specs.clone()
    };
    if let Some(bin) = &args.llama_perplexity {
        if args.base.path().extension().is_none_or(|e| e != "gguf") {
            bail!("--llama-perplexity runs on the same GGUF: give --model a .gguf file");
        }
        if !bin.is_file() {
            bail!(
                "--llama-perplexity {}: no such file (scripts/reference/build_llama_cpp.sh builds it)",
                bin.display()
            );
        }
    }
    let shape = model.attn_shape();
    let layers = model.config().n_layers;
    let limit = tokens.len() + args.decode_tokens + 1;
    // Check every spec before the first (slow) run.
    let configs = specs
        .iter()
        .map(|s| s.check(shape))
        .collect::<Result<Vec<_>, _>>()
        .context("checking --kv against the model")?;
    let mut rows = Vec::new();
    for (spec, config) in specs.iter().zip(configs) {
        eprintln!("bench kv: {}", spec.name());
        let (report, bytes, ranks, compress, decode) = match config {
            None => {
                let mut cache = model.dense_cache(limit);
                let r = perplexity_streamed(&model, &tokens, &mut cache, args.chunk, |_, _| {})?;
                let bytes = cache.bytes();
                let d = decode_after(&model, &mut cache, &tokens, args.decode_tokens)?;
                (r, bytes, None, Duration::ZERO, d)
            }
            Some(c) => {
                let mut cache = CompressedKvCache::new(layers, shape, c);
                let r = perplexity_streamed(&model, &tokens, &mut cache, args.chunk, |_, _| {})?;
                let (bytes, compress) = (cache.bytes(), cache.compress_time());
                let ranks = Some(cache.ranks().means());
                let d = decode_after(&model, &mut cache, &tokens, args.decode_tokens)?;
                (r, bytes, ranks, compress, d)
            }
        };
        rows.push(Row {
            name: spec.name(),
            ppl: report.perplexity(),
            ppl_half: second_half(&report, tokens.len(), args.chunk),
            bytes,
            ranks,
            compress,
            prefill: report.prefill_tok_s(),
            decode,
        });
    }
    let n = tokens.len();
    let f16 = dense_kv_bytes(&model, n, 2) as f64;
    let base = rows.first().map_or(f64::NAN, |r| r.ppl);
    println!(
        "\n{}: {n} tokens as one sequence, chunks of {}, then {} decode steps at that context; \
         weights {}; threads {}\n",
        text_path.display(),
        args.chunk,
        args.decode_tokens,
        args.base.weights.name(),
        s2lc_model::kernels::pool::global().threads()
    );
    println!("| KV cache | perplexity | vs first row | second half (llama.cpp's predictions) | KV MB | smaller than f16 | mean rank K / V | compression ms per token | prefill tok/s | decode tok/s at {n} | compression / decode time |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let per_token = r.compress.as_secs_f64() / n as f64;
        println!(
            "| {} | {:.4} | {:+.2}% | {} | {:.2} | {:.2}x | {} | {:.3} | {:.1} | {:.1} | {:.1}% |",
            r.name,
            r.ppl,
            100.0 * (r.ppl / base - 1.0),
            r.ppl_half.map_or("—".to_string(), |p| format!("{p:.4}")),
            r.bytes as f64 / 1e6,
            f16 / r.bytes as f64,
            {
                let side = |r: Option<f64>| r.map_or("—".to_string(), |r| format!("{r:.1}"));
                r.ranks.map_or("—".to_string(), |(k, v)| {
                    format!("{} / {}", side(k), side(v))
                })
            },
            per_token * 1e3,
            r.prefill,
            r.decode,
            100.0 * per_token * r.decode
        );
    }
    if let Some(bin) = &args.llama_perplexity {
        llama_rows(bin, &args.base.path(), &text, n, &args.llama_kv, f16)?;
    }
    Ok(())
}

/// Perplexity of the predictions of tokens `n/2 + 1 … n − 1` (what `llama-perplexity -c n`
/// scores), from the per-chunk sums of a streamed run; `None` unless `n/2` starts a chunk.
fn second_half(report: &PerplexityReport, n: usize, chunk: usize) -> Option<f64> {
    let half = n / 2;
    if half == 0 || half % chunk != 0 || report.window_nll.len() != n.div_ceil(chunk) {
        return None;
    }
    let nll: f64 = report.window_nll[half / chunk..].iter().sum();
    Some((nll / (n - 1 - half) as f64).exp())
}

/// The llama.cpp rows: `llama-perplexity` on the same GGUF and text with a context of `n`
/// tokens, one run per KV type, printed as a table beside S2LC's.
fn llama_rows(
    bin: &Path,
    gguf: &Path,
    text: &str,
    n: usize,
    types: &[String],
    f16_bytes: f64,
) -> Result<()> {
    let mut runs = Vec::new();
    for t in types {
        let per_value = cache_type_bytes(t).with_context(|| {
            format!("--llama-kv {t}: not a ggml type (f16, q8_0, q4_0, q4_1, q5_0, q5_1, …)")
        })?;
        eprintln!("bench kv: llama.cpp {t}");
        let ppl = llama_perplexity(&LlamaRun {
            bin,
            gguf,
            text,
            ctx: n,
            chunks: 1,
            cache_type: t,
        })?;
        // The same n cells of keys and values as S2LC's cache, in the type's blocks.
        runs.push((t, ppl, f16_bytes / 2.0 * per_value));
    }
    let first = runs.first().map_or(f64::NAN, |r| r.1);
    println!(
        "\nllama.cpp ({}), the same GGUF and text, one chunk of {n} tokens (`-c {n} --chunks 1 -fa on`): \
         it scores the second half, the predictions of the column of that name above\n",
        bin.display()
    );
    println!("| llama.cpp KV cache | perplexity (second half) | vs first row | KV MB | smaller than f16 |");
    println!("|---|---|---|---|---|");
    for (t, ppl, bytes) in &runs {
        println!(
            "| {t} | {ppl:.4} | {:+.2}% | {:.2} | {:.2}x |",
            100.0 * (ppl / first - 1.0),
            bytes / 1e6,
            f16_bytes / bytes
        );
    }
    Ok(())
}
