//! Packing members over shared bases: [`pack`], activation-aware [`pack_with`], and the
//! no-sharing baseline [`pack_separately`].

use std::collections::{BTreeMap, BTreeSet};

use faer::{Mat, MatRef};
use rayon::prelude::*;

use s2lc_spectral::{fit_shared_basis, QuantBits, SharedBasis, Svd};

use crate::qbasis::{allocate_widths, Column, QBasis};

use super::error::PackError;
use super::linalg::scale_cols;
use super::member::{Member, ModuleKey};
use super::params::{InputWhitening, PackParams};
use super::project::{cut_of, project, truncated, weighted, Cut};
use super::set::{PackedCore, PackedMember, PackedModule, PackedSet};

/// Checks that every member's delta at `key` has one shape; returns it.
fn common_shape(members: &[&Member], key: ModuleKey) -> Result<(usize, usize), PackError> {
    let mut shape = None;
    for m in members {
        let Some(d) = m.deltas.get(&key) else {
            continue;
        };
        match shape {
            None => shape = Some(d.shape()),
            Some(s) if s != d.shape() => {
                return Err(PackError::Invalid(format!(
                    "{}: member '{}' is {:?} but others are {:?} (adapters for different bases?)",
                    key.name(),
                    m.name,
                    d.shape(),
                    s
                )))
            }
            Some(_) => {}
        }
    }
    shape.ok_or_else(|| PackError::Invalid(format!("{}: no member adapts it", key.name())))
}

/// Packs `members` over bases fitted on all of them ([`pack_separately`] gives each its own).
/// Names must be unique.
pub fn pack(members: &[Member], params: PackParams) -> Result<PackedSet, PackError> {
    pack_with(members, params, None)
}

/// [`pack`], activation-aware with `whitening`: every step (truncation, member-wide cut, shared
/// bases, cores) measures a delta by `‖ΔW·L‖`, the change it makes to its matrix's outputs on the
/// calibration inputs, instead of `‖ΔW‖`. Directions the inputs barely excite are dropped first.
/// The stored input bases are `L⁻ᵀ·V`, so unpacking (and the runtime) needs no calibration.
/// Without `whitening` this is [`pack`].
pub fn pack_with(
    members: &[Member],
    mut params: PackParams,
    whitening: Option<&InputWhitening>,
) -> Result<PackedSet, PackError> {
    params.validate()?;
    params.whitened = whitening.is_some();
    let mut names = BTreeSet::new();
    for m in members {
        m.check_weights()?;
        if !names.insert(m.name.as_str()) {
            return Err(PackError::Invalid(format!(
                "member '{}' appears twice",
                m.name
            )));
        }
    }
    if members.is_empty() {
        return Err(PackError::Invalid("nothing to pack".into()));
    }
    let keys: BTreeSet<ModuleKey> = members
        .iter()
        .flat_map(|m| m.deltas.keys().copied())
        .collect();
    let refs: Vec<&Member> = members.iter().collect();
    for &key in &keys {
        common_shape(&refs, key)?;
    }
    let whitened: Vec<Member>;
    let members = match whitening {
        Some(w) => {
            whitened = members
                .iter()
                .map(|m| w.whiten(m))
                .collect::<Result<_, _>>()?;
            &whitened[..]
        }
        None => members,
    };
    let cuts: Vec<Cut> = members
        .par_iter()
        .map(|m| cut_of(m, &params))
        .collect::<Result<_, _>>()?;
    // Pass 1: per matrix, the members' truncated deltas and the shared bases they span.
    let fitted: Vec<Fitted> = keys
        .par_iter()
        .map(|&key| -> Result<Option<Fitted>, PackError> {
            // A delta truncated to rank 0 (member scope) is left out of this matrix.
            let svds: Vec<Option<Svd>> = members
                .iter()
                .zip(&cuts)
                .map(|(m, &cut)| {
                    m.deltas
                        .get(&key)
                        .map(|d| truncated(d, cut, m.weight(key)))
                        .transpose()
                        .map(|s| s.filter(|s| !s.s.is_empty()))
                })
                .collect::<Result<_, _>>()?;
            // The bases are fitted to the deltas as the loss weighs them (`√w·ΔW`).
            let present: Vec<Svd> = members
                .iter()
                .zip(&svds)
                .filter_map(|(m, s)| s.as_ref().map(|s| weighted(s, m.weight(key))))
                .collect();
            if present.is_empty() {
                return Ok(None);
            }
            let mut basis = fit_shared_basis(&present, params.basis_energy(), None)?;
            if let Some(w) = whitening {
                // Stored in the input's own coordinates (measured in whitened ones).
                let stored = w.of(key)?.unwhiten_basis(basis.v.as_ref());
                basis.v = stored;
            }
            Ok(Some((key, svds, basis)))
        })
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect();
    let widths = basis_widths(&fitted, members, &params, whitening)?;
    // Pass 2: quantize the bases, then fit each member's core to the stored (dequantized) bases,
    // in the coordinates its delta was measured in.
    type ModuleOut = (ModuleKey, PackedModule, Vec<Option<PackedCore>>);
    let per_module: Vec<ModuleOut> = fitted
        .into_par_iter()
        .zip(widths)
        .map(
            |((key, svds, basis), (wu, wv))| -> Result<ModuleOut, PackError> {
                let module = PackedModule {
                    u: quantize_basis(basis.u.as_ref(), params.block, &wu),
                    v: quantize_basis(basis.v.as_ref(), params.block, &wv),
                };
                let wh = whitening.map(|w| w.of(key)).transpose()?;
                let (u, v) = (module.u.to_mat(), module.v.to_mat());
                let v = match wh {
                    Some(w) => w.whiten_basis(v.as_ref()),
                    None => v,
                };
                let cores = svds
                    .iter()
                    .map(|s| {
                        s.as_ref()
                            .map(|s| project(u.as_ref(), v.as_ref(), s, &params, false, wh))
                            .transpose()
                    })
                    .collect::<Result<_, _>>()?;
                Ok((key, module, cores))
            },
        )
        .collect::<Result<_, _>>()?;
    let mut set = PackedSet {
        params,
        modules: BTreeMap::new(),
        members: members
            .iter()
            .map(|m| PackedMember {
                name: m.name.clone(),
                cores: BTreeMap::new(),
            })
            .collect(),
    };
    for (key, module, cores) in per_module {
        set.modules.insert(key, module);
        for (member, core) in set.members.iter_mut().zip(cores) {
            if let Some(core) = core {
                member.cores.insert(key, core);
            }
        }
    }
    Ok(set)
}

