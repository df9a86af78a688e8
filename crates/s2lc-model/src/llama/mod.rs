//! The Llama-family decoder (Llama, SmolLM2, Qwen2): RMSNorm, rotary position embedding,
//! grouped-query attention, SwiGLU feed-forward, optionally tied embeddings. GPT-2 runs as a
//! configuration of it ([`crate::config::Arch::Gpt2`]): LayerNorm with bias, learned absolute
//! positions added to the token embedding, a GELU (tanh) MLP with no gate, biases on every linear
//! (its Hugging Face tensors are mapped onto these blocks by [`crate::gpt2::Gpt2Source`]).
//!
//! The model is immutable (`&self`); per-sequence state lives in a
//! [`KvCache`](crate::kv::KvCache) and reusable buffers in a [`ForwardScratch`], so a decode loop
//! allocates nothing after its first step.
//!
//! This module holds the model (loading, shapes, export, adapters); the forward pass is in
//! `forward`, the decoder block's weights in `block`, rotary embedding in `rope` and the per-part
//! timing in `profile`.

use crate::config::{ModelConfig, NormKind, PositionKind};
use crate::error::ModelError;
use crate::kernels::{WeightFormat, WeightMatrix};
use crate::kv::{AttnShape, DenseKvCache};
use crate::linear::Linear;
use crate::lora::{AdapterDeltas, LoraAdapter};
use crate::source::{BytesTensor, Tensor, WeightStorage, Weights};

pub use crate::kernels::ops::{layer_norm, rms_norm};

mod block;
mod forward;
mod profile;
mod rope;
#[cfg(test)]
pub(crate) mod tests;

use block::load_linear;
pub use block::{Block, LinearInput, LINEAR_NAMES};
pub use forward::{ActivationObserver, BatchRow, ForwardScratch};
pub use profile::{Part, Profile};
pub use rope::Rope;

/// The leaf of a Q8_0-encoded embedding in a saved model (`u8`, `[vocab, row_bytes]`).
const EMBED_BLOCKS: &str = "weight_q8_0";

