//! LoRA adapters in Hugging Face PEFT's layout, applied to the runtime's linear layers.
//!
//! A PEFT adapter directory holds `adapter_config.json` (`r`, `lora_alpha`, `target_modules`,
//! `use_rslora`, `base_model_name_or_path`, …) and `adapter_model.safetensors` with, per adapted
//! layer, `base_model.model.model.layers.N.<self_attn|mlp>.<target>.lora_A.weight` (`r × in`) and
//! `….lora_B.weight` (`out × r`). The layer then computes `y = W·x + s·B·(A·x)` with
//! `s = lora_alpha / r` (`lora_alpha / √r` with rsLoRA); PEFT's `rank_pattern` / `alpha_pattern`
//! override `r` and `lora_alpha` per module. S2LC applies the deltas *unmerged*, so the base weights
//! stay shared between adapters, or merges them into f32 weights on request.
//!
//! S2LC also writes adapters in the same layout ([`LoraAdapter::save`]), e.g. after re-ranking every
//! delta by its spectrum ([`LoraAdapter::truncate`]).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use faer::{Accum, MatRef};
use safetensors::SafeTensors;
use serde_json::{json, Map, Value};

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::kernels::dot::QuantizedActs;
use crate::kernels::WeightMatrix;
use crate::source::{bytes_to_f32, write_file_atomic, write_safetensors, Tensor};

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
    pub fn new(
        a: Vec<f32>,
        mut b: Vec<f32>,
        rank: usize,
        inp: usize,
        out: usize,
        scale: f32,
    ) -> Self {
        if scale != 1.0 {
            b.iter_mut().for_each(|v| *v *= scale);
        }
        LoraDelta {
            a: WeightMatrix::from_f32(a, rank, inp),
            b_scaled: WeightMatrix::from_f32(b, out, rank),
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

    /// `(A, s·B)` as f32, row-major (`r × in` and `out × r`).
    pub fn factors(&self) -> (Cow<'_, [f32]>, Cow<'_, [f32]>) {
        (self.a.to_f32(), self.b_scaled.to_f32())
    }

    /// Thin SVD of `s·B·A` through its factors (`min(r, out, in)` values).
    pub fn svd(&self) -> Result<s2lc_spectral::Svd, ModelError> {
        let (a, b) = self.factors();
        let (r, inp, out) = (self.rank(), self.in_dim(), self.out_dim());
        let a = MatRef::from_row_major_slice(&a, r, inp);
        let b = MatRef::from_row_major_slice(&b, out, r);
        Ok(s2lc_spectral::factored_svd(b, a)?)
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

/// Caps on what an adapter read from untrusted storage (an Adapter Store entry, a pushed pack)
/// may declare, checked before anything is allocated for it. [`AdapterLimits::for_model`] derives
/// them from the base model's shapes; [`AdapterLimits::GENEROUS`] is for loaders without a model
/// (the CLI on local files), where only absurd sizes are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdapterLimits {
    /// Layers an adapter may adapt (a layer index is below this).
    pub max_layers: usize,
    /// Largest input or output width of an adapted matrix.
    pub max_dim: usize,
    /// Largest rank of a delta, and width of a shared basis.
    pub max_rank: usize,
    /// Values all the matrices of one artifact may hold once decoded (f32 each).
    pub max_values: usize,
    /// Largest file of an artifact, in bytes.
    pub max_file_bytes: u64,
}

impl AdapterLimits {
    /// Caps for a loader without a base model: far above any adapter of a real model.
    pub const GENEROUS: AdapterLimits = AdapterLimits {
        max_layers: 1 << 12,
        max_dim: 1 << 18,
        max_rank: 1 << 16,
        max_values: 1 << 33,
        max_file_bytes: 1 << 36,
    };

    /// Caps for adapters of a model of `cfg`: its layers, its widest projection, ranks up to the
    /// full rank of its widest target, and values of a pack of full-rank deltas of every target
    /// (bases and cores: twice those of a full-rank PEFT adapter).
    pub fn for_model(cfg: &ModelConfig) -> Self {
        let (d, q, kv, ff) = (
            cfg.hidden_size,
            cfg.n_heads * cfg.head_dim,
            cfg.n_kv_heads * cfg.head_dim,
            cfg.intermediate_size,
        );
        // (in, out) of each target in [`TARGETS`] order.
        let shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, ff), (d, ff), (ff, d)];
        let full_rank = |(i, o): (usize, usize)| (i + o).saturating_mul(i.min(o));
        let per_layer = shapes
            .iter()
            .fold(0usize, |acc, &s| acc.saturating_add(full_rank(s)));
        let max_values = per_layer
            .saturating_mul(cfg.n_layers)
            .saturating_mul(2)
            .max(1);
        AdapterLimits {
            max_layers: cfg.n_layers,
            max_dim: d.max(q).max(kv).max(ff),
            max_rank: shapes.iter().map(|&(i, o)| i.min(o)).max().unwrap_or(0),
            max_values,
            max_file_bytes: (max_values as u64)
                .saturating_mul(4)
                .saturating_add(1 << 24),
        }
    }

    /// These caps with at most `values` values per artifact (e.g. a cache's budget in f32s).
    pub fn with_max_values(self, values: usize) -> Self {
        AdapterLimits {
            max_values: self.max_values.min(values),
            ..self
        }
    }
}

