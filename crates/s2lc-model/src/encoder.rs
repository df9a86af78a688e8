//! A BERT sentence encoder (all-MiniLM-L6-v2 from the assets, Hugging Face layout): token,
//! position and type embeddings, post-LayerNorm encoder layers with exact GELU, mean pooling over
//! the tokens and L2 normalization — what sentence-transformers computes for that model. The
//! Context Router embeds prompts with it.

use std::collections::BTreeMap;
use std::path::Path;

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::error::ModelError;
use crate::source::{read_safetensors_where, Tensor};
use crate::tokenizer::Tokenizer;

/// Longest input in tokens (sentence-transformers' `max_seq_length` for this model); longer
/// texts keep their first tokens.
pub const MAX_TOKENS: usize = 256;

/// `y = x·Wᵀ + b` with `W` stored `out × in` row-major.
#[derive(Debug)]
struct Dense {
    w: Vec<f32>,
    b: Vec<f32>,
    out: usize,
    inp: usize,
}

impl Dense {
    fn forward(&self, x: &[f32], n: usize, y: &mut Vec<f32>) {
        y.clear();
        y.resize(n * self.out, 0.0);
        matmul(
            MatMut::from_row_major_slice_mut(y, n, self.out),
            Accum::Replace,
            MatRef::from_row_major_slice(x, n, self.inp),
            MatRef::from_row_major_slice(&self.w, self.out, self.inp).transpose(),
            1.0,
            Par::Seq,
        );
        for row in y.chunks_exact_mut(self.out) {
            for (v, b) in row.iter_mut().zip(&self.b) {
                *v += b;
            }
        }
    }
}

#[derive(Debug)]
struct LayerNorm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
}

impl LayerNorm {
    fn apply(&self, x: &mut [f32]) {
        let d = self.gamma.len();
        for row in x.chunks_exact_mut(d) {
            let mean = row.iter().sum::<f32>() / d as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            let inv = 1.0 / (var + self.eps).sqrt();
            for ((v, g), b) in row.iter_mut().zip(&self.gamma).zip(&self.beta) {
                *v = (*v - mean) * inv * g + b;
            }
        }
    }
}

#[derive(Debug)]
struct Layer {
    q: Dense,
    k: Dense,
    v: Dense,
    attn_out: Dense,
    attn_norm: LayerNorm,
    up: Dense,
    down: Dense,
    out_norm: LayerNorm,
}

/// The encoder and its tokenizer.
#[derive(Debug)]
pub struct SentenceEncoder {
    tokenizer: Tokenizer,
    words: Vec<f32>,
    positions: Vec<f32>,
    token_type: Vec<f32>,
    embed_norm: LayerNorm,
    layers: Vec<Layer>,
    hidden: usize,
    heads: usize,
    max_positions: usize,
}

/// Removes tensor `name` (optionally under a `bert.` prefix), checking its shape.
fn take(
    tensors: &mut BTreeMap<String, Tensor>,
    name: &str,
    shape: &[usize],
) -> Result<Vec<f32>, ModelError> {
    let t = tensors
        .remove(name)
        .or_else(|| tensors.remove(&format!("bert.{name}")))
        .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
    if t.shape != shape {
        return Err(ModelError::InvalidConfig(format!(
            "{name} is {:?}, expected {shape:?}",
            t.shape
        )));
    }
    Ok(t.data)
}

/// The linear layer `name` (`out × in` weight and bias).
fn dense(
    tensors: &mut BTreeMap<String, Tensor>,
    name: &str,
    out: usize,
    inp: usize,
) -> Result<Dense, ModelError> {
    Ok(Dense {
        w: take(tensors, &format!("{name}.weight"), &[out, inp])?,
        b: take(tensors, &format!("{name}.bias"), &[out])?,
        out,
        inp,
    })
}

/// `erf` (Abramowitz & Stegun 7.1.26, absolute error ≤ 1.5e-7): std has none.
fn erf(x: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    let y = 1.0 - poly * (-x * x).exp();
    y.copysign(x)
}

