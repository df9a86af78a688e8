//! Token sampling and the generation loop.

use std::time::{Duration, Instant};

use crate::error::ModelError;
use crate::kv::KvCache;
use crate::llama::{ForwardScratch, LlamaModel};
use s2lc_spectral::rng::SplitMix64;

/// The smallest temperature that samples: below it a sampler is greedy. At `t → 0` the
/// scaled logits `(l − max)/t` overflow (`1/t` is infinite below ~3e-39, and `0·∞` is NaN), while
/// already at `t = 1e-3` every token more than 0.05 nats behind the best has odds below e⁻⁵⁰.
pub const MIN_TEMPERATURE: f32 = 1e-3;

/// How the next token is picked from the logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; below [`MIN_TEMPERATURE`] (0 included) sampling is greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    /// Seed of the sampler's random stream; the same seed gives the same text.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Picks tokens from logits: greedy, or temperature + top-p sampling from a seeded stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
    candidates: Vec<(f32, u32)>,
}

impl Sampler {
    /// A sampler with its random stream at the start of `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        Sampler {
            params,
            rng: SplitMix64::new(params.seed),
            candidates: Vec::new(),
        }
    }

    /// A uniform draw in [0, 1) from SplitMix64 (small, fast, and reproducible across platforms).
    fn next_uniform(&mut self) -> f64 {
        self.rng.unit_f64()
    }

    /// Chooses the next token id from `logits` (one value per vocabulary entry).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature.is_nan() || self.params.temperature < MIN_TEMPERATURE {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        self.candidates.clear();
        self.candidates.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (((l - max) * inv_t).exp(), i as u32)),
        );
        let total: f32 = self.candidates.iter().map(|c| c.0).sum();
        let mut keep = self.candidates.len();
        if self.params.top_p < 1.0 {
            let order = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
            let target = self.params.top_p.max(0.0) * total;
            // The nucleus is usually a few hundred of the 49k tokens: bring the `k` most likely
            // to the front (linear time), sort only those, and widen `k` until they reach the
            // target. The order is total, so the prefix is the one a full sort would give.
            let n = self.candidates.len();
            let mut k = 256.min(n);
            loop {
                if k < n {
                    self.candidates.select_nth_unstable_by(k - 1, order);
                }
                self.candidates[..k].sort_unstable_by(order);
                let mut acc = 0.0;
                let reached = self.candidates[..k].iter().position(|c| {
                    acc += c.0;
                    acc >= target
                });
                if let Some(i) = reached {
                    keep = i + 1;
                    break;
                }
                if k == n {
                    break;
                }
                k = (4 * k).min(n);
            }
        }
        let u = self.next_uniform() as f32;
        let kept = &self.candidates[..keep];
        let mass: f32 = kept.iter().map(|c| c.0).sum();
        let mut r = u * mass;
        for c in kept {
            if r < c.0 {
                return c.1;
            }
            r -= c.0;
        }
        kept[keep - 1].1
    }
}

/// Index of the largest value (the first one on ties).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Timings of one generation.
#[derive(Debug, Clone, Default)]
pub struct GenerationStats {
    /// Prompt tokens run in the prefill.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub generated: Vec<u32>,
    /// Wall time of the prefill (including the first sampled token).
    pub prefill: Duration,
    /// Wall time of the decode steps after the first token.
    pub decode: Duration,
}

