//! One member's deltas against shared bases: how each is truncated (per matrix, or member-wide by
//! energy or a loss budget) and projected onto the quantized bases as a core, with an orthogonal
//! residual where the bases miss too much of it.

use faer::linalg::solvers::Solve;
use faer::{Mat, MatRef};

use s2lc_spectral::{factored_svd, rank_for_energy, thin_svd, Svd, SvdError, Whitening};

use crate::qmat::QMat;

use super::error::PackError;
use super::linalg::{hcat, scale_cols, vcat};
use super::member::{Delta, Member};
use super::params::{EnergyScope, PackParams};
use super::set::PackedCore;

/// How a delta is truncated: to `energy` of its own, or to the singular values at least
/// `floor` (a member-wide cut, see [`EnergyScope::Member`]).
#[derive(Debug, Clone, Copy)]
pub(super) enum Cut {
    Energy(f64),
    Floor(f32),
}

/// The cut of one member under `params`. For [`EnergyScope::Member`]: the smallest (weighted)
/// singular value that, with all the larger ones across the member's matrices, keeps `energy`
/// of its total (weighted) energy, or with a loss budget drops at most that much estimated KL.
pub(super) fn cut_of(member: &Member, params: &PackParams) -> Result<Cut, PackError> {
    if params.scope == EnergyScope::Matrix {
        return Ok(Cut::Energy(params.energy));
    }
    let mut s: Vec<f32> = Vec::new();
    for (&key, d) in &member.deltas {
        let w = member.weight(key).sqrt() as f32;
        s.extend(d.svd()?.s.iter().map(|&v| v * w));
    }
    s.sort_by(|a, b| b.total_cmp(a));
    let k = match params.loss_budget {
        Some(budget) => {
            if member.weights.is_empty() {
                return Err(PackError::Invalid(format!(
                    "a loss budget needs loss weights, and member '{}' has none",
                    member.name
                )));
            }
            // With absolute weights, `Σ w·σ²` over the dropped directions is their estimated KL.
            let mut dropped: f64 = s.iter().map(|&v| (v as f64).powi(2)).sum();
            let mut k = 0;
            while k < s.len() && dropped > budget {
                dropped -= (s[k] as f64).powi(2);
                k += 1;
            }
            k
        }
        None => rank_for_energy(&s, params.energy),
    }
    .max(1);
    Ok(Cut::Floor(s.get(k - 1).copied().unwrap_or(0.0)))
}

/// The truncated SVD of a delta (rank ≥ 1 under [`Cut::Energy`] unless the delta is zero; under
/// [`Cut::Floor`] the rank may be 0), whose loss weight is `weight` (the floor is on `√w·σ`).
pub(super) fn truncated(delta: &Delta, cut: Cut, weight: f64) -> Result<Svd, SvdError> {
    let svd = delta.svd()?;
    let w = weight.sqrt() as f32;
    let k = match cut {
        _ if !svd.s.first().is_some_and(|&s| s > 0.0) => 0,
        Cut::Energy(energy) => rank_for_energy(&svd.s, energy).max(1),
        Cut::Floor(floor) => svd
            .s
            .iter()
            .take_while(|&&s| s * w >= floor && s > 0.0)
            .count(),
    };
    Ok(Svd {
        u: svd.u.subcols(0, k).to_owned(),
        s: svd.s[..k].to_vec(),
        v: svd.v.subcols(0, k).to_owned(),
    })
}

/// `svd` of `√w·ΔW`: the delta as a loss weight `w` weighs it.
pub(super) fn weighted(svd: &Svd, w: f64) -> Svd {
    let w = w.sqrt() as f32;
    Svd {
        u: svd.u.clone(),
        s: svd.s.iter().map(|&v| v * w).collect(),
        v: svd.v.clone(),
    }
}

