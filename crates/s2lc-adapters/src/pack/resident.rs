//! A pack served as it is stored: its shared bases resident once, its members' cores resident
//! once, and each member or blend of members (Expert Morphing) only a weight vector over them.
//! No LoRA factors are built: a row's delta on a target matrix is
//!
//! ```text
//! Δ·x = U · (Σᵢ wᵢ · core_bᵢ · core_aᵢ) · Vᵀ · x  (+ Σᵢ wᵢ · extraᵢ · x)
//! ```
//!
//! run right to left as `t = Vᵀx` (the block kernels, as for the base weights), `s = A·t` with
//! every member's `core_a` stacked into one `A` (`Σk × q`), each member's part of `s` scaled by
//! its weight, `c = Bᵀᵀ·s` with the `core_b`s stacked transposed (`Σk × p`), and
//! `out += U·c` ([`WeightMatrix::axpy_rows`] over `Uᵀ`). Rows of one decode step that run over the
//! same resident cores share every product: one matrix product each over all those rows, with
//! only the weight scaling per row.
//!
//! The bases and cores are held as ggml Q8_0 blocks (8.5 bits per value) along their long side,
//! or f16 where a row is not a whole number of 32-value blocks: close to the int8 codes a pack
//! stores, and what the block kernels read. [`ResidentBases::bytes`] and
//! [`ResidentCores::bytes`] count what is held.

use std::any::Any;
use std::ops::Range;
use std::sync::Arc;

use faer::Accum;

use s2lc_model::kernels::dot::QuantizedActs;
use s2lc_model::kernels::{WeightFormat, WeightMatrix};
use s2lc_model::lora::{
    AdapterDeltas, AdapterDtype, DeltaScratch, LoraAdapter, LoraDelta, TARGETS,
};

use super::error::PackError;
use super::set::PackedSet;

/// The format bases and cores are held in.
const HELD: WeightFormat = WeightFormat::Q8_0;

/// Slot of a target matrix in the per-layer tables.
fn slot(layer: usize, target: usize) -> usize {
    layer * TARGETS.len() + target
}

/// `m` (`rows × cols`, row-major) transposed.
fn transposed(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; m.len()];
    for (i, row) in m.chunks_exact(cols).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            t[j * rows + i] = v;
        }
    }
    t
}

fn held(data: &[f32], rows: usize, cols: usize) -> Result<WeightMatrix, PackError> {
    WeightMatrix::quantize_or_f16(data, rows, cols, HELD)
        .map_err(|e| PackError::Invalid(format!("holding a pack matrix: {e}")))
}

/// One target matrix's shared bases, as the kernels read them.
#[derive(Debug)]
struct Basis {
    /// `Vᵀ`, `q × cols`.
    vt: WeightMatrix,
    /// `Uᵀ`, `p × rows`.
    ut: WeightMatrix,
}

/// A pack's shared bases, resident once for every member and blend of the pack.
#[derive(Debug)]
pub struct ResidentBases {
    /// By [`slot`]; `None` where the pack adapts nothing.
    slots: Vec<Option<Basis>>,
    bytes: usize,
}

