//! Spectral analysis of a model's weights: per-matrix spectra, ranks per energy threshold, and the
//! report (per-kind summary and model totals) that `s2lc analyze` prints and serializes.
//!
//! A matrix is `rows × cols` = `out × in`. At rank `r` its factors hold `r·(rows + cols)` values;
//! that saves over the dense `rows·cols` only up to the break-even rank ([`break_even_rank`]), so a
//! matrix whose rank at a threshold is above break-even is counted as staying dense.

use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::svd::{svd, svd_scratch, ComputeSvdVectors};
use faer::{MatRef, Par};
use serde::{Deserialize, Serialize};

use crate::energy::{break_even_rank, cumulative_energy, rank_for_energy};
use crate::svd::SvdError;

/// The energy thresholds `s2lc analyze` reports: 80, 85, 90, 95 and 99 %.
pub const DEFAULT_THRESHOLDS: [f64; 5] = [0.80, 0.85, 0.90, 0.95, 0.99];

/// Why an analysis could not be built.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AnalysisError {
    /// An energy threshold is not in (0, 1].
    #[error("energy threshold {0} is outside (0, 1]")]
    BadThreshold(f64),
    /// The number of singular values is not `min(rows, cols)`.
    #[error("{name}: {got} singular values for a {rows}×{cols} matrix (expected min(rows, cols))")]
    WrongLength {
        /// Matrix name.
        name: String,
        /// Rows of the matrix.
        rows: usize,
        /// Columns of the matrix.
        cols: usize,
        /// Values given.
        got: usize,
    },
    /// A singular value is negative or not finite.
    #[error("{name}: singular values must be finite and non-negative")]
    BadValue {
        /// Matrix name.
        name: String,
    },
}

/// Singular values of the `rows × cols` matrix `a`, non-increasing, `min(rows, cols)` of them.
///
/// Skips the singular vectors, which makes it several times faster than [`crate::thin_svd`].
/// `par` is the parallelism inside this one decomposition: use `Par::Seq` when the caller already
/// runs many decompositions in parallel.
pub fn singular_values(a: MatRef<'_, f32>, par: Par) -> Result<Vec<f32>, SvdError> {
    let (rows, cols) = (a.nrows(), a.ncols());
    let mut s = Diag::<f32>::zeros(rows.min(cols));
    let scratch = svd_scratch::<f32>(
        rows,
        cols,
        ComputeSvdVectors::No,
        ComputeSvdVectors::No,
        par,
        Default::default(),
    );
    let mut buf = MemBuffer::new(scratch);
    svd(
        a,
        s.as_mut(),
        None,
        None,
        par,
        MemStack::new(&mut buf),
        Default::default(),
    )
    .map_err(|_| SvdError::NoConvergence { rows, cols })?;
    let mut values: Vec<f32> = s.column_vector().iter().map(|x| x.abs()).collect();
    if values.iter().any(|v| !v.is_finite()) {
        return Err(SvdError::NoConvergence { rows, cols });
    }
    values.sort_by(|x, y| y.total_cmp(x));
    Ok(values)
}

/// The rank that reaches one energy threshold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RankAtEnergy {
    /// Energy fraction in (0, 1].
    pub energy: f64,
    /// Smallest rank whose cumulative energy reaches `energy`.
    pub rank: usize,
}

/// The spectrum of one weight matrix and its ranks per energy threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MatrixSpectrum {
    /// Full Hugging Face name, e.g. `model.layers.3.self_attn.q_proj`.
    pub name: String,
    /// Decoder layer index.
    pub layer: usize,
    /// Layer type: the name below `model.layers.N.`, e.g. `self_attn.q_proj`.
    pub kind: String,
    /// Rows (`out`).
    pub rows: usize,
    /// Columns (`in`).
    pub cols: usize,
    /// All `min(rows, cols)` singular values, non-increasing.
    pub singular_values: Vec<f32>,
    /// Rank per threshold, in the order the thresholds were given.
    pub ranks: Vec<RankAtEnergy>,
    /// Largest rank whose factors hold fewer values than the dense matrix.
    pub break_even_rank: usize,
}

