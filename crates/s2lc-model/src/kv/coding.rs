//! How a segment of keys or values is stored once it leaves the dense window: spectral blocks or
//! group quantization, with their encoders, decoders and byte accounting. The scalar quantizers are in [`super::quant`].
//!
//! # Spectral coding
//! A segment's keys (or values) of one KV head form a `T × d` matrix `X` (`T = block` tokens,
//! `d = head_dim`). Of its SVD `X = U·Σ·Vᵀ` a set `S` of `r` components is stored as coefficients
//! `C = U_S` (`T × r`, int8 or int4 with one f16 scale per token) and a basis `B = Σ_S·V_Sᵀ`
//! (`r × d`, f16 or int8 with a scale per row), so `X ≈ C·B`. Keeping the singular values in the
//! basis leaves every coefficient column with unit norm, so one scale per token quantizes all
//! components to the same relative precision.
//!
//! Which components are kept ([`RankSelect`]): the fewest keeping a share of `‖X‖²_F` (energy);
//! or, for keys, ranked by the attention-score error they cause on the recent queries: with the
//! queries' second moment `M = Σ qqᵀ`, dropping component `j` changes `Σ_q ‖X·q − X̂·q‖²` by
//! exactly `σ_j²·v_jᵀMv_j` (`U` has orthonormal columns), so components are taken by that
//! gain — up to a relative score error, or under a byte budget shared by every head and layer
//! compressed at the same time ([`choose_budget`]).
//!
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
use s2lc_spectral::svd::Svd;

use super::quant::{dequantize_groups, quantize_row_i4, unpack_i4};
pub use super::quant::{quantize_groups, quantize_row_i8, GROUP};
use super::spec::{Coding, RankSelect, SpectralCoding};
use super::AttnShape;
use crate::kernels::ops;

/// One KV head's `T × d` block stored spectrally: quantized rank-`r` coefficients and a basis,
/// `X ≈ diag(scale)·coef·basis` (a quantized KV block, not plain low-rank `b·a` factors).
#[derive(Debug, Clone)]
pub struct SpectralBlock {
    /// Rank kept.
    pub rank: usize,
    /// Bits per coefficient: 8 (int8 bytes) or 4 (a stream of `T·rank` nibbles `q + 8`, row `t`
    /// starting at nibble `t·rank`, low nibble first).
    pub coef_bits: u32,
    /// `T × rank` coefficients (row-major), symmetric per token.
    pub coef: Vec<u8>,
    /// Per-token scale of `coef`.
    pub scale: Vec<f16>,
    /// `rank × d` basis (`σ_j·v_jᵀ` for the kept components, row-major).
    pub basis: Basis,
}

/// How a spectral block's basis is held.
#[derive(Debug, Clone)]
pub enum Basis {
    /// f16 values.
    F16(Vec<f16>),
    /// int8 with one f16 scale per row (per component).
    Q8 {
        /// The quants, `rank × d`.
        data: Vec<i8>,
        /// One scale per row.
        scale: Vec<f16>,
    },
}

impl SpectralBlock {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        let basis = match &self.basis {
            Basis::F16(b) => 2 * b.len(),
            Basis::Q8 { data, scale } => data.len() + 2 * scale.len(),
        };
        self.coef.len() + 2 * self.scale.len() + basis
    }

    /// The `T × rank` coefficients as int8 (borrowed for 8 bits, unpacked into `buf` for 4).
    pub fn coef_i8<'a>(&'a self, buf: &'a mut Vec<i8>) -> &'a [i8] {
        if self.coef_bits == 8 {
            // SAFETY: u8 and i8 have the same size, alignment and validity; the view borrows
            // `self.coef` for `'a`.
            return unsafe {
                std::slice::from_raw_parts(self.coef.as_ptr().cast::<i8>(), self.coef.len())
            };
        }
        buf.resize(self.scale.len() * self.rank, 0);
        unpack_i4(&self.coef, 0, buf);
        buf
    }

    /// The `rank × d` basis as f32 into `out`.
    pub fn basis_f32(&self, out: &mut Vec<f32>) {
        match &self.basis {
            Basis::F16(b) => {
                out.resize(b.len(), 0.0);
                b.convert_to_f32_slice(out);
            }
            Basis::Q8 { data, scale } => {
                let d = data.len() / scale.len().max(1);
                out.clear();
                out.resize(data.len(), 0.0);
                for ((o, q), s) in out.chunks_exact_mut(d).zip(data.chunks_exact(d)).zip(scale) {
                    ops::axpy_i8(o, s.to_f32(), q);
                }
            }
        }
    }
}

