//! Thin singular value decomposition on `faer`.

use faer::{Mat, MatRef};

/// Why a decomposition failed.
#[derive(Debug, thiserror::Error)]
pub enum SvdError {
    /// The iteration did not converge (non-finite input is the usual cause).
    #[error("SVD of a {rows}×{cols} matrix did not converge (non-finite values?)")]
    NoConvergence {
        /// Rows of the input.
        rows: usize,
        /// Columns of the input.
        cols: usize,
    },
}

/// `A = U · diag(s) · Vᵀ` with `k = min(rows, cols)`: `u` is `rows × k`, `s` has `k` values in
/// non-increasing order, `v` is `cols × k`; the columns of `u` and `v` are orthonormal.
#[derive(Debug, Clone)]
pub struct Svd {
    /// Left singular vectors, `rows × k`.
    pub u: Mat<f32>,
    /// Singular values, non-increasing.
    pub s: Vec<f32>,
    /// Right singular vectors, `cols × k`.
    pub v: Mat<f32>,
}

/// Thin SVD of the `rows × cols` matrix `a`.
pub fn thin_svd(a: MatRef<'_, f32>) -> Result<Svd, SvdError> {
    let (rows, cols) = (a.nrows(), a.ncols());
    let svd = a
        .thin_svd()
        .map_err(|_| SvdError::NoConvergence { rows, cols })?;
    let s: Vec<f32> = (0..rows.min(cols)).map(|i| svd.S()[i]).collect();
    Ok(Svd {
        u: svd.U().to_owned(),
        s,
        v: svd.V().to_owned(),
    })
}

/// Thin SVD of the product `b · a` (`b`: `rows × r`, `a`: `r × cols`) without forming it: with
/// `b = Q_b R_b` and `aᵀ = Q_a R_a`, `b·a = Q_b (R_b R_aᵀ) Q_aᵀ`, so only the `r × r` core is
/// decomposed. This is how a LoRA delta `B·A` is re-ranked at `O((rows + cols)·r²)` cost.
/// Returns `min(r, rows, cols)` values.
pub fn factored_svd(b: MatRef<'_, f32>, a: MatRef<'_, f32>) -> Result<Svd, SvdError> {
    assert_eq!(
        b.ncols(),
        a.nrows(),
        "factored_svd: inner dimensions differ"
    );
    let qr_b = b.qr();
    let qr_a = a.transpose().qr();
    let core = qr_b.thin_R() * qr_a.thin_R().transpose();
    let inner = thin_svd(core.as_ref())?;
    Ok(Svd {
        u: qr_b.compute_thin_Q() * &inner.u,
        s: inner.s,
        v: qr_a.compute_thin_Q() * &inner.v,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_max_abs as max_abs;
    use proptest::prelude::*;

    fn matrix(rows: usize, cols: usize, seed: u64) -> Mat<f32> {
        crate::test_matrix(rows, cols, seed)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Factors are orthonormal, values sorted, and the product rebuilds the input.
        #[test]
        fn svd_is_orthonormal_and_reconstructs(rows in 1usize..40, cols in 1usize..40, seed in any::<u64>()) {
            let a = matrix(rows, cols, seed);
            let svd = thin_svd(a.as_ref()).unwrap();
            let k = rows.min(cols);
            prop_assert_eq!(svd.s.len(), k);
            prop_assert!(svd.s.windows(2).all(|w| w[0] >= w[1]));
            let eye = Mat::<f32>::identity(k, k);
            prop_assert!(max_abs((svd.u.transpose() * &svd.u - &eye).as_ref()) < 1e-4);
            prop_assert!(max_abs((svd.v.transpose() * &svd.v - &eye).as_ref()) < 1e-4);
            let s = Mat::from_fn(k, k, |i, j| if i == j { svd.s[i] } else { 0.0 });
            let rebuilt = &svd.u * &s * svd.v.transpose();
            prop_assert!(max_abs((rebuilt - &a).as_ref()) < 1e-4);
        }

        /// Eckart–Young: the squared Frobenius error of the rank-r truncation equals the energy of
        /// the discarded singular values.
        #[test]
        fn truncation_error_is_discarded_energy(rows in 2usize..30, cols in 2usize..30, seed in any::<u64>(), frac in 0.0f64..1.0) {
            let a = matrix(rows, cols, seed);
            let svd = thin_svd(a.as_ref()).unwrap();
            let k = svd.s.len();
            let r = ((k as f64) * frac) as usize;
            let ur = svd.u.subcols(0, r);
            let vr = svd.v.subcols(0, r);
            let s = Mat::from_fn(r, r, |i, j| if i == j { svd.s[i] } else { 0.0 });
            let approx = ur * s * vr.transpose();
            let err: f64 = {
                let d = &a - approx;
                let mut e = 0.0f64;
                for j in 0..cols { for i in 0..rows { e += (d[(i, j)] as f64).powi(2); } }
                e
            };
            let discarded: f64 = svd.s[r..].iter().map(|&x| (x as f64).powi(2)).sum();
            let total: f64 = svd.s.iter().map(|&x| (x as f64).powi(2)).sum();
            prop_assert!((err - discarded).abs() <= 1e-4 * total.max(1e-12), "err {} discarded {}", err, discarded);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// The SVD of a product through its factors has the spectrum of the formed product,
        /// orthonormal factors, and rebuilds the product.
        #[test]
        fn factored_svd_matches_the_formed_product(rows in 1usize..40, cols in 1usize..40, r in 1usize..10, seed in any::<u64>()) {
            let b = matrix(rows, r, seed);
            let a = matrix(r, cols, seed ^ 0x9e37);
            let product = &b * &a;
            let f = factored_svd(b.as_ref(), a.as_ref()).unwrap();
            let full = thin_svd(product.as_ref()).unwrap();
            let k = f.s.len();
            prop_assert_eq!(k, r.min(rows).min(cols));
            let scale = full.s[0].max(1e-6);
            for i in 0..k {
                prop_assert!((f.s[i] - full.s[i]).abs() <= 1e-4 * scale, "value {}: {} vs {}", i, f.s[i], full.s[i]);
            }
            let eye = Mat::<f32>::identity(k, k);
            prop_assert!(max_abs((f.u.transpose() * &f.u - &eye).as_ref()) < 1e-4);
            prop_assert!(max_abs((f.v.transpose() * &f.v - &eye).as_ref()) < 1e-4);
            let s = Mat::from_fn(k, k, |i, j| if i == j { f.s[i] } else { 0.0 });
            let rebuilt = &f.u * &s * f.v.transpose();
            prop_assert!(max_abs((rebuilt - &product).as_ref()) <= 1e-4 * scale);
        }
    }

    #[test]
    fn known_spectrum() {
        // diag(3, 2, 1) mixed by a permutation: singular values are 3, 2, 1.
        let a = Mat::from_fn(3, 3, |i, j| match (i, j) {
            (0, 1) => 2.0,
            (1, 0) => 3.0,
            (2, 2) => -1.0,
            _ => 0.0,
        });
        let svd = thin_svd(a.as_ref()).unwrap();
        for (got, want) in svd.s.iter().zip([3.0, 2.0, 1.0]) {
            assert!((got - want).abs() < 1e-6);
        }
    }
}
