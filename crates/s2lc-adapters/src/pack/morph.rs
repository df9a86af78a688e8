//! Expert Morphing: a weighted blend of members synthesized in the shared basis, as one adapter.

use std::collections::BTreeSet;

use faer::Mat;
use rayon::prelude::*;

use s2lc_model::lora::LoraAdapter;
use s2lc_spectral::{factored_svd, sq_frobenius as sq_norm};

use super::error::PackError;
use super::linalg::{hcat, scale_cols, vcat};
use super::member::ModuleKey;
use super::set::{PackedCore, PackedSet};
use super::unpack::{to_lora, Factors, Unpacked};

impl PackedSet {
    /// Expert Morphing: the weighted blend `Σ wᵢ·ΔWᵢ` of members, synthesized in the shared
    /// basis. Per matrix the members' cores are summed (`C = Σ wᵢ·Cᵢ`, `p × q`), re-decomposed,
    /// truncated so that the dropped energy is at most `1 − energy` of the weighted members'
    /// (`Σ wᵢ²‖Cᵢ‖²`), and mapped through the bases once: one adapter whose rank is bounded by the
    /// basis width however many members it blends, and near zero where they cancel. Orthogonal
    /// residuals (from [`PackedSet::add`]) are appended, weighted. Weights must be finite with a
    /// positive sum.
    pub fn morph(&self, weights: &[(&str, f32)]) -> Result<Unpacked, PackError> {
        let sum: f32 = weights.iter().map(|(_, w)| w).sum();
        if weights.is_empty() || weights.iter().any(|(_, w)| !w.is_finite()) || sum <= 0.0 {
            return Err(PackError::Invalid(format!(
                "morph weights must be finite and sum to a positive number (got {weights:?})"
            )));
        }
        let mut members = Vec::new();
        for (i, (name, w)) in weights.iter().enumerate() {
            if weights[..i].iter().any(|(n, _)| n == name) {
                return Err(PackError::Invalid(format!("'{name}' is weighted twice")));
            }
            members.push((*w, self.member(name)?));
        }
        let keys: BTreeSet<ModuleKey> = members
            .iter()
            .flat_map(|(_, m)| m.cores.keys().copied())
            .collect();
        keys.par_iter()
            .map(|&key| -> Result<(ModuleKey, Factors), PackError> {
                let module = self.modules.get(&key).ok_or_else(|| {
                    PackError::Invalid(format!("{}: no basis in the pack", key.name()))
                })?;
                let (u, v) = (module.u.to_mat(), module.v.to_mat());
                let cores: Vec<(f32, &PackedCore)> = members
                    .iter()
                    .filter_map(|(w, m)| m.cores.get(&key).map(|c| (*w, c)))
                    .collect();
                // C = [w₁·B₁ | w₂·B₂ | …]·[A₁; A₂; …], decomposed through its factors.
                let cbs: Vec<Mat<f32>> = cores
                    .iter()
                    .map(|(w, c)| c.core_b.to_mat() * faer::Scale(*w))
                    .collect();
                let cas: Vec<Mat<f32>> = cores.iter().map(|(_, c)| c.core_a.to_mat()).collect();
                let svd = factored_svd(
                    hcat(&cbs.iter().map(Mat::as_ref).collect::<Vec<_>>()).as_ref(),
                    vcat(&cas.iter().map(Mat::as_ref).collect::<Vec<_>>()).as_ref(),
                )?;
                // Drop at most what packing may drop from the blended members themselves,
                // `(1 − energy)·Σ wᵢ²‖Cᵢ‖²` (core_a has orthonormal rows, so ‖Cᵢ‖ = ‖core_bᵢ‖).
                // Relative to the members, not to the blend: members that cancel leave little
                // energy, and what is left is dropped instead of kept at full rank.
                let budget = (1.0 - self.params.energy)
                    * cbs.iter().map(|b| sq_norm(b.as_ref())).sum::<f64>();
                let mut tail: f64 = svd.s.iter().map(|&s| (s as f64).powi(2)).sum();
                let mut k = 0;
                while k < svd.s.len() && tail > budget {
                    tail -= (svd.s[k] as f64).powi(2);
                    k += 1;
                }
                // Then the weighted orthogonal residuals, appended as further factors.
                let mut b_blocks = vec![&u * scale_cols(svd.u.subcols(0, k), &svd.s[..k])];
                let mut a_blocks = vec![svd.v.subcols(0, k).transpose() * v.transpose()];
                for (w, c) in &cores {
                    if let Some((eb, ea)) = &c.extra {
                        b_blocks.push(eb.to_mat() * faer::Scale(*w));
                        a_blocks.push(ea.to_mat());
                    }
                }
                let b = hcat(&b_blocks.iter().map(Mat::as_ref).collect::<Vec<_>>());
                let a = vcat(&a_blocks.iter().map(Mat::as_ref).collect::<Vec<_>>());
                Ok((key, Factors::from_mats(b.as_ref(), a.as_ref())))
            })
            .collect()
    }

