//! Perplexity over real text with fixed windows.
//!
//! Windows of `window` tokens start every `stride` tokens; each is run from an empty cache, and a
//! token is scored once, by the first window that holds it with some context before it. With
//! `stride == window` (the default, 512/512) the windows are independent and each scores its tokens
//! 1..window, as the reference script does; `stride < window` gives overlapping, sliding-window
//! evaluation (more context per scored token, more compute).

use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::error::ModelError;
use crate::kv::KvCache;
use crate::llama::{ForwardScratch, LlamaModel};
use crate::lora::{AdapterDeltas, LoraAdapter};

/// Rows of logits materialised at once (bounds memory at `rows × vocab` floats: 50 MB for a
/// 49152-token vocabulary; fewer rows would decode a quantized tied head more often).
const LOGIT_CHUNK: usize = 256;

/// Result of a perplexity run.
#[derive(Debug, Clone, Default)]
pub struct PerplexityReport {
    /// Summed negative log-likelihood (nats) of each window's scored tokens.
    pub window_nll: Vec<f64>,
    /// Tokens scored (predictions).
    pub predictions: usize,
    /// Tokens run through the model.
    pub tokens_run: usize,
    /// Wall time of the forward passes.
    pub forward_time: Duration,
}

impl PerplexityReport {
    /// Mean negative log-likelihood per scored token.
    pub fn mean_nll(&self) -> f64 {
        self.window_nll.iter().sum::<f64>() / self.predictions.max(1) as f64
    }

    /// `exp(mean NLL)`.
    pub fn perplexity(&self) -> f64 {
        self.mean_nll().exp()
    }

    /// Tokens run per second of forward time (batched prefill speed).
    pub fn prefill_tok_s(&self) -> f64 {
        self.tokens_run as f64 / self.forward_time.as_secs_f64().max(1e-9)
    }
}

/// The `(start, end, first_scored)` windows for `n_tokens` tokens.
pub fn windows(n_tokens: usize, window: usize, stride: usize) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    let mut prev_end = 0;
    let mut start = 0;
    while start < n_tokens {
        let end = (start + window).min(n_tokens);
        let first = prev_end.max(start + 1);
        if first < end {
            out.push((start, end, first));
        }
        if end == n_tokens {
            break;
        }
        prev_end = end;
        start += stride;
    }
    out
}

/// Perplexity of `model` on `tokens`; `on_window(i, of)` reports progress.
pub fn perplexity(
    model: &LlamaModel,
    tokens: &[u32],
    window: usize,
    stride: usize,
    mut on_window: impl FnMut(usize, usize),
) -> Result<PerplexityReport, ModelError> {
    if window < 2 || stride == 0 || stride > window {
        return Err(ModelError::InvalidConfig(format!(
            "perplexity needs window >= 2 and 0 < stride <= window (got window {window}, stride {stride})"
        )));
    }
    enough_tokens(tokens)?;
    let wins = windows(tokens.len(), window, stride);
    let mut cache = model.dense_cache(window);
    let mut scorer = Scorer::default();
    for (wi, &(start, end, first)) in wins.iter().enumerate() {
        cache.clear();
        // Hidden row r predicts token start + r + 1; score targets first..end.
        let rows = (first - 1 - start)..(end - 1 - start);
        scorer.piece(model, &mut cache, tokens, start..end, rows)?;
        on_window(wi + 1, wins.len());
    }
    Ok(scorer.report)
}

