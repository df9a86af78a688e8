//! How a segment of keys or values is stored once it leaves the dense window: spectral factors
//! or group quantization, with their encoders, decoders and byte accounting.
//!
//! # Spectral coding
//! A segment's keys (or values) of one KV head form a `T × d` matrix `X` (`T = block` tokens,
//! `d = head_dim`). Its SVD `X = U·Σ·Vᵀ` truncated to rank `r` is stored as coefficients `C = U_r`
//! (`T × r`, int8 with one f16 scale per token) and a basis `B = Σ_r·V_rᵀ` (`r × d`, f16), so
//! `X ≈ C·B`. Keeping the singular values in the basis leaves every coefficient column with unit
//! norm, so one scale per token quantizes all components to the same relative precision. `r` is
//! the smallest rank keeping the requested share of `‖X‖²_F`, capped by the maximum rank. The
//! heads of a layer are decomposed in one [`rsvd_batch`] call (exact SVD when the rank is close
//! to `d`).
//!//!
//! # RoPE
//! Keys are compressed *after* RoPE (the cache receives rotated keys). Measured on SmolLM2
//! (`plrabn12.txt`, 2048 tokens, blocks of 512, all layers and KV heads), pre-RoPE keys are
//! lower-rank — mean rank 7 / 15 / 36 of 64 at 90 / 95 / 99 % energy against 20 / 31 / 50 after
//! RoPE — but the rotation differs per position, so scores on pre-RoPE factors need every key
//! rebuilt (`r·d` per key) and rotated before the dot product: attention could no longer run on
//! the factors and would cost more than on a dense cache. Post-RoPE factors keep the product
//! `C·(B·q)`; the rank price is paid in memory, and reported.

use faer::MatRef;
use half::f16;
use half::slice::HalfFloatSliceExt;
use s2lc_spectral::rsvd::{rsvd_batch, RsvdParams};

use super::spec::Coding;
use super::AttnShape;
use crate::kernels::ops;

/// Elements per quantization group along the head dimension (the int8/int4 codings).
pub const GROUP: usize = 32;
/// Rank-`r` factors of one KV head's `T × d` block: `X ≈ diag(scale)·coef·basis`.
#[derive(Debug, Clone)]
pub struct Factors {
    /// Rank kept.
    pub rank: usize,
    /// `T × rank` int8 coefficients (row-major).
    pub coef: Vec<i8>,
    /// Per-token scale of `coef`.
    pub scale: Vec<f16>,
    /// `rank × d` basis (`Σ_r·V_rᵀ`, row-major).
    pub basis: Vec<f16>,
}

/// One side (keys or values) of a compressed segment, all KV heads.
#[derive(Debug, Clone)]
pub enum Coded {
    /// The `T × kv_dim` rows unchanged (attention sinks).
    Exact(Vec<f32>),
    /// Factors per KV head.
    Spectral(Vec<Factors>),
    /// `T × kv_dim` quants (int8; or two 4-bit values per byte, low nibble first) with one f16
    /// scale per group of 32.
    Quant {
        /// Bits per value: 8 or 4.
        bits: u32,
        /// The quants.
        data: Vec<u8>,
        /// One scale per group.
        scale: Vec<f16>,
    },
}

impl Coded {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Coded::Spectral(heads) => heads
                .iter()
                .map(|f| f.coef.len() + 2 * (f.scale.len() + f.basis.len()))
                .sum(),
            Coded::Quant { data, scale, .. } => data.len() + 2 * scale.len(),
            Coded::Exact(rows) => 4 * rows.len(),
        }
    }
}

/// A compressed block of `tokens` tokens of one layer.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Tokens in the segment.
    pub tokens: usize,
    /// The keys (after RoPE).
    pub keys: Coded,
    /// The values.
    pub values: Coded,
}

