//! One decoder block's weights (norms, attention and SwiGLU projections, unmerged LoRA deltas)
//! and how they load, dense or as low-rank factors.

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::kernels::{WeightFormat, WeightMatrix};
use crate::linear::{CorrectedLinear, DenseLinear, Linear, LowRankLinear};
use crate::lora::LoraDelta;
use crate::source::{WeightStorage, Weights};

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
