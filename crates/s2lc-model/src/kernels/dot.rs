//! Row dot products `out[r] (+)= W[r]·x` for every storage format, with an AVX2 path (runtime
//! detected) and a portable one that computes the same integer sums.
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
fn rows_cover(rows: Rows<'_>, cols: usize, n: usize) -> bool {
    let (len, row) = match rows {
        Rows::F32(w) => (w.len(), cols),
        Rows::Blocks(format, data) => (data.len(), format.row_bytes(cols)),
    };
    n.checked_mul(row).is_some_and(|need| need <= len)
}

/// Whether `a` holds `nb` quantized blocks in every array, or `rows` is a float format (which
/// does not read them).
fn acts_cover(rows: Rows<'_>, a: Acts<'_>, nb: usize) -> bool {
    let quantized = match rows {
        Rows::F32(_) => false,
        Rows::Blocks(format, _) => !matches!(format, WeightFormat::F16 | WeightFormat::BF16),
    };
    !quantized || acts_hold(a, nb)
}

/// Whether `a` holds `nb` blocks: scales, sums and quants in both orders.
fn acts_hold(a: Acts<'_>, nb: usize) -> bool {
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
    if simd() {
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
            | WeightFormat::Q6_K => unreachable!("not a block format of 32"),
        };
        total += d * a.d[b] * isum as f32 + offset * a.s[b];
    }
    total
}

