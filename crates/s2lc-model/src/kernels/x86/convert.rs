//! AVX2 format conversions: whole weight rows decoded to f32 and activations quantized per
//! block of 32.

use std::arch::x86_64::*;

use super::{f16_one, f16_pair, high_bits, nibbles, or};
use crate::kernels::dot::{QuantizedActs, BLOCK};
use crate::kernels::WeightFormat;

/// [`crate::kernels::dot::dequantize_fast`] with AVX2.
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
                    let Some(t) = format.ggml() else { return false };
                    if crate::quant::dequantize(t, tail, &mut out[k..]).is_err() {
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
                        let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(blk.add(2 + 8 * c).cast()));
                        let v = _mm256_mul_ps(_mm256_cvtepi32_ps(q), d);
                        _mm256_storeu_ps(dst.add(b * BLOCK + 8 * c), v);
                    }
                }
                true
            }
            WeightFormat::Q4_0 | WeightFormat::Q4_1 | WeightFormat::Q5_0 | WeightFormat::Q5_1 => {
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
                use crate::kernels::dot::Q6_K_BYTES;
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
                let packed =
                    _mm256_permute4x64_epi64(_mm256_packs_epi32(pair[0], pair[1]), 0b11_01_10_00);
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
            unsafe { _mm256_storeu_si256(a.split.as_mut_ptr().add(b * BLOCK + h).cast(), packed) };
        }
        a.d[b] = d;
        a.s[b] = d * _mm_cvtsi128_si32(s1) as f32;
    }
}
