//! The k-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K), 256-element super-blocks with per-sub-block
//! scales: their sizes, the packed 6-bit scale/minimum unpacking and the decoders.

use super::{f16_at, QK_K};

pub(super) const Q2_K_BYTES: usize = QK_K / 16 + QK_K / 4 + 2 + 2;
pub(super) const Q3_K_BYTES: usize = QK_K / 8 + QK_K / 4 + 12 + 2;
pub(super) const Q4_K_BYTES: usize = 2 + 2 + 12 + QK_K / 2;
pub(super) const Q5_K_BYTES: usize = 2 + 2 + 12 + QK_K / 8 + QK_K / 2;
pub(super) const Q6_K_BYTES: usize = QK_K / 2 + QK_K / 4 + QK_K / 16 + 2;
pub(super) const Q8_K_BYTES: usize = 4 + QK_K + 2 * (QK_K / 16);

/// Q2_K, 84 bytes per 256 elements:
/// `scales: [u8; 16] | qs: [u8; 64] | d: f16 | dmin: f16`.
/// Sub-block `i` (elements `16i..16i+16`) has scale `scales[i] & 0xF` and minimum
/// `scales[i] >> 4`. Element `e` lives in half `h = e / 128`, lane `l = e % 32`, shift
/// `s = 2·((e % 128) / 32)`: `q = (qs[32h + l] >> s) & 3`.
/// `x = (d·sc)·q − dmin·m`.
pub(super) fn block_q2_k(b: &[u8; Q2_K_BYTES], y: &mut [f32; QK_K]) {
    let (scales, rest) = b.split_at(QK_K / 16);
    let (qs, rest) = rest.split_at(QK_K / 4);
    let d = f16_at(rest[0], rest[1]);
    let dmin = f16_at(rest[2], rest[3]);
    for (i, y) in y.chunks_exact_mut(16).enumerate() {
        let dl = d * (scales[i] & 0x0F) as f32;
        let ml = dmin * (scales[i] >> 4) as f32;
        for (t, y) in y.iter_mut().enumerate() {
            let e = 16 * i + t;
            let (h, shift, l) = (e / 128, 2 * ((e % 128) / 32), e % 32);
            let q = (qs[32 * h + l] >> shift) & 3;
            *y = dl * q as f32 - ml;
        }
    }
}

/// Q3_K, 110 bytes per 256 elements:
/// `hmask: [u8; 32] | qs: [u8; 64] | scales: [u8; 12] | d: f16`.
/// Sixteen 6-bit scales (sub-blocks of 16): scale `i` is
/// `((scales[i % 8] >> 4·(i / 8)) & 0xF) | ((scales[8 + i % 4] >> 2·(i / 4)) & 3) << 4`, minus 32.
/// Element `e`: low two bits as in Q2_K, high bit `(hmask[e % 32] >> (e / 32)) & 1`; the quant is
/// `low − 4` when that bit is clear, `low` when set. `x = (d·sc)·q`.
pub(super) fn block_q3_k(b: &[u8; Q3_K_BYTES], y: &mut [f32; QK_K]) {
    let (hmask, rest) = b.split_at(QK_K / 8);
    let (qs, rest) = rest.split_at(QK_K / 4);
    let (scales, rest) = rest.split_at(12);
    let d = f16_at(rest[0], rest[1]);
    for (i, y) in y.chunks_exact_mut(16).enumerate() {
        let lo = (scales[i % 8] >> (4 * (i / 8))) & 0x0F;
        let hi = (scales[8 + i % 4] >> (2 * (i / 4))) & 0x03;
        let sc = (lo | (hi << 4)) as i32 - 32;
        let dl = d * sc as f32;
        for (t, y) in y.iter_mut().enumerate() {
            let e = 16 * i + t;
            let (h, shift, l) = (e / 128, 2 * ((e % 128) / 32), e % 32);
            let low = ((qs[32 * h + l] >> shift) & 3) as i32;
            let high_set = (hmask[l] >> (e / 32)) & 1 == 1;
            let q = if high_set { low } else { low - 4 };
            *y = dl * q as f32;
        }
    }
}

