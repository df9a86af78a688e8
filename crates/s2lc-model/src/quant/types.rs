//! The ggml element types ([`GgmlType`]): their ids, names and block geometry.

use super::kquants::{Q2_K_BYTES, Q3_K_BYTES, Q4_K_BYTES, Q5_K_BYTES, Q6_K_BYTES, Q8_K_BYTES};
use super::legacy::{Q4_0_BYTES, Q4_1_BYTES, Q5_0_BYTES, Q5_1_BYTES, Q8_0_BYTES};

/// Elements in one k-quant super-block (`QK_K` in ggml).
pub const QK_K: usize = 256;

/// A ggml tensor element type, with its numeric id as written in GGUF tensor infos.
///
/// Every type ggml currently defines is listed, so the byte size of any tensor can be validated;
/// [`GgmlType::can_dequantize`] says which ones [`dequantize`](super::dequantize) decodes.
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

    /// Whether [`dequantize`](super::dequantize) decodes this type.
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