/// One side (keys or values) of a compressed segment, all KV heads.
#[derive(Debug, Clone)]
pub enum Coded {
    /// The `T × kv_dim` rows unchanged (attention sinks).
    Exact(Vec<f32>),
    /// One spectral block per KV head.
    Spectral(Vec<SpectralBlock>),
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
            Coded::Spectral(heads) => heads.iter().map(SpectralBlock::bytes).sum(),
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

/// The SVD of one KV head's block with each component's share of the selection criterion.
pub struct HeadSpectrum {
    /// `None`: the block was not finite and is kept at full rank on an identity basis.
    svd: Option<Svd>,
    /// `gains[j]`: component `j`'s share of the criterion (energy `σ_j²`, or attention-score
    /// energy `σ_j²·v_jᵀMv_j`); the shares of all components of the block sum to 1.
    pub gains: Vec<f64>,
    /// Component indices by decreasing gain.
    pub order: Vec<usize>,
}

/// Values of a symmetric `d × d` matrix stored as its upper triangle (row-major, `i ≤ j`).
pub fn packed_len(d: usize) -> usize {
    d * (d + 1) / 2
}

/// The full `d × d` matrix of an upper triangle stored as by [`packed_len`].
fn symmetric(packed: &[f32], d: usize) -> Vec<f32> {
    let mut m = vec![0.0f32; d * d];
    let mut k = 0;
    for i in 0..d {
        for j in i..d {
            m[i * d + j] = packed[k];
            m[j * d + i] = packed[k];
            k += 1;
        }
    }
    m
}

/// SVDs of the KV heads of `tokens × kv_dim` rows `x`. With `moments` (per KV head the second
/// moment `M = Σ qqᵀ` of recent queries, its upper triangle as by [`packed_len`]), component gains are their share of the
/// attention-score energy `tr(X·M·Xᵀ)` (every component is computed); otherwise their share of
/// `‖X‖²_F` over the leading `max_rank` components (randomized SVD below the break-even).
pub fn spectra(
    x: &[f32],
    tokens: usize,
    shape: AttnShape,
    moments: Option<&[f32]>,
    max_rank: usize,
) -> Vec<HeadSpectrum> {
    let (hd, kv_dim) = (shape.head_dim, shape.kv_dim());
    let views: Vec<MatRef<'_, f32>> = (0..shape.n_kv_heads)
        .map(|g| MatRef::from_row_major_slice_with_stride(&x[g * hd..], tokens, hd, kv_dim))
        .collect();
    let k = if moments.is_some() { hd } else { max_rank }
        .min(hd)
        .min(tokens);
    let svds = match rsvd_batch(&views, &RsvdParams::new(k)) {
        Ok(svds) => svds,
        // Non-finite activations cannot be factored: keep them exactly (full rank).
        Err(_) => {
            return views
                .iter()
                .map(|_| HeadSpectrum {
                    svd: None,
                    gains: vec![1.0 / hd as f64; hd],
                    order: (0..hd).collect(),
                })
                .collect()
        }
    };
    svds.into_iter()
        .zip(&views)
        .enumerate()
        .map(|(g, (svd, view))| {
            let raw: Vec<f64> = match moments {
                Some(m) => {
                    let m = symmetric(&m[g * packed_len(hd)..][..packed_len(hd)], hd);
                    (0..svd.s.len())
                        .map(|j| {
                            let v: Vec<f32> = (0..hd).map(|c| svd.v[(c, j)]).collect();
                            let w: f64 = m
                                .chunks_exact(hd)
                                .zip(&v)
                                .map(|(row, vc)| *vc as f64 * ops::dot(row, &v) as f64)
                                .sum();
                            (svd.s[j] as f64).powi(2) * w.max(0.0)
                        })
                        .collect()
                }
                None => svd.s.iter().map(|s| (*s as f64).powi(2)).collect(),
            };
            let total: f64 = match moments {
                Some(_) => raw.iter().sum(),
                None => (0..tokens)
                    .map(|i| (0..hd).map(|j| (view[(i, j)] as f64).powi(2)).sum::<f64>())
                    .sum(),
            };
            let gains: Vec<f64> = raw
                .iter()
                .map(|r| if total > 0.0 { r / total } else { 0.0 })
                .collect();
            let mut order: Vec<usize> = (0..gains.len()).collect();
            order.sort_by(|&a, &b| gains[b].total_cmp(&gains[a]).then(a.cmp(&b)));
            HeadSpectrum {
                svd: Some(svd),
                gains,
                order,
            }
        })
        .collect()
}

/// The fewest leading components of `h` (by gain) whose shares reach `keep`, at least one and
/// at most `max_rank`.
pub fn choose(h: &HeadSpectrum, keep: f64, max_rank: usize) -> Vec<usize> {
    let goal = keep * (1.0 - 1e-6);
    let mut acc = 0.0;
    let mut out = Vec::new();
    for &j in h.order.iter().take(max_rank.max(1)) {
        out.push(j);
        acc += h.gains[j];
        if acc >= goal {
            break;
        }
    }
    out
}

/// Bytes of a spectral block: fixed (per-token scales) and per component (coefficient column
/// and basis row).
pub fn block_cost(c: &SpectralCoding, tokens: usize, hd: usize) -> (usize, usize) {
    let basis = if c.basis_bits == 8 { hd + 2 } else { 2 * hd };
    (2 * tokens, tokens * c.coef_bits as usize / 8 + basis)
}

/// Components of every head in `heads` under a byte budget: each head first gets its leading
/// component, then the components with the largest gains over all heads are added while the
/// blocks fit in `budget` bytes (heads at `max_rank` take no more). `None` when even one
/// component per head does not fit.
pub fn choose_budget(
    heads: &[HeadSpectrum],
    cost: (usize, usize),
    budget: usize,
    max_rank: usize,
) -> Option<Vec<Vec<usize>>> {
    let (fixed, per) = cost;
    let mut spent = heads.len() * (fixed + per);
    if spent > budget {
        return None;
    }
    let mut chosen: Vec<Vec<usize>> = heads.iter().map(|h| vec![h.order[0]]).collect();
    let mut rest: Vec<(f64, usize, usize)> = heads
        .iter()
        .enumerate()
        .flat_map(|(i, h)| h.order[1..].iter().map(move |&j| (h.gains[j], i, j)))
        .collect();
    rest.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
    for (_, i, j) in rest {
        if spent + per > budget {
            break;
        }
        if chosen[i].len() < max_rank.min(heads[i].order.len()) {
            chosen[i].push(j);
            spent += per;
        }
    }
    Some(chosen)
}

/// The spectral block of components `comps` of `h` (`tokens × hd`).
pub fn spectral_block(
    h: &HeadSpectrum,
    comps: &[usize],
    tokens: usize,
    hd: usize,
    c: &SpectralCoding,
    x: MatRef<'_, f32>,
) -> SpectralBlock {
    let Some(svd) = &h.svd else {
        return identity_block(x, c);
    };
    let r = comps.len();
    let mut basis = vec![0.0f32; r * hd];
    for (row, &j) in basis.chunks_exact_mut(hd).zip(comps) {
        for (cc, b) in row.iter_mut().enumerate() {
            *b = svd.s[j] * svd.v[(cc, j)];
        }
    }
    let (coef, scale) = quantize_coefficients(tokens, r, c.coef_bits, |t, k| svd.u[(t, comps[k])]);
    SpectralBlock {
        rank: r,
        coef_bits: c.coef_bits,
        coef,
        scale,
        basis: store_basis(&basis, hd, c.basis_bits),
    }
}

/// Full-rank "factors" of `x` itself (identity basis), for blocks an SVD cannot handle.
fn identity_block(x: MatRef<'_, f32>, c: &SpectralCoding) -> SpectralBlock {
    let (tokens, hd) = (x.nrows(), x.ncols());
    let (coef, scale) = quantize_coefficients(tokens, hd, 8, |t, j| {
        let e = x[(t, j)];
        if e.is_finite() {
            e
        } else {
            0.0
        }
    });
    let basis: Vec<f32> = (0..hd * hd)
        .map(|i| if i / hd == i % hd { 1.0 } else { 0.0 })
        .collect();
    SpectralBlock {
        rank: hd,
        coef_bits: 8,
        coef,
        scale,
        basis: store_basis(&basis, hd, c.basis_bits),
    }
}

/// The `r × hd` basis in its stored form.
fn store_basis(basis: &[f32], hd: usize, bits: u32) -> Basis {
    if bits == 16 {
        return Basis::F16(basis.iter().map(|v| f16::from_f32(*v)).collect());
    }
    let mut data = vec![0i8; basis.len()];
    let scale = basis
        .chunks_exact(hd)
        .zip(data.chunks_exact_mut(hd))
        .map(|(b, q)| quantize_row_i8(b, q))
        .collect();
    Basis::Q8 { data, scale }
}

/// `rows × width` values `value(t, j)` quantized per row to `bits` (8 or 4) with an f16 scale.
fn quantize_coefficients(
    rows: usize,
    width: usize,
    bits: u32,
    value: impl Fn(usize, usize) -> f32,
) -> (Vec<u8>, Vec<f16>) {
    let mut coef = vec![0u8; (rows * width * bits as usize).div_ceil(8)];
    let mut scale = vec![f16::ZERO; rows];
    let mut row = vec![0.0f32; width];
    let mut q = vec![0i8; width];
    for (t, s) in scale.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = value(t, j);
        }
        *s = if bits == 8 {
            let d = quantize_row_i8(&row, &mut q);
            for (o, v) in coef[t * width..][..width].iter_mut().zip(&q) {
                *o = *v as u8;
            }
            d
        } else {
            quantize_row_i4(&row, &mut coef, t * width)
        };
    }
    (coef, scale)
}