impl Default for AdapterLimits {
    fn default() -> Self {
        AdapterLimits::GENEROUS
    }
}

/// Reads the file `path` of an untrusted artifact: a regular file (not a device, FIFO or
/// directory, which could be endless or block) of at most `max_bytes`, read no further than that.
pub fn read_artifact_file(path: &Path, max_bytes: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind, Read};
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(Error::new(ErrorKind::InvalidData, "not a regular file"));
    }
    let too_large = |n: u64| {
        Error::new(
            ErrorKind::InvalidData,
            format!("{n} bytes, more than the {max_bytes} accepted"),
        )
    };
    if meta.len() > max_bytes {
        return Err(too_large(meta.len()));
    }
    // The length can change under us: read at most one byte past the cap to notice.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Largest `adapter_config.json` read (real ones are a few KB).
const MAX_CONFIG_BYTES: u64 = 1 << 24;

/// One tensor of an adapter file, checked but not yet converted.
struct PendingTensor<'a> {
    name: String,
    view: safetensors::tensor::TensorView<'a>,
}

/// The `lora_A` and `lora_B` tensors of one layer while an adapter is read.
#[derive(Default)]
struct LoraPair<'a> {
    a: Option<PendingTensor<'a>>,
    b: Option<PendingTensor<'a>>,
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
    /// [`crate::llama::LlamaModel::attach_adapter`]; sizes only against
    /// [`AdapterLimits::GENEROUS`] (see [`LoraAdapter::load_with`]).
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        Self::load_with(dir, &AdapterLimits::GENEROUS)
    }

    /// Reads a PEFT adapter directory from untrusted storage: both files must be regular files
    /// within `limits`, and every layer, shape and rank is checked against `limits` before its
    /// values are converted.
    pub fn load_with(dir: &Path, limits: &AdapterLimits) -> Result<Self, ModelError> {
        let config_path = dir.join("adapter_config.json");
        let text = read_artifact_file(&config_path, MAX_CONFIG_BYTES)
            .map_err(|source| ModelError::io(&config_path, source))?;
        let weights_path = dir.join("adapter_model.safetensors");
        let bytes = read_artifact_file(&weights_path, limits.max_file_bytes)
            .map_err(|source| ModelError::io(&weights_path, source))?;
        Self::from_bytes(dir, &text, &bytes, limits)
    }

    /// An adapter from the bytes of its `adapter_config.json` and `adapter_model.safetensors`;
    /// errors and [`LoraAdapter::path`] name `dir`.
    pub fn from_bytes(
        dir: &Path,
        config: &[u8],
        weights: &[u8],
        limits: &AdapterLimits,
    ) -> Result<Self, ModelError> {
        let config_path = dir.join("adapter_config.json");
        let weights_path = dir.join("adapter_model.safetensors");
        let bad = |msg: String| ModelError::InvalidConfig(format!("{}: {msg}", dir.display()));
        let config: Value =
            serde_json::from_slice(config).map_err(|source| ModelError::Config {
                path: config_path.clone(),
                source,
            })?;
        let rank = match config["r"].as_u64() {
            Some(0) => return Err(bad("LoRA rank r is 0".into())),
            Some(r) if r <= limits.max_rank as u64 => r as usize,
            Some(r) => {
                return Err(bad(format!(
                    "LoRA rank r is {r}, above the {} accepted",
                    limits.max_rank
                )))
            }
            None => return Err(bad("adapter_config.json has no integer 'r'".into())),
        };
        let alpha = match &config["lora_alpha"] {
            Value::Null => rank as f32,
            v => v
                .as_f64()
                .map(|a| a as f32)
                .filter(|a| a.is_finite())
                .ok_or_else(|| bad(format!("lora_alpha {v} is not a finite number")))?,
        };
        let rslora = config["use_rslora"].as_bool().unwrap_or(false);
        let scale_of = |alpha: f32, rank: usize| {
            if rslora {
                alpha / (rank as f32).sqrt()
            } else {
                alpha / rank as f32
            }
        };
        let rank_pattern =
            Pattern::read(&config, "rank_pattern", Some(limits.max_rank)).map_err(bad)?;
        let alpha_pattern = Pattern::read(&config, "alpha_pattern", None).map_err(bad)?;
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
        let corrupt = |message: String| ModelError::Safetensors {
            path: weights_path.clone(),
            message,
        };
        let st = SafeTensors::deserialize(weights).map_err(|e| corrupt(e.to_string()))?;
        // (layer, target) → the A and B tensors, as they are found: only names and shapes are
        // looked at until every pair has been checked against the limits.
        let mut pending: HashMap<(usize, usize), LoraPair<'_>> = HashMap::new();
        for (name, view) in st.tensors() {
            let (layer, target, is_a) = parse_name(&name).ok_or_else(|| {
                bad(format!(
                    "unexpected tensor '{name}' (not a PEFT LoRA A/B weight)"
                ))
            })?;
            if layer >= limits.max_layers {
                return Err(bad(format!(
                    "tensor '{name}' adapts layer {layer}, but at most {} layers are accepted",
                    limits.max_layers
                )));
            }
            let entry = pending.entry((layer, target)).or_default();
            let side = if is_a { &mut entry.a } else { &mut entry.b };
            if side.is_some() {
                return Err(bad(format!(
                    "{}: lora_{} is given twice",
                    module_name(layer, target),
                    if is_a { "A" } else { "B" }
                )));
            }
            *side = Some(PendingTensor { name, view });
        }
        if pending.is_empty() {
            return Err(bad("adapter_model.safetensors holds no LoRA weights".into()));
        }
        let mut shapes = Vec::with_capacity(pending.len());
        let mut values = 0usize;
        for (&(layer, target), pair) in &pending {
            let module = module_name(layer, target);
            let (Some(a), Some(b)) = (&pair.a, &pair.b) else {
                return Err(bad(format!("{module}: lora_A or lora_B is missing")));
            };
            let r = rank_pattern.lookup(&module).map_or(rank, |v| v as usize);
            let (a_shape, b_shape) = (a.view.shape(), b.view.shape());
            let [a_rows, inp] = a_shape[..] else {
                return Err(bad(format!("{module}: lora_A has shape {a_shape:?}")));
            };
            let [out, b_cols] = b_shape[..] else {
                return Err(bad(format!("{module}: lora_B has shape {b_shape:?}")));
            };
            if a_rows != r || b_cols != r {
                return Err(bad(format!(
                    "{module}: lora_A {a_shape:?} and lora_B {b_shape:?} do not have rank {r}"
                )));
            }
            if inp == 0 || out == 0 || inp > limits.max_dim || out > limits.max_dim {
                return Err(bad(format!(
                    "{module}: {out}×{inp} (B·A), outside 1..={} per side",
                    limits.max_dim
                )));
            }
            values = r
                .checked_mul(inp + out)
                .and_then(|n| values.checked_add(n))
                .filter(|&n| n <= limits.max_values)
                .ok_or_else(|| {
                    bad(format!(
                        "more than the {} values accepted (at {module})",
                        limits.max_values
                    ))
                })?;
            let alpha = alpha_pattern.lookup(&module).map_or(alpha, |v| v as f32);
            shapes.push(((layer, target), r, inp, out, scale_of(alpha, r)));
        }
        let n_layers = pending.keys().map(|&(l, _)| l + 1).max().unwrap_or(0);
        let mut layers: Vec<[Option<LoraDelta>; 7]> = Vec::new();
        layers.resize_with(n_layers, Default::default);
        for (key, r, inp, out, scale) in shapes {
            let pair = pending.remove(&key).expect("every pair was checked");
            let (Some(a), Some(b)) = (pair.a, pair.b) else {
                unreachable!("both sides were checked")
            };
            let a = bytes_to_f32(&a.name, a.view.dtype(), a.view.data())?;
            let b = bytes_to_f32(&b.name, b.view.dtype(), b.view.data())?;
            layers[key.0][key.1] = Some(LoraDelta::new(a, b, r, inp, out, scale));
        }
        Ok(LoraAdapter {
            path: dir.to_path_buf(),
            rank,
            alpha,
            scale: scale_of(alpha, rank),
            base_model: config["base_model_name_or_path"]
                .as_str()
                .map(str::to_string),
            layers,
        })
    }

    /// Writes the adapter as PEFT does: `adapter_config.json` and `adapter_model.safetensors` (f32)
    /// in `dir` (created if needed; files written under temporary names and renamed). The scales
    /// are folded into `B`, so `lora_alpha` equals each module's rank; `r` is the largest rank and
    /// modules of another rank are listed in `rank_pattern` / `alpha_pattern` by full module name.
    pub fn save(&self, dir: &Path) -> Result<(), ModelError> {
        let max_rank = self
            .deltas()
            .map(|(_, _, d)| d.rank())
            .max()
            .ok_or_else(|| {
                ModelError::EmptyInput(format!("adapter {} has no deltas", self.path.display()))
            })?;
        let (mut rank_pattern, mut alpha_pattern) = (Map::new(), Map::new());
        let mut present = [false; 7];
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (layer, target, delta) in self.deltas() {
            present[target] = true;
            let (a, b) = delta.factors();
            let (r, inp, out) = (delta.rank(), delta.in_dim(), delta.out_dim());
            let module = module_name(layer, target);
            if r != max_rank {
                rank_pattern.insert(module.clone(), json!(r));
                alpha_pattern.insert(module.clone(), json!(r));
            }
            for (side, shape, data) in [("A", vec![r, inp], a), ("B", vec![out, r], b)] {
                let name = format!("base_model.model.{module}.lora_{side}.weight");
                let data = data.into_owned();
                tensors.push((name, Tensor { shape, data }));
            }
        }
        let targets: Vec<&str> = TARGETS
            .iter()
            .zip(present)
            .filter_map(|(t, p)| p.then_some(*t))
            .collect();
        let config = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model,
            "r": max_rank,
            "lora_alpha": max_rank,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "target_modules": targets,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_rslora": false,
            "use_dora": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "revision": null,
        });
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        write_safetensors(
            &dir.join("adapter_model.safetensors"),
            tensors.iter().map(|(n, t)| (n.as_str(), t)),
            Some(HashMap::from([("format".to_string(), "pt".to_string())])),
        )?;
        let text = serde_json::to_string_pretty(&config).unwrap_or_default();
        write_file_atomic(&dir.join("adapter_config.json"), text.as_bytes())
    }

    /// Every delta with its layer and target index, in layer then [`TARGETS`] order.
    pub fn deltas(&self) -> impl Iterator<Item = (usize, usize, &LoraDelta)> {
        self.layers.iter().enumerate().flat_map(|(l, slots)| {
            slots
                .iter()
                .enumerate()
                .filter_map(move |(t, d)| d.as_ref().map(|d| (l, t, d)))
        })
    }

    /// Re-ranks every delta by its spectrum: the smallest rank keeping `energy` of `‖s·B·A‖²_F`
    /// (all of it with `None`), at most `max_rank`, at least 1. The new factors are
    /// `A' = V_kᵀ` and `B' = U_k Σ_k` of the thin SVD, so `B'·A'` is the best rank-`k` delta.
    pub fn truncate(
        &self,
        energy: Option<f64>,
        max_rank: Option<usize>,
    ) -> Result<(LoraAdapter, Vec<DeltaTruncation>), ModelError> {
        let mut layers: Vec<[Option<LoraDelta>; 7]> = vec![Default::default(); self.layers.len()];
        let mut report = Vec::new();
        for (layer, target, delta) in self.deltas() {
            let svd = delta.svd()?;
            let full = svd.s.len().max(1);
            let k = energy
                .map_or(full, |e| s2lc_spectral::rank_for_energy(&svd.s, e))
                .min(max_rank.unwrap_or(usize::MAX))
                .clamp(1, full);
            let total: f64 = svd.s.iter().map(|&v| (v as f64).powi(2)).sum();
            let kept: f64 = svd.s[..k.min(svd.s.len())]
                .iter()
                .map(|&v| (v as f64).powi(2))
                .sum();
            let (inp, out) = (delta.in_dim(), delta.out_dim());
            let a: Vec<f32> = (0..k)
                .flat_map(|i| (0..inp).map(move |j| (i, j)))
                .map(|(i, j)| if i < svd.s.len() { svd.v[(j, i)] } else { 0.0 })
                .collect();
            let b: Vec<f32> = (0..out)
                .flat_map(|o| (0..k).map(move |i| (o, i)))
                .map(|(o, i)| {
                    if i < svd.s.len() {
                        svd.u[(o, i)] * svd.s[i]
                    } else {
                        0.0
                    }
                })
                .collect();
            layers[layer][target] = Some(LoraDelta::new(a, b, k, inp, out, 1.0));
            report.push(DeltaTruncation {
                layer,
                target,
                rank_before: delta.rank(),
                rank_after: k,
                energy_kept: if total > 0.0 { kept / total } else { 1.0 },
                sq_norm: total,
            });
        }
        let rank = report.iter().map(|t| t.rank_after).max().unwrap_or(1);
        let adapter = LoraAdapter {
            path: self.path.clone(),
            rank,
            alpha: rank as f32,
            scale: 1.0,
            base_model: self.base_model.clone(),
            layers,
        };
        Ok((adapter, report))
    }

    /// Parameters of all `A` and `B` factors.
    pub fn n_params(&self) -> usize {
        self.deltas()
            .map(|(_, _, d)| d.rank() * (d.in_dim() + d.out_dim()))
            .sum()
    }

    /// Adapted (layer, target) pairs.
    pub fn n_deltas(&self) -> usize {
        self.layers.iter().flatten().flatten().count()
    }
}