/// Codes the `tokens × kv_dim` rows `x`; spectral ranks are added to `ranks` (sum, count).
pub fn code(
    coding: Coding,
    x: &[f32],
    tokens: usize,
    shape: AttnShape,
    ranks: &mut (usize, usize),
) -> Coded {
    let (hd, kv_dim) = (shape.head_dim, shape.kv_dim());
    match coding {
        Coding::Spectral { energy, max_rank } => {
            let views: Vec<MatRef<'_, f32>> = (0..shape.n_kv_heads)
                .map(|g| MatRef::from_row_major_slice_with_stride(&x[g * hd..], tokens, hd, kv_dim))
                .collect();
            let max_rank = max_rank.min(hd).min(tokens);
            let heads = match rsvd_batch(&views, &RsvdParams::new(max_rank)) {
                Ok(svds) => svds
                    .iter()
                    .zip(&views)
                    .map(|(svd, view)| {
                        let total: f64 = (0..tokens)
                            .map(|i| (0..hd).map(|j| (view[(i, j)] as f64).powi(2)).sum::<f64>())
                            .sum();
                        let r = energy_rank(&svd.s, total, energy as f64).max(1);
                        ranks.0 += r;
                        ranks.1 += 1;
                        factors(svd, r, tokens, hd)
                    })
                    .collect(),
                // Non-finite activations cannot be factored: keep them exactly (full rank).
                Err(_) => views
                    .iter()
                    .map(|v| {
                        ranks.0 += hd;
                        ranks.1 += 1;
                        identity_factors(*v)
                    })
                    .collect(),
            };
            Coded::Spectral(heads)
        }
        Coding::Q8 | Coding::Q4 => {
            let bits = if coding == Coding::Q8 { 8 } else { 4 };
            let (data, scale) = quantize_groups(x, bits);
            Coded::Quant { bits, data, scale }
        }
    }
}

/// Smallest `r ≤ s.len()` with `Σ_{i<r} sᵢ² ≥ energy·total` (`s.len()` when never reached).
fn energy_rank(s: &[f32], total: f64, energy: f64) -> usize {
    let goal = energy * total * (1.0 - 1e-6);
    let mut acc = 0.0;
    for (i, v) in s.iter().enumerate() {
        acc += (*v as f64).powi(2);
        if acc >= goal {
            return i + 1;
        }
    }
    s.len()
}

/// Coefficients `U_r` (int8 per token) and basis `Σ_r·V_rᵀ` from an SVD.
fn factors(svd: &s2lc_spectral::svd::Svd, r: usize, tokens: usize, hd: usize) -> Factors {
    let (coef, scale) = int8_rows(tokens, r, |t, j| svd.u[(t, j)]);
    let mut basis = vec![f16::ZERO; r * hd];
    for j in 0..r {
        for c in 0..hd {
            basis[j * hd + c] = f16::from_f32(svd.s[j] * svd.v[(c, j)]);
        }
    }
    Factors {
        rank: r,
        coef,
        scale,
        basis,
    }
}

/// Full-rank "factors" of `x` itself (identity basis), for blocks an SVD cannot handle.
fn identity_factors(x: MatRef<'_, f32>) -> Factors {
    let (tokens, hd) = (x.nrows(), x.ncols());
    let (coef, scale) = int8_rows(tokens, hd, |t, j| {
        let e = x[(t, j)];
        if e.is_finite() {
            e
        } else {
            0.0
        }
    });
    let basis = (0..hd * hd)
        .map(|i| {
            if i / hd == i % hd {
                f16::ONE
            } else {
                f16::ZERO
            }
        })
        .collect();
    Factors {
        rank: hd,
        coef,
        scale,
        basis,
    }
}

/// `rows × width` values `value(t, j)` quantized per row to int8 with an f16 scale.
fn int8_rows(
    rows: usize,
    width: usize,
    value: impl Fn(usize, usize) -> f32,
) -> (Vec<i8>, Vec<f16>) {
    let mut coef = vec![0i8; rows * width];
    let mut scale = vec![f16::ZERO; rows];
    let mut row = vec![0.0f32; width];
    for (t, (c, s)) in coef.chunks_exact_mut(width).zip(&mut scale).enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = value(t, j);
        }
        *s = quantize_row_i8(&row, c);
    }
    (coef, scale)
}