impl MatrixSpectrum {
    /// Summarises one `rows × cols` matrix from its singular values (sorted here, so any order is
    /// accepted) at each of `thresholds` (each in (0, 1]).
    pub fn new(
        name: impl Into<String>,
        layer: usize,
        kind: impl Into<String>,
        rows: usize,
        cols: usize,
        mut singular_values: Vec<f32>,
        thresholds: &[f64],
    ) -> Result<Self, AnalysisError> {
        let name = name.into();
        check_thresholds(thresholds)?;
        if singular_values.len() != rows.min(cols) {
            return Err(AnalysisError::WrongLength {
                name,
                rows,
                cols,
                got: singular_values.len(),
            });
        }
        if singular_values.iter().any(|&s| !s.is_finite() || s < 0.0) {
            return Err(AnalysisError::BadValue { name });
        }
        singular_values.sort_by(|x, y| y.total_cmp(x));
        let ranks = thresholds
            .iter()
            .map(|&energy| RankAtEnergy {
                energy,
                rank: rank_for_energy(&singular_values, energy),
            })
            .collect();
        Ok(MatrixSpectrum {
            name,
            layer,
            kind: kind.into(),
            rows,
            cols,
            singular_values,
            ranks,
            break_even_rank: break_even_rank(rows, cols),
        })
    }

    /// `min(rows, cols)`.
    pub fn full_rank(&self) -> usize {
        self.rows.min(self.cols)
    }

    /// Values of the dense matrix, `rows·cols`.
    pub fn dense_params(&self) -> usize {
        self.rows * self.cols
    }

    /// The rank recorded for `energy`, if that threshold was analysed.
    pub fn rank_at(&self, energy: f64) -> Option<usize> {
        self.ranks
            .iter()
            .find(|r| (r.energy - energy).abs() < 1e-9)
            .map(|r| r.rank)
    }

    /// Whether rank `rank` factors hold fewer values than the dense matrix.
    pub fn shrinks_at_rank(&self, rank: usize) -> bool {
        rank <= self.break_even_rank
    }

    /// Values kept at rank `rank`: `rank·(rows + cols)` when that shrinks the matrix, else the
    /// dense count (a matrix that would not shrink stays dense).
    pub fn params_at_rank(&self, rank: usize) -> usize {
        if self.shrinks_at_rank(rank) {
            rank * (self.rows + self.cols)
        } else {
            self.dense_params()
        }
    }

    /// Cumulative energy fractions (element `r-1` is the energy kept by rank `r`).
    pub fn cumulative_energy(&self) -> Vec<f64> {
        cumulative_energy(&self.singular_values)
    }

    /// `σ_i / σ_0` for every value; all zeros for an all-zero matrix.
    pub fn normalised_decay(&self) -> Vec<f64> {
        let top = self.singular_values.first().copied().unwrap_or(0.0) as f64;
        self.singular_values
            .iter()
            .map(|&s| if top > 0.0 { s as f64 / top } else { 0.0 })
            .collect()
    }
}

fn check_thresholds(thresholds: &[f64]) -> Result<(), AnalysisError> {
    match thresholds.iter().find(|&&t| !(t > 0.0 && t <= 1.0)) {
        Some(&t) => Err(AnalysisError::BadThreshold(t)),
        None => Ok(()),
    }
}

/// Mean ranks of one layer type across layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KindSummary {
    /// Layer type, e.g. `self_attn.q_proj`.
    pub kind: String,
    /// Matrices of this type.
    pub count: usize,
    /// Rows of the first matrix of this type (all share it in a Llama model).
    pub rows: usize,
    /// Columns of the first matrix of this type.
    pub cols: usize,
    /// Per threshold: mean of `rank / min(rows, cols)` over the matrices.
    pub mean_rank_fraction: Vec<RankFraction>,
    /// Mean of `break_even_rank / min(rows, cols)`.
    pub break_even_fraction: f64,
}

/// A mean rank, as a fraction of full rank, at one threshold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RankFraction {
    /// Energy fraction in (0, 1].
    pub energy: f64,
    /// Mean of `rank / min(rows, cols)`.
    pub fraction: f64,
}

/// Parameters kept over all analysed matrices at one threshold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ThresholdTotal {
    /// Energy fraction in (0, 1].
    pub energy: f64,
    /// Values kept: `r·(rows + cols)` for matrices that shrink, `rows·cols` for those that don't.
    pub params: usize,
    /// Values of all matrices dense.
    pub dense_params: usize,
    /// Matrices whose rank at this threshold is at or below break-even.
    pub matrices_shrunk: usize,
    /// Matrices analysed.
    pub matrices: usize,
}

impl ThresholdTotal {
    /// `params / dense_params`.
    pub fn ratio(&self) -> f64 {
        self.params as f64 / self.dense_params.max(1) as f64
    }
}

/// Everything `s2lc analyze` reports, serializable as its JSON output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpectralReport {
    /// The tool that made the report, e.g. `s2lc`.
    pub tool: String,
    /// Its version.
    pub tool_version: String,
    /// The model analysed (path as given).
    pub model: String,
    /// Energy thresholds, in order.
    pub thresholds: Vec<f64>,
    /// One summary per layer type, in first-seen order.
    pub kinds: Vec<KindSummary>,
    /// Model totals, one per threshold.
    pub totals: Vec<ThresholdTotal>,
    /// Every matrix, in the order given.
    pub matrices: Vec<MatrixSpectrum>,
}

