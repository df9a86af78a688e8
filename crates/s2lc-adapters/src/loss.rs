//! Loss-aware packing weights: how much each matrix's delta of an adapter matters to its outputs.
//!
//! Energy ranks a member's directions by `σ²`, which weighs a direction of `q_proj` against one
//! of `down_proj` by their sizes, not by what they do. Here each matrix `m` gets a weight
//! `wₘ = KLₘ / ‖ΔWₘ‖²`, where `KLₘ` is the mean KL divergence between the adapter's next-token
//! distributions and those with `ΔWₘ` removed, on calibration text (forward passes only). To
//! second order a removed direction `σᵢ·uᵢ·vᵢᵀ` of `ΔWₘ` costs about `wₘ·σᵢ²` (exact if the
//! loss's curvature is isotropic within the matrix), so member-scope packing ranks directions by
//! `wₘ·σᵢ²` across all matrices ([`crate::Member::weights`]).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use s2lc_model::eval::OutputReference;
use s2lc_model::llama::LlamaModel;
use s2lc_model::lora::{LoraAdapter, TARGETS};

use crate::pack::{ModuleKey, PackError};

/// What one matrix's delta does to an adapter's outputs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sensitivity {
    /// Mean KL (nats per position) from the adapter's outputs to those without this delta.
    pub kl: f64,
    /// `‖ΔW‖²_F` of the delta (`s·B·A`).
    pub energy: f64,
}

/// Per matrix of `adapter`, the KL its removal causes on `windows` (each run from an empty cache)
/// and its energy: one forward pass per window per matrix, after one for the reference.
/// `on_matrix(done, of)` reports progress.
pub fn sensitivities(
    model: &LlamaModel,
    adapter: &LoraAdapter,
    windows: Vec<Vec<u32>>,
    mut on_matrix: impl FnMut(usize, usize),
) -> Result<BTreeMap<ModuleKey, Sensitivity>, PackError> {
    model.check_adapter(adapter)?;
    let mut reference = OutputReference::new(model, windows, Some(adapter))?;
    let keys: Vec<(usize, usize)> = adapter.deltas().map(|(l, t, _)| (l, t)).collect();
    let mut without = adapter.clone();
    let mut out = BTreeMap::new();
    for (i, &(layer, target)) in keys.iter().enumerate() {
        let delta = without.layers[layer][target]
            .take()
            .expect("the key came from this adapter");
        let energy = delta.svd()?.s.iter().map(|&s| (s as f64).powi(2)).sum();
        let kl = reference.mean_kl(model, Some(&without))?;
        without.layers[layer][target] = Some(delta);
        out.insert(ModuleKey { layer, target }, Sensitivity { kl, energy });
        on_matrix(i + 1, keys.len());
    }
    Ok(out)
}

/// Loss weights `KL/‖ΔW‖²` (nats per unit of energy) from [`sensitivities`], absolute so that
/// `Σ w·σ²` over dropped directions estimates their KL ([`crate::PackParams::loss_budget`]). A
/// delta whose removal measured no divergence (`KL ≤ 0` within rounding) gets a millionth of the
/// member's mean weight, so its directions still rank among themselves, after all others.
/// Without any measured divergence every weight is 1.
pub fn loss_weights(s: &BTreeMap<ModuleKey, Sensitivity>) -> BTreeMap<ModuleKey, f64> {
    let total_kl: f64 = s.values().map(|v| v.kl.max(0.0)).sum();
    let total_energy: f64 = s.values().map(|v| v.energy).sum();
    if !(total_kl > 0.0 && total_energy > 0.0) {
        return s.keys().map(|&k| (k, 1.0)).collect();
    }
    let floor = 1e-6 * total_kl / total_energy;
    s.iter()
        .map(|(&k, v)| {
            let w = if v.energy > 0.0 {
                (v.kl / v.energy).max(floor)
            } else {
                floor
            };
            (k, w)
        })
        .collect()
}

/// One adapter's [`sensitivities`] with how they were measured, as written to JSON (by
/// `s2lc adapters sensitivity`, read back by `s2lc adapters pack --loss-weights`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SensitivityFile {
    /// The adapter's name (its directory's name).
    pub adapter: String,
    /// The calibration text.
    pub text: String,
    /// Calibration windows.
    pub windows: usize,
    /// Tokens per window.
    pub window: usize,
    /// One entry per matrix.
    pub matrices: Vec<MatrixSensitivity>,
}

/// One matrix's entry of a [`SensitivityFile`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MatrixSensitivity {
    /// Layer index.
    pub layer: usize,
    /// Index into [`TARGETS`].
    pub target: usize,
    /// PEFT module name (for reading; `layer` and `target` are what counts).
    pub module: String,
    /// See [`Sensitivity::kl`].
    pub kl: f64,
    /// See [`Sensitivity::energy`].
    pub energy: f64,
}