/// What [`LoraAdapter::truncate`] did to one delta.
#[derive(Debug, Clone, PartialEq)]
pub struct DeltaTruncation {
    /// Layer index.
    pub layer: usize,
    /// Index into [`TARGETS`].
    pub target: usize,
    /// Rank before.
    pub rank_before: usize,
    /// Rank after.
    pub rank_after: usize,
    /// Fraction of `‖ΔW‖²_F` kept (1 − squared relative Frobenius error).
    pub energy_kept: f64,
    /// `‖ΔW‖²_F` before truncation (to weight the adapter-wide energy).
    pub sq_norm: f64,
}

/// The module name PEFT uses for a target of a layer: `model.layers.N.self_attn.q_proj`.
pub fn module_name(layer: usize, target: usize) -> String {
    let group = if target < 4 { "self_attn" } else { "mlp" };
    format!("model.layers.{layer}.{group}.{}", TARGETS[target])
}

/// PEFT's `rank_pattern` / `alpha_pattern`: per-module overrides keyed by a module name or a
/// suffix of one (PEFT matches `(.*\.)?KEY$` as a regular expression; S2LC accepts the literal
/// keys PEFT and S2LC write, with `\.` read as `.`, and refuses other regular expressions).
struct Pattern(Vec<(String, f64)>);