impl SpectralReport {
    /// Builds the report and its summaries. Every matrix must have been analysed at exactly
    /// `thresholds` (as [`MatrixSpectrum::new`] does when given the same slice).
    pub fn new(
        tool: impl Into<String>,
        tool_version: impl Into<String>,
        model: impl Into<String>,
        thresholds: &[f64],
        matrices: Vec<MatrixSpectrum>,
    ) -> Result<Self, AnalysisError> {
        check_thresholds(thresholds)?;
        let kinds = kind_summaries(&matrices, thresholds);
        let totals = thresholds
            .iter()
            .enumerate()
            .map(|(t, &energy)| {
                let mut total = ThresholdTotal {
                    energy,
                    params: 0,
                    dense_params: 0,
                    matrices_shrunk: 0,
                    matrices: matrices.len(),
                };
                for m in &matrices {
                    let rank = m.ranks[t].rank;
                    total.params += m.params_at_rank(rank);
                    total.dense_params += m.dense_params();
                    total.matrices_shrunk += usize::from(m.shrinks_at_rank(rank));
                }
                total
            })
            .collect();
        Ok(SpectralReport {
            tool: tool.into(),
            tool_version: tool_version.into(),
            model: model.into(),
            thresholds: thresholds.to_vec(),
            kinds,
            totals,
            matrices,
        })
    }
}

