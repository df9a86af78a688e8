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

/// Formats S2LC loads but never produces (SmolLM2's Q4_1, Qwen's Q5_0 and Q6_K): random quants
/// with sane scales stand in, since only the bytes streamed and the decode work matter here.
fn load_only(format: WeightFormat, rows: usize, cols: usize) -> WeightMatrix {
    let nb = rows * cols / format.block_size();
    let mut bytes = Vec::with_capacity(nb * format.block_bytes());
    for b in 0..nb {
        let start = bytes.len();
        let (scale, min) = (half::f16::from_f32(0.01), half::f16::from_f32(-0.08));
        match format {
            WeightFormat::Q6_K => {}
            WeightFormat::Q4_1 | WeightFormat::Q5_1 => {
                bytes.extend(scale.to_le_bytes());
                bytes.extend(min.to_le_bytes());
            }
            _ => bytes.extend(scale.to_le_bytes()),
        }
        let tail = if format == WeightFormat::Q6_K { 2 } else { 0 };
        while bytes.len() - start < format.block_bytes() - tail {
            bytes.push(((b * 31 + bytes.len() * 7) % 256) as u8);
        }
        if tail > 0 {
            bytes.extend(scale.to_le_bytes());
        }
    }
    WeightMatrix::from_blocks(format, bytes, rows, cols).expect("valid blocks")
}

/// A `rows × cols` matrix in `format`: converted from values where S2LC can, else [`load_only`].
fn weight(format: WeightFormat, rows: usize, cols: usize, seed: usize) -> WeightMatrix {
    WeightMatrix::quantize(&data(rows * cols, seed), rows, cols, format)
        .unwrap_or_else(|_| load_only(format, rows, cols))
}

/// Formats measured on SmolLM2's shapes and on Qwen's.
const SMOL: [WeightFormat; 4] = [
    WeightFormat::F32,
    WeightFormat::F16,
    WeightFormat::Q8_0,
    WeightFormat::Q4_1,
];
const QWEN: [WeightFormat; 4] = [
    WeightFormat::F32,
    WeightFormat::Q8_0,
    WeightFormat::Q5_0,
    WeightFormat::Q6_K,
];

fn main() {
    println!("threads: {}", pool::global().threads());
    println!("\nbatch-1 GEMV (30 copies of a shape stream from memory, as the 30 layers do)\n");
    println!("| shape (out×in) ×copies | format | µs per matrix | GB/s | speed vs f32 |");
    println!("|---|---|---|---|---|");
    let mut acts = QuantizedActs::default();
    // One copy of 1536×576 stays in L2: that row shows the compute rate, not memory.
    // Qwen2.5-0.5B's q/o (896×896), gate (4864×896, Q5_0) and down (896×4864, Q6_K) shapes.
    let shapes: [(usize, usize, usize, &[WeightFormat]); 8] = [
        (576, 576, 30, &SMOL),
        (1536, 576, 30, &SMOL),
        (576, 1536, 30, &SMOL),
        (49152, 576, 1, &SMOL),
        (1536, 576, 1, &SMOL),
        (896, 896, 24, &QWEN),
        (4864, 896, 24, &QWEN),
        (896, 4864, 24, &QWEN),
    ];
    for (out, inp, copies, formats) in shapes {
        let x = data(inp, 1);
        let mut y = vec![0.0; out];
        let mut f32_time = 0.0;
        for &format in formats.iter().filter(|f| inp % f.block_size() == 0) {
            let ws: Vec<WeightMatrix> = (0..copies).map(|c| weight(format, out, inp, c)).collect();
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
    for &(out, inp) in &[(576usize, 576usize), (1536, 576), (576, 1536), (896, 4864)] {
        let x = data(n * inp, 2);
        let mut y = vec![0.0; n * out];
        for format in [
            WeightFormat::F32,
            WeightFormat::F16,
            WeightFormat::Q4_1,
            WeightFormat::Q5_0,
            WeightFormat::Q6_K,
        ]
        .into_iter()
        .filter(|f| inp % f.block_size() == 0)
        {
            let w = weight(format, out, inp, 3);
            let t = median(10, || w.matmul(&x, n, &mut y, Accum::Replace, &mut acts));
            println!(
                "| {out}×{inp} | {format} | {:.2} | {:.1} |",
                t * 1e3,
                2.0 * (n * out * inp) as f64 / t / 1e9
            );
        }
    }

    println!(
        "\nseveral sequences decoding together: n rows against 30 streamed 1536×576 matrices\n"
    );
    println!("| format | n | µs per matrix | µs per row | speed-up per row vs n = 1 |");
    println!("|---|---|---|---|---|");
    for format in [WeightFormat::F32, WeightFormat::F16, WeightFormat::Q4_1] {
        let ws: Vec<WeightMatrix> = (0..30).map(|c| weight(format, 1536, 576, c)).collect();
        let mut one = 0.0;
        for n in [1usize, 2, 4, 8] {
            let x = data(n * 576, 7);
            let mut y = vec![0.0; n * 1536];
            let t = median(10, || {
                for w in &ws {
                    w.matmul(&x, n, &mut y, Accum::Replace, &mut acts);
                }
            }) / 30.0;
            if n == 1 {
                one = t;
            }
            println!(
                "| {format} | {n} | {:.1} | {:.1} | {:.2}x |",
                t * 1e6,
                t * 1e6 / n as f64,
                one * n as f64 / t
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
