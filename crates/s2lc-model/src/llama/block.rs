//! One decoder block's weights (norms, attention and feed-forward projections, unmerged LoRA
//! deltas) and how they load, dense or as low-rank factors.

use crate::config::{MlpKind, ModelConfig, NormKind};
use crate::error::ModelError;
use crate::kernels::{WeightFormat, WeightMatrix};
use crate::linear::{CorrectedLinear, DenseLinear, Linear, LowRankLinear};
use crate::lora::LoraDelta;
use crate::source::{WeightStorage, Weights};

/// The names of a block's linear slots below `model.layers.N.`, in [`Block::slots`] order (the
/// order of [`crate::lora::TARGETS`]: a slot's index is an adapter's target index).
pub const LINEAR_NAMES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// One decoder block.
#[derive(Debug, Clone)]
pub struct Block {
    /// Norm weight before attention (RMSNorm, or LayerNorm with [`Block::attn_norm_bias`]).
    pub attn_norm: Vec<f32>,
    /// LayerNorm bias before attention (GPT-2); `None` for RMSNorm.
    pub attn_norm_bias: Option<Vec<f32>>,
    /// Query projection (`q_dim × d`).
    pub q_proj: Linear,
    /// Key projection (`kv_dim × d`).
    pub k_proj: Linear,
    /// Value projection (`kv_dim × d`).
    pub v_proj: Linear,
    /// Output projection (`d × q_dim`).
    pub o_proj: Linear,
    /// Norm weight before the feed-forward.
    pub ffn_norm: Vec<f32>,
    /// LayerNorm bias before the feed-forward (GPT-2); `None` for RMSNorm.
    pub ffn_norm_bias: Option<Vec<f32>>,
    /// SwiGLU gate (`ffn × d`); `None` for a non-gated MLP (GPT-2), whose hidden layer is
    /// `gelu_tanh(up·x)`. Its presence decides which of the two the block runs.
    pub gate_proj: Option<Linear>,
    /// Up projection (`ffn × d`; GPT-2's `c_fc`).
    pub up_proj: Linear,
    /// Down projection (`d × ffn`; GPT-2's `mlp.c_proj`).
    pub down_proj: Linear,
    /// Unmerged LoRA deltas per linear slot, in [`Block::slots`] order (empty: none).
    pub lora: [Vec<LoraDelta>; 7],
}

/// Loads a linear layer `[out, in]` with an optional bias `[out]` from scope `w`: a dense
/// `weight`, or low-rank factors `lowrank_u` (`[out, r]`) and `lowrank_vs` (`[r, in]`), each
/// matrix kept in `storage`, or a quantized weight with its correction (`weight_sq`, kept as
/// stored whatever `storage` says).
pub(super) fn load_linear(
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
    if w.source().contains(&w.full("weight_sq")) {
        if let Some(c) = CorrectedLinear::load(w, out, inp, bias.clone())? {
            return Ok(Linear::Corrected(c));
        }
    }
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
        // q/k/v may carry biases in every family (Qwen2); GPT-2 has them on every linear.
        let all = cfg.biases_everywhere();
        let norm_bias = |scope: &str| match cfg.norm() {
            NormKind::Rms => Ok(None),
            NormKind::Layer => w.pp(scope).get("bias", &[d]).map(Some),
        };
        Ok(Block {
            attn_norm: w.pp("input_layernorm").get("weight", &[d])?,
            attn_norm_bias: norm_bias("input_layernorm")?,
            q_proj: load_linear(&attn.pp("q_proj"), qd, d, true, storage)?,
            k_proj: load_linear(&attn.pp("k_proj"), kd, d, true, storage)?,
            v_proj: load_linear(&attn.pp("v_proj"), kd, d, true, storage)?,
            o_proj: load_linear(&attn.pp("o_proj"), d, qd, all, storage)?,
            ffn_norm: w.pp("post_attention_layernorm").get("weight", &[d])?,
            ffn_norm_bias: norm_bias("post_attention_layernorm")?,
            gate_proj: match cfg.mlp() {
                MlpKind::SwiGlu => Some(load_linear(&mlp.pp("gate_proj"), f, d, all, storage)?),
                MlpKind::GeluTanh => None,
            },
            up_proj: load_linear(&mlp.pp("up_proj"), f, d, all, storage)?,
            down_proj: load_linear(&mlp.pp("down_proj"), d, f, all, storage)?,
            lora: Default::default(),
        })
    }

    /// Every linear slot of the block with its Hugging Face name below `model.layers.N.`, in
    /// [`LINEAR_NAMES`] order; `None` for a slot the architecture does not have (GPT-2's gate).
    pub fn slots(&self) -> [(&'static str, Option<&Linear>); 7] {
        let [q, k, v, o, gate, up, down] = LINEAR_NAMES;
        [
            (q, Some(&self.q_proj)),
            (k, Some(&self.k_proj)),
            (v, Some(&self.v_proj)),
            (o, Some(&self.o_proj)),
            (gate, self.gate_proj.as_ref()),
            (up, Some(&self.up_proj)),
            (down, Some(&self.down_proj)),
        ]
    }

    /// The linear slots, mutable, in [`Block::slots`] order.
    pub fn slots_mut(&mut self) -> [Option<&mut Linear>; 7] {
        [
            Some(&mut self.q_proj),
            Some(&mut self.k_proj),
            Some(&mut self.v_proj),
            Some(&mut self.o_proj),
            self.gate_proj.as_mut(),
            Some(&mut self.up_proj),
            Some(&mut self.down_proj),
        ]
    }

    /// Every linear layer the block has, with its Hugging Face name below `model.layers.N.`, in
    /// [`Block::slots`] order without the absent slots: what analysis and compression visit.
    pub fn linears(&self) -> impl Iterator<Item = (&'static str, &Linear)> + '_ {
        self.slots()
            .into_iter()
            .filter_map(|(name, l)| l.map(|l| (name, l)))
    }

    /// Parameters of the block's two norms (weights, and biases for LayerNorm).
    pub fn norm_params(&self) -> usize {
        let bias = |b: &Option<Vec<f32>>| b.as_ref().map_or(0, Vec::len);
        self.attn_norm.len()
            + self.ffn_norm.len()
            + bias(&self.attn_norm_bias)
            + bias(&self.ffn_norm_bias)
    }

    /// The linear layer named `name` (`mlp.up_proj`, ...), if the block has it.
    pub fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        let slot = LINEAR_NAMES.iter().position(|n| *n == name)?;
        self.slots_mut().into_iter().nth(slot).flatten()
    }
}

/// The distinct inputs of a block's linear layers (what calibration statistics are taken of).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinearInput {
    /// Normed residual: input of q/k/v.
    Attention,
    /// Concatenated attention heads: input of o.
    AttentionOutput,
    /// Normed residual: input of gate/up.
    FeedForward,
    /// The MLP's hidden activation (SwiGLU, or GELU of up): input of down.
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
