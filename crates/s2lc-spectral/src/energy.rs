//! Rank selection by retained spectral energy.
//!
//! The energy of the rank-`r` truncation is `Σ_{i<r} σ_i² / Σ σ_i²`; by Eckart–Young the squared
//! Frobenius error of that truncation is exactly the discarded energy.

/// Cumulative energy fractions: element `r-1` is the energy kept by rank `r` (the last is 1).
/// An all-zero spectrum keeps everything at every rank.
pub fn cumulative_energy(singular_values: &[f32]) -> Vec<f64> {
    let total: f64 = singular_values.iter().map(|&s| (s as f64).powi(2)).sum();
    let mut acc = 0.0;
    singular_values
        .iter()
        .map(|&s| {
            acc += (s as f64).powi(2);
            if total > 0.0 {
                acc / total
            } else {
                1.0
            }
        })
        .collect()
}

/// `‖M‖²_F` in f64: the energy every truncation and projection is measured against.
pub fn sq_frobenius(m: faer::MatRef<'_, f32>) -> f64 {
    let mut e = 0.0f64;
    for j in 0..m.ncols() {
        for i in 0..m.nrows() {
            e += (m[(i, j)] as f64).powi(2);
        }
    }
    e
}

/// Smallest rank whose cumulative energy reaches `threshold` (in `[0, 1]`); values must be sorted
/// non-increasing. Rank 0 only for a zero threshold or an all-zero spectrum.
pub fn rank_for_energy(singular_values: &[f32], threshold: f64) -> usize {
    if threshold <= 0.0 {
        return 0;
    }
    let cum = cumulative_energy(singular_values);
    // A tiny tolerance so that `threshold = 1.0` is reached despite rounding in the sums.
    cum.iter()
        .position(|&e| e >= threshold - 1e-12)
        .map_or(singular_values.len(), |i| i + 1)
}

/// Largest rank at which `U (rows × r)` plus `Vs (r × cols)` hold fewer values than the dense
/// `rows × cols` matrix: `r < rows·cols / (rows + cols)`.
pub fn break_even_rank(rows: usize, cols: usize) -> usize {
    let full = rows * cols;
    let per_rank = rows + cols;
    if per_rank == 0 {
        return 0;
    }
    (full - 1) / per_rank
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn energy_by_hand() {
        let s = [3.0, 2.0, 1.0]; // energies 9, 4, 1 of 14
        let c = cumulative_energy(&s);
        assert!((c[0] - 9.0 / 14.0).abs() < 1e-12 && (c[2] - 1.0).abs() < 1e-12);
        assert_eq!(rank_for_energy(&s, 0.5), 1);
        assert_eq!(rank_for_energy(&s, 0.9), 2);
        assert_eq!(rank_for_energy(&s, 0.95), 3);
        assert_eq!(rank_for_energy(&s, 1.0), 3);
        assert_eq!(rank_for_energy(&s, 0.0), 0);
        assert_eq!(rank_for_energy(&[0.0, 0.0], 0.9), 1);
    }

    #[test]
    fn break_even_by_hand() {
        // 576 × 576: 2·576·r < 576² ⇔ r < 288.
        assert_eq!(break_even_rank(576, 576), 287);
        assert_eq!(break_even_rank(1536, 576), 418);
        assert_eq!(break_even_rank(1, 1), 0);
    }

    proptest! {
        #[test]
        fn rank_is_monotone_in_threshold(mut s in proptest::collection::vec(0.0f32..10.0, 1..50), a in 0.0f64..1.0, b in 0.0f64..1.0) {
            s.sort_by(|x, y| y.total_cmp(x));
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(rank_for_energy(&s, lo) <= rank_for_energy(&s, hi));
            let r = rank_for_energy(&s, hi);
            prop_assert!(r <= s.len());
            if r > 0 && s.iter().any(|&x| x > 0.0) {
                prop_assert!(cumulative_energy(&s)[r - 1] >= hi - 1e-9);
            }
        }

        #[test]
        fn below_break_even_saves_values(rows in 1usize..2000, cols in 1usize..2000) {
            let r = break_even_rank(rows, cols);
            prop_assert!(r * (rows + cols) < rows * cols);
            prop_assert!((r + 1) * (rows + cols) >= rows * cols);
        }
    }
}
