//! Row dot products `out[r] (+)= W[r]·x` for every storage format, with an AVX2 path (runtime
//! detected, in `kernels::x86`) and a portable one that computes the same integer sums.
//!
//! Block formats take the activation quantized to 16 bits per block of 32 ([`QuantizedActs`]):
//! per block, `Σ w·x = d_w·d_x·Σ q_w·q_x` plus the weight offset times `d_x·Σ q_x` (the minimum
//! `m` for Q4_1/Q5_1, `−8·d_w` for Q4_0, `−16·d_w` for Q5_0). The integer sums are exact, so the
//! two paths differ only in float summation order.
//!
//! llama.cpp quantizes activations to 8 bits here. Measured on SmolLM2-135M (256 tokens of
//! lcet10 scored token by token), 8-bit activations raised perplexity by 0.9 % on the Q4_1 file
//! and 1.6 % with Q8_0 weights; 16 bits keep both within 0.1 % of f32 for a few more integer
//! instructions per block (`vpmaddwd` on 16-bit lanes instead of `vpmaddubsw`).

use half::{bf16, f16};

use super::WeightFormat;
use crate::quant::scale_min_k4;

/// Elements per quantization block of every block format here.
pub const BLOCK: usize = 32;

/// An activation vector quantized per block of 32: `x ≈ d·q`, `q ∈ [−32767, 32767]`.
#[derive(Debug, Default, Clone)]
pub struct QuantizedActs {
    /// The quants, one per element.
    pub qs: Vec<i16>,
    /// The same quants reordered per block: the 16 even-index elements, then the 16 odd-index
    /// ones. This is the lane order of the 4-bit kernels, which widen two packed bytes per 16-bit
    /// lane instead of shuffling each byte into its own lane.
    pub split: Vec<i16>,
    /// Per-block scale `d`.
    pub d: Vec<f32>,
    /// Per-block `d·Σq` (what offsets multiply).
    pub s: Vec<f32>,
}

impl QuantizedActs {
    /// Quantizes `x` (length a multiple of 32) in place of the previous contents.
    pub fn quantize(&mut self, x: &[f32]) {
        debug_assert_eq!(x.len() % BLOCK, 0);
        let nb = x.len() / BLOCK;
        self.qs.resize(x.len(), 0);
        self.split.resize(x.len(), 0);
        self.d.resize(nb, 0.0);
        self.s.resize(nb, 0.0);
        #[cfg(target_arch = "x86_64")]
        if simd() {
            // SAFETY: the CPU has the features `simd()` checked for; lengths were set above.
            unsafe { avx2::quantize(x, self) };
            return;
        }
        quantize_scalar(x, self);
    }

    /// All quantized rows as one view (a single activation row, or the caller indexes blocks).
    pub fn view(&self) -> Acts<'_> {
        Acts {
            qs: &self.qs,
            split: &self.split,
            d: &self.d,
            s: &self.s,
        }
    }

    /// Row `i` of activations quantized as `n × cols` (`cols` a multiple of 32).
    pub fn row(&self, i: usize, cols: usize) -> Acts<'_> {
        let (e, b) = (i * cols, i * cols / BLOCK);
        let nb = cols / BLOCK;
        Acts {
            qs: &self.qs[e..e + cols],
            split: &self.split[e..e + cols],
            d: &self.d[b..b + nb],
            s: &self.s[b..b + nb],
        }
    }
}

/// One activation row of a [`QuantizedActs`], as the kernels read it (empty for the float
/// formats, which read the f32 activations).
#[derive(Debug, Clone, Copy, Default)]
pub struct Acts<'a> {
    /// Quants in element order.
    pub qs: &'a [i16],
    /// Quants in the split order of [`QuantizedActs::split`].
    pub split: &'a [i16],
    /// Per-block scales.
    pub d: &'a [f32],
    /// Per-block `d·Σq`.
    pub s: &'a [f32],
}

/// The portable activation quantizer (the AVX2 one gives the same quants).
pub(crate) fn quantize_scalar(x: &[f32], a: &mut QuantizedActs) {
    for (b, (xb, qb)) in x
        .chunks_exact(BLOCK)
        .zip(a.qs.chunks_exact_mut(BLOCK))
        .enumerate()
    {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 32767.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in qb.iter_mut().zip(xb) {
            let r = (v * id).round_ties_even() as i32;
            *q = r as i16;
            sum += r;
        }
        a.d[b] = d;
        a.s[b] = d * sum as f32;
        let sb = &mut a.split[b * BLOCK..(b + 1) * BLOCK];
        for (j, &q) in qb.iter().enumerate() {
            sb[j / 2 + (j % 2) * 16] = q;
        }
    }
}

