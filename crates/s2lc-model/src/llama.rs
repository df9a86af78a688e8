//! The Llama-family decoder (Llama, SmolLM2, Qwen2): RMSNorm, rotary position embedding,
//! grouped-query attention, SwiGLU feed-forward, optionally tied embeddings.
//!
//! The model is immutable (`&self`); per-sequence state lives in a [`KvCache`] and reusable buffers
//! in a [`ForwardScratch`], so a decode loop allocates nothing after its first step.

use faer::Accum;

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::kernels::dot::QuantizedActs;
use crate::kernels::{WeightFormat, WeightMatrix};
use crate::kv::{AttnShape, DenseKvCache, KvCache};
use crate::linear::{DenseLinear, Linear, LinearScratch, LowRankLinear};
use crate::lora::{LoraAdapter, LoraDelta};
use crate::source::{Tensor, WeightStorage, Weights};

pub use crate::kernels::ops::rms_norm;

/// Rotary position embedding in the Hugging Face "rotate half" layout: within each head of width
/// `hd`, element `i < hd/2` pairs with `i + hd/2` and the pair rotates by `pos · base^(-2i/hd)`.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f64>,
    head_dim: usize,
}

impl Rope {
    /// Frequencies for heads of width `head_dim` (even) and base `theta`.
    pub fn new(head_dim: usize, theta: f32) -> Self {
        let half = head_dim / 2;
        let inv_freq = (0..half)
            .map(|i| 1.0 / (theta as f64).powf(2.0 * i as f64 / head_dim as f64))
            .collect();
        Rope { inv_freq, head_dim }
    }

    /// Fills `cos`/`sin` (`n × hd/2`) for positions `p0..p0+n`.
    pub fn tables(&self, p0: usize, n: usize, cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
        self.tables_at(p0..p0 + n, cos, sin);
    }

    /// Fills `cos`/`sin` (one row of `hd/2` per position) for arbitrary positions (one per
    /// sequence of a batch).
    pub fn tables_at(
        &self,
        positions: impl ExactSizeIterator<Item = usize>,
        cos: &mut Vec<f32>,
        sin: &mut Vec<f32>,
    ) {
        let half = self.head_dim / 2;
        let n = positions.len();
        cos.resize(n * half, 0.0);
        sin.resize(n * half, 0.0);
        for (t, pos) in positions.enumerate() {
            let pos = pos as f64;
            for (i, f) in self.inv_freq.iter().enumerate() {
                let (s, c) = (pos * f).sin_cos();
                cos[t * half + i] = c as f32;
                sin[t * half + i] = s as f32;
            }
        }
    }

    /// Rotates every head of the `n × width` row-major `x` (width a multiple of `hd`) in place.
    pub fn apply(&self, x: &mut [f32], width: usize, cos: &[f32], sin: &[f32]) {
        let hd = self.head_dim;
        let half = hd / 2;
        for (t, row) in x.chunks_exact_mut(width).enumerate() {
            let (c, s) = (&cos[t * half..][..half], &sin[t * half..][..half]);
            for head in row.chunks_exact_mut(hd) {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x0, x1) = (a[i], b[i]);
                    a[i] = x0 * c[i] - x1 * s[i];
                    b[i] = x1 * c[i] + x0 * s[i];
                }
            }
        }
    }
}

/// One decoder block.
#[derive(Debug, Clone)]
pub struct Block {
    /// RMSNorm before attention.
    pub attn_norm: Vec<f32>,
    /// Query projection (`q_dim × d`).
    pub q_proj: Linear,
    /// Key projection (`kv_dim × d`).
    pub k_proj: Linear,
    /// Value projection (`kv_dim × d`).
    pub v_proj: Linear,
    /// Output projection (`d × q_dim`).
    pub o_proj: Linear,
    /// RMSNorm before the feed-forward.
    pub ffn_norm: Vec<f32>,
    /// SwiGLU gate (`ffn × d`).
    pub gate_proj: Linear,
    /// SwiGLU up (`ffn × d`).
    pub up_proj: Linear,
    /// SwiGLU down (`d × ffn`).
    pub down_proj: Linear,
    /// Unmerged LoRA deltas per linear layer, in [`Block::linears`] order (empty: none).
    pub lora: [Vec<LoraDelta>; 7],
}

/// Loads a linear layer `[out, in]` with an optional bias `[out]` from scope `w`: a dense
/// `weight`, or low-rank factors `lowrank_u` (`[out, r]`) and `lowrank_vs` (`[r, in]`), each
/// matrix kept in `storage`.
fn load_linear(
    w: &Weights,
    out: usize,
    inp: usize,
    bias: bool,
    storage: WeightStorage,
) -> Result<Linear, ModelError> {
    let bias = if bias {
        w.get_opt("bias", &[out])?
    } else {
        None
    };
    if let Some(rank) = w.shape_of("lowrank_u").and_then(|s| s.get(1).copied()) {
        if storage == WeightStorage::Q8_0 && rank % 32 != 0 {
            // Q8_0 rows are blocks of 32 values: pad the rank with zero columns of `u` and zero
            // rows of `vs` (the product is unchanged) so both factors can be 8-bit.
            let padded = rank.next_multiple_of(32);
            let u = w.get("lowrank_u", &[out, rank])?;
            let mut vs = w.get("lowrank_vs", &[rank, inp])?;
            let mut u_padded = vec![0.0; out * padded];
            for (dst, src) in u_padded.chunks_exact_mut(padded).zip(u.chunks_exact(rank)) {
                dst[..rank].copy_from_slice(src);
            }
            vs.resize(padded * inp, 0.0);
            let q8 = WeightFormat::Q8_0;
            let u = WeightMatrix::quantize(&u_padded, out, padded, q8)?;
            let vs = WeightMatrix::quantize(&vs, padded, inp, q8)?;
            return Ok(Linear::LowRank(LowRankLinear::from_matrices(u, vs, bias)));
        }
        let u = w.matrix("lowrank_u", out, rank, storage)?;
        let vs = w.matrix("lowrank_vs", rank, inp, storage)?;
        return Ok(Linear::LowRank(LowRankLinear::from_matrices(u, vs, bias)));
    }
    let weight = w.matrix("weight", out, inp, storage)?;
    Ok(Linear::Dense(DenseLinear::from_matrix(weight, bias)))
}