    /// [`PackedSet::morph`] as a LoRA adapter named `name` (scale 1).
    pub fn morph_lora(
        &self,
        name: &str,
        weights: &[(&str, f32)],
    ) -> Result<LoraAdapter, PackError> {
        Ok(to_lora(name, self.morph(weights)?))
    }
}

#[cfg(test)]
mod tests {
    use s2lc_spectral::sq_frobenius as sq_norm;

    use crate::pack::testing::members;
    use crate::pack::{pack, Delta, PackParams};

    /// A morph is the weighted sum of the members' deltas (within the pack's error), one member
    /// at weight 1 is that member, and bad weights are named.
    #[test]
    fn morph_blends_members_in_the_shared_basis() {
        let ms = members(3, 40, 36, 4, 2, 5);
        let params = PackParams {
            energy: 0.999,
            ..PackParams::default()
        };
        let mut set = pack(&ms[..2], params).unwrap();
        set.add(&ms[2]).unwrap();
        let (wa, wb, wc) = (0.7f32, 0.2f32, 0.1f32);
        let morph = set.morph(&[("m0", wa), ("m1", wb), ("m2", wc)]).unwrap();
        let (mut err, mut total) = (0.0, 0.0);
        for (key, f) in &morph {
            let want = ms[0].deltas[key].dense() * faer::Scale(wa)
                + ms[1].deltas[key].dense() * faer::Scale(wb)
                + ms[2].deltas[key].dense() * faer::Scale(wc);
            total += sq_norm(want.as_ref());
            err += sq_norm((want - f.to_dense()).as_ref());
        }
        assert!((err / total).sqrt() < 0.05, "{}", (err / total).sqrt());
        // Rank is bounded by the basis width (plus m2's residual), not the sum of the members'.
        for (key, f) in &morph {
            let extra = set.members[2].cores[key]
                .extra
                .as_ref()
                .map_or(0, |(b, _)| b.cols);
            assert!(
                f.rank() <= set.modules[key].u.cols + extra,
                "{}",
                key.name()
            );
        }
        // One member at weight 1 is that member.
        let one = set.morph(&[("m1", 1.0)]).unwrap();
        let plain = set.unpack("m1").unwrap();
        for (key, f) in &one {
            let d =
                (f.to_dense() - plain[key].to_dense()).norm_l2() / plain[key].to_dense().norm_l2();
            assert!(d < 1e-4, "{}: {d}", key.name());
        }
        // Members that cancel blend to (almost) nothing, not to full-rank noise.
        let mut anti = ms[0].clone();
        anti.name = "anti".into();
        for d in anti.deltas.values_mut() {
            if let Delta::Factors { b, .. } = d {
                *b = &*b * faer::Scale(-1.0);
            }
        }
        let pair = pack(&[ms[0].clone(), anti], params).unwrap();
        let none = pair.morph(&[("m0", 0.5), ("anti", 0.5)]).unwrap();
        for (key, f) in &none {
            let alone = &pair.unpack("m0").unwrap()[key];
            assert!(
                f.rank() == 0 || f.to_dense().norm_l2() < 1e-2 * alone.to_dense().norm_l2(),
                "{}: rank {} of {}",
                key.name(),
                f.rank(),
                alone.rank()
            );
        }
        for (w, needle) in [
            (vec![("m0", 0.5), ("m1", -0.5)], "sum to a positive number"),
            (vec![("m0", f32::NAN)], "finite"),
            (vec![("m0", 0.5), ("m0", 0.5)], "weighted twice"),
            (vec![("zz", 1.0)], "no member 'zz'"),
        ] {
            let e = set.morph(&w).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }
}
