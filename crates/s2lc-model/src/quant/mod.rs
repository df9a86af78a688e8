//! ggml tensor element types and their dequantization to f32.
//!
//! A ggml tensor row is a sequence of *blocks*: `block_size` consecutive elements stored in
//! `type_size` bytes. Plain types (F32, F16, BF16, F64) are blocks of one element. Quantized types
//! store small integers `q` with per-block (and, for the k-quants, per-sub-block) scales `d` and
//! offsets/minimums `m`, and decode as `x = d·q` or `x = d·q + m` (`d·q − m` for the k-quants).
//! All multi-byte fields are little-endian; `f16` is IEEE half precision, `bf16` the top half of an
//! IEEE f32. The layouts are documented on each `block_*` function (`legacy.rs` for the
//! 32-element formats, `kquants.rs` for the k-quants) and follow ggml's
//! `ggml-common.h` / `ggml-quants.c` and gguf-py's `quants.py`; the operation order of every
//! decode matches the reference (`(d·sc)·q − dmin·m`), so results agree bit for bit.

mod kquants;
mod legacy;
#[cfg(test)]
mod tests;
mod types;

use half::{bf16, f16};

pub(crate) use kquants::scale_min_k4;
use kquants::{block_q2_k, block_q3_k, block_q4_k, block_q5_k, block_q6_k, block_q8_k};
use legacy::{block_q4_0, block_q4_1, block_q5_0, block_q5_1, block_q8_0};
pub use types::{GgmlType, QK_K};

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
