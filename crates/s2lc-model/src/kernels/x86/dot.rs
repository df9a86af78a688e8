//! AVX2 row dots `out[r] (+)= W[r]·x` for every storage format, one activation row or several
//! at once (each block decoded once for all of them).

use std::arch::x86_64::*;

use super::{
    crumbs, f16_one, f16_pair, high_bits_split, hsum, nibbles_split, or, put, qdot, third_bits,
    Quants,
};
use crate::kernels::dot::{acts_cover, acts_hold, rows_cover, Acts, Rows, BLOCK};
use crate::kernels::{lowbit, WeightFormat};

/// [`crate::kernels::dot::dot_rows`] with AVX2.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `rows` must hold `out.len()` rows of `x.len()`
/// values and, for a block format other than f16/bf16, `a` must hold `x.len() / 32` blocks
/// (what `crate::kernels::dot::dot_rows` asserts).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_rows(rows: Rows<'_>, x: &[f32], a: Acts<'_>, out: &mut [f32], add: bool) {
    let cols = x.len();
    debug_assert!(rows_cover(rows, cols, out.len()));
    debug_assert!(acts_cover(rows, a, cols / BLOCK));
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
                WeightFormat::Sq2 => dot_sq::<2>,
                WeightFormat::Sq3 => dot_sq::<3>,
                WeightFormat::Sq4 => dot_sq::<4>,
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
        debug_assert!(acts_hold(a, $nb));
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
            debug_assert!(acts_hold(acts[i], $nb));
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
                    acc1[i] = _mm256_fmadd_ps(_mm256_set1_ps(d1 * *xd[i].add(b + 1)), p1, acc1[i]);
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
        ($p:expr, $split:expr, $lanes:expr, $bytes:expr, $decode:expr) => {
            match acts.len() {
                4 => block_dot_n!(4, $p, nb, acts, $split, $lanes, $bytes, $decode),
                2 => {
                    let [a, b] = block_dot_n!(2, $p, nb, acts, $split, $lanes, $bytes, $decode);
                    [a, b, 0.0, 0.0]
                }
                _ => return None,
            }
        };
    }
    // A low-bit row: its `(D, M)` header, then `nb` groups (the contract covers the whole row).
    macro_rules! sq {
        ($bits:literal, $split:expr, $lanes:expr) => {{
            // SAFETY: the row starts with its 4-byte header (contract).
            let (dr, mr) = unsafe { f16_pair(p) };
            let t = lowbit::scale_table();
            // SAFETY: `block_dot_n` passes whole groups of the row (contract).
            let decode = |g: *const u8| unsafe { sq_group::<$bits>(g, dr, mr, t) };
            run!(
                p.wrapping_add(4),
                $split,
                $lanes,
                lowbit::group_bytes($bits),
                decode
            )
        }};
    }
    Some(match f {
        WeightFormat::Q4_0 => run!(p, true, split_lanes(), 18, q4_0_block),
        WeightFormat::Q4_1 => run!(p, true, split_lanes(), 20, q4_1_block),
        WeightFormat::Q5_0 => run!(p, true, split_lanes(), 22, q5_0_block),
        WeightFormat::Q5_1 => run!(p, true, split_lanes(), 24, q5_1_block),
        WeightFormat::Q8_0 => run!(p, false, _mm256_set1_ps(1.0), 34, q8_0_block),
        WeightFormat::Sq2 => sq!(2, false, _mm256_set1_ps(1.0)),
        WeightFormat::Sq3 => sq!(3, false, _mm256_set1_ps(1.0)),
        WeightFormat::Sq4 => sq!(4, true, split_lanes()),
        _ => return None,
    })
}

