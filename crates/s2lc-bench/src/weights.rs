//! `s2lc bench weights`: the weight frontier — bits per linear weight vs perplexity on several
//! texts vs decode speed — for a dense model and quantized variants of it (llama.cpp's quants
//! from `llama-quantize`, S2LC's `compress --method quant-lr` directories), in one process.
//! `scripts/reference/weights_frontier.sh` builds the variants and calls this. With
//! `--llama-perplexity`, every GGUF is also scored by llama.cpp on the same windows, beside
//! S2LC's score of the same predictions (the second half of each window, see [`crate::peer`]).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

use s2lc_model::kernels::WeightFormat;
use s2lc_model::llama::LlamaModel;
use s2lc_model::quant::GgmlType;
use s2lc_model::source::WeightStorage;
use s2lc_model::speed::decode_speed;
use s2lc_model::tokenizer::read_text_file;
use s2lc_model::ModelSource;

use crate::common::{load_model, s2lc_home, write_json, JsonArg, ModelArg};
use crate::peer::{llama_perplexity, LlamaRun};

/// Options of `s2lc bench weights`.
#[derive(Args)]
pub struct WeightsArgs {
    /// The dense reference (`--model`): every variant's perplexity is compared with it.
    #[command(flatten)]
    model: ModelArg,
    /// A quantized variant of the same model (a .gguf file or an S2LC model directory); repeat
    /// the flag. Each runs in its own blocks (`--weights native`).
    #[arg(long = "variant", required = true)]
    variants: Vec<PathBuf>,
    /// Texts scored [default: lcet10.txt and the Linux docs domain from $S2LC_HOME].
    #[arg(long, value_delimiter = ',')]
    texts: Vec<PathBuf>,
    /// Tokens of each text scored, in independent windows of 512.
    #[arg(long, default_value_t = 2048)]
    eval_tokens: usize,
    /// Tokens decoded (greedy, after a 64-token prompt) per decode measurement.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Decode measurements per model, interleaved across models (the best is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// llama.cpp's `llama-perplexity`: scores every GGUF (`-c 512`, one chunk per window) beside
    /// S2LC's perplexity of the same predictions.
    #[arg(long)]
    llama_perplexity: Option<PathBuf>,
    /// `--json FILE`.
    #[command(flatten)]
    json: JsonArg,
}

/// One model of the frontier.
struct Row {
    name: String,
    /// Bytes of the block linears as the file stores them (blocks, scales, correction factors;
    /// biases and norms aside).
    linear_bytes: u64,
    /// Whether some linear tensor has no kernel here and runs re-quantized (its speed is then
    /// not the format's own).
    requantized: bool,
    ppl: Vec<f64>,
    /// Per text, the perplexity of the windows' second halves (`llama-perplexity`'s protocol).
    half: Vec<f64>,
    /// Per text, `llama-perplexity`'s figure (GGUF files, with `--llama-perplexity`).
    llama: Vec<Option<f64>>,
    decode: Vec<f64>,
}

/// Whether a stored tensor (Hugging Face name) is part of a block linear: a weight, low-bit
/// rows or correction factors under `model.layers.`, not a norm or a bias.
fn is_linear_tensor(name: &str) -> bool {
    name.starts_with("model.layers.") && !name.contains("norm") && !name.ends_with(".bias")
}

/// Stored bytes of the block linears of `source`, and whether any of them is in a block type
/// without an S2LC kernel.
fn linear_bytes(source: &ModelSource) -> (u64, bool) {
    let mut bytes = 0;
    let mut requantized = false;
    for t in source.tensors().describe() {
        if is_linear_tensor(&t.name) {
            bytes += t.bytes;
            // A ggml type the runtime has no kernel for is re-quantized to Q8_0 on load.
            requantized |= GgmlType::ALL
                .iter()
                .any(|&g| g.name() == t.dtype && WeightFormat::from_ggml(g).is_none());
        }
    }
    (bytes, requantized)
}

