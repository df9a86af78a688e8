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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_max_abs as max_abs;
    use proptest::prelude::*;

    fn matrix(rows: usize, cols: usize, seed: u64) -> Mat<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        Mat::from_fn(rows, cols, |_, _| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
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