/// Bytes of a Q4_K super-block (256 elements): `d, dmin: f16 | scales: [u8; 12] | qs: [u8; 128]`.
const Q4_K_BYTES: usize = 144;

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
/// | d: f16` (the layout is spelled out at `quant::block_q6_k`).
const Q6_K_BYTES: usize = 210;

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
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use super::{Acts, QuantizedActs, Rows, BLOCK};
    use crate::kernels::WeightFormat;

    /// The sum of the eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// Two f16 values (`d`, then `m`) at `p` as f32.
    ///
    /// # Safety
    /// `p` must be valid for reads of 4 bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16_pair(p: *const u8) -> (f32, f32) {
        // SAFETY: the caller guarantees 4 readable bytes at `p`; the read is unaligned.
        let bits = unsafe { p.cast::<i32>().read_unaligned() };
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
        (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
    }

    /// One f16 value at `p` as f32.
    ///
    /// # Safety
    /// `p` must be valid for reads of 2 bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16_one(p: *const u8) -> f32 {
        // SAFETY: the caller guarantees 2 readable bytes at `p`; the read is unaligned.
        let bits = unsafe { p.cast::<u16>().read_unaligned() } as i32;
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
    }

    /// 32 quants as two vectors of sixteen 16-bit lanes (elements 0..16, 16..32).
    #[derive(Clone, Copy)]
    struct Quants(__m256i, __m256i);

    /// 16 bytes of packed nibbles (element `j < 16` low nibble of byte `j`, `j + 16` its high
    /// nibble), widened to 16 bits.
    ///
    /// # Safety
    /// `p` must be valid for reads of 16 bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibbles(p: *const u8) -> Quants {
        // SAFETY: the caller guarantees 16 readable bytes at `p`; the load is unaligned.
        let b = unsafe { _mm_loadu_si128(p.cast()) };
        let m = _mm_set1_epi8(0x0F);
        Quants(
            _mm256_cvtepu8_epi16(_mm_and_si128(b, m)),
            _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), m)),
        )
    }

    /// The same 16 bytes of nibbles in the order of [`QuantizedActs::split`], without a shuffle:
    /// the bytes are loaded into both 128-bit halves, so 16-bit lane `k` holds bytes `2k` and
    /// `2k + 1`. The first vector is the even elements (`0, 2, …, 14 | 16, 18, …, 30`), the second
    /// the odd ones; lanes of the upper half (elements ≥ 16, high nibbles) are masked in place
    /// and so hold 16 × their quant — the caller divides that half's sum by 16 once per row.
    ///
    /// # Safety
    /// `p` must be valid for reads of 16 bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibbles_split(p: *const u8) -> Quants {
        // SAFETY: the caller guarantees 16 readable bytes at `p`; the load is unaligned.
        let b = _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(p.cast()) });
        let m = _mm256_setr_epi16(
            0x0F, 0x0F, 0x0F, 0x0F, 0x0F, 0x0F, 0x0F, 0x0F, 0xF0, 0xF0, 0xF0, 0xF0, 0xF0, 0xF0,
            0xF0, 0xF0,
        );
        Quants(
            _mm256_and_si256(b, m),
            _mm256_and_si256(_mm256_srli_epi16(b, 8), m),
        )
    }

    /// Bit `j` of `bits` as 16-bit lane `j` (of elements 0..32) = 0x10 (set) or 0 (clear).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn high_bits(bits: u32) -> Quants {
        // Multiplying lane j by 2^(15 − j) moves bit j to the sign bit (AVX2 has no per-lane
        // 16-bit shift); an arithmetic shift then fills the lane with it.
        let powers = _mm256_setr_epi16(
            -32768, 16384, 8192, 4096, 2048, 1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1,
        );
        let expand = |half: u32| {
            let lanes = _mm256_mullo_epi16(_mm256_set1_epi16(half as u16 as i16), powers);
            _mm256_and_si256(_mm256_srai_epi16(lanes, 15), _mm256_set1_epi16(0x10))
        };
        Quants(expand(bits & 0xFFFF), expand(bits >> 16))
    }

    /// The fifth bits of a Q5 block (`qh`, 4 bytes at `p`: bit `j` for element `j`) in the lane
    /// order of [`nibbles_split`]: 0x10 in the lower half, 0x100 in the upper half (whose lanes
    /// carry 16 × the quant). A byte shuffle gives lane `k` the `qh` byte holding its bit; an
    /// AND and a compare with that bit's mask turn it into a full lane.
    ///
    /// # Safety
    /// `p` must be valid for reads of 4 bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn high_bits_split(p: *const u8) -> Quants {
        // SAFETY: the caller guarantees 4 readable bytes at `p`; the read is unaligned.
        let qh = _mm256_set1_epi32(unsafe { p.cast::<i32>().read_unaligned() });
        // Even lane k < 8 is element 2k: bit 2k, in byte k/4; lane 8 + k is element 16 + 2k.
        let bytes = _mm256_shuffle_epi8(
            qh,
            _mm256_setr_epi8(
                0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3,
                3, 3, 3, 3,
            ),
        );
        let even = _mm256_setr_epi16(1, 4, 16, 64, 1, 4, 16, 64, 1, 4, 16, 64, 1, 4, 16, 64);
        let odd = _mm256_slli_epi16(even, 1);
        let value = _mm256_setr_epi16(
            0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x100, 0x100, 0x100, 0x100, 0x100,
            0x100, 0x100, 0x100,
        );
        let pick = |bit: __m256i| {
            let set = _mm256_cmpeq_epi16(_mm256_and_si256(bytes, bit), bit);
            _mm256_and_si256(set, value)
        };
        Quants(pick(even), pick(odd))
    }

    /// `Σ q·x` over 32 quant × activation pairs, as eight i32 lanes converted to f32.
    ///
    /// # Safety
    /// `x` must be valid for reads of 32 `i16`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn qdot(q: Quants, x: *const i16) -> __m256 {
        // SAFETY: the caller guarantees 32 readable i16 at `x`; the loads are unaligned.
        let (x0, x1) = unsafe {
            (
                _mm256_loadu_si256(x.cast()),
                _mm256_loadu_si256(x.add(16).cast()),
            )
        };
        let lo = _mm256_madd_epi16(q.0, x0);
        let hi = _mm256_madd_epi16(q.1, x1);
        _mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn or(a: Quants, b: Quants) -> Quants {
        Quants(_mm256_or_si256(a.0, b.0), _mm256_or_si256(a.1, b.1))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn put(o: &mut f32, v: f32, add: bool) {
        if add {
            *o += v;
        } else {
            *o = v;
        }
    }

    /// [`super::dot_rows`] with AVX2.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; `rows` must hold `out.len()` rows of `x.len()`
    /// values and, for a block format other than f16/bf16, `a` must hold `x.len() / 32` blocks
    /// (what `super::dot_rows` asserts).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows(rows: Rows<'_>, x: &[f32], a: Acts<'_>, out: &mut [f32], add: bool) {
        let cols = x.len();
        debug_assert!(super::rows_cover(rows, cols, out.len()));
        debug_assert!(super::acts_cover(rows, a, cols / BLOCK));
        match rows {
            Rows::F32(w) => {
                for (r, o) in out.iter_mut().enumerate() {
                    // SAFETY: row r < out.len() of `cols` values lies inside `w` (contract).
                    put(o, unsafe { dot_f32(w.as_ptr().add(r * cols), x) }, add);
                }
            }
            Rows::Blocks(format, data) => {
                let rb = format.row_bytes(cols);
                let nb = cols / BLOCK;
                let kernel: unsafe fn(*const u8, usize, &[f32], Acts<'_>) -> f32 = match format {
                    WeightFormat::F32 => unreachable!("f32 rows are passed as Rows::F32"),
                    WeightFormat::F16 => dot_f16,
                    WeightFormat::BF16 => dot_bf16,
                    WeightFormat::Q8_0 => dot_q8_0,
                    WeightFormat::Q4_0 => dot_q4_0,
                    WeightFormat::Q4_1 => dot_q4_1,
                    WeightFormat::Q5_0 => dot_q5_0,
                    WeightFormat::Q5_1 => dot_q5_1,
                    WeightFormat::Q4_K => dot_q4_k,
                    WeightFormat::Q6_K => dot_q6_k,
                };
                for (r, o) in out.iter_mut().enumerate() {
                    // SAFETY: row r < out.len() (`rb` bytes: `nb` blocks of 32, `nb / 8` of 256,
                    // or `cols` f16 values) lies inside `data`, and `a` holds `nb` blocks
                    // (contract).
                    let v = unsafe { kernel(data.as_ptr().add(r * rb), nb, x, a) };
                    put(o, v, add);
                }
            }
        }
    }

    /// Sums `f(k)·x[k..k+8]` products with four accumulators, then the scalar tail via `tail`.
    /// Expands to unsafe loads of `x` (indices `< x.len()`): the caller wraps it in `unsafe`.
    macro_rules! float_dot {
        ($x:expr, $load:expr, $tail:expr) => {{
            let x: &[f32] = $x;
            let n = x.len();
            let xp = x.as_ptr();
            let (mut a0, mut a1, mut a2, mut a3) = (
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
            );
            let mut k = 0;
            while k + 32 <= n {
                a0 = _mm256_fmadd_ps($load(k), _mm256_loadu_ps(xp.add(k)), a0);
                a1 = _mm256_fmadd_ps($load(k + 8), _mm256_loadu_ps(xp.add(k + 8)), a1);
                a2 = _mm256_fmadd_ps($load(k + 16), _mm256_loadu_ps(xp.add(k + 16)), a2);
                a3 = _mm256_fmadd_ps($load(k + 24), _mm256_loadu_ps(xp.add(k + 24)), a3);
                k += 32;
            }
            while k + 8 <= n {
                a0 = _mm256_fmadd_ps($load(k), _mm256_loadu_ps(xp.add(k)), a0);
                k += 8;
            }
            let mut s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
            while k < n {
                s += $tail(k) * x[k];
                k += 1;
            }
            s
        }};
    }

    /// `w·x` for one f32 row.
    ///
    /// # Safety
    /// `w` must be valid for reads of `x.len()` f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_f32(w: *const f32, x: &[f32]) -> f32 {
        // SAFETY: `float_dot` reads indices k < x.len() of `x` and of `w` (contract).
        unsafe { float_dot!(x, |k| _mm256_loadu_ps(w.add(k)), |k| *w.add(k)) }
    }

    /// `w·x` for one f16 row at `p` (the block kernels' signature; blocks and acts unused).
    ///
    /// # Safety
    /// `p` must be valid for reads of `2·x.len()` bytes.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_f16(p: *const u8, _nb: usize, x: &[f32], _a: Acts<'_>) -> f32 {
        let w = p.cast::<u16>();
        // SAFETY: `float_dot` reads indices k < x.len() of `x` and of the `x.len()` u16 at `w`
        // (contract).
        unsafe {
            float_dot!(
                x,
                |k| _mm256_cvtph_ps(_mm_loadu_si128(w.add(k).cast())),
                |k| f16_one(w.add(k).cast())
            )
        }
    }

    /// `w·x` for one bf16 row at `p` (the block kernels' signature; blocks and acts unused).
    ///
    /// # Safety
    /// `p` must be valid for reads of `2·x.len()` bytes.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_bf16(p: *const u8, _nb: usize, x: &[f32], _a: Acts<'_>) -> f32 {
        let w = p.cast::<u16>();
        // SAFETY: `float_dot` reads indices k < x.len() of `x` and of the `x.len()` u16 at `w`
        // (contract).
        unsafe {
            let widen = |k: usize| {
                let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(w.add(k).cast()));
                _mm256_castsi256_ps(_mm256_slli_epi32(h, 16))
            };
            float_dot!(x, widen, |k| f32::from_bits(
                (w.add(k).read_unaligned() as u32) << 16
            ))
        }
    }

    /// The shared loop of the block kernels, two blocks per step: `decode(block) -> (quants, d_w,
    /// offset)` against the activation quants `$xq` (natural or split order); `$lanes` weighs the
    /// eight lanes of the sum at the end (the split order's upper half carries a factor 16).
    /// The enclosing kernel's contract: `$p` points at `$nb` blocks of `$bytes` bytes and `$a`
    /// holds `$nb` blocks.
    macro_rules! block_dot {
        ($p:expr, $nb:expr, $a:expr, $xq:expr, $lanes:expr, $bytes:expr, $decode:expr) => {{
            let (a, p): (Acts<'_>, *const u8) = ($a, $p);
            let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let (mut off0, mut off1) = (0.0f32, 0.0f32);
            let (xq, xd, xs): (*const i16, _, _) = ($xq, a.d.as_ptr(), a.s.as_ptr());
            debug_assert!(super::acts_hold(a, $nb));
            let mut b = 0;
            // SAFETY: only blocks b < $nb of the weights and of the activations are read (the
            // kernel's contract). The prefetch address runs up to 1 KB past the weights on the
            // last blocks: it is formed with `wrapping_add`, and a prefetch never faults.
            unsafe {
                while b + 2 <= $nb {
                    // Weights stream once per token: fetch ~1 KB ahead of use.
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(b * $bytes + 1024).cast());
                    let (q0, d0, o0) = $decode(p.add(b * $bytes));
                    let (q1, d1, o1) = $decode(p.add((b + 1) * $bytes));
                    let p0 = qdot(q0, xq.add(b * BLOCK));
                    let p1 = qdot(q1, xq.add((b + 1) * BLOCK));
                    acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d0 * *xd.add(b)), p0, acc0);
                    acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d1 * *xd.add(b + 1)), p1, acc1);
                    off0 += o0 * *xs.add(b);
                    off1 += o1 * *xs.add(b + 1);
                    b += 2;
                }
                if b < $nb {
                    let (q0, d0, o0) = $decode(p.add(b * $bytes));
                    let p0 = qdot(q0, xq.add(b * BLOCK));
                    acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d0 * *xd.add(b)), p0, acc0);
                    off0 += o0 * *xs.add(b);
                }
            }
            hsum(_mm256_mul_ps(_mm256_add_ps(acc0, acc1), $lanes)) + (off0 + off1)
        }};
    }

    /// [`block_dot`] for `$n` activation rows at once: each weight block is decoded once and
    /// dotted with every row. Per row, the operations and their order are those of
    /// `block_dot`, so each result is bit for bit the single-row one. The enclosing kernel's
    /// contract: `$p` points at `$nb` blocks of `$bytes` bytes and each of the `$n` rows of
    /// `$acts` holds `$nb` blocks.
    macro_rules! block_dot_n {
        ($n:literal, $p:expr, $nb:expr, $acts:expr, $split:expr, $lanes:expr, $bytes:expr, $decode:expr) => {{
            let (acts, p): (&[Acts<'_>], *const u8) = ($acts, $p);
            let x: [*const i16; $n] = std::array::from_fn(|i| {
                debug_assert!(super::acts_hold(acts[i], $nb));
                if $split {
                    acts[i].split.as_ptr()
                } else {
                    acts[i].qs.as_ptr()
                }
            });
            let xd: [*const f32; $n] = std::array::from_fn(|i| acts[i].d.as_ptr());
            let xs: [*const f32; $n] = std::array::from_fn(|i| acts[i].s.as_ptr());
            let mut acc0 = [_mm256_setzero_ps(); $n];
            let mut acc1 = [_mm256_setzero_ps(); $n];
            let (mut off0, mut off1) = ([0.0f32; $n], [0.0f32; $n]);
            let mut b = 0;
            // SAFETY: as in `block_dot`: blocks b < $nb of the weights and of each row's
            // activations (the kernel's contract); the prefetch address, possibly past the
            // weights, is formed with `wrapping_add` and never read.
            unsafe {
                while b + 2 <= $nb {
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(b * $bytes + 1024).cast());
                    let (q0, d0, o0) = $decode(p.add(b * $bytes));
                    let (q1, d1, o1) = $decode(p.add((b + 1) * $bytes));
                    for i in 0..$n {
                        let p0 = qdot(q0, x[i].add(b * BLOCK));
                        let p1 = qdot(q1, x[i].add((b + 1) * BLOCK));
                        acc0[i] = _mm256_fmadd_ps(_mm256_set1_ps(d0 * *xd[i].add(b)), p0, acc0[i]);
                        acc1[i] =
                            _mm256_fmadd_ps(_mm256_set1_ps(d1 * *xd[i].add(b + 1)), p1, acc1[i]);
                        off0[i] += o0 * *xs[i].add(b);
                        off1[i] += o1 * *xs[i].add(b + 1);
                    }
                    b += 2;
                }
                if b < $nb {
                    let (q0, d0, o0) = $decode(p.add(b * $bytes));
                    for i in 0..$n {
                        let p0 = qdot(q0, x[i].add(b * BLOCK));
                        acc0[i] = _mm256_fmadd_ps(_mm256_set1_ps(d0 * *xd[i].add(b)), p0, acc0[i]);
                        off0[i] += o0 * *xs[i].add(b);
                    }
                }
            }
            let lanes = $lanes;
            let out: [f32; $n] = std::array::from_fn(|i| {
                hsum(_mm256_mul_ps(_mm256_add_ps(acc0[i], acc1[i]), lanes)) + (off0[i] + off1[i])
            });
            out
        }};
    }

    /// One weight row in block format `f` against 2 or 4 activation rows (`acts.len()`); `None`
    /// for formats or counts without a multi-row kernel.
    ///
    /// # Safety
    /// `p` must be valid for reads of `nb` blocks of `f`, and every row of `acts` must hold `nb`
    /// blocks.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_multi(
        f: WeightFormat,
        p: *const u8,
        nb: usize,
        acts: &[Acts<'_>],
    ) -> Option<[f32; 4]> {
        macro_rules! run {
            ($split:expr, $lanes:expr, $bytes:expr, $decode:expr) => {
                match acts.len() {
                    4 => block_dot_n!(4, p, nb, acts, $split, $lanes, $bytes, $decode),
                    2 => {
                        let [a, b] = block_dot_n!(2, p, nb, acts, $split, $lanes, $bytes, $decode);
                        [a, b, 0.0, 0.0]
                    }
                    _ => return None,
                }
            };
        }
        Some(match f {
            WeightFormat::Q4_0 => run!(true, split_lanes(), 18, q4_0_block),
            WeightFormat::Q4_1 => run!(true, split_lanes(), 20, q4_1_block),
            WeightFormat::Q5_0 => run!(true, split_lanes(), 22, q5_0_block),
            WeightFormat::Q5_1 => run!(true, split_lanes(), 24, q5_1_block),
            WeightFormat::Q8_0 => run!(false, _mm256_set1_ps(1.0), 34, q8_0_block),
            _ => return None,
        })
    }

    /// `out[i·stride + r] (+)= W[r]·x_i` for the rows in `rows` and the 2 or 4 activation rows
    /// in `acts`; false (nothing written) when the format or count has no multi-row kernel.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; every row of `acts` must hold `cols / 32` blocks
    /// (what `super::dot_rows_multi` asserts); `out` as for [`super::dot_rows_multi`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows_multi(
        rows: Rows<'_>,
        cols: usize,
        acts: &[Acts<'_>],
        out: *mut f32,
        stride: usize,
        add: bool,
    ) -> bool {
        let Rows::Blocks(format, data) = rows else {
            return false;
        };
        if !matches!(acts.len(), 2 | 4) || format.block_size() != BLOCK {
            return false;
        }
        let rb = format.row_bytes(cols);
        let nb = cols / BLOCK;
        debug_assert!(acts.iter().all(|&a| super::acts_hold(a, nb)));
        for r in 0..data.len() / rb {
            // SAFETY: row r of `data.len() / rb` whole rows holds `nb` blocks, and so does every
            // activation row (contract).
            let Some(v) = (unsafe { dot_multi(format, data.as_ptr().add(r * rb), nb, acts) })
            else {
                return false;
            };
            for (i, v) in v.iter().take(acts.len()).enumerate() {
                // SAFETY: the caller vouches for `out` at `i·stride + r` (activation row i, weight
                // row r), with no other reference to it.
                put(unsafe { &mut *out.add(i * stride + r) }, *v, add);
            }
        }
        true
    }

    // The block decoders below share one contract (`# Safety`): `blk` must be valid for reads
    // of one whole block of their format (18, 20, 22, 24 or 34 bytes).

    /// Q4_0 block at `blk`: quants in split order, `d`, and the offset `−8·d`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_0_block(blk: *const u8) -> (Quants, f32, f32) {
        // SAFETY: `d` is bytes 0..2 and the quants 2..18 of the block (contract).
        unsafe {
            let d = f16_one(blk);
            (nibbles_split(blk.add(2)), d, -8.0 * d)
        }
    }

    /// Q4_1 block: quants in split order, `d`, and the minimum `m`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_1_block(blk: *const u8) -> (Quants, f32, f32) {
        // SAFETY: `d, m` are bytes 0..4 and the quants 4..20 of the block (contract).
        unsafe {
            let (d, m) = f16_pair(blk);
            (nibbles_split(blk.add(4)), d, m)
        }
    }

    /// Q5_0 block: 5-bit quants in split order, `d`, and the offset `−16·d`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q5_0_block(blk: *const u8) -> (Quants, f32, f32) {
        // SAFETY: `d` is bytes 0..2, `qh` 2..6 and the quants 6..22 of the block (contract).
        unsafe {
            let d = f16_one(blk);
            let q = or(nibbles_split(blk.add(6)), high_bits_split(blk.add(2)));
            (q, d, -16.0 * d)
        }
    }

    /// Q5_1 block: 5-bit quants in split order, `d`, and the minimum `m`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q5_1_block(blk: *const u8) -> (Quants, f32, f32) {
        // SAFETY: `d, m` are bytes 0..4, `qh` 4..8 and the quants 8..24 of the block (contract).
        unsafe {
            let (d, m) = f16_pair(blk);
            (
                or(nibbles_split(blk.add(8)), high_bits_split(blk.add(4))),
                d,
                m,
            )
        }
    }

    /// Q8_0 block: quants in element order, `d`, no offset.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0_block(blk: *const u8) -> (Quants, f32, f32) {
        // SAFETY: `d` is bytes 0..2 and the quants 2..34 of the block (contract).
        unsafe {
            let w = Quants(
                _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(2).cast())),
                _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(18).cast())),
            );
            (w, f16_one(blk), 0.0)
        }
    }

    /// Lane weights undoing [`nibbles_split`]'s factor 16 on the upper half.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn split_lanes() -> __m256 {
        _mm256_setr_ps(1.0, 1.0, 1.0, 1.0, 0.0625, 0.0625, 0.0625, 0.0625)
    }

    // The row kernels `dot_q4_0` … `dot_q6_k` share one contract (`# Safety`): `p` must be valid
    // for reads of one row of `nb` blocks of 32 (`nb / 8` super-blocks of 256 for the K-quants)
    // and `a` must hold `nb` blocks (checked by `super::dot_rows`).

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q4_0(p: *const u8, nb: usize, _x: &[f32], a: Acts<'_>) -> f32 {
        block_dot!(p, nb, a, a.split.as_ptr(), split_lanes(), 18, q4_0_block)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q4_1(p: *const u8, nb: usize, _x: &[f32], a: Acts<'_>) -> f32 {
        block_dot!(p, nb, a, a.split.as_ptr(), split_lanes(), 20, q4_1_block)
    }

    /// Q4_K (see `dot_q4_k_scalar`): the 32 bytes of a 64-element group are loaded once; as
    /// 16-bit lanes, masks and shifts give the even and odd elements of both sub-blocks in the
    /// split order of the activations, with no shuffle.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q4_k(p: *const u8, nb: usize, _x: &[f32], a: Acts<'_>) -> f32 {
        use super::Q4_K_BYTES;
        use crate::quant::scale_min_k4;
        let (xq, xd, xs) = (a.split.as_ptr(), a.d.as_ptr(), a.s.as_ptr());
        debug_assert!(super::acts_hold(a, nb));
        let m4 = _mm256_set1_epi16(0x0F);
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut off = 0.0f32;
        // SAFETY: super-blocks sb < nb / 8 of the row and activation blocks b < nb are read (the
        // kernel's contract). The prefetch address, four super-blocks ahead and past the row on
        // its last ones, is formed with `wrapping_add`, and a prefetch never faults.
        unsafe {
            let qdot2 = |lo: __m256i, hi: __m256i, b: usize| {
                let x = xq.add(b * BLOCK);
                let e = _mm256_madd_epi16(lo, _mm256_loadu_si256(x.cast()));
                let o = _mm256_madd_epi16(hi, _mm256_loadu_si256(x.add(16).cast()));
                _mm256_cvtepi32_ps(_mm256_add_epi32(e, o))
            };
            // `nb` counts blocks of 32; a super-block holds 8.
            for sb in 0..nb / 8 {
                let blk = p.add(sb * Q4_K_BYTES);
                _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(Q4_K_BYTES * 4).cast());
                let (d, dmin) = f16_pair(blk);
                let scales = std::slice::from_raw_parts(blk.add(4), 12);
                for g in 0..4 {
                    let l = _mm256_loadu_si256(blk.add(16 + 32 * g).cast());
                    let b = 8 * sb + 2 * g;
                    let (sc0, m0) = scale_min_k4(2 * g, scales);
                    let (sc1, m1) = scale_min_k4(2 * g + 1, scales);
                    let lo = qdot2(
                        _mm256_and_si256(l, m4),
                        _mm256_and_si256(_mm256_srli_epi16(l, 8), m4),
                        b,
                    );
                    let hi = qdot2(
                        _mm256_and_si256(_mm256_srli_epi16(l, 4), m4),
                        _mm256_srli_epi16(l, 12),
                        b + 1,
                    );
                    acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d * sc0 as f32 * *xd.add(b)), lo, acc0);
                    acc1 =
                        _mm256_fmadd_ps(_mm256_set1_ps(d * sc1 as f32 * *xd.add(b + 1)), hi, acc1);
                    off += dmin * (m0 as f32 * *xs.add(b) + m1 as f32 * *xs.add(b + 1));
                }
            }
        }
        hsum(_mm256_add_ps(acc0, acc1)) - off
    }

    /// `Σ (q − 32)·x` of one Q6_K block of 32 (quants as even/odd 16-bit lanes, activations in
    /// split order at `x`), as eight f32 lanes: lanes 0–3 sum the first sub-block of 16, lanes
    /// 4–7 the second.
    ///
    /// # Safety
    /// `x` must be valid for reads of 32 `i16`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q6_block(even: __m256i, odd: __m256i, x: *const i16) -> __m256 {
        let bias = _mm256_set1_epi16(32);
        // SAFETY: the caller guarantees 32 readable i16 at `x`; the loads are unaligned.
        let (x0, x1) = unsafe {
            (
                _mm256_loadu_si256(x.cast()),
                _mm256_loadu_si256(x.add(16).cast()),
            )
        };
        let e = _mm256_madd_epi16(_mm256_sub_epi16(even, bias), x0);
        let o = _mm256_madd_epi16(_mm256_sub_epi16(odd, bias), x1);
        _mm256_cvtepi32_ps(_mm256_add_epi32(e, o))
    }

    /// Q6_K (see `dot_q6_k_scalar`): per half of 128 elements, `ql` (2 × 32 bytes) and `qh` (32
    /// bytes) are loaded once; masks and shifts on 16-bit lanes give each block of 32 in the split
    /// order of the activations. The two sub-blocks of a block are the two 128-bit halves of the
    /// lanes, so the scales are applied in f32 as `[s_2t ×4, s_2t+1 ×4]` (a lane permute of the
    /// half's eight scales).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q6_k(p: *const u8, nb: usize, _x: &[f32], a: Acts<'_>) -> f32 {
        use super::Q6_K_BYTES;
        /// Lane indices of scale pair (2t, 2t + 1) for block t of a half.
        static PAIRS: [[i32; 8]; 4] = [
            [0, 0, 0, 0, 1, 1, 1, 1],
            [2, 2, 2, 2, 3, 3, 3, 3],
            [4, 4, 4, 4, 5, 5, 5, 5],
            [6, 6, 6, 6, 7, 7, 7, 7],
        ];
        let (xq, xd) = (a.split.as_ptr(), a.d.as_ptr());
        debug_assert!(super::acts_hold(a, nb));
        let m4 = _mm256_set1_epi16(0x0F);
        let m2 = _mm256_set1_epi16(0x30);
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        // SAFETY: super-blocks sb < nb / 8 of the row and activation blocks b < nb are read (the
        // kernel's contract). The prefetch addresses, two super-blocks ahead and past the row on
        // its last ones, are formed with `wrapping_add`, and a prefetch never faults.
        unsafe {
            let scale = |scales: __m256, t: usize, b: usize| {
                let idx = _mm256_loadu_si256(PAIRS[t].as_ptr().cast());
                _mm256_mul_ps(
                    _mm256_permutevar8x32_ps(scales, idx),
                    _mm256_set1_ps(*xd.add(b)),
                )
            };
            for sb in 0..nb / 8 {
                let blk = p.add(sb * Q6_K_BYTES);
                _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(Q6_K_BYTES * 2).cast());
                _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(Q6_K_BYTES * 2 + 64).cast());
                _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(Q6_K_BYTES * 2 + 128).cast());
                let d = _mm256_set1_ps(f16_one(blk.add(208)));
                for h in 0..2 {
                    let sc = _mm_loadl_epi64(blk.add(192 + 8 * h).cast());
                    let scales = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)));
                    let l0 = _mm256_loadu_si256(blk.add(64 * h).cast());
                    let l1 = _mm256_loadu_si256(blk.add(64 * h + 32).cast());
                    let hb = _mm256_loadu_si256(blk.add(128 + 32 * h).cast());
                    let b = 8 * sb + 4 * h;
                    let x = xq.add(b * BLOCK);
                    // Lane k holds bytes 2k (even element) and 2k + 1 (odd element); each block
                    // takes a nibble of l0 or l1 and its two bits of hb, moved to bits 4–5.
                    let v0 = q6_block(
                        _mm256_or_si256(
                            _mm256_and_si256(l0, m4),
                            _mm256_and_si256(_mm256_slli_epi16(hb, 4), m2),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(l0, 8), m4),
                            _mm256_and_si256(_mm256_srli_epi16(hb, 4), m2),
                        ),
                        x,
                    );
                    acc0 = _mm256_fmadd_ps(scale(scales, 0, b), v0, acc0);
                    let v1 = q6_block(
                        _mm256_or_si256(
                            _mm256_and_si256(l1, m4),
                            _mm256_and_si256(_mm256_slli_epi16(hb, 2), m2),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(l1, 8), m4),
                            _mm256_and_si256(_mm256_srli_epi16(hb, 6), m2),
                        ),
                        x.add(BLOCK),
                    );
                    acc1 = _mm256_fmadd_ps(scale(scales, 1, b + 1), v1, acc1);
                    let v2 = q6_block(
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                            _mm256_and_si256(hb, m2),
                        ),
                        _mm256_or_si256(
                            _mm256_srli_epi16(l0, 12),
                            _mm256_and_si256(_mm256_srli_epi16(hb, 8), m2),
                        ),
                        x.add(2 * BLOCK),
                    );
                    acc0 = _mm256_fmadd_ps(scale(scales, 2, b + 2), v2, acc0);
                    let v3 = q6_block(
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                            _mm256_and_si256(_mm256_srli_epi16(hb, 2), m2),
                        ),
                        _mm256_or_si256(
                            _mm256_srli_epi16(l1, 12),
                            _mm256_and_si256(_mm256_srli_epi16(hb, 10), m2),
                        ),
                        x.add(3 * BLOCK),
                    );
                    acc1 = _mm256_fmadd_ps(scale(scales, 3, b + 3), v3, acc1);
                }
            }
        }
        hsum(_mm256_add_ps(acc0, acc1))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q5_0(p: *const u8, nb: usize, _x: &[f32], a: Acts<'_>) -> f32 {
        block_dot!(p, nb, a, a.split.as_ptr(), split_lanes(), 22, q5_0_block)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q5_1(p: *const u8, nb: usize, _x: &[f32], a: Acts<'_>) -> f32 {
        block_dot!(p, nb, a, a.split.as_ptr(), split_lanes(), 24, q5_1_block)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q8_0(p: *const u8, nb: usize, _x: &[f32], a: Acts<'_>) -> f32 {
        block_dot!(p, nb, a, a.qs.as_ptr(), _mm256_set1_ps(1.0), 34, q8_0_block)
    }

    /// [`super::dequantize_fast`] with AVX2.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; `bytes` must be exactly the blocks of `out.len()`
    /// values of `format` (`out.len()` a multiple of its block size), as `dequantize_fast`
    /// checks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dequantize(format: WeightFormat, bytes: &[u8], out: &mut [f32]) -> bool {
        let (src, dst, n) = (bytes.as_ptr(), out.as_mut_ptr(), out.len());
        // SAFETY: every format reads whole blocks b < n / block size of `bytes` and writes the
        // values of those blocks in `out`, both in bounds by the contract (f16/bf16: 8 values at
        // a time while k + 8 ≤ n, then a checked tail).
        unsafe {
            match format {
                WeightFormat::F16 | WeightFormat::BF16 => {
                    let mut k = 0;
                    while k + 8 <= n {
                        let h = _mm_loadu_si128(src.add(2 * k).cast());
                        let v = if format == WeightFormat::F16 {
                            _mm256_cvtph_ps(h)
                        } else {
                            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                        };
                        _mm256_storeu_ps(dst.add(k), v);
                        k += 8;
                    }
                    if k < n {
                        let tail = &bytes[2 * k..];
                        if crate::quant::dequantize(format.ggml(), tail, &mut out[k..]).is_err() {
                            return false;
                        }
                    }
                    true
                }
                WeightFormat::Q8_0 => {
                    for b in 0..n / BLOCK {
                        let blk = src.add(b * 34);
                        let d = _mm256_set1_ps(f16_one(blk));
                        for c in 0..4 {
                            let q =
                                _mm256_cvtepi8_epi32(_mm_loadl_epi64(blk.add(2 + 8 * c).cast()));
                            let v = _mm256_mul_ps(_mm256_cvtepi32_ps(q), d);
                            _mm256_storeu_ps(dst.add(b * BLOCK + 8 * c), v);
                        }
                    }
                    true
                }
                WeightFormat::Q4_0
                | WeightFormat::Q4_1
                | WeightFormat::Q5_0
                | WeightFormat::Q5_1 => {
                    let bb = format.block_bytes();
                    for b in 0..n / BLOCK {
                        let blk = src.add(b * bb);
                        // (quants, d, m, subtracted offset) as the reference decoder computes
                        // `d·(q − offset)` or `d·q + m`, unfused.
                        let (q, d, m, offset) = match format {
                            WeightFormat::Q4_0 => (nibbles(blk.add(2)), f16_one(blk), None, 8),
                            WeightFormat::Q4_1 => {
                                let (d, m) = f16_pair(blk);
                                (nibbles(blk.add(4)), d, Some(m), 0)
                            }
                            WeightFormat::Q5_0 => {
                                let qh = blk.add(2).cast::<u32>().read_unaligned();
                                (
                                    or(nibbles(blk.add(6)), high_bits(qh)),
                                    f16_one(blk),
                                    None,
                                    16,
                                )
                            }
                            _ => {
                                let (d, m) = f16_pair(blk);
                                let qh = blk.add(4).cast::<u32>().read_unaligned();
                                (or(nibbles(blk.add(8)), high_bits(qh)), d, Some(m), 0)
                            }
                        };
                        let (dv, off) = (_mm256_set1_ps(d), _mm256_set1_epi32(offset));
                        let o = dst.add(b * BLOCK);
                        for (c, half) in [q.0, q.1].into_iter().enumerate() {
                            for (e, part) in [
                                _mm256_castsi256_si128(half),
                                _mm256_extracti128_si256(half, 1),
                            ]
                            .into_iter()
                            .enumerate()
                            {
                                let qi = _mm256_sub_epi32(_mm256_cvtepu16_epi32(part), off);
                                let mut v = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(qi));
                                if let Some(m) = m {
                                    v = _mm256_add_ps(v, _mm256_set1_ps(m));
                                }
                                _mm256_storeu_ps(o.add(16 * c + 8 * e), v);
                            }
                        }
                    }
                    true
                }
                WeightFormat::Q6_K => {
                    use super::Q6_K_BYTES;
                    let (m4, m2, bias) = (
                        _mm256_set1_epi32(0x0F),
                        _mm256_set1_epi32(3),
                        _mm256_set1_epi32(32),
                    );
                    for sb in 0..n / 256 {
                        let blk = src.add(sb * Q6_K_BYTES);
                        let d = f16_one(blk.add(208));
                        let sc = blk.add(192).cast::<i8>();
                        for h in 0..2 {
                            let (ql, qh) = (blk.add(64 * h), blk.add(128 + 32 * h));
                            let y = dst.add(256 * sb + 128 * h);
                            for l in (0..32).step_by(8) {
                                let load =
                                    |p: *const u8| _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.cast()));
                                let (a, b, hb) =
                                    (load(ql.add(l)), load(ql.add(32 + l)), load(qh.add(l)));
                                let nibbles = [
                                    _mm256_and_si256(a, m4),
                                    _mm256_and_si256(b, m4),
                                    _mm256_srli_epi32(a, 4),
                                    _mm256_srli_epi32(b, 4),
                                ];
                                for (k, nib) in nibbles.into_iter().enumerate() {
                                    let high = _mm256_and_si256(
                                        _mm256_srl_epi32(hb, _mm_cvtsi32_si128(2 * k as i32)),
                                        m2,
                                    );
                                    let q = _mm256_sub_epi32(
                                        _mm256_or_si256(nib, _mm256_slli_epi32(high, 4)),
                                        bias,
                                    );
                                    // `(d·sc)·q`, the reference decoder's order.
                                    let s = d * *sc.add(8 * h + l / 16 + 2 * k) as f32;
                                    let v = _mm256_mul_ps(_mm256_set1_ps(s), _mm256_cvtepi32_ps(q));
                                    _mm256_storeu_ps(y.add(32 * k + l), v);
                                }
                            }
                        }
                    }
                    true
                }
                _ => false,
            }
        }
    }

    /// Per block of 32: `d = max|x|/32767`, `q = round(x/d)` (ties to even), `s = d·Σq`.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; `a.qs` and `a.split` must hold `x.len()` values
    /// (`a.d` and `a.s` are indexed with bounds checks).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn quantize(x: &[f32], a: &mut QuantizedActs) {
        debug_assert!(a.qs.len() >= x.len() && a.split.len() >= x.len());
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        for b in 0..x.len() / BLOCK {
            // SAFETY: block b < x.len() / 32 of `x`: 32 values from `p`.
            let v = unsafe {
                let p = x.as_ptr().add(b * BLOCK);
                [
                    _mm256_loadu_ps(p),
                    _mm256_loadu_ps(p.add(8)),
                    _mm256_loadu_ps(p.add(16)),
                    _mm256_loadu_ps(p.add(24)),
                ]
            };
            let m = _mm256_max_ps(
                _mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)),
            );
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
            let d = amax / 32767.0;
            let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            let round = |v: __m256| {
                _mm256_cvtps_epi32(_mm256_round_ps(
                    _mm256_mul_ps(v, id),
                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
                ))
            };
            let i = [round(v[0]), round(v[1]), round(v[2]), round(v[3])];
            let sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
            let s4 = _mm_add_epi32(
                _mm256_castsi256_si128(sum),
                _mm256_extracti128_si256(sum, 1),
            );
            let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
            let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0b10_11_00_01));
            // Pack 2 × 8 i32 to 16 i16 twice; packs work per 128-bit lane, the permute restores
            // element order. Then the split order: a pair of i16 quants read as one i32 gives the
            // even element in its low half and the odd one in its high half.
            // SAFETY: block b < x.len() / 32 of `a.qs` (32 values), which holds `x.len()`
            // (contract); stores and loads are unaligned.
            let (n0, n1) = unsafe {
                let out = a.qs.as_mut_ptr().add(b * BLOCK);
                for (h, pair) in [(0, [i[0], i[1]]), (16, [i[2], i[3]])] {
                    let packed = _mm256_permute4x64_epi64(
                        _mm256_packs_epi32(pair[0], pair[1]),
                        0b11_01_10_00,
                    );
                    _mm256_storeu_si256(out.add(h).cast(), packed);
                }
                (
                    _mm256_loadu_si256(out.cast()),
                    _mm256_loadu_si256(out.add(16).cast()),
                )
            };
            let even = |n: __m256i| _mm256_srai_epi32(_mm256_slli_epi32(n, 16), 16);
            let odd = |n: __m256i| _mm256_srai_epi32(n, 16);
            for (h, pair) in [(0, [even(n0), even(n1)]), (16, [odd(n0), odd(n1)])] {
                let packed =
                    _mm256_permute4x64_epi64(_mm256_packs_epi32(pair[0], pair[1]), 0b11_01_10_00);
                // SAFETY: 16 of the 32 values of block b of `a.split`, which holds `x.len()`
                // (contract); the store is unaligned.
                unsafe {
                    _mm256_storeu_si256(a.split.as_mut_ptr().add(b * BLOCK + h).cast(), packed)
                };
            }
            a.d[b] = d;
            a.s[b] = d * _mm_cvtsi128_si32(s1) as f32;
        }
    }
}
