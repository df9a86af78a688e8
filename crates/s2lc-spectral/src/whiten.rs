//! Activation-aware ("whitened") truncation, as in SVD-LLM.
//!
//! For a layer `y = x·Wᵀ` with calibration inputs `X` (`n × in`) and Gram matrix
//! `G = XᵀX = L·Lᵀ` (Cholesky), the output error of a replacement `W'` is
//! `‖X·(W − W')ᵀ‖_F = ‖(W − W')·L‖_F`. Truncating the SVD of `A = W·L` is therefore optimal for the
//! output error, and `W' = U_r Σ_r V_rᵀ L⁻¹`, i.e. `u = U_r`, `vs = Σ_r V_rᵀ L⁻¹`.

use faer::linalg::triangular_solve::solve_upper_triangular_in_place;
use faer::{Mat, MatRef, Par, Side};

use crate::lowrank::LowRankFactors;
use crate::row_major;
use crate::svd::{thin_svd, Svd, SvdError};

/// Why whitening failed.
#[derive(Debug, thiserror::Error)]
pub enum WhitenError {
    /// The Gram matrix is not square or holds non-finite values.
    #[error("the Gram matrix is {rows}×{cols} or not finite")]
    BadGram {
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
    },
    /// Even heavy damping did not make the Gram matrix positive definite.
    #[error("the Gram matrix is not positive definite even with damping {0:e}")]
    NotPositiveDefinite(f64),
    /// The SVD of the whitened weight failed.
    #[error(transparent)]
    Svd(#[from] SvdError),
}

/// The Cholesky factor `L` (lower, `in × in`) of a damped Gram matrix `G + λ·mean(diag G)·I`.
#[derive(Debug, Clone)]
pub struct Whitening {
    l: Mat<f64>,
    /// `L` in f32, for the product `W·L` (made once, shared by every weight reading this input).
    l32: Mat<f32>,
    /// The relative damping λ that made `G` positive definite (0 when none was needed).
    pub damping: f64,
}

impl Whitening {
    fn new(l: MatRef<'_, f64>, damping: f64) -> Self {
        Whitening {
            l: l.to_owned(),
            l32: Mat::from_fn(l.nrows(), l.ncols(), |i, j| l[(i, j)] as f32),
            damping,
        }
    }

    /// Factors the Gram matrix `gram` (`in × in`, symmetric). If it is not positive definite, the
    /// relative damping λ grows from 1e-8 by 10x up to 1e-1; [`Whitening::damping`] says which
    /// one was used.
    pub fn from_gram(gram: MatRef<'_, f64>) -> Result<Self, WhitenError> {
        let n = gram.nrows();
        let finite = (0..n).all(|j| (0..n).all(|i| gram[(i, j)].is_finite()));
        if gram.ncols() != n || !finite {
            return Err(WhitenError::BadGram {
                rows: n,
                cols: gram.ncols(),
            });
        }
        if let Ok(llt) = gram.llt(Side::Lower) {
            return Ok(Whitening::new(llt.L(), 0.0));
        }
        let mean_diag = (0..n).map(|i| gram[(i, i)]).sum::<f64>() / n.max(1) as f64;
        let scale = if mean_diag > 0.0 { mean_diag } else { 1.0 };
        let mut lambda = 1e-8;
        while lambda <= 1e-1 {
            let damped = Mat::from_fn(n, n, |i, j| {
                gram[(i, j)] + if i == j { lambda * scale } else { 0.0 }
            });
            if let Ok(llt) = damped.llt(Side::Lower) {
                return Ok(Whitening::new(llt.L(), lambda));
            }
            lambda *= 10.0;
        }
        Err(WhitenError::NotPositiveDefinite(lambda / 10.0))
    }

    /// SVD of the whitened weight `A = W·L` for `w` (`out × in`).
    pub fn svd(&self, w: MatRef<'_, f32>) -> Result<Svd, WhitenError> {
        let a = w * &self.l32;
        Ok(thin_svd(a.as_ref())?)
    }

    /// Width of the input (`L` is `in × in`).
    pub fn dim(&self) -> usize {
        self.l.nrows()
    }

    /// `m·L` for `m` (`k × in`): a right factor moved into whitened coordinates.
    pub fn whiten(&self, m: MatRef<'_, f32>) -> Mat<f32> {
        m * &self.l32
    }

    /// `Lᵀ·v` for `v` (`in × k`): input-side basis vectors in whitened coordinates (the inverse
    /// of [`Whitening::unwhiten_basis`]).
    pub fn whiten_basis(&self, v: MatRef<'_, f32>) -> Mat<f32> {
        self.l32.transpose() * v
    }

