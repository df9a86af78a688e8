//! S2LC's low-bit weight rows (`sq2`, `sq3`, `sq4`): 2, 3 or 4 bits per weight in groups of 32
//! along the input, asymmetric, with log-coded group scales under a per-row f16 pair. They exist
//! because ggml's low-bit k-quants need rows in multiples of 256 (SmolLM2's 576 is not, so
//! llama.cpp falls back to 32-blocks at ≥ 4.2 bits). Groups of 32 line up with the 32-blocks of
//! the GGUF files models ship in; measured on SmolLM2 (lcet10, 4-bit rows, error feedback),
//! groups of 64 cost +40 % perplexity against +6 % for groups of 32.
//!
//! Row layout (`cols` a multiple of 32), little-endian:
//! ```text
//! D: f16 | M: f16 | per group of 32: cs: u8 | cm: u8 | codes: 4·bits bytes
//! ```
//! A weight is `w = d·q − m` with `q ∈ [0, 2^bits)`, `d = D·2^(−cs/16)` and `m = M·2^(−cm/16)`
//! (`m ≥ 0`: the group's minimum, clipped at zero, is `−m`). Eight bits of a log scale span
//! 2^16 at 4.4 % steps, so groups far smaller than the row's largest keep their resolution
//! (a linear 8-bit scale would round a group 100x smaller to a few percent). Codes are stored in
//! bit planes so unpacking is the same shift on every byte (vectorizes): the 2-bit plane's byte
//! `j` of 8 holds codes `j, j+8, j+16, j+24` at bits 0, 2, 4, 6; `sq3` adds 4 bytes whose byte
//! `j` holds the third bit of codes `j, j+4, …, j+28` at bits 0..7; `sq4` byte `j` of 16 holds
//! codes `j` (low nibble) and `j+16` (high nibble). Bits per weight: `bits + 16/32 + 32/cols`
//! (2.56 / 3.56 / 4.56 at 576 columns).
//!
//! Products take the activation quantized to 16 bits per block of 32 like every block format
//! ([`super::dot::QuantizedActs`]): per group, `Σ w·x = d·d_x·Σ q·q_x − m·d_x·Σ q_x`, integer
//! sums in both the portable code here and the AVX2 kernels of `kernels::x86`.

use std::sync::OnceLock;

use half::f16;

use super::dot::Acts;

/// Weights per group.
pub const GROUP: usize = 32;
/// Bytes of the 2-bit plane (code `i` at byte `i % LO`, bits `2·(i / LO)`).
const LO: usize = GROUP / 4;
/// Bytes of the third-bit plane (code `i` at byte `i % HI`, bit `i / HI`).
const HI: usize = GROUP / 8;
/// Bytes of the 4-bit plane (code `i` at byte `i % NIB`, bits `4·(i / NIB)`).
const NIB: usize = GROUP / 2;

/// Bytes of one row of `cols` values at `bits` per code.
pub const fn row_bytes(bits: usize, cols: usize) -> usize {
    4 + cols / GROUP * group_bytes(bits)
}

/// Bytes of one group: two scale codes and the code planes.
pub const fn group_bytes(bits: usize) -> usize {
    2 + GROUP / 8 * bits
}

/// `2^(−c/16)` for every scale code `c`.
pub fn scale_table() -> &'static [f32; 256] {
    static TABLE: OnceLock<[f32; 256]> = OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|c| (-(c as f64) / 16.0).exp2() as f32))
}

/// The scale code whose value `full·2^(−c/16)` is nearest `v` in log space (0 for `v ≥ full`,
/// 255 for `v` at or below the smallest step).
pub fn scale_code(v: f32, full: f32) -> u8 {
    if !(v > 0.0 && full > 0.0) {
        return 255;
    }
    let c = (-16.0 * (v as f64 / full as f64).log2()).round();
    c.clamp(0.0, 255.0) as u8
}

