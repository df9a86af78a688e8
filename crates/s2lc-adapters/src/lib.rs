//! S2LC packing: many LoRA adapters (or MoE expert residuals) for one base model, projected per
//! target matrix onto one *shared* spectral basis pair, with small per-adapter cores that are
//! energy-truncated and block-quantized.
//!
//! Per target matrix (a layer's `q_proj`, `down_proj`, …) and for the `N` members that adapt it:
//! 1. each delta `ΔWᵢ` is truncated to the rank that keeps `energy` of `‖ΔWᵢ‖²` (thin SVD, through
//!    the LoRA factors when it has them);
//! 2. the shared bases `U` (`out × p`) and `V` (`in × q`) keep `energy` of the members' pooled,
//!    norm-balanced column and row spaces ([`s2lc_spectral::shared`]), and each member keeps its
//!    core `Cᵢ = Uᵀ·ΔWᵢ·V` (`p × q`);
//! 3. cores and bases are block-quantized ([`s2lc_spectral::blockquant`]): int8, int4, int3 or int2 blocks with
//!    an f16 scale, the weakest blocks dropped under a budget.
//!
//! The error of each member is measured and reported, not bounded: a shared basis that does not
//! hold a member's directions shows up as that member's error. Unpacking rebuilds a member as LoRA
//! factors of its original truncated rank: the SVD of the dequantized core `Cᵢ = X·Σ·Yᵀ` gives
//! `B = U·X·Σ`, `A = Yᵀ·Vᵀ`. Adding a member later projects it onto the existing bases and, when
//! that loses more than the energy budget, stores a small orthogonal residual beside its core.
#![deny(missing_docs)]

pub mod format;
pub mod pack;
pub mod qbasis;

pub use pack::{
    pack, pack_separately, pack_with, DecodedBases, Delta, EnergyScope, Factors, InputWhitening,
    Member, MemberReport, ModuleKey, PackError, PackParams, PackedSet,
};
