//! How members are packed: the parameters ([`PackParams`], [`EnergyScope`]) and the calibration
//! an activation-aware pack measures deltas by ([`InputWhitening`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use faer::Mat;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use s2lc_model::llama::LinearInput;
use s2lc_model::lora::TARGETS;
use s2lc_spectral::{factored_svd, thin_svd, QuantBits, Whitening};

use super::error::PackError;
use super::linalg::scale_cols;
use super::member::{Delta, Member, ModuleKey};

/// Over what a member's truncation keeps its share of energy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnergyScope {
    /// Every delta keeps `energy` of its own energy (rank ≥ 1 each).
    #[default]
    Matrix,
    /// The member keeps `energy` of its total energy: its singular values across all its
    /// matrices are ranked together, so a matrix whose delta is small relative to the rest keeps
    /// fewer directions, or none.
    Member,
}

impl EnergyScope {
    /// Parses `matrix` or `member`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "matrix" => Some(EnergyScope::Matrix),
            "member" => Some(EnergyScope::Member),
            _ => None,
        }
    }

    /// `matrix` or `member`.
    pub fn name(self) -> &'static str {
        match self {
            EnergyScope::Matrix => "matrix",
            EnergyScope::Member => "member",
        }
    }
}

/// How members are packed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PackParams {
    /// Share of energy kept at each spectral step: each delta's truncation, the shared bases, and
    /// (with an orthogonal residual when needed) each member's projection.
    pub energy: f64,
    /// Share of the members' (truncated) pooled energy the shared bases of each matrix keep;
    /// `None`: `energy`. A member packed alone keeps every direction its truncation kept with
    /// `Some(1.0)` (otherwise the bases truncate it a second time, per matrix).
    #[serde(default)]
    pub basis_energy: Option<f64>,
    /// Loss-aware member scope with an absolute budget: each member drops its least important
    /// directions while their estimated KL (`Σ w·σ²`, nats per token, from the members' loss
    /// weights) stays within this. Replaces `energy` for the truncation (the bases still keep
    /// [`PackParams::basis_energy`]), so every member is cut to the same estimated loss rather
    /// than the same share.
    #[serde(default)]
    pub loss_budget: Option<f64>,
    /// Whether the truncation's `energy` is per matrix or over the whole member.
    #[serde(default)]
    pub scope: EnergyScope,
    /// Bits of the cores and residual factors.
    pub bits: QuantBits,
    /// Bits of the shared bases: of every value, or with `mixed_bases` their average.
    pub basis_bits: QuantBits,
    /// Mixed-width bases: each basis column gets int2 … int8 by the members' energy along it
    /// (greedy rate allocation over the whole pack, [`crate::qbasis::allocate_widths`]), the
    /// columns averaging at most `basis_bits` (with [`PackParams::entropy`], entropy-coded bits).
    #[serde(default)]
    pub mixed_bases: bool,
    /// Values per quantization block.
    pub block: usize,
    /// Share of each core's energy its dropped blocks may hold.
    pub drop_energy: f64,
    /// Activation-aware: energies, bases and cores were measured on `ΔW·L` (`L·Lᵀ` the Gram
    /// matrix of the matrix's calibration inputs), so what is kept is what moves the outputs
    /// most; the stored bases are mapped back and unpack is unchanged ([`pack_with`]).
    ///
    /// [`pack_with`]: crate::pack::pack_with
    #[serde(default)]
    pub whitened: bool,
    /// Entropy-coded codes: each file stores its codes per width as one rANS stream under a
    /// frequency table fitted to them (lossless; [`s2lc_spectral::ans`]), instead of packed
    /// fixed-width bytes.
    #[serde(default)]
    pub entropy: bool,
    /// With [`PackParams::entropy`] and mixed-width bases: the average entropy-coded bits per
    /// basis value to allocate (a fraction, between int2's ~1.5 and int8's), instead of
    /// `basis_bits`.
    #[serde(default)]
    pub basis_rate: Option<f64>,
}

impl Default for PackParams {
    fn default() -> Self {
        PackParams {
            energy: 0.95,
            basis_energy: None,
            loss_budget: None,
            scope: EnergyScope::Matrix,
            bits: QuantBits::Int8,
            basis_bits: QuantBits::Int8,
            mixed_bases: false,
            block: 32,
            drop_energy: 0.0,
            whitened: false,
            entropy: false,
            basis_rate: None,
        }
    }
}

