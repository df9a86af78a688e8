//! Vector operations of the forward pass besides the products: dot/axpy on short vectors
//! (attention), a vectorised `exp` (softmax, SiLU), SwiGLU and RMSNorm. AVX2 where detected,
//! plain loops otherwise.
//!
//! The AVX2 `exp` is Cephes' `expf` (range reduction by `ln 2` split in two constants, degree-6
//! polynomial), relative error below 2e-7 over the clamped range `[−87.3, 88.4]`.

use super::dot::simd;

/// `Σ a_i·b_i` (equal lengths).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: features checked; both slices are read within their common length.
        return unsafe { avx2::dot(a, b) };
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `y ← y + alpha·x` (equal lengths).
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    debug_assert_eq!(x.len(), y.len());
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: features checked; both slices are accessed within their common length.
        unsafe { avx2::axpy(y, alpha, x) };
        return;
    }
    y.iter_mut().zip(x).for_each(|(y, x)| *y += alpha * x);
}

/// `Σ c_i·x_i` for int8 `c` (equal lengths): a query against int8 key coefficients.
pub fn dot_i8(c: &[i8], x: &[f32]) -> f32 {
    debug_assert_eq!(c.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: features checked; both slices are read within their common length.
        return unsafe { avx2::dot_i8(c, x) };
    }
    c.iter().zip(x).map(|(c, x)| *c as f32 * x).sum()
}

/// `y ← y + alpha·c` for int8 `c` (equal lengths): accumulating int8 value rows.
pub fn axpy_i8(y: &mut [f32], alpha: f32, c: &[i8]) {
    debug_assert_eq!(c.len(), y.len());
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: features checked; both slices are accessed within their common length.
        unsafe { avx2::axpy_i8(y, alpha, c) };
        return;
    }
    y.iter_mut()
        .zip(c)
        .for_each(|(y, c)| *y += alpha * *c as f32);
}

/// Whether `count` rows of `width` values, one every `stride` values from the start, fit in
/// `len` values (the last one ends at `(count − 1)·stride + width`).
fn rows_fit(len: usize, count: usize, stride: usize, width: usize) -> bool {
    count == 0
        || (count - 1)
            .checked_mul(stride)
            .and_then(|start| start.checked_add(width))
            .is_some_and(|end| end <= len)
}

/// `scores[j] = scale · q·k_j` for the `scores.len()` keys `k_j = keys[j·stride..][..q.len()]`.
///
/// # Panics
/// If `keys` is shorter than those keys (checked once per call).
pub fn key_scores(q: &[f32], keys: &[f32], stride: usize, scale: f32, scores: &mut [f32]) {
    assert!(
        rows_fit(keys.len(), scores.len(), stride, q.len()),
        "key_scores: {} keys of {} values every {stride} do not fit in {} values",
        scores.len(),
        q.len(),
        keys.len()
    );
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: `simd()` checked the CPU features; key j < scores.len() is read at
        // keys[j·stride..j·stride + q.len()], inside `keys` by the assert above.
        unsafe { avx2::key_scores(q, keys, stride, scale, scores) };
        return;
    }
    for (j, s) in scores.iter_mut().enumerate() {
        *s = scale * dot(q, &keys[j * stride..][..q.len()]);
    }
}

/// `out = Σ_j p_j · v_j` for `v_j = values[j·stride..][..out.len()]`, `j < p.len()`.
///
/// # Panics
/// If `values` is shorter than those rows (checked once per call).
pub fn weighted_rows(p: &[f32], values: &[f32], stride: usize, out: &mut [f32]) {
    assert!(
        rows_fit(values.len(), p.len(), stride, out.len()),
        "weighted_rows: {} rows of {} values every {stride} do not fit in {} values",
        p.len(),
        out.len(),
        values.len()
    );
    #[cfg(target_arch = "x86_64")]
    if simd() && out.len() % 8 == 0 {
        // SAFETY: `simd()` checked the CPU features; row j < p.len() is read at
        // values[j·stride..j·stride + out.len()], inside `values` by the assert above.
        unsafe { avx2::weighted_rows(p, values, stride, out) };
        return;
    }
    out.fill(0.0);
    for (j, &pj) in p.iter().enumerate() {
        axpy(out, pj, &values[j * stride..][..out.len()]);
    }
}