fn label(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Runs `s2lc bench weights` and prints a Markdown table.
pub fn run(args: &WeightsArgs) -> Result<()> {
    let home = s2lc_home();
    let texts = if args.texts.is_empty() {
        vec![
            home.join("text/canterbury/lcet10.txt"),
            home.join("text/domains/linux.txt"),
        ]
    } else {
        args.texts.clone()
    };
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let paths: Vec<PathBuf> = std::iter::once(args.model.path())
        .chain(args.variants.iter().cloned())
        .collect();
    let mut models: Vec<(LlamaModel, Row)> = Vec::with_capacity(paths.len());
    let mut tokens: Vec<Vec<u32>> = Vec::new();
    let mut contents: Vec<String> = Vec::new();
    let mut weights = 0usize;
    for (i, path) in paths.iter().enumerate() {
        let (source, model, tokenizer) =
            load_model(path, WeightStorage::Native).with_context(|| label(path))?;
        if i == 0 {
            weights = model.linear_shapes().iter().map(|(r, c)| r * c).sum();
            for t in &texts {
                let text = read_text_file(t).with_context(|| format!("reading {}", t.display()))?;
                let mut ids = tokenizer.encode(&text, false)?;
                ids.truncate(args.eval_tokens);
                tokens.push(ids);
                contents.push(text);
            }
        } else if model.config() != models[0].0.config() {
            bail!(
                "{} is not a variant of {}: its configuration differs",
                path.display(),
                paths[0].display()
            );
        }
        let (linear_bytes, requantized) = linear_bytes(&source);
        let (mut ppl, mut half, mut llama) = (Vec::new(), Vec::new(), Vec::new());
        for (ids, text) in tokens.iter().zip(&contents) {
            let scoring = || format!("scoring {}", label(path));
            let report = s2lc_model::eval::perplexity(&model, ids, 512, 512, |_, _| {})
                .with_context(scoring)?;
            ppl.push(report.perplexity());
            let report = s2lc_model::eval::perplexity_second_halves(&model, ids, 512)
                .with_context(scoring)?;
            half.push(report.perplexity());
            let gguf = path.extension().is_some_and(|e| e == "gguf");
            llama.push(match &args.llama_perplexity {
                Some(bin) if gguf => Some(llama_perplexity(&LlamaRun {
                    bin,
                    gguf: path,
                    text,
                    ctx: 512,
                    chunks: ids.len() / 512,
                    cache_type: "f16",
                })?),
                _ => None,
            });
        }
        eprintln!(
            "{}: perplexity {ppl:.2?}, second halves {half:.2?}, llama.cpp {llama:.2?}",
            label(path)
        );
        let row = Row {
            name: label(path),
            linear_bytes,
            requantized,
            ppl,
            half,
            llama,
            decode: Vec::new(),
        };
        models.push((model, row));
    }
    // Decode speed, interleaved: every model once per round, so drift hits all alike.
    for _ in 0..args.runs {
        for (model, row) in models.iter_mut() {
            let rate = decode_speed(model, &tokens[0], args.decode_tokens + 1)?;
            row.decode.push(rate);
        }
    }
    print_table(&models, weights, &texts, args)?;
    Ok(())
}

fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

fn print_table(
    models: &[(LlamaModel, Row)],
    weights: usize,
    texts: &[PathBuf],
    args: &WeightsArgs,
) -> Result<()> {
    let dense = &models[0].1;
    let names: Vec<String> = texts.iter().map(|t| label(t)).collect();
    println!(
        "{} tokens per text in independent windows of 512; decode: best of {} interleaved runs of {} tokens; bits per linear weight: stored bytes of the {weights} block linear weights",
        args.eval_tokens, args.runs, args.decode_tokens
    );
    println!();
    let text_cols: String = names
        .iter()
        .map(|n| format!(" {n} ppl (vs dense) | {n} second halves: S2LC / llama.cpp |"))
        .collect();
    println!("| model | bits per linear weight |{text_cols} decode tok/s (vs dense) |");
    println!("|---|---|{}---|", "---|---|".repeat(names.len()));
    let mut json_rows = Vec::new();
    for (_, r) in models {
        let bits = 8.0 * r.linear_bytes as f64 / weights.max(1) as f64;
        let ppl: String = (0..names.len())
            .map(|k| {
                let (p, d) = (r.ppl[k], dense.ppl[k]);
                let peer = r.llama[k].map_or("—".to_string(), |l| format!("{l:.2}"));
                format!(
                    " {p:.2} ({:+.1} %) | {:.2} / {peer} |",
                    100.0 * (p / d - 1.0),
                    r.half[k]
                )
            })
            .collect();
        let note = if r.requantized {
            ", runs re-quantized to Q8_0"
        } else {
            ""
        };
        let dec = best(&r.decode);
        println!(
            "| {} | {bits:.2} |{ppl} {dec:.1} ({:.2}x{note}) |",
            r.name,
            dec / best(&dense.decode)
        );
        json_rows.push(serde_json::json!({
            "model": r.name,
            "bits_per_linear_weight": bits,
            "linear_bytes": r.linear_bytes,
            "perplexity": names.iter().zip(&r.ppl).map(|(n, p)| (n.clone(), serde_json::json!(p))).collect::<serde_json::Map<_, _>>(),
            "second_halves": names.iter().zip(&r.half).map(|(n, p)| (n.clone(), serde_json::json!(p))).collect::<serde_json::Map<_, _>>(),
            "llama_perplexity": names.iter().zip(&r.llama).map(|(n, p)| (n.clone(), serde_json::json!(p))).collect::<serde_json::Map<_, _>>(),
            "decode_tok_s_runs": r.decode,
            "decode_requantized": r.requantized,
        }));
    }
    if let Some(path) = &args.json.path {
        write_json(
            path,
            &serde_json::json!({
                "bench": "weights",
                "eval_tokens": args.eval_tokens,
                "decode_tokens": args.decode_tokens,
                "runs": args.runs,
                "linear_weights": weights,
                "texts": texts.iter().map(|t| t.display().to_string()).collect::<Vec<_>>(),
                "rows": json_rows,
            }),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_tensors_are_weights_rows_and_factors_not_norms_or_biases() {
        assert!(is_linear_tensor("model.layers.3.self_attn.q_proj.weight"));
        assert!(is_linear_tensor("model.layers.3.mlp.down_proj.weight_sq"));
        assert!(is_linear_tensor(
            "model.layers.3.mlp.down_proj.correction_lt"
        ));
        assert!(!is_linear_tensor("model.layers.3.input_layernorm.weight"));
        assert!(!is_linear_tensor("model.layers.3.self_attn.q_proj.bias"));
        assert!(!is_linear_tensor("model.embed_tokens.weight_q8_0"));
    }
}
