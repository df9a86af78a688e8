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

mod deltas;
mod dtype;
mod limits;
mod peft;

use std::borrow::Cow;
use std::path::PathBuf;

use faer::{Accum, MatRef};

use crate::error::ModelError;
use crate::kernels::dot::QuantizedActs;
use crate::kernels::WeightMatrix;

pub use deltas::{same_adapter, AdapterDeltas, DeltaScratch};
pub use dtype::AdapterDtype;
pub use limits::{read_artifact_file, AdapterLimits};
pub use peft::parse_name;

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

/// One layer's delta `s·B·A`, the scale folded into `B`, in the form it is held resident
/// ([`AdapterDtype`]).
#[derive(Debug, Clone)]
pub struct LoraDelta {
    /// `A`, `r × in`.
    a: WeightMatrix,
    /// `s·B`.
    b: Expand,
}

/// How `s·B` is held. Block formats run along a row in blocks of 32 values, and a LoRA rank is
/// usually below 32, so a block-quantized `B` is kept transposed (`r × out`: its rows are long)
/// and expanded by row updates instead of a matrix product.
#[derive(Debug, Clone)]
enum Expand {
    /// `s·B`, `out × r`.
    Rows(WeightMatrix),
    /// `(s·B)ᵀ`, `r × out`.
    Transposed(WeightMatrix),
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
            b: Expand::Rows(WeightMatrix::from_f32(b, out, rank)),
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
        match &self.b {
            Expand::Rows(b) => b.rows(),
            Expand::Transposed(bt) => bt.cols(),
        }
    }

    /// `out (n × out_dim) += s·B·(A·x)` for `x` (`n × in_dim`); `scratch` holds `A·x` and, for a
    /// transposed `B`, one of its rows decoded at a time ([`WeightMatrix::axpy_rows`]), reused
    /// across calls.
    pub fn apply(
        &self,
        x: &[f32],
        n: usize,
        out: &mut [f32],
        scratch: &mut DeltaScratch,
        acts: &mut QuantizedActs,
    ) {
        let r = self.rank();
        let mid = &mut scratch.mid;
        mid.resize(n * r, 0.0);
        self.a.matmul(x, n, mid, Accum::Replace, acts);
        match &self.b {
            Expand::Rows(b) => b.matmul(mid, n, out, Accum::Add, acts),
            Expand::Transposed(bt) => bt.axpy_rows(mid, n, out, &mut scratch.row),
        }
    }

    /// `(A, s·B)` as f32, row-major (`r × in` and `out × r`).
    pub fn factors(&self) -> (Cow<'_, [f32]>, Cow<'_, [f32]>) {
        let b = match &self.b {
            Expand::Rows(b) => b.to_f32(),
            Expand::Transposed(bt) => {
                let (r, o) = (bt.rows(), bt.cols());
                let t = bt.to_f32();
                Cow::Owned((0..o * r).map(|i| t[(i % r) * o + i / r]).collect())
            }
        };
        (self.a.to_f32(), b)
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
        let (a, b) = self.factors();
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

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
            &mut DeltaScratch::default(),
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
        // Values in [-0.5, 0.5): full-rank factors.
        let m = |n: usize, seed: u64| s2lc_spectral::rng::SplitMix64::new(seed).centered_vec(n);
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
}