/// The 6-bit scale and minimum of sub-block `j` (0..8) of a Q4_K/Q5_K block (ggml's
/// `get_scale_min_k4`). The 12 bytes hold, for `j < 4`, `sc = s[j] & 63`, `m = s[j + 4] & 63`;
/// for `j ≥ 4`, the low 4 bits in `s[j + 4]` (scale low nibble, minimum high nibble) and the high
/// 2 bits in the top bits of `s[j − 4]` (scale) and `s[j]` (minimum).
pub(crate) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Q4_K, 144 bytes per 256 elements:
/// `d: f16 | dmin: f16 | scales: [u8; 12] | qs: [u8; 128]`.
/// Eight sub-blocks of 32 with 6-bit scale/minimum (see [`scale_min_k4`]). Group `g` (0..4) of 64
/// elements uses `qs[32g..32g+32]`: low nibbles are sub-block `2g`, high nibbles sub-block `2g+1`.
/// `x = (d·sc)·q − dmin·m`.
pub(super) fn block_q4_k(b: &[u8; Q4_K_BYTES], y: &mut [f32; QK_K]) {
    let d = f16_at(b[0], b[1]);
    let dmin = f16_at(b[2], b[3]);
    let (scales, qs) = b[4..].split_at(12);
    for (g, y) in y.chunks_exact_mut(64).enumerate() {
        let (sc0, m0) = scale_min_k4(2 * g, scales);
        let (sc1, m1) = scale_min_k4(2 * g + 1, scales);
        let (d0, min0) = (d * sc0 as f32, dmin * m0 as f32);
        let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
        let (lo, hi) = y.split_at_mut(32);
        for (l, &q) in qs[32 * g..32 * g + 32].iter().enumerate() {
            lo[l] = d0 * (q & 0x0F) as f32 - min0;
            hi[l] = d1 * (q >> 4) as f32 - min1;
        }
    }
}

/// Q5_K, 176 bytes per 256 elements:
/// `d: f16 | dmin: f16 | scales: [u8; 12] | qh: [u8; 32] | qs: [u8; 128]`.
/// As Q4_K, plus bit 4 of element `32s + l` (sub-block `s`, lane `l`) is bit `s` of `qh[l]`.
/// `x = (d·sc)·q − dmin·m`.
pub(super) fn block_q5_k(b: &[u8; Q5_K_BYTES], y: &mut [f32; QK_K]) {
    let d = f16_at(b[0], b[1]);
    let dmin = f16_at(b[2], b[3]);
    let (scales, rest) = b[4..].split_at(12);
    let (qh, qs) = rest.split_at(QK_K / 8);
    for (g, y) in y.chunks_exact_mut(64).enumerate() {
        let (sc0, m0) = scale_min_k4(2 * g, scales);
        let (sc1, m1) = scale_min_k4(2 * g + 1, scales);
        let (d0, min0) = (d * sc0 as f32, dmin * m0 as f32);
        let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
        let (lo, hi) = y.split_at_mut(32);
        for l in 0..32 {
            let q = qs[32 * g + l];
            let q0 = (q & 0x0F) | (((qh[l] >> (2 * g)) & 1) << 4);
            let q1 = (q >> 4) | (((qh[l] >> (2 * g + 1)) & 1) << 4);
            lo[l] = d0 * q0 as f32 - min0;
            hi[l] = d1 * q1 as f32 - min1;
        }
    }
}

/// Q6_K, 210 bytes per 256 elements:
/// `ql: [u8; 128] | qh: [u8; 64] | scales: [i8; 16] | d: f16`.
/// Each half `h` (128 elements) uses `ql[64h..64h+64]` and `qh[32h..32h+32]`; for lane `l < 32`
/// its four quarters `k = 0..4` (element `128h + 32k + l`) take the low nibble of
/// `ql[64h + l]`, of `ql[64h + 32 + l]`, the high nibble of `ql[64h + l]`, of `ql[64h + 32 + l]`,
/// each with bits `2k..2k+2` of `qh[32h + l]` as bits 4–5. Sub-blocks of 16 share `scales[e / 16]`.
/// `x = (d·sc)·(q − 32)`.
pub(super) fn block_q6_k(b: &[u8; Q6_K_BYTES], y: &mut [f32; QK_K]) {
    let (ql, rest) = b.split_at(QK_K / 2);
    let (qh, rest) = rest.split_at(QK_K / 4);
    let (scales, rest) = rest.split_at(QK_K / 16);
    let d = f16_at(rest[0], rest[1]);
    for (h, y) in y.chunks_exact_mut(128).enumerate() {
        let ql = &ql[64 * h..64 * h + 64];
        let qh = &qh[32 * h..32 * h + 32];
        let sc = &scales[8 * h..8 * h + 8];
        for l in 0..32 {
            let is = l / 16;
            let (a, b, hb) = (ql[l], ql[l + 32], qh[l]);
            let q1 = ((a & 0x0F) | ((hb & 3) << 4)) as i32 - 32;
            let q2 = ((b & 0x0F) | (((hb >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((a >> 4) | (((hb >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((b >> 4) | (((hb >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * sc[is] as i8 as f32 * q1 as f32;
            y[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
            y[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
            y[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
        }
    }
}

/// Q8_K, 292 bytes per 256 elements:
/// `d: f32 | qs: [i8; 256] | bsums: [i16; 16]` (`bsums` are sums for dot products, unused here);
/// `x = d·q`.
pub(super) fn block_q8_k(b: &[u8; Q8_K_BYTES], y: &mut [f32; QK_K]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (y, &q) in y.iter_mut().zip(&b[4..4 + QK_K]) {
        *y = d * q as i8 as f32;
    }
}