/// Perplexity of what `llama-perplexity -c window` scores: `tokens` cut into whole chunks of
/// `window` (a partial last chunk is dropped), each run alone from an empty cache, and in each
/// only the predictions of its second half (positions `window/2 … window − 2` predicting the
/// next token), which all see at least `window/2` tokens of context. The peer's own protocol,
/// so its figures and S2LC's can be put side by side on the same predictions.
pub fn perplexity_second_halves(
    model: &LlamaModel,
    tokens: &[u32],
    window: usize,
) -> Result<PerplexityReport, ModelError> {
    if window < 4 || tokens.len() < window {
        return Err(ModelError::InvalidConfig(format!(
            "second-half perplexity needs a window of at least 4 tokens and a text of at least one window (window {window}, {} tokens)",
            tokens.len()
        )));
    }
    let mut cache = model.dense_cache(window);
    let mut scorer = Scorer::default();
    for start in (0..tokens.len() / window).map(|c| c * window) {
        cache.clear();
        scorer.piece(
            model,
            &mut cache,
            tokens,
            start..start + window,
            window / 2..window - 1,
        )?;
    }
    Ok(scorer.report)
}

/// Perplexity of `tokens` read as one sequence through `cache`, the way generation sees it: the
/// tokens go in `chunk`-token pieces (chunked prefill), each attending to everything before it
/// *as the cache stores it* (a compressed cache answers from its compressed blocks), and every
/// token but the first is scored. `cache` must hold `tokens.len()` tokens; it is cleared first.
/// `on_chunk(done, of)` reports progress.
pub fn perplexity_streamed(
    model: &LlamaModel,
    tokens: &[u32],
    cache: &mut dyn KvCache,
    chunk: usize,
    mut on_chunk: impl FnMut(usize, usize),
) -> Result<PerplexityReport, ModelError> {
    if chunk == 0 {
        return Err(ModelError::InvalidConfig(
            "streamed perplexity needs a chunk of at least 1 token".into(),
        ));
    }
    enough_tokens(tokens)?;
    let mut scorer = Scorer::default();
    cache.clear();
    let chunks = tokens.len().div_ceil(chunk);
    for (ci, start) in (0..tokens.len()).step_by(chunk).enumerate() {
        let end = (start + chunk).min(tokens.len());
        // Row r predicts token start + r + 1, which exists for every row but the text's last.
        let rows = 0..(end - start).min(tokens.len() - 1 - start);
        scorer.piece(model, cache, tokens, start..end, rows)?;
        on_chunk(ci + 1, chunks);
    }
    Ok(scorer.report)
}

/// Perplexity needs a prediction: at least two tokens.
fn enough_tokens(tokens: &[u32]) -> Result<(), ModelError> {
    if tokens.len() < 2 {
        return Err(ModelError::EmptyInput(format!(
            "perplexity needs at least 2 tokens, the text has {}",
            tokens.len()
        )));
    }
    Ok(())
}

/// The buffers and running totals of a perplexity run.
#[derive(Default)]
struct Scorer {
    scratch: ForwardScratch,
    logits: Vec<f32>,
    report: PerplexityReport,
}

impl Scorer {
    /// Runs `tokens[run]` through `cache` and adds the NLL of hidden rows `rows` (row `r`
    /// predicting token `run.start + r + 1`) to the report as one entry.
    fn piece(
        &mut self,
        model: &LlamaModel,
        cache: &mut dyn KvCache,
        tokens: &[u32],
        run: std::ops::Range<usize>,
        rows: std::ops::Range<usize>,
    ) -> Result<(), ModelError> {
        let t0 = Instant::now();
        let hidden = model.forward_hidden(&tokens[run.clone()], cache, &mut self.scratch)?;
        let nll = score_rows(
            model,
            hidden,
            &tokens[run.start + 1..],
            rows.clone(),
            &mut self.logits,
        );
        self.report.forward_time += t0.elapsed();
        self.report.tokens_run += run.len();
        self.report.predictions += rows.len();
        self.report.window_nll.push(nll);
        Ok(())
    }
}