/// Softmax over `row[..valid]`, zeroing `row[valid..]` (the causal mask).
pub fn softmax_prefix(row: &mut [f32], valid: usize) {
    let (live, masked) = row.split_at_mut(valid);
    let max = live.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum = exp_shifted(live, max);
    let inv = 1.0 / sum;
    live.iter_mut().for_each(|x| *x *= inv);
    masked.iter_mut().for_each(|x| *x = 0.0);
}

/// `x ← exp(x − shift)`, returning `Σ x` afterwards.
pub fn exp_shifted(x: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: features checked; the slice is accessed within its length.
        return unsafe { avx2::exp_shifted(x, shift) };
    }
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - shift).exp();
        sum += *v;
    }
    sum
}

/// SwiGLU: `gate ← silu(gate)·up` with `silu(g) = g / (1 + e^(−g))`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    debug_assert_eq!(gate.len(), up.len());
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: features checked; both slices are accessed within their common length.
        unsafe { avx2::silu_mul(gate, up) };
        return;
    }
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `erf` (Abramowitz & Stegun 7.1.26, absolute error ≤ 1.5e-7): std has none.
pub fn erf(x: f32) -> f32 {
    // Past 4, erf is 1 in f32 (1 − 1.5e-8).
    if x.abs() > 4.0 {
        return 1.0f32.copysign(x);
    }
    let t = 1.0 / (1.0 + ERF_P * x.abs());
    let poly = t * (ERF_A[0] + t * (ERF_A[1] + t * (ERF_A[2] + t * (ERF_A[3] + t * ERF_A[4]))));
    let y = 1.0 - poly * (-x * x).exp();
    y.copysign(x)
}

/// The constants of Abramowitz & Stegun 7.1.26.
const ERF_P: f32 = 0.327_591_1;
const ERF_A: [f32; 5] = [
    0.254_829_6,
    -0.284_496_74,
    1.421_413_7,
    -1.453_152,
    1.061_405_4,
];

/// BERT's exact GELU `x·Φ(x) = x/2·(1 + erf(x/√2))`, in place.
pub fn gelu(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: features checked; the slice is accessed within its length.
        unsafe { avx2::gelu(x) };
        return;
    }
    for v in x.iter_mut() {
        *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// `out = x / √(mean(x²) + eps) · weight`, for each row of width `weight.len()`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ms = dot(row, row) / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, v), w) in o.iter_mut().zip(row).zip(weight) {
            *o = v * inv * w;
        }
    }
}

/// LayerNorm: `out = (x − mean) / √(var + eps) · weight + bias` for each row of width
/// `weight.len()`, the variance the biased one (`/ d`), as torch computes it. Two passes over the
/// row (mean, then centred squares) rather than `E[x²] − mean²`, which cancels badly when the
/// mean is large against the spread.
pub fn layer_norm(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    debug_assert_eq!(bias.len(), d);
    for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mean = row.iter().sum::<f32>() / d as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for (((o, v), w), b) in o.iter_mut().zip(row).zip(weight).zip(bias) {
            *o = (v - mean) * inv * w + b;
        }
    }
}