/// Codes the `tokens × kv_dim` rows `x`; spectral ranks are added to `ranks` (sum, count).
/// `moments`: per KV head the recent queries' `d × d` second moment, used by
/// [`RankSelect::Score`]. [`RankSelect::Bits`] spans several blocks and is chosen by the cache
/// with [`choose_budget`]; here it is treated as full energy.
pub fn code(
    coding: Coding,
    x: &[f32],
    tokens: usize,
    shape: AttnShape,
    moments: Option<&[f32]>,
    ranks: &mut (usize, usize),
) -> Coded {
    match coding {
        Coding::Spectral(c) => {
            let (keep, moments) = match c.select {
                RankSelect::Energy(e) => (e as f64, None),
                RankSelect::Score(err) => (1.0 - err as f64, moments),
                RankSelect::Bits { .. } => (1.0, None),
            };
            let heads = spectra(x, tokens, shape, moments, c.max_rank);
            let comps: Vec<Vec<usize>> =
                heads.iter().map(|h| choose(h, keep, c.max_rank)).collect();
            spectral_side(&heads, &comps, x, tokens, shape, &c, ranks)
        }
        Coding::Q8 | Coding::Q4 => {
            let bits = if coding == Coding::Q8 { 8 } else { 4 };
            let (data, scale) = quantize_groups(x, bits);
            Coded::Quant { bits, data, scale }
        }
    }
}