fn f16_le(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// One group's codes (each `< 2^bits`, `GROUP` of them) packed into its planes (`GROUP·bits/8` bytes).
pub fn pack_codes(bits: usize, codes: &[u8; GROUP], out: &mut [u8]) {
    out[..GROUP / 8 * bits].fill(0);
    match bits {
        2 | 3 => {
            for (i, &q) in codes.iter().enumerate() {
                out[i % LO] |= (q & 3) << (2 * (i / LO));
                if bits == 3 {
                    out[LO + i % HI] |= ((q >> 2) & 1) << (i / HI);
                }
            }
        }
        _ => {
            for (i, &q) in codes.iter().enumerate() {
                out[i % NIB] |= (q & 15) << (4 * (i / NIB));
            }
        }
    }
}

/// The `GROUP` codes of one group's planes.
#[inline(always)]
fn unpack<const B: usize>(p: &[u8], q: &mut [u8; GROUP]) {
    match B {
        2 | 3 => {
            let lo = &p[..LO];
            for k in 0..4 {
                for j in 0..LO {
                    q[LO * k + j] = (lo[j] >> (2 * k)) & 3;
                }
            }
            if B == 3 {
                let hi = &p[LO..LO + HI];
                for k in 0..8 {
                    for j in 0..HI {
                        q[HI * k + j] |= ((hi[j] >> k) & 1) << 2;
                    }
                }
            }
        }
        _ => {
            let p = &p[..NIB];
            for k in 0..2 {
                for j in 0..NIB {
                    q[NIB * k + j] = (p[j] >> (4 * k)) & 15;
                }
            }
        }
    }
}

/// `(d, m)` of a group from the row's `(D, M)` and its two scale codes.
#[inline(always)]
fn group_scales(d_row: f32, m_row: f32, g: &[u8]) -> (f32, f32) {
    let t = scale_table();
    (d_row * t[g[0] as usize], m_row * t[g[1] as usize])
}

/// Decodes one row (`row_bytes(B, out.len())` bytes) into `out`.
#[inline(always)]
fn dequantize_row_impl<const B: usize>(row: &[u8], out: &mut [f32]) {
    let (d_row, m_row) = (f16_le(row), f16_le(&row[2..]));
    let mut q = [0u8; GROUP];
    for (g, o) in row[4..]
        .chunks_exact(group_bytes(B))
        .zip(out.chunks_exact_mut(GROUP))
    {
        let (d, m) = group_scales(d_row, m_row, g);
        unpack::<B>(&g[2..], &mut q);
        for (o, &q) in o.iter_mut().zip(&q) {
            *o = d * q as f32 - m;
        }
    }
}

/// `W[row]·x` for one row of `bits`-bit codes against activations quantized per block of 32
/// (`a` holds the row's `cols / 32` blocks): the portable kernel, whose integer sums the AVX2
/// one in `kernels::x86` computes too.
pub(crate) fn dot_row_scalar(bits: usize, row: &[u8], a: Acts<'_>) -> f32 {
    match bits {
        2 => dot_row_impl::<2>(row, a),
        3 => dot_row_impl::<3>(row, a),
        4 => dot_row_impl::<4>(row, a),
        _ => panic!("lowbit dot: {bits} bits"),
    }
}

fn dot_row_impl<const B: usize>(row: &[u8], a: Acts<'_>) -> f32 {
    let (d_row, m_row) = (f16_le(row), f16_le(&row[2..]));
    let mut q = [0u8; GROUP];
    let mut total = 0.0f32;
    for (b, g) in row[4..].chunks_exact(group_bytes(B)).enumerate() {
        let (d, m) = group_scales(d_row, m_row, g);
        unpack::<B>(&g[2..], &mut q);
        let xq = &a.qs[b * GROUP..][..GROUP];
        let isum: i32 = q.iter().zip(xq).map(|(&q, &x)| q as i32 * x as i32).sum();
        total += d * a.d[b] * isum as f32 - m * a.s[b];
    }
    total
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dequantize_avx2<const B: usize>(data: &[u8], cols: usize, out: &mut [f32]) {
    for (row, o) in data
        .chunks_exact(row_bytes(B, cols))
        .zip(out.chunks_exact_mut(cols))
    {
        dequantize_row_impl::<B>(row, o);
    }
}

fn dequantize_portable<const B: usize>(data: &[u8], cols: usize, out: &mut [f32]) {
    for (row, o) in data
        .chunks_exact(row_bytes(B, cols))
        .zip(out.chunks_exact_mut(cols))
    {
        dequantize_row_impl::<B>(row, o);
    }
}

/// Decodes whole rows of `cols` values (`out.len()` a multiple of `cols`).
///
/// # Panics
/// If `cols` is not a multiple of 32, `bits` not 2, 3 or 4, or `data` holds fewer rows than
/// `out`.
pub fn dequantize(bits: usize, data: &[u8], cols: usize, out: &mut [f32]) {
    let rows = out.len() / cols.max(1);
    assert!(
        cols % GROUP == 0 && out.len() % cols == 0 && data.len() >= rows * row_bytes(bits, cols),
        "lowbit decode: {rows} rows of {cols} values need {} bytes, got {}",
        rows * row_bytes(bits, cols),
        data.len()
    );
    #[cfg(target_arch = "x86_64")]
    if super::dot::simd() {
        // SAFETY: features checked; every read is a whole row inside `data` (asserted).
        unsafe {
            match bits {
                2 => dequantize_avx2::<2>(data, cols, out),
                3 => dequantize_avx2::<3>(data, cols, out),
                4 => dequantize_avx2::<4>(data, cols, out),
                _ => panic!("lowbit decode: {bits} bits"),
            }
        }
        return;
    }
    match bits {
        2 => dequantize_portable::<2>(data, cols, out),
        3 => dequantize_portable::<3>(data, cols, out),
        4 => dequantize_portable::<4>(data, cols, out),
        _ => panic!("lowbit decode: {bits} bits"),
    }
}

/// A row's quantization grid under construction: the f16 row scales and, per group, the codes
/// of `d` and `m` with their decoded values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowScales {
    /// `D` as stored (already rounded to f16).
    pub d_row: f32,
    /// `M` as stored (already rounded to f16).
    pub m_row: f32,
}

impl RowScales {
    /// Row scales covering groups whose largest step is `d_max` and largest offset `m_max`,
    /// with `headroom` (≥ 1) for groups that grow later (error feedback moves weights).
    pub fn new(d_max: f32, m_max: f32, headroom: f32) -> Self {
        let r = |v: f32| f16::from_f32((v * headroom).max(0.0)).to_f32();
        RowScales {
            d_row: r(d_max),
            m_row: r(m_max),
        }
    }

    /// The ideal `(d, m)` of a group `w` at `bits`: `m` the negated minimum clipped at zero,
    /// `d` spreading `[−m, max]` over the codes.
    pub fn ideal(w: &[f32], bits: usize) -> (f32, f32) {
        let lo = w.iter().fold(f32::INFINITY, |a, &v| a.min(v));
        let hi = w.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
        let m = (-lo).max(0.0);
        let top = ((1u32 << bits) - 1) as f32;
        (((hi + m) / top).max(0.0), m)
    }

    /// The stored grid `(cs, cm, d, m)` for a group `w` at `bits`: candidate ranges shrunk from
    /// the ideal one, each rounded to the log codes, the one with the least squared error (or,
    /// with `weights`, least weighted error) kept.
    pub fn group(&self, w: &[f32], bits: usize, weights: Option<&[f32]>) -> (u8, u8, f32, f32) {
        let (d0, m0) = Self::ideal(w, bits);
        let t = scale_table();
        let mut best = (f32::INFINITY, 255u8, 255u8, 0.0f32, 0.0f32);
        for shrink in [1.0f32, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7] {
            let cs = scale_code(d0 * shrink, self.d_row);
            let cm = scale_code(m0 * shrink, self.m_row);
            let (d, m) = (self.d_row * t[cs as usize], self.m_row * t[cm as usize]);
            let err: f32 = w
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    let e = v - (d * code(v, d, m, bits) as f32 - m);
                    e * e * weights.map_or(1.0, |h| h[i])
                })
                .sum();
            if err < best.0 {
                best = (err, cs, cm, d, m);
            }
        }
        (best.1, best.2, best.3, best.4)
    }
}

