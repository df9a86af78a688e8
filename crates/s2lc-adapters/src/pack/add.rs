//! Adding a member to an existing pack: projected onto the bases already there, with an orthogonal
//! residual where they do not hold it.

use rayon::prelude::*;

use super::error::PackError;
use super::member::{Member, ModuleKey};
use super::params::InputWhitening;
use super::project::{cut_of, project, truncated};
use super::set::{PackedCore, PackedMember, PackedSet};

impl PackedSet {
    /// Adds a member onto the existing bases (a core per matrix, plus an orthogonal residual where
    /// the projection loses more than the energy budget). A matrix the pack has no basis for, a
    /// shape mismatch or a taken name is an error, and the pack is then unchanged.
    pub fn add(&mut self, member: &Member) -> Result<(), PackError> {
        self.add_with(member, None)
    }

    /// [`PackedSet::add`] with the calibration's `whitening`: a pack made activation-aware
    /// ([`pack_with`]) needs the same calibration (another one would project onto the bases in
    /// other coordinates), and a plain pack takes none.
    ///
    /// [`pack_with`]: crate::pack::pack_with
    pub fn add_with(
        &mut self,
        member: &Member,
        whitening: Option<&InputWhitening>,
    ) -> Result<(), PackError> {
        match (self.params.whitened, whitening.is_some()) {
            (true, false) => {
                return Err(PackError::Invalid(format!(
                "the pack is activation-aware (whitened): adding '{}' needs its calibration inputs",
                member.name
            )))
            }
            (false, true) => {
                return Err(PackError::Invalid(format!(
                    "the pack is not activation-aware: add '{}' without calibration",
                    member.name
                )))
            }
            _ => {}
        }
        member.check_weights()?;
        if self.members.iter().any(|m| m.name == member.name) {
            return Err(PackError::Invalid(format!(
                "the pack already has a member '{}'",
                member.name
            )));
        }
        // Shapes are checked on the member as given, before whitening needs them to fit.
        for (&key, delta) in &member.deltas {
            if let Some(module) = self.modules.get(&key) {
                let shape = (module.u.rows, module.v.rows);
                if delta.shape() != shape {
                    return Err(PackError::Invalid(format!(
                        "{}: member '{}' is {:?} but the pack's basis is {:?}",
                        key.name(),
                        member.name,
                        delta.shape(),
                        shape
                    )));
                }
            }
        }
        let whitened;
        let member = match whitening {
            Some(w) => {
                whitened = w.whiten(member)?;
                &whitened
            }
            None => member,
        };
        let cut = cut_of(member, &self.params)?;
        let cores = member
            .deltas
            .par_iter()
            .map(
                |(&key, delta)| -> Result<Option<(ModuleKey, PackedCore)>, PackError> {
                    let svd = truncated(delta, cut, member.weight(key))?;
                    if svd.s.is_empty() {
                        return Ok(None);
                    }
                    let module = self.modules.get(&key).ok_or_else(|| {
                        PackError::Invalid(format!(
                            "{}: the pack has no basis for this matrix (re-pack to include it)",
                            key.name()
                        ))
                    })?;
                    let wh = whitening.map(|w| w.of(key)).transpose()?;
                    let (u, v) = (module.u.to_mat(), module.v.to_mat());
                    let v = match wh {
                        Some(w) => w.whiten_basis(v.as_ref()),
                        None => v,
                    };
                    Ok(Some((
                        key,
                        project(u.as_ref(), v.as_ref(), &svd, &self.params, true, wh)?,
                    )))
                },
            )
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .flatten()
            .collect();
        self.members.push(PackedMember {
            name: member.name.clone(),
            cores,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::pack::testing::members;
    use crate::pack::{pack, Delta, ModuleKey, PackParams};
    use crate::test_matrix as matrix;

    #[test]
    fn bad_members_are_refused_and_leave_the_pack_unchanged() {
        let ms = members(2, 16, 12, 3, 1, 3);
        assert!(pack(&[ms[0].clone(), ms[0].clone()], PackParams::default())
            .unwrap_err()
            .to_string()
            .contains("appears twice"));
        let mut set = pack(&ms, PackParams::default()).unwrap();
        let before = set.clone();
        let err = set.add(&ms[0]).unwrap_err().to_string();
        assert!(err.contains("already has a member 'm0'"), "{err}");
        let mut stranger = members(1, 16, 12, 3, 1, 9).remove(0);
        stranger.name = "new".into();
        stranger.deltas.insert(
            ModuleKey {
                layer: 5,
                target: 1,
            },
            Delta::Dense(matrix(16, 12, 1)),
        );
        let err = set.add(&stranger).unwrap_err().to_string();
        assert!(
            err.contains("layers.5.self_attn.k_proj") && err.contains("no basis"),
            "{err}"
        );
        let mut wrong_shape = members(1, 20, 12, 3, 1, 9).remove(0);
        wrong_shape.name = "other".into();
        let err = set.add(&wrong_shape).unwrap_err().to_string();
        assert!(
            err.contains("is (20, 12) but the pack's basis is (16, 12)"),
            "{err}"
        );
        assert_eq!(set, before);
        let bad = PackParams {
            energy: 1.5,
            ..PackParams::default()
        };
        assert!(pack(&ms, bad)
            .unwrap_err()
            .to_string()
            .contains("outside (0, 1]"));
        // A basis rate is an average of coded bits over mixed widths, within the ladder.
        let rate = |entropy, rate| PackParams {
            entropy,
            mixed_bases: true,
            basis_rate: Some(rate),
            ..PackParams::default()
        };
        for (params, message) in [
            (rate(false, 2.5), "needs --entropy and --mixed-bases"),
            (rate(true, 0.5), "outside [1, 8]"),
            (rate(true, f64::NAN), "outside [1, 8]"),
        ] {
            let err = pack(&ms, params).unwrap_err().to_string();
            assert!(err.contains(message), "{err}");
        }
        assert!(set
            .unpack("nope")
            .unwrap_err()
            .to_string()
            .contains("no member 'nope'"));
    }
}
