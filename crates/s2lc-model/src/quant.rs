//! ggml tensor element types and their dequantization to f32.
//!
//! A ggml tensor row is a sequence of *blocks*: `block_size` consecutive elements stored in
//! `type_size` bytes. Plain types (F32, F16, BF16, F64) are blocks of one element. Quantized types
//! store small integers `q` with per-block (and, for the k-quants, per-sub-block) scales `d` and
//! offsets/minimums `m`, and decode as `x = d·q` or `x = d·q + m` (`d·q − m` for the k-quants).
//! All multi-byte fields are little-endian; `f16` is IEEE half precision, `bf16` the top half of an
//! IEEE f32. The layouts are documented on each `block_*` function below and follow ggml's
//! `ggml-common.h` / `ggml-quants.c` and gguf-py's `quants.py`; the operation order of every
//! decode matches the reference (`(d·sc)·q − dmin·m`), so results agree bit for bit.

use half::{bf16, f16};

/// Elements in one k-quant super-block (`QK_K` in ggml).
pub const QK_K: usize = 256;

/// A ggml tensor element type, with its numeric id as written in GGUF tensor infos.
///
/// Every type ggml currently defines is listed, so the byte size of any tensor can be validated;
/// [`GgmlType::can_dequantize`] says which ones [`dequantize`] decodes.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    /// IEEE f32.
    F32 = 0,
    /// IEEE f16.
    F16 = 1,
    /// 32 elements: f16 scale, 4-bit quants, `x = d·(q − 8)`.
    Q4_0 = 2,
    /// 32 elements: f16 scale and minimum, 4-bit quants, `x = d·q + m`.
    Q4_1 = 3,
    /// 32 elements: f16 scale, 5-bit quants, `x = d·(q − 16)`.
    Q5_0 = 6,
    /// 32 elements: f16 scale and minimum, 5-bit quants, `x = d·q + m`.
    Q5_1 = 7,
    /// 32 elements: f16 scale, 8-bit signed quants, `x = d·q`.
    Q8_0 = 8,
    /// 32 elements: f16 scale and sum, 8-bit quants (an activation format; not decoded here).
    Q8_1 = 9,
    /// 256-element super-block, 2-bit quants with 4-bit sub-block scales and minimums.
    Q2_K = 10,
    /// 256-element super-block, 3-bit quants with 6-bit sub-block scales.
    Q3_K = 11,
    /// 256-element super-block, 4-bit quants with 6-bit sub-block scales and minimums.
    Q4_K = 12,
    /// 256-element super-block, 5-bit quants with 6-bit sub-block scales and minimums.
    Q5_K = 13,
    /// 256-element super-block, 6-bit quants with 8-bit sub-block scales.
    Q6_K = 14,
    /// 256-element super-block, f32 scale and 8-bit quants.
    Q8_K = 15,
    /// Importance-matrix 2-bit type (not decoded here).
    IQ2_XXS = 16,
    /// Importance-matrix 2-bit type (not decoded here).
    IQ2_XS = 17,
    /// Importance-matrix 3-bit type (not decoded here).
    IQ3_XXS = 18,
    /// Importance-matrix 1-bit type (not decoded here).
    IQ1_S = 19,
    /// Non-linear 4-bit type (not decoded here).
    IQ4_NL = 20,
    /// Importance-matrix 3-bit type (not decoded here).
    IQ3_S = 21,
    /// Importance-matrix 2-bit type (not decoded here).
    IQ2_S = 22,
    /// Non-linear 4-bit super-block type (not decoded here).
    IQ4_XS = 23,
    /// 8-bit signed integer (not decoded here).
    I8 = 24,
    /// 16-bit signed integer (not decoded here).
    I16 = 25,
    /// 32-bit signed integer (not decoded here).
    I32 = 26,
    /// 64-bit signed integer (not decoded here).
    I64 = 27,
    /// IEEE f64 (decoded by rounding to f32).
    F64 = 28,
    /// Importance-matrix 1-bit type (not decoded here).
    IQ1_M = 29,
    /// bfloat16.
    BF16 = 30,
    /// Ternary type (not decoded here).
    TQ1_0 = 34,
    /// Ternary type (not decoded here).
    TQ2_0 = 35,
    /// Microscaling FP4 (not decoded here).
    MXFP4 = 39,
}