/// `√(2/π)`, the slope of GELU's tanh approximation.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// GELU, tanh approximation (GPT-2's `gelu_new`): `x/2 · (1 + tanh(√(2/π)·(x + 0.044715·x³)))`,
/// in place.
pub fn gelu_tanh(x: &mut [f32]) {
    for v in x.iter_mut() {
        let t = (SQRT_2_OVER_PI * (*v + 0.044_715 * *v * *v * *v)).tanh();
        *v = 0.5 * *v * (1.0 + t);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! Every function here needs AVX2, FMA and F16C (`# Safety` of each: the CPU has them, as
    //! `simd()` checks) and reads or writes its slices only within the bounds stated on it.

    use std::arch::x86_64::*;

    use crate::kernels::x86::hsum;

    /// Eight int8 values at `p` as f32.
    ///
    /// # Safety
    /// `p` must be valid for reads of 8 bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn i8x8(p: *const i8) -> __m256 {
        // SAFETY: the caller guarantees 8 readable bytes at `p`; the load is unaligned.
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(unsafe { _mm_loadl_epi64(p.cast()) }))
    }

    /// [`super::dot_i8`] over the common length.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_i8(c: &[i8], x: &[f32]) -> f32 {
        let n = c.len().min(x.len());
        let (pc, px) = (c.as_ptr(), x.as_ptr());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut k = 0;
        // SAFETY: elements k..k + 16 (or + 8) ≤ n of both slices.
        unsafe {
            while k + 16 <= n {
                s0 = _mm256_fmadd_ps(i8x8(pc.add(k)), _mm256_loadu_ps(px.add(k)), s0);
                s1 = _mm256_fmadd_ps(i8x8(pc.add(k + 8)), _mm256_loadu_ps(px.add(k + 8)), s1);
                k += 16;
            }
            if k + 8 <= n {
                s0 = _mm256_fmadd_ps(i8x8(pc.add(k)), _mm256_loadu_ps(px.add(k)), s0);
                k += 8;
            }
        }
        let mut s = hsum(_mm256_add_ps(s0, s1));
        while k < n {
            s += c[k] as f32 * x[k];
            k += 1;
        }
        s
    }

    /// [`super::axpy_i8`] over the common length.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy_i8(y: &mut [f32], alpha: f32, c: &[i8]) {
        let n = y.len().min(c.len());
        let (py, pc) = (y.as_mut_ptr(), c.as_ptr());
        let a = _mm256_set1_ps(alpha);
        let mut k = 0;
        while k + 8 <= n {
            // SAFETY: elements k..k + 8 ≤ n of both slices.
            unsafe {
                let v = _mm256_fmadd_ps(a, i8x8(pc.add(k)), _mm256_loadu_ps(py.add(k)));
                _mm256_storeu_ps(py.add(k), v);
            }
            k += 8;
        }
        while k < n {
            y[k] += alpha * c[k] as f32;
            k += 1;
        }
    }

    /// [`super::dot`] over the common length.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut k = 0;
        // SAFETY: elements k..k + 16 (or + 8) ≤ n of both slices.
        unsafe {
            while k + 16 <= n {
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(k)), _mm256_loadu_ps(pb.add(k)), s0);
                s1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(k + 8)),
                    _mm256_loadu_ps(pb.add(k + 8)),
                    s1,
                );
                k += 16;
            }
            if k + 8 <= n {
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(k)), _mm256_loadu_ps(pb.add(k)), s0);
                k += 8;
            }
        }
        let mut s = hsum(_mm256_add_ps(s0, s1));
        while k < n {
            s += a[k] * b[k];
            k += 1;
        }
        s
    }

    /// [`super::axpy`] over the common length.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
        let n = x.len().min(y.len());
        let (py, px) = (y.as_mut_ptr(), x.as_ptr());
        let a = _mm256_set1_ps(alpha);
        let mut k = 0;
        while k + 8 <= n {
            // SAFETY: elements k..k + 8 ≤ n of both slices.
            unsafe {
                let v = _mm256_fmadd_ps(a, _mm256_loadu_ps(px.add(k)), _mm256_loadu_ps(py.add(k)));
                _mm256_storeu_ps(py.add(k), v);
            }
            k += 8;
        }
        while k < n {
            y[k] += alpha * x[k];
            k += 1;
        }
    }

    /// Eight keys at a time: eight independent FMA chains (the latency of one dot product is
    /// hidden behind the others), then one horizontal reduction for all eight.
    ///
    /// # Safety
    /// Besides the CPU features: `keys` must hold the `s.len()` keys of `q.len()` values, one
    /// every `stride` (what `super::key_scores` asserts).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn key_scores(q: &[f32], keys: &[f32], stride: usize, scale: f32, s: &mut [f32]) {
        let (hd, t) = (q.len(), s.len());
        let mut j = 0;
        if hd % 8 == 0 {
            let base = keys.as_ptr();
            let sc = _mm256_set1_ps(scale);
            while j + 8 <= t {
                let mut acc = [_mm256_setzero_ps(); 8];
                for c in (0..hd).step_by(8) {
                    // SAFETY: q[c..c + 8] with c + 8 ≤ hd; values c..c + 8 of keys j..j + 8 < t
                    // (contract).
                    unsafe {
                        let qv = _mm256_loadu_ps(q.as_ptr().add(c));
                        for (r, a) in acc.iter_mut().enumerate() {
                            let k = _mm256_loadu_ps(base.add((j + r) * stride + c));
                            *a = _mm256_fmadd_ps(qv, k, *a);
                        }
                    }
                }
                let t0 = _mm256_hadd_ps(acc[0], acc[1]);
                let t1 = _mm256_hadd_ps(acc[2], acc[3]);
                let t2 = _mm256_hadd_ps(acc[4], acc[5]);
                let t3 = _mm256_hadd_ps(acc[6], acc[7]);
                let u0 = _mm256_hadd_ps(t0, t1);
                let u1 = _mm256_hadd_ps(t2, t3);
                let sum = _mm256_add_ps(
                    _mm256_permute2f128_ps(u0, u1, 0x20),
                    _mm256_permute2f128_ps(u0, u1, 0x31),
                );
                // SAFETY: scores j..j + 8 ≤ t.
                unsafe { _mm256_storeu_ps(s.as_mut_ptr().add(j), _mm256_mul_ps(sum, sc)) };
                j += 8;
            }
        }
        for (j, s) in s.iter_mut().enumerate().skip(j) {
            // SAFETY: key j < t lies inside `keys` (contract); `dot` needs only the CPU features.
            *s = scale * unsafe { dot(q, keys.get_unchecked(j * stride..j * stride + hd)) };
        }
    }

    /// Column blocks of 32 accumulate in four registers over all rows, then store.
    ///
    /// # Safety
    /// Besides the CPU features: `values` must hold the `p.len()` rows of `out.len()` values, one
    /// every `stride` (what `super::weighted_rows` asserts), and `out.len()` must be a multiple
    /// of 8.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn weighted_rows(p: &[f32], values: &[f32], stride: usize, out: &mut [f32]) {
        let w = out.len();
        debug_assert_eq!(w % 8, 0);
        let base = values.as_ptr();
        let mut c = 0;
        while c < w {
            let lanes = ((w - c) / 8).min(4);
            let mut acc = [_mm256_setzero_ps(); 4];
            for (j, &pj) in p.iter().enumerate() {
                let pv = _mm256_set1_ps(pj);
                // SAFETY: values c..c + 8·lanes ≤ w of row j < p.len() (contract).
                unsafe {
                    let row = base.add(j * stride + c);
                    for (l, a) in acc.iter_mut().enumerate().take(lanes) {
                        *a = _mm256_fmadd_ps(pv, _mm256_loadu_ps(row.add(8 * l)), *a);
                    }
                }
            }
            for (l, a) in acc.iter().enumerate().take(lanes) {
                // SAFETY: out[c + 8l..c + 8l + 8] with c + 8·lanes ≤ w.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(c + 8 * l), *a) };
            }
            c += 8 * lanes;
        }
    }

    /// Cephes `expf` on eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
            _mm256_set1_ps(88.37),
        );
        // n = round(x / ln 2); r = x − n·ln 2 with ln 2 = C1 + C2 (C1 exact in few bits).
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let p = _mm256_fmadd_ps(
            p,
            _mm256_mul_ps(r, r),
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        // 2^n through the exponent bits.
        let bits = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        );
        _mm256_mul_ps(p, _mm256_castsi256_ps(bits))
    }

    /// [`super::exp_shifted`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn exp_shifted(x: &mut [f32], shift: f32) -> f32 {
        let n = x.len();
        let p = x.as_mut_ptr();
        let s = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        let mut k = 0;
        while k + 8 <= n {
            // SAFETY: elements k..k + 8 ≤ n of `x`.
            let e = unsafe {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(k)), s));
                _mm256_storeu_ps(p.add(k), e);
                e
            };
            acc = _mm256_add_ps(acc, e);
            k += 8;
        }
        let mut sum = hsum(acc);
        while k < n {
            x[k] = (x[k] - shift).exp();
            sum += x[k];
            k += 1;
        }
        sum
    }

    /// [`super::gelu`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn gelu(x: &mut [f32]) {
        let n = x.len();
        let p = x.as_mut_ptr();
        let sign = _mm256_set1_ps(-0.0);
        let (one, half) = (_mm256_set1_ps(1.0), _mm256_set1_ps(0.5));
        let mut k = 0;
        while k + 8 <= n {
            // SAFETY: elements k..k + 8 ≤ n of `x`.
            let v = unsafe { _mm256_loadu_ps(p.add(k)) };
            let z = _mm256_mul_ps(v, _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
            let a = _mm256_andnot_ps(sign, z);
            let t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(super::ERF_P), a, one));
            let mut poly = _mm256_set1_ps(super::ERF_A[4]);
            for c in super::ERF_A[..4].iter().rev() {
                poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(*c));
            }
            poly = _mm256_mul_ps(poly, t);
            // exp8 clamps its argument, so large |z| give 1 − (tiny) instead of denormals.
            let e = exp8(_mm256_mul_ps(_mm256_xor_ps(a, sign), a));
            let y = _mm256_fnmadd_ps(poly, e, one);
            let erf = _mm256_or_ps(y, _mm256_and_ps(sign, z));
            let g = _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, erf));
            // SAFETY: as the load above.
            unsafe { _mm256_storeu_ps(p.add(k), g) };
            k += 8;
        }
        for v in &mut x[k..] {
            *v = 0.5 * *v * (1.0 + super::erf(*v * std::f32::consts::FRAC_1_SQRT_2));
        }
    }

    /// [`super::silu_mul`] over the common length.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
        let n = gate.len().min(up.len());
        let (pg, pu) = (gate.as_mut_ptr(), up.as_ptr());
        let one = _mm256_set1_ps(1.0);
        let mut k = 0;
        while k + 8 <= n {
            // SAFETY: elements k..k + 8 ≤ n of both slices.
            unsafe {
                let g = _mm256_loadu_ps(pg.add(k));
                let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
                let silu = _mm256_div_ps(g, _mm256_add_ps(one, e));
                _mm256_storeu_ps(pg.add(k), _mm256_mul_ps(silu, _mm256_loadu_ps(pu.add(k))));
            }
            k += 8;
        }
        while k < n {
            let g = gate[k];
            gate[k] = g / (1.0 + (-g).exp()) * up[k];
            k += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        for (x, want) in [
            (0.0f32, 0.0f32),
            (0.5, 0.520_499_9),
            (1.0, 0.842_700_8),
            (-1.0, -0.842_700_8),
            (2.5, 0.999_593),
            (-5.0, -1.0),
        ] {
            assert!((erf(x) - want).abs() < 2e-7, "erf({x}) = {}", erf(x));
        }
        let mut g = [1.0f32];
        gelu(&mut g);
        assert!((g[0] - 0.841_344_7).abs() < 1e-6);
    }

    #[test]
    fn vector_exp_matches_libm() {
        // exp(x − 1.5) over [−91.5, 79.4]: from underflow to values whose sum still fits in f32.
        let mut x: Vec<f32> = (0..1900).map(|i| -90.0 + i as f32 * 0.09).collect();
        // The shift is applied in f32, so the reference starts from the same rounded argument.
        let want: Vec<f64> = x.iter().map(|&v| ((v - 1.5) as f64).exp()).collect();
        let sum = exp_shifted(&mut x, 1.5);
        for (i, (got, want)) in x.iter().zip(&want).enumerate() {
            // Below the clamp the result is a tiny positive number instead of an underflow.
            if *want < 1e-37 {
                assert!(*got < 1e-37, "{i}: {got}");
                continue;
            }
            let rel = ((*got as f64) - want).abs() / want;
            assert!(rel < 4e-7, "exp at {i}: {got} vs {want} (rel {rel})");
        }
        let total: f64 = want.iter().sum();
        // An f32 sum of ~2000 terms: within n·ε of the exact one.
        assert!(((sum as f64) - total).abs() / total < 2e-4);
    }

    // A wrong length is refused by the release assert (its message), not read past.

    #[test]
    #[should_panic(expected = "key_scores: 16 keys of 64 values every 64 do not fit in 1023")]
    fn key_scores_refuses_keys_past_the_end() {
        let (q, keys) = (vec![1.0; 64], vec![1.0; 16 * 64 - 1]);
        key_scores(&q, &keys, 64, 1.0, &mut [0.0; 16]);
    }

    #[test]
    #[should_panic(expected = "weighted_rows: 16 rows of 64 values every 64 do not fit in 1023")]
    fn weighted_rows_refuses_values_past_the_end() {
        let (p, values) = (vec![1.0; 16], vec![1.0; 16 * 64 - 1]);
        weighted_rows(&p, &values, 64, &mut [0.0; 64]);
    }

    #[test]
    fn rows_fit_counts_the_last_row_only_once() {
        assert!(rows_fit(0, 0, 7, 3));
        assert!(rows_fit(13, 3, 5, 3));
        assert!(!rows_fit(12, 3, 5, 3));
        assert!(!rows_fit(usize::MAX, 3, usize::MAX, 1));
    }

    #[test]
    fn ops_match_plain_loops_on_odd_lengths() {
        for n in [1, 7, 8, 17, 64, 577] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) / 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 2.0).collect();
            let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - want).abs() < 1e-4 * (1.0 + want.abs()));
            let mut y = b.clone();
            axpy(&mut y, 0.5, &a);
            for i in 0..n {
                assert!((y[i] - (b[i] + 0.5 * a[i])).abs() < 1e-6);
            }
            let c: Vec<i8> = (0..n)
                .map(|i| ((i * 37 % 255) as i32 - 127) as i8)
                .collect();
            let want: f32 = c.iter().zip(&b).map(|(c, y)| *c as f32 * y).sum();
            assert!((dot_i8(&c, &b) - want).abs() < 1e-4 * (1.0 + want.abs()));
            let mut y = b.clone();
            axpy_i8(&mut y, 0.25, &c);
            for i in 0..n {
                assert!((y[i] - (b[i] + 0.25 * c[i] as f32)).abs() < 1e-5);
            }
            let mut g = a.clone();
            gelu(&mut g);
            for i in 0..n {
                let x = a[i] as f64;
                // Φ(x) from the scalar erf, checked against known values in its own test.
                let want = 0.5 * x * (1.0 + erf((x / std::f64::consts::SQRT_2) as f32) as f64);
                assert!(
                    (g[i] as f64 - want).abs() < 1e-6 * (1.0 + want.abs()),
                    "gelu {}",
                    g[i]
                );
            }
            let mut g = a.clone();
            silu_mul(&mut g, &b);
            for i in 0..n {
                let want = a[i] / (1.0 + (-a[i]).exp()) * b[i];
                assert!(
                    (g[i] - want).abs() < 1e-5 * (1.0 + want.abs()),
                    "{} vs {want}",
                    g[i]
                );
            }
            // Attention helpers: rows of width 3 taken every 5 values.
            if n >= 17 {
                for (hd, stride) in [(3, 5), (8, 9)] {
                    let rows = (n - hd) / stride + 1;
                    let mut sc = vec![0.0; rows];
                    key_scores(&a[..hd], &b, stride, 0.5, &mut sc);
                    for (j, s) in sc.iter().enumerate() {
                        let want = 0.5 * (0..hd).map(|d| a[d] * b[j * stride + d]).sum::<f32>();
                        assert!(
                            (s - want).abs() < 1e-5 * (1.0 + want.abs()),
                            "{s} vs {want}"
                        );
                    }
                }
                for width in [3, 8, 40].into_iter().filter(|&w| w <= n) {
                    let rows = (n - width) / 5 + 1;
                    let mut o = vec![f32::NAN; width];
                    weighted_rows(&a[..rows], &b, 5, &mut o);
                    for (d, o) in o.iter().enumerate() {
                        let want: f32 = (0..rows).map(|j| a[j] * b[j * 5 + d]).sum();
                        assert!(
                            (o - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "{o} vs {want}"
                        );
                    }
                }
            }
            let mut row = a.clone();
            softmax_prefix(&mut row, n.div_ceil(2));
            let live: f32 = row[..n.div_ceil(2)].iter().sum();
            assert!((live - 1.0).abs() < 1e-5);
            assert!(row[n.div_ceil(2)..].iter().all(|&v| v == 0.0));
        }
    }
}