impl PackParams {
    /// The share of pooled energy the shared bases keep ([`PackParams::basis_energy`]).
    pub fn basis_energy(&self) -> f64 {
        self.basis_energy.unwrap_or(self.energy)
    }

    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), PackError> {
        if !(self.energy > 0.0 && self.energy <= 1.0) {
            return Err(PackError::Invalid(format!(
                "energy {} is outside (0, 1]",
                self.energy
            )));
        }
        if let Some(e) = self.basis_energy.filter(|e| !(*e > 0.0 && *e <= 1.0)) {
            return Err(PackError::Invalid(format!(
                "basis energy {e} is outside (0, 1]"
            )));
        }
        if let Some(b) = self.loss_budget {
            if !(b.is_finite() && b > 0.0) {
                return Err(PackError::Invalid(format!(
                    "loss budget {b} is not a positive number of nats"
                )));
            }
            if self.scope != EnergyScope::Member {
                return Err(PackError::Invalid(
                    "a loss budget needs --scope member (it ranks a member's directions together)"
                        .into(),
                ));
            }
        }
        if let Some(r) = self.basis_rate {
            if !(self.entropy && self.mixed_bases) {
                return Err(PackError::Invalid(
                    "a basis rate needs --entropy and --mixed-bases (it is an average of coded bits over mixed widths)"
                        .into(),
                ));
            }
            if !(r.is_finite() && (1.0..=8.0).contains(&r)) {
                return Err(PackError::Invalid(format!(
                    "basis rate {r} is outside [1, 8] bits per value"
                )));
            }
        }
        if !(0.0..1.0).contains(&self.drop_energy) {
            return Err(PackError::Invalid(format!(
                "drop energy {} is outside [0, 1)",
                self.drop_energy
            )));
        }
        if self.block == 0 || self.block % 2 != 0 {
            return Err(PackError::Invalid(format!(
                "block {} must be a positive even number",
                self.block
            )));
        }
        Ok(())
    }
}

/// Per (layer, input kind), the whitening of a base model's calibration inputs: what
/// [`pack_with`] measures deltas by (`‖ΔW·L‖` is the output change `‖X·ΔWᵀ‖` on those
/// inputs).
///
/// [`pack_with`]: crate::pack::pack_with
#[derive(Debug, Clone, Default)]
pub struct InputWhitening(HashMap<(usize, LinearInput), Arc<Whitening>>);

impl InputWhitening {
    /// Factors every Gram matrix `XᵀX` (as `s2lc_model::compress::input_grams` collects them).
    pub fn from_grams(grams: &HashMap<(usize, LinearInput), Mat<f32>>) -> Result<Self, PackError> {
        grams
            .par_iter()
            .map(|(&(layer, input), g)| {
                let g64 = Mat::from_fn(g.nrows(), g.ncols(), |i, j| g[(i, j)] as f64);
                Whitening::from_gram(g64.as_ref())
                    .map(|w| ((layer, input), Arc::new(w)))
                    .map_err(|source| PackError::Whiten {
                        layer,
                        input,
                        source,
                    })
            })
            .collect::<Result<_, _>>()
            .map(InputWhitening)
    }

    /// The whitening of the input of `key`'s matrix.
    pub(super) fn of(&self, key: ModuleKey) -> Result<&Whitening, PackError> {
        LinearInput::of(TARGETS[key.target])
            .and_then(|input| self.0.get(&(key.layer, input)))
            .map(Arc::as_ref)
            .ok_or_else(|| {
                PackError::Invalid(format!(
                    "{}: no calibration inputs for this matrix",
                    key.name()
                ))
            })
    }