/// One matrix between the passes of [`pack_with`]: its key, each member's truncated delta (in
/// measured coordinates) and the fitted bases (`V` as stored).
type Fitted = (ModuleKey, Vec<Option<Svd>>, SharedBasis);

/// The widths of a matrix's basis columns: of `U`'s, and of `V`'s.
type Widths = (Vec<QuantBits>, Vec<QuantBits>);

/// Per fitted matrix, the widths of the columns of `U` and of `V`: `basis_bits` throughout, or
/// with `mixed_bases` allocated over the whole pack by the members' loss-weighted energy along
/// each column (`Σᵢ wᵢ·‖uⱼᵀ·Uᵢ·Σᵢ‖²`, and for `V` in the coordinates the deltas were measured in).
fn basis_widths(
    fitted: &[Fitted],
    members: &[Member],
    params: &PackParams,
    whitening: Option<&InputWhitening>,
) -> Result<Vec<Widths>, PackError> {
    if !params.mixed_bases {
        let all = |n: usize| vec![params.basis_bits; n];
        return Ok(fitted
            .iter()
            .map(|(_, _, b)| (all(b.u.ncols()), all(b.v.ncols())))
            .collect());
    }
    let columns: Vec<(Vec<Column>, Vec<Column>)> = fitted
        .par_iter()
        .map(|(key, svds, basis)| -> Result<_, PackError> {
            let v_measured = match whitening {
                Some(w) => w.of(*key)?.whiten_basis(basis.v.as_ref()),
                None => basis.v.clone(),
            };
            let side = |stored: MatRef<'_, f32>, measured: MatRef<'_, f32>, left: bool| {
                let mut weight = vec![0.0f64; stored.ncols()];
                for (member, svd) in members.iter().zip(svds) {
                    let Some(svd) = svd else { continue };
                    let f = if left { svd.u.as_ref() } else { svd.v.as_ref() };
                    let m = measured.transpose() * scale_cols(f, &svd.s);
                    let loss = member.weight(*key);
                    for (j, w) in weight.iter_mut().enumerate() {
                        *w += loss
                            * (0..m.ncols())
                                .map(|c| (m[(j, c)] as f64).powi(2))
                                .sum::<f64>();
                    }
                }
                weight
                    .into_iter()
                    .enumerate()
                    .map(|(j, weight)| Column {
                        weight,
                        values: stored.col(j).iter().copied().collect(),
                    })
                    .collect::<Vec<_>>()
            };
            Ok((
                side(basis.u.as_ref(), basis.u.as_ref(), true),
                side(basis.v.as_ref(), v_measured.as_ref(), false),
            ))
        })
        .collect::<Result<_, _>>()?;
    let flat: Vec<&Column> = columns
        .iter()
        .flat_map(|(u, v)| u.iter().chain(v))
        .collect();
    let mut widths = allocate_widths(
        &flat,
        params.block,
        params.basis_rate.unwrap_or(params.basis_bits.bits() as f64),
        params.entropy,
    )
    .into_iter();
    Ok(columns
        .iter()
        .map(|(u, v)| {
            let u: Vec<QuantBits> = widths.by_ref().take(u.len()).collect();
            (u, widths.by_ref().take(v.len()).collect())
        })
        .collect())
}

