//! A BERT sentence encoder (all-MiniLM-L6-v2 from the assets, Hugging Face layout): token,
//! position and type embeddings, post-LayerNorm encoder layers with exact GELU, mean pooling over
//! the tokens and L2 normalization — what sentence-transformers computes for that model. The
//! Context Router embeds prompts with it.

use std::collections::BTreeMap;
use std::path::Path;

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par};
use rayon::prelude::*;
use s2lc_spectral::LowRankFactors;

use crate::compress::{
    pipeline::{self, Cut},
    whitening_of, CompressError, CompressionReport, Decomposition, MatrixReport, Method,
    RankPolicy,
};
use crate::error::ModelError;
use crate::kernels::ops::{gelu, softmax_prefix};
use crate::source::{read_safetensors_where, Tensor};
use crate::tokenizer::Tokenizer;

/// Longest input in tokens (sentence-transformers' `max_seq_length` for this model); longer
/// texts keep their first tokens.
pub const MAX_TOKENS: usize = 256;

/// `y = x·Wᵀ + b` with `W` stored `out × in` row-major, or, once compressed, as thin factors
/// `y = (x·vsᵀ)·uᵀ + b`.
#[derive(Debug)]
struct Dense {
    w: Vec<f32>,
    b: Vec<f32>,
    out: usize,
    inp: usize,
    low_rank: Option<LowRankFactors>,
}

/// `y = x·bᵀ` for row-major `x` (`n × k`) and `b` (`m × k`), `y` resized to `n × m`.
fn matmul_nt(x: &[f32], b: &[f32], n: usize, k: usize, m: usize, y: &mut Vec<f32>) {
    y.clear();
    y.resize(n * m, 0.0);
    matmul(
        MatMut::from_row_major_slice_mut(y, n, m),
        Accum::Replace,
        MatRef::from_row_major_slice(x, n, k),
        MatRef::from_row_major_slice(b, m, k).transpose(),
        1.0,
        Par::Seq,
    );
}

impl Dense {
    /// `y = x·Wᵀ + b`; a low-rank layer goes through `mid` (`n × rank`, reused scratch).
    fn forward(&self, x: &[f32], n: usize, y: &mut Vec<f32>, mid: &mut Vec<f32>) {
        match &self.low_rank {
            None => matmul_nt(x, &self.w, n, self.inp, self.out, y),
            Some(f) => {
                matmul_nt(x, f.vs_values(), n, self.inp, f.rank(), mid);
                matmul_nt(mid, f.u_values(), n, f.rank(), self.out, y);
            }
        }
        for row in y.chunks_exact_mut(self.out) {
            for (v, b) in row.iter_mut().zip(&self.b) {
                *v += b;
            }
        }
    }