    /// `member` with every delta replaced by the thin SVD of `ΔW·L`, checked against `L`'s width.
    pub(super) fn whiten(&self, member: &Member) -> Result<Member, PackError> {
        let deltas = member
            .deltas
            .par_iter()
            .map(|(&key, d)| {
                let w = self.of(key)?;
                let (rows, cols) = d.shape();
                if cols != w.dim() {
                    return Err(PackError::Invalid(format!(
                        "{}: member '{}' has {cols} inputs but the calibration has {}",
                        key.name(),
                        member.name,
                        w.dim()
                    )));
                }
                let svd = match d {
                    Delta::Factors { b, a } => {
                        factored_svd(b.as_ref(), w.whiten(a.as_ref()).as_ref())?
                    }
                    Delta::Dense(m) => thin_svd(w.whiten(m.as_ref()).as_ref())?,
                    Delta::Svd { svd, .. } => factored_svd(
                        scale_cols(svd.u.as_ref(), &svd.s).as_ref(),
                        w.whiten(svd.v.transpose()).as_ref(),
                    )?,
                };
                debug_assert_eq!(svd.u.nrows(), rows);
                let stored = d.stored_values();
                Ok((key, Delta::Svd { svd, stored }))
            })
            .collect::<Result<BTreeMap<_, _>, PackError>>()?;
        // A loss weight is per unit of energy, and the energy is now measured on the outputs:
        // `w·‖ΔW‖² = w'·‖ΔW·L‖²` keeps each matrix's estimated loss.
        let weights = member
            .weights
            .iter()
            .map(|(&key, &w)| {
                let plain = member.deltas.get(&key).map_or(0.0, Delta::energy);
                let measured = deltas.get(&key).map_or(0.0, Delta::energy);
                let w = if measured > 0.0 {
                    w * plain / measured
                } else {
                    w
                };
                (key, w)
            })
            .collect();
        Ok(Member {
            name: member.name.clone(),
            deltas,
            weights,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use faer::{Mat, MatRef};
    use s2lc_spectral::sq_frobenius as sq_norm;

    use crate::pack::testing::skewed_inputs;
    use crate::pack::{pack, pack_with, Delta, Member, ModuleKey, PackParams, PackedSet};
    use crate::test_matrix as matrix;

    /// `‖X·(ΔW − unpacked)ᵀ‖ / ‖X·ΔWᵀ‖` over a member's matrices.
    fn output_error(x: MatRef<'_, f32>, member: &Member, set: &PackedSet) -> f64 {
        let unpacked = set.unpack(&member.name).unwrap();
        let (mut err, mut total) = (0.0, 0.0);
        for (key, delta) in &member.deltas {
            let dense = delta.dense();
            total += sq_norm((x * dense.transpose()).as_ref());
            let rest = match unpacked.get(key) {
                Some(f) => dense - f.to_dense(),
                None => dense,
            };
            err += sq_norm((x * rest.transpose()).as_ref());
        }
        (err / total).sqrt()
    }

    /// Activation-aware packing keeps what the inputs excite: a delta whose energy is split
    /// evenly between strong and (100x) weak input features loses its weak half, so it packs
    /// smaller, while its output error stays within the dropped share of output energy.
    #[test]
    fn whitened_packing_keeps_what_the_inputs_excite() {
        let (rows, cols) = (24, 32);
        let (x, whitening) = skewed_inputs(cols);
        // Rank 4 per matrix: two directions on the strong features, two on the weak ones, of
        // equal norm.
        let ms: Vec<Member> = (0..2)
            .map(|i| {
                let deltas = [(0, 0), (0, 2), (1, 0), (1, 2)]
                    .into_iter()
                    .map(|(layer, target)| {
                        let seed = (i * 16 + layer * 4 + target) as u64 + 1;
                        let b = matrix(rows, 4, seed);
                        let a = Mat::from_fn(4, cols, |k, j| {
                            let strong = j < cols / 2;
                            if (k < 2) == strong {
                                matrix(4, cols, seed ^ 0x55)[(k, j)]
                            } else {
                                0.0
                            }
                        });
                        (ModuleKey { layer, target }, Delta::Factors { b, a })
                    })
                    .collect();
                Member {
                    name: format!("w{i}"),
                    deltas,
                    weights: BTreeMap::new(),
                }
            })
            .collect();
        let params = PackParams {
            energy: 0.95,
            ..PackParams::default()
        };
        let plain = pack(&ms[..1], params).unwrap();
        let whitened = pack_with(&ms[..1], params, Some(&whitening)).unwrap();
        assert!(whitened.params.whitened && !plain.params.whitened);
        let ranks = |set: &PackedSet| -> Vec<usize> {
            set.members[0]
                .cores
                .values()
                .map(|c| c.core_b.cols)
                .collect()
        };
        assert!(
            ranks(&whitened).iter().all(|&r| r <= 2),
            "{:?}",
            ranks(&whitened)
        );
        assert!(ranks(&plain).iter().all(|&r| r >= 3), "{:?}", ranks(&plain));
        assert!(whitened.bytes() < plain.bytes());
        // Truncation, basis and quantization each drop a little of the output energy.
        let (ew, ep) = (
            output_error(x.as_ref(), &ms[0], &whitened),
            output_error(x.as_ref(), &ms[0], &plain),
        );
        assert!(
            ew <= (2.0f64 * 0.05).sqrt() + 0.03,
            "whitened output error {ew}"
        );
        assert!(ew <= ep + 0.03, "whitened {ew} vs plain {ep}");
        // Its Frobenius error is large: it dropped the weak half on purpose.
        let rep = whitened.report(&ms[..1]).unwrap();
        assert!(rep[0].rel_error > 0.5, "{}", rep[0].rel_error);

        // Adding needs the calibration, and only a whitened pack takes it.
        let mut set = whitened.clone();
        let err = set.add(&ms[1]).unwrap_err().to_string();
        assert!(err.contains("needs its calibration"), "{err}");
        set.add_with(&ms[1], Some(&whitening)).unwrap();
        let added = output_error(x.as_ref(), &ms[1], &set);
        assert!(
            added <= (2.0f64 * 0.05).sqrt() + 0.05,
            "added member: {added}"
        );
        let err = plain
            .clone()
            .add_with(&ms[1], Some(&whitening))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not activation-aware"), "{err}");
        // A calibration of another width is named.
        let (_, narrow) = skewed_inputs(cols / 2);
        let err = pack_with(&ms[..1], params, Some(&narrow))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("has 32 inputs but the calibration has 16"),
            "{err}"
        );
    }
}
