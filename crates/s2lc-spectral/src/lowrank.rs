//! Low-rank factorization of a weight and rank allocation under a parameter budget.
//!
//! A weight `W` (`rows × cols`, i.e. `out × in`) of rank-`r` truncation `W ≈ U_r Σ_r V_rᵀ` is kept
//! as `u = U_r` (`out × r`) and `vs = Σ_r V_rᵀ` (`r × in`), so a layer computes `y = (x·vsᵀ)·uᵀ`.
//! The same pair is a LoRA delta `ΔW = b·a` (`b = u`, `a = vs`).

use faer::{Mat, MatRef};

use crate::energy::break_even_rank;
use crate::row_major;
use crate::svd::Svd;

/// The thin factors of a rank-`r` approximation `W ≈ u · vs`, both row-major: the runtime's
/// layout, so compressed layers, unpacked adapters and the sentence encoder take them without a
/// copy. [`LowRankFactors::u`] and [`LowRankFactors::vs`] view them as matrices.
#[derive(Debug, Clone, PartialEq)]
pub struct LowRankFactors {
    rows: usize,
    rank: usize,
    cols: usize,
    /// `rows × rank`, row-major.
    u: Vec<f32>,
    /// `rank × cols`, row-major.
    vs: Vec<f32>,
}

impl LowRankFactors {
    /// Factors from row-major `u` (`rows × rank`) and `vs` (`rank × cols`).
    ///
    /// # Panics
    /// When the lengths do not match the shape (a caller's bug, not a data error).
    pub fn from_row_major(
        rows: usize,
        rank: usize,
        cols: usize,
        u: Vec<f32>,
        vs: Vec<f32>,
    ) -> Self {
        assert_eq!(u.len(), rows * rank, "u is not {rows} × {rank}");
        assert_eq!(vs.len(), rank * cols, "vs is not {rank} × {cols}");
        LowRankFactors {
            rows,
            rank,
            cols,
            u,
            vs,
        }
    }

    /// Factors from the matrices `u` (`rows × r`) and `vs` (`r × cols`).
    ///
    /// # Panics
    /// When `u` has not as many columns as `vs` has rows.
    pub fn from_mats(u: MatRef<'_, f32>, vs: MatRef<'_, f32>) -> Self {
        assert_eq!(u.ncols(), vs.nrows(), "u and vs disagree on the rank");
        Self::from_row_major(
            u.nrows(),
            u.ncols(),
            vs.ncols(),
            row_major(u),
            row_major(vs),
        )
    }

    /// Builds the rank-`rank` factors from a thin SVD (rank is clamped to the number of values).
    pub fn from_svd(svd: &Svd, rank: usize) -> Self {
        let r = rank.min(svd.s.len());
        let cols = svd.v.nrows();
        let vs = (0..r)
            .flat_map(|i| (0..cols).map(move |j| svd.s[i] * svd.v[(j, i)]))
            .collect();
        Self::from_row_major(svd.u.nrows(), r, cols, row_major(svd.u.subcols(0, r)), vs)
    }

    /// Rows of `W` (`out`).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Columns of `W` (`in`).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The left factor `u` (`rows × r`).
    pub fn u(&self) -> MatRef<'_, f32> {
        MatRef::from_row_major_slice(&self.u, self.rows, self.rank)
    }

    /// The right factor `vs` (`r × cols`).
    pub fn vs(&self) -> MatRef<'_, f32> {
        MatRef::from_row_major_slice(&self.vs, self.rank, self.cols)
    }

    /// The values of `u`, row-major.
    pub fn u_values(&self) -> &[f32] {
        &self.u
    }

    /// The values of `vs`, row-major.
    pub fn vs_values(&self) -> &[f32] {
        &self.vs
    }

    /// `(u, vs)` as row-major buffers, without a copy.
    pub fn into_row_major(self) -> (Vec<f32>, Vec<f32>) {
        (self.u, self.vs)
    }

    /// Values stored, `rank · (rows + cols)`.
    pub fn params(&self) -> usize {
        self.rank * (self.rows + self.cols)
    }

    /// `u · vs`, the dense approximation (for checks; the runtime never re-densifies).
    pub fn to_dense(&self) -> Mat<f32> {
        self.u() * self.vs()
    }
}

/// A matrix seen by the budget allocator: its shape and singular values (non-increasing).
#[derive(Debug, Clone, Copy)]
pub struct Spectrum<'a> {
    /// Rows (`out`).
    pub rows: usize,
    /// Columns (`in`).
    pub cols: usize,
    /// Singular values, non-increasing.
    pub values: &'a [f32],
}

/// Why a budget cannot be met.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BudgetError {
    /// The keep ratio is not in (0, 1].
    #[error("keep ratio {0} is outside (0, 1]")]
    BadRatio(f64),
    /// Even all matrices at rank 1 hold more than the budget.
    #[error("cannot keep {keep:.1}% of the parameters: rank 1 everywhere already keeps {min:.1}%")]
    Infeasible {
        /// Requested percentage.
        keep: f64,
        /// Smallest achievable percentage.
        min: f64,
    },
}