/// `out[i·stride + r] (+)= W[r]·x_i` for the rows in `rows` and the 2 or 4 activation rows
/// in `acts`; false (nothing written) when the format or count has no multi-row kernel.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; every row of `acts` must hold `cols / 32` blocks
/// (what `crate::kernels::dot::dot_rows_multi` asserts); `out` as for
/// [`crate::kernels::dot::dot_rows_multi`].
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
    debug_assert!(acts.iter().all(|&a| acts_hold(a, nb)));
    for r in 0..data.len() / rb {
        // SAFETY: row r of `data.len() / rb` whole rows holds `nb` blocks, and so does every
        // activation row (contract).
        let Some(v) = (unsafe { dot_multi(format, data.as_ptr().add(r * rb), nb, acts) }) else {
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

/// One group of a low-bit row (`crate::kernels::lowbit`) at `g` (`cs, cm`, then the code
/// planes): codes (split order for 4 bits, as [`nibbles_split`]; element order for 2 and 3),
/// `d = D·2^(−cs/16)` and the offset `−m = −M·2^(−cm/16)` under the row's `D, M`.
///
/// # Safety
/// `g` must be valid for reads of one group (`lowbit::group_bytes(B)` bytes).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sq_group<const B: usize>(
    g: *const u8,
    d_row: f32,
    m_row: f32,
    t: &[f32; 256],
) -> (Quants, f32, f32) {
    // SAFETY: the two scale codes are bytes 0..2 and the planes 2..2 + 4·B (contract).
    unsafe {
        let (cs, cm) = (*g as usize, *g.add(1) as usize);
        let q = match B {
            4 => nibbles_split(g.add(2)),
            3 => crumbs(g.add(2), third_bits(g.add(10))),
            _ => crumbs(g.add(2), _mm256_setzero_si256()),
        };
        (q, d_row * t[cs], -(m_row * t[cm]))
    }
}

/// A low-bit row: the row's `(D, M)` header, then its `nb` groups through [`block_dot`].
///
/// # Safety
/// `p` must be valid for reads of one row (`lowbit::row_bytes(B, 32·nb)` bytes), and `a` must
/// hold `nb` blocks.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_sq<const B: usize>(p: *const u8, nb: usize, _x: &[f32], a: Acts<'_>) -> f32 {
    // SAFETY: the header is the row's first 4 bytes (contract).
    let (dr, mr) = unsafe { f16_pair(p) };
    let t = lowbit::scale_table();
    // SAFETY: `block_dot` passes whole groups of the row (contract).
    let decode = |g: *const u8| unsafe { sq_group::<B>(g, dr, mr, t) };
    let groups = p.wrapping_add(4);
    if B == 4 {
        block_dot!(
            groups,
            nb,
            a,
            a.split.as_ptr(),
            split_lanes(),
            lowbit::group_bytes(B),
            decode
        )
    } else {
        let ones = _mm256_set1_ps(1.0);
        block_dot!(
            groups,
            nb,
            a,
            a.qs.as_ptr(),
            ones,
            lowbit::group_bytes(B),
            decode
        )
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
// and `a` must hold `nb` blocks (checked by `crate::kernels::dot::dot_rows`).

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
    use crate::kernels::dot::Q4_K_BYTES;
    use crate::quant::scale_min_k4;
    let (xq, xd, xs) = (a.split.as_ptr(), a.d.as_ptr(), a.s.as_ptr());
    debug_assert!(acts_hold(a, nb));
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
                acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d * sc1 as f32 * *xd.add(b + 1)), hi, acc1);
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
    use crate::kernels::dot::Q6_K_BYTES;
    /// Lane indices of scale pair (2t, 2t + 1) for block t of a half.
    static PAIRS: [[i32; 8]; 4] = [
        [0, 0, 0, 0, 1, 1, 1, 1],
        [2, 2, 2, 2, 3, 3, 3, 3],
        [4, 4, 4, 4, 5, 5, 5, 5],
        [6, 6, 6, 6, 7, 7, 7, 7],
    ];
    let (xq, xd) = (a.split.as_ptr(), a.d.as_ptr());
    debug_assert!(acts_hold(a, nb));
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