impl GgmlType {
    /// Every known type, in id order.
    pub const ALL: [GgmlType; 32] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
        GgmlType::IQ2_XXS,
        GgmlType::IQ2_XS,
        GgmlType::IQ3_XXS,
        GgmlType::IQ1_S,
        GgmlType::IQ4_NL,
        GgmlType::IQ3_S,
        GgmlType::IQ2_S,
        GgmlType::IQ4_XS,
        GgmlType::I8,
        GgmlType::I16,
        GgmlType::I32,
        GgmlType::I64,
        GgmlType::F64,
        GgmlType::IQ1_M,
        GgmlType::BF16,
        GgmlType::TQ1_0,
        GgmlType::TQ2_0,
        GgmlType::MXFP4,
    ];

    /// The type with ggml id `id`, or `None` for ids ggml does not (or no longer) define.
    pub fn from_id(id: u32) -> Option<Self> {
        GgmlType::ALL.into_iter().find(|t| t.id() == id)
    }

    /// The ggml numeric id (as stored in GGUF tensor infos).
    pub fn id(self) -> u32 {
        self as u32
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | F16 | BF16 | F64 | I8 | I16 | I32 | I64 => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 | IQ4_NL | MXFP4 => 32,
            Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | Q8_K | IQ2_XXS | IQ2_XS | IQ3_XXS | IQ1_S
            | IQ3_S | IQ2_S | IQ4_XS | IQ1_M | TQ1_0 | TQ2_0 => QK_K,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 => 4,
            F16 | BF16 => 2,
            F64 => 8,
            I8 => 1,
            I16 => 2,
            I32 => 4,
            I64 => 8,
            Q4_0 => Q4_0_BYTES,
            Q4_1 => Q4_1_BYTES,
            Q5_0 => Q5_0_BYTES,
            Q5_1 => Q5_1_BYTES,
            Q8_0 => Q8_0_BYTES,
            Q8_1 => 2 + 2 + 32,
            Q2_K => Q2_K_BYTES,
            Q3_K => Q3_K_BYTES,
            Q4_K => Q4_K_BYTES,
            Q5_K => Q5_K_BYTES,
            Q6_K => Q6_K_BYTES,
            Q8_K => Q8_K_BYTES,
            IQ2_XXS => 2 + QK_K / 4,
            IQ2_XS => 2 + QK_K / 4 + QK_K / 32,
            IQ3_XXS => 2 + QK_K / 4 + QK_K / 8,
            IQ1_S => 2 + QK_K / 8 + QK_K / 16,
            IQ4_NL => 2 + 16,
            IQ3_S => 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4,
            IQ2_S => 2 + QK_K / 4 + QK_K / 16,
            IQ4_XS => 2 + 2 + QK_K / 2 + QK_K / 64,
            IQ1_M => QK_K / 8 + QK_K / 16 + QK_K / 32,
            TQ1_0 => 2 + 4 * 13,
            TQ2_0 => 2 + QK_K / 4,
            MXFP4 => 1 + 16,
        }
    }

    /// The name ggml and gguf-py use (`"Q4_K"`, `"F32"`, ...).
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            IQ2_XXS => "IQ2_XXS",
            IQ2_XS => "IQ2_XS",
            IQ3_XXS => "IQ3_XXS",
            IQ1_S => "IQ1_S",
            IQ4_NL => "IQ4_NL",
            IQ3_S => "IQ3_S",
            IQ2_S => "IQ2_S",
            IQ4_XS => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            IQ1_M => "IQ1_M",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            MXFP4 => "MXFP4",
        }
    }

    /// Bytes taken by `n` consecutive elements (one row of a tensor), or `None` when `n` is not a
    /// whole number of blocks or the size overflows `usize`.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        if n % self.block_size() != 0 {
            return None;
        }
        (n / self.block_size()).checked_mul(self.type_size())
    }

    /// Whether [`dequantize`] decodes this type.
    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16
                | BF16
                | F64
                | Q4_0
                | Q4_1
                | Q5_0
                | Q5_1
                | Q8_0
                | Q2_K
                | Q3_K
                | Q4_K
                | Q5_K
                | Q6_K
                | Q8_K
        )
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a buffer could not be dequantized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    /// The type is known but this crate has no decoder for it.
    #[error("dequantization of {0} tensors is not supported")]
    Unsupported(GgmlType),
    /// The requested element count is not a whole number of blocks.
    #[error("{n} elements is not a multiple of the {dtype} block size {block}")]
    NotBlockMultiple {
        /// The element type.
        dtype: GgmlType,
        /// Requested elements.
        n: usize,
        /// Elements per block.
        block: usize,
    },
    /// The byte buffer does not hold exactly the blocks of the requested elements.
    #[error("{n} {dtype} elements take {expected} bytes, got {got}")]
    ByteLength {
        /// The element type.
        dtype: GgmlType,
        /// Requested elements.
        n: usize,
        /// Bytes those elements take.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
}

