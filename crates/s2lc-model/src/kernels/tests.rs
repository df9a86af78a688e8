//! Every kernel against the f32 reference: the matrix dequantized by `quant::dequantize` (itself
//! bit-exact against gguf-py), multiplied in f64.

use super::dot::{dot_rows, dot_rows_scalar, simd, QuantizedActs};
use super::*;
use s2lc_spectral::rng::SplitMix64;

/// Deterministic values in [−1, 1) and bytes, drawn from the workspace's generator.
struct Draws(SplitMix64);

impl Draws {
    fn new(seed: u64) -> Self {
        Self(SplitMix64::new(seed))
    }

    fn next(&mut self) -> f32 {
        2.0 * self.0.centered_f32()
    }

    fn byte(&mut self) -> u8 {
        (self.0.next_u64() >> 56) as u8
    }

    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

const ALL: [WeightFormat; 13] = [
    WeightFormat::F32,
    WeightFormat::F16,
    WeightFormat::BF16,
    WeightFormat::Q8_0,
    WeightFormat::Q4_0,
    WeightFormat::Q4_1,
    WeightFormat::Q5_0,
    WeightFormat::Q5_1,
    WeightFormat::Q4_K,
    WeightFormat::Q6_K,
    WeightFormat::Sq2,
    WeightFormat::Sq3,
    WeightFormat::Sq4,
];

/// A `rows × cols` matrix in `format`: converted from random values where S2LC can produce the
/// format, random blocks (random quants, scales ~0.01, minimums ~−0.1) for the load-only ones.
fn matrix(format: WeightFormat, rows: usize, cols: usize, rng: &mut Draws) -> WeightMatrix {
    let values = rng.vec(rows * cols);
    if let Ok(m) = WeightMatrix::quantize(&values, rows, cols, format) {
        return m;
    }
    let nb = rows * cols / format.block_size();
    let mut bytes = Vec::with_capacity(format.block_bytes() * nb);
    for _ in 0..nb {
        if format == WeightFormat::Q6_K {
            // Random quants and int8 scales, then the f16 super-scale last.
            bytes.extend((0..208).map(|_| rng.byte()));
            bytes.extend(half::f16::from_f32(0.001 * (1.0 + rng.next())).to_le_bytes());
            continue;
        }
        bytes.extend(half::f16::from_f32(0.01 * (1.0 + rng.next())).to_le_bytes());
        if matches!(format, WeightFormat::Q4_1 | WeightFormat::Q5_1) {
            bytes.extend(half::f16::from_f32(-0.1 * (1.0 + rng.next())).to_le_bytes());
        }
        if format == WeightFormat::Q4_K {
            // dmin (subtracted times the 6-bit minimums); random scale bytes follow.
            bytes.extend(half::f16::from_f32(0.002 * (1.0 + rng.next())).to_le_bytes());
        }
        while bytes.len() % format.block_bytes() != 0 {
            bytes.push(rng.byte());
        }
    }
    WeightMatrix::from_blocks(format, bytes, rows, cols).unwrap()
}

/// `W·x` per row in f64 from the dequantized weights, and `Σ|w|·err_x` per row where `err_x` is
/// the per-element rounding bound of the activation quantization (zero for the float formats).
fn reference(w: &WeightMatrix, x: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let dense = w.to_f32();
    let mut acts = QuantizedActs::default();
    let quantized = w.format().quantizes_acts();
    if quantized {
        acts.quantize(x);
    }
    let mut want = Vec::new();
    let mut bound = Vec::new();
    for row in dense.chunks_exact(w.cols()) {
        want.push(row.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum());
        let abs: f64 = row
            .iter()
            .zip(x)
            .map(|(&a, &b)| (a as f64 * b as f64).abs())
            .sum();
        let q: f64 = if quantized {
            row.iter()
                .enumerate()
                .map(|(j, &a)| a.abs() as f64 * acts.d[j / 32] as f64 * 0.5)
                .sum()
        } else {
            0.0
        };
        // Rounding of the f32/f16 sums on top of the quantization bound.
        bound.push(q + 1e-5 * abs + 1e-6);
    }
    (want, bound)
}

#[test]
fn gemv_matches_the_dequantized_reference_on_awkward_sizes() {
    let mut rng = Draws::new(7);
    for format in ALL {
        let col_choices: &[usize] = match format.block_size() {
            1 => &[1, 7, 13, 33, 96, 577],
            32 => &[32, 96, 160, 576],
            _ => &[256, 768, 1536],
        };
        for &cols in col_choices {
            for rows in [1, 3, 37, 129] {
                let w = matrix(format, rows, cols, &mut rng);
                let x = rng.vec(cols);
                let (want, bound) = reference(&w, &x);
                let mut y = vec![f32::NAN; rows];
                let mut acts = QuantizedActs::default();
                w.matmul(&x, 1, &mut y, Accum::Replace, &mut acts);
                for r in 0..rows {
                    let err = (y[r] as f64 - want[r]).abs();
                    assert!(
                        err <= bound[r],
                        "{format} {rows}×{cols} row {r}: {} vs {} (bound {})",
                        y[r],
                        want[r],
                        bound[r]
                    );
                }
            }
        }
    }
}

#[test]
fn simd_and_portable_kernels_agree() {
    if !simd() {
        eprintln!("no AVX2 here: the portable kernels are the only ones");
    }
    let mut rng = Draws::new(11);
    for format in ALL {
        let cols = match format.block_size() {
            1 => 203,
            32 => 224,
            _ => 512,
        };
        let w = matrix(format, 19, cols, &mut rng);
        let x = rng.vec(cols);
        let mut acts = QuantizedActs::default();
        acts.quantize(&x[..cols / 32 * 32]);
        let mut scalar_acts = QuantizedActs::default();
        scalar_acts.qs.resize(cols / 32 * 32, 0);
        scalar_acts.split.resize(cols / 32 * 32, 0);
        scalar_acts.d.resize(cols / 32, 0.0);
        scalar_acts.s.resize(cols / 32, 0.0);
        super::dot::quantize_scalar(&x[..cols / 32 * 32], &mut scalar_acts);
        assert_eq!(acts.qs, scalar_acts.qs, "activation quants differ");
        assert_eq!(acts.split, scalar_acts.split, "split-order quants differ");
        assert_eq!(acts.d, scalar_acts.d);
        let (mut a, mut b) = (vec![0.5; 19], vec![0.5; 19]);
        dot_rows(w.rows_ref(0, 19), &x, acts.view(), &mut a, true);
        dot_rows_scalar(w.rows_ref(0, 19), &x, scalar_acts.view(), &mut b, true);
        for (p, q) in a.iter().zip(&b) {
            assert!(
                (p - q).abs() <= 1e-4 * (1.0 + q.abs()),
                "{format}: {p} vs {q}"
            );
        }
    }
}

#[test]
fn fused_gemv_equals_separate_products_and_accumulates() {
    let mut rng = Draws::new(3);
    let q = matrix(WeightFormat::Q4_1, 576, 576, &mut rng);
    let k = matrix(WeightFormat::Q8_0, 192, 576, &mut rng);
    let v = matrix(WeightFormat::F16, 192, 576, &mut rng);
    let x = rng.vec(576);
    let mut acts = QuantizedActs::default();
    let (mut yq, mut yk, mut yv) = (vec![0.0; 576], vec![0.0; 192], vec![1.0; 192]);
    gemv(
        &mut [
            GemvTask::new(&q, &mut yq, false),
            GemvTask::new(&k, &mut yk, false),
            GemvTask::new(&v, &mut yv, true),
        ],
        &x,
        &mut acts,
    );
    for (w, y, add) in [(&q, &yq, 0.0), (&k, &yk, 0.0), (&v, &yv, 1.0)] {
        let mut alone = vec![0.0; w.rows()];
        w.matmul(&x, 1, &mut alone, Accum::Replace, &mut acts);
        for (a, b) in y.iter().zip(&alone) {
            assert_eq!(*a, b + add);
        }
    }
}

#[test]
fn batched_matmul_matches_the_reference_and_accumulates() {
    let mut rng = Draws::new(5);
    for format in [
        WeightFormat::F32,
        WeightFormat::F16,
        WeightFormat::Q4_1,
        WeightFormat::Q5_0,
        WeightFormat::Q4_K,
        WeightFormat::Q6_K,
    ] {
        // More rows than a small batch: the dequantized-tile path.
        let (n, rows, cols) = (
            SMALL_BATCH + 1,
            301,
            if format.block_size() == 256 { 256 } else { 96 },
        );
        let w = matrix(format, rows, cols, &mut rng);
        let x = rng.vec(n * cols);
        let dense = w.to_f32();
        let mut y = vec![2.0; n * rows];
        w.matmul(&x, n, &mut y, Accum::Add, &mut QuantizedActs::default());
        for t in 0..n {
            for r in 0..rows {
                let want: f64 = 2.0
                    + (0..cols)
                        .map(|c| dense[r * cols + c] as f64 * x[t * cols + c] as f64)
                        .sum::<f64>();
                let got = y[t * rows + r] as f64;
                assert!(
                    (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "{format}: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn conversions_round_trip_within_their_precision() {
    let mut rng = Draws::new(9);
    let values = rng.vec(64 * 96);
    for (format, tol) in [
        (WeightFormat::F32, 0.0),
        (WeightFormat::F16, 1e-3),
        (WeightFormat::BF16, 8e-3),
        (WeightFormat::Q8_0, 1.0 / 127.0),
        // Half a step of d = max/8, or a whole one for a value near −max (code 16 clamps to 15).
        (WeightFormat::Q4_0, 1.0 / 8.0),
    ] {
        let w = WeightMatrix::quantize(&values, 64, 96, format).unwrap();
        assert_eq!(w.bytes(), format.row_bytes(96) * 64);
        for (a, b) in w.to_f32().iter().zip(&values) {
            assert!((a - b).abs() <= tol * 1.01, "{format}: {a} vs {b}");
        }
    }
}

#[test]
fn fast_dequantization_is_bit_exact() {
    let mut rng = Draws::new(13);
    for format in ALL {
        // 768 columns: whole blocks of 32 and of 256.
        let w = matrix(format, 7, 768, &mut rng);
        let Storage::Blocks(_, bytes) = &w.storage else {
            continue;
        };
        let mut want = vec![0.0; 7 * 768];
        match (format.ggml(), format.lowbit_bits()) {
            (Some(t), _) => crate::quant::dequantize(t, bytes, &mut want).unwrap(),
            (None, Some(bits)) => lowbit::dequantize(bits, bytes, 768, &mut want),
            (None, None) => unreachable!("{format} is neither ggml nor low-bit"),
        }
        let mut got = vec![f32::NAN; 7 * 768];
        w.dequantize_rows(0, 7, &mut got);
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{format}"
        );
    }
}

#[test]
fn bad_layouts_are_named_errors() {
    let err = WeightMatrix::quantize(&[0.0; 40], 1, 40, WeightFormat::Q8_0).unwrap_err();
    assert!(err.to_string().contains("blocks of 32"), "{err}");
    let err = WeightMatrix::from_blocks(WeightFormat::Q4_1, vec![0; 19], 1, 32).unwrap_err();
    assert!(err.to_string().contains("needs 20 bytes, got 19"), "{err}");
    let err = WeightMatrix::quantize(&[0.0; 32], 1, 32, WeightFormat::Q4_1).unwrap_err();
    assert!(err.to_string().contains("not supported"), "{err}");
}

#[test]
fn small_batches_equal_their_rows_run_alone_bit_for_bit() {
    let mut rng = Draws::new(17);
    for format in ALL {
        let cols = if format.block_size() == 256 { 512 } else { 160 };
        // 301 rows: chunks of the row split and the parts' ranges do not line up.
        let w = matrix(format, 301, cols, &mut rng);
        for n in [2, 3, SMALL_BATCH] {
            let x = rng.vec(n * cols);
            let mut acts = QuantizedActs::default();
            let mut batched = vec![0.25; n * 301];
            w.matmul(&x, n, &mut batched, Accum::Add, &mut acts);
            for i in 0..n {
                let mut alone = vec![0.25; 301];
                let xi = &x[i * cols..(i + 1) * cols];
                w.matmul(xi, 1, &mut alone, Accum::Add, &mut acts);
                let got = &batched[i * 301..(i + 1) * 301];
                assert!(
                    got.iter()
                        .zip(&alone)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{format} n = {n} row {i}"
                );
            }
        }
    }
}

// The safe entry points check, in release builds too, what their unsafe loops read and write: a
// wrong length is a panic that names the function, never an access out of bounds. The expected
// messages are those of the release asserts, so a test fails if only a debug assertion (or
// nothing) caught the mistake.

#[test]
#[should_panic(expected = "dot_rows: weights or quantized activations shorter than 4 rows")]
fn dot_rows_refuses_fewer_f32_rows_than_outputs() {
    let w = vec![0.5f32; 3 * 64];
    let x = vec![1.0f32; 64];
    let mut out = vec![0.0; 4];
    dot_rows(Rows::F32(&w), &x, Acts::default(), &mut out, false);
}

#[test]
#[should_panic(expected = "dot_rows: weights or quantized activations shorter than 4 rows")]
fn dot_rows_refuses_fewer_block_rows_than_outputs() {
    let mut rng = Draws::new(19);
    let w = matrix(WeightFormat::Q4_1, 3, 64, &mut rng);
    let x = rng.vec(64);
    let mut acts = QuantizedActs::default();
    acts.quantize(&x);
    let mut out = vec![0.0; 4];
    dot_rows(w.rows_ref(0, 3), &x, acts.view(), &mut out, false);
}

#[test]
#[should_panic(expected = "dot_rows: weights or quantized activations shorter than 2 rows")]
fn dot_rows_refuses_activations_quantized_from_a_shorter_vector() {
    let mut rng = Draws::new(23);
    let w = matrix(WeightFormat::Q6_K, 2, 512, &mut rng);
    let x = rng.vec(512);
    let mut acts = QuantizedActs::default();
    acts.quantize(&x[..256]);
    let mut out = vec![0.0; 2];
    dot_rows(w.rows_ref(0, 2), &x, acts.view(), &mut out, false);
}

#[test]
#[should_panic(expected = "dot_rows_multi: quantized activations shorter than 128 values")]
fn multi_row_kernels_refuse_short_activations() {
    let mut rng = Draws::new(29);
    let w = matrix(WeightFormat::Q4_0, 4, 128, &mut rng);
    let x = rng.vec(128);
    let (mut long, mut short) = (QuantizedActs::default(), QuantizedActs::default());
    long.quantize(&x);
    short.quantize(&x[..96]);
    let mut out = vec![0.0; 2 * 4];
    // SAFETY: `out` holds 2 activation rows × 4 weight rows at stride 4, and nothing else
    // refers to it.
    unsafe {
        dot::dot_rows_multi(
            w.rows_ref(0, 4),
            128,
            &[long.view(), short.view()],
            out.as_mut_ptr(),
            4,
            false,
        );
    }
}

#[test]
#[should_panic(expected = "matmul of 9 rows by 16 × 32: x has 288 values, y 143")]
fn batched_matmul_refuses_a_short_output() {
    // More rows than a small batch: the tiled path, which writes `y` through a raw pointer.
    let mut rng = Draws::new(31);
    let w = matrix(WeightFormat::F32, 16, 32, &mut rng);
    let n = SMALL_BATCH + 1;
    let x = rng.vec(n * 32);
    let mut y = vec![0.0; n * 16 - 1];
    w.matmul(&x, n, &mut y, Accum::Replace, &mut QuantizedActs::default());
}

/// `y += c·W` equals the f64 product with the dequantized matrix in every format, adds to what
/// `y` held, and skips zero coefficients without changing the result.
#[test]
fn axpy_rows_matches_the_transposed_reference() {
    let mut rng = Draws::new(41);
    let (rows, cols) = (5, 256);
    // Below and above the GEMM threshold.
    for (n, format) in [AXPY_GEMM_ROWS - 1, AXPY_GEMM_ROWS + 5]
        .into_iter()
        .flat_map(|n| ALL.map(|f| (n, f)))
    {
        let w = matrix(format, rows, cols, &mut rng);
        let dense = w.to_f32();
        let mut c = rng.vec(n * rows);
        c[rows + 2] = 0.0;
        let start = rng.vec(n * cols);
        let mut y = start.clone();
        w.axpy_rows(&c, n, &mut y, &mut Vec::new());
        for i in 0..n {
            for o in 0..cols {
                let want: f64 = start[i * cols + o] as f64
                    + (0..rows)
                        .map(|j| c[i * rows + j] as f64 * dense[j * cols + o] as f64)
                        .sum::<f64>();
                let got = y[i * cols + o] as f64;
                assert!(
                    (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "{format}: {got} vs {want}"
                );
            }
        }
    }
}

/// LayerNorm and GELU's tanh approximation against f64 evaluations of their definitions.
#[test]
fn layer_norm_and_gelu_tanh_match_their_definitions() {
    let mut rng = Draws::new(43);
    let d = 24;
    // A large common offset: the centred second pass keeps the variance accurate.
    let x: Vec<f32> = rng.vec(2 * d).iter().map(|v| v + 30.0).collect();
    let (w, b) = (rng.vec(d), rng.vec(d));
    let mut out = vec![0.0; 2 * d];
    ops::layer_norm(&x, &w, &b, 1e-5, &mut out);
    for (row, o) in x.chunks_exact(d).zip(out.chunks_exact(d)) {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
        for i in 0..d {
            let want = (row[i] as f64 - mean) / (var + 1e-5).sqrt() * w[i] as f64 + b[i] as f64;
            assert!((o[i] as f64 - want).abs() < 1e-4, "{} vs {want}", o[i]);
        }
    }
    let mut g: Vec<f32> = (-40..=40).map(|i| i as f32 / 8.0).collect();
    let x = g.clone();
    ops::gelu_tanh(&mut g);
    for (&x, &y) in x.iter().zip(&g) {
        let x = x as f64;
        let c = (2.0 / std::f64::consts::PI).sqrt();
        let want = 0.5 * x * (1.0 + (c * (x + 0.044715 * x.powi(3))).tanh());
        assert!(
            (y as f64 - want).abs() < 1e-6,
            "gelu_tanh({x}) = {y}, want {want}"
        );
    }
}