/// Quantizes a basis at per-column `widths`, its columns reordered widest first so that each
/// width is one group (the cores are fitted to the stored order afterwards).
fn quantize_basis(m: MatRef<'_, f32>, block: usize, widths: &[QuantBits]) -> QBasis {
    let mut order: Vec<usize> = (0..widths.len()).collect();
    order.sort_by_key(|&j| std::cmp::Reverse(widths[j].bits()));
    let sorted = Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, order[j])]);
    let widths: Vec<QuantBits> = order.iter().map(|&j| widths[j]).collect();
    QBasis::with_widths(sorted.as_ref(), block, &widths)
}

/// The no-sharing baseline: every member packed alone (its own bases), same parameters and
/// calibration ([`pack_with`]).
pub fn pack_separately(
    members: &[Member],
    params: PackParams,
    whitening: Option<&InputWhitening>,
) -> Result<Vec<PackedSet>, PackError> {
    members
        .iter()
        .map(|m| pack_with(std::slice::from_ref(m), params, whitening))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;
    use s2lc_spectral::{sq_frobenius as sq_norm, QuantBits};

    use super::{pack, pack_separately};
    use crate::pack::testing::{members, steep_members};
    use crate::pack::{Delta, EnergyScope, ModuleKey, PackParams, PackedSet};

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        /// Pack → unpack error is bounded by the energy the spectral steps may drop plus a little
        /// quantization error. Truncation drops at most `1 − e` of a member; the pooled basis
        /// drops at most `1 − e` of the pooled unit-norm members, so at most `n·(1 − e)` of any one
        /// of `n` packed members; a member added later keeps an orthogonal residual that caps its
        /// projection loss at `1 − e`.
        #[test]
        fn unpack_error_is_bounded_by_the_dropped_energy(n in 1usize..4, rows in 8usize..40, cols in 8usize..40,
                                                         r in 2usize..6, seed in any::<u64>(), e in 0.8f64..1.0,
                                                         int4 in any::<bool>()) {
            let all = members(n + 1, rows, cols, r, 1, seed);
            let (first, later) = all.split_at(n);
            let params = PackParams {
                energy: e,
                bits: if int4 { QuantBits::Int4 } else { QuantBits::Int8 },
                ..PackParams::default()
            };
            let mut set = pack(first, params).unwrap();
            set.add(&later[0]).unwrap();
            // int8 bases and cores: ~1e-2 relative; int4 cores: up to ~0.15.
            let quant = if int4 { 0.2f64 } else { 0.03 };
            for (i, rep) in set.report(&all).unwrap().iter().enumerate() {
                let dropped = if i < n { (1 + n) as f64 } else { 2.0 } * (1.0 - e);
                let bound = dropped.sqrt() + quant;
                prop_assert!(rep.rel_error <= bound, "{}: {} > {}", rep.name, rep.rel_error, bound);
            }
        }
    }

    /// Member scope ranks a member's singular values together: a matrix whose delta is tiny
    /// next to the others gets no core (it stays in with matrix scope), and the member's error
    /// stays within its energy budget — packed or added later.
    #[test]
    fn member_scope_drops_matrices_that_hold_little_of_the_member() {
        let mut ms = members(3, 40, 36, 4, 1, 11);
        let tiny = ModuleKey {
            layer: 1,
            target: 2,
        };
        for m in &mut ms {
            if let Some(Delta::Factors { b, .. }) = m.deltas.get_mut(&tiny) {
                *b = &*b * faer::Scale(1e-3);
            }
        }
        let (first, later) = ms.split_at(2);
        for scope in [EnergyScope::Matrix, EnergyScope::Member] {
            let params = PackParams {
                energy: 0.9,
                scope,
                ..PackParams::default()
            };
            let mut set = pack(first, params).unwrap();
            set.add(&later[0]).unwrap();
            for m in &set.members {
                assert_eq!(
                    m.cores.contains_key(&tiny),
                    scope == EnergyScope::Matrix,
                    "{scope:?} {}",
                    m.name
                );
            }
            for rep in set.report(&ms).unwrap() {
                // Truncation, basis and projection may each drop 1 − e (n = 2 pooled members).
                let bound = (4.0f64 * 0.1).sqrt() + 0.03;
                assert!(
                    rep.rel_error <= bound,
                    "{scope:?} {}: {}",
                    rep.name,
                    rep.rel_error
                );
            }
        }
        // The command-line names.
        assert_eq!(EnergyScope::parse("member"), Some(EnergyScope::Member));
        assert_eq!(EnergyScope::parse("layer"), None);
    }

    #[test]
    fn loss_weights_decide_what_member_scope_keeps() {
        let mut ms = members(2, 40, 36, 4, 1, 13);
        let tiny = ModuleKey {
            layer: 1,
            target: 2,
        };
        for m in &mut ms {
            if let Some(Delta::Factors { b, .. }) = m.deltas.get_mut(&tiny) {
                *b = &*b * faer::Scale(1e-3);
            }
            // Energy through the factors is the dense matrix's.
            for d in m.deltas.values() {
                let dense = sq_norm(d.dense().as_ref());
                assert!((d.energy() - dense).abs() <= 1e-5 * dense, "{dense}");
            }
        }
        let params = PackParams {
            energy: 0.9,
            scope: EnergyScope::Member,
            ..PackParams::default()
        };
        // Unweighted, the tiny matrix is cut; weighted by the inverse of its shrinkage (so its
        // estimated loss equals the others'), it is kept, and packing alone or added agrees.
        let set = pack(&ms[..1], params).unwrap();
        assert!(!set.members[0].cores.contains_key(&tiny));
        for m in &mut ms {
            m.weights = m.deltas.keys().map(|&k| (k, 1.0)).collect();
            m.weights.insert(tiny, 1e6);
        }
        let mut set = pack(&ms[..1], params).unwrap();
        set.add(&ms[1]).unwrap();
        for m in &set.members {
            assert!(m.cores.contains_key(&tiny), "{}", m.name);
        }
        // A loss budget keeps directions until what is dropped estimates at most the budget:
        // with these weights the tiny matrix's estimated loss is the others', so a budget of
        // all but a sliver of the total keeps little, and a tiny one keeps everything.
        let total: f64 = ms[0]
            .deltas
            .iter()
            .map(|(&k, d)| ms[0].weight(k) * d.energy())
            .sum();
        let kept = |budget: f64| {
            let p = PackParams {
                loss_budget: Some(budget),
                ..params
            };
            let set = pack(&ms[..1], p).unwrap();
            set.members[0]
                .cores
                .values()
                .map(|c| c.core_b.cols)
                .sum::<usize>()
        };
        let (loose, tight) = (kept(0.9 * total), kept(1e-9 * total));
        assert!(loose < tight && tight == 4 * 4, "{loose} {tight}");
        let budget = PackParams {
            loss_budget: Some(0.1),
            ..params
        };
        let e = pack(&members(1, 40, 36, 4, 1, 13), budget)
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs loss weights"), "{e}");
        let matrix = PackParams {
            scope: EnergyScope::Matrix,
            ..budget
        };
        assert!(matrix
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--scope member"));

        // Weights are for every delta or none, and positive.
        let mut partial = ms[0].clone();
        partial.weights.remove(&tiny);
        let e = pack(&[partial], params).unwrap_err().to_string();
        assert!(
            e.contains("none for model.layers.1.self_attn.v_proj"),
            "{e}"
        );
        let mut negative = ms[0].clone();
        negative.weights.insert(tiny, -1.0);
        let e = set.add(&negative).unwrap_err().to_string();
        assert!(e.contains("not a positive number"), "{e}");
    }

    #[test]
    fn sharing_shrinks_members_with_a_common_subspace() {
        let ms = members(4, 48, 40, 6, 5, 7);
        let params = PackParams {
            energy: 0.999,
            ..PackParams::default()
        };
        let shared = pack(&ms, params).unwrap();
        let alone: usize = pack_separately(&ms, params, None)
            .unwrap()
            .iter()
            .map(PackedSet::bytes)
            .sum();
        assert!(shared.bytes() < alone, "{} vs {alone}", shared.bytes());
        for rep in shared.report(&ms).unwrap() {
            assert!(rep.rel_error < 0.05, "{}: {}", rep.name, rep.rel_error);
        }
        // Resident bases give the same factors as a cold unpack.
        let bases = shared.decode_bases();
        assert_eq!(
            shared.unpack_with(&bases, "m1").unwrap(),
            shared.unpack("m1").unwrap()
        );
        // Unpacked as LoRA: the same deltas.
        let lora = shared.unpack_lora("m0").unwrap();
        assert_eq!(lora.n_deltas(), 4);
    }

    #[test]
    fn mixed_width_bases_spend_bits_where_the_energy_is() {
        // Members with steep spectra, as trained adapters have: a few basis vectors carry most of
        // the energy.
        let steep = steep_members();
        let params = |mixed_bases| PackParams {
            energy: 0.999,
            basis_bits: QuantBits::Int3,
            mixed_bases,
            ..PackParams::default()
        };
        let uniform = pack(&steep, params(false)).unwrap();
        let mixed = pack(&steep, params(true)).unwrap();
        let worst = |set: &PackedSet| {
            set.report(&steep)
                .unwrap()
                .iter()
                .map(|r| r.rel_error)
                .fold(0.0, f64::max)
        };
        let qbytes = |set: &PackedSet| -> usize {
            set.modules
                .values()
                .map(|m| m.u.bytes() + m.v.bytes())
                .sum()
        };
        let (bu, bm) = (qbytes(&uniform), qbytes(&mixed));
        // No more bits per value (64 rows: groups split no block); each extra group costs one
        // more bitmap word.
        let groups = |set: &PackedSet| -> usize {
            set.modules
                .values()
                .map(|m| m.u.groups.len() + m.v.groups.len())
                .sum()
        };
        let extra = 8 * (groups(&mixed) - groups(&uniform));
        assert!(
            bm <= bu + extra,
            "mixed {bm} B vs uniform {bu} B + {extra} B"
        );
        assert!(
            worst(&mixed) < 0.7 * worst(&uniform),
            "mixed {} vs uniform {}",
            worst(&mixed),
            worst(&uniform)
        );
        let widths: BTreeSet<usize> = mixed
            .modules
            .values()
            .flat_map(|m| m.u.widths().into_iter().chain(m.v.widths()))
            .map(QuantBits::bits)
            .collect();
        assert!(
            widths.len() > 1 && widths.iter().any(|&b| b > 3),
            "{widths:?}"
        );
        // A member added later is projected onto the mixed bases like any other.
        let mut grown = mixed.clone();
        let mut late = steep[0].clone();
        late.name = "late".into();
        grown.add(&late).unwrap();
        let late_err = grown.report(std::slice::from_ref(&late)).unwrap()[0].rel_error;
        assert!(late_err < 1.5 * worst(&mixed), "{late_err}");
    }
}