impl ResidentBases {
    /// The bases of `set`, decoded from their stored blocks and held for the kernels.
    pub fn new(set: &PackedSet) -> Result<Self, PackError> {
        let n_layers = set.modules.keys().map(|k| k.layer + 1).max().unwrap_or(0);
        let mut slots: Vec<Option<Basis>> = (0..n_layers * TARGETS.len()).map(|_| None).collect();
        let mut bytes = 0;
        for (key, m) in &set.modules {
            let (rows, p, cols, q) = (m.u.rows, m.u.cols, m.v.rows, m.v.cols);
            let vt = held(&transposed(&m.v.dequantize(), cols, q), q, cols)?;
            let ut = held(&transposed(&m.u.dequantize(), rows, p), p, rows)?;
            bytes += vt.bytes() + ut.bytes();
            slots[slot(key.layer, key.target)] = Some(Basis { vt, ut });
        }
        Ok(ResidentBases { slots, bytes })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn get(&self, layer: usize, target: usize) -> Option<&Basis> {
        self.slots.get(slot(layer, target))?.as_ref()
    }
}

/// One target matrix's cores of every member, stacked.
#[derive(Debug)]
struct Cores {
    /// The members' `core_a` one under another, `Σk × q`.
    a: WeightMatrix,
    /// The members' `core_b` transposed, one under another, `Σk × p`.
    bt: WeightMatrix,
    /// Each member's rows in `a` and `bt` (empty where it has no core here).
    ranges: Vec<Range<usize>>,
    /// Each member's orthogonal residual here, if any (f16 factors).
    extras: Vec<Option<LoraDelta>>,
}

/// The cores of every member of a pack version, resident once for all its members and blends.
#[derive(Debug)]
pub struct ResidentCores {
    names: Vec<String>,
    /// By [`slot`].
    slots: Vec<Option<Cores>>,
    bytes: usize,
}

impl ResidentCores {
    /// The cores of every member of `set`, decoded from their stored blocks and held for the
    /// kernels.
    pub fn new(set: &PackedSet) -> Result<Self, PackError> {
        let n_layers = set
            .members
            .iter()
            .flat_map(|m| m.cores.keys().map(|k| k.layer + 1))
            .max()
            .unwrap_or(0);
        let mut slots: Vec<Option<Cores>> = (0..n_layers * TARGETS.len()).map(|_| None).collect();
        let mut bytes = 0;
        for (&key, module) in &set.modules {
            let (rows, p, cols, q) = (module.u.rows, module.u.cols, module.v.rows, module.v.cols);
            let (mut a, mut bt, mut ranges, mut extras) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut any = false;
            for m in &set.members {
                let start = a.len() / q.max(1);
                let Some(core) = m.cores.get(&key) else {
                    ranges.push(start..start);
                    extras.push(None);
                    continue;
                };
                any = true;
                let k = core.core_b.cols;
                if core.core_b.rows != p || core.core_a.rows != k || core.core_a.cols != q {
                    return Err(PackError::Invalid(format!(
                        "{} of '{}': a core of {}×{} · {}×{} over bases of widths {p} and {q}",
                        key.name(),
                        m.name,
                        core.core_b.rows,
                        k,
                        core.core_a.rows,
                        core.core_a.cols
                    )));
                }
                a.extend(core.core_a.q.dequantize());
                bt.extend(transposed(&core.core_b.q.dequantize(), p, k));
                ranges.push(start..start + k);
                extras.push(match &core.extra {
                    None => None,
                    Some((eb, ea)) => {
                        let r = eb.cols;
                        if eb.rows != rows || ea.rows != r || ea.cols != cols {
                            return Err(PackError::Invalid(format!(
                                "{} of '{}': a residual of the wrong shape",
                                key.name(),
                                m.name
                            )));
                        }
                        let d = LoraDelta::new(
                            ea.q.dequantize(),
                            eb.q.dequantize(),
                            r,
                            cols,
                            rows,
                            1.0,
                        )
                        .to_dtype(AdapterDtype::F16)
                        .map_err(|e| PackError::Invalid(format!("{}: {e}", key.name())))?;
                        bytes += d.resident_bytes();
                        Some(d)
                    }
                });
            }
            if !any {
                continue;
            }
            let total = ranges.last().map_or(0, |r| r.end);
            let a = held(&a, total, q)?;
            let bt = held(&bt, total, p)?;
            bytes += a.bytes() + bt.bytes();
            slots[slot(key.layer, key.target)] = Some(Cores {
                a,
                bt,
                ranges,
                extras,
            });
        }
        Ok(ResidentCores {
            names: set.members.iter().map(|m| m.name.clone()).collect(),
            slots,
            bytes,
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The members, in pack order.
    pub fn members(&self) -> &[String] {
        &self.names
    }

    fn get(&self, layer: usize, target: usize) -> Option<&Cores> {
        self.slots.get(slot(layer, target))?.as_ref()
    }
}

/// A member, or a blend of members, of a resident pack: a weight per member over shared
/// [`ResidentBases`] and [`ResidentCores`]. Its own state is the weight vector; the bases and
/// cores stay resident while any view holds them.
#[derive(Debug, Clone)]
pub struct PackView {
    bases: Arc<ResidentBases>,
    cores: Arc<ResidentCores>,
    /// One weight per member of `cores` (0 for members not blended).
    weights: Vec<f32>,
    label: String,
}

impl PackView {
    /// The blend `Σ wᵢ·ΔWᵢ` of the named members (one member at weight 1 is that member).
    /// Weights must be finite, not negative, and sum to a positive number; every name must be a
    /// member, at most once.
    pub fn new(
        label: &str,
        bases: Arc<ResidentBases>,
        cores: Arc<ResidentCores>,
        weights: &[(&str, f32)],
    ) -> Result<Self, PackError> {
        let mut w = vec![0.0f32; cores.names.len()];
        let mut seen = vec![false; w.len()];
        for &(name, weight) in weights {
            let i = cores.names.iter().position(|n| n == name).ok_or_else(|| {
                PackError::Invalid(format!(
                    "no member '{name}' in the pack (it holds {})",
                    cores.names.join(", ")
                ))
            })?;
            if std::mem::replace(&mut seen[i], true) {
                return Err(PackError::Invalid(format!("'{name}' is weighted twice")));
            }
            if !weight.is_finite() || weight < 0.0 {
                return Err(PackError::Invalid(format!(
                    "the weight of '{name}' must be a finite number of 0 or more, not {weight}"
                )));
            }
            w[i] = weight;
        }
        let sum: f32 = w.iter().sum();
        if !(sum > 0.0 && sum.is_finite()) {
            return Err(PackError::Invalid(format!(
                "member weights must sum to a positive number (got {weights:?})"
            )));
        }
        Ok(PackView {
            bases,
            cores,
            weights: w,
            label: label.to_string(),
        })
    }

    /// Bytes of its own state (the weight vector); the bases and cores are counted once where
    /// they are held.
    pub fn own_bytes(&self) -> usize {
        std::mem::size_of::<Self>() + 4 * self.weights.len() + self.label.len()
    }

    /// The shared bases it runs over.
    pub fn bases(&self) -> &Arc<ResidentBases> {
        &self.bases
    }

    /// The shared cores it runs over.
    pub fn cores(&self) -> &Arc<ResidentCores> {
        &self.cores
    }

    /// The same delta as plain f32 LoRA factors, from the values held resident (`b = U·[wᵢ·core_bᵢ]`,
    /// `a = [core_aᵢ]·Vᵀ`, then the weighted residuals): the reference the resident form is
    /// tested against, and a form any LoRA tool can take.
    pub fn to_lora(&self) -> LoraAdapter {
        let n_layers = self.n_layers();
        let mut layers: Vec<[Option<LoraDelta>; 7]> = vec![Default::default(); n_layers];
        let mut max_rank = 1;
        for (layer, slots) in layers.iter_mut().enumerate() {
            for (target, out) in slots.iter_mut().enumerate() {
                let (Some(b), Some(c)) =
                    (self.bases.get(layer, target), self.cores.get(layer, target))
                else {
                    continue;
                };
                let (p, rows, q, cols) = (b.ut.rows(), b.ut.cols(), b.vt.rows(), b.vt.cols());
                let (ut, vt, ca, cbt) = (b.ut.to_f32(), b.vt.to_f32(), c.a.to_f32(), c.bt.to_f32());
                let (mut fa, mut fb_t) = (Vec::new(), Vec::new()); // a rows, b columns
                for (i, range) in c.ranges.iter().enumerate() {
                    let w = self.weights[i];
                    if w == 0.0 {
                        continue;
                    }
                    for k in range.clone() {
                        // a row: core_a[k]·Vᵀ (cols); b column: w·U·core_bᵀ[k] (rows).
                        let mut arow = vec![0.0f32; cols];
                        for j in 0..q {
                            let v = ca[k * q + j];
                            for (o, x) in arow.iter_mut().zip(&vt[j * cols..(j + 1) * cols]) {
                                *o += v * x;
                            }
                        }
                        let mut bcol = vec![0.0f32; rows];
                        for j in 0..p {
                            let v = w * cbt[k * p + j];
                            for (o, x) in bcol.iter_mut().zip(&ut[j * rows..(j + 1) * rows]) {
                                *o += v * x;
                            }
                        }
                        fa.push(arow);
                        fb_t.push(bcol);
                    }
                    if let Some(e) = &c.extras[i] {
                        let (ea, eb) = e.factors();
                        let r = e.rank();
                        for k in 0..r {
                            fa.push(ea[k * cols..(k + 1) * cols].to_vec());
                            fb_t.push((0..rows).map(|o| w * eb[o * r + k]).collect());
                        }
                    }
                }
                let rank = fa.len();
                if rank == 0 {
                    continue;
                }
                max_rank = max_rank.max(rank);
                let a: Vec<f32> = fa.concat();
                let b: Vec<f32> = (0..rows * rank).map(|i| fb_t[i % rank][i / rank]).collect();
                *out = Some(LoraDelta::new(a, b, rank, cols, rows, 1.0));
            }
        }
        LoraAdapter {
            path: self.label.clone().into(),
            rank: max_rank,
            alpha: max_rank as f32,
            scale: 1.0,
            base_model: None,
            layers,
        }
    }

    /// `out_i += Δᵢ·x_i` for `n` rows, row `i` with the weights of `view(i)` (all over `self`'s
    /// bases and cores).
    #[allow(clippy::too_many_arguments)]
    fn run<'a>(
        &self,
        weights: impl Fn(usize) -> &'a [f32],
        n: usize,
        layer: usize,
        target: usize,
        x: &[f32],
        out: &mut [f32],
        scratch: &mut DeltaScratch,
        acts: &mut QuantizedActs,
    ) {
        let (Some(b), Some(c)) = (self.bases.get(layer, target), self.cores.get(layer, target))
        else {
            return;
        };
        let (p, q, total) = (b.ut.rows(), b.vt.rows(), c.a.rows());
        // t = Vᵀ·x (n × q), then s = A·t (n × Σk), each member's part scaled by its weight.
        let (t, s) = (&mut scratch.mid, &mut scratch.mid2);
        t.resize(n * q, 0.0);
        b.vt.matmul(x, n, t, Accum::Replace, acts);
        s.resize(n * total, 0.0);
        c.a.matmul(t, n, s, Accum::Replace, acts);
        for (i, si) in s.chunks_exact_mut(total).enumerate() {
            for (range, &wm) in c.ranges.iter().zip(weights(i)) {
                si[range.clone()].iter_mut().for_each(|v| *v *= wm);
            }
        }
        // c = core_b·s (n × p), reusing t's buffer, then out += U·c.
        let cvec = &mut scratch.mid;
        cvec.clear();
        cvec.resize(n * p, 0.0);
        c.bt.axpy_rows(s, n, cvec, &mut scratch.row);
        b.ut.axpy_rows(cvec, n, out, &mut scratch.row);
        if c.extras.iter().any(Option::is_some) {
            self.run_extras(&weights, n, c, x, out, acts);
        }
    }

    /// The weighted orthogonal residuals, row by row (rare: only members added to a pack with
    /// [`PackedSet::add`] have them).
    fn run_extras<'a>(
        &self,
        weights: &impl Fn(usize) -> &'a [f32],
        n: usize,
        c: &Cores,
        x: &[f32],
        out: &mut [f32],
        acts: &mut QuantizedActs,
    ) {
        let (xw, ow) = (x.len() / n, out.len() / n);
        let mut scratch = DeltaScratch::default();
        let mut tmp = vec![0.0f32; ow];
        for i in 0..n {
            for (e, &w) in c.extras.iter().zip(weights(i)) {
                let Some(e) = e.as_ref().filter(|_| w != 0.0) else {
                    continue;
                };
                tmp.iter_mut().for_each(|v| *v = 0.0);
                e.apply(&x[i * xw..(i + 1) * xw], 1, &mut tmp, &mut scratch, acts);
                for (o, t) in out[i * ow..(i + 1) * ow].iter_mut().zip(&tmp) {
                    *o += w * t;
                }
            }
        }
    }
}

/// `r` as a view of `cores`, if it is one.
fn view_of<'r>(r: &'r dyn AdapterDeltas, cores: &Arc<ResidentCores>) -> Option<&'r PackView> {
    r.as_any()
        .downcast_ref::<PackView>()
        .filter(|v| Arc::ptr_eq(&v.cores, cores))
}

