//! Small dense-matrix helpers of packing: row-major slices as matrices, blocks side by side or
//! stacked, columns scaled.

use faer::{Mat, MatRef};

/// A row-major `rows × cols` slice as a matrix.
pub(super) fn mat(data: &[f32], rows: usize, cols: usize) -> Mat<f32> {
    MatRef::from_row_major_slice(data, rows, cols).to_owned()
}

/// `[x₁ | x₂ | …]`: blocks side by side (equal row counts).
pub(super) fn hcat(blocks: &[MatRef<'_, f32>]) -> Mat<f32> {
    let rows = blocks.first().map_or(0, |b| b.nrows());
    let mut out = Mat::zeros(rows, blocks.iter().map(|b| b.ncols()).sum());
    let mut at = 0;
    for b in blocks {
        out.as_mut().subcols_mut(at, b.ncols()).copy_from(b);
        at += b.ncols();
    }
    out
}

/// `[x₁; x₂; …]`: blocks stacked (equal column counts).
pub(super) fn vcat(blocks: &[MatRef<'_, f32>]) -> Mat<f32> {
    let t: Vec<MatRef<'_, f32>> = blocks.iter().map(|b| b.transpose()).collect();
    hcat(&t).transpose().to_owned()
}

/// `u·diag(s)`.
pub(super) fn scale_cols(u: MatRef<'_, f32>, s: &[f32]) -> Mat<f32> {
    Mat::from_fn(u.nrows(), s.len(), |i, j| u[(i, j)] * s[j])
}
