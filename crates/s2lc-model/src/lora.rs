//! LoRA adapters in Hugging Face PEFT's layout, applied to the runtime's linear layers.
//!
//! A PEFT adapter directory holds `adapter_config.json` (`r`, `lora_alpha`, `target_modules`,
//! `use_rslora`, `base_model_name_or_path`, …) and `adapter_model.safetensors` with, per adapted
//! layer, `base_model.model.model.layers.N.<self_attn|mlp>.<target>.lora_A.weight` (`r × in`) and
//! `….lora_B.weight` (`out × r`). The layer then computes `y = W·x + s·B·(A·x)` with
//! `s = lora_alpha / r` (`lora_alpha / √r` with rsLoRA). S2LC applies the deltas *unmerged*, so the
//! base weights stay shared between adapters, or merges them into f32 weights on request.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use faer::Accum;
use safetensors::SafeTensors;
use serde_json::Value;

use crate::error::ModelError;
use crate::kernels::dot::QuantizedActs;
use crate::kernels::WeightMatrix;
use crate::source::bytes_to_f32;

/// The PEFT `target_modules` names S2LC can adapt, in the order of [`crate::llama::Block::linears`].
pub const TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// One layer's delta `s·B·A`, the scale folded into `B`.
#[derive(Debug, Clone)]
pub struct LoraDelta {
    /// `r × in`.
    a: WeightMatrix,
    /// `out × r`, times the scale.
    b_scaled: WeightMatrix,
}

impl LoraDelta {
    /// A delta from PEFT's `A` (`r × in`), `B` (`out × r`) and the scale.
    pub fn new(a: Vec<f32>, b: Vec<f32>, rank: usize, inp: usize, out: usize, scale: f32) -> Self {
        let b_scaled = b.iter().map(|v| v * scale).collect();
        LoraDelta {
            a: WeightMatrix::from_f32(a, rank, inp),
            b_scaled: WeightMatrix::from_f32(b_scaled, out, rank),
        }
    }

    /// Rank `r`.
    pub fn rank(&self) -> usize {
        self.a.rows()
    }

    /// Input features.
    pub fn in_dim(&self) -> usize {
        self.a.cols()
    }

    /// Output features.
    pub fn out_dim(&self) -> usize {
        self.b_scaled.rows()
    }

    /// `out (n × out_dim) += s·B·(A·x)` for `x` (`n × in_dim`); `mid` is scratch.
    pub fn apply(
        &self,
        x: &[f32],
        n: usize,
        out: &mut [f32],
        mid: &mut Vec<f32>,
        acts: &mut QuantizedActs,
    ) {
        mid.resize(n * self.rank(), 0.0);
        self.a.matmul(x, n, mid, Accum::Replace, acts);
        self.b_scaled.matmul(mid, n, out, Accum::Add, acts);
    }

    /// The dense `s·B·A` (`out × in`, row-major), for merging.
    pub fn dense(&self) -> Vec<f32> {
        let (a, b) = (self.a.to_f32(), self.b_scaled.to_f32());
        let (r, inp, out) = (self.rank(), self.in_dim(), self.out_dim());
        let mut w = vec![0.0f32; out * inp];
        for (o, row) in w.chunks_exact_mut(inp).enumerate() {
            for k in 0..r {
                crate::kernels::ops::axpy(row, b[o * r + k], &a[k * inp..(k + 1) * inp]);
            }
        }
        w
    }
}

/// The `lora_A` and `lora_B` tensors of one layer (values and shape) while an adapter is read.
#[derive(Default)]
struct LoraPair {
    a: Option<(Vec<f32>, Vec<usize>)>,
    b: Option<(Vec<f32>, Vec<usize>)>,
}

/// A PEFT LoRA adapter as loaded: its settings and, per layer and target, the delta.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// Where it was read from.
    pub path: PathBuf,
    /// `r` of the config.
    pub rank: usize,
    /// `lora_alpha`.
    pub alpha: f32,
    /// `s`, the factor on `B·A`.
    pub scale: f32,
    /// `base_model_name_or_path`, if given.
    pub base_model: Option<String>,
    /// Per layer, the delta of each target in [`TARGETS`] order.
    pub layers: Vec<[Option<LoraDelta>; 7]>,
}

