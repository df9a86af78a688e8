//! Machine limits measured in the same run as a benchmark, so speeds can be reported as a
//! fraction of what the hardware allows.

use std::time::Instant;

use rayon::prelude::*;

/// Best-of-`runs` memory read bandwidth in bytes/s: every rayon thread sums a disjoint part of a
/// 1 GiB buffer (far larger than any cache), as a weight-streaming decode step does.
pub fn read_bandwidth(runs: usize) -> f64 {
    let buf = vec![1.0f32; 1 << 28];
    let mut best = 0.0f64;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let s: f32 = buf.par_chunks(1 << 16).map(sum_chunk).sum();
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max((buf.len() * std::mem::size_of::<f32>()) as f64 / secs);
    }
    best
}

/// Sum with eight independent accumulators, so loads (not the add latency chain) bound it.
fn sum_chunk(c: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut it = c.chunks_exact(8);
    for v in &mut it {
        for i in 0..8 {
            acc[i] += v[i];
        }
    }
    acc.iter().sum::<f32>() + it.remainder().iter().sum::<f32>()
}

#[cfg(test)]
mod tests {
    #[test]
    fn chunk_sum_is_exact_on_small_integers() {
        let v: Vec<f32> = (0..1003).map(|i| (i % 7) as f32).collect();
        assert_eq!(super::sum_chunk(&v), v.iter().sum::<f32>());
    }
}