/// The spectral side of chosen components `comps` per head.
pub fn spectral_side(
    heads: &[HeadSpectrum],
    comps: &[Vec<usize>],
    x: &[f32],
    tokens: usize,
    shape: AttnShape,
    c: &SpectralCoding,
    ranks: &mut (usize, usize),
) -> Coded {
    let (hd, kv_dim) = (shape.head_dim, shape.kv_dim());
    Coded::Spectral(
        heads
            .iter()
            .zip(comps)
            .enumerate()
            .map(|(g, (h, cs))| {
                let view =
                    MatRef::from_row_major_slice_with_stride(&x[g * hd..], tokens, hd, kv_dim);
                let b = spectral_block(h, cs, tokens, hd, c, view);
                ranks.0 += b.rank;
                ranks.1 += 1;
                b
            })
            .collect(),
    )
}

/// Scratch of [`unpack`].
#[derive(Default)]
pub(super) struct Unpacked {
    /// Spectral: `T × r` coefficients; otherwise `T × d` rows.
    pub rows: Vec<f32>,
    /// Spectral: the `r × d` basis.
    pub basis: Vec<f32>,
    /// Spectral: per-token scales.
    pub scale: Vec<f32>,
    /// 4-bit coefficients unpacked.
    pub quants: Vec<i8>,
}

