//! The x86-64 kernels of [`super::dot`]: AVX2 + FMA + F16C versions of the row dots, the block
//! decoders and the activation quantizer, run only when [`super::dot::simd`] detects the CPU
//! features. This module holds the lane helpers they share.

use std::arch::x86_64::*;

mod convert;
mod dot;

pub(crate) use convert::{dequantize, quantize};
pub(crate) use dot::{dot_rows, dot_rows_multi};

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

/// The same 16 bytes of nibbles in the order of
/// [`QuantizedActs::split`](crate::kernels::dot::QuantizedActs::split), without a shuffle:
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
        0x0F, 0x0F, 0x0F, 0x0F, 0x0F, 0x0F, 0x0F, 0x0F, 0xF0, 0xF0, 0xF0, 0xF0, 0xF0, 0xF0, 0xF0,
        0xF0,
    );
    Quants(
        _mm256_and_si256(b, m),
        _mm256_and_si256(_mm256_srli_epi16(b, 8), m),
    )
}

/// The 2-bit plane of a low-bit group (8 bytes at `p`: byte `j` holds codes `j, j + 8, j + 16,
/// j + 24` at bits 0, 2, 4, 6), OR-ed with `high` (32 bytes in element order), widened to 16
/// bits in element order. Each 64-bit lane `k` holds the 8 bytes shifted right by `2k`, so its
/// byte `j`'s low two bits are code `8k + j`.
///
/// # Safety
/// `p` must be valid for reads of 8 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn crumbs(p: *const u8, high: __m256i) -> Quants {
    // SAFETY: the caller guarantees 8 readable bytes at `p`; the read is unaligned.
    let plane = _mm256_set1_epi64x(unsafe { p.cast::<i64>().read_unaligned() });
    let lanes = _mm256_srlv_epi64(plane, _mm256_setr_epi64x(0, 2, 4, 6));
    let q = _mm256_or_si256(_mm256_and_si256(lanes, _mm256_set1_epi8(3)), high);
    Quants(
        _mm256_cvtepu8_epi16(_mm256_castsi256_si128(q)),
        _mm256_cvtepu8_epi16(_mm256_extracti128_si256::<1>(q)),
    )
}

/// The third-bit plane of a 3-bit group (4 bytes at `p`: byte `j` bit `k` is bit 2 of code
/// `4k + j`) as 32 bytes in element order, each 0 or 4. Each 32-bit lane `k` holds the 4 bytes
/// shifted right by `k`, so its byte `j`'s low bit is that of code `4k + j`.
///
/// # Safety
/// `p` must be valid for reads of 4 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn third_bits(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 4 readable bytes at `p`; the read is unaligned.
    let plane = _mm256_set1_epi32(unsafe { p.cast::<i32>().read_unaligned() });
    let lanes = _mm256_srlv_epi32(plane, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    // Bytes are 0 or 1: a 16-bit shift by 2 keeps each within its byte.
    _mm256_slli_epi16(_mm256_and_si256(lanes, _mm256_set1_epi8(1)), 2)
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
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        ),
    );
    let even = _mm256_setr_epi16(1, 4, 16, 64, 1, 4, 16, 64, 1, 4, 16, 64, 1, 4, 16, 64);
    let odd = _mm256_slli_epi16(even, 1);
    let value = _mm256_setr_epi16(
        0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x100, 0x100, 0x100, 0x100, 0x100, 0x100,
        0x100, 0x100,
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