impl AdapterDeltas for PackView {
    fn label(&self) -> String {
        self.label.clone()
    }

    fn n_layers(&self) -> usize {
        (self.bases.slots.len() / TARGETS.len()).min(self.cores.slots.len() / TARGETS.len())
    }

    fn shape(&self, layer: usize, target: usize) -> Option<(usize, usize)> {
        let b = self.bases.get(layer, target)?;
        let c = self.cores.get(layer, target)?;
        let used = c
            .ranges
            .iter()
            .zip(&c.extras)
            .zip(&self.weights)
            .any(|((r, e), &w)| w != 0.0 && (!r.is_empty() || e.is_some()));
        used.then(|| (b.ut.cols(), b.vt.cols()))
    }

    fn apply(
        &self,
        layer: usize,
        target: usize,
        x: &[f32],
        n: usize,
        out: &mut [f32],
        scratch: &mut DeltaScratch,
        acts: &mut QuantizedActs,
    ) {
        self.run(|_| &self.weights, n, layer, target, x, out, scratch, acts);
    }

    /// Views of the same cores: one pass for all the rows.
    fn shared_state(&self) -> Option<usize> {
        Some(Arc::as_ptr(&self.cores) as usize)
    }

    fn apply_rows(
        &self,
        rows: &[&dyn AdapterDeltas],
        layer: usize,
        target: usize,
        x: &[f32],
        out: &mut [f32],
        scratch: &mut DeltaScratch,
        acts: &mut QuantizedActs,
    ) {
        // Each row's view of these cores (checked for all rows first; nothing is allocated).
        match rows.iter().all(|r| view_of(*r, &self.cores).is_some()) {
            true => self.run(
                |i| view_of(rows[i], &self.cores).map_or(&[][..], |v| &v.weights),
                rows.len(),
                layer,
                target,
                x,
                out,
                scratch,
                acts,
            ),
            false => {
                // Not all views of these cores: one row at a time.
                let n = rows.len();
                let (xw, ow) = (x.len() / n, out.len() / n);
                for (i, r) in rows.iter().enumerate() {
                    r.apply(
                        layer,
                        target,
                        &x[i * xw..(i + 1) * xw],
                        1,
                        &mut out[i * ow..(i + 1) * ow],
                        scratch,
                        acts,
                    );
                }
            }
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::testing::members;
    use crate::pack::{pack, PackParams};
    use s2lc_spectral::rng::SplitMix64;

    /// `out += Δ·x` through `a` (all rows its own) from a start of 0.5.
    fn applied(
        a: &dyn AdapterDeltas,
        layer: usize,
        target: usize,
        x: &[f32],
        n: usize,
    ) -> Vec<f32> {
        let (out_dim, _) = a.shape(layer, target).unwrap();
        let mut out = vec![0.5f32; n * out_dim];
        a.apply(
            layer,
            target,
            x,
            n,
            &mut out,
            &mut DeltaScratch::default(),
            &mut QuantizedActs::default(),
        );
        out
    }

    fn rel(got: &[f32], want: &[f32]) -> f64 {
        let num: f64 = got
            .iter()
            .zip(want)
            .map(|(g, w)| ((g - w) as f64).powi(2))
            .sum();
        let den: f64 = want.iter().map(|&w| ((w - 0.5) as f64).powi(2)).sum();
        (num / den).sqrt()
    }

    /// A resident member or blend equals its own values decoded to f32 LoRA factors (to 1e-4),
    /// stays within the Q8_0 holding error of the stored pack, and rows of different blends
    /// run together equal each run alone. Shapes on 64 × 96 (Q8_0) and 40 × 36 (f16 fallback).
    #[test]
    fn resident_views_equal_their_f32_factors_and_run_together() {
        for (rows, cols) in [(64, 96), (40, 36)] {
            let ms = members(3, rows, cols, 4, 2, 9);
            let params = PackParams {
                energy: 0.999,
                ..PackParams::default()
            };
            let set = pack(&ms, params).unwrap();
            let bases = Arc::new(ResidentBases::new(&set).unwrap());
            let cores = Arc::new(ResidentCores::new(&set).unwrap());
            assert!(bases.bytes() > 0 && cores.bytes() > 0);
            let view =
                |w: &[(&str, f32)]| PackView::new("v", bases.clone(), cores.clone(), w).unwrap();
            let one = view(&[("m1", 1.0)]);
            let blend = view(&[("m0", 0.5), ("m2", 0.25)]);
            let n = 3;
            let x = SplitMix64::new(3).centered_vec(n * cols);
            for (layer, target) in [(0, 0), (1, 2)] {
                for v in [&one, &blend] {
                    let got = applied(v, layer, target, &x, n);
                    let want = applied(&v.to_lora(), layer, target, &x, n);
                    // The block kernels round activations to 16 bits per block of 32.
                    assert!(
                        rel(&got, &want) < 1e-4,
                        "{rows}×{cols}: {}",
                        rel(&got, &want)
                    );
                }
                // Against the pack as stored (decoded to f32 without holding it as Q8_0).
                let stored = crate::pack::unpack::to_lora("m1", set.unpack("m1").unwrap());
                let got = applied(&one, layer, target, &x, n);
                let want = applied(&stored, layer, target, &x, n);
                assert!(
                    rel(&got, &want) < 2e-2,
                    "{rows}×{cols}: {}",
                    rel(&got, &want)
                );
                // Rows of different views of the same cores in one call.
                let group: Vec<&dyn AdapterDeltas> = vec![&one, &blend, &one];
                let (out_dim, _) = one.shape(layer, target).unwrap();
                let mut out = vec![0.5f32; n * out_dim];
                one.apply_rows(
                    &group,
                    layer,
                    target,
                    &x,
                    &mut out,
                    &mut DeltaScratch::default(),
                    &mut QuantizedActs::default(),
                );
                for (i, v) in group.iter().enumerate() {
                    let alone = applied(*v, layer, target, &x[i * cols..(i + 1) * cols], 1);
                    let row = &out[i * out_dim..(i + 1) * out_dim];
                    assert!(rel(row, &alone) < 1e-5, "row {i}: {}", rel(row, &alone));
                }
            }
            assert_eq!(one.shared_state(), blend.shared_state());
        }
    }

    #[test]
    fn bad_blends_are_named() {
        let set = pack(&members(2, 40, 36, 4, 2, 1), PackParams::default()).unwrap();
        let bases = Arc::new(ResidentBases::new(&set).unwrap());
        let cores = Arc::new(ResidentCores::new(&set).unwrap());
        for (w, needle) in [
            (vec![("zz", 1.0)], "no member 'zz'"),
            (vec![("m0", 1.0), ("m0", 1.0)], "weighted twice"),
            (vec![("m0", -1.0)], "0 or more"),
            (vec![("m0", f32::NAN)], "finite"),
            (vec![("m0", 0.0)], "positive"),
        ] {
            let e = PackView::new("v", bases.clone(), cores.clone(), &w).unwrap_err();
            assert!(e.to_string().contains(needle), "{e}");
        }
    }
}