/// Summed NLL of hidden rows `rows`, row `r` predicting `targets[r]`; logits are materialised
/// [`LOGIT_CHUNK`] rows at a time into `logits`.
fn score_rows(
    model: &LlamaModel,
    hidden: &[f32],
    targets: &[u32],
    rows: std::ops::Range<usize>,
    logits: &mut Vec<f32>,
) -> f64 {
    let (d, vocab) = (model.config().hidden_size, model.config().vocab_size);
    let mut nll = 0.0f64;
    for r0 in rows.clone().step_by(LOGIT_CHUNK) {
        let r1 = (r0 + LOGIT_CHUNK).min(rows.end);
        model.logits(&hidden[r0 * d..r1 * d], logits);
        for (r, row) in (r0..r1).zip(logits.chunks_exact_mut(vocab)) {
            let target = row[targets[r] as usize] as f64;
            nll += log_sum_exp(row) - target;
        }
    }
    nll
}

/// `log Σ exp(x)`, shifted by the maximum for stability; overwrites `x` with `exp(x − max)`
/// (vectorised: scoring a 49152-token vocabulary per position dominated evaluation otherwise).
fn log_sum_exp(x: &mut [f32]) -> f64 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum = crate::kernels::ops::exp_shifted(x, max);
    max as f64 + (sum as f64).ln()
}

/// A model's next-token distributions on calibration windows (with an adapter, or none), kept to
/// measure how far a change moves them: the mean `KL(reference ‖ changed)` per position. With it,
/// the loss effect of a change is measured by forward passes alone (no gradients).
pub struct OutputReference {
    windows: Vec<Vec<u32>>,
    /// The cache and buffers every comparison runs the windows through (sized once).
    run: WindowRun,
    /// Per window, `rows × vocab` probabilities, every position of the window.
    probs: Vec<Vec<f32>>,
    /// Per window and row, `(Σ p·ln p, Σ p)` (the latter ≈ 1, kept so the KL is exact for the
    /// stored `p`).
    rows: Vec<Vec<(f64, f64)>>,
}

impl OutputReference {
    /// Runs every window (from an empty cache) through `model` with `adapter` and keeps its
    /// distributions. Memory: `positions × vocab` floats (100 MB for 512 positions of a
    /// 49152-token vocabulary).
    pub fn new(
        model: &LlamaModel,
        windows: Vec<Vec<u32>>,
        adapter: Option<&LoraAdapter>,
    ) -> Result<Self, ModelError> {
        let vocab = model.config().vocab_size;
        let mut run = WindowRun::new(model, &windows)?;
        let mut probs = Vec::with_capacity(windows.len());
        let mut rows = Vec::with_capacity(windows.len());
        for w in &windows {
            let mut logits = std::mem::take(run.logits(model, w, adapter)?);
            let stats = logits
                .par_chunks_exact_mut(vocab)
                .map_init(Vec::new, |buf: &mut Vec<f32>, row| {
                    buf.clear();
                    buf.extend_from_slice(row);
                    let lse = log_sum_exp(buf);
                    // `buf` now holds exp(x − max); p is that over its sum.
                    let inv = (1.0 / buf.iter().map(|&v| v as f64).sum::<f64>()) as f32;
                    let (mut plogp, mut total) = (0.0f64, 0.0f64);
                    for (x, &e) in row.iter_mut().zip(buf.iter()) {
                        let p = e * inv;
                        plogp += p as f64 * *x as f64;
                        total += p as f64;
                        *x = p;
                    }
                    // Σ p·ln p with ln p = x − lse exactly (not the log of the rounded p), so an
                    // unchanged model compares at zero.
                    (plogp - lse * total, total)
                })
                .collect();
            probs.push(logits);
            rows.push(stats);
        }
        Ok(OutputReference {
            windows,
            run,
            probs,
            rows,
        })
    }

    /// Positions compared.
    pub fn positions(&self) -> usize {
        self.rows.iter().map(Vec::len).sum()
    }