impl LoraAdapter {
    /// Reads a PEFT adapter directory. Shapes are checked against the model by
    /// [`crate::llama::LlamaModel::attach_adapter`].
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let config_path = dir.join("adapter_config.json");
        let bad = |msg: String| ModelError::InvalidConfig(format!("{}: {msg}", dir.display()));
        let text = std::fs::read_to_string(&config_path).map_err(|source| ModelError::Io {
            path: config_path.clone(),
            source,
        })?;
        let config: Value = serde_json::from_str(&text).map_err(|source| ModelError::Config {
            path: config_path.clone(),
            source,
        })?;
        let rank = config["r"]
            .as_u64()
            .ok_or_else(|| bad("adapter_config.json has no integer 'r'".into()))?
            as usize;
        if rank == 0 {
            return Err(bad("LoRA rank r is 0".into()));
        }
        let alpha = config["lora_alpha"].as_f64().unwrap_or(rank as f64) as f32;
        let scale = if config["use_rslora"].as_bool().unwrap_or(false) {
            alpha / (rank as f32).sqrt()
        } else {
            alpha / rank as f32
        };
        let targets: Vec<String> = match &config["target_modules"] {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => return Err(bad("adapter_config.json has no target_modules".into())),
        };
        for t in &targets {
            if !TARGETS.contains(&t.as_str()) {
                return Err(bad(format!(
                    "unknown target module '{t}' (S2LC adapts {})",
                    TARGETS.join(", ")
                )));
            }
        }
        let weights_path = dir.join("adapter_model.safetensors");
        let bytes = std::fs::read(&weights_path).map_err(|source| ModelError::Io {
            path: weights_path.clone(),
            source,
        })?;
        let corrupt = |message: String| ModelError::Safetensors {
            path: weights_path.clone(),
            message,
        };
        let st = SafeTensors::deserialize(&bytes).map_err(|e| corrupt(e.to_string()))?;
        let mut layers: Vec<[Option<LoraDelta>; 7]> = Vec::new();
        // (layer, target) → the A and B tensors with their shapes, as they are found.
        let mut pending: HashMap<(usize, usize), LoraPair> = HashMap::new();
        for (name, view) in st.tensors() {
            let (layer, target, is_a) = parse_name(&name).ok_or_else(|| {
                bad(format!(
                    "unexpected tensor '{name}' (not a PEFT LoRA A/B weight)"
                ))
            })?;
            let data = bytes_to_f32(&name, view.dtype(), view.data())?;
            let entry = pending.entry((layer, target)).or_default();
            let side = if is_a { &mut entry.a } else { &mut entry.b };
            *side = Some((data, view.shape().to_vec()));
        }
        for ((layer, target), pair) in pending {
            let name = format!("layer {layer} {}", TARGETS[target]);
            let (Some((a, a_shape)), Some((b, b_shape))) = (pair.a, pair.b) else {
                return Err(bad(format!("{name}: lora_A or lora_B is missing")));
            };
            if a_shape.len() != 2 || b_shape.len() != 2 || a_shape[0] != rank || b_shape[1] != rank
            {
                return Err(bad(format!(
                    "{name}: lora_A {a_shape:?} and lora_B {b_shape:?} do not have rank {rank}"
                )));
            }
            if layers.len() <= layer {
                layers.resize_with(layer + 1, Default::default);
            }
            layers[layer][target] = Some(LoraDelta::new(a, b, rank, a_shape[1], b_shape[0], scale));
        }
        if layers.is_empty() {
            return Err(bad("adapter_model.safetensors holds no LoRA weights".into()));
        }
        Ok(LoraAdapter {
            path: dir.to_path_buf(),
            rank,
            alpha,
            scale,
            base_model: config["base_model_name_or_path"]
                .as_str()
                .map(str::to_string),
            layers,
        })
    }

    /// Adapted (layer, target) pairs.
    pub fn n_deltas(&self) -> usize {
        self.layers.iter().flatten().flatten().count()
    }
}

/// `(layer, target index, is_A)` of a PEFT tensor name such as
/// `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` (an adapter name between
/// `lora_A` and `weight`, as PEFT uses in memory, is accepted too).
pub fn parse_name(name: &str) -> Option<(usize, usize, bool)> {
    let rest = name.strip_prefix("base_model.model.model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let rest = rest
        .strip_prefix("self_attn.")
        .or_else(|| rest.strip_prefix("mlp."))?;
    let (target, rest) = rest.split_once('.')?;
    let target = TARGETS.iter().position(|t| *t == target)?;
    let (which, rest) = rest.split_once('.')?;
    let is_a = match which {
        "lora_A" => true,
        "lora_B" => false,
        _ => return None,
    };
    (rest == "weight" || rest.ends_with(".weight") && rest.matches('.').count() == 1)
        .then_some((layer, target, is_a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_names_map_to_layers_and_targets() {
        assert_eq!(
            parse_name("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"),
            Some((3, 0, true))
        );
        assert_eq!(
            parse_name("base_model.model.model.layers.29.mlp.down_proj.lora_B.weight"),
            Some((29, 6, false))
        );
        assert_eq!(
            parse_name("base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight"),
            Some((0, 5, false))
        );
        for bad in [
            "base_model.model.model.layers.x.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.1.self_attn.qkv.lora_A.weight",
            "base_model.model.model.layers.1.self_attn.q_proj.lora_C.weight",
            "model.layers.1.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.1.self_attn.q_proj.lora_A.bias",
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn delta_applies_scaled_b_times_a() {
        let (r, inp, out) = (2, 3, 4);
        let a: Vec<f32> = (0..r * inp).map(|i| i as f32 - 2.0).collect();
        let b: Vec<f32> = (0..out * r).map(|i| 0.5 * i as f32).collect();
        let d = LoraDelta::new(a.clone(), b.clone(), r, inp, out, 0.25);
        let x = [1.0f32, -2.0, 0.5];
        let mut y = vec![1.0f32; out];
        d.apply(
            &x,
            1,
            &mut y,
            &mut Vec::new(),
            &mut QuantizedActs::default(),
        );
        let dense = d.dense();
        for o in 0..out {
            let ax: Vec<f32> = (0..r)
                .map(|k| (0..inp).map(|i| a[k * inp + i] * x[i]).sum())
                .collect();
            let want = 1.0 + 0.25 * (0..r).map(|k| b[o * r + k] * ax[k]).sum::<f32>();
            assert!((y[o] - want).abs() < 1e-5, "{} vs {want}", y[o]);
            let merged: f32 = 1.0 + (0..inp).map(|i| dense[o * inp + i] * x[i]).sum::<f32>();
            assert!((merged - want).abs() < 1e-5);
        }
    }
}