/// `q = round(x/d)` with `d = max|x|/127` (as f16, the stored scale); returns the scale.
pub fn quantize_row_i8(x: &[f32], q: &mut [i8]) -> f16 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = f16::from_f32(amax / 127.0);
    let df = d.to_f32();
    let inv = if df > 0.0 { 1.0 / df } else { 0.0 };
    for (o, v) in q.iter_mut().zip(x) {
        *o = (v * inv).round().clamp(-127.0, 127.0) as i8;
    }
    d
}

/// Quantizes `x` (length a multiple of 32) per group of 32 to `bits` (8 or 4) with f16 scales.
pub fn quantize_groups(x: &[f32], bits: u32) -> (Vec<u8>, Vec<f16>) {
    let groups = x.len() / GROUP;
    let mut scale = Vec::with_capacity(groups);
    let mut data = Vec::with_capacity(if bits == 8 { x.len() } else { x.len() / 2 });
    let qmax = if bits == 8 { 127.0 } else { 7.0 };
    for g in x.chunks_exact(GROUP) {
        let amax = g.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = f16::from_f32(amax / qmax);
        let df = d.to_f32();
        let inv = if df > 0.0 { 1.0 / df } else { 0.0 };
        let q = |v: f32| (v * inv).round().clamp(-qmax, qmax) as i8;
        if bits == 8 {
            data.extend(g.iter().map(|&v| q(v) as u8));
        } else {
            data.extend(
                g.chunks_exact(2)
                    .map(|p| ((q(p[0]) + 8) as u8) | (((q(p[1]) + 8) as u8) << 4)),
            );
        }
        scale.push(d);
    }
    (data, scale)
}

/// Dequantizes the `out.len()` values starting at element `at` of a group-quantized buffer
/// (`at` and the length multiples of 32) into `out`.
fn dequantize_groups(bits: u32, data: &[u8], scale: &[f16], at: usize, out: &mut [f32]) {
    let mut buf = [0i8; GROUP];
    for (gi, o) in out.chunks_exact_mut(GROUP).enumerate() {
        let g = at + gi * GROUP;
        o.fill(0.0);
        ops::axpy_i8(
            o,
            scale[g / GROUP].to_f32(),
            group_quants(bits, data, g, &mut buf),
        );
    }
}

/// Writes KV head `g` of a coded side into `out` in a form attention can multiply:
/// spectral → the `T × r` coefficients as f32 and the `r × d` basis as f32 in `basis`
/// (returns `Some(r)`); quantized → the `T × d` rows (returns `None`).
pub(super) fn unpack(
    coded: &Coded,
    g: usize,
    tokens: usize,
    shape: AttnShape,
    out: &mut Vec<f32>,
    basis: &mut Vec<f32>,
) -> Option<usize> {
    let (hd, kv_dim) = (shape.head_dim, shape.kv_dim());
    match coded {
        Coded::Spectral(heads) => {
            let f = &heads[g];
            // The per-token scales go through `basis` first (converted as one slice).
            basis.resize(tokens, 0.0);
            f.scale.convert_to_f32_slice(basis);
            out.resize(tokens * f.rank, 0.0);
            for ((o, q), &s) in out
                .chunks_exact_mut(f.rank)
                .zip(f.coef.chunks_exact(f.rank))
                .zip(basis.iter())
            {
                o.fill(0.0);
                ops::axpy_i8(o, s, q);
            }
            basis.resize(f.basis.len(), 0.0);
            f.basis.convert_to_f32_slice(basis);
            Some(f.rank)
        }
        Coded::Exact(rows) => {
            out.clear();
            for r in rows.chunks_exact(kv_dim) {
                out.extend_from_slice(&r[g * hd..(g + 1) * hd]);
            }
            None
        }
        Coded::Quant { bits, data, scale } => {
            out.resize(tokens * hd, 0.0);
            for (t, o) in out.chunks_exact_mut(hd).enumerate() {
                dequantize_groups(*bits, data, scale, t * kv_dim + g * hd, o);
            }
            None
        }
    }
}