/// Whether the AVX2 + FMA + F16C kernels run on this CPU (`S2LC_NO_SIMD=1` turns them off).
pub fn simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::env::var_os("S2LC_NO_SIMD").is_none()
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Consecutive weight rows of one format.
#[derive(Debug, Clone, Copy)]
pub enum Rows<'a> {
    /// f32 values, `rows × cols`.
    F32(&'a [f32]),
    /// Raw little-endian blocks of a non-f32 format, `rows × row_bytes`.
    Blocks(WeightFormat, &'a [u8]),
}

/// `out[r] = W[r]·x` (or `+=` with `add`) for the `out.len()` rows in `rows`, each `x.len()` wide.
/// `acts` must hold `x` quantized when the format is a block format.
///
/// # Panics
/// If `rows` holds fewer than `out.len()` rows of `x.len()` values, or `acts` fewer blocks than
/// one row of a block format (checked once per call, SIMD or not).
pub fn dot_rows(rows: Rows<'_>, x: &[f32], acts: Acts<'_>, out: &mut [f32], add: bool) {
    assert!(
        rows_cover(rows, x.len(), out.len()) && acts_cover(rows, acts, x.len() / BLOCK),
        "dot_rows: weights or quantized activations shorter than {} rows of {} values",
        out.len(),
        x.len()
    );
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: `simd()` checked the CPU features; the assert above is the kernels' contract
        // (`out.len()` rows of `x.len()` values in `rows`, `x.len() / 32` blocks in `acts`).
        unsafe { avx2::dot_rows(rows, x, acts, out, add) };
        return;
    }
    dot_rows_scalar(rows, x, acts, out, add);
}

/// Whether `rows` holds at least `n` rows of `cols` values.
pub(super) fn rows_cover(rows: Rows<'_>, cols: usize, n: usize) -> bool {
    let (len, row) = match rows {
        Rows::F32(w) => (w.len(), cols),
        Rows::Blocks(format, data) => (data.len(), format.row_bytes(cols)),
    };
    n.checked_mul(row).is_some_and(|need| need <= len)
}

/// Whether `a` holds `nb` quantized blocks in every array, or `rows` is a float format (which
/// does not read them).
pub(super) fn acts_cover(rows: Rows<'_>, a: Acts<'_>, nb: usize) -> bool {
    let quantized = match rows {
        Rows::F32(_) => false,
        Rows::Blocks(format, _) => format.quantizes_acts(),
    };
    !quantized || acts_hold(a, nb)
}

/// Whether `a` holds `nb` blocks: scales, sums and quants in both orders.
pub(super) fn acts_hold(a: Acts<'_>, nb: usize) -> bool {
    let elems = nb.saturating_mul(BLOCK);
    a.d.len() >= nb && a.s.len() >= nb && a.qs.len() >= elems && a.split.len() >= elems
}

/// `out[i·stride + r] (+)= W[r]·x_i` for every weight row `r` in `rows` and the 2 or 4
/// activation rows in `acts`, each block decoded once for all of them; `false` (nothing written)
/// when this CPU, format or count has no multi-row kernel (the caller then runs [`dot_rows`]
/// per activation row, which gives the same values bit for bit).
///
/// # Safety
/// `out` must be valid for writes at `i·stride + r` for every activation row `i` and weight row
/// `r`, with no other reference to those elements.
///
/// # Panics
/// If `rows` is in a format of blocks of 32 and an activation row holds fewer than `cols / 32`
/// quantized blocks.
pub unsafe fn dot_rows_multi(
    rows: Rows<'_>,
    cols: usize,
    acts: &[Acts<'_>],
    out: *mut f32,
    stride: usize,
    add: bool,
) -> bool {
    // Once per call (here, not in the kernel, whose code it would change): what a multi-row
    // kernel reads of each activation row.
    assert!(
        !matches!(rows, Rows::Blocks(f, _) if f.block_size() == BLOCK)
            || acts.iter().all(|&a| acts_hold(a, cols / BLOCK)),
        "dot_rows_multi: quantized activations shorter than {cols} values"
    );
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: `simd()` checked the CPU features, the activations were checked above, and
        // the caller vouches for `out`; the kernel reads only whole rows of `rows`.
        return unsafe { avx2::dot_rows_multi(rows, cols, acts, out, stride, add) };
    }
    let _ = (rows, cols, acts, out, stride, add);
    false
}