/// Decodes `out.len()` elements of type `dtype` from `bytes` into `out` (f32, in storage order).
///
/// `out.len()` must be a multiple of `dtype.block_size()` and `bytes` must hold exactly those
/// blocks (`dtype.row_bytes(out.len())` bytes). Allocates nothing.
pub fn dequantize(dtype: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), QuantError> {
    if !dtype.can_dequantize() {
        return Err(QuantError::Unsupported(dtype));
    }
    let n = out.len();
    let not_multiple = QuantError::NotBlockMultiple {
        dtype,
        n,
        block: dtype.block_size(),
    };
    let expected = dtype.row_bytes(n).ok_or(not_multiple)?;
    if bytes.len() != expected {
        return Err(QuantError::ByteLength {
            dtype,
            n,
            expected,
            got: bytes.len(),
        });
    }
    use GgmlType::*;
    match dtype {
        F32 => for_blocks::<4, 1>(bytes, out, |b, y| y[0] = f32::from_le_bytes(*b)),
        F16 => for_blocks::<2, 1>(bytes, out, |b, y| y[0] = f16::from_le_bytes(*b).to_f32()),
        BF16 => for_blocks::<2, 1>(bytes, out, |b, y| y[0] = bf16::from_le_bytes(*b).to_f32()),
        F64 => for_blocks::<8, 1>(bytes, out, |b, y| y[0] = f64::from_le_bytes(*b) as f32),
        Q4_0 => for_blocks(bytes, out, block_q4_0),
        Q4_1 => for_blocks(bytes, out, block_q4_1),
        Q5_0 => for_blocks(bytes, out, block_q5_0),
        Q5_1 => for_blocks(bytes, out, block_q5_1),
        Q8_0 => for_blocks(bytes, out, block_q8_0),
        Q2_K => for_blocks(bytes, out, block_q2_k),
        Q3_K => for_blocks(bytes, out, block_q3_k),
        Q4_K => for_blocks(bytes, out, block_q4_k),
        Q5_K => for_blocks(bytes, out, block_q5_k),
        Q6_K => for_blocks(bytes, out, block_q6_k),
        Q8_K => for_blocks(bytes, out, block_q8_k),
        _ => return Err(QuantError::Unsupported(dtype)),
    }
    Ok(())
}

