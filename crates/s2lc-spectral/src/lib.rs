//! Spectral math for S2LC: thin SVD of real matrices and rank selection by retained energy.
//!
//! Pure math on matrices; no I/O and no knowledge of models. A matrix is `rows × cols` as the
//! math writes it; for a linear layer `W` that is `out × in`.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod analysis;
pub mod ans;
pub mod blockquant;
pub mod energy;
pub mod lowrank;
pub mod rng;
pub mod rsvd;
pub mod shared;
pub mod svd;
pub mod whiten;

pub use analysis::{
    singular_values, AnalysisError, KindSummary, MatrixSpectrum, RankAtEnergy, RankFraction,
    SpectralReport, ThresholdTotal, DEFAULT_THRESHOLDS,
};
pub use ans::{AnsError, AnsTable, ANS_TOTAL};
pub use blockquant::{BlockQuant, QuantBits};
pub use energy::{break_even_rank, cumulative_energy, rank_for_energy, sq_frobenius};
pub use lowrank::{allocate_ranks, relative_error, BudgetError, LowRankFactors, Spectrum};
pub use rsvd::{rsvd, rsvd_batch, GaussianRng, RsvdParams};
pub use shared::{fit_shared_basis, SharedBasis};
pub use svd::{factored_svd, thin_svd, Svd, SvdError};
pub use whiten::{output_error, refit_left, WhitenError, Whitening};

/// The entries of `m` in row-major order: the layout of a weight `out × in` in a safetensors file
/// and in the runtime.
pub fn row_major(m: faer::MatRef<'_, f32>) -> Vec<f32> {
    let mut out = Vec::with_capacity(m.nrows() * m.ncols());
    for i in 0..m.nrows() {
        out.extend((0..m.ncols()).map(|j| m[(i, j)]));
    }
    out
}

/// A reproducible `rows × cols` test matrix with entries in [-0.5, 0.5).
#[cfg(test)]
pub(crate) fn test_matrix(rows: usize, cols: usize, seed: u64) -> faer::Mat<f32> {
    let mut rng = rng::SplitMix64::new(seed);
    faer::Mat::from_fn(rows, cols, |_, _| rng.centered_f32())
}

/// The largest absolute entry of `m` (tests compare matrices with it).
#[cfg(test)]
pub(crate) fn test_max_abs(m: faer::MatRef<'_, f32>) -> f32 {
    let mut best = 0.0f32;
    for j in 0..m.ncols() {
        for i in 0..m.nrows() {
            best = best.max(m[(i, j)].abs());
        }
    }
    best
}
