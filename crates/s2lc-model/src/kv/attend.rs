//! Attention over a compressed layer: the segments' stored forms and the dense window, split
//! into (KV head, part) units on the kernel pool and merged by log-sum-exp.
//!
//! Attention on factors: for query `q`, the scores of the segment are `C·(B·q)` (`r·d + T·r`
//! multiply-adds instead of `T·d`), and its value contribution is `(pᵀ·C_v)·B_v`.

use std::cell::RefCell;

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use half::slice::HalfFloatSliceExt;

use super::coding::{unpack, Coded, Segment, Unpacked};
use super::AttnShape;
use crate::kernels::pool::{self, split_range};
use crate::kernels::{ops, SyncPtr};

/// Reusable per-thread buffers of the attention units.
#[derive(Default)]
struct UnitScratch {
    keys: Unpacked,
    values: Unpacked,
    scores: Vec<f32>,
    small: Vec<f32>,
}

thread_local! {
    static UNIT: RefCell<UnitScratch> = RefCell::new(UnitScratch::default());
    static PARTIALS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// What one attention unit reads: a compressed segment or the dense window.
#[derive(Clone, Copy)]
enum Part<'a> {
    Segment(&'a Segment),
    /// `t` dense rows (`t × kv_dim`); query row `i` sees the first `p0 + i + 1`.
    Dense {
        k: &'a [f32],
        v: &'a [f32],
        t: usize,
        p0: usize,
    },
}

/// Causal attention of `n` queries over `segments` then the dense `window_k/v` rows, of which the
/// first `p0` are older than the queries. Units (KV head, part) run on the kernel pool, each
/// leaving per query head and row the partial softmax `(max, Σexp, Σexp·v)`; the partials are
/// merged by log-sum-exp as in flash-decoding.
#[allow(clippy::too_many_arguments)]
pub fn attend_compressed(
    shape: AttnShape,
    q: &[f32],
    segments: &[Segment],
    window_k: &[f32],
    window_v: &[f32],
    n: usize,
    p0: usize,
    out: &mut [f32],
) {
    let (hd, q_dim, kv_dim) = (shape.head_dim, shape.q_dim(), shape.kv_dim());
    let group = shape.n_heads / shape.n_kv_heads;
    let t_dense = window_k.len() / kv_dim;
    debug_assert_eq!(t_dense, p0 + n);
    let mut parts: Vec<Part<'_>> = segments.iter().map(Part::Segment).collect();
    parts.push(Part::Dense {
        k: window_k,
        v: window_v,
        t: t_dense,
        p0,
    });
    let units = shape.n_kv_heads * parts.len();
    let slot = hd + 2;
    let per_unit = group * n * slot;
    let scale = 1.0 / (hd as f32).sqrt();
    PARTIALS.with_borrow_mut(|partials| {
        partials.resize(units * per_unit, 0.0);
        let ptr = SyncPtr(partials.as_mut_ptr());
        let parts = &parts;
        let job = |part: usize, of: usize| {
            UNIT.with_borrow_mut(|s| {
                for unit in split_range(units, part, of, 1) {
                    let (g, pi) = (unit / parts.len(), unit % parts.len());
                    // SAFETY: `partials` holds units·per_unit values and unit < units; unit
                    // `unit` alone writes its `per_unit` slots; `partials` outlives the job.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(ptr.get().add(unit * per_unit), per_unit)
                    };
                    attend_unit(shape, q, n, g, parts[pi], scale, s, dst);
                }
            });
        };
        let keys_total = segments.iter().map(|s| s.tokens).sum::<usize>() + t_dense;
        if n * keys_total * shape.n_heads < 4096 {
            job(0, 1);
        } else {
            pool::global().run(&job);
        }
        let n_parts = parts.len();
        for i in 0..n {
            for h in 0..shape.n_heads {
                let (g, hh) = (h / group, h % group);
                let at = |pi: usize| {
                    &partials[(g * n_parts + pi) * per_unit + (hh * n + i) * slot..][..slot]
                };
                let m = (0..n_parts)
                    .map(|pi| at(pi)[0])
                    .fold(f32::NEG_INFINITY, f32::max);
                let o = &mut out[i * q_dim + h * hd..][..hd];
                o.fill(0.0);
                let mut l = 0.0f32;
                for pi in 0..n_parts {
                    let p = at(pi);
                    if p[0] == f32::NEG_INFINITY {
                        continue;
                    }
                    let w = (p[0] - m).exp();
                    l += w * p[1];
                    ops::axpy(o, w, &p[2..]);
                }
                let inv = 1.0 / l;
                o.iter_mut().for_each(|v| *v *= inv);
            }
        }
    });
}
/// [`attend_unit`] for one query row (a decode step), straight from the stored form: int8
/// coefficients and quants are read by int8 kernels instead of being expanded to f32 first.
#[allow(clippy::too_many_arguments)]
fn attend_one(
    shape: AttnShape,
    q: &[f32],
    g: usize,
    part: Part<'_>,
    scale: f32,
    s: &mut UnitScratch,
    dst: &mut [f32],
) {
    let (hd, kv_dim) = (shape.head_dim, shape.kv_dim());
    let group = shape.n_heads / shape.n_kv_heads;
    let slot = hd + 2;
    let t = match part {
        Part::Segment(seg) => seg.tokens,
        Part::Dense { t, .. } => t,
    };
    // Once per unit, shared by the group's query heads: bases and token scales to f32, 4-bit
    // coefficients to int8, quantized rows to f32 (`hd`-wide rows in `rows`).
    if let Part::Segment(seg) = part {
        for (coded, u) in [(&seg.keys, &mut s.keys), (&seg.values, &mut s.values)] {
            match coded {
                Coded::Spectral(heads) => {
                    let f = &heads[g];
                    f.basis_f32(&mut u.basis);
                    u.scale.resize(t, 0.0);
                    f.scale.convert_to_f32_slice(&mut u.scale);
                    if f.coef_bits != 8 {
                        f.coef_i8(&mut u.quants);
                    }
                }
                Coded::Quant { .. } => {
                    unpack(coded, g, t, shape, u);
                }
                Coded::Exact(_) => {}
            }
        }
    }
    s.scores.resize(t, 0.0);
    for hh in 0..group {
        let h = g * group + hh;
        let qh = &q[h * hd..][..hd];
        let scores = &mut s.scores[..t];
        match part {
            Part::Dense { k, .. } => ops::key_scores(qh, &k[g * hd..], kv_dim, scale, scores),
            Part::Segment(seg) => match &seg.keys {
                Coded::Exact(rows) => ops::key_scores(qh, &rows[g * hd..], kv_dim, scale, scores),
                Coded::Spectral(heads) => {
                    let f = &heads[g];
                    let r = f.rank;
                    s.small.resize(r, 0.0);
                    for (qb, b) in s.small.iter_mut().zip(s.keys.basis.chunks_exact(hd)) {
                        *qb = scale * ops::dot(qh, b);
                    }
                    let coef = coef_view(f, &s.keys.quants);
                    for ((sc, c), ts) in scores
                        .iter_mut()
                        .zip(coef.chunks_exact(r))
                        .zip(&s.keys.scale)
                    {
                        *sc = ts * ops::dot_i8(c, &s.small);
                    }
                }
                Coded::Quant { .. } => ops::key_scores(qh, &s.keys.rows, hd, scale, scores),
            },
        }
        let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let l = ops::exp_shifted(scores, m);
        let d = &mut dst[hh * slot..][..slot];
        d[0] = m;
        d[1] = l;
        let o = &mut d[2..];
        let p = &s.scores[..t];
        match part {
            Part::Dense { v, .. } => ops::weighted_rows(p, &v[g * hd..], kv_dim, o),
            Part::Segment(seg) => match &seg.values {
                Coded::Exact(rows) => ops::weighted_rows(p, &rows[g * hd..], kv_dim, o),
                Coded::Spectral(heads) => {
                    let f = &heads[g];
                    let r = f.rank;
                    s.small.clear();
                    s.small.resize(r, 0.0);
                    let coef = coef_view(f, &s.values.quants);
                    for ((pt, c), ts) in p.iter().zip(coef.chunks_exact(r)).zip(&s.values.scale) {
                        ops::axpy_i8(&mut s.small, pt * ts, c);
                    }
                    o.fill(0.0);
                    for (w, b) in s.small.iter().zip(s.values.basis.chunks_exact(hd)) {
                        ops::axpy(o, *w, b);
                    }
                }
                Coded::Quant { .. } => ops::weighted_rows(p, &s.values.rows, hd, o),
            },
        }
    }
}

