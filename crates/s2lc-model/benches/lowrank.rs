//! Dense vs low-rank linear layers on SmolLM2's shapes, batch 1 (decode) and 128 (prefill), in
//! one run: time per call, bytes read, the speed ratio and the byte ratio. `cargo bench -p s2lc-model`.

use std::time::Instant;

use faer::Accum;
use s2lc_model::linear::{DenseLinear, Linear, LinearScratch, LowRankLinear};

fn data(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((((i + seed) * 2654435761) % 1009) as f32 / 1009.0) - 0.5)
        .collect()
}

/// Best time of `reps` calls after a warm-up, in seconds.
fn time(
    lin: &Linear,
    x: &[f32],
    n: usize,
    out: &mut [f32],
    scratch: &mut LinearScratch,
    reps: usize,
) -> f64 {
    lin.forward(x, n, out, Accum::Replace, scratch);
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        lin.forward(x, n, out, Accum::Replace, scratch);
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn main() {
    println!("| shape (out×in) | rank | n | dense µs | low-rank µs | speed ratio | byte ratio |");
    println!("|---|---|---|---|---|---|---|");
    for &(out, inp) in &[(576usize, 576usize), (192, 576), (1536, 576), (576, 1536)] {
        let dense = Linear::Dense(DenseLinear::new(data(out * inp, 1), out, inp, None));
        let full = out.min(inp);
        for frac in [0.125, 0.25, 0.5] {
            let r = ((full as f64) * frac) as usize;
            let lr = Linear::LowRank(LowRankLinear::new(
                data(out * r, 2),
                data(r * inp, 3),
                out,
                inp,
                None,
            ));
            for n in [1usize, 128] {
                let x = data(n * inp, 4);
                let mut y = vec![0.0; n * out];
                let mut scratch = LinearScratch::default();
                let reps = if n == 1 { 2000 } else { 50 };
                let td = time(&dense, &x, n, &mut y, &mut scratch, reps);
                let tl = time(&lr, &x, n, &mut y, &mut scratch, reps);
                println!(
                    "| {out}×{inp} | {r} | {n} | {:.1} | {:.1} | {:.2}x | {:.2} |",
                    td * 1e6,
                    tl * 1e6,
                    td / tl,
                    lr.weight_bytes() as f64 / dense.weight_bytes() as f64
                );
            }
        }
    }
}