impl Block {
    /// Loads block weights from scope `model.layers.N`, linear weights kept in `storage`.
    pub fn load(
        cfg: &ModelConfig,
        w: &Weights,
        storage: WeightStorage,
    ) -> Result<Self, ModelError> {
        let (d, f, qd, kd) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.q_dim(),
            cfg.kv_dim(),
        );
        let attn = w.pp("self_attn");
        let mlp = w.pp("mlp");
        Ok(Block {
            attn_norm: w.pp("input_layernorm").get("weight", &[d])?,
            q_proj: load_linear(&attn.pp("q_proj"), qd, d, true, storage)?,
            k_proj: load_linear(&attn.pp("k_proj"), kd, d, true, storage)?,
            v_proj: load_linear(&attn.pp("v_proj"), kd, d, true, storage)?,
            o_proj: load_linear(&attn.pp("o_proj"), d, qd, false, storage)?,
            ffn_norm: w.pp("post_attention_layernorm").get("weight", &[d])?,
            gate_proj: load_linear(&mlp.pp("gate_proj"), f, d, false, storage)?,
            up_proj: load_linear(&mlp.pp("up_proj"), f, d, false, storage)?,
            down_proj: load_linear(&mlp.pp("down_proj"), d, f, false, storage)?,
            lora: Default::default(),
        })
    }

    /// Every linear layer of the block with its Hugging Face name below `model.layers.N.`.
    pub fn linears(&self) -> [(&'static str, &Linear); 7] {
        [
            ("self_attn.q_proj", &self.q_proj),
            ("self_attn.k_proj", &self.k_proj),
            ("self_attn.v_proj", &self.v_proj),
            ("self_attn.o_proj", &self.o_proj),
            ("mlp.gate_proj", &self.gate_proj),
            ("mlp.up_proj", &self.up_proj),
            ("mlp.down_proj", &self.down_proj),
        ]
    }
}

/// The distinct inputs of a block's linear layers (what calibration statistics are taken of).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinearInput {
    /// RMS-normed residual: input of q/k/v.
    Attention,
    /// Concatenated attention heads: input of o.
    AttentionOutput,
    /// RMS-normed residual: input of gate/up.
    FeedForward,
    /// SwiGLU activation: input of down.
    FeedForwardHidden,
}

impl LinearInput {
    /// The input feeding the linear layer named `name` (`self_attn.q_proj`, `mlp.down_proj`, ...).
    pub fn of(name: &str) -> Option<Self> {
        Some(match name.rsplit('.').next()? {
            "q_proj" | "k_proj" | "v_proj" => LinearInput::Attention,
            "o_proj" => LinearInput::AttentionOutput,
            "gate_proj" | "up_proj" => LinearInput::FeedForward,
            "down_proj" => LinearInput::FeedForwardHidden,
            _ => return None,
        })
    }
}

/// Sees the inputs of linear layers during [`LlamaModel::run_block`] (`x` is `n × width`, row-major).
pub trait ActivationObserver {
    /// Called once per input kind per block run.
    fn observe(&mut self, layer: usize, input: LinearInput, x: &[f32], n: usize);
}

/// One sequence of a batched decode step ([`LlamaModel::decode_batch`]): its next token, its KV
/// cache, and the adapter whose deltas apply to it alone (on top of any attached to the model).
pub struct BatchRow<'a> {
    /// The token to run, at position `cache.len()`.
    pub token: u32,
    /// The sequence's own cache; the token is committed to it.
    pub cache: &'a mut dyn KvCache,
    /// This sequence's LoRA adapter, if any.
    pub adapter: Option<&'a LoraAdapter>,
}

/// What a forward pass runs over: `n` consecutive tokens of one sequence (prefill, or one decode
/// step), or one token of each of `n` sequences (a batched decode step).
enum Seqs<'c, 'r> {
    /// One sequence, with its own adapter (if any) on top of the attached ones.
    One(&'c mut dyn KvCache, Option<&'r LoraAdapter>),
    Batch(&'c mut [BatchRow<'r>]),
}

/// Buffers reused across forward passes (sized on first use, then only re-used).
#[derive(Debug, Default)]
pub struct ForwardScratch {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    tokens: Vec<u32>,
    linear: LinearScratch,
    lora_mid: Vec<f32>,
    /// When set, wall time per part of the forward pass accumulates here.
    pub profile: Option<Profile>,
}

/// The parts of a forward pass a [`Profile`] times separately (the discriminant is the index into
/// [`Profile::secs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Fused q/k/v projections.
    Qkv,
    /// Attention over the KV cache (including the cache append).
    Attention,
    /// Attention output projection.
    Output,
    /// Fused gate/up projections.
    GateUp,
    /// Down projection.
    Down,
    /// Output head (logits).
    Head,
    /// Norms, RoPE, SwiGLU and the rest.
    Other,
}

impl Part {
    /// Every part, in [`Profile::secs`] order.
    pub const ALL: [Part; 7] = [
        Part::Qkv,
        Part::Attention,
        Part::Output,
        Part::GateUp,
        Part::Down,
        Part::Head,
        Part::Other,
    ];

    /// Short label.
    pub fn name(self) -> &'static str {
        match self {
            Part::Qkv => "q/k/v",
            Part::Attention => "attention",
            Part::Output => "o_proj",
            Part::GateUp => "gate/up",
            Part::Down => "down",
            Part::Head => "head",
            Part::Other => "norms/rope/act",
        }
    }
}

/// Accumulated wall time per [`Part`] (seconds, in [`Part::ALL`] order).
#[derive(Debug, Default, Clone)]
pub struct Profile {
    /// Seconds per part.
    pub secs: [f64; 7],
}

/// A stopwatch that charges the time since its last mark to a part (no-op when not profiling).
struct Lap<'a> {
    profile: Option<&'a mut Profile>,
    at: std::time::Instant,
}

impl<'a> Lap<'a> {
    fn start(profile: &'a mut Option<Profile>) -> Self {
        Lap {
            profile: profile.as_mut(),
            at: std::time::Instant::now(),
        }
    }