    /// Mean `KL(reference ‖ model with adapter)` per position, in nats: `Σ p·(ln p − ln q)`, with
    /// `ln q = x − lse(x)` from the changed logits `x`, so no `q` is stored.
    pub fn mean_kl(
        &mut self,
        model: &LlamaModel,
        adapter: Option<&LoraAdapter>,
    ) -> Result<f64, ModelError> {
        let vocab = model.config().vocab_size;
        let mut kl = 0.0f64;
        for ((w, probs), stats) in self.windows.iter().zip(&self.probs).zip(&self.rows) {
            let logits = self.run.logits(model, w, adapter)?;
            kl += logits
                .par_chunks_exact_mut(vocab)
                .zip(probs.par_chunks_exact(vocab))
                .zip(stats.par_iter())
                .map(|((x, p), &(plogp, total))| {
                    let dot: f64 = p
                        .iter()
                        .zip(x.iter())
                        .map(|(&p, &x)| p as f64 * x as f64)
                        .sum();
                    plogp - dot + log_sum_exp(x) * total
                })
                .sum::<f64>();
        }
        Ok(kl / self.positions().max(1) as f64)
    }
}

/// A cache and buffers to run calibration windows one at a time, each from an empty cache.
struct WindowRun {
    cache: crate::kv::DenseKvCache,
    scratch: ForwardScratch,
    logits: Vec<f32>,
}

impl WindowRun {
    fn new(model: &LlamaModel, windows: &[Vec<u32>]) -> Result<Self, ModelError> {
        let longest = windows.iter().map(Vec::len).max().unwrap_or(0);
        if longest == 0 {
            return Err(ModelError::EmptyInput(
                "no calibration windows to compare outputs on".into(),
            ));
        }
        Ok(WindowRun {
            cache: model.dense_cache(longest),
            scratch: ForwardScratch::default(),
            logits: Vec::new(),
        })
    }

