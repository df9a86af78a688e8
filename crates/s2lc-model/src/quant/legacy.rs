//! ggml's 32-element block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): their sizes and decoders.

use super::f16_at;

pub(super) const Q4_0_BYTES: usize = 2 + 16;
pub(super) const Q4_1_BYTES: usize = 2 + 2 + 16;
pub(super) const Q5_0_BYTES: usize = 2 + 4 + 16;
pub(super) const Q5_1_BYTES: usize = 2 + 2 + 4 + 16;
pub(super) const Q8_0_BYTES: usize = 2 + 32;

/// Q4_0, 18 bytes per 32 elements:
/// `d: f16 | qs: [u8; 16]`. Element `j < 16` is the low nibble of `qs[j]`, element `j + 16` its
/// high nibble; `x = d·(q − 8)`.
pub(super) fn block_q4_0(b: &[u8; Q4_0_BYTES], y: &mut [f32; 32]) {
    let d = f16_at(b[0], b[1]);
    for j in 0..16 {
        let q = b[2 + j];
        y[j] = d * ((q & 0x0F) as i32 - 8) as f32;
        y[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
    }
}

/// Q4_1, 20 bytes per 32 elements:
/// `d: f16 | m: f16 | qs: [u8; 16]`, nibbles as in Q4_0; `x = d·q + m`.
pub(super) fn block_q4_1(b: &[u8; Q4_1_BYTES], y: &mut [f32; 32]) {
    let d = f16_at(b[0], b[1]);
    let m = f16_at(b[2], b[3]);
    for j in 0..16 {
        let q = b[4 + j];
        y[j] = d * (q & 0x0F) as f32 + m;
        y[j + 16] = d * (q >> 4) as f32 + m;
    }
}

/// The 5-bit quant `j` (0..32) of a Q5 block: the nibble of `qs` as in Q4_0, plus bit `j` of the
/// little-endian `qh: u32` as bit 4.
fn q5(qs: &[u8], qh: u32, j: usize) -> u8 {
    let lo = if j < 16 {
        qs[j] & 0x0F
    } else {
        qs[j - 16] >> 4
    };
    lo | ((((qh >> j) & 1) as u8) << 4)
}

/// Q5_0, 22 bytes per 32 elements:
/// `d: f16 | qh: u32 (bit j = bit 4 of element j) | qs: [u8; 16]` (low 4 bits as in Q4_0);
/// `x = d·(q − 16)`.
pub(super) fn block_q5_0(b: &[u8; Q5_0_BYTES], y: &mut [f32; 32]) {
    let d = f16_at(b[0], b[1]);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..];
    for (j, y) in y.iter_mut().enumerate() {
        *y = d * (q5(qs, qh, j) as i32 - 16) as f32;
    }
}

/// Q5_1, 24 bytes per 32 elements:
/// `d: f16 | m: f16 | qh: u32 | qs: [u8; 16]`, quants as in Q5_0; `x = d·q + m`.
pub(super) fn block_q5_1(b: &[u8; Q5_1_BYTES], y: &mut [f32; 32]) {
    let d = f16_at(b[0], b[1]);
    let m = f16_at(b[2], b[3]);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..];
    for (j, y) in y.iter_mut().enumerate() {
        *y = d * q5(qs, qh, j) as f32 + m;
    }
}

/// Q8_0, 34 bytes per 32 elements: `d: f16 | qs: [i8; 32]`; `x = d·q`.
pub(super) fn block_q8_0(b: &[u8; Q8_0_BYTES], y: &mut [f32; 32]) {
    let d = f16_at(b[0], b[1]);
    for (y, &q) in y.iter_mut().zip(&b[2..]) {
        *y = q as i8 as f32 * d;
    }
}
