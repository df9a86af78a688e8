//! The runtime's kernels on SmolLM2's shapes, one run: batch-1 GEMV per weight format (time,
//! GB/s of weights streamed, ratio to f32), batched products (GFLOP/s), and decode attention over
//! a dense cache at several context lengths. `cargo bench -p s2lc-model --bench kernels`.

use std::time::Instant;

use faer::Accum;
use s2lc_model::kernels::dot::QuantizedActs;
use s2lc_model::kernels::{pool, WeightFormat, WeightMatrix};
use s2lc_model::kv::{attend_dense, AttnShape};

fn data(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((((i + seed) * 2654435761) % 1009) as f32 / 1009.0) - 0.5)
        .collect()
}

/// Median of `reps` timed calls after a warm-up, in seconds.
fn median(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// The SmolLM2 Q4_1 layout is not produced by S2LC; random blocks with sane scales stand in.
fn q4_1(rows: usize, cols: usize) -> WeightMatrix {
    let mut bytes = Vec::with_capacity(rows * cols / 32 * 20);
    for b in 0..rows * cols / 32 {
        bytes.extend(half::f16::from_f32(0.01).to_le_bytes());
        bytes.extend(half::f16::from_f32(-0.08).to_le_bytes());
        bytes.extend((0..16).map(|i| ((b * 31 + i * 7) % 256) as u8));
    }
    WeightMatrix::from_blocks(WeightFormat::Q4_1, bytes, rows, cols).expect("valid blocks")
}

fn main() {
    println!("threads: {}", pool::global().threads());
    println!("\nbatch-1 GEMV (30 copies of a shape stream from memory, as the 30 layers do)\n");
    println!("| shape (out×in) ×copies | format | µs per matrix | GB/s | speed vs f32 |");
    println!("|---|---|---|---|---|");
    let mut acts = QuantizedActs::default();
    // One copy of 1536×576 stays in L2: that row shows the compute rate, not memory.
    for &(out, inp, copies) in &[
        (576usize, 576usize, 30usize),
        (1536, 576, 30),
        (576, 1536, 30),
        (49152, 576, 1),
        (1536, 576, 1),
    ] {
        let x = data(inp, 1);
        let mut y = vec![0.0; out];
        let mut f32_time = 0.0;
        for format in [
            WeightFormat::F32,
            WeightFormat::F16,
            WeightFormat::Q8_0,
            WeightFormat::Q4_1,
        ] {
            let ws: Vec<WeightMatrix> = (0..copies)
                .map(|c| match format {
                    WeightFormat::Q4_1 => q4_1(out, inp),
                    f => WeightMatrix::quantize(&data(out * inp, c), out, inp, f)
                        .expect("convertible"),
                })
                .collect();
            let t = median(20, || {
                for w in &ws {
                    w.matmul(&x, 1, &mut y, Accum::Replace, &mut acts);
                }
            }) / copies as f64;
            if format == WeightFormat::F32 {
                f32_time = t;
            }
            println!(
                "| {out}×{inp} ×{copies} | {format} | {:.1} | {:.1} | {:.2}x |",
                t * 1e6,
                ws[0].bytes() as f64 / t / 1e9,
                f32_time / t
            );
        }
    }

    println!("\nbatched products, 512 rows of activations\n");
    println!("| shape (out×in) | format | ms | GFLOP/s |");
    println!("|---|---|---|---|");
    let n = 512;
    for &(out, inp) in &[(576usize, 576usize), (1536, 576), (576, 1536)] {
        let x = data(n * inp, 2);
        let mut y = vec![0.0; n * out];
        for format in [WeightFormat::F32, WeightFormat::F16, WeightFormat::Q4_1] {
            let w = match format {
                WeightFormat::Q4_1 => q4_1(out, inp),
                f => WeightMatrix::quantize(&data(out * inp, 3), out, inp, f).expect("convertible"),
            };
            let t = median(10, || w.matmul(&x, n, &mut y, Accum::Replace, &mut acts));
            println!(
                "| {out}×{inp} | {format} | {:.2} | {:.1} |",
                t * 1e3,
                2.0 * (n * out * inp) as f64 / t / 1e9
            );
        }
    }

    println!(
        "\ndecode attention, one layer (9 query heads, 3 KV heads, head 64), dense f32 cache\n"
    );
    println!("| context | µs | GB/s of K+V read |");
    println!("|---|---|---|");
    let shape = AttnShape {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
    };
    for t in [64usize, 512, 2048, 4096] {
        let q = data(shape.q_dim(), 4);
        let k = data(t * shape.kv_dim(), 5);
        let v = data(t * shape.kv_dim(), 6);
        let mut out = vec![0.0; shape.q_dim()];
        let secs = median(50, || attend_dense(shape, &q, &k, &v, 1, t - 1, &mut out));
        println!(
            "| {t} | {:.1} | {:.1} |",
            secs * 1e6,
            (2 * t * shape.kv_dim() * 4) as f64 / secs / 1e9
        );
    }
}
