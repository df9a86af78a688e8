//! One spectral basis shared by several matrices of the same shape (S2LC packing).
//!
//! Each member `Mᵢ ≈ Uᵢ·diag(sᵢ)·Vᵢᵀ` comes as a truncated SVD. The column spaces are pooled in
//! `L = [U₁·diag(s₁)/‖s₁‖, …, U_N·diag(s_N)/‖s_N‖]` (each member scaled to unit Frobenius norm, so
//! a weak member is represented as well as a strong one) and the shared left basis `U` is the
//! leading left singular vectors of `L`, as many as keep the requested share of `‖L‖²`; the row
//! spaces give `V` the same way. A member is then stored as its core `Cᵢ = Uᵀ·Mᵢ·V` (`p × q`), and
//! `Mᵢ ≈ U·Cᵢ·Vᵀ`. Because `U` and `V` have orthonormal columns this is an orthogonal projection:
//! `‖Mᵢ − U·Cᵢ·Vᵀ‖²_F = ‖Mᵢ‖²_F − ‖Cᵢ‖²_F`.

use faer::{Mat, MatRef};

use crate::energy::rank_for_energy;
use crate::svd::{thin_svd, Svd, SvdError};

/// The shared bases of a set of `rows × cols` matrices.
#[derive(Debug, Clone)]
pub struct SharedBasis {
    /// `rows × p`, orthonormal columns.
    pub u: Mat<f32>,
    /// `cols × q`, orthonormal columns.
    pub v: Mat<f32>,
}

/// Leading left singular vectors of `[f₁·diag(s₁)/‖s₁‖, …]` keeping `energy` (capped at
/// `max_rank`; at least 1 when any member is non-zero, 0 when all are zero).
fn pooled_basis(
    factors: &[(MatRef<'_, f32>, &[f32])],
    energy: f64,
    max_rank: Option<usize>,
) -> Result<Mat<f32>, SvdError> {
    let rows = factors.first().map_or(0, |(f, _)| f.nrows());
    let width: usize = factors.iter().map(|(_, s)| s.len()).sum();
    let mut pooled = Mat::<f32>::zeros(rows, width);
    let mut col = 0;
    for (f, s) in factors {
        let norm = s.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        for (j, &sj) in s.iter().enumerate() {
            let w = if norm > 0.0 {
                (sj as f64 / norm) as f32
            } else {
                0.0
            };
            for i in 0..rows {
                pooled[(i, col)] = f[(i, j)] * w;
            }
            col += 1;
        }
    }
    if width == 0 {
        return Ok(Mat::zeros(rows, 0));
    }
    let svd = thin_svd(pooled.as_ref())?;
    let k = if svd.s.first().is_some_and(|&s| s > 0.0) {
        rank_for_energy(&svd.s, energy)
            .min(max_rank.unwrap_or(usize::MAX))
            .max(1)
    } else {
        0
    };
    Ok(svd.u.subcols(0, k).to_owned())
}

/// Fits the shared bases of `members` (truncated SVDs of matrices of one shape), keeping `energy`
/// of the pooled, norm-balanced column and row spaces, at most `max_rank` vectors per side.
pub fn fit_shared_basis(
    members: &[Svd],
    energy: f64,
    max_rank: Option<usize>,
) -> Result<SharedBasis, SvdError> {
    let left: Vec<_> = members.iter().map(|m| (m.u.as_ref(), &m.s[..])).collect();
    let right: Vec<_> = members.iter().map(|m| (m.v.as_ref(), &m.s[..])).collect();
    Ok(SharedBasis {
        u: pooled_basis(&left, energy, max_rank)?,
        v: pooled_basis(&right, energy, max_rank)?,
    })
}

impl SharedBasis {
    /// The core `Uᵀ·M·V` (`p × q`) of a member given as a (truncated) SVD.
    pub fn core(&self, member: &Svd) -> Mat<f32> {
        let mut left = self.u.transpose() * &member.u; // p × k
        for (j, &s) in member.s.iter().enumerate() {
            for i in 0..left.nrows() {
                left[(i, j)] *= s;
            }
        }
        left * (member.v.transpose() * &self.v)
    }

    /// `U·C·Vᵀ`, dense (for checks).
    pub fn expand(&self, core: MatRef<'_, f32>) -> Mat<f32> {
        &self.u * core * self.v.transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_matrix;
    use crate::test_max_abs as max_abs;
    use proptest::prelude::*;

    use crate::energy::sq_frobenius as sq_norm;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        /// Members drawn from one common rank-r subspace pair are rebuilt exactly by a rank-r
        /// shared basis, and every core's energy is the member's.
        #[test]
        fn common_subspace_is_found(rows in 8usize..40, cols in 8usize..40, r in 1usize..6,
                                    n in 1usize..5, seed in any::<u64>()) {
            let r = r.min(rows).min(cols);
            let left = thin_svd(test_matrix(rows, r, seed).as_ref()).unwrap().u;
            let right = thin_svd(test_matrix(cols, r, seed ^ 7).as_ref()).unwrap().u;
            let mats: Vec<Mat<f32>> = (0..n)
                .map(|i| &left * test_matrix(r, r, seed ^ (i as u64 + 11)) * right.transpose())
                .collect();
            let members: Vec<Svd> = mats.iter().map(|m| thin_svd(m.as_ref()).unwrap()).collect();
            let basis = fit_shared_basis(&members, 0.999_999, None).unwrap();
            prop_assert!(basis.u.ncols() <= r && basis.v.ncols() <= r);
            for (m, svd) in mats.iter().zip(&members) {
                let core = basis.core(svd);
                let back = basis.expand(core.as_ref());
                let scale = max_abs(m.as_ref()).max(1e-6);
                prop_assert!(max_abs((back - m).as_ref()) <= 1e-3 * scale);
            }
        }

        /// Projection: the squared error of each member is its energy minus its core's energy.
        #[test]
        fn error_is_the_energy_outside_the_basis(rows in 4usize..30, cols in 4usize..30,
                                                 n in 1usize..4, seed in any::<u64>(), e in 0.3f64..0.95) {
            let mats: Vec<Mat<f32>> = (0..n).map(|i| test_matrix(rows, cols, seed ^ (i as u64 * 31 + 1))).collect();
            let members: Vec<Svd> = mats.iter().map(|m| thin_svd(m.as_ref()).unwrap()).collect();
            let basis = fit_shared_basis(&members, e, None).unwrap();
            let eye_u = Mat::<f32>::identity(basis.u.ncols(), basis.u.ncols());
            prop_assert!(max_abs((basis.u.transpose() * &basis.u - eye_u).as_ref()) < 1e-4);
            for (m, svd) in mats.iter().zip(&members) {
                let core = basis.core(svd);
                let err = sq_norm((basis.expand(core.as_ref()) - m).as_ref());
                let want = sq_norm(m.as_ref()) - sq_norm(core.as_ref());
                prop_assert!((err - want).abs() <= 1e-4 * sq_norm(m.as_ref()), "{} vs {}", err, want);
            }
        }
    }

    #[test]
    fn rank_cap_and_empty_members() {
        let m = test_matrix(10, 12, 5);
        let svd = thin_svd(m.as_ref()).unwrap();
        let basis = fit_shared_basis(std::slice::from_ref(&svd), 1.0, Some(3)).unwrap();
        assert_eq!((basis.u.ncols(), basis.v.ncols()), (3, 3));
        let zero = thin_svd(Mat::<f32>::zeros(10, 12).as_ref()).unwrap();
        let basis = fit_shared_basis(&[zero], 0.9, None).unwrap();
        assert_eq!(basis.u.ncols(), 0);
    }
}