impl Pattern {
    /// The pattern `field` of `config`; with `max_rank`, a rank pattern, whose values must be
    /// whole numbers in `1..=max_rank` (`0.5` would otherwise truncate to rank 0).
    fn read(config: &Value, field: &str, max_rank: Option<usize>) -> Result<Self, String> {
        let Some(map) = config[field].as_object() else {
            return Ok(Pattern(Vec::new()));
        };
        let mut keys = Vec::new();
        for (key, value) in map {
            let literal = key.replace("\\.", ".");
            if literal.contains(|c: char| "^$*+?()[]{}|\\".contains(c)) {
                return Err(format!(
                    "{field} key '{key}' is a regular expression; S2LC matches module names literally"
                ));
            }
            let v = match max_rank {
                Some(max) => value
                    .as_u64()
                    .filter(|v| (1..=max as u64).contains(v))
                    .map(|v| v as f64)
                    .ok_or_else(|| {
                        format!("{field}['{key}'] is {value}, not a whole rank in 1..={max}")
                    })?,
                None => value
                    .as_f64()
                    .filter(|v| *v > 0.0 && v.is_finite())
                    .ok_or_else(|| format!("{field}['{key}'] is not a positive number"))?,
            };
            keys.push((literal, v));
        }
        Ok(Pattern(keys))
    }

