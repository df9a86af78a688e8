//! A pack as data: the shared bases of each target matrix and each member's cores, block-quantized
//! (what [`crate::format`] stores).

use std::collections::BTreeMap;

use crate::qbasis::QBasis;
use crate::qmat::QMat;

use super::error::PackError;
use super::member::ModuleKey;
use super::params::PackParams;

/// The shared bases of one target matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedModule {
    /// `rows × p`.
    pub u: QBasis,
    /// `cols × q`.
    pub v: QBasis,
}

/// One member's part of one target matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedCore {
    /// The core `Cᵢ = Uᵀ·ΔWᵢ·V` (`p × q`, rank ≤ the member's truncated rank `k`) kept as its
    /// SVD factors: `core_b = X·Σ` (`p × k`) and `core_a = Yᵀ` (`k × q`), so unpacking needs no
    /// decomposition and `k·(p + q)` values are stored instead of `p·q`.
    pub core_b: QMat,
    /// `Yᵀ`, `k × q`.
    pub core_a: QMat,
    /// `(b, a)`: an orthogonal residual `b·a` (`rows × r`, `r × cols`) kept when the projection
    /// onto the shared bases lost more than the energy budget.
    pub extra: Option<(QMat, QMat)>,
}

impl PackedCore {
    /// Bytes stored.
    pub fn bytes(&self) -> usize {
        self.core_b.bytes()
            + self.core_a.bytes()
            + self
                .extra
                .as_ref()
                .map_or(0, |(b, a)| b.bytes() + a.bytes())
    }
}

/// One member of a pack.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedMember {
    /// Name.
    pub name: String,
    /// Cores by target matrix.
    pub cores: BTreeMap<ModuleKey, PackedCore>,
}

impl PackedMember {
    /// Bytes of the cores' and residuals' codes, scales and bitmaps, as fixed-width values: the
    /// payload without any file around it ([`PackedSet::member_bytes`] is the file).
    pub fn bytes(&self) -> usize {
        self.cores.values().map(PackedCore::bytes).sum()
    }
}

/// Members packed over shared bases.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedSet {
    /// How it was packed.
    pub params: PackParams,
    /// Shared bases by target matrix.
    pub modules: BTreeMap<ModuleKey, PackedModule>,
    /// The members, in the order they were packed or added.
    pub members: Vec<PackedMember>,
}

impl PackedSet {
    /// The member called `name`.
    pub fn member(&self, name: &str) -> Result<&PackedMember, PackError> {
        self.members.iter().find(|m| m.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.members.iter().map(|m| m.name.as_str()).collect();
            PackError::Invalid(format!(
                "no member '{name}' in the pack (it holds {})",
                names.join(", ")
            ))
        })
    }
}
