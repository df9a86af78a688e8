//! What packing did to each member: its size as packed and its error once unpacked.

use serde::Serialize;

use s2lc_spectral::sq_frobenius as sq_norm;

use super::error::PackError;
use super::member::{Delta, Member};
use super::set::PackedSet;

/// What packing did to one member.
#[derive(Debug, Clone, Serialize)]
pub struct MemberReport {
    /// Member name.
    pub name: String,
    /// Values of the member as stored before packing (`r·(rows+cols)` per LoRA delta).
    pub input_values: usize,
    /// Bytes of its cores and residuals.
    pub core_bytes: usize,
    /// Target matrices that needed an orthogonal residual.
    pub residuals: usize,
    /// `‖ΔW − unpacked‖_F / ‖ΔW‖_F` over all its matrices, quantization included.
    pub rel_error: f64,
}

impl PackedSet {
    /// Measures each of `members` (as given to [`pack`] or [`PackedSet::add`]) against its
    /// unpacked form.
    ///
    /// [`pack`]: crate::pack::pack
    pub fn report(&self, members: &[Member]) -> Result<Vec<MemberReport>, PackError> {
        members
            .iter()
            .map(|m| {
                let packed = self.member(&m.name)?;
                let unpacked = self.unpack(&m.name)?;
                let (mut err, mut total) = (0.0, 0.0);
                for (key, delta) in &m.deltas {
                    let dense = delta.dense();
                    total += sq_norm(dense.as_ref());
                    err += match unpacked.get(key) {
                        Some(f) => sq_norm((dense - f.to_dense()).as_ref()),
                        None => sq_norm(dense.as_ref()),
                    };
                }
                Ok(MemberReport {
                    name: m.name.clone(),
                    input_values: m.deltas.values().map(Delta::stored_values).sum(),
                    core_bytes: self.member_bytes(packed),
                    residuals: packed.cores.values().filter(|c| c.extra.is_some()).count(),
                    rel_error: if total > 0.0 {
                        (err / total).sqrt()
                    } else {
                        0.0
                    },
                })
            })
            .collect()
    }
}
