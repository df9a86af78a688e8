//! Decode and prefill timers: the measurements behind every tok/s figure the benches and
//! `s2lc eval` report, in one place so each figure means the same thing everywhere.
//!
//! All timers decode greedily (no sampling cost in the figure) and time only forward passes.

use std::time::Instant;

use crate::error::ModelError;
use crate::generate::{argmax, generate, Sampler, SamplingParams};
use crate::kv::KvCache;
use crate::llama::{BatchRow, ForwardScratch, LlamaModel, Profile};

/// One run of [`prefill_and_decode`].
#[derive(Clone, Debug, Default)]
pub struct PrefillDecode {
    /// Prompt tokens per second of the one-pass prefill.
    pub prefill: f64,
    /// Tokens per second of the greedy decode.
    pub decode: f64,
    /// Where the decode steps spent their time (when asked for).
    pub profile: Option<Profile>,
}

/// One timed prefill of `prompt`, then, on a fresh cache (as llama-bench's `tg` test does), a
/// greedy decode of `new_tokens` after `context` prompt tokens (at least 1); with `profile`, where
/// the decode steps spent their time (the stopwatch calls then weigh on the figure).
pub fn prefill_and_decode(
    model: &LlamaModel,
    prompt: &[u32],
    context: usize,
    new_tokens: usize,
    scratch: &mut ForwardScratch,
    profile: bool,
) -> Result<PrefillDecode, ModelError> {
    if prompt.is_empty() {
        return Err(ModelError::EmptyInput(
            "the timing prompt has no tokens".into(),
        ));
    }
    let mut cache = model.dense_cache(prompt.len().max(context + 1) + new_tokens);
    let mut logits = Vec::new();
    let t = Instant::now();
    model.forward_last(prompt, &mut cache, scratch, &mut logits)?;
    let prefill = prompt.len() as f64 / t.elapsed().as_secs_f64();
    cache.clear();
    let start = &prompt[..context.clamp(1, prompt.len())];
    model.forward_last(start, &mut cache, scratch, &mut logits)?;
    scratch.profile = profile.then(Profile::default);
    let t = Instant::now();
    for _ in 0..new_tokens {
        let next = argmax(&logits);
        model.forward_last(&[next], &mut cache, scratch, &mut logits)?;
    }
    let decode = new_tokens as f64 / t.elapsed().as_secs_f64();
    Ok(PrefillDecode {
        prefill,
        decode,
        profile: scratch.profile.take(),
    })
}

/// Aggregate tok/s of `n` sequences decoding `new_tokens` greedy tokens together (one batched
/// forward pass per step, as the server batches requests) after `prompt` each; best of `runs`.
pub fn batched_decode(
    model: &LlamaModel,
    prompt: &[u32],
    n: usize,
    new_tokens: usize,
    runs: usize,
    scratch: &mut ForwardScratch,
) -> Result<f64, ModelError> {
    let mut best = 0.0f64;
    let mut logits = Vec::new();
    for _ in 0..runs.max(1) {
        let mut caches = Vec::with_capacity(n);
        let mut next = Vec::with_capacity(n);
        for _ in 0..n {
            let mut cache = model.dense_cache(prompt.len() + new_tokens + 1);
            model.forward_last(prompt, &mut cache, scratch, &mut logits)?;
            next.push(argmax(&logits));
            caches.push(cache);
        }
        let vocab = model.config().vocab_size;
        let t = Instant::now();
        for _ in 0..new_tokens {
            let mut rows: Vec<BatchRow<'_>> = caches
                .iter_mut()
                .zip(&next)
                .map(|(cache, &token)| BatchRow {
                    token,
                    cache,
                    adapter: None,
                })
                .collect();
            model.decode_batch(&mut rows, scratch, &mut logits)?;
            for (i, t) in next.iter_mut().enumerate() {
                *t = argmax(&logits[i * vocab..(i + 1) * vocab]);
            }
        }
        best = best.max((n * new_tokens) as f64 / t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Greedy decode speed (tokens/s after the first) generating `generated` tokens from the first
/// 64 of `tokens`: what `eval` and `bench compress-sweep` report as decode speed.
pub fn decode_speed(
    model: &LlamaModel,
    tokens: &[u32],
    generated: usize,
) -> Result<f64, ModelError> {
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

/// Greedy decode speed of `n` steps on a cache already holding `tokens` as context (the first
/// step, which repeats the last token of `tokens` to get logits, is not timed): decode speed at a
/// long context through any KV cache (`eval --kv`, `bench kv`).
pub fn decode_after(
    model: &LlamaModel,
    cache: &mut dyn KvCache,
    tokens: &[u32],
    n: usize,
) -> Result<f64, ModelError> {
    let mut scratch = ForwardScratch::default();
    let mut logits = Vec::new();
    let last = *tokens
        .last()
        .ok_or_else(|| ModelError::EmptyInput("no context tokens to decode after".into()))?;
    model.forward_last(&[last], cache, &mut scratch, &mut logits)?;
    let t = Instant::now();
    for _ in 0..n {
        let next = argmax(&logits);
        model.forward_last(&[next], cache, &mut scratch, &mut logits)?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Bytes of a dense KV cache of `tokens` tokens with `bytes_per_value`-byte keys and values: the
/// baseline the compressed caches are compared with.
pub fn dense_kv_bytes(model: &LlamaModel, tokens: usize, bytes_per_value: usize) -> usize {
    2 * model.config().n_layers * tokens * model.attn_shape().kv_dim() * bytes_per_value
}