    /// The logits (`len × vocab`) of every position of `window`.
    fn logits(
        &mut self,
        model: &LlamaModel,
        window: &[u32],
        adapter: Option<&LoraAdapter>,
    ) -> Result<&mut Vec<f32>, ModelError> {
        self.cache.clear();
        let hidden = model.forward_hidden_adapted(
            window,
            &mut self.cache,
            adapter.map(|a| a as &dyn AdapterDeltas),
            &mut self.scratch,
        )?;
        model.logits(hidden, &mut self.logits);
        Ok(&mut self.logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::LoraDelta;

    #[test]
    fn independent_windows_score_all_but_their_first_token() {
        assert_eq!(windows(10, 4, 4), vec![(0, 4, 1), (4, 8, 5), (8, 10, 9)]);
        // A trailing single token has no context within its window: not scored.
        assert_eq!(windows(9, 4, 4), vec![(0, 4, 1), (4, 8, 5)]);
    }

    #[test]
    fn sliding_windows_score_each_token_once() {
        let w = windows(10, 4, 2);
        assert_eq!(w, vec![(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]);
        let scored: usize = w.iter().map(|(_, e, f)| e - f).sum();
        assert_eq!(scored, 9);
    }

    /// An adapter changing every layer's `q_proj` (target 0) by `scale` times a fixed rank-1
    /// delta.
    fn q_adapter(model: &LlamaModel, scale: f32) -> LoraAdapter {
        let d = model.config().hidden_size;
        let v = |n: usize, s: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 7 + s * 3) % 13) as f32 - 6.0) / 6.0)
                .collect()
        };
        let layers = (0..model.config().n_layers)
            .map(|l| {
                std::array::from_fn(|t| {
                    (t == 0).then(|| LoraDelta::new(v(d, l), v(d, l + 1), 1, d, d, scale))
                })
            })
            .collect();
        LoraAdapter {
            path: "q-adapter".into(),
            rank: 1,
            alpha: scale,
            scale,
            base_model: None,
            layers,
        }
    }

    /// `KL(p ‖ q)` per position from two sets of logits, directly in f64.
    fn direct_kl(p: &[f32], q: &[f32], vocab: usize) -> f64 {
        let log_softmax = |x: &[f32]| -> Vec<f64> {
            let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            x.iter().map(|&v| v as f64 - lse).collect()
        };
        let rows = p.len() / vocab;
        let total: f64 = p
            .chunks(vocab)
            .zip(q.chunks(vocab))
            .map(|(p, q)| {
                let (lp, lq) = (log_softmax(p), log_softmax(q));
                lp.iter()
                    .zip(&lq)
                    .map(|(a, b)| a.exp() * (a - b))
                    .sum::<f64>()
            })
            .sum();
        total / rows as f64
    }

    #[test]
    fn output_kl_matches_the_direct_computation_and_is_quadratic_in_a_small_change() {
        let model = crate::llama::random_model(8, 12, 2, (2, 1), 11, 3);
        let windows = vec![vec![1u32, 4, 2, 9, 3, 3, 7], vec![5u32, 0, 8, 2]];
        let mut reference = OutputReference::new(&model, windows.clone(), None).unwrap();
        assert_eq!(reference.positions(), 11);
        // Unchanged outputs: zero.
        assert!(reference.mean_kl(&model, None).unwrap().abs() < 1e-9);

        let adapter = q_adapter(&model, 20.0);
        let kl = reference.mean_kl(&model, Some(&adapter)).unwrap();
        let mut run = WindowRun::new(&model, &windows).unwrap();
        let (mut p, mut q) = (Vec::new(), Vec::new());
        for w in &windows {
            p.extend_from_slice(run.logits(&model, w, None).unwrap());
            q.extend_from_slice(run.logits(&model, w, Some(&adapter)).unwrap());
        }
        let want = direct_kl(&p, &q, 11);
        assert!(want > 1e-4, "the change moves the outputs: {want}");
        assert!((kl - want).abs() < 1e-6 * want.max(1.0), "{kl} vs {want}");

        // Second order: halving a small change quarters the divergence.
        let small = reference
            .mean_kl(&model, Some(&q_adapter(&model, 1.0)))
            .unwrap();
        let smaller = reference
            .mean_kl(&model, Some(&q_adapter(&model, 0.5)))
            .unwrap();
        let ratio = small / smaller;
        assert!((ratio - 4.0).abs() < 0.2, "{small} / {smaller} = {ratio}");
    }

    /// The second halves of whole windows are the windows' streamed chunks from the middle on:
    /// the same predictions, the same context, so the same sum; a partial last window is not
    /// scored.
    #[test]
    fn second_halves_score_the_predictions_llama_perplexity_scores() {
        let model = crate::llama::random_model(8, 12, 2, (2, 1), 11, 3);
        let tokens: Vec<u32> = (0..19u32).map(|i| (i * 7 + 3) % 11).collect();
        let half = perplexity_second_halves(&model, &tokens, 8).unwrap();
        assert_eq!(half.predictions, 2 * 3);
        let mut want = 0.0;
        for w in tokens.chunks_exact(8) {
            let mut cache = model.dense_cache(8);
            let r = perplexity_streamed(&model, w, &mut cache, 4, |_, _| {}).unwrap();
            want += r.window_nll[1];
        }
        let got: f64 = half.window_nll.iter().sum();
        assert!((got - want).abs() < 1e-4 * want.abs(), "{got} vs {want}");
        assert!(perplexity_second_halves(&model, &tokens[..7], 8).is_err());
    }

    #[test]
    fn log_sum_exp_is_stable() {
        let v = log_sum_exp(&mut [1000.0, 1000.0]);
        assert!((v - (1000.0 + 2f64.ln())).abs() < 1e-6);
        let mut row: Vec<f32> = (0..49152)
            .map(|i| ((i * 37 % 101) as f32) * 0.2 - 10.0)
            .collect();
        let want = {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
        };
        assert!((log_sum_exp(&mut row) - want).abs() < 1e-5, "{want}");
    }
}