    fn mark(&mut self, part: Part) {
        if let Some(p) = self.profile.as_deref_mut() {
            let now = std::time::Instant::now();
            p.secs[part as usize] += (now - self.at).as_secs_f64();
            self.at = now;
        }
    }
}

/// Adds each sequence's own adapter delta for linear `j` of `layer`: `out_i += s·B·A·x_i`, one
/// product per run of consecutive batch rows sharing an adapter.
fn row_deltas(
    seqs: &Seqs<'_, '_>,
    layer: usize,
    j: usize,
    x: &[f32],
    out: &mut [f32],
    mid: &mut Vec<f32>,
    acts: &mut QuantizedActs,
) {
    fn delta_of(a: Option<&LoraAdapter>, layer: usize, j: usize) -> Option<&LoraDelta> {
        a?.layers.get(layer)?[j].as_ref()
    }
    let rows = match seqs {
        Seqs::One(_, adapter) => {
            if let Some(delta) = delta_of(*adapter, layer, j) {
                delta.apply(x, x.len() / delta.in_dim(), out, mid, acts);
            }
            return;
        }
        Seqs::Batch(rows) => rows,
    };
    let n = rows.len();
    let (xw, ow) = (x.len() / n, out.len() / n);
    let mut start = 0;
    while start < n {
        let adapter = rows[start].adapter;
        let same = |r: &BatchRow<'_>| match (r.adapter, adapter) {
            (Some(a), Some(b)) => std::ptr::eq(a, b),
            (None, None) => true,
            _ => false,
        };
        let end = start + rows[start..].iter().take_while(|r| same(r)).count();
        if let Some(delta) = delta_of(adapter, layer, j) {
            let m = end - start;
            let out = &mut out[start * ow..end * ow];
            delta.apply(&x[start * xw..end * xw], m, out, mid, acts);
        }
        start = end;
    }
}

/// A Llama-family causal language model.
#[derive(Debug, Clone)]
pub struct LlamaModel {
    cfg: ModelConfig,
    /// `vocab × d`; also the output head when embeddings are tied.
    embed: WeightMatrix,
    blocks: Vec<Block>,
    norm: Vec<f32>,
    lm_head: Option<Linear>,
    rope: Rope,
}

impl LlamaModel {
    /// Loads every weight from `w` (Hugging Face names) under `cfg`, weight matrices (embedding
    /// and head included) kept in `storage`; `on_block` is called after each block (for progress
    /// bars).
    pub fn load(
        cfg: &ModelConfig,
        w: &Weights,
        storage: WeightStorage,
        mut on_block: impl FnMut(usize),
    ) -> Result<Self, ModelError> {
        let (d, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed = w.pp("model.embed_tokens").matrix("weight", v, d, storage)?;
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            blocks.push(Block::load(cfg, &w.pp("model.layers").pp(i), storage)?);
            on_block(i);
        }
        let norm = w.pp("model.norm").get("weight", &[d])?;
        let lm_head = if cfg.tie_embeddings {
            None
        } else {
            Some(load_linear(&w.pp("lm_head"), v, d, false, storage)?)
        };
        Ok(LlamaModel {
            cfg: cfg.clone(),
            embed,
            blocks,
            norm,
            lm_head,
            rope: Rope::new(cfg.head_dim, cfg.rope_theta),
        })
    }

    /// The runtime configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The decoder blocks.
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// Mutable decoder blocks (to swap a layer's representation, e.g. for a compressed one).
    pub fn blocks_mut(&mut self) -> &mut [Block] {
        &mut self.blocks
    }

    /// Head layout for KV caches.
    pub fn attn_shape(&self) -> AttnShape {
        AttnShape {
            n_heads: self.cfg.n_heads,
            n_kv_heads: self.cfg.n_kv_heads,
            head_dim: self.cfg.head_dim,
        }
    }

    /// `(out, in)` of every block linear, in block order and `Block::linears` order.
    pub fn linear_shapes(&self) -> Vec<(usize, usize)> {
        self.blocks
            .iter()
            .flat_map(|b| b.linears().map(|(_, l)| (l.out_dim(), l.in_dim())))
            .collect()
    }

    /// Parameters held by the block linears (what compression shrinks).
    pub fn linear_params(&self) -> usize {
        self.blocks
            .iter()
            .flat_map(|b| b.linears().map(|(_, l)| l.n_params()))
            .sum()
    }

    /// An empty dense KV cache for this model holding at most `limit` tokens.
    pub fn dense_cache(&self, limit: usize) -> DenseKvCache {
        DenseKvCache::new(self.cfg.n_layers, self.attn_shape(), limit)
    }

