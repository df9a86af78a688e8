//! Scalar quantizers of the compressed KV cache: symmetric int8/int4 rows and groups (as
//! llama.cpp's `q8_0` / `q4_0`).

use half::f16;

use crate::kernels::ops;

/// Elements per quantization group along the head dimension.
pub const GROUP: usize = 32;

/// `q = round(x/d)` with `d = max|x|/127` (as f16, the stored scale); returns the scale.
pub fn quantize_row_i8(x: &[f32], q: &mut [i8]) -> f16 {
    quantize_row_sym(x, 127.0, |i, v| q[i] = v)
}

/// `x` quantized to 4 bits (−7..7, `d = max|x|/7` as f16, returned), written as nibbles
/// `q + 8` into the packed stream `out` starting at nibble `at` (low nibble first).
pub fn quantize_row_i4(x: &[f32], out: &mut [u8], at: usize) -> f16 {
    quantize_row_sym(x, 7.0, |i, v| {
        let n = at + i;
        let nib = (v + 8) as u8;
        let b = &mut out[n / 2];
        *b = if n % 2 == 0 {
            (*b & 0xF0) | nib
        } else {
            (*b & 0x0F) | (nib << 4)
        };
    })
}

/// Symmetric quantization of `x` with `qmax` levels each side; `put(i, q)` stores quant `i`.
fn quantize_row_sym(x: &[f32], qmax: f32, mut put: impl FnMut(usize, i8)) -> f16 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = f16::from_f32(amax / qmax);
    let df = d.to_f32();
    let inv = if df > 0.0 { 1.0 / df } else { 0.0 };
    for (i, v) in x.iter().enumerate() {
        put(i, (v * inv).round().clamp(-qmax, qmax) as i8);
    }
    d
}

/// The `out.len()` 4-bit quants starting at nibble `at` of a packed stream, as int8 (−8..7).
pub fn unpack_i4(packed: &[u8], at: usize, out: &mut [i8]) {
    if at % 2 == 0 {
        // Whole bytes (every group and coefficient row starts on one): two quants per byte, in a
        // loop the compiler vectorizes (the nibble-by-nibble one below is scalar).
        let bytes = &packed[at / 2..(at + out.len()).div_ceil(2)];
        let mut pairs = out.chunks_exact_mut(2);
        for (o, b) in (&mut pairs).zip(bytes) {
            o[0] = (b & 0x0F) as i8 - 8;
            o[1] = (b >> 4) as i8 - 8;
        }
        if let [last] = pairs.into_remainder() {
            *last = (bytes[bytes.len() - 1] & 0x0F) as i8 - 8;
        }
        return;
    }
    for (i, o) in out.iter_mut().enumerate() {
        let n = at + i;
        let b = packed[n / 2];
        *o = (if n % 2 == 0 { b & 0x0F } else { b >> 4 }) as i8 - 8;
    }
}

/// Quantizes `x` (length a multiple of 32) per group of 32 to `bits` (8 or 4) with f16 scales.
pub fn quantize_groups(x: &[f32], bits: u32) -> (Vec<u8>, Vec<f16>) {
    let groups = x.len() / GROUP;
    let mut scale = Vec::with_capacity(groups);
    let mut data = vec![0u8; if bits == 8 { x.len() } else { x.len() / 2 }];
    for (gi, g) in x.chunks_exact(GROUP).enumerate() {
        let d = if bits == 8 {
            let out = &mut data[gi * GROUP..][..GROUP];
            quantize_row_sym(g, 127.0, |i, v| out[i] = v as u8)
        } else {
            quantize_row_i4(g, &mut data, gi * GROUP)
        };
        scale.push(d);
    }
    (data, scale)
}

/// Dequantizes the `out.len()` values starting at element `at` of a group-quantized buffer
/// (`at` and the length multiples of 32) into `out`.
pub(super) fn dequantize_groups(bits: u32, data: &[u8], scale: &[f16], at: usize, out: &mut [f32]) {
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

/// The 32 quants of the group starting at element `at`, as int8 (4-bit ones unpacked into `buf`).
#[inline]
pub(super) fn group_quants<'a>(
    bits: u32,
    data: &'a [u8],
    at: usize,
    buf: &'a mut [i8; GROUP],
) -> &'a [i8] {
    if bits == 8 {
        let bytes = &data[at..at + GROUP];
        // SAFETY: `bytes` is GROUP initialised bytes (bounds-checked above), and u8 and i8 have
        // the same size, alignment and validity; the view borrows `data` for `'a`.
        return unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<i8>(), GROUP) };
    }
    unpack_i4(data, at, buf);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::testutil::data;

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
    fn unpacking_by_bytes_equals_unpacking_by_nibbles() {
        let packed: Vec<u8> = (0..40u32).map(|i| (i * 37 + 11) as u8).collect();
        for at in [0, 1, 2, 7, 32] {
            for len in [1, 2, 5, 32, 33] {
                let want: Vec<i8> = (at..at + len)
                    .map(|n| {
                        (if n % 2 == 0 {
                            packed[n / 2] & 0x0F
                        } else {
                            packed[n / 2] >> 4
                        }) as i8
                            - 8
                    })
                    .collect();
                let mut got = vec![0i8; len];
                unpack_i4(&packed, at, &mut got);
                assert_eq!(got, want, "at {at}, {len} quants");
            }
        }
    }

    #[test]
    fn int4_rows_pack_at_odd_offsets() {
        let mut packed = vec![0u8; 4];
        let d = quantize_row_i4(&[0.7, -0.7, 0.1], &mut packed, 3);
        let mut q = [0i8; 3];
        unpack_i4(&packed, 3, &mut q);
        assert_eq!(q, [7, -7, 1]);
        assert!((d.to_f32() - 0.1).abs() < 1e-4);
        // The nibbles around the row are untouched.
        let mut before = [0i8; 3];
        unpack_i4(&packed, 0, &mut before);
        assert_eq!(before, [-8, -8, -8]);
    }
}