    /// `L⁻ᵀ·v` for `v` (`in × k`), so that `(·)ᵀ` applied to an input equals `vᵀ` applied to the
    /// whitened input: how a basis fitted on `W·L` is stored for the unwhitened `W`.
    pub fn unwhiten_basis(&self, v: MatRef<'_, f32>) -> Mat<f32> {
        let mut y = Mat::from_fn(v.nrows(), v.ncols(), |i, j| v[(i, j)] as f64);
        solve_upper_triangular_in_place(self.l.transpose(), y.as_mut(), Par::Seq);
        Mat::from_fn(y.nrows(), y.ncols(), |i, j| y[(i, j)] as f32)
    }

    /// Rank-`rank` factors of `W` from the SVD of `W·L`: `u = U_r`, `vs = Σ_r V_rᵀ L⁻¹`.
    pub fn factors(&self, svd: &Svd, rank: usize) -> LowRankFactors {
        let r = rank.min(svd.s.len());
        let n = self.l.nrows();
        // vsᵀ = L⁻ᵀ (V_r Σ_r): solve Lᵀ Y = V_r Σ_r (Lᵀ is upper triangular).
        let mut y = Mat::from_fn(n, r, |i, k| svd.v[(i, k)] as f64 * svd.s[k] as f64);
        solve_upper_triangular_in_place(self.l.transpose(), y.as_mut(), Par::Seq);
        let y = &y;
        let vs = (0..r)
            .flat_map(|k| (0..n).map(move |j| y[(j, k)] as f32))
            .collect();
        LowRankFactors::from_row_major(svd.u.nrows(), r, n, row_major(svd.u.subcols(0, r)), vs)
    }
}

/// Refits the left factor to compensate upstream errors: with `vs` fixed, the `u` minimising
/// `‖X_d·Wᵀ − X_c·vsᵀ·uᵀ‖_F` — the dense layer's outputs on the dense model's inputs `X_d`, matched
/// from the compressed model's inputs `X_c` — is `uᵀ = (vs·G_cc·vsᵀ)⁻¹ · vs·G_cd·Wᵀ` with
/// `G_cc = X_cᵀX_c` and `G_cd = X_cᵀX_d` (both `in × in`). `w` is `out × in`, `vs` is `r × in`;
/// returns `u` (`out × r`). The `r × r` system is damped like [`Whitening::from_gram`] if needed.
pub fn refit_left(
    w: MatRef<'_, f32>,
    vs: MatRef<'_, f32>,
    g_cc: MatRef<'_, f64>,
    g_cd: MatRef<'_, f64>,
) -> Result<Mat<f32>, WhitenError> {
    let vs64 = Mat::from_fn(vs.nrows(), vs.ncols(), |i, j| vs[(i, j)] as f64);
    let w64 = Mat::from_fn(w.nrows(), w.ncols(), |i, j| w[(i, j)] as f64);
    let m = &vs64 * g_cc * vs64.transpose();
    let b = &vs64 * g_cd * w64.transpose();
    let llt = Whitening::from_gram(m.as_ref())?;
    // Solve L·Lᵀ·X = B: forward with L, backward with Lᵀ.
    let mut x = b;
    faer::linalg::triangular_solve::solve_lower_triangular_in_place(
        llt.l.as_ref(),
        x.as_mut(),
        Par::Seq,
    );
    solve_upper_triangular_in_place(llt.l.transpose(), x.as_mut(), Par::Seq);
    Ok(Mat::from_fn(x.ncols(), x.nrows(), |i, k| x[(k, i)] as f32))
}

/// `‖X·(W − u·vs)ᵀ‖_F` for inputs `x` (`n × in`): the output error a layer makes on `x`.
pub fn output_error(x: MatRef<'_, f32>, w: MatRef<'_, f32>, f: &LowRankFactors) -> f64 {
    let diff = w - f.to_dense();
    let e = x * diff.transpose();
    let mut s = 0.0f64;
    for j in 0..e.ncols() {
        for i in 0..e.nrows() {
            s += (e[(i, j)] as f64).powi(2);
        }
    }
    s.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_matrix as matrix;
    use proptest::prelude::*;

    fn gram(x: MatRef<'_, f32>) -> Mat<f64> {
        let g = x.transpose() * x;
        Mat::from_fn(g.nrows(), g.ncols(), |i, j| g[(i, j)] as f64)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        /// Whitened truncation never has a larger output error than plain truncation at the same
        /// rank, and its error is the discarded energy of the whitened spectrum.
        #[test]
        fn whitened_beats_plain_on_output_error(out in 3usize..16, inp in 3usize..12, seed in any::<u64>(), frac in 0.0f64..1.0) {
            let w = matrix(out, inp, seed);
            // Inputs with very different scales per feature, as real activations have.
            let x = Mat::from_fn(64, inp, |i, j| matrix(64, inp, seed ^ 0xabc)[(i, j)] * (1.0 + 4.0 * j as f32));
            let wh = Whitening::from_gram(gram(x.as_ref()).as_ref()).unwrap();
            let svd_w = wh.svd(w.as_ref()).unwrap();
            let r = ((svd_w.s.len() as f64) * frac) as usize;
            let fw = wh.factors(&svd_w, r);
            let fp = LowRankFactors::from_svd(&thin_svd(w.as_ref()).unwrap(), r);
            let ew = output_error(x.as_ref(), w.as_ref(), &fw);
            let ep = output_error(x.as_ref(), w.as_ref(), &fp);
            prop_assert!(ew <= ep * (1.0 + 1e-3) + 1e-4, "whitened {} > plain {}", ew, ep);
            let discarded: f64 = svd_w.s[r..].iter().map(|&s| (s as f64).powi(2)).sum::<f64>().sqrt();
            prop_assert!((ew - discarded).abs() <= 1e-3 * (1.0 + discarded), "{} vs {}", ew, discarded);
        }
    }

    #[test]
    fn refit_compensates_shifted_inputs() {
        let (out, inp, n, r) = (12, 10, 80, 4);
        let w = matrix(out, inp, 11);
        let xd = Mat::from_fn(n, inp, |i, j| matrix(n, inp, 12)[(i, j)] * (1.0 + j as f32));
        // The compressed model sees perturbed inputs.
        let xc = Mat::from_fn(n, inp, |i, j| xd[(i, j)] + 0.3 * matrix(n, inp, 13)[(i, j)]);
        let wh = Whitening::from_gram(gram(xc.as_ref()).as_ref()).unwrap();
        let svd = wh.svd(w.as_ref()).unwrap();
        let f = wh.factors(&svd, r);
        let to64 = |m: Mat<f32>| Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] as f64);
        let g_cc = gram(xc.as_ref());
        let g_cd = to64(xc.transpose() * &xd);
        let err = |u: MatRef<'_, f32>| {
            let d = &xd * w.transpose() - &xc * f.vs().transpose() * u.transpose();
            let mut s = 0.0f64;
            for j in 0..d.ncols() {
                for i in 0..d.nrows() {
                    s += (d[(i, j)] as f64).powi(2);
                }
            }
            s.sqrt()
        };
        let u2 = refit_left(w.as_ref(), f.vs(), g_cc.as_ref(), g_cd.as_ref()).unwrap();
        // Least squares: no u does better for this objective, and the whitened u is not it.
        assert!(
            err(u2.as_ref()) < err(f.u()),
            "refit {} vs whitened {}",
            err(u2.as_ref()),
            err(f.u())
        );
        let nudged = Mat::from_fn(out, r, |i, k| {
            u2[(i, k)] + 1e-2 * matrix(out, r, 14)[(i, k)]
        });
        assert!(err(u2.as_ref()) <= err(nudged.as_ref()));
        // With unperturbed inputs the whitened factors are already optimal: refit keeps them.
        let u3 = refit_left(w.as_ref(), f.vs(), g_cc.as_ref(), g_cc.as_ref()).unwrap();
        let diff = (0..out)
            .flat_map(|i| (0..r).map(move |k| (i, k)))
            .map(|(i, k)| (u3[(i, k)] - f.u()[(i, k)]).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-3, "{diff}");
    }

    #[test]
    fn singular_gram_is_damped_and_reported() {
        // Rank-deficient inputs: feature 2 is always zero.
        let x = Mat::from_fn(10, 3, |i, j| {
            if j == 2 {
                0.0
            } else {
                (i * (j + 1)) as f32 + 1.0
            }
        });
        let wh = Whitening::from_gram(gram(x.as_ref()).as_ref()).unwrap();
        assert!(wh.damping > 0.0);
        let bad = Mat::from_fn(2, 2, |_, _| f64::NAN);
        assert!(matches!(
            Whitening::from_gram(bad.as_ref()),
            Err(WhitenError::BadGram { .. })
        ));
    }
}