/// The int8 coefficients of `f`: its own bytes at 8 bits, `unpacked` (filled per unit) at 4.
fn coef_view<'a>(f: &'a super::coding::SpectralBlock, unpacked: &'a [i8]) -> &'a [i8] {
    if f.coef_bits == 8 {
        // SAFETY: u8 and i8 have the same size, alignment and validity; the view borrows
        // `f.coef` for `'a`.
        unsafe { std::slice::from_raw_parts(f.coef.as_ptr().cast::<i8>(), f.coef.len()) }
    } else {
        &unpacked[..f.scale.len() * f.rank]
    }
}

/// One unit: every query head of KV group `g`, every query row, over one part. `dst` holds per
/// (query head, row) `[max, Σexp, o (hd)]`.
#[allow(clippy::too_many_arguments)]
fn attend_unit(
    shape: AttnShape,
    q: &[f32],
    n: usize,
    g: usize,
    part: Part<'_>,
    scale: f32,
    s: &mut UnitScratch,
    dst: &mut [f32],
) {
    if n == 1 {
        attend_one(shape, q, g, part, scale, s, dst);
        return;
    }
    let (hd, q_dim, kv_dim) = (shape.head_dim, shape.q_dim(), shape.kv_dim());
    let group = shape.n_heads / shape.n_kv_heads;
    let slot = hd + 2;
    // Once per unit: the raw `o` views below stay inside `dst`.
    assert!(dst.len() >= group * n * slot, "attend_unit: dst too short");
    // Keys/values as (matrix, optional basis): dense rows are used in place.
    let (t, visible) = match part {
        Part::Segment(seg) => (seg.tokens, None),
        Part::Dense { t, p0, .. } => (t, Some(p0)),
    };
    let (kb, vb) = match part {
        Part::Segment(seg) => (
            unpack(&seg.keys, g, t, shape, &mut s.keys),
            unpack(&seg.values, g, t, shape, &mut s.values),
        ),
        Part::Dense { .. } => (None, None),
    };
    for hh in 0..group {
        let h = g * group + hh;
        let qh = MatRef::from_row_major_slice_with_stride(&q[h * hd..], n, hd, q_dim);
        s.scores.resize(n * t, 0.0);
        // Scores: q·kᵀ, or (q·Bᵀ)·Cᵀ on factors.
        {
            let sm = MatMut::from_row_major_slice_mut(&mut s.scores, n, t);
            match (part, kb) {
                (Part::Dense { k, .. }, _) => {
                    let km = MatRef::from_row_major_slice_with_stride(&k[g * hd..], t, hd, kv_dim);
                    matmul(sm, Accum::Replace, qh, km.transpose(), scale, Par::Seq);
                }
                (Part::Segment(_), Some(r)) => {
                    s.small.resize(n * r, 0.0);
                    let b = MatRef::from_row_major_slice(&s.keys.basis, r, hd);
                    matmul(
                        MatMut::from_row_major_slice_mut(&mut s.small, n, r),
                        Accum::Replace,
                        qh,
                        b.transpose(),
                        scale,
                        Par::Seq,
                    );
                    let c = MatRef::from_row_major_slice(&s.keys.rows[..t * r], t, r);
                    let qb = MatRef::from_row_major_slice(&s.small, n, r);
                    matmul(sm, Accum::Replace, qb, c.transpose(), 1.0f32, Par::Seq);
                }
                (Part::Segment(_), None) => {
                    let km = MatRef::from_row_major_slice(&s.keys.rows[..t * hd], t, hd);
                    matmul(sm, Accum::Replace, qh, km.transpose(), scale, Par::Seq);
                }
            }
        }
        // Partial softmax per row (masked to the visible prefix of the dense part).
        for (i, row) in s.scores.chunks_exact_mut(t).enumerate() {
            let vis = visible.map_or(t, |p0| (p0 + i + 1).min(t));
            let (seen, hidden) = row.split_at_mut(vis);
            hidden.fill(0.0);
            let m = seen.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let l = ops::exp_shifted(seen, m);
            let d = &mut dst[(hh * n + i) * slot..][..2];
            d[0] = m;
            d[1] = l;
        }
        // Values: p·V, or (p·C_v)·B_v on factors, into the `o` slots (row stride `slot`).
        let p = MatRef::from_row_major_slice(&s.scores, n, t);
        // SAFETY: rows `hh·n..hh·n+n` of `dst` (stride `slot`), columns 2..2+hd, lie inside
        // `dst` (group·n·slot values, checked above), which this unit owns exclusively.
        let o = unsafe {
            MatMut::from_raw_parts_mut(
                dst.as_mut_ptr().add(hh * n * slot + 2),
                n,
                hd,
                slot as isize,
                1,
            )
        };
        match (part, vb) {
            (Part::Dense { v, .. }, _) => {
                let vm = MatRef::from_row_major_slice_with_stride(&v[g * hd..], t, hd, kv_dim);
                matmul(o, Accum::Replace, p, vm, 1.0f32, Par::Seq);
            }
            (Part::Segment(_), Some(r)) => {
                s.small.resize(n * r, 0.0);
                let c = MatRef::from_row_major_slice(&s.values.rows[..t * r], t, r);
                let pc = MatMut::from_row_major_slice_mut(&mut s.small, n, r);
                matmul(pc, Accum::Replace, p, c, 1.0f32, Par::Seq);
                let b = MatRef::from_row_major_slice(&s.values.basis, r, hd);
                let pc = MatRef::from_row_major_slice(&s.small, n, r);
                matmul(o, Accum::Replace, pc, b, 1.0f32, Par::Seq);
            }
            (Part::Segment(_), None) => {
                let vm = MatRef::from_row_major_slice(&s.values.rows[..t * hd], t, hd);
                matmul(o, Accum::Replace, p, vm, 1.0f32, Par::Seq);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::attend_dense;
    use crate::kv::coding::code;
    use crate::kv::spec::{Coding, RankSelect, SpectralCoding};
    use crate::kv::testutil::{data, low_rank, SHAPE};

    #[test]
    fn a_single_query_over_segments_matches_the_dense_kernel() {
        // The merge across parts must equal one softmax over all keys.
        let tokens = 160;
        let (k, v) = (low_rank(tokens, 4, 8), low_rank(tokens, 4, 9));
        let q = data(SHAPE.q_dim(), 10);
        let mut ranks = (0, 0);
        let c = Coding::Spectral(SpectralCoding {
            select: RankSelect::Energy(1.0),
            max_rank: 64,
            coef_bits: 8,
            basis_bits: 16,
        });
        let mut seg = |i: usize| Segment {
            tokens: 64,
            keys: code(
                c,
                &k[i * 64 * SHAPE.kv_dim()..(i + 1) * 64 * SHAPE.kv_dim()],
                64,
                SHAPE,
                None,
                &mut ranks,
            ),
            values: code(
                c,
                &v[i * 64 * SHAPE.kv_dim()..(i + 1) * 64 * SHAPE.kv_dim()],
                64,
                SHAPE,
                None,
                &mut ranks,
            ),
        };
        let segments = [seg(0), seg(1)];
        let tail = 128 * SHAPE.kv_dim();
        let mut a = vec![0.0; SHAPE.q_dim()];
        attend_compressed(SHAPE, &q, &segments, &k[tail..], &v[tail..], 1, 31, &mut a);
        let mut b = vec![0.0; SHAPE.q_dim()];
        attend_dense(SHAPE, &q, &k, &v, 1, tokens - 1, &mut b);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 0.01 * y.abs().max(0.05), "{x} vs {y}");
        }
    }
}