/// `(bᵀb)⁻¹·bᵀ·x`: the least-squares coefficients of `x`'s columns on the columns of `b`.
///
/// Quantized bases are no longer orthonormal. With plain `bᵀ·x`, the reconstruction `b·bᵀ·x`
/// carries a second error term, `u·δuⱼᵀ·x`: the error of every column, however weak, picks up
/// the strong directions of `x`. The least-squares fit makes `b·coefficients` the projection
/// onto the span of `b`, leaving only the span's own error. Falls back to `bᵀ·x` when `bᵀb` is
/// singular.
fn coefficients(b: MatRef<'_, f32>, x: MatRef<'_, f32>) -> Mat<f32> {
    let proj = b.transpose() * x;
    match (b.transpose() * b).llt(faer::Side::Lower) {
        Ok(llt) => llt.solve(&proj),
        Err(_) => proj,
    }
}

/// Projects a member's truncated delta onto dequantized bases `(u, v)`: its core, plus (with
/// `allow_extra`, for members added after the bases were fitted) an orthogonal residual when the
/// projection keeps less than `energy` of the truncated delta.
///
/// With `whitening`, `svd` and `v` are in whitened input coordinates (`ΔW·L`, `Lᵀ·V`), and the
/// residual's input factor is mapped back (`·L⁻¹`) before it is stored.
pub(super) fn project(
    u: MatRef<'_, f32>,
    v: MatRef<'_, f32>,
    svd: &Svd,
    params: &PackParams,
    allow_extra: bool,
    whitening: Option<&Whitening>,
) -> Result<PackedCore, SvdError> {
    let p_fac = scale_cols(svd.u.as_ref(), &svd.s); // rows × k
    let core = coefficients(u, p_fac.as_ref()) * coefficients(v, svd.v.as_ref()).transpose(); // p × q
    let (core_b, core_a) = if core.nrows() == 0 || core.ncols() == 0 {
        (Mat::zeros(core.nrows(), 0), Mat::zeros(0, core.ncols()))
    } else {
        let c = thin_svd(core.as_ref())?;
        let k = svd.s.len().min(c.s.len());
        let b = scale_cols(c.u.subcols(0, k), &c.s[..k]);
        (b, c.v.subcols(0, k).transpose().to_owned())
    };
    let q = |m: MatRef<'_, f32>| QMat::new(m, params.block, params.bits, params.drop_energy);
    let (core_b, core_a) = (q(core_b.as_ref()), q(core_a.as_ref()));
    if !allow_extra {
        return Ok(PackedCore {
            core_b,
            core_a,
            extra: None,
        });
    }
    // Residual of the stored core Ĉ = b̂·â: [P | −u·b̂] · [V_i | v·âᵀ]ᵀ, through its factors.
    let (cb, ca) = (core_b.to_mat(), core_a.to_mat());
    let b = hcat(&[p_fac.as_ref(), (-(u * &cb)).as_ref()]);
    let a = vcat(&[svd.v.transpose(), (ca * v.transpose()).as_ref()]);
    let residual = factored_svd(b.as_ref(), a.as_ref())?;
    let total: f64 = svd.s.iter().map(|&s| (s as f64).powi(2)).sum();
    let lost: f64 = residual.s.iter().map(|&s| (s as f64).powi(2)).sum();
    let budget = (1.0 - params.energy) * total;
    let extra = if lost > budget && total > 0.0 {
        // Smallest rank whose remaining residual energy fits the budget.
        let mut rest = lost;
        let mut r = 0;
        while r < residual.s.len() && rest > budget {
            rest -= (residual.s[r] as f64).powi(2);
            r += 1;
        }
        let eb = scale_cols(residual.u.subcols(0, r), &residual.s[..r]);
        let ev = residual.v.subcols(0, r);
        let ea = match whitening {
            Some(w) => w.unwhiten_basis(ev).transpose().to_owned(),
            None => ev.transpose().to_owned(),
        };
        let q = |m: MatRef<'_, f32>| QMat::new(m, params.block, params.bits, 0.0);
        Some((q(eb.as_ref()), q(ea.as_ref())))
    } else {
        None
    };
    Ok(PackedCore {
        core_b,
        core_a,
        extra,
    })
}