fn kind_summaries(matrices: &[MatrixSpectrum], thresholds: &[f64]) -> Vec<KindSummary> {
    let mut order: Vec<&str> = Vec::new();
    for m in matrices {
        if !order.contains(&m.kind.as_str()) {
            order.push(&m.kind);
        }
    }
    order
        .into_iter()
        .map(|kind| {
            let of_kind: Vec<&MatrixSpectrum> =
                matrices.iter().filter(|m| m.kind == kind).collect();
            let n = of_kind.len() as f64;
            let fraction = |r: usize, m: &MatrixSpectrum| r as f64 / m.full_rank().max(1) as f64;
            KindSummary {
                kind: kind.to_string(),
                count: of_kind.len(),
                rows: of_kind[0].rows,
                cols: of_kind[0].cols,
                mean_rank_fraction: thresholds
                    .iter()
                    .enumerate()
                    .map(|(t, &energy)| RankFraction {
                        energy,
                        fraction: of_kind
                            .iter()
                            .map(|m| fraction(m.ranks[t].rank, m))
                            .sum::<f64>()
                            / n,
                    })
                    .collect(),
                break_even_fraction: of_kind
                    .iter()
                    .map(|m| fraction(m.break_even_rank, m))
                    .sum::<f64>()
                    / n,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use faer::Mat;

    /// 10 values with energies 41, 20, 10, 10, 5, 5, 3.5, 2.5, 1.5, 1.5 (of 100): no threshold
    /// is hit exactly, so f32 rounding cannot move a rank.
    fn known() -> Vec<f32> {
        [41.0f32, 20.0, 10.0, 10.0, 5.0, 5.0, 3.5, 2.5, 1.5, 1.5]
            .iter()
            .map(|e| e.sqrt())
            .collect()
    }

    #[test]
    fn ranks_per_threshold_on_a_known_spectrum() {
        // Cumulative: 41 61 71 81 86 91 94.5 97 98.5 100.
        let m = MatrixSpectrum::new(
            "model.layers.0.self_attn.q_proj",
            0,
            "self_attn.q_proj",
            10,
            30,
            known(),
            &DEFAULT_THRESHOLDS,
        )
        .unwrap();
        let ranks: Vec<usize> = m.ranks.iter().map(|r| r.rank).collect();
        assert_eq!(ranks, [4, 5, 6, 8, 10]);
        assert_eq!(m.rank_at(0.9), Some(6));
        assert_eq!(m.rank_at(0.5), None);
        assert_eq!(m.full_rank(), 10);
    }

    #[test]
    fn unsorted_values_are_sorted() {
        let mut v = known();
        v.reverse();
        let m = MatrixSpectrum::new("m", 0, "k", 10, 10, v, &[0.9]).unwrap();
        assert_eq!(m.singular_values, known());
        assert_eq!(m.rank_at(0.9), Some(6));
        let decay = m.normalised_decay();
        assert_eq!(decay[0], 1.0);
        assert!(decay.windows(2).all(|w| w[0] >= w[1]));
    }

    #[test]
    fn break_even_decides_dense_or_factors() {
        // 10 × 30: r·40 < 300 ⇔ r ≤ 7.
        let m = MatrixSpectrum::new("m", 0, "k", 10, 30, known(), &DEFAULT_THRESHOLDS).unwrap();
        assert_eq!(m.break_even_rank, 7);
        assert!(m.shrinks_at_rank(7) && !m.shrinks_at_rank(8));
        assert_eq!(m.params_at_rank(6), 6 * 40);
        assert_eq!(m.params_at_rank(7), 7 * 40);
        assert_eq!(m.params_at_rank(8), 300, "above break-even stays dense");
        assert_eq!(m.params_at_rank(10), 300);
    }

    #[test]
    fn totals_count_unshrunk_matrices_as_dense() {
        let a = MatrixSpectrum::new("a", 0, "k", 10, 30, known(), &DEFAULT_THRESHOLDS).unwrap();
        let flat = vec![1.0f32; 10]; // needs rank 9 for 85 %: above break-even 7.
        let b = MatrixSpectrum::new("b", 1, "k", 10, 30, flat, &DEFAULT_THRESHOLDS).unwrap();
        let report =
            SpectralReport::new("s2lc", "0", "model", &DEFAULT_THRESHOLDS, vec![a, b]).unwrap();
        let at85 = report.totals[1];
        assert_eq!(at85.energy, 0.85);
        assert_eq!(at85.params, 5 * 40 + 300);
        assert_eq!(at85.dense_params, 600);
        assert_eq!(at85.matrices_shrunk, 1);
        assert!((at85.ratio() - 500.0 / 600.0).abs() < 1e-12);
        assert_eq!(report.kinds.len(), 1);
        let k = &report.kinds[0];
        assert_eq!(k.count, 2);
        assert!((k.mean_rank_fraction[1].fraction - (0.5 + 0.9) / 2.0).abs() < 1e-12);
        assert!((k.break_even_fraction - 0.7).abs() < 1e-12);
    }

    #[test]
    fn bad_input_is_an_error() {
        assert_eq!(
            MatrixSpectrum::new("m", 0, "k", 10, 30, known(), &[0.0]).unwrap_err(),
            AnalysisError::BadThreshold(0.0)
        );
        assert_eq!(
            MatrixSpectrum::new("m", 0, "k", 10, 30, known(), &[1.5]).unwrap_err(),
            AnalysisError::BadThreshold(1.5)
        );
        assert!(matches!(
            MatrixSpectrum::new("m", 0, "k", 11, 30, known(), &[0.9]),
            Err(AnalysisError::WrongLength { got: 10, .. })
        ));
        assert!(matches!(
            MatrixSpectrum::new("m", 0, "k", 1, 1, vec![f32::NAN], &[0.9]),
            Err(AnalysisError::BadValue { .. })
        ));
    }

    #[test]
    fn report_round_trips_through_json() {
        let a = MatrixSpectrum::new(
            "model.layers.0.mlp.up_proj",
            0,
            "mlp.up_proj",
            10,
            30,
            known(),
            &DEFAULT_THRESHOLDS,
        )
        .unwrap();
        let b = MatrixSpectrum::new(
            "model.layers.0.mlp.down_proj",
            0,
            "mlp.down_proj",
            30,
            10,
            vec![0.1, 1e-30, 3.0, 7.5, 0.0, 2.0, 2.0, 1.0, 0.5, 0.25],
            &DEFAULT_THRESHOLDS,
        )
        .unwrap();
        let report =
            SpectralReport::new("s2lc", "0.1.0", "/m.gguf", &DEFAULT_THRESHOLDS, vec![a, b])
                .unwrap();
        let json = serde_json::to_string(&report).unwrap();
        let back: SpectralReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, report);
        assert_eq!(back.kinds.len(), 2);
    }

    #[test]
    fn singular_values_match_the_thin_svd() {
        let mut rng = crate::rng::SplitMix64::new(7);
        for (rows, cols) in [(1, 1), (5, 17), (17, 5), (64, 64), (129, 40)] {
            let a = Mat::from_fn(rows, cols, |_, _| rng.centered_f32());
            let want = crate::thin_svd(a.as_ref()).unwrap().s;
            for par in [Par::Seq, Par::rayon(2)] {
                let got = singular_values(a.as_ref(), par).unwrap();
                assert_eq!(got.len(), rows.min(cols));
                assert!(got.windows(2).all(|w| w[0] >= w[1]));
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-4 * want[0], "{rows}×{cols}: {g} vs {w}");
                }
            }
        }
    }
}