/// A Llama-family causal language model.
#[derive(Debug, Clone)]
pub struct LlamaModel {
    cfg: ModelConfig,
    /// `vocab × d`; also the output head when embeddings are tied.
    embed: WeightMatrix,
    /// Learned absolute positions, `max_seq_len × d` row-major (GPT-2's `wpe`); `None` with RoPE.
    positions: Option<Vec<f32>>,
    blocks: Vec<Block>,
    norm: Vec<f32>,
    /// Bias of the final LayerNorm (GPT-2's `ln_f`); `None` for RMSNorm.
    norm_bias: Option<Vec<f32>>,
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
        let embed_scope = w.pp("model.embed_tokens");
        // A saved model may hold the embedding as encoded rows (`export_byte_tensors`).
        let embed = match crate::linear::load_encoded(
            &embed_scope,
            EMBED_BLOCKS,
            Some(v),
            d,
            &[WeightFormat::Q8_0],
        )? {
            Some(m) => m,
            None => embed_scope.matrix("weight", v, d, storage)?,
        };
        let positions = match cfg.positions() {
            PositionKind::Rope => None,
            PositionKind::Learned => Some(
                w.pp("model.embed_positions")
                    .get("weight", &[cfg.max_seq_len, d])?,
            ),
        };
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            blocks.push(Block::load(cfg, &w.pp("model.layers").pp(i), storage)?);
            on_block(i);
        }
        let norm = w.pp("model.norm").get("weight", &[d])?;
        let norm_bias = match cfg.norm() {
            NormKind::Rms => None,
            NormKind::Layer => Some(w.pp("model.norm").get("bias", &[d])?),
        };
        let lm_head = if cfg.tie_embeddings {
            None
        } else {
            Some(load_linear(
                &w.pp("lm_head"),
                v,
                d,
                cfg.biases_everywhere(),
                storage,
            )?)
        };
        Ok(LlamaModel {
            cfg: cfg.clone(),
            embed,
            positions,
            blocks,
            norm,
            norm_bias,
            lm_head,
            rope: Rope::new(cfg.head_dim, cfg.rope_theta),
        })
    }

    /// The encoded tensors of every quantized-and-corrected layer ([`crate::linear::CorrectedLinear::export`]):
    /// what a saved model holds beside [`LlamaModel::export_tensors`].
    pub fn export_byte_tensors(&self) -> Vec<(String, BytesTensor)> {
        let mut out = Vec::new();
        if let Some(bytes) = self.embed_blocks() {
            let (v, d) = (self.embed.rows(), self.embed.cols());
            let shape = vec![v, self.embed.format().row_bytes(d)];
            let bytes = bytes.to_vec();
            out.push((
                format!("model.embed_tokens.{EMBED_BLOCKS}"),
                BytesTensor { shape, bytes },
            ));
        }
        for (n, b) in self.blocks.iter().enumerate() {
            for (leaf, l) in b.linears() {
                if let Linear::Corrected(c) = l {
                    out.extend(c.export(&format!("model.layers.{n}.{leaf}")));
                }
            }
        }
        out
    }

    /// Holds the token embedding (and the output head it doubles as, when tied) in Q8_0, as
    /// llama.cpp's quantized files of tied-embedding models do: at f32 the head is the largest
    /// read of a decode step (113 MB on SmolLM2 against ~60 MB for every block at 4.5 bits).
    /// A saved model keeps it so ([`LlamaModel::export_byte_tensors`]).
    pub fn quantize_embedding(&mut self) -> Result<(), ModelError> {
        let (v, d) = (self.embed.rows(), self.embed.cols());
        if self.embed.format() != WeightFormat::Q8_0 {
            self.embed = WeightMatrix::quantize(&self.embed.to_f32(), v, d, WeightFormat::Q8_0)?;
        }
        Ok(())
    }

    /// The embedding's encoded rows when it is held in Q8_0 (what
    /// [`LlamaModel::export_byte_tensors`] writes instead of f32 values).
    fn embed_blocks(&self) -> Option<&[u8]> {
        (self.embed.format() == WeightFormat::Q8_0)
            .then(|| self.embed.encoded())
            .flatten()
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
                b.linears().map(|(_, l)| l.weight_bytes()).sum::<usize>() + b.norm_params() * f
            })
            .sum();
        let head = match &self.lm_head {
            Some(l) => l.weight_bytes(),
            None => self.embed.bytes(),
        };
        blocks + head + self.final_norm_params() * f
    }

    /// Parameters of the final norm (weight, and bias for LayerNorm).
    fn final_norm_params(&self) -> usize {
        self.norm.len() + self.norm_bias.as_ref().map_or(0, Vec::len)
    }

    /// Every tensor under its Hugging Face name (row-major f32), low-rank layers as
    /// `*.lowrank_u` (`[out, r]`) and `*.lowrank_vs` (`[r, in]`): what a saved model holds,
    /// beside the encoded ones of [`LlamaModel::export_byte_tensors`] (corrected layers, and the
    /// embedding when it is held in Q8_0, which is then not written here).
    pub fn export_tensors(&self) -> Vec<(String, Tensor)> {
        let t = |shape: Vec<usize>, data: &[f32]| Tensor {
            shape,
            data: data.to_vec(),
        };
        let (d, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let mut out = vec![("model.norm.weight".to_string(), t(vec![d], &self.norm))];
        if self.embed_blocks().is_none() {
            out.push((
                "model.embed_tokens.weight".to_string(),
                t(vec![v, d], &self.embed.to_f32()),
            ));
        }
        if let Some(p) = &self.positions {
            out.push((
                "model.embed_positions.weight".to_string(),
                t(vec![self.cfg.max_seq_len, d], p),
            ));
        }
        if let Some(b) = &self.norm_bias {
            out.push(("model.norm.bias".to_string(), t(vec![d], b)));
        }
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
                // Encoded as bytes by `export_byte_tensors`.
                Linear::Corrected(c) => c.bias(),
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
            if let Some(bias) = &b.attn_norm_bias {
                out.push((
                    format!("model.layers.{n}.input_layernorm.bias"),
                    t(vec![d], bias),
                ));
            }
            if let Some(bias) = &b.ffn_norm_bias {
                out.push((
                    format!("model.layers.{n}.post_attention_layernorm.bias"),
                    t(vec![d], bias),
                ));
            }
        }
        out
    }

    /// Total parameters (tied embeddings counted once).
    pub fn n_params(&self) -> usize {
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| b.linears().map(|(_, l)| l.n_params()).sum::<usize>() + b.norm_params())
            .sum();
        blocks
            + self.embed.rows() * self.embed.cols()
            + self.positions.as_ref().map_or(0, Vec::len)
            + self.final_norm_params()
            + self.lm_head.as_ref().map_or(0, Linear::n_params)
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
    pub fn check_adapter(&self, adapter: &dyn AdapterDeltas) -> Result<(), ModelError> {
        let bad =
            |msg: String| ModelError::InvalidConfig(format!("adapter {}: {msg}", adapter.label()));
        let n_layers = adapter.n_layers();
        if n_layers > self.blocks.len() {
            return Err(bad(format!(
                "adapts layer {} but the model has {} layers (an adapter for another base?)",
                n_layers - 1,
                self.blocks.len()
            )));
        }
        for (layer, block) in self.blocks.iter().enumerate().take(n_layers) {
            for (target, (name, linear)) in block.slots().into_iter().enumerate() {
                let Some((out, inp)) = adapter.shape(layer, target) else {
                    continue;
                };
                let Some(linear) = linear else {
                    return Err(bad(format!(
                        "adapts layer {layer} {name}, which this {} model does not have",
                        self.cfg.arch.name()
                    )));
                };
                if (out, inp) != (linear.out_dim(), linear.in_dim()) {
                    return Err(bad(format!(
                        "layer {layer} {name}: LoRA is {out}×{inp} (B·A) but the layer is {}×{} (an adapter for another base?)",
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
            for ((name, linear), deltas) in block.slots().into_iter().zip(&block.lora) {
                let dense_f32 =
                    matches!(linear, Some(Linear::Dense(d)) if d.matrix().as_f32().is_some());
                if !deltas.is_empty() && !dense_f32 {
                    return Err(ModelError::WeightFormat(format!(
                        "layer {layer} {name}: merging a LoRA needs a dense f32 weight (load with f32 storage)"
                    )));
                }
            }
        }
        for block in &mut self.blocks {
            let deltas = std::mem::take(&mut block.lora);
            for (linear, deltas) in block.slots_mut().into_iter().zip(&deltas) {
                let Some(Linear::Dense(d)) = linear else {
                    continue;
                };
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