/// The `T × d` rows of KV head `g` rebuilt from a coded side (for checks and analysis; attention
/// never rebuilds them).
pub fn reconstruct(coded: &Coded, g: usize, tokens: usize, shape: AttnShape) -> Vec<f32> {
    let hd = shape.head_dim;
    let (mut rows, mut basis) = (Vec::new(), Vec::new());
    match unpack(coded, g, tokens, shape, &mut rows, &mut basis) {
        None => rows,
        Some(r) => {
            let mut out = vec![0.0f32; tokens * hd];
            for (o, c) in out.chunks_exact_mut(hd).zip(rows.chunks_exact(r)) {
                for (cj, b) in c.iter().zip(basis.chunks_exact(hd)) {
                    ops::axpy(o, *cj, b);
                }
            }
            out
        }
    }
}
/// The 32 quants of the group starting at element `at`, as int8 (4-bit ones unpacked into `buf`).
#[inline]
fn group_quants<'a>(bits: u32, data: &'a [u8], at: usize, buf: &'a mut [i8; GROUP]) -> &'a [i8] {
    if bits == 8 {
        let bytes = &data[at..at + GROUP];
        // SAFETY: `bytes` is GROUP initialised bytes (bounds-checked above), and u8 and i8 have
        // the same size, alignment and validity; the view borrows `data` for `'a`.
        return unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<i8>(), GROUP) };
    }
    for (pair, &b) in buf
        .chunks_exact_mut(2)
        .zip(&data[at / 2..at / 2 + GROUP / 2])
    {
        pair[0] = (b & 0x0F) as i8 - 8;
        pair[1] = (b >> 4) as i8 - 8;
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::testutil::{data, low_rank, SHAPE};

    #[test]
    fn group_quantization_round_trips_within_half_a_step() {
        let x = data(4 * GROUP, 3);
        for bits in [8, 4] {
            let (q, d) = quantize_groups(&x, bits);
            assert_eq!(q.len(), if bits == 8 { x.len() } else { x.len() / 2 });
            let mut y = vec![0.0; x.len()];
            dequantize_groups(bits, &q, &d, 0, &mut y);
            for (g, (xg, yg)) in x.chunks(GROUP).zip(y.chunks(GROUP)).enumerate() {
                let step = d[g].to_f32();
                let amax = xg.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                assert!(step > 0.0 && step <= amax / if bits == 8 { 126.0 } else { 6.9 });
                for (a, b) in xg.iter().zip(yg) {
                    assert!(
                        (a - b).abs() <= 0.5 * step * 1.01 + 1e-7,
                        "{bits} bits: {a} vs {b}"
                    );
                }
            }
        }
        let mut q = [0i8; 5];
        let d = quantize_row_i8(&[0.5, -1.0, 0.25, 0.0, 1.0], &mut q);
        assert_eq!(q, [64, -127, 32, 0, 127]);
        assert!((d.to_f32() - 1.0 / 127.0).abs() < 1e-5);
    }

    #[test]
    fn exact_low_rank_blocks_are_recovered_at_their_rank() {
        let (block, r) = (64, 5);
        let x = low_rank(block, r, 1);
        let mut ranks = (0, 0);
        let coded = code(
            Coding::Spectral {
                energy: 0.9999,
                max_rank: 64,
            },
            &x,
            block,
            SHAPE,
            &mut ranks,
        );
        assert_eq!(ranks, (2 * r, 2), "rank of each head");
        for g in 0..SHAPE.n_kv_heads {
            let y = reconstruct(&coded, g, block, SHAPE);
            let (mut err, mut norm) = (0.0f64, 0.0f64);
            for t in 0..block {
                for d in 0..SHAPE.head_dim {
                    let a = x[t * SHAPE.kv_dim() + g * SHAPE.head_dim + d] as f64;
                    err += (a - y[t * SHAPE.head_dim + d] as f64).powi(2);
                    norm += a * a;
                }
            }
            // Only the int8 coefficients and f16 scales are lossy here (~0.4 % per entry).
            assert!(
                (err / norm).sqrt() < 0.01,
                "head {g}: {}",
                (err / norm).sqrt()
            );
        }
    }
}