    /// Bytes of weights read to decode one token: every block linear, the norms and the output
    /// head (one embedding row is negligible and not counted).
    pub fn weight_bytes_per_token(&self) -> usize {
        let f = std::mem::size_of::<f32>();
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                b.linears()
                    .iter()
                    .map(|(_, l)| l.weight_bytes())
                    .sum::<usize>()
                    + (b.attn_norm.len() + b.ffn_norm.len()) * f
            })
            .sum();
        let head = match &self.lm_head {
            Some(l) => l.weight_bytes(),
            None => self.embed.bytes(),
        };
        blocks + head + self.norm.len() * f
    }

    /// Every tensor under its Hugging Face name (row-major f32), low-rank layers as
    /// `*.lowrank_u` (`[out, r]`) and `*.lowrank_vs` (`[r, in]`): what a saved model holds.
    pub fn export_tensors(&self) -> Vec<(String, Tensor)> {
        let t = |shape: Vec<usize>, data: &[f32]| Tensor {
            shape,
            data: data.to_vec(),
        };
        let (d, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let mut out = vec![
            (
                "model.embed_tokens.weight".to_string(),
                t(vec![v, d], &self.embed.to_f32()),
            ),
            ("model.norm.weight".to_string(), t(vec![d], &self.norm)),
        ];
        let mut linear = |name: String, l: &Linear| {
            let (o, i) = (l.out_dim(), l.in_dim());
            let bias = match l {
                Linear::Dense(dl) => {
                    out.push((format!("{name}.weight"), t(vec![o, i], &dl.weight())));
                    dl.bias()
                }
                Linear::LowRank(lr) => {
                    let r = lr.rank();
                    out.push((format!("{name}.lowrank_u"), t(vec![o, r], &lr.u())));
                    out.push((format!("{name}.lowrank_vs"), t(vec![r, i], &lr.vs())));
                    lr.bias()
                }
            };
            if let Some(b) = bias {
                out.push((format!("{name}.bias"), t(vec![o], b)));
            }
        };
        if let Some(head) = &self.lm_head {
            linear("lm_head".to_string(), head);
        }
        for (n, b) in self.blocks.iter().enumerate() {
            for (leaf, l) in b.linears() {
                linear(format!("model.layers.{n}.{leaf}"), l);
            }
        }
        for (n, b) in self.blocks.iter().enumerate() {
            out.push((
                format!("model.layers.{n}.input_layernorm.weight"),
                t(vec![d], &b.attn_norm),
            ));
            out.push((
                format!("model.layers.{n}.post_attention_layernorm.weight"),
                t(vec![d], &b.ffn_norm),
            ));
        }
        out
    }

    /// Total parameters (tied embeddings counted once).
    pub fn n_params(&self) -> usize {
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                b.linears().iter().map(|(_, l)| l.n_params()).sum::<usize>()
                    + b.attn_norm.len()
                    + b.ffn_norm.len()
            })
            .sum();
        blocks
            + self.embed.rows() * self.embed.cols()
            + self.norm.len()
            + self.lm_head.as_ref().map_or(0, Linear::n_params)
    }

    /// Writes the embeddings of `tokens` (`n × d`, row-major) into `out`.
    pub fn embed(&self, tokens: &[u32], out: &mut Vec<f32>) -> Result<(), ModelError> {
        let (d, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        out.resize(tokens.len() * d, 0.0);
        for (row, &t) in out.chunks_exact_mut(d).zip(tokens) {
            if t as usize >= v {
                return Err(ModelError::TokenOutOfRange { id: t, vocab: v });
            }
            self.embed.dequantize_rows(t as usize, t as usize + 1, row);
        }
        Ok(())
    }

    /// Runs `tokens` (positions `cache.len()..`) through the decoder, commits them to `cache`, and
    /// returns the final-normed hidden states (`n × d`, row-major) held in `scratch`.
    pub fn forward_hidden<'s>(
        &self,
        tokens: &[u32],
        cache: &mut dyn KvCache,
        scratch: &'s mut ForwardScratch,
    ) -> Result<&'s [f32], ModelError> {
        self.forward_hidden_adapted(tokens, cache, None, scratch)
    }

    /// [`LlamaModel::forward_hidden`] with `adapter`'s deltas for this call only (the model is not
    /// changed, so sequences with different adapters can share it).
    pub fn forward_hidden_adapted<'s>(
        &self,
        tokens: &[u32],
        cache: &mut dyn KvCache,
        adapter: Option<&LoraAdapter>,
        scratch: &'s mut ForwardScratch,
    ) -> Result<&'s [f32], ModelError> {
        if let Some(a) = adapter {
            self.check_adapter(a)?;
        }
        let n = tokens.len();
        if n == 0 {
            return Err(ModelError::EmptyInput("no tokens to run".into()));
        }
        self.check_context(cache.len(), n)?;
        self.run_seqs(tokens, &mut Seqs::One(cache, adapter), scratch)?;
        Ok(&scratch.h)
    }

    /// Runs `tokens` through every block over `seqs` (the next `n` tokens of one sequence, or one
    /// token per batch row), commits them to the caches, and leaves the final-normed hidden
    /// states (`n × d`) in `scratch.h`. The caller has checked the context and the adapters.
    fn run_seqs(
        &self,
        tokens: &[u32],
        seqs: &mut Seqs<'_, '_>,
        scratch: &mut ForwardScratch,
    ) -> Result<(), ModelError> {
        let n = tokens.len();
        let mut x = std::mem::take(&mut scratch.x);
        self.embed(tokens, &mut x)?;
        let (cos, sin) = (&mut scratch.cos, &mut scratch.sin);
        match seqs {
            Seqs::One(cache, _) => self.rope.tables(cache.len(), n, cos, sin),
            Seqs::Batch(rows) => self
                .rope
                .tables_at(rows.iter().map(|r| r.cache.len()), cos, sin),
        }
        for layer in 0..self.blocks.len() {
            self.block_step(layer, &mut x, n, seqs, scratch, None);
        }
        match seqs {
            Seqs::One(cache, _) => cache.commit(n),
            Seqs::Batch(rows) => rows.iter_mut().for_each(|r| r.cache.commit(1)),
        }
        scratch.h.resize(x.len(), 0.0);
        rms_norm(&x, &self.norm, self.cfg.rms_eps, &mut scratch.h);
        scratch.x = x;
        Ok(())
    }

    fn check_context(&self, p0: usize, n: usize) -> Result<(), ModelError> {
        if p0 + n > self.cfg.max_seq_len {
            return Err(ModelError::ContextOverflow {
                needed: p0 + n,
                limit: self.cfg.max_seq_len,
            });
        }
        Ok(())
    }

    /// Runs block `layer` in place on the residual stream `x` (`n × d`, positions
    /// `cache.len()..`), showing the inputs of its linear layers to `observer`. The caller commits
    /// the tokens to `cache` after the last block it runs. For calibration, not decoding.
    pub fn run_block(
        &self,
        layer: usize,
        x: &mut [f32],
        cache: &mut dyn KvCache,
        scratch: &mut ForwardScratch,
        observer: Option<&mut dyn ActivationObserver>,
    ) -> Result<(), ModelError> {
        let n = x.len() / self.cfg.hidden_size;
        self.check_context(cache.len(), n)?;
        self.rope
            .tables(cache.len(), n, &mut scratch.cos, &mut scratch.sin);
        self.block_step(layer, x, n, &mut Seqs::One(cache, None), scratch, observer);
        Ok(())
    }

    /// One decoder block on `x` with RoPE tables for the current positions already in `s`.
    fn block_step(
        &self,
        layer: usize,
        x: &mut [f32],
        n: usize,
        seqs: &mut Seqs<'_, '_>,
        s: &mut ForwardScratch,
        mut observer: Option<&mut dyn ActivationObserver>,
    ) {
        let cfg = &self.cfg;
        let b = &self.blocks[layer];
        let (d, f, qd, kd) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.q_dim(),
            cfg.kv_dim(),
        );
        s.h.resize(n * d, 0.0);
        s.q.resize(n * qd, 0.0);
        s.attn.resize(n * qd, 0.0);
        s.k.resize(n * kd, 0.0);
        s.v.resize(n * kd, 0.0);
        s.gate.resize(n * f, 0.0);
        s.up.resize(n * f, 0.0);
        let mut observe = |input: LinearInput, v: &[f32]| {
            if let Some(o) = observer.as_deref_mut() {
                o.observe(layer, input, v, n);
            }
        };

        let mut lap = Lap::start(&mut s.profile);
        rms_norm(x, &b.attn_norm, cfg.rms_eps, &mut s.h);
        observe(LinearInput::Attention, &s.h);
        lap.mark(Part::Other);
        let ls = &mut s.linear;
        Linear::forward_shared(
            &[&b.q_proj, &b.k_proj, &b.v_proj],
            &s.h,
            n,
            &mut [&mut s.q, &mut s.k, &mut s.v],
            ls,
        );
        for (j, out) in [&mut s.q, &mut s.k, &mut s.v].into_iter().enumerate() {
            for delta in &b.lora[j] {
                delta.apply(&s.h, n, out, &mut s.lora_mid, ls.acts_mut());
            }
            row_deltas(seqs, layer, j, &s.h, out, &mut s.lora_mid, ls.acts_mut());
        }
        lap.mark(Part::Qkv);
        self.rope.apply(&mut s.q, qd, &s.cos, &s.sin);
        self.rope.apply(&mut s.k, kd, &s.cos, &s.sin);
        lap.mark(Part::Other);
        match seqs {
            Seqs::One(cache, _) => cache.attend(layer, &s.q, &s.k, &s.v, n, &mut s.attn),
            Seqs::Batch(rows) => {
                for (i, row) in rows.iter_mut().enumerate() {
                    let (q, k, v) = (&s.q[i * qd..][..qd], &s.k[i * kd..][..kd], &s.v[i * kd..]);
                    let out = &mut s.attn[i * qd..][..qd];
                    row.cache.attend(layer, q, k, &v[..kd], 1, out);
                }
            }
        }
        observe(LinearInput::AttentionOutput, &s.attn);
        lap.mark(Part::Attention);
        b.o_proj.forward(&s.attn, n, x, Accum::Add, ls);
        for delta in &b.lora[3] {
            delta.apply(&s.attn, n, x, &mut s.lora_mid, ls.acts_mut());
        }
        row_deltas(seqs, layer, 3, &s.attn, x, &mut s.lora_mid, ls.acts_mut());
        lap.mark(Part::Output);

        rms_norm(x, &b.ffn_norm, cfg.rms_eps, &mut s.h);
        observe(LinearInput::FeedForward, &s.h);
        lap.mark(Part::Other);
        Linear::forward_shared(
            &[&b.gate_proj, &b.up_proj],
            &s.h,
            n,
            &mut [&mut s.gate, &mut s.up],
            ls,
        );
        for (j, out) in [(4, &mut s.gate), (5, &mut s.up)] {
            for delta in &b.lora[j] {
                delta.apply(&s.h, n, out, &mut s.lora_mid, ls.acts_mut());
            }
            row_deltas(seqs, layer, j, &s.h, out, &mut s.lora_mid, ls.acts_mut());
        }
        lap.mark(Part::GateUp);
        crate::kernels::ops::silu_mul(&mut s.gate, &s.up);
        observe(LinearInput::FeedForwardHidden, &s.gate);
        lap.mark(Part::Other);
        b.down_proj.forward(&s.gate, n, x, Accum::Add, ls);
        for delta in &b.lora[6] {
            delta.apply(&s.gate, n, x, &mut s.lora_mid, ls.acts_mut());
        }
        row_deltas(seqs, layer, 6, &s.gate, x, &mut s.lora_mid, ls.acts_mut());
        lap.mark(Part::Down);
    }

    /// One decode step of several sequences at once: row `i` runs `rows[i].token` at the next
    /// position of its own cache, with its own adapter, and gets `vocab` logits in row `i` of
    /// `out`. The weights are read once for all rows (batched products); attention and adapter
    /// deltas run per row (consecutive rows with the same adapter share one product). Every
    /// row's context and adapter are checked first; on error nothing is committed.
    pub fn decode_batch(
        &self,
        rows: &mut [BatchRow<'_>],
        scratch: &mut ForwardScratch,
        out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        if rows.is_empty() {
            return Err(ModelError::EmptyInput("no sequences to run".into()));
        }
        for row in rows.iter() {
            self.check_context(row.cache.len(), 1)?;
            if let Some(a) = row.adapter {
                self.check_adapter(a)?;
            }
        }
        // The token buffer is reused across steps; it is out of `scratch` while the step runs.
        let mut tokens = std::mem::take(&mut scratch.tokens);
        tokens.clear();
        tokens.extend(rows.iter().map(|r| r.token));
        let run = self.run_seqs(&tokens, &mut Seqs::Batch(rows), scratch);
        scratch.tokens = tokens;
        run?;
        let s = scratch;
        let mut lap = Lap::start(&mut s.profile);
        self.head(&s.h, out, &mut s.linear);
        lap.mark(Part::Head);
        Ok(())
    }

    /// Attaches a LoRA adapter, unmerged: its deltas run beside the shared base weights (several
    /// adapters add up). Every delta's shape is checked first; on error nothing is attached.
    pub fn attach_adapter(&mut self, adapter: &LoraAdapter) -> Result<(), ModelError> {
        self.check_adapter(adapter)?;
        for (deltas, block) in adapter.layers.iter().zip(&mut self.blocks) {
            for (slot, delta) in block.lora.iter_mut().zip(deltas) {
                slot.extend(delta.iter().cloned());
            }
        }
        Ok(())
    }

    /// Checks that every delta of `adapter` fits this model's layers (an adapter trained for
    /// another base is refused with the layer and shapes named).
    pub fn check_adapter(&self, adapter: &LoraAdapter) -> Result<(), ModelError> {
        let bad = |msg: String| {
            ModelError::InvalidConfig(format!("adapter {}: {msg}", adapter.path.display()))
        };
        if adapter.layers.len() > self.blocks.len() {
            return Err(bad(format!(
                "adapts layer {} but the model has {} layers (an adapter for another base?)",
                adapter.layers.len() - 1,
                self.blocks.len()
            )));
        }
        for (layer, (deltas, block)) in adapter.layers.iter().zip(&self.blocks).enumerate() {
            for ((name, linear), delta) in block.linears().iter().zip(deltas) {
                let Some(delta) = delta else { continue };
                if (delta.out_dim(), delta.in_dim()) != (linear.out_dim(), linear.in_dim()) {
                    return Err(bad(format!(
                        "layer {layer} {name}: LoRA is {}×{} (B·A) but the layer is {}×{} (an adapter for another base?)",
                        delta.out_dim(),
                        delta.in_dim(),
                        linear.out_dim(),
                        linear.in_dim()
                    )));
                }
            }
        }
        Ok(())
    }

    /// Detaches every unmerged adapter: the model computes with its base weights again.
    pub fn detach_adapters(&mut self) {
        for block in &mut self.blocks {
            block.lora = Default::default();
        }
    }

    /// Merges every attached delta into its layer's weight (`W ← W + s·B·A`) and detaches it.
    /// Needs dense f32 weights (`--weights f32`); on error nothing is changed.
    pub fn merge_adapters(&mut self) -> Result<(), ModelError> {
        for (layer, block) in self.blocks.iter().enumerate() {
            for ((name, linear), deltas) in block.linears().iter().zip(&block.lora) {
                let dense_f32 = matches!(linear, Linear::Dense(d) if d.matrix().as_f32().is_some());
                if !deltas.is_empty() && !dense_f32 {
                    return Err(ModelError::WeightFormat(format!(
                        "layer {layer} {name}: merging a LoRA needs a dense f32 weight (load with f32 storage)"
                    )));
                }
            }
        }
        for block in &mut self.blocks {
            let deltas = std::mem::take(&mut block.lora);
            let layers = [
                &mut block.q_proj,
                &mut block.k_proj,
                &mut block.v_proj,
                &mut block.o_proj,
                &mut block.gate_proj,
                &mut block.up_proj,
                &mut block.down_proj,
            ];
            for (linear, deltas) in layers.into_iter().zip(&deltas) {
                let Linear::Dense(d) = linear else { continue };
                for delta in deltas {
                    let w = d.matrix_mut().as_f32_mut().expect("checked above");
                    for (w, dw) in w.iter_mut().zip(delta.dense()) {
                        *w += dw;
                    }
                }
            }
        }
        Ok(())
    }

    /// Output logits (`n × vocab`, row-major) for `n` final-normed hidden rows (`n × d`).
    pub fn logits(&self, hidden: &[f32], out: &mut Vec<f32>) {
        self.head(hidden, out, &mut LinearScratch::default());
    }

    fn head(&self, hidden: &[f32], out: &mut Vec<f32>, scratch: &mut LinearScratch) {
        let (d, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let n = hidden.len() / d;
        out.resize(n * v, 0.0);
        match &self.lm_head {
            Some(head) => head.forward(hidden, n, out, Accum::Replace, scratch),
            None => self
                .embed
                .matmul(hidden, n, out, Accum::Replace, scratch.acts_mut()),
        }
    }

    /// Runs `tokens` and writes the logits of the last position (`vocab` values) into `out`.
    pub fn forward_last(
        &self,
        tokens: &[u32],
        cache: &mut dyn KvCache,
        scratch: &mut ForwardScratch,
        out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        self.forward_last_adapted(tokens, cache, None, scratch, out)
    }

    /// [`LlamaModel::forward_last`] with `adapter`'s deltas for this call only.
    pub fn forward_last_adapted(
        &self,
        tokens: &[u32],
        cache: &mut dyn KvCache,
        adapter: Option<&LoraAdapter>,
        scratch: &mut ForwardScratch,
        out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let d = self.cfg.hidden_size;
        self.forward_hidden_adapted(tokens, cache, adapter, scratch)?;
        let mut lap = Lap::start(&mut scratch.profile);
        let last = &scratch.h[scratch.h.len() - d..];
        self.head(last, out, &mut scratch.linear);
        lap.mark(Part::Head);
        Ok(())
    }
}

/// A random Llama model built in memory (f32 weights from `seed`): `d` wide, `ffn` hidden,
/// `layers` blocks, `heads` = (query, key/value) heads, `vocab` tokens. For tests of this crate
/// and of the crates built on it, where the real model is not needed.
///
/// # Panics
/// If the shapes are inconsistent (`d` not a multiple of the query heads).
pub fn random_model(
    d: usize,
    ffn: usize,
    layers: usize,
    heads: (usize, usize),
    vocab: usize,
    seed: usize,
) -> LlamaModel {
    let cfg = ModelConfig {
        arch: crate::config::Arch::Llama,
        hidden_size: d,
        intermediate_size: ffn,
        n_layers: layers,
        n_heads: heads.0,
        n_kv_heads: heads.1,
        head_dim: d / heads.0,
        vocab_size: vocab,
        rope_theta: 10_000.0,
        rms_eps: 1e-6,
        max_seq_len: 256,
        tie_embeddings: true,
    };
    let mut src = crate::source::MemorySource::new();
    let mut k = seed;
    let mut fill = |name: String, shape: Vec<usize>| {
        k += 1;
        let len = shape.iter().product();
        let data = (0..len)
            .map(|i| ((((i * 13 + k * 7) * 2654435761) % 1009) as f32 / 1009.0 - 0.5) * 0.8)
            .collect();
        src.insert(name, shape, data);
    };
    let (qd, kd) = (cfg.q_dim(), cfg.kv_dim());
    fill("model.embed_tokens.weight".into(), vec![vocab, d]);
    fill("model.norm.weight".into(), vec![d]);
    for n in 0..layers {
        let l = format!("model.layers.{n}");
        fill(format!("{l}.input_layernorm.weight"), vec![d]);
        fill(format!("{l}.post_attention_layernorm.weight"), vec![d]);
        fill(format!("{l}.self_attn.q_proj.weight"), vec![qd, d]);
        fill(format!("{l}.self_attn.k_proj.weight"), vec![kd, d]);
        fill(format!("{l}.self_attn.v_proj.weight"), vec![kd, d]);
        fill(format!("{l}.self_attn.o_proj.weight"), vec![d, qd]);
        fill(format!("{l}.mlp.gate_proj.weight"), vec![ffn, d]);
        fill(format!("{l}.mlp.up_proj.weight"), vec![ffn, d]);
        fill(format!("{l}.mlp.down_proj.weight"), vec![d, ffn]);
    }
    LlamaModel::load(&cfg, &Weights::new(&src), WeightStorage::F32, |_| {}).unwrap()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kv::DenseKvCache;
    use crate::source::MemorySource;

    #[test]
    fn rms_norm_by_hand() {
        let x = [3.0, 4.0, 0.0, 0.0];
        let mut out = [0.0; 4];
        rms_norm(&x, &[1.0, 2.0, 1.0, 1.0], 0.0, &mut out);
        // mean square = 25/4, rms = 2.5
        assert_eq!(out, [1.2, 3.2, 0.0, 0.0]);
    }

    #[test]
    fn rope_rotates_pairs_and_preserves_norm() {
        let rope = Rope::new(4, 10_000.0);
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        rope.tables(1, 1, &mut cos, &mut sin);
        // pair 0 rotates by 1 rad, pair 1 by 1/100 rad.
        assert!((cos[0] - 1f32.cos()).abs() < 1e-7 && (sin[1] - 0.01f32.sin()).abs() < 1e-7);
        let mut x = [1.0, 0.0, 0.0, 1.0];
        rope.apply(&mut x, 4, &cos, &sin);
        let want = [
            1f32.cos(),
            0.01f32.cos() * 0.0 - 0.01f32.sin(),
            1f32.sin(),
            0.01f32.cos(),
        ];
        for (a, b) in x.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{x:?} vs {want:?}");
        }
        // Position 0 is the identity; relative positions give equal dot products.
        rope.tables(0, 1, &mut cos, &mut sin);
        let mut y = [0.3, -0.2, 0.5, 0.7];
        let y0 = y;
        rope.apply(&mut y, 4, &cos, &sin);
        assert_eq!(y, y0);
        let dot_at = |pq: usize, pk: usize| {
            let (mut c, mut s) = (Vec::new(), Vec::new());
            let mut q = [0.3, -0.2, 0.5, 0.7];
            let mut k = [0.1, 0.9, -0.4, 0.2];
            rope.tables(pq, 1, &mut c, &mut s);
            rope.apply(&mut q, 4, &c, &s);
            rope.tables(pk, 1, &mut c, &mut s);
            rope.apply(&mut k, 4, &c, &s);
            q.iter().zip(&k).map(|(a, b)| a * b).sum::<f32>()
        };
        assert!((dot_at(5, 2) - dot_at(13, 10)).abs() < 1e-5);
    }

    /// A one-layer model with hidden size 4 built in memory.
    fn tiny() -> LlamaModel {
        random_model(4, 6, 1, (2, 1), 5, 0)
    }

    /// An adapter with a delta on every linear of every layer of `model`.
    fn full_adapter(model: &LlamaModel, rank: usize, scale: f32) -> LoraAdapter {
        let layers = model
            .blocks()
            .iter()
            .enumerate()
            .map(|(l, b)| {
                let ls = b.linears();
                std::array::from_fn(|t| {
                    let (out, inp) = (ls[t].1.out_dim(), ls[t].1.in_dim());
                    let v = |n: usize, s: usize| {
                        (0..n)
                            .map(|i| (((i * 31 + s * 17 + l * 5) % 23) as f32 - 11.0) / 23.0)
                            .collect::<Vec<f32>>()
                    };
                    Some(LoraDelta::new(
                        v(rank * inp, t),
                        v(out * rank, t + 7),
                        rank,
                        inp,
                        out,
                        scale,
                    ))
                })
            })
            .collect();
        LoraAdapter {
            path: "test-adapter".into(),
            rank,
            alpha: scale * rank as f32,
            scale,
            base_model: None,
            layers,
        }
    }

    pub(crate) fn last_logits(model: &LlamaModel, tokens: &[u32]) -> Vec<f32> {
        let mut cache = DenseKvCache::new(model.config().n_layers, model.attn_shape(), 64);
        let mut out = Vec::new();
        model
            .forward_last(tokens, &mut cache, &mut ForwardScratch::default(), &mut out)
            .unwrap();
        out
    }

    #[test]
    fn unmerged_lora_equals_merged_lora_and_changes_the_output() {
        let base = random_model(8, 12, 2, (2, 1), 11, 3);
        let tokens = [1u32, 4, 7, 2, 9];
        let plain = last_logits(&base, &tokens);
        let adapter = full_adapter(&base, 2, 0.5);
        let mut unmerged = base.clone();
        unmerged.attach_adapter(&adapter).unwrap();
        let a = last_logits(&unmerged, &tokens);
        let mut merged = unmerged.clone();
        merged.merge_adapters().unwrap();
        assert!(merged
            .blocks()
            .iter()
            .all(|b| b.lora.iter().all(Vec::is_empty)));
        let b = last_logits(&merged, &tokens);
        let diff = a
            .iter()
            .zip(&plain)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(diff > 1e-3, "the adapter changes the logits ({diff})");
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
        }
        // Detaching restores the base model exactly.
        let mut detached = unmerged.clone();
        detached.detach_adapters();
        assert_eq!(last_logits(&detached, &tokens), plain);
        // Two adapters add up: attaching the same one twice doubles the delta.
        let mut twice = base.clone();
        twice.attach_adapter(&adapter).unwrap();
        twice.attach_adapter(&adapter).unwrap();
        let doubled = full_adapter(&base, 2, 1.0);
        let mut once = base.clone();
        once.attach_adapter(&doubled).unwrap();
        for (x, y) in last_logits(&twice, &tokens)
            .iter()
            .zip(&last_logits(&once, &tokens))
        {
            assert!((x - y).abs() < 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    #[test]
    fn adapters_for_another_base_are_rejected_untouched() {
        let base = random_model(8, 12, 2, (2, 1), 11, 3);
        let other = random_model(8, 16, 2, (2, 1), 11, 3);
        let mut model = base.clone();
        let err = model
            .attach_adapter(&full_adapter(&other, 2, 1.0))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("layer 0 mlp.gate_proj") && err.contains("another base"),
            "{err}"
        );
        assert!(model
            .blocks()
            .iter()
            .all(|b| b.lora.iter().all(Vec::is_empty)));
        let deeper = random_model(8, 12, 3, (2, 1), 11, 3);
        let err = model
            .attach_adapter(&full_adapter(&deeper, 2, 1.0))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("adapts layer 2 but the model has 2 layers"),
            "{err}"
        );
    }

    #[test]
    fn low_rank_factors_load_as_q8_0_with_the_rank_padded_to_a_block() {
        let (out, inp, rank) = (40, 64, 5);
        let val = |i: usize, k: usize| (((i * 7 + k * 13) % 17) as f32 - 8.0) / 8.0;
        let mut src = MemorySource::new();
        src.insert(
            "l.lowrank_u",
            vec![out, rank],
            (0..out * rank).map(|i| val(i, 1)).collect(),
        );
        src.insert(
            "l.lowrank_vs",
            vec![rank, inp],
            (0..rank * inp).map(|i| val(i, 2)).collect(),
        );
        let w = Weights::new(&src).pp("l");
        let exact = load_linear(&w, out, inp, false, WeightStorage::F32).unwrap();
        let int8 = load_linear(&w, out, inp, false, WeightStorage::Q8_0).unwrap();
        let Linear::LowRank(lr) = &int8 else {
            panic!("not low-rank")
        };
        assert_eq!(lr.rank(), 32);
        assert_eq!(lr.matrices().0.format(), WeightFormat::Q8_0);
        assert_eq!(lr.matrices().1.format(), WeightFormat::Q8_0);
        let x: Vec<f32> = (0..inp).map(|i| val(i, 3)).collect();
        let (mut a, mut b) = (vec![0.0; out], vec![0.0; out]);
        let mut scratch = LinearScratch::default();
        exact.forward(&x, 1, &mut a, Accum::Replace, &mut scratch);
        int8.forward(&x, 1, &mut b, Accum::Replace, &mut scratch);
        let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 0.02 * scale, "{p} vs {q}");
        }
    }

    #[test]
    fn prefill_and_decode_agree() {
        let model = tiny();
        let tokens = [1u32, 3, 0, 4, 2];
        let mut scratch = ForwardScratch::default();
        let mut cache = DenseKvCache::new(1, model.attn_shape(), 16);
        let hidden = model
            .forward_hidden(&tokens, &mut cache, &mut scratch)
            .unwrap()
            .to_vec();
        let mut all = Vec::new();
        model.logits(&hidden, &mut all);
        let mut step_cache = DenseKvCache::new(1, model.attn_shape(), 16);
        let mut out = Vec::new();
        for (i, &t) in tokens.iter().enumerate() {
            model
                .forward_last(&[t], &mut step_cache, &mut scratch, &mut out)
                .unwrap();
            for (a, b) in out.iter().zip(&all[i * 5..][..5]) {
                assert!((a - b).abs() < 1e-5, "position {i}: {a} vs {b}");
            }
        }
        assert_eq!(step_cache.len(), 5);
        assert!(matches!(
            model.forward_last(&[9], &mut step_cache, &mut scratch, &mut out),
            Err(ModelError::TokenOutOfRange { id: 9, vocab: 5 })
        ));
    }
    #[test]
    fn a_batched_step_equals_each_sequence_run_alone() {
        // Two layers, 2 query heads over 1 KV head; three sequences at different positions:
        // no adapter, adapter A, adapter A again (one shared delta product), then adapter B.
        let model = random_model(8, 12, 2, (2, 1), 7, 3);
        let (a, b) = (full_adapter(&model, 2, 0.7), full_adapter(&model, 3, -0.4));
        let prompts: [&[u32]; 4] = [&[1, 2, 3], &[4], &[0, 5, 6, 2, 1], &[3, 3]];
        let adapters = [None, Some(&a), Some(&a), Some(&b)];
        let next = [5u32, 0, 6, 1];
        let mut scratch = ForwardScratch::default();
        let mut want = Vec::new();
        let mut caches = Vec::new();
        for ((prompt, adapter), t) in prompts.iter().zip(adapters).zip(next) {
            // The reference attaches the adapter; the batch's prefill passes it per call.
            let mut m = model.clone();
            if let Some(ad) = adapter {
                m.attach_adapter(ad).unwrap();
            }
            let mut out = Vec::new();
            let mut cache = DenseKvCache::new(2, m.attn_shape(), 16);
            model
                .forward_last_adapted(prompt, &mut cache, adapter, &mut scratch, &mut out)
                .unwrap();
            caches.push(cache);
            let mut cache = DenseKvCache::new(2, m.attn_shape(), 16);
            m.forward_last(prompt, &mut cache, &mut scratch, &mut out)
                .unwrap();
            m.forward_last(&[t], &mut cache, &mut scratch, &mut out)
                .unwrap();
            want.push(out);
        }
        let mut rows: Vec<BatchRow<'_>> = caches
            .iter_mut()
            .zip(adapters)
            .zip(next)
            .map(|((cache, adapter), token)| BatchRow {
                token,
                cache,
                adapter,
            })
            .collect();
        let mut out = Vec::new();
        model
            .decode_batch(&mut rows, &mut scratch, &mut out)
            .unwrap();
        for (i, w) in want.iter().enumerate() {
            for (x, y) in out[i * 7..][..7].iter().zip(w) {
                assert!((x - y).abs() < 1e-5, "sequence {i}: {x} vs {y}");
            }
        }
        for (cache, prompt) in caches.iter().zip(prompts) {
            assert_eq!(cache.len(), prompt.len() + 1);
        }
        // An adapter for another base is refused before anything is committed.
        let other = random_model(8, 12, 3, (2, 1), 7, 4);
        let stranger = full_adapter(&other, 2, 1.0);
        let mut rows = vec![BatchRow {
            token: 1,
            cache: &mut caches[0],
            adapter: Some(&stranger),
        }];
        let err = model
            .decode_batch(&mut rows, &mut scratch, &mut out)
            .unwrap_err();
        assert!(err.to_string().contains("another base"), "{err}");
        assert_eq!(caches[0].len(), 4);
    }
}