impl SensitivityFile {
    /// The file's form of `sensitivities`.
    pub fn new(
        adapter: &str,
        text: &str,
        windows: usize,
        window: usize,
        sensitivities: &BTreeMap<ModuleKey, Sensitivity>,
    ) -> Self {
        SensitivityFile {
            adapter: adapter.to_string(),
            text: text.to_string(),
            windows,
            window,
            matrices: sensitivities
                .iter()
                .map(|(k, v)| MatrixSensitivity {
                    layer: k.layer,
                    target: k.target,
                    module: k.name(),
                    kl: v.kl,
                    energy: v.energy,
                })
                .collect(),
        }
    }

    /// The sensitivities by matrix, checked (known targets, finite values, no matrix twice).
    pub fn sensitivities(&self) -> Result<BTreeMap<ModuleKey, Sensitivity>, PackError> {
        let mut out = BTreeMap::new();
        for m in &self.matrices {
            let bad = |what: &str| {
                PackError::Invalid(format!(
                    "sensitivities of '{}': {} (layer {}, target {})",
                    self.adapter, what, m.layer, m.target
                ))
            };
            if m.target >= TARGETS.len() {
                return Err(bad("unknown target index"));
            }
            if !(m.kl.is_finite() && m.energy.is_finite() && m.energy >= 0.0) {
                return Err(bad("a KL or energy that is not a finite number"));
            }
            let key = ModuleKey {
                layer: m.layer,
                target: m.target,
            };
            let value = Sensitivity {
                kl: m.kl,
                energy: m.energy,
            };
            if out.insert(key, value).is_some() {
                return Err(bad("the matrix appears twice"));
            }
        }
        Ok(out)
    }

    /// Writes the JSON file.
    pub fn save(&self, path: &Path) -> Result<(), PackError> {
        let text = serde_json::to_string_pretty(self).expect("plain data serializes");
        std::fs::write(path, text).map_err(|source| PackError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads a JSON file written by [`SensitivityFile::save`].
    pub fn load(path: &Path) -> Result<Self, PackError> {
        let text = std::fs::read_to_string(path).map_err(|source| PackError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| PackError::Format {
            path: path.to_path_buf(),
            message: format!("not a sensitivity file: {e}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(layer: usize, target: usize) -> ModuleKey {
        ModuleKey { layer, target }
    }

    #[test]
    fn weights_are_kl_per_energy() {
        let s: BTreeMap<ModuleKey, Sensitivity> = [
            (
                key(0, 0),
                Sensitivity {
                    kl: 0.02,
                    energy: 1.0,
                },
            ),
            (
                key(0, 1),
                Sensitivity {
                    kl: 0.01,
                    energy: 2.0,
                },
            ),
            (
                key(1, 0),
                Sensitivity {
                    kl: -1e-12,
                    energy: 1.0,
                },
            ),
        ]
        .into_iter()
        .collect();
        let w = loss_weights(&s);
        assert!((w[&key(0, 0)] - 0.02).abs() < 1e-12);
        assert!((w[&key(0, 1)] - 0.005).abs() < 1e-12);
        // The floor: a millionth of the mean, 0.03 / 4.
        assert!((w[&key(1, 0)] - 0.0075e-6).abs() < 1e-15);
        // Weighted energy is the summed KL.
        let kl: f64 = s.iter().map(|(k, v)| w[k] * v.energy).sum();
        assert!((kl - 0.03).abs() < 1e-8, "{kl}");
    }

    #[test]
    fn sensitivity_files_round_trip_and_reject_bad_entries() {
        let s: BTreeMap<ModuleKey, Sensitivity> = [
            (
                key(0, 0),
                Sensitivity {
                    kl: 0.5,
                    energy: 2.0,
                },
            ),
            (
                key(3, 6),
                Sensitivity {
                    kl: 1e-5,
                    energy: 0.25,
                },
            ),
        ]
        .into_iter()
        .collect();
        let file = SensitivityFile::new("a", "text.txt", 4, 128, &s);
        assert_eq!(file.matrices[1].module, "model.layers.3.mlp.down_proj");
        let dir = std::env::temp_dir().join(format!("s2lc-sens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.json");
        file.save(&path).unwrap();
        let back = SensitivityFile::load(&path).unwrap();
        assert_eq!(back, file);
        assert_eq!(back.sensitivities().unwrap(), s);

        let mut bad = file.clone();
        bad.matrices[0].target = 7;
        let e = bad.sensitivities().unwrap_err().to_string();
        assert!(e.contains("unknown target"), "{e}");
        let mut twice = file.clone();
        twice.matrices[1] = twice.matrices[0].clone();
        assert!(twice
            .sensitivities()
            .unwrap_err()
            .to_string()
            .contains("twice"));
        std::fs::write(&path, "{").unwrap();
        let e = SensitivityFile::load(&path).unwrap_err().to_string();
        assert!(e.contains("not a sensitivity file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_measured_divergence_weighs_every_matrix_equally() {
        let s: BTreeMap<ModuleKey, Sensitivity> = [(
            key(0, 0),
            Sensitivity {
                kl: 0.0,
                energy: 1.0,
            },
        )]
        .into_iter()
        .collect();
        assert_eq!(loss_weights(&s)[&key(0, 0)], 1.0);
    }
}