impl GenerationStats {
    /// Prompt tokens per second.
    pub fn prefill_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill.as_secs_f64().max(1e-9)
    }

    /// Generated tokens per second, excluding the first (which the prefill produced).
    pub fn decode_tok_s(&self) -> f64 {
        self.generated.len().saturating_sub(1) as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// Generates up to `max_tokens` after `prompt`, stopping early at any id in `stop`.
///
/// `on_token` sees each new id as it is produced and may return `false` to stop.
pub fn generate(
    model: &LlamaModel,
    cache: &mut dyn KvCache,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &mut Sampler,
    stop: &[u32],
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<GenerationStats, ModelError> {
    if prompt.is_empty() {
        return Err(ModelError::EmptyInput("the prompt has no tokens".into()));
    }
    let mut stats = GenerationStats {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };
    if max_tokens == 0 {
        return Ok(stats);
    }
    let mut scratch = ForwardScratch::default();
    let mut logits = Vec::new();
    let start = Instant::now();
    model.forward_last(prompt, cache, &mut scratch, &mut logits)?;
    let mut next = sampler.sample(&logits);
    stats.prefill = start.elapsed();
    let start = Instant::now();
    loop {
        stats.generated.push(next);
        if stop.contains(&next) || !on_token(next) || stats.generated.len() >= max_tokens {
            break;
        }
        model.forward_last(&[next], cache, &mut scratch, &mut logits)?;
        next = sampler.sample(&logits);
    }
    stats.decode = start.elapsed();
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 2.0, -1.0, 2.0]), 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_follows_probabilities() {
        let logits = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            seed: 42,
        };
        let draw = |p: SamplingParams| {
            let mut s = Sampler::new(p);
            (0..4000).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        let a = draw(params);
        assert_eq!(a, draw(params));
        assert_ne!(a, draw(SamplingParams { seed: 7, ..params }));
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / a.len() as f64;
        assert!((ones - 0.75).abs() < 0.03, "p(1) = {ones}");
        assert!(!a.contains(&2));
    }

    #[test]
    fn temperatures_below_the_minimum_are_greedy_not_nan() {
        let logits = [0.5f32, 2.0, 1.9, -3.0];
        for t in [1e-45f32, f32::MIN_POSITIVE, 1e-4, MIN_TEMPERATURE / 2.0] {
            let mut s = Sampler::new(SamplingParams {
                temperature: t,
                top_p: 0.9,
                seed: 5,
            });
            assert!((0..50).all(|_| s.sample(&logits) == 1), "t = {t}");
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // Probabilities 0.6, 0.3, 0.1: top_p 0.5 keeps only the first.
        let logits = [0.6f32.ln(), 0.3f32.ln(), 0.1f32.ln()];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: 1,
        });
        assert!((0..500).all(|_| s.sample(&logits) == 0));
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.85,
            seed: 1,
        });
        let draws: Vec<u32> = (0..2000).map(|_| s.sample(&logits)).collect();
        assert!(draws.contains(&1) && !draws.contains(&2));
    }

    #[test]
    fn top_p_on_a_large_vocabulary_keeps_exactly_the_nucleus() {
        // 5000 logits with ties, peaked and flat: the partial selection must keep the same
        // tokens a full sort keeps, i.e. never draw outside the nucleus and reach every member.
        for spread in [0.5f32, 40.0] {
            let logits: Vec<f32> = (0..5000)
                .map(|i| ((i * 7919 % 997) as f32 / 997.0 * spread).floor() * 1.5)
                .collect();
            let top_p = 0.6;
            let mut probs: Vec<(f32, u32)> = logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (l.exp(), i as u32))
                .collect();
            probs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let total: f32 = probs.iter().map(|p| p.0).sum();
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    acc += p.0;
                    acc >= top_p * total
                })
                .unwrap()
                + 1;
            let nucleus: std::collections::HashSet<u32> =
                probs[..keep].iter().map(|p| p.1).collect();
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.0,
                top_p,
                seed: 3,
            });
            let draws: std::collections::HashSet<u32> = (0..(20 * keep).min(3000))
                .map(|_| s.sample(&logits))
                .collect();
            assert!(draws.is_subset(&nucleus), "spread {spread}: drew outside");
            if spread > 1.0 {
                // Peaked: a nucleus of about a hundred tokens, every one drawn.
                assert!(keep < 150, "{keep}");
                assert_eq!(draws, nucleus, "spread {spread}: {keep} kept");
            }
        }
    }
}