/// Writes KV head `g` of a coded side into `u` in a form attention can multiply:
/// spectral → the `T × r` coefficients as f32 in `u.rows` and the `r × d` basis in `u.basis`
/// (returns `Some(r)`); otherwise the `T × d` rows in `u.rows` (returns `None`).
pub(super) fn unpack(
    coded: &Coded,
    g: usize,
    tokens: usize,
    shape: AttnShape,
    u: &mut Unpacked,
) -> Option<usize> {
    let (hd, kv_dim) = (shape.head_dim, shape.kv_dim());
    match coded {
        Coded::Spectral(heads) => {
            let f = &heads[g];
            u.scale.resize(tokens, 0.0);
            f.scale.convert_to_f32_slice(&mut u.scale);
            let coef = f.coef_i8(&mut u.quants);
            u.rows.resize(tokens * f.rank, 0.0);
            for ((o, q), &s) in u
                .rows
                .chunks_exact_mut(f.rank)
                .zip(coef.chunks_exact(f.rank))
                .zip(u.scale.iter())
            {
                o.fill(0.0);
                ops::axpy_i8(o, s, q);
            }
            f.basis_f32(&mut u.basis);
            Some(f.rank)
        }
        Coded::Exact(rows) => {
            u.rows.clear();
            for r in rows.chunks_exact(kv_dim) {
                u.rows.extend_from_slice(&r[g * hd..(g + 1) * hd]);
            }
            None
        }
        Coded::Quant { bits, data, scale } => {
            u.rows.resize(tokens * hd, 0.0);
            for (t, o) in u.rows.chunks_exact_mut(hd).enumerate() {
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
    let mut u = Unpacked::default();
    match unpack(coded, g, tokens, shape, &mut u) {
        None => u.rows,
        Some(r) => {
            let mut out = vec![0.0f32; tokens * hd];
            for (o, c) in out.chunks_exact_mut(hd).zip(u.rows.chunks_exact(r)) {
                for (cj, b) in c.iter().zip(u.basis.chunks_exact(hd)) {
                    ops::axpy(o, *cj, b);
                }
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::testutil::{data, low_rank, SHAPE};

    fn spectral(select: RankSelect, coef_bits: u32, basis_bits: u32) -> Coding {
        Coding::Spectral(SpectralCoding {
            select,
            max_rank: 64,
            coef_bits,
            basis_bits,
        })
    }

    /// Relative Frobenius error of head `g` of `coded` against the rows `x`.
    fn rel_err(coded: &Coded, x: &[f32], g: usize, tokens: usize) -> f64 {
        let y = reconstruct(coded, g, tokens, SHAPE);
        let (mut err, mut norm) = (0.0f64, 0.0f64);
        for t in 0..tokens {
            for d in 0..SHAPE.head_dim {
                let a = x[t * SHAPE.kv_dim() + g * SHAPE.head_dim + d] as f64;
                err += (a - y[t * SHAPE.head_dim + d] as f64).powi(2);
                norm += a * a;
            }
        }
        (err / norm).sqrt()
    }

    #[test]
    fn exact_low_rank_blocks_are_recovered_at_their_rank() {
        let (block, r) = (64, 5);
        let x = low_rank(block, r, 1);
        // int8 coefficients and f16 basis (~0.4 % per entry); int4 coefficients (~1/14 of a
        // coefficient's range per entry); an int8 basis adds ~0.4 %.
        for (coef, basis, bound) in [(8, 16, 0.01), (4, 16, 0.12), (8, 8, 0.015), (4, 8, 0.12)] {
            let mut ranks = (0, 0);
            let coded = code(
                spectral(RankSelect::Energy(0.9999), coef, basis),
                &x,
                block,
                SHAPE,
                None,
                &mut ranks,
            );
            assert_eq!(ranks, (2 * r, 2), "rank of each head");
            let Coded::Spectral(heads) = &coded else {
                panic!("spectral")
            };
            // Bytes: coefficients, per-token scales, basis (with per-row scales at int8).
            let basis_bytes = if basis == 8 {
                r * 64 + 2 * r
            } else {
                2 * r * 64
            };
            assert_eq!(
                heads[0].bytes(),
                block * r * coef as usize / 8 + 2 * block + basis_bytes
            );
            assert_eq!(coded.bytes(), 2 * heads[0].bytes());
            for g in 0..SHAPE.n_kv_heads {
                let e = rel_err(&coded, &x, g, block);
                assert!(e < bound, "coef {coef}, basis {basis}, head {g}: {e}");
            }
        }
    }

    #[test]
    fn score_selection_keeps_the_directions_queries_weigh() {
        // Keys with a strong component along channel 0 and a weak one along channel 1; queries
        // look only along channel 1. Energy keeps channel 0, the score criterion channel 1.
        let (tokens, hd) = (64, SHAPE.head_dim);
        let mut x = vec![0.0f32; tokens * SHAPE.kv_dim()];
        // Orthogonal sign patterns over the tokens: the SVD's components are the channels.
        let sign = |b: bool| if b { 1.0 } else { -1.0 };
        for t in 0..tokens {
            for g in 0..SHAPE.n_kv_heads {
                x[t * SHAPE.kv_dim() + g * hd] = 10.0 * sign(t < tokens / 2);
                x[t * SHAPE.kv_dim() + g * hd + 1] = sign(t % 2 == 0);
            }
        }
        // M = e₁e₁ᵀ per head: in the upper triangle, row 1 starts after the 64 values of row 0.
        let mut m = vec![0.0f32; SHAPE.n_kv_heads * packed_len(hd)];
        for g in 0..SHAPE.n_kv_heads {
            m[g * packed_len(hd) + hd] = 1.0;
        }
        let one = |select, moments: Option<&[f32]>| {
            let mut ranks = (0, 0);
            let coded = code(
                spectral(select, 8, 16),
                &x,
                tokens,
                SHAPE,
                moments,
                &mut ranks,
            );
            assert_eq!(ranks, (2, 2));
            reconstruct(&coded, 0, tokens, SHAPE)
        };
        let by_energy = one(RankSelect::Energy(0.9), None);
        let by_score = one(RankSelect::Score(0.05), Some(&m));
        let along = |y: &[f32], c: usize| (0..tokens).map(|t| y[t * hd + c].abs()).sum::<f32>();
        assert!(along(&by_energy, 0) > 10.0 && along(&by_energy, 1) < 1e-3);
        assert!(along(&by_score, 1) > 1.0 && along(&by_score, 0) < 1e-3);
    }

    #[test]
    fn a_byte_budget_is_met_exactly_and_spent_where_it_counts() {
        let (tokens, hd) = (64, SHAPE.head_dim);
        let c = SpectralCoding {
            select: RankSelect::Bits {
                bits: 1.0,
                score: false,
            },
            max_rank: 64,
            coef_bits: 4,
            basis_bits: 8,
        };
        // Head 0 of block a is rank 3, everything else full rank.
        let a = low_rank(tokens, 3, 1);
        let b = data(tokens * SHAPE.kv_dim(), 2);
        let mut heads = spectra(&a, tokens, SHAPE, None, 64);
        heads.extend(spectra(&b, tokens, SHAPE, None, 64));
        let cost = block_cost(&c, tokens, hd);
        assert_eq!(cost, (128, 32 + 66));
        let budget = 4 * tokens * hd / 8; // 1 bit per value over four heads
        let comps = choose_budget(&heads, cost, budget, 64).unwrap();
        let spent: usize = comps.iter().map(|cs| cost.0 + cs.len() * cost.1).sum();
        assert!(
            spent <= budget && spent + cost.1 > budget,
            "{spent} of {budget}"
        );
        // The rank-3 head needs only three components; the rest goes to the full-rank heads.
        assert_eq!(
            comps[0].len(),
            3,
            "{:?}",
            comps.iter().map(Vec::len).collect::<Vec<_>>()
        );
        assert!(comps[2].len() > 3 && comps[3].len() > 3);
        // The built blocks hold exactly the bytes counted.
        let mut ranks = (0, 0);
        let coded = spectral_side(&heads[..2], &comps[..2], &a, tokens, SHAPE, &c, &mut ranks);
        assert_eq!(
            coded.bytes(),
            2 * cost.0 + (comps[0].len() + comps[1].len()) * cost.1
        );
        // One component per head must fit.
        assert!(choose_budget(&heads, cost, 4 * (cost.0 + cost.1) - 1, 64).is_none());
    }
}