    /// The value of the longest key naming `module` or a dotted suffix of it (PEFT takes the
    /// first matching key in file order; they agree unless two keys match one module).
    fn lookup(&self, module: &str) -> Option<f64> {
        self.0
            .iter()
            .filter(|(key, _)| {
                module == key
                    || module
                        .strip_suffix(key.as_str())
                        .is_some_and(|head| head.ends_with('.'))
            })
            .max_by_key(|(key, _)| key.len())
            .map(|(_, v)| *v)
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

    /// A synthetic adapter: layer 0 q_proj (rank 3) and layer 1 down_proj (rank 2).
    fn synthetic() -> LoraAdapter {
        // xorshift values in [-0.5, 0.5): full-rank factors.
        let m = |n: usize, seed: u64| -> Vec<f32> {
            let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect()
        };
        let mut layers: Vec<[Option<LoraDelta>; 7]> = vec![Default::default(); 2];
        layers[0][0] = Some(LoraDelta::new(m(3 * 8, 1), m(6 * 3, 2), 3, 8, 6, 0.5));
        layers[1][6] = Some(LoraDelta::new(m(2 * 5, 3), m(8 * 2, 4), 2, 5, 8, 2.0));
        LoraAdapter {
            path: PathBuf::from("synthetic"),
            rank: 3,
            alpha: 1.5,
            scale: 0.5,
            base_model: Some("base".into()),
            layers,
        }
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn saved_adapter_reloads_with_the_same_deltas_and_mixed_ranks() {
        let adapter = synthetic();
        let dir = std::env::temp_dir().join(format!("s2lc-lora-save-{}", std::process::id()));
        adapter.save(&dir).unwrap();
        let config: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(config["r"], 3);
        assert_eq!(config["target_modules"], json!(["q_proj", "down_proj"]));
        assert_eq!(config["rank_pattern"]["model.layers.1.mlp.down_proj"], 2);
        let back = LoraAdapter::load(&dir).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(back.base_model.as_deref(), Some("base"));
        let before: Vec<_> = adapter
            .deltas()
            .map(|(l, t, d)| (l, t, d.dense()))
            .collect();
        let after: Vec<_> = back.deltas().map(|(l, t, d)| (l, t, d.dense())).collect();
        assert_eq!(before.len(), after.len());
        for ((l0, t0, d0), (l1, t1, d1)) in before.iter().zip(&after) {
            assert_eq!((l0, t0), (l1, t1));
            assert!(max_diff(d0, d1) < 1e-6);
        }
    }

    #[test]
    fn truncation_keeps_the_best_rank_k_delta() {
        let adapter = synthetic();
        let (same, report) = adapter.truncate(None, None).unwrap();
        for ((_, _, d0), (_, _, d1)) in adapter.deltas().zip(same.deltas()) {
            assert!(max_diff(&d0.dense(), &d1.dense()) < 1e-4);
        }
        assert!(report.iter().all(|t| (t.energy_kept - 1.0).abs() < 1e-9));
        let (cut, report) = adapter.truncate(None, Some(1)).unwrap();
        for ((_, _, d0), ((_, _, d1), t)) in adapter.deltas().zip(cut.deltas().zip(&report)) {
            assert_eq!(d1.rank(), 1);
            // Eckart–Young: the squared error is the discarded energy.
            let err: f64 = d0
                .dense()
                .iter()
                .zip(d1.dense())
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum();
            let discarded = (1.0 - t.energy_kept) * t.sq_norm;
            assert!(
                (err - discarded).abs() <= 1e-4 * t.sq_norm,
                "{err} vs {discarded}"
            );
            assert!(t.energy_kept < 1.0 && t.energy_kept > 0.0);
        }
        let (by_energy, report) = adapter.truncate(Some(0.999_999), None).unwrap();
        assert_eq!(by_energy.n_params(), adapter.n_params());
        assert!(report.iter().all(|t| t.rank_after == t.rank_before));
    }

    #[test]
    fn rank_patterns_match_module_suffixes_and_refuse_regexes() {
        let config = json!({"rank_pattern": {"q_proj": 2, "model.layers.1.self_attn.q_proj": 5}});
        let p = Pattern::read(&config, "rank_pattern", Some(64)).unwrap();
        assert_eq!(p.lookup("model.layers.0.self_attn.q_proj"), Some(2.0));
        assert_eq!(p.lookup("model.layers.1.self_attn.q_proj"), Some(5.0));
        assert_eq!(p.lookup("model.layers.1.self_attn.qq_proj"), None);
        let escaped = json!({"alpha_pattern": {"model\\.layers\\.3\\.mlp\\.up_proj": 7}});
        let p = Pattern::read(&escaped, "alpha_pattern", None).unwrap();
        assert_eq!(p.lookup("model.layers.3.mlp.up_proj"), Some(7.0));
        let err = Pattern::read(
            &json!({"rank_pattern": {"^model.*q_proj": 2}}),
            "rank_pattern",
            Some(64),
        )
        .err()
        .unwrap();
        assert!(err.contains("regular expression"), "{err}");
        for bad in [
            json!(0),
            json!(0.5),
            json!(2.5),
            json!(65),
            json!("4"),
            json!(-1),
        ] {
            let err = Pattern::read(
                &json!({"rank_pattern": {"q_proj": bad}}),
                "rank_pattern",
                Some(64),
            )
            .err()
            .unwrap();
            assert!(err.contains("not a whole rank"), "{err}");
        }
        let err = Pattern::read(
            &json!({"alpha_pattern": {"q_proj": 0}}),
            "alpha_pattern",
            None,
        )
        .err()
        .unwrap();
        assert!(err.contains("positive"), "{err}");
    }

    /// The bytes of an adapter file holding `tensors` (name, shape) of zeros, f32.
    fn weights(tensors: &[(&str, Vec<usize>)]) -> Vec<u8> {
        let data: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, shape)| vec![0u8; 4 * shape.iter().product::<usize>()])
            .collect();
        let views: Vec<_> = tensors
            .iter()
            .zip(&data)
            .map(|((name, shape), bytes)| {
                let view = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    shape.clone(),
                    bytes,
                )
                .unwrap();
                (name.to_string(), view)
            })
            .collect();
        safetensors::serialize(views, None).unwrap()
    }

    const QA: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    const QB: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

    fn config(extra: Value) -> Vec<u8> {
        let mut c = json!({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]});
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::to_vec(&c).unwrap()
    }

    fn load(config: &[u8], weights: &[u8]) -> Result<LoraAdapter, String> {
        let limits = AdapterLimits {
            max_layers: 4,
            max_dim: 64,
            max_rank: 8,
            max_values: 3_000,
            max_file_bytes: 1 << 20,
        };
        LoraAdapter::from_bytes(Path::new("adapter"), config, weights, &limits)
            .map_err(|e| e.to_string())
    }

    /// Issue 22: a `rank_pattern` of 0.5 became rank 0 (with rank-0 tensors it passed every
    /// check and panicked in `gemv`); now it is refused at load, as is any non-integer rank.
    #[test]
    fn fractional_or_zero_ranks_are_refused_at_load() {
        let zero = weights(&[(QA, vec![0, 8]), (QB, vec![8, 0])]);
        for pattern in [json!(0.5), json!(0), json!(1.5), json!(-2)] {
            let err =
                load(&config(json!({"rank_pattern": {"q_proj": pattern}})), &zero).unwrap_err();
            assert!(err.contains("not a whole rank"), "{err}");
        }
        for r in [json!(0), json!(0.5), json!(2.0), json!("2")] {
            let err = load(&config(json!({ "r": r })), &zero).unwrap_err();
            assert!(err.contains("'r'") || err.contains("rank r is 0"), "{err}");
        }
        // The rank-0 tensors themselves do not have the config's rank.
        let err = load(&config(json!({})), &zero).unwrap_err();
        assert!(err.contains("do not have rank 2"), "{err}");
        let ok = weights(&[(QA, vec![2, 8]), (QB, vec![8, 2])]);
        let a = load(&config(json!({"rank_pattern": {"q_proj": 2}})), &ok).unwrap();
        assert_eq!(a.layers[0][0].as_ref().unwrap().rank(), 2);
    }

    /// Issue 22: the layer index of a tensor name drove `resize_with(layer + 1)` unbounded.
    #[test]
    fn layer_index_and_sizes_are_capped_before_allocation() {
        let far = "base_model.model.model.layers.4000000000.self_attn.q_proj.lora_A.weight";
        let err = load(&config(json!({})), &weights(&[(far, vec![2, 8])])).unwrap_err();
        assert!(err.contains("at most 4 layers"), "{err}");
        let wide = weights(&[(QA, vec![2, 65]), (QB, vec![8, 2])]);
        let err = load(&config(json!({})), &wide).unwrap_err();
        assert!(err.contains("outside 1..=64"), "{err}");
        let err = load(&config(json!({"r": 9})), &wide).unwrap_err();
        assert!(err.contains("above the 8 accepted"), "{err}");
        // Four layers of 2·(64 + 64) values fit 3 000; at rank 8 (4·8·128 values) they do not.
        let names: Vec<(String, String)> = (0..4)
            .map(|l| {
                (
                    QA.replace("layers.0", &format!("layers.{l}")),
                    QB.replace("layers.0", &format!("layers.{l}")),
                )
            })
            .collect();
        let tensors = |r: usize| -> Vec<(&str, Vec<usize>)> {
            names
                .iter()
                .flat_map(|(a, b)| [(a.as_str(), vec![r, 64]), (b.as_str(), vec![64, r])])
                .collect()
        };
        assert!(load(&config(json!({})), &weights(&tensors(2))).is_ok());
        let err = load(&config(json!({"r": 8})), &weights(&tensors(8)))
            .map(|_| ())
            .unwrap_err();
        assert!(err.contains("values accepted"), "{err}");
        let twice = weights(&[
            (QA, vec![2, 8]),
            (QB, vec![8, 2]),
            (
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
                vec![2, 8],
            ),
        ]);
        let err = load(&config(json!({})), &twice).unwrap_err();
        assert!(err.contains("given twice"), "{err}");
    }

    #[test]
    fn only_regular_files_within_the_cap_are_read() {
        let err = read_artifact_file(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let dir = std::env::temp_dir().join(format!("s2lc-lora-cap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("f");
        std::fs::write(&f, [7u8; 100]).unwrap();
        assert_eq!(read_artifact_file(&f, 100).unwrap().len(), 100);
        let err = read_artifact_file(&f, 99).unwrap_err();
        assert!(err.to_string().contains("more than the 99"), "{err}");
        assert!(read_artifact_file(&dir, 1 << 20).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn model_limits_follow_its_shapes() {
        let cfg = ModelConfig {
            arch: crate::config::Arch::Llama,
            hidden_size: 576,
            intermediate_size: 1536,
            n_layers: 30,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            vocab_size: 49152,
            rope_theta: 1e4,
            rms_eps: 1e-5,
            max_seq_len: 2048,
            tie_embeddings: true,
        };
        let l = AdapterLimits::for_model(&cfg);
        assert_eq!((l.max_layers, l.max_dim, l.max_rank), (30, 1536, 576));
        assert!(l.max_values > 30 * 7 * 2 * 576 * 64);
        assert_eq!(l.with_max_values(10).max_values, 10);
    }
}