/// BERT's exact GELU, `x·Φ(x)`.
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

impl SentenceEncoder {
    /// Loads `config.json`, `model.safetensors` and `tokenizer.json` from a BERT model directory.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
        let cfg: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::InvalidConfig(format!("{}: {e}", cfg_path.display())))?;
        let get = |k: &str| {
            cfg[k].as_u64().map(|v| v as usize).ok_or_else(|| {
                ModelError::InvalidConfig(format!("{}: no integer '{k}'", cfg_path.display()))
            })
        };
        if cfg["model_type"].as_str() != Some("bert") {
            return Err(ModelError::InvalidConfig(format!(
                "{}: model_type is {}, not bert",
                cfg_path.display(),
                cfg["model_type"]
            )));
        }
        let (hidden, heads, n_layers) = (
            get("hidden_size")?,
            get("num_attention_heads")?,
            get("num_hidden_layers")?,
        );
        if heads == 0 || hidden % heads != 0 {
            return Err(ModelError::InvalidConfig(format!(
                "{}: {heads} heads do not divide hidden size {hidden}",
                cfg_path.display()
            )));
        }
        let eps = cfg["layer_norm_eps"].as_f64().unwrap_or(1e-12) as f32;
        // `position_ids` is an integer buffer the forward pass does not need.
        let mut tensors = read_safetensors_where(&dir.join("model.safetensors"), |n| {
            !n.ends_with("position_ids")
        })?;
        let t = &mut tensors;
        let inter = get("intermediate_size")?;
        let vocab = get("vocab_size")?;
        let max_positions = get("max_position_embeddings")?;
        let types = get("type_vocab_size")?;
        let mut layers = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let p = format!("encoder.layer.{i}");
            layers.push(Layer {
                q: dense(t, &format!("{p}.attention.self.query"), hidden, hidden)?,
                k: dense(t, &format!("{p}.attention.self.key"), hidden, hidden)?,
                v: dense(t, &format!("{p}.attention.self.value"), hidden, hidden)?,
                attn_out: dense(t, &format!("{p}.attention.output.dense"), hidden, hidden)?,
                attn_norm: LayerNorm {
                    gamma: take(
                        t,
                        &format!("{p}.attention.output.LayerNorm.weight"),
                        &[hidden],
                    )?,
                    beta: take(
                        t,
                        &format!("{p}.attention.output.LayerNorm.bias"),
                        &[hidden],
                    )?,
                    eps,
                },
                up: dense(t, &format!("{p}.intermediate.dense"), inter, hidden)?,
                down: dense(t, &format!("{p}.output.dense"), hidden, inter)?,
                out_norm: LayerNorm {
                    gamma: take(t, &format!("{p}.output.LayerNorm.weight"), &[hidden])?,
                    beta: take(t, &format!("{p}.output.LayerNorm.bias"), &[hidden])?,
                    eps,
                },
            });
        }
        Ok(SentenceEncoder {
            tokenizer: Tokenizer::from_file(&dir.join("tokenizer.json"))?,
            words: take(t, "embeddings.word_embeddings.weight", &[vocab, hidden])?,
            positions: take(
                t,
                "embeddings.position_embeddings.weight",
                &[max_positions, hidden],
            )?,
            token_type: take(
                t,
                "embeddings.token_type_embeddings.weight",
                &[types, hidden],
            )?,
            embed_norm: LayerNorm {
                gamma: take(t, "embeddings.LayerNorm.weight", &[hidden])?,
                beta: take(t, "embeddings.LayerNorm.bias", &[hidden])?,
                eps,
            },
            layers,
            hidden,
            heads,
            max_positions,
        })
    }

    /// Embedding width.
    pub fn dim(&self) -> usize {
        self.hidden
    }

    /// The unit-norm embedding of `text` (its first [`MAX_TOKENS`] tokens).
    pub fn embed(&self, text: &str) -> Result<Vec<f32>, ModelError> {
        let mut ids = self.tokenizer.encode(text, true)?;
        let limit = MAX_TOKENS.min(self.max_positions);
        if ids.len() > limit {
            // Keep [CLS] and the first tokens, end with the final [SEP] as truncation does.
            let sep = ids[ids.len() - 1];
            ids.truncate(limit - 1);
            ids.push(sep);
        }
        let vocab = self.words.len() / self.hidden;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(ModelError::InvalidConfig(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        Ok(self.forward(&ids))
    }

    /// [`SentenceEncoder::embed`] of many texts, in parallel.
    pub fn embed_all(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ModelError> {
        texts.par_iter().map(|t| self.embed(t)).collect()
    }

    fn forward(&self, ids: &[u32]) -> Vec<f32> {
        let (n, d) = (ids.len(), self.hidden);
        let mut x = vec![0.0f32; n * d];
        for (t, (&id, row)) in ids.iter().zip(x.chunks_exact_mut(d)).enumerate() {
            let w = &self.words[id as usize * d..][..d];
            let p = &self.positions[t * d..][..d];
            for (j, v) in row.iter_mut().enumerate() {
                *v = w[j] + p[j] + self.token_type[j];
            }
        }
        self.embed_norm.apply(&mut x);
        let (mut q, mut k, mut v, mut ctx, mut tmp, mut up) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            vec![0.0; n * d],
            Vec::new(),
            Vec::new(),
        );
        let hd = d / self.heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut scores = vec![0.0f32; n * n];
        for layer in &self.layers {
            layer.q.forward(&x, n, &mut q);
            layer.k.forward(&x, n, &mut k);
            layer.v.forward(&x, n, &mut v);
            for h in 0..self.heads {
                let cols = h * hd;
                let qh = MatRef::from_row_major_slice(&q, n, d).subcols(cols, hd);
                let kh = MatRef::from_row_major_slice(&k, n, d).subcols(cols, hd);
                let vh = MatRef::from_row_major_slice(&v, n, d).subcols(cols, hd);
                matmul(
                    MatMut::from_row_major_slice_mut(&mut scores, n, n),
                    Accum::Replace,
                    qh,
                    kh.transpose(),
                    scale,
                    Par::Seq,
                );
                for row in scores.chunks_exact_mut(n) {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0;
                    for s in row.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    for s in row.iter_mut() {
                        *s /= sum;
                    }
                }
                matmul(
                    MatMut::from_row_major_slice_mut(&mut ctx, n, d).subcols_mut(cols, hd),
                    Accum::Replace,
                    MatRef::from_row_major_slice(&scores, n, n),
                    vh,
                    1.0,
                    Par::Seq,
                );
            }
            layer.attn_out.forward(&ctx, n, &mut tmp);
            for (t, xv) in tmp.iter_mut().zip(&x) {
                *t += xv;
            }
            layer.attn_norm.apply(&mut tmp);
            layer.up.forward(&tmp, n, &mut up);
            up.iter_mut().for_each(|u| *u = gelu(*u));
            layer.down.forward(&up, n, &mut x);
            for (xv, t) in x.iter_mut().zip(&tmp) {
                *xv += t;
            }
            layer.out_norm.apply(&mut x);
        }
        // Mean over the tokens, then unit norm.
        let mut e = vec![0.0f32; d];
        for row in x.chunks_exact(d) {
            for (a, b) in e.iter_mut().zip(row) {
                *a += b;
            }
        }
        let norm = e.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        e.iter_mut().for_each(|v| *v /= norm);
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        for (x, want) in [
            (0.0f32, 0.0f32),
            (0.5, 0.520_499_9),
            (1.0, 0.842_700_8),
            (-1.0, -0.842_700_8),
            (2.5, 0.999_593),
        ] {
            assert!((erf(x) - want).abs() < 2e-7, "erf({x}) = {}", erf(x));
        }
        assert!((gelu(1.0) - 0.841_344_7).abs() < 1e-6);
    }
}
