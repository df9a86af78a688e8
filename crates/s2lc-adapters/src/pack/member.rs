//! What is packed: members (an adapter or an expert residual), their deltas, and the keys naming
//! the target matrices those deltas change.

use std::collections::BTreeMap;

use faer::Mat;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use s2lc_model::experts::FfnWeights;
use s2lc_model::lora::{module_name, LoraAdapter, TARGETS};
use s2lc_spectral::{factored_svd, sq_frobenius as sq_norm, thin_svd, Svd, SvdError};

use super::error::PackError;
use super::linalg::{mat, scale_cols};

/// A target matrix: a layer and an index into [`TARGETS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ModuleKey {
    /// Layer index.
    pub layer: usize,
    /// Index into [`TARGETS`].
    pub target: usize,
}

impl ModuleKey {
    /// PEFT's module name, e.g. `model.layers.3.self_attn.q_proj`.
    pub fn name(&self) -> String {
        module_name(self.layer, self.target)
    }
}

/// One member's change to one target matrix (`rows × cols`).
#[derive(Debug, Clone)]
pub enum Delta {
    /// `b·a` with `b` (`rows × r`) and `a` (`r × cols`): a LoRA delta, scale folded into `b`.
    Factors {
        /// `rows × r`.
        b: Mat<f32>,
        /// `r × cols`.
        a: Mat<f32>,
    },
    /// A dense matrix (an expert residual).
    Dense(Mat<f32>),
    /// A precomputed thin SVD of either (so several packings of one member decompose it once),
    /// with the values the original form held.
    Svd {
        /// The decomposition.
        svd: Svd,
        /// [`Delta::stored_values`] of the original.
        stored: usize,
    },
}

impl Delta {
    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Delta::Factors { b, a } => (b.nrows(), a.ncols()),
            Delta::Dense(m) => (m.nrows(), m.ncols()),
            Delta::Svd { svd, .. } => (svd.u.nrows(), svd.v.nrows()),
        }
    }

    /// Thin SVD (through the factors when there are some).
    pub fn svd(&self) -> Result<Svd, SvdError> {
        match self {
            Delta::Factors { b, a } => factored_svd(b.as_ref(), a.as_ref()),
            Delta::Dense(m) => thin_svd(m.as_ref()),
            Delta::Svd { svd, .. } => Ok(svd.clone()),
        }
    }

    /// The dense matrix.
    pub fn dense(&self) -> Mat<f32> {
        match self {
            Delta::Factors { b, a } => b * a,
            Delta::Dense(m) => m.clone(),
            Delta::Svd { svd, .. } => scale_cols(svd.u.as_ref(), &svd.s) * svd.v.transpose(),
        }
    }

    /// `‖ΔW‖²_F` (for factors through the small Gram matrices: `Σ (BᵀB)∘(AAᵀ)`).
    pub fn energy(&self) -> f64 {
        match self {
            Delta::Factors { b, a } => {
                let (bb, aa) = (b.transpose() * b, a * a.transpose());
                (0..bb.nrows())
                    .flat_map(|i| (0..bb.ncols()).map(move |j| (i, j)))
                    .map(|(i, j)| bb[(i, j)] as f64 * aa[(i, j)] as f64)
                    .sum()
            }
            Delta::Dense(m) => sq_norm(m.as_ref()),
            Delta::Svd { svd, .. } => svd.s.iter().map(|&v| (v as f64).powi(2)).sum(),
        }
    }

    /// Values an f16 file of this delta holds (`r·(rows + cols)` for factors).
    pub fn stored_values(&self) -> usize {
        match self {
            Delta::Factors { b, a } => b.nrows() * b.ncols() + a.nrows() * a.ncols(),
            Delta::Dense(m) => m.nrows() * m.ncols(),
            Delta::Svd { stored, .. } => *stored,
        }
    }
}

/// A named set of deltas: one adapter or one expert residual.
#[derive(Debug, Clone)]
pub struct Member {
    /// Name (adapter or expert).
    pub name: String,
    /// Deltas by target matrix.
    pub deltas: BTreeMap<ModuleKey, Delta>,
    /// Loss weight of a unit of each matrix's delta energy ([`crate::loss::loss_weights`]): with
    /// member scope, directions are ranked by `w·σ²`, their estimated effect on the loss, and
    /// mixed-width bases weigh each column's error by it. Empty: every matrix weighs 1.
    pub weights: BTreeMap<ModuleKey, f64>,
}

impl Member {
    /// A LoRA adapter's deltas (`s·B·A`).
    pub fn from_lora(name: &str, adapter: &LoraAdapter) -> Self {
        let deltas = adapter
            .deltas()
            .map(|(layer, target, d)| {
                let (a, b) = d.factors();
                let delta = Delta::Factors {
                    b: mat(&b, d.out_dim(), d.rank()),
                    a: mat(&a, d.rank(), d.in_dim()),
                };
                (ModuleKey { layer, target }, delta)
            })
            .collect();
        Member {
            name: name.to_string(),
            deltas,
            weights: BTreeMap::new(),
        }
    }

    /// An expert's residual `expert − base` (FFN matrices as gate/up/down targets).
    pub fn from_residual(name: &str, residual: &FfnWeights) -> Self {
        let deltas = residual
            .matrices()
            .map(|(layer, module, t)| {
                let target = TARGETS
                    .iter()
                    .position(|m| *m == module)
                    .expect("FFN modules are LoRA targets");
                let delta = Delta::Dense(mat(&t.data, t.shape[0], t.shape[1]));
                (ModuleKey { layer, target }, delta)
            })
            .collect();
        Member {
            name: name.to_string(),
            deltas,
            weights: BTreeMap::new(),
        }
    }

    /// Checks the loss weights: none, or a positive finite weight for every delta.
    pub(super) fn check_weights(&self) -> Result<(), PackError> {
        if self.weights.is_empty() {
            return Ok(());
        }
        for key in self.deltas.keys() {
            match self.weights.get(key) {
                Some(w) if w.is_finite() && *w > 0.0 => {}
                Some(w) => {
                    return Err(PackError::Invalid(format!(
                        "member '{}': loss weight {w} of {} is not a positive number",
                        self.name,
                        key.name()
                    )))
                }
                None => {
                    return Err(PackError::Invalid(format!(
                    "member '{}' has loss weights but none for {} (measured on another adapter?)",
                    self.name,
                    key.name()
                )))
                }
            }
        }
        Ok(())
    }

    /// The loss weight of `key`'s delta (1 without weights).
    pub fn weight(&self, key: ModuleKey) -> f64 {
        self.weights.get(&key).copied().unwrap_or(1.0)
    }

    /// The same member with every delta replaced by its thin SVD (computed in parallel), so
    /// packing it several times decomposes it once.
    pub fn with_svds(&self) -> Result<Member, SvdError> {
        let deltas = self
            .deltas
            .par_iter()
            .map(|(&key, d)| {
                let stored = d.stored_values();
                Ok((
                    key,
                    Delta::Svd {
                        svd: d.svd()?,
                        stored,
                    },
                ))
            })
            .collect::<Result<_, SvdError>>()?;
        Ok(Member {
            name: self.name.clone(),
            deltas,
            weights: self.weights.clone(),
        })
    }
}
