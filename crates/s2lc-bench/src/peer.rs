//! llama.cpp's `llama-perplexity` as a peer row of a bench: run on the same GGUF and text, its
//! perplexity read from what it prints, its KV cache size from the ggml type's block layout.
//!
//! `llama-perplexity -c N` cuts the text's tokens into chunks of `N` and scores, in each, only
//! the predictions of its second half (positions `N/2 … N−1`), each seeing at least `N/2`
//! tokens of context. S2LC scores the same predictions
//! ([`s2lc_model::eval::perplexity_second_halves`], or the chunks of a streamed run from `N/2`
//! on), so the benches put the two side by side. The peer is given the text as S2LC reads it
//! (line ends normalized to `\n`, as Python's universal newlines do): the Canterbury texts end
//! their lines in `\r\n`, which would tokenize differently.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use s2lc_model::quant::GgmlType;

/// Bytes per cached value of a llama.cpp KV cache type (`f16`, `q8_0`, `q4_0`, …): its ggml
/// block's bytes over the values it holds; `None` for a name ggml does not know.
pub fn cache_type_bytes(name: &str) -> Option<f64> {
    (0..64)
        .filter_map(GgmlType::from_id)
        .find(|t| t.name().eq_ignore_ascii_case(name))
        .map(|t| t.type_size() as f64 / t.block_size() as f64)
}

/// One `llama-perplexity` run: the model, the text, and how it reads them.
#[derive(Debug, Clone, Copy)]
pub struct LlamaRun<'a> {
    /// The `llama-perplexity` binary.
    pub bin: &'a Path,
    /// The GGUF model.
    pub gguf: &'a Path,
    /// The text as S2LC read it.
    pub text: &'a str,
    /// Tokens per chunk (`-c`).
    pub ctx: usize,
    /// Chunks scored from the start of the text (`--chunks`).
    pub chunks: usize,
    /// Keys and values cached as this ggml type (`f16`, `q8_0`, `q4_0`, …).
    pub cache_type: &'a str,
}

/// Runs `llama-perplexity` (flash attention on, which llama.cpp needs for a quantized V cache)
/// on S2LC's pool size of threads and returns its final estimate of the perplexity. Weights are
/// read in the GGUF's own blocks (`--no-repack`), as S2LC reads them (the vendored build's
/// repacked AMX path also faults on some CPUs).
pub fn llama_perplexity(run: &LlamaRun<'_>) -> Result<f64> {
    let LlamaRun {
        bin,
        gguf,
        text,
        ctx,
        chunks,
        cache_type,
    } = *run;
    let file = std::env::temp_dir().join(format!("s2lc-peer-text-{}.txt", std::process::id()));
    std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
    let threads = s2lc_model::kernels::pool::global().threads();
    let out = Command::new(bin)
        .arg("-m")
        .arg(gguf)
        .arg("-f")
        .arg(&file)
        .args(["-c", &ctx.to_string(), "-b", &ctx.min(2048).to_string()])
        .args(["--chunks", &chunks.to_string(), "-fa", "on", "--no-repack"])
        .args(["-ctk", cache_type, "-ctv", cache_type])
        .args(["-t", &threads.to_string()])
        .output();
    let _ = std::fs::remove_file(&file);
    let out = out.with_context(|| format!("running {}", bin.display()))?;
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        bail!(
            "{} -ctk {cache_type} failed ({}): {}",
            bin.display(),
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
        );
    }
    parse_log(&log).with_context(|| {
        format!(
            "{} -ctk {cache_type} printed no final estimate",
            bin.display()
        )
    })
}

/// The final perplexity estimate in a `llama-perplexity` log.
fn parse_log(log: &str) -> Option<f64> {
    log.lines()
        .find_map(|l| l.split("Final estimate: PPL =").nth(1))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_estimate() {
        let log = "perplexity: calculating perplexity over 1 chunks\n[1]58.7851,\n\
                   0.01.25.039 I Final estimate: PPL = 58.7851 +/- 4.26720\n";
        assert_eq!(parse_log(log), Some(58.7851));
        assert_eq!(parse_log("no estimate here"), None);
    }

    #[test]
    fn cache_types_by_their_blocks() {
        assert_eq!(cache_type_bytes("f16"), Some(2.0));
        assert_eq!(cache_type_bytes("q8_0"), Some(34.0 / 32.0));
        assert_eq!(cache_type_bytes("Q4_0"), Some(18.0 / 32.0));
        assert_eq!(cache_type_bytes("q9_9"), None);
    }
}