/// Ranks for `matrices` so that their parameters total at most `keep` of the dense total.
///
/// Every matrix starts at rank 1 (`rows + cols` values); the remaining budget goes to the next
/// singular direction with the largest share of its matrix's energy per parameter,
/// `σ_i² / Σσ² / (rows + cols)`, across all matrices. Energy is compared as a share because
/// matrices (and whitened spectra, which carry their inputs' scale) differ widely in magnitude. No matrix goes above its break-even rank (beyond it the factors hold more values than
/// the dense matrix). The result is one rank per matrix, in order.
pub fn allocate_ranks(matrices: &[Spectrum<'_>], keep: f64) -> Result<Vec<usize>, BudgetError> {
    if !(keep > 0.0 && keep <= 1.0) {
        return Err(BudgetError::BadRatio(keep));
    }
    let total: usize = matrices.iter().map(|m| m.rows * m.cols).sum();
    let budget = (keep * total as f64).floor() as usize;
    let min: usize = matrices.iter().map(|m| m.rows + m.cols).sum();
    if min > budget {
        return Err(BudgetError::Infeasible {
            keep: 100.0 * keep,
            min: 100.0 * min as f64 / total.max(1) as f64,
        });
    }
    // Max-heap of (energy per parameter of the next direction, matrix index).
    #[derive(PartialEq)]
    struct Next(f64, usize);
    impl Eq for Next {}
    impl PartialOrd for Next {
        fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(o))
        }
    }
    impl Ord for Next {
        fn cmp(&self, o: &Self) -> std::cmp::Ordering {
            self.0.total_cmp(&o.0).then(o.1.cmp(&self.1))
        }
    }
    let mut ranks = vec![1usize; matrices.len()];
    let mut used = min;
    let totals: Vec<f64> = matrices
        .iter()
        .map(|m| {
            m.values
                .iter()
                .map(|&s| (s as f64).powi(2))
                .sum::<f64>()
                .max(f64::MIN_POSITIVE)
        })
        .collect();
    let gain = |i: usize, r: usize| -> Option<f64> {
        let m = &matrices[i];
        let s = *m.values.get(r)? as f64;
        Some(s * s / totals[i] / (m.rows + m.cols) as f64)
    };
    let mut heap: std::collections::BinaryHeap<Next> = matrices
        .iter()
        .enumerate()
        .filter_map(|(i, _)| gain(i, 1).map(|g| Next(g, i)))
        .collect();
    while let Some(Next(_, i)) = heap.pop() {
        let m = &matrices[i];
        let cost = m.rows + m.cols;
        if ranks[i] + 1 > break_even_rank(m.rows, m.cols) || used + cost > budget {
            continue;
        }
        ranks[i] += 1;
        used += cost;
        if let Some(g) = gain(i, ranks[i]) {
            heap.push(Next(g, i));
        }
    }
    Ok(ranks)
}

/// Relative Frobenius error `‖W − u·vs‖ / ‖W‖` of factors against the dense `w`.
pub fn relative_error(w: MatRef<'_, f32>, f: &LowRankFactors) -> f64 {
    let d = f.to_dense();
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for j in 0..w.ncols() {
        for i in 0..w.nrows() {
            let a = w[(i, j)] as f64;
            num += (a - d[(i, j)] as f64).powi(2);
            den += a * a;
        }
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::svd::thin_svd;
    use crate::test_matrix as matrix;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// ‖W − u·vs‖_F equals sqrt(Σ_{i≥r} σ_i²), the discarded spectral energy.
        #[test]
        fn factor_error_is_discarded_energy(rows in 2usize..30, cols in 2usize..30, seed in any::<u64>(), frac in 0.0f64..1.0) {
            let w = matrix(rows, cols, seed);
            let svd = thin_svd(w.as_ref()).unwrap();
            let r = ((svd.s.len() as f64) * frac) as usize;
            let f = LowRankFactors::from_svd(&svd, r);
            prop_assert_eq!(f.rank(), r);
            let err = relative_error(w.as_ref(), &f);
            let total: f64 = svd.s.iter().map(|&s| (s as f64).powi(2)).sum();
            let discarded: f64 = svd.s[r..].iter().map(|&s| (s as f64).powi(2)).sum();
            prop_assert!((err - (discarded / total).sqrt()).abs() < 1e-3, "{} vs {}", err, (discarded / total).sqrt());
        }
    }

    #[test]
    fn budget_prefers_energy_per_parameter_and_respects_break_even() {
        // Matrix 0 has a flat spectrum, matrix 1 a steep one: the budget goes to matrix 0's
        // directions only when they pay more per parameter.
        let flat = [1.0f32; 10];
        let steep = [10.0f32, 5.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1];
        let ms = [
            Spectrum {
                rows: 10,
                cols: 10,
                values: &flat,
            },
            Spectrum {
                rows: 10,
                cols: 10,
                values: &steep,
            },
        ];
        // Total 200, budget 100 = 5 rank-units of 20 values; rank 1 each uses 2. Then steep's
        // σ₂² share 25/125.08 beats flat's 1/10, which beats steep's σ₃² share twice.
        let ranks = allocate_ranks(&ms, 0.5).unwrap();
        assert_eq!(ranks, vec![3, 2]);
        let used: usize = ranks.iter().map(|r| r * 20).sum();
        assert!(used <= 100);
        // Ranks never pass break-even (4 for 10 × 10).
        let ranks = allocate_ranks(&ms, 1.0).unwrap();
        assert_eq!(ranks, vec![4, 4]);
    }

    #[test]
    fn budget_errors_are_clear() {
        let v = [1.0f32; 4];
        let ms = [Spectrum {
            rows: 4,
            cols: 4,
            values: &v,
        }];
        assert_eq!(allocate_ranks(&ms, 0.0), Err(BudgetError::BadRatio(0.0)));
        assert_eq!(allocate_ranks(&ms, 1.5), Err(BudgetError::BadRatio(1.5)));
        assert!(matches!(
            allocate_ranks(&ms, 0.1),
            Err(BudgetError::Infeasible { .. })
        ));
    }
}
