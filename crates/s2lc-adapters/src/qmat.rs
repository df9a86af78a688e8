//! A block-quantized row-major matrix: the unit every basis column group, core and residual of a
//! pack is stored as.

use faer::{Mat, MatRef};

use s2lc_spectral::{row_major, BlockQuant, QuantBits};

/// A block-quantized row-major matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct QMat {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// The values, row-major.
    pub q: BlockQuant,
}

impl QMat {
    /// Quantizes `m` row-major.
    pub fn new(m: MatRef<'_, f32>, block: usize, bits: QuantBits, drop_energy: f64) -> Self {
        QMat {
            rows: m.nrows(),
            cols: m.ncols(),
            q: BlockQuant::quantize(&row_major(m), block, bits, drop_energy),
        }
    }

    /// The dequantized matrix.
    pub fn to_mat(&self) -> Mat<f32> {
        MatRef::from_row_major_slice(&self.q.dequantize(), self.rows, self.cols).to_owned()
    }

    /// Bytes stored.
    pub fn bytes(&self) -> usize {
        self.q.bytes()
    }
}
