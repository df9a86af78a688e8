//! S2LC packing: many LoRA adapters (or MoE expert residuals) for one base model, projected per
//! target matrix onto one *shared* spectral basis pair, with small per-adapter cores that are
//! energy-truncated and block-quantized.
//!
//! Per target matrix (a layer's `q_proj`, `down_proj`, …) and for the `N` members that adapt it:
//! 1. each delta `ΔWᵢ` is truncated to the rank that keeps `energy` of `‖ΔWᵢ‖²` (thin SVD, through
//!    the LoRA factors when it has them), or with member scope the whole member keeps `energy`
//!    of its directions ranked across matrices, by `σ²` or, loss-aware, by `w·σ²` with `w` the
//!    matrix's measured KL per unit of energy ([`loss`]);
//! 2. the shared bases `U` (`out × p`) and `V` (`in × q`) keep `energy` of the members' pooled,
//!    norm-balanced column and row spaces ([`s2lc_spectral::shared`]);
//! 3. the bases are block-quantized ([`s2lc_spectral::blockquant`]: int8 … int2 blocks with an
//!    f16 scale), at one width or, with mixed widths, per basis vector by the members' energy
//!    along it ([`qbasis`]);
//! 4. each member keeps its core `Cᵢ = Û⁺·ΔWᵢ·V̂⁺ᵀ` (`p × q`), the least-squares fit on the
//!    quantized bases `Û`, `V̂`, block-quantized the same way, the weakest blocks dropped under a
//!    budget.
//!
//! The error of each member is measured and reported, not bounded: a shared basis that does not
//! hold a member's directions shows up as that member's error. Unpacking rebuilds a member as LoRA
//! factors of its original truncated rank: the SVD of the dequantized core `Cᵢ = X·Σ·Yᵀ` gives
//! `B = U·X·Σ`, `A = Yᵀ·Vᵀ`. Adding a member later projects it onto the existing bases and, when
//! that loses more than the energy budget, stores a small orthogonal residual beside its core.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod artifact;
pub mod format;
pub mod loss;
pub mod pack;
pub mod qbasis;
mod qmat;

pub use pack::{
    pack, pack_separately, pack_with, DecodedBases, Delta, EnergyScope, Factors, InputWhitening,
    Member, MemberReport, ModuleKey, PackError, PackParams, PackedSet,
};

/// A reproducible `rows × cols` test matrix with entries in [-0.5, 0.5).
#[cfg(test)]
pub(crate) fn test_matrix(rows: usize, cols: usize, seed: u64) -> faer::Mat<f32> {
    let mut rng = s2lc_spectral::rng::SplitMix64::new(seed);
    faer::Mat::from_fn(rows, cols, |_, _| rng.centered_f32())
}
