//! Machine limits measured in the same run as a benchmark, so speeds can be reported as a
//! fraction of what the hardware allows.

use std::time::Instant;

use faer::Accum;

use crate::kernels::dot::QuantizedActs;
use crate::kernels::WeightMatrix;

/// Best-of-`runs` memory read bandwidth in bytes/s: a 256 MiB f32 matrix (8x the largest cache
/// here) streamed by the runtime's own batch-1 product on every pool thread, which is exactly what
/// a weight-streaming decode step does. Rows of 2048 values, like a model's.
pub fn read_bandwidth(runs: usize) -> f64 {
    let (rows, cols) = (1 << 15, 1 << 11);
    let w = WeightMatrix::from_f32(vec![1.0f32; rows * cols], rows, cols);
    let x = vec![1.0f32; cols];
    let mut y = vec![0.0f32; rows];
    let mut acts = QuantizedActs::default();
    let mut best = 0.0f64;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        w.matmul(&x, 1, &mut y, Accum::Replace, &mut acts);
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(&y);
        best = best.max(w.bytes() as f64 / secs);
    }
    best
}
