//! Unpacking: a member rebuilt as LoRA factors per target matrix from its cores and the shared
//! bases, cold or with the bases dequantized once and kept resident.

use std::collections::BTreeMap;
use std::path::PathBuf;

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use s2lc_model::lora::{LoraAdapter, LoraDelta};
use s2lc_spectral::LowRankFactors;

use crate::qbasis::QBasis;
use crate::qmat::QMat;

use super::error::PackError;
use super::member::ModuleKey;
use super::set::{PackedCore, PackedSet};

/// One matrix unpacked, `ΔW ≈ b·a` with `b = u` (`rows × rank`) and `a = vs` (`rank × cols`),
/// both row-major (the runtime's layout, so they become a [`LoraDelta`] without a copy): the
/// workspace's one low-rank factors type, [`LowRankFactors`], by the name packing gives it.
pub type Factors = LowRankFactors;

/// A member unpacked: its factors per target matrix.
pub type Unpacked = BTreeMap<ModuleKey, Factors>;

/// A dequantized matrix, row-major.
#[derive(Debug, Clone)]
struct RowMajor {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl RowMajor {
    fn decode(m: &QMat) -> Self {
        RowMajor {
            rows: m.rows,
            cols: m.cols,
            data: m.q.dequantize(),
        }
    }

    fn decode_basis(b: &QBasis) -> Self {
        RowMajor {
            rows: b.rows,
            cols: b.cols,
            data: b.dequantize(),
        }
    }

    fn view(&self) -> MatRef<'_, f32> {
        MatRef::from_row_major_slice(&self.data, self.rows, self.cols)
    }
}

/// Dequantized shared bases `(U, V)` by target matrix.
#[derive(Debug, Clone)]
pub struct DecodedBases(BTreeMap<ModuleKey, (RowMajor, RowMajor)>);

impl DecodedBases {
    /// Bytes held (f32).
    pub fn bytes(&self) -> usize {
        self.0
            .values()
            .map(|(u, v)| 4 * (u.data.len() + v.data.len()))
            .sum()
    }
}

/// `b = [U·core_b | extra_b]`, `a = [core_a·Vᵀ ; extra_a]`, written straight into row-major
/// buffers. Sequential: the caller runs matrices in parallel.
fn unpack_core(u: MatRef<'_, f32>, v: MatRef<'_, f32>, core: &PackedCore) -> Factors {
    let (rows, cols) = (u.nrows(), v.nrows());
    let k = core.core_b.cols;
    let extra = core
        .extra
        .as_ref()
        .map(|(eb, ea)| (eb.q.dequantize(), ea.q.dequantize()));
    let r = core.extra.as_ref().map_or(0, |(eb, _)| eb.cols);
    let rank = k + r;
    let (cb, ca) = (
        RowMajor::decode(&core.core_b),
        RowMajor::decode(&core.core_a),
    );
    let mut b = vec![0.0f32; rows * rank];
    let mut a = vec![0.0f32; rank * cols];
    matmul(
        MatMut::from_row_major_slice_mut(&mut b, rows, rank).subcols_mut(0, k),
        Accum::Replace,
        u,
        cb.view(),
        1.0,
        Par::Seq,
    );
    matmul(
        MatMut::from_row_major_slice_mut(&mut a, rank, cols).subrows_mut(0, k),
        Accum::Replace,
        ca.view(),
        v.transpose(),
        1.0,
        Par::Seq,
    );
    if let Some((eb, ea)) = extra {
        // The residual's columns go after the core's in each row of b; its rows after the
        // core's in a (contiguous there).
        for (dst, src) in b.chunks_exact_mut(rank).zip(eb.chunks_exact(r)) {
            dst[k..].copy_from_slice(src);
        }
        a[k * cols..].copy_from_slice(&ea);
    }
    Factors::from_row_major(rows, rank, cols, b, a)
}

/// Unpacked factors as a LoRA adapter named `name` (scale 1).
pub(super) fn to_lora(name: &str, factors: Unpacked) -> LoraAdapter {
    let n_layers = factors.keys().map(|k| k.layer + 1).max().unwrap_or(0);
    let mut layers: Vec<[Option<LoraDelta>; 7]> = vec![Default::default(); n_layers];
    let mut rank = 1;
    for (key, f) in factors {
        let (rows, r, cols) = (f.rows(), f.rank(), f.cols());
        if r == 0 {
            continue;
        }
        rank = rank.max(r);
        let (b, a) = f.into_row_major();
        layers[key.layer][key.target] = Some(LoraDelta::new(a, b, r, cols, rows, 1.0));
    }
    LoraAdapter {
        path: PathBuf::from(name),
        rank,
        alpha: rank as f32,
        scale: 1.0,
        base_model: None,
        layers,
    }
}

impl PackedSet {
    /// Rebuilds a member as factors `(b, a)` per matrix (`rows × k`, `k × cols`): the core's
    /// factors mapped through the bases (`b = U·X·Σ`, `a = Yᵀ·Vᵀ`), plus its residual if any. The
    /// bases it needs are dequantized on the way (a cold start; see [`PackedSet::unpack_with`]).
    pub fn unpack(&self, name: &str) -> Result<Unpacked, PackError> {
        self.unpack_from(name, None)
    }

    /// [`PackedSet::unpack`] with the bases already dequantized (as a server keeps them resident,
    /// shared by every member).
    pub fn unpack_with(&self, bases: &DecodedBases, name: &str) -> Result<Unpacked, PackError> {
        self.unpack_from(name, Some(bases))
    }

    /// Every basis, dequantized.
    pub fn decode_bases(&self) -> DecodedBases {
        DecodedBases(
            self.modules
                .par_iter()
                .map(|(&key, m)| {
                    (
                        key,
                        (RowMajor::decode_basis(&m.u), RowMajor::decode_basis(&m.v)),
                    )
                })
                .collect(),
        )
    }

    fn unpack_from(&self, name: &str, bases: Option<&DecodedBases>) -> Result<Unpacked, PackError> {
        let member = self.member(name)?;
        member
            .cores
            .par_iter()
            .map(|(&key, core)| {
                let missing =
                    || PackError::Invalid(format!("{}: no basis in the pack", key.name()));
                let decoded;
                let (u, v) = match bases {
                    Some(b) => {
                        let (u, v) = b.0.get(&key).ok_or_else(missing)?;
                        (u.view(), v.view())
                    }
                    None => {
                        let m = self.modules.get(&key).ok_or_else(missing)?;
                        decoded = (RowMajor::decode_basis(&m.u), RowMajor::decode_basis(&m.v));
                        (decoded.0.view(), decoded.1.view())
                    }
                };
                Ok((key, unpack_core(u, v, core)))
            })
            .collect()
    }

    /// A member unpacked as a LoRA adapter (scale 1, the rank of each matrix as unpacked).
    pub fn unpack_lora(&self, name: &str) -> Result<LoraAdapter, PackError> {
        Ok(to_lora(name, self.unpack(name)?))
    }

    /// [`PackedSet::unpack_lora`] with resident bases.
    pub fn unpack_lora_with(
        &self,
        bases: &DecodedBases,
        name: &str,
    ) -> Result<LoraAdapter, PackError> {
        Ok(to_lora(name, self.unpack_with(bases, name)?))
    }
}