/// Applies `decode` to each `N`-byte block of `bytes` and the matching `B` elements of `out`.
/// The caller has checked that both hold the same number of whole blocks.
fn for_blocks<const N: usize, const B: usize>(
    bytes: &[u8],
    out: &mut [f32],
    decode: impl Fn(&[u8; N], &mut [f32; B]),
) {
    for (b, y) in bytes.chunks_exact(N).zip(out.chunks_exact_mut(B)) {
        // `chunks_exact` yields exactly N bytes and B elements, so these conversions succeed.
        if let (Ok(b), Ok(y)) = (<&[u8; N]>::try_from(b), <&mut [f32; B]>::try_from(y)) {
            decode(b, y);
        }
    }
}

fn f16_at(lo: u8, hi: u8) -> f32 {
    f16::from_le_bytes([lo, hi]).to_f32()
}

const Q4_0_BYTES: usize = 2 + 16;
const Q4_1_BYTES: usize = 2 + 2 + 16;
const Q5_0_BYTES: usize = 2 + 4 + 16;
const Q5_1_BYTES: usize = 2 + 2 + 4 + 16;
const Q8_0_BYTES: usize = 2 + 32;
const Q2_K_BYTES: usize = QK_K / 16 + QK_K / 4 + 2 + 2;
const Q3_K_BYTES: usize = QK_K / 8 + QK_K / 4 + 12 + 2;
const Q4_K_BYTES: usize = 2 + 2 + 12 + QK_K / 2;
const Q5_K_BYTES: usize = 2 + 2 + 12 + QK_K / 8 + QK_K / 2;
const Q6_K_BYTES: usize = QK_K / 2 + QK_K / 4 + QK_K / 16 + 2;
const Q8_K_BYTES: usize = 4 + QK_K + 2 * (QK_K / 16);

/// Q4_0, 18 bytes per 32 elements:
/// `d: f16 | qs: [u8; 16]`. Element `j < 16` is the low nibble of `qs[j]`, element `j + 16` its
/// high nibble; `x = d·(q − 8)`.
fn block_q4_0(b: &[u8; Q4_0_BYTES], y: &mut [f32; 32]) {
    let d = f16_at(b[0], b[1]);
    for j in 0..16 {
        let q = b[2 + j];
        y[j] = d * ((q & 0x0F) as i32 - 8) as f32;
        y[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
    }
}

/// Q4_1, 20 bytes per 32 elements:
/// `d: f16 | m: f16 | qs: [u8; 16]`, nibbles as in Q4_0; `x = d·q + m`.
fn block_q4_1(b: &[u8; Q4_1_BYTES], y: &mut [f32; 32]) {
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
fn block_q5_0(b: &[u8; Q5_0_BYTES], y: &mut [f32; 32]) {
    let d = f16_at(b[0], b[1]);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..];
    for (j, y) in y.iter_mut().enumerate() {
        *y = d * (q5(qs, qh, j) as i32 - 16) as f32;
    }
}

/// Q5_1, 24 bytes per 32 elements:
/// `d: f16 | m: f16 | qh: u32 | qs: [u8; 16]`, quants as in Q5_0; `x = d·q + m`.
fn block_q5_1(b: &[u8; Q5_1_BYTES], y: &mut [f32; 32]) {
    let d = f16_at(b[0], b[1]);
    let m = f16_at(b[2], b[3]);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..];
    for (j, y) in y.iter_mut().enumerate() {
        *y = d * q5(qs, qh, j) as f32 + m;
    }
}

/// Q8_0, 34 bytes per 32 elements: `d: f16 | qs: [i8; 32]`; `x = d·q`.
fn block_q8_0(b: &[u8; Q8_0_BYTES], y: &mut [f32; 32]) {
    let d = f16_at(b[0], b[1]);
    for (y, &q) in y.iter_mut().zip(&b[2..]) {
        *y = q as i8 as f32 * d;
    }
}