/// Decodes whole rows of `format` into f32 with AVX2 (every format with a kernel: prefill tiles
/// and embedding rows); false means the caller must use the generic decoder. Results equal `quant::dequantize` bit for bit (same operation order).
pub fn dequantize_fast(format: WeightFormat, bytes: &[u8], out: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if simd() && format.ggml().is_some() {
        let n = out.len();
        if bytes.len() != format.row_bytes(n) || n % format.block_size() != 0 {
            return false;
        }
        // SAFETY: features checked; `bytes` holds exactly the blocks of `out.len()` values.
        return unsafe { avx2::dequantize(format, bytes, out) };
    }
    let _ = (format, bytes, out);
    false
}

fn store(o: &mut f32, v: f32, add: bool) {
    if add {
        *o += v;
    } else {
        *o = v;
    }
}

fn f16_le(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// The portable kernels: the same per-block integer sums as the AVX2 ones.
pub fn dot_rows_scalar(rows: Rows<'_>, x: &[f32], a: Acts<'_>, out: &mut [f32], add: bool) {
    let cols = x.len();
    match rows {
        Rows::F32(w) => {
            for (o, row) in out.iter_mut().zip(w.chunks_exact(cols)) {
                store(o, row.iter().zip(x).map(|(w, x)| w * x).sum(), add);
            }
        }
        Rows::Blocks(format, data) => {
            let row_bytes = format.row_bytes(cols);
            for (o, row) in out.iter_mut().zip(data.chunks_exact(row_bytes)) {
                let v = match format {
                    WeightFormat::F32 => unreachable!("f32 rows are passed as Rows::F32"),
                    WeightFormat::F16 => {
                        row.chunks_exact(2).zip(x).map(|(b, x)| f16_le(b) * x).sum()
                    }
                    WeightFormat::BF16 => row
                        .chunks_exact(2)
                        .zip(x)
                        .map(|(b, x)| bf16::from_le_bytes([b[0], b[1]]).to_f32() * x)
                        .sum(),
                    WeightFormat::Q4_K => dot_q4_k_scalar(row, a),
                    WeightFormat::Q6_K => dot_q6_k_scalar(row, a),
                    WeightFormat::Sq2 => super::lowbit::dot_row_scalar(2, row, a),
                    WeightFormat::Sq3 => super::lowbit::dot_row_scalar(3, row, a),
                    WeightFormat::Sq4 => super::lowbit::dot_row_scalar(4, row, a),
                    _ => dot_blocks_scalar(format, row, a),
                };
                store(o, v, add);
            }
        }
    }
}

/// One block row against quantized activations: `Σ_b (d_w·d_x·Σ q_w·q_x + offset_b·s_b)`.
fn dot_blocks_scalar(format: WeightFormat, row: &[u8], a: Acts<'_>) -> f32 {
    let bytes = format.block_bytes();
    let mut total = 0.0f32;
    for (b, blk) in row.chunks_exact(bytes).enumerate() {
        let xq = &a.qs[b * BLOCK..][..BLOCK];
        let d = f16_le(blk);
        let (isum, offset) = match format {
            WeightFormat::Q8_0 => {
                let s: i32 = blk[2..]
                    .iter()
                    .zip(xq)
                    .map(|(&w, &x)| w as i8 as i32 * x as i32)
                    .sum();
                (s, 0.0)
            }
            WeightFormat::Q4_0 => (nibble_dot(&blk[2..], 0, xq), -8.0 * d),
            WeightFormat::Q4_1 => (nibble_dot(&blk[4..], 0, xq), f16_le(&blk[2..])),
            WeightFormat::Q5_0 => (nibble_dot(&blk[6..], u32_le(&blk[2..]), xq), -16.0 * d),
            WeightFormat::Q5_1 => (
                nibble_dot(&blk[8..], u32_le(&blk[4..]), xq),
                f16_le(&blk[2..]),
            ),
            WeightFormat::F32
            | WeightFormat::F16
            | WeightFormat::BF16
            | WeightFormat::Q4_K
            | WeightFormat::Q6_K
            | WeightFormat::Sq2
            | WeightFormat::Sq3
            | WeightFormat::Sq4 => unreachable!("not a block format of 32"),
        };
        total += d * a.d[b] * isum as f32 + offset * a.s[b];
    }
    total
}

/// Bytes of a Q4_K super-block (256 elements): `d, dmin: f16 | scales: [u8; 12] | qs: [u8; 128]`.
pub(super) const Q4_K_BYTES: usize = 144;

/// One Q4_K row: per sub-block `j` of 32 (activation block `b`), `Σ w·x = d·sc_j·d_x·Σ q·q_x −
/// dmin·m_j·d_x·Σ q_x`. Group `g` of 64 uses `qs[32g..32g+32]`: low nibbles are sub-block `2g`,
/// high nibbles sub-block `2g + 1`.
fn dot_q4_k_scalar(row: &[u8], a: Acts<'_>) -> f32 {
    let mut total = 0.0f32;
    for (sb, blk) in row.chunks_exact(Q4_K_BYTES).enumerate() {
        let (d, dmin) = (f16_le(blk), f16_le(&blk[2..]));
        let (scales, qs) = blk[4..].split_at(12);
        for g in 0..4 {
            let q = &qs[32 * g..32 * g + 32];
            for (half, shift) in [(0, 0), (1, 4)] {
                let j = 2 * g + half;
                let b = 8 * sb + j;
                let xq = &a.qs[b * BLOCK..][..BLOCK];
                let isum: i32 = q
                    .iter()
                    .zip(xq)
                    .map(|(&w, &x)| ((w >> shift) & 0x0F) as i32 * x as i32)
                    .sum();
                let (sc, m) = scale_min_k4(j, scales);
                total += d * sc as f32 * a.d[b] * isum as f32 - dmin * m as f32 * a.s[b];
            }
        }
    }
    total
}

/// Bytes of a Q6_K super-block (256 elements): `ql: [u8; 128] | qh: [u8; 64] | scales: [i8; 16]
/// | d: f16` (the layout is spelled out at `quant::kquants::block_q6_k`).
pub(super) const Q6_K_BYTES: usize = 210;

/// The 6-bit quant (0..64) of element `e` (0..256) of a Q6_K super-block: element `128h + 32k + l`
/// takes a nibble of `ql[64h + 32(k % 2) + l]` (low for `k < 2`) and bits `2k..2k+2` of
/// `qh[32h + l]`.
fn q6_k_quant(blk: &[u8], e: usize) -> i32 {
    let (h, k, l) = (e / 128, e % 128 / 32, e % 32);
    let ql = blk[64 * h + 32 * (k % 2) + l];
    let nibble = if k < 2 { ql & 0x0F } else { ql >> 4 };
    let high = (blk[128 + 32 * h + l] >> (2 * k)) & 3;
    (nibble | (high << 4)) as i32
}

/// One Q6_K row: per sub-block of 16 with int8 scale `sc`, `Σ w·x = d·sc·d_x·Σ (q − 32)·q_x`
/// (activation block `b` holds two sub-blocks).
fn dot_q6_k_scalar(row: &[u8], a: Acts<'_>) -> f32 {
    let mut total = 0.0f32;
    for (sb, blk) in row.chunks_exact(Q6_K_BYTES).enumerate() {
        let d = f16_le(&blk[208..]);
        for j in 0..16 {
            let b = 8 * sb + j / 2;
            let isum: i32 = (16 * j..16 * j + 16)
                .map(|e| (q6_k_quant(blk, e) - 32) * a.qs[256 * sb + e] as i32)
                .sum();
            total += d * blk[192 + j] as i8 as f32 * a.d[b] * isum as f32;
        }
    }
    total
}

fn u32_le(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// `Σ q_j·x_j` for 4-bit quants in `qs` (element `j < 16` low nibble of `qs[j]`, `j + 16` its high
/// nibble) with bit `j` of `qh` as bit 4 (zero for the 4-bit formats).
fn nibble_dot(qs: &[u8], qh: u32, xq: &[i16]) -> i32 {
    let mut s = 0i32;
    for j in 0..16 {
        let lo = (qs[j] & 0x0F) as i32 | ((((qh >> j) & 1) as i32) << 4);
        let hi = (qs[j] >> 4) as i32 | ((((qh >> (j + 16)) & 1) as i32) << 4);
        s += lo * xq[j] as i32 + hi * xq[j + 16] as i32;
    }
    s
}

#[cfg(target_arch = "x86_64")]
use super::x86 as avx2;