    /// Weight parameters (biases excluded), as stored.
    fn params(&self) -> usize {
        self.low_rank
            .as_ref()
            .map_or(self.out * self.inp, LowRankFactors::params)
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
        low_rank: None,
    })
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

    /// The token ids `embed` reads for `text`: its first [`MAX_TOKENS`], ending with `[SEP]`.
    fn ids(&self, text: &str) -> Result<Vec<u32>, ModelError> {
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
        Ok(ids)
    }

    /// The unit-norm embedding of `text` (its first [`MAX_TOKENS`] tokens).
    pub fn embed(&self, text: &str) -> Result<Vec<f32>, ModelError> {
        let ids = self.ids(text)?;
        let mut x = self.embed_tokens(&ids);
        let mut scratch = Scratch::default();
        for layer in &self.layers {
            self.run_layer(layer, &mut x, ids.len(), &mut scratch, None);
        }
        Ok(self.pool(&x))
    }

    /// [`SentenceEncoder::embed`] of many texts, in parallel.
    pub fn embed_all(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ModelError> {
        texts.par_iter().map(|t| self.embed(t)).collect()
    }

    /// The normalized input embeddings (`n × hidden`) of `ids`.
    fn embed_tokens(&self, ids: &[u32]) -> Vec<f32> {
        let d = self.hidden;
        let mut x = vec![0.0f32; ids.len() * d];
        for (t, (&id, row)) in ids.iter().zip(x.chunks_exact_mut(d)).enumerate() {
            let w = &self.words[id as usize * d..][..d];
            let p = &self.positions[t * d..][..d];
            for (j, v) in row.iter_mut().enumerate() {
                *v = w[j] + p[j] + self.token_type[j];
            }
        }
        self.embed_norm.apply(&mut x);
        x
    }

    /// One encoder layer on the `n × hidden` states `x`, in place. `observe(input, x, n)` sees
    /// each linear input (see [`INPUT_OF`]) before it is used.
    fn run_layer(
        &self,
        layer: &Layer,
        x: &mut Vec<f32>,
        n: usize,
        s: &mut Scratch,
        mut observe: Option<&mut InputObserver<'_>>,
    ) {
        let d = self.hidden;
        let mut seen = |input: usize, v: &[f32]| {
            if let Some(o) = observe.as_deref_mut() {
                o(input, v, n);
            }
        };
        seen(0, x);
        layer.q.forward(x, n, &mut s.q, &mut s.mid);
        layer.k.forward(x, n, &mut s.k, &mut s.mid);
        layer.v.forward(x, n, &mut s.v, &mut s.mid);
        let hd = d / self.heads;
        let scale = 1.0 / (hd as f32).sqrt();
        s.scores.resize(n * n, 0.0);
        s.ctx.resize(n * d, 0.0);
        for h in 0..self.heads {
            let cols = h * hd;
            let qh = MatRef::from_row_major_slice(&s.q, n, d).subcols(cols, hd);
            let kh = MatRef::from_row_major_slice(&s.k, n, d).subcols(cols, hd);
            let vh = MatRef::from_row_major_slice(&s.v, n, d).subcols(cols, hd);
            matmul(
                MatMut::from_row_major_slice_mut(&mut s.scores, n, n),
                Accum::Replace,
                qh,
                kh.transpose(),
                scale,
                Par::Seq,
            );
            for row in s.scores.chunks_exact_mut(n) {
                softmax_prefix(row, n);
            }
            matmul(
                MatMut::from_row_major_slice_mut(&mut s.ctx, n, d).subcols_mut(cols, hd),
                Accum::Replace,
                MatRef::from_row_major_slice(&s.scores, n, n),
                vh,
                1.0,
                Par::Seq,
            );
        }
        seen(1, &s.ctx);
        layer.attn_out.forward(&s.ctx, n, &mut s.tmp, &mut s.mid);
        for (t, xv) in s.tmp.iter_mut().zip(x.iter()) {
            *t += xv;
        }
        layer.attn_norm.apply(&mut s.tmp);
        seen(2, &s.tmp);
        layer.up.forward(&s.tmp, n, &mut s.up, &mut s.mid);
        gelu(&mut s.up);
        seen(3, &s.up);
        layer.down.forward(&s.up, n, x, &mut s.mid);
        for (xv, t) in x.iter_mut().zip(&s.tmp) {
            *xv += t;
        }
        layer.out_norm.apply(x);
    }

    /// Mean over the tokens, then unit norm.
    fn pool(&self, x: &[f32]) -> Vec<f32> {
        let mut e = vec![0.0f32; self.hidden];
        for row in x.chunks_exact(self.hidden) {
            for (a, b) in e.iter_mut().zip(row) {
                *a += b;
            }
        }
        let norm = e.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        e.iter_mut().for_each(|v| *v /= norm);
        e
    }
}

/// Buffers reused across the layers of one forward pass.
#[derive(Default)]
struct Scratch {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    ctx: Vec<f32>,
    tmp: Vec<f32>,
    up: Vec<f32>,
    scores: Vec<f32>,
    /// The `n × rank` intermediate of a low-rank layer.
    mid: Vec<f32>,
}

/// The six linears of a layer in [`Layer::linears`] order: their names under
/// `encoder.layer.N.` and the input each reads (0: hidden states, 1: attention context,
/// 2: attention output after its norm, 3: GELU of the intermediate).
const LINEARS: [(&str, usize); 6] = [
    ("attention.self.query", 0),
    ("attention.self.key", 0),
    ("attention.self.value", 0),
    ("attention.output.dense", 1),
    ("intermediate.dense", 2),
    ("output.dense", 3),
];

/// The number of distinct linear inputs in a layer (see [`LINEARS`]).
const INPUTS: usize = 4;

impl Layer {
    fn linears(&self) -> [&Dense; 6] {
        [
            &self.q,
            &self.k,
            &self.v,
            &self.attn_out,
            &self.up,
            &self.down,
        ]
    }