/// The code of `v` on the grid `d·q − m` (`q` clamped to `[0, 2^bits)`).
#[inline]
pub fn code(v: f32, d: f32, m: f32, bits: usize) -> u8 {
    if d <= 0.0 {
        return 0;
    }
    let top = ((1u32 << bits) - 1) as f32;
    ((v + m) / d).round().clamp(0.0, top) as u8
}

/// Writes a row header (the row scales).
pub fn write_row_header(s: RowScales, out: &mut [u8]) {
    out[..2].copy_from_slice(&f16::from_f32(s.d_row).to_le_bytes());
    out[2..4].copy_from_slice(&f16::from_f32(s.m_row).to_le_bytes());
}

/// Round-to-nearest quantization of a `rows × cols` matrix (no error feedback): each group on
/// its best shrunk grid. The reference [`crate::kernels::WeightMatrix::quantize`] uses; the
/// calibrated quantizer in `compress::quantlr` adds error feedback on top of the same grid.
pub fn quantize_rtn(data: &[f32], cols: usize, bits: usize) -> Vec<u8> {
    let rb = row_bytes(bits, cols);
    let rows = data.len() / cols.max(1);
    let mut out = vec![0u8; rows * rb];
    for (w, o) in data.chunks_exact(cols).zip(out.chunks_exact_mut(rb)) {
        let (mut dm, mut mm) = (0.0f32, 0.0f32);
        for g in w.chunks_exact(GROUP) {
            let (d, m) = RowScales::ideal(g, bits);
            dm = dm.max(d);
            mm = mm.max(m);
        }
        let scales = RowScales::new(dm, mm, 1.0);
        write_row_header(scales, o);
        for (g, ob) in w
            .chunks_exact(GROUP)
            .zip(o[4..].chunks_exact_mut(group_bytes(bits)))
        {
            let (cs, cm, d, m) = scales.group(g, bits, None);
            let codes: [u8; GROUP] = std::array::from_fn(|i| code(g[i], d, m, bits));
            ob[0] = cs;
            ob[1] = cm;
            pack_codes(bits, &codes, &mut ob[2..]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::dot::{dot_rows, QuantizedActs, Rows};
    use s2lc_spectral::rng::SplitMix64;

    fn naive_decode(bits: usize, row: &[u8], cols: usize) -> Vec<f32> {
        let (d_row, m_row) = (f16_le(row), f16_le(&row[2..]));
        let mut out = Vec::with_capacity(cols);
        for g in row[4..].chunks_exact(group_bytes(bits)) {
            let d = d_row * (-(g[0] as f64) / 16.0).exp2() as f32;
            let m = m_row * (-(g[1] as f64) / 16.0).exp2() as f32;
            for i in 0..GROUP {
                // Codes read one by one from the documented plane layout.
                let q = match bits {
                    2 => (g[2 + i % LO] >> (2 * (i / LO))) & 3,
                    3 => {
                        ((g[2 + i % LO] >> (2 * (i / LO))) & 3)
                            | (((g[2 + LO + i % HI] >> (i / HI)) & 1) << 2)
                    }
                    _ => (g[2 + i % NIB] >> (4 * (i / NIB))) & 15,
                };
                out.push(d * q as f32 - m);
            }
        }
        out
    }

    fn random(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
        rng.centered_vec(n)
    }

    #[test]
    fn kernels_equal_the_documented_layout_and_the_naive_product() {
        let mut rng = SplitMix64::new(7);
        for bits in 2..=4 {
            for &(rows, cols) in &[(3, 64), (5, 576), (2, 1536)] {
                let mut w = random(&mut rng, rows * cols);
                // One group far smaller than the rest: the log scale must keep it.
                w[..GROUP].iter_mut().for_each(|v| *v *= 1e-3);
                let data = quantize_rtn(&w, cols, bits);
                assert_eq!(data.len(), rows * row_bytes(bits, cols));
                let mut dec = vec![0.0; rows * cols];
                dequantize(bits, &data, cols, &mut dec);
                let rb = row_bytes(bits, cols);
                for r in 0..rows {
                    let want = naive_decode(bits, &data[r * rb..(r + 1) * rb], cols);
                    assert_eq!(&dec[r * cols..(r + 1) * cols], &want[..]);
                }
                // The chosen grid (least squared error over shrunk ranges) does at least about
                // as well as the full range, whose error is at most half a step everywhere (the
                // log-coded scales move the step by up to 2.2 %).
                let levels = ((1u32 << bits) - 1) as f32;
                for (g, (a, b)) in w
                    .chunks_exact(GROUP)
                    .zip(dec.chunks_exact(GROUP))
                    .enumerate()
                {
                    let half_step = g_range(a) / levels * 0.5 * 1.03;
                    let mse =
                        a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f32>() / GROUP as f32;
                    assert!(
                        mse <= half_step * half_step + 1e-12,
                        "bits {bits} group {g}: {mse} vs {half_step}²"
                    );
                }
                // Both kernels (the dispatching one, AVX2 where the CPU has it, and the portable
                // one) against the decoded rows times the f32 input, within the rounding of the
                // 16-bit activation quants.
                let x = random(&mut rng, cols);
                let mut acts = QuantizedActs::default();
                acts.quantize(&x);
                let format = crate::kernels::WeightFormat::lowbit(bits).expect("2, 3 or 4 bits");
                let mut y = vec![1.0; rows];
                dot_rows(Rows::Blocks(format, &data), &x, acts.view(), &mut y, true);
                for r in 0..rows {
                    let w = &dec[r * cols..(r + 1) * cols];
                    let want: f64 = w.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let bound: f64 = w
                        .iter()
                        .zip(&x)
                        .enumerate()
                        .map(|(j, (a, b))| {
                            (*a as f64).abs() * (acts.d[j / GROUP] as f64 * 0.5 + 1e-5 * *b as f64)
                        })
                        .sum::<f64>()
                        + 1e-6;
                    let scalar = dot_row_scalar(bits, &data[r * rb..(r + 1) * rb], acts.view());
                    for (name, got) in [("kernel", y[r] - 1.0), ("portable", scalar)] {
                        assert!(
                            (got as f64 - want).abs() <= bound,
                            "bits {bits} row {r} {name}: {got} vs {want} (bound {bound})"
                        );
                    }
                }
            }
        }
    }

    fn g_range(g: &[f32]) -> f32 {
        let lo = g.iter().fold(0.0f32, |a, &v| a.min(v));
        let hi = g.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
        hi - lo
    }

    #[test]
    fn scale_codes_round_in_log_space() {
        assert_eq!(scale_code(1.0, 1.0), 0);
        assert_eq!(scale_code(0.5, 1.0), 16);
        assert_eq!(scale_code(0.0, 1.0), 255);
        assert_eq!(scale_code(2.0, 1.0), 0);
        let t = scale_table();
        assert_eq!(t[16], 0.5);
        assert_eq!(t[0], 1.0);
    }
}
