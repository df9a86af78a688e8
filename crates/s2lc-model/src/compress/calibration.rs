//! Calibration for whitened compression: the token windows, and the Gram matrices `XᵀX` (and
//! cross-Gram matrices) of every block linear's input collected from forward passes.

use std::collections::HashMap;

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};

use super::CompressError;
use crate::llama::{ActivationObserver, LinearInput};

/// `samples` windows of `window` tokens at seeded pseudo-random offsets of `tokens` (SplitMix64),
/// sorted by offset; the same seed always picks the same windows.
pub fn calibration_windows(
    tokens: &[u32],
    samples: usize,
    window: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>, CompressError> {
    if window == 0 || tokens.len() < window {
        return Err(CompressError::CalibrationTooShort {
            tokens: tokens.len(),
            window,
        });
    }
    let span = (tokens.len() - window + 1) as u64;
    let mut rng = s2lc_spectral::rng::SplitMix64::new(seed);
    let mut offsets: Vec<usize> = (0..samples)
        .map(|_| (rng.next_u64() % span) as usize)
        .collect();
    offsets.sort_unstable();
    Ok(offsets
        .iter()
        .map(|&o| tokens[o..o + window].to_vec())
        .collect())
}

/// Sums `XᵀX` per (layer, input kind) in f32 (one GEMM per window), widened to f64 for Cholesky.
/// With `record`, it also keeps every input (per kind, in window order) for cross-Gram matrices.
#[derive(Default)]
pub(super) struct GramCollector {
    pub(super) grams: HashMap<(usize, LinearInput), Mat<f32>>,
    pub(super) record: Option<HashMap<LinearInput, Vec<Vec<f32>>>>,
}

impl GramCollector {
    pub(super) fn recording() -> Self {
        GramCollector {
            grams: HashMap::new(),
            record: Some(HashMap::new()),
        }
    }
}

/// `Σ_w X_c,wᵀ X_d,w` over paired windows of one input kind, widened to f64.
pub(super) fn cross_gram(xc: &[Vec<f32>], xd: &[Vec<f32>], width: usize) -> Mat<f64> {
    let mut g = Mat::<f32>::zeros(width, width);
    for (c, d) in xc.iter().zip(xd) {
        let n = c.len() / width;
        let cv = MatRef::from_row_major_slice(c, n, width);
        let dv = MatRef::from_row_major_slice(d, n, width);
        matmul(
            g.as_mut(),
            Accum::Add,
            cv.transpose(),
            dv,
            1.0f32,
            Par::rayon(0),
        );
    }
    to_f64(&g)
}

impl ActivationObserver for GramCollector {
    fn observe(&mut self, layer: usize, input: LinearInput, x: &[f32], n: usize) {
        if let Some(r) = self.record.as_mut() {
            r.entry(input).or_default().push(x.to_vec());
        }
        let width = x.len() / n;
        let g = self
            .grams
            .entry((layer, input))
            .or_insert_with(|| Mat::zeros(width, width));
        let xv = MatRef::from_row_major_slice(x, n, width);
        matmul(
            g.as_mut(),
            Accum::Add,
            xv.transpose(),
            xv,
            1.0f32,
            Par::rayon(0),
        );
    }
}

pub(crate) fn to_f64(m: &Mat<f32>) -> Mat<f64> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] as f64)
}