    fn linears_mut(&mut self) -> [&mut Dense; 6] {
        [
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.attn_out,
            &mut self.up,
            &mut self.down,
        ]
    }
}

impl Dense {
    /// The `out × in` weight (the product `u·vs` once compressed).
    fn weight(&self) -> Mat<f32> {
        match &self.low_rank {
            None => MatRef::from_row_major_slice(&self.w, self.out, self.inp).to_owned(),
            Some(f) => f.to_dense(),
        }
    }
}

/// Sees a linear input: `(input kind, n × width values, n)`.
type InputObserver<'a> = dyn FnMut(usize, &[f32], usize) + 'a;

/// Calibration states: each text's `n × hidden` hidden states and its token count.
type Streams = Vec<(Vec<f32>, usize)>;

impl SentenceEncoder {
    /// Parameters of the linear layers' weights (biases excluded), as stored.
    pub fn linear_params(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| l.linears().map(Dense::params))
            .sum()
    }

    /// Replaces the encoder's linear layers by thin factors, as [`crate::compress::compress`]
    /// does for a decoder (the same pipeline): plain or whitened SVD, ranks by energy or a global
    /// parameter budget. `calibration` texts (required for `Whitened`) give the Gram matrices of
    /// each layer's inputs; with `sequential` each layer sees the states of the
    /// already-compressed layers before it. A matrix whose rank reaches break-even stays dense.
    pub fn compress(
        &mut self,
        policy: RankPolicy,
        method: Method,
        sequential: bool,
        calibration: &[&str],
    ) -> Result<CompressionReport, CompressError> {
        let mut encoder = Compression {
            encoder: self,
            calibration,
        };
        pipeline::run(&mut encoder, policy, method, sequential, |_, _| {})
    }

    /// Runs layer `li` on every stream in place (in parallel); with `collect`, returns the Gram
    /// matrices `XᵀX` of the layer's [`INPUTS`] linear inputs over all streams.
    fn advance(&self, li: usize, streams: &mut Streams, collect: bool) -> Option<Vec<Mat<f32>>> {
        let layer = &self.layers[li];
        let widths: [usize; INPUTS] = [
            layer.q.inp,
            layer.attn_out.inp,
            layer.up.inp,
            layer.down.inp,
        ];
        let zeros = || -> Vec<Mat<f32>> { widths.iter().map(|&w| Mat::zeros(w, w)).collect() };
        let grams = streams
            .par_iter_mut()
            .fold(
                || (collect.then(zeros), Scratch::default()),
                |(mut grams, mut scratch), (x, n)| {
                    let mut add = |input: usize, v: &[f32], n: usize| {
                        if let Some(g) = grams.as_mut() {
                            let xv = MatRef::from_row_major_slice(v, n, widths[input]);
                            matmul(
                                g[input].as_mut(),
                                Accum::Add,
                                xv.transpose(),
                                xv,
                                1.0,
                                Par::Seq,
                            );
                        }
                    };
                    self.run_layer(layer, x, *n, &mut scratch, Some(&mut add));
                    (grams, scratch)
                },
            )
            .map(|(g, _)| g)
            .reduce(
                || collect.then(zeros),
                |a, b| match (a, b) {
                    (Some(mut a), Some(b)) => {
                        for (x, y) in a.iter_mut().zip(&b) {
                            *x += y;
                        }
                        Some(a)
                    }
                    (a, b) => a.or(b),
                },
            );
        grams
    }

    /// The decompositions of layer `li`'s linears, whitened by `grams` when given.
    fn decompose_layer(
        &self,
        li: usize,
        grams: Option<&Vec<Mat<f32>>>,
    ) -> Result<Vec<Option<Decomposition>>, CompressError> {
        let name = |i: usize| format!("encoder.layer.{li}.{}", LINEARS[i].0);
        let whitenings = match grams {
            Some(g) => (0..INPUTS)
                .map(|input| {
                    let first = LINEARS.iter().position(|l| l.1 == input).unwrap_or(0);
                    whitening_of(&name(first), &g[input]).map(Some)
                })
                .collect::<Result<Vec<_>, _>>()?,
            None => vec![None; INPUTS],
        };
        let linears = self.layers[li].linears();
        (0..6)
            .into_par_iter()
            .map(|i| {
                let w = linears[i].weight();
                Decomposition::new(&name(i), w.as_ref(), whitenings[LINEARS[i].1].clone()).map(Some)
            })
            .collect()
    }

    /// Cuts the linear `cut` names to its rank (or leaves it as it is when that does not shrink
    /// it) and reports it.
    fn apply(&mut self, cut: Cut<'_>) -> MatrixReport {
        let Cut {
            layer: li,
            index: i,
            dec,
            rank,
        } = cut;
        let name = format!("encoder.layer.{li}.{}", LINEARS[i].0);
        let dense = self.layers[li].linears_mut().into_iter().nth(i);
        let dense = dense.expect("a layer has six linears");
        let (report, factors) = dec.truncate(name, dense.out, dense.inp, rank);
        if factors.is_some() {
            dense.low_rank = factors;
            dense.w = Vec::new();
        }
        report
    }
}