/// Q2_K, 84 bytes per 256 elements:
/// `scales: [u8; 16] | qs: [u8; 64] | d: f16 | dmin: f16`.
/// Sub-block `i` (elements `16i..16i+16`) has scale `scales[i] & 0xF` and minimum
/// `scales[i] >> 4`. Element `e` lives in half `h = e / 128`, lane `l = e % 32`, shift
/// `s = 2·((e % 128) / 32)`: `q = (qs[32h + l] >> s) & 3`.
/// `x = (d·sc)·q − dmin·m`.
fn block_q2_k(b: &[u8; Q2_K_BYTES], y: &mut [f32; QK_K]) {
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
fn block_q3_k(b: &[u8; Q3_K_BYTES], y: &mut [f32; QK_K]) {
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
fn block_q4_k(b: &[u8; Q4_K_BYTES], y: &mut [f32; QK_K]) {
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
fn block_q5_k(b: &[u8; Q5_K_BYTES], y: &mut [f32; QK_K]) {
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
fn block_q6_k(b: &[u8; Q6_K_BYTES], y: &mut [f32; QK_K]) {
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
fn block_q8_k(b: &[u8; Q8_K_BYTES], y: &mut [f32; QK_K]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (y, &q) in y.iter_mut().zip(&b[4..4 + QK_K]) {
        *y = d * q as i8 as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    fn deq(dtype: GgmlType, bytes: &[u8]) -> Vec<f32> {
        let n = bytes.len() / dtype.type_size() * dtype.block_size();
        let mut out = vec![f32::NAN; n];
        dequantize(dtype, bytes, &mut out).unwrap();
        out
    }

    #[test]
    fn ids_round_trip_and_sizes_match_ggml() {
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
        }
        for id in [4, 5, 31, 32, 33, 36, 37, 38, 40, 1000, u32::MAX] {
            assert_eq!(GgmlType::from_id(id), None, "id {id}");
        }
        let sizes = [
            (GgmlType::Q4_0, 32, 18),
            (GgmlType::Q4_1, 32, 20),
            (GgmlType::Q5_0, 32, 22),
            (GgmlType::Q5_1, 32, 24),
            (GgmlType::Q8_0, 32, 34),
            (GgmlType::Q2_K, 256, 84),
            (GgmlType::Q3_K, 256, 110),
            (GgmlType::Q4_K, 256, 144),
            (GgmlType::Q5_K, 256, 176),
            (GgmlType::Q6_K, 256, 210),
            (GgmlType::Q8_K, 256, 292),
            (GgmlType::BF16, 1, 2),
        ];
        for (t, bs, ts) in sizes {
            assert_eq!((t.block_size(), t.type_size()), (bs, ts), "{t}");
        }
        assert_eq!(GgmlType::Q4_K.row_bytes(512), Some(288));
        assert_eq!(GgmlType::Q4_K.row_bytes(100), None);
        assert_eq!(GgmlType::F32.row_bytes(usize::MAX), None);
    }

    #[test]
    fn length_checks() {
        let mut out = vec![0.0; 32];
        assert_eq!(
            dequantize(GgmlType::Q8_0, &[0; 33], &mut out),
            Err(QuantError::ByteLength {
                dtype: GgmlType::Q8_0,
                n: 32,
                expected: 34,
                got: 33
            })
        );
        assert!(matches!(
            dequantize(GgmlType::Q8_0, &[0; 34], &mut out[..31]),
            Err(QuantError::NotBlockMultiple { n: 31, .. })
        ));
        assert_eq!(
            dequantize(GgmlType::IQ2_XXS, &[], &mut []),
            Err(QuantError::Unsupported(GgmlType::IQ2_XXS))
        );
        let msg = QuantError::Unsupported(GgmlType::IQ4_XS).to_string();
        assert!(msg.contains("IQ4_XS"), "{msg}");
        // Zero elements are fine.
        dequantize(GgmlType::Q4_K, &[], &mut []).unwrap();
    }

    #[test]
    fn plain_types() {
        let mut b = Vec::new();
        for x in [1.5f32, -0.0, 3.25e-3] {
            b.extend_from_slice(&x.to_le_bytes());
        }
        assert_eq!(deq(GgmlType::F32, &b), [1.5, -0.0, 3.25e-3]);
        assert_eq!(
            deq(GgmlType::F16, &[0x00, 0x3C, 0x00, 0xC0, 0x01, 0x00]),
            [1.0, -2.0, 2f32.powi(-24)]
        );
        // bf16 0x3FC0 = 1.5, 0xC040 = -3.0.
        assert_eq!(deq(GgmlType::BF16, &[0xC0, 0x3F, 0x40, 0xC0]), [1.5, -3.0]);
        assert_eq!(deq(GgmlType::F64, &0.1f64.to_le_bytes()), [0.1f32]);
    }

    #[test]
    fn q4_0_by_hand() {
        // d = 0.5; qs[j] = (15 - j) << 4 | j: element j = j, element j + 16 = 15 - j.
        let mut b = h(0.5).to_vec();
        b.extend((0..16u8).map(|j| ((15 - j) << 4) | j));
        let y = deq(GgmlType::Q4_0, &b);
        for j in 0..16 {
            assert_eq!(y[j], 0.5 * (j as f32 - 8.0));
            assert_eq!(y[j + 16], 0.5 * (7.0 - j as f32));
        }
    }

    #[test]
    fn q4_1_by_hand() {
        let mut b = [h(0.25), h(-1.0)].concat();
        b.extend((0..16u8).map(|j| ((15 - j) << 4) | j));
        let y = deq(GgmlType::Q4_1, &b);
        for j in 0..16 {
            assert_eq!(y[j], 0.25 * j as f32 - 1.0);
            assert_eq!(y[j + 16], 0.25 * (15 - j) as f32 - 1.0);
        }
    }

    #[test]
    fn q5_by_hand() {
        // High bits set for the odd elements: q = (j & 15) + 16·(j odd) with nibble j & 15.
        let qh: u32 = 0xAAAA_AAAA;
        let qs: Vec<u8> = (0..16u8).map(|j| (j << 4) | j).collect();
        let expect_q = |j: usize| (j % 16) as i32 + if j % 2 == 1 { 16 } else { 0 };

        let mut b = h(2.0).to_vec();
        b.extend_from_slice(&qh.to_le_bytes());
        b.extend_from_slice(&qs);
        let y = deq(GgmlType::Q5_0, &b);
        for (j, &v) in y.iter().enumerate() {
            assert_eq!(v, 2.0 * (expect_q(j) - 16) as f32, "element {j}");
        }

        let mut b = [h(0.5), h(3.0)].concat();
        b.extend_from_slice(&qh.to_le_bytes());
        b.extend_from_slice(&qs);
        let y = deq(GgmlType::Q5_1, &b);
        for (j, &v) in y.iter().enumerate() {
            assert_eq!(v, 0.5 * expect_q(j) as f32 + 3.0, "element {j}");
        }
    }

    #[test]
    fn q8_0_by_hand() {
        let mut b = h(0.125).to_vec();
        b.extend((0..32i32).map(|j| (j * 8 - 128) as i8 as u8));
        let y = deq(GgmlType::Q8_0, &b);
        for (j, &v) in y.iter().enumerate() {
            assert_eq!(v, 0.125 * (j as f32 * 8.0 - 128.0));
        }
    }

    #[test]
    fn q8_k_by_hand() {
        let mut b = 0.5f32.to_le_bytes().to_vec();
        b.extend((0..256i32).map(|j| (j - 128) as i8 as u8));
        b.extend([0xFF; 32]); // bsums: ignored
        let y = deq(GgmlType::Q8_K, &b);
        for (j, &v) in y.iter().enumerate() {
            assert_eq!(v, 0.5 * (j as f32 - 128.0));
        }
    }

    /// Packs 8 six-bit (scale, min) pairs the way `get_scale_min_k4` unpacks them.
    fn pack_k4(sc: [u8; 8], m: [u8; 8]) -> [u8; 12] {
        let mut s = [0u8; 12];
        for j in 0..4 {
            s[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
            s[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6);
            s[j + 8] = (sc[j + 4] & 0x0F) | ((m[j + 4] & 0x0F) << 4);
        }
        s
    }

    #[test]
    fn k4_scales_unpack() {
        let sc = [1, 63, 17, 32, 45, 7, 60, 33];
        let m = [0, 5, 62, 31, 16, 48, 3, 63];
        let s = pack_k4(sc, m);
        for j in 0..8 {
            assert_eq!(scale_min_k4(j, &s), (sc[j], m[j]), "sub-block {j}");
        }
    }

    #[test]
    fn q4_k_by_hand() {
        let sc = [1, 2, 3, 4, 40, 50, 60, 63];
        let m = [9, 8, 7, 6, 33, 44, 55, 62];
        let mut b = [h(0.5), h(0.25)].concat();
        b.extend_from_slice(&pack_k4(sc, m));
        // qs byte (32g + l): low nibble l % 16, high nibble 15 - l % 16.
        b.extend((0..128usize).map(|i| ((15 - (i % 16) as u8) << 4) | (i % 16) as u8));
        let y = deq(GgmlType::Q4_K, &b);
        for (e, &v) in y.iter().enumerate() {
            let s = e / 32;
            let l = e % 32;
            let q = if s % 2 == 0 { l % 16 } else { 15 - l % 16 };
            let want = 0.5 * sc[s] as f32 * q as f32 - 0.25 * m[s] as f32;
            assert_eq!(v, want, "element {e}");
        }
    }

    #[test]
    fn q5_k_by_hand() {
        let sc = [3, 1, 4, 1, 59, 26, 53, 58];
        let m = [2, 7, 1, 8, 28, 18, 28, 45];
        let mut b = [h(0.125), h(-0.5)].concat();
        b.extend_from_slice(&pack_k4(sc, m));
        // qh[l] = l as u8: bit s of l says whether element 32s + l has bit 4 set.
        b.extend(0..32u8);
        b.extend((0..128usize).map(|i| ((15 - (i % 16) as u8) << 4) | (i % 16) as u8));
        let y = deq(GgmlType::Q5_K, &b);
        for (e, &v) in y.iter().enumerate() {
            let s = e / 32;
            let l = e % 32;
            let nib = if s % 2 == 0 { l % 16 } else { 15 - l % 16 };
            let q = nib + 16 * ((l >> s) & 1);
            let want = 0.125 * sc[s] as f32 * q as f32 - -0.5 * m[s] as f32;
            assert_eq!(v, want, "element {e}");
        }
    }

    #[test]
    fn q6_k_by_hand() {
        // Choose quants q(e) = e % 64 and scales sc[i] = i - 8, then pack them per the layout.
        let q = |e: usize| (e % 64) as u8;
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        for e in 0..256 {
            let (hh, k, l) = (e / 128, (e % 128) / 32, e % 32);
            let byte = 64 * hh + l + if k % 2 == 1 { 32 } else { 0 };
            ql[byte] |= (q(e) & 0x0F) << if k >= 2 { 4 } else { 0 };
            qh[32 * hh + l] |= (q(e) >> 4) << (2 * k);
        }
        let scales: Vec<u8> = (0..16i32).map(|i| (i - 8) as i8 as u8).collect();
        let mut b = ql.to_vec();
        b.extend_from_slice(&qh);
        b.extend_from_slice(&scales);
        b.extend_from_slice(&h(0.25));
        let y = deq(GgmlType::Q6_K, &b);
        for (e, &v) in y.iter().enumerate() {
            let want = 0.25 * ((e / 16) as f32 - 8.0) * (q(e) as f32 - 32.0);
            assert_eq!(v, want, "element {e}");
        }
    }

    #[test]
    fn q2_k_by_hand() {
        // q(e) = (e / 7) % 4; scales[i] = (15 - i) << 4 | i.
        let q = |e: usize| ((e / 7) % 4) as u8;
        let mut qs = [0u8; 64];
        for e in 0..256 {
            let (hh, k, l) = (e / 128, (e % 128) / 32, e % 32);
            qs[32 * hh + l] |= q(e) << (2 * k);
        }
        let scales: Vec<u8> = (0..16u8).map(|i| ((15 - i) << 4) | i).collect();
        let mut b = scales.clone();
        b.extend_from_slice(&qs);
        b.extend_from_slice(&h(0.5));
        b.extend_from_slice(&h(0.125));
        let y = deq(GgmlType::Q2_K, &b);
        for (e, &v) in y.iter().enumerate() {
            let i = e / 16;
            let want = 0.5 * i as f32 * q(e) as f32 - 0.125 * (15 - i) as f32;
            assert_eq!(v, want, "element {e}");
        }
    }

    #[test]
    fn q3_k_by_hand() {
        // Signed quants q(e) in -4..4 (3 bits), 6-bit scales sc[i] = 4i - 32 (+32 stored).
        let q = |e: usize| ((e * 5) % 8) as i32 - 4;
        let sc = |i: usize| 4 * i as i32 - 30;
        let mut hmask = [0u8; 32];
        let mut qs = [0u8; 64];
        for e in 0..256 {
            let (hh, k, l) = (e / 128, (e % 128) / 32, e % 32);
            let stored = (q(e) + 4) as u8; // 0..8: bit 2 is the "high bit set" flag
            qs[32 * hh + l] |= (stored & 3) << (2 * k);
            hmask[l] |= ((stored >> 2) & 1) << (e / 32);
        }
        let mut scales = [0u8; 12];
        for i in 0..16 {
            let u = (sc(i) + 32) as u8;
            scales[i % 8] |= (u & 0x0F) << (4 * (i / 8));
            scales[8 + i % 4] |= (u >> 4) << (2 * (i / 4));
        }
        let mut b = hmask.to_vec();
        b.extend_from_slice(&qs);
        b.extend_from_slice(&scales);
        b.extend_from_slice(&h(0.5));
        let y = deq(GgmlType::Q3_K, &b);
        for (e, &v) in y.iter().enumerate() {
            let want = 0.5 * sc(e / 16) as f32 * q(e) as f32;
            assert_eq!(v, want, "element {e}");
        }
    }

    /// Exact agreement with gguf-py's `gguf.quants.dequantize` on the committed fixtures
    /// (`scripts/reference/gguf_dequant_fixture.py`): real blocks from SmolLM2 and synthetic blocks
    /// for the types absent from it.
    #[test]
    fn matches_gguf_py_fixtures() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gguf");
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
        let cases = index["cases"].as_array().unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let dtype = GgmlType::from_id(case["type_id"].as_u64().unwrap() as u32).unwrap();
            assert_eq!(dtype.name(), case["type"].as_str().unwrap());
            let bytes = std::fs::read(dir.join(case["bytes"].as_str().unwrap())).unwrap();
            let want: Vec<f32> = std::fs::read(dir.join(case["values"].as_str().unwrap()))
                .unwrap()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            assert_eq!(want.len() as u64, case["n_elements"].as_u64().unwrap());
            let mut got = vec![f32::NAN; want.len()];
            dequantize(dtype, &bytes, &mut got).unwrap_or_else(|e| panic!("{name}: {e}"));
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    g.to_bits() == w.to_bits(),
                    "{name} ({dtype}) element {i}: got {g:e}, gguf-py {w:e}"
                );
            }
            seen.insert(dtype);
        }
        for t in [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
            GgmlType::Q2_K,
            GgmlType::Q3_K,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
        ] {
            assert!(seen.contains(&t), "no fixture for {t}");
        }
    }
}