/// The encoder as [`pipeline::run`] compresses it: layer by layer, calibration texts as
/// hidden states.
struct Compression<'a, 'b> {
    encoder: &'a mut SentenceEncoder,
    calibration: &'a [&'b str],
}

impl pipeline::Layered for Compression<'_, '_> {
    type Streams = Streams;
    type Grams = Vec<Mat<f32>>;

    fn n_layers(&self) -> usize {
        self.encoder.layers.len()
    }

    fn per_layer(&self) -> usize {
        LINEARS.len()
    }

    fn shapes(&self) -> Vec<(usize, usize)> {
        self.encoder
            .layers
            .iter()
            .flat_map(|l| l.linears().map(|d| (d.out, d.inp)))
            .collect()
    }

    fn linear_params(&self) -> usize {
        self.encoder.linear_params()
    }

    fn has_calibration(&self) -> bool {
        !self.calibration.is_empty()
    }

    fn streams(&self) -> Result<(Streams, usize), CompressError> {
        let mut streams = Vec::with_capacity(self.calibration.len());
        for text in self.calibration {
            let ids = self.encoder.ids(text)?;
            streams.push((self.encoder.embed_tokens(&ids), ids.len()));
        }
        let tokens = streams.iter().map(|s| s.1).sum();
        Ok((streams, tokens))
    }

    fn advance(
        &self,
        layer: usize,
        streams: &mut Streams,
        collect: bool,
    ) -> Result<Option<Vec<Mat<f32>>>, CompressError> {
        Ok(self.encoder.advance(layer, streams, collect))
    }

    fn decompose(
        &self,
        layer: usize,
        grams: Option<&Vec<Mat<f32>>>,
    ) -> Result<Vec<Option<Decomposition>>, CompressError> {
        self.encoder.decompose_layer(layer, grams)
    }

    fn apply(&mut self, cut: Cut<'_>) -> Result<MatrixReport, CompressError> {
        Ok(self.encoder.apply(cut))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use s2lc_spectral::row_major;

    #[test]
    fn low_rank_dense_runs_its_factors() {
        // A 5×7 layer of rank 2 and its factors give the same outputs and bias.
        let (out, inp, rank, n) = (5, 7, 2, 3);
        let val = |i: usize| ((i * 37 % 11) as f32 - 5.0) / 7.0;
        let u: Vec<f32> = (0..out * rank).map(val).collect();
        let vs: Vec<f32> = (0..rank * inp).map(|i| val(i + 3)).collect();
        let b: Vec<f32> = (0..out).map(|i| i as f32).collect();
        let mut low = Dense {
            w: Vec::new(),
            b: b.clone(),
            out,
            inp,
            low_rank: Some(LowRankFactors::from_row_major(out, rank, inp, u, vs)),
        };
        let dense = Dense {
            w: row_major(low.weight().as_ref()),
            b,
            out,
            inp,
            low_rank: None,
        };
        assert_eq!((low.params(), dense.params()), (24, 35));
        let x: Vec<f32> = (0..n * inp).map(|i| val(i + 5)).collect();
        let (mut y1, mut y2) = (Vec::new(), Vec::new());
        low.forward(&x, n, &mut y1, &mut Vec::new());
        dense.forward(&x, n, &mut y2, &mut Vec::new());
        assert_eq!(y1.len(), n * out);
        for (a, b) in y1.iter().zip(&y2) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        low.low_rank = None;
        low.w = dense.w.clone();
        low.forward(&x, n, &mut y1, &mut Vec::new());
        assert_eq!(y1, y2);
    }
}
