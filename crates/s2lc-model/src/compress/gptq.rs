//! Error-feedback quantization of a weight into S2LC's low-bit rows (GPTQ, Frantar et al. 2023).
//!
//! Columns are quantized left to right. The error `e = (w_c − q_c) / U_cc` of column `c` is
//! spread over the columns not yet quantized as `w_j −= e·U_cj`, where `U` is the upper Cholesky
//! factor of `H⁻¹` (`H = XᵀX` of the calibration inputs, damped): this keeps the layer's output
//! error `‖X·(W − Q)ᵀ‖` near its minimum over the grid instead of rounding each weight alone.
//! Within a group of columns the updates are applied column by column (rows are independent,
//! so they run in parallel); the columns after the group get one GEMM per group. Each group's
//! grid `(d, m)` is chosen when the group is reached, from the weights as updated so far.

use faer::linalg::matmul::matmul;
use faer::linalg::solvers::Solve;
use faer::{Accum, Mat, MatMut, MatRef, Par, Side};
use rayon::prelude::*;

use crate::kernels::lowbit::{self, RowScales, GROUP};

/// Relative damping added to `H`'s diagonal before inversion (GPTQ's default, 1 %).
pub(crate) const DAMPING: f64 = 0.01;

/// Row scales leave this much room above the initial groups' largest step and offset: error
/// feedback moves later weights, and a group beyond the row scale would be clipped.
const HEADROOM: f32 = 1.25;

/// The upper Cholesky factor `U` of `H⁻¹` (`H⁻¹ = UᵀU`), `n × n` row-major f32.
pub(crate) struct InverseHessian {
    u: Vec<f32>,
    n: usize,
}

impl InverseHessian {
    /// From a Gram matrix (`n × n`, symmetric positive semi-definite), damped by
    /// `damping·mean(diag H)` (and a column with no activation gets a unit diagonal).
    pub(crate) fn new(gram: MatRef<'_, f64>, damping: f64) -> Option<Self> {
        let n = gram.nrows();
        let mean = (0..n).map(|i| gram[(i, i)]).sum::<f64>() / n.max(1) as f64;
        let scale = if mean > 0.0 { mean } else { 1.0 };
        let h = Mat::from_fn(n, n, |i, j| {
            let g = gram[(i, j)];
            match (i == j, g > 0.0) {
                (true, true) => g + damping * scale,
                (true, false) => scale,
                (false, _) => g,
            }
        });
        let hinv = h.llt(Side::Lower).ok()?.solve(Mat::<f64>::identity(n, n));
        // Symmetrize (the solve leaves rounding asymmetry) before the second factorization.
        let hinv = Mat::from_fn(n, n, |i, j| 0.5 * (hinv[(i, j)] + hinv[(j, i)]));
        let l = hinv.llt(Side::Lower).ok()?;
        let l = l.L();
        let mut u = vec![0.0f32; n * n];
        for i in 0..n {
            for j in i..n {
                u[i * n + j] = l[(j, i)] as f32;
            }
        }
        Some(InverseHessian { u, n })
    }
}

/// `w` (`rows × cols`, row-major, `cols` a multiple of the group) quantized to `bits`-bit rows with
/// error feedback through `hinv` (`cols × cols`). Returns the encoded rows.
pub(crate) fn quantize(
    w: &[f32],
    rows: usize,
    cols: usize,
    bits: usize,
    hinv: &InverseHessian,
) -> Vec<u8> {
    debug_assert_eq!(hinv.n, cols);
    debug_assert_eq!(cols % GROUP, 0);
    let mut w = w.to_vec();
    let rb = lowbit::row_bytes(bits, cols);
    let gb = lowbit::group_bytes(bits);
    let mut out = vec![0u8; rows * rb];
    let scales: Vec<RowScales> = w
        .par_chunks(cols)
        .zip(out.par_chunks_mut(rb))
        .map(|(row, o)| {
            let (mut dm, mut mm) = (0.0f32, 0.0f32);
            for g in row.chunks_exact(GROUP) {
                let (d, m) = RowScales::ideal(g, bits);
                dm = dm.max(d);
                mm = mm.max(m);
            }
            let s = RowScales::new(dm, mm, HEADROOM);
            lowbit::write_row_header(s, o);
            s
        })
        .collect();
    let (u, n) = (&hinv.u, hinv.n);
    let mut err = vec![0.0f32; rows * GROUP];
    for g in 0..cols / GROUP {
        let c0 = g * GROUP;
        w.par_chunks_mut(cols)
            .zip(out.par_chunks_mut(rb))
            .zip(err.par_chunks_mut(GROUP))
            .zip(scales.par_iter())
            .for_each(|(((row, o), e), s)| {
                let (cs, cm, d, m) = s.group(&row[c0..c0 + GROUP], bits, None);
                let block = &mut o[4 + g * gb..4 + (g + 1) * gb];
                block[0] = cs;
                block[1] = cm;
                let mut codes = [0u8; GROUP];
                for i in 0..GROUP {
                    let c = c0 + i;
                    let v = row[c];
                    let q = lowbit::code(v, d, m, bits);
                    codes[i] = q;
                    let ei = (v - (d * q as f32 - m)) / u[c * n + c];
                    e[i] = ei;
                    let urow = &u[c * n + c0..c * n + c0 + GROUP];
                    for j in i + 1..GROUP {
                        row[c0 + j] -= ei * urow[j];
                    }
                }
                lowbit::pack_codes(bits, &codes, &mut block[2..]);
            });
        let rest = cols - c0 - GROUP;
        if rest > 0 {
            let wm =
                MatMut::from_row_major_slice_mut(&mut w, rows, cols).subcols_mut(c0 + GROUP, rest);
            let em = MatRef::from_row_major_slice(&err, rows, GROUP);
            let um = MatRef::from_row_major_slice(u, n, n).submatrix(c0, c0 + GROUP, GROUP, rest);
            matmul(wm, Accum::Add, em, um, -1.0f32, Par::rayon(0));
        }
    }
    out
}

/// `tr(E·H·Eᵀ) = ‖X·Eᵀ‖²_F` for `e` (`rows × cols`, row-major) and `gram = H`: the squared
/// output error a weight error causes on the calibration inputs.
pub(crate) fn output_error(e: &[f32], rows: usize, cols: usize, gram: MatRef<'_, f32>) -> f64 {
    let em = MatRef::from_row_major_slice(e, rows, cols);
    let mut eh = Mat::<f32>::zeros(rows, cols);
    matmul(eh.as_mut(), Accum::Replace, em, gram, 1.0f32, Par::rayon(0));
    (0..rows)
        .into_par_iter()
        .map(|r| {
            (0..cols)
                .map(|c| em[(r, c)] as f64 * eh[(r, c)] as f64)
                .sum::<f64>()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use s2lc_spectral::rng::SplitMix64;

    /// Correlated inputs (what makes error feedback pay): `x = z·A` with a random mixing `A`.
    fn inputs(rng: &mut SplitMix64, n: usize, cols: usize) -> Vec<f32> {
        let a = rng.centered_vec(cols * cols);
        let z = rng.centered_vec(n * cols);
        let mut x = vec![0.0f32; n * cols];
        for t in 0..n {
            for k in 0..cols {
                let zk = z[t * cols + k];
                for j in 0..cols {
                    x[t * cols + j] += zk * a[k * cols + j];
                }
            }
        }
        x
    }

    fn gram(x: &[f32], n: usize, cols: usize) -> Mat<f32> {
        let xm = MatRef::from_row_major_slice(x, n, cols);
        xm.transpose() * xm
    }

    #[test]
    fn error_feedback_beats_rounding_on_the_output_error_it_minimizes() {
        let mut rng = SplitMix64::new(11);
        let (rows, cols, n) = (48, 128, 512);
        let w = rng.centered_vec(rows * cols);
        let x = inputs(&mut rng, n, cols);
        let g = gram(&x, n, cols);
        let g64 = Mat::from_fn(cols, cols, |i, j| g[(i, j)] as f64);
        let hinv = InverseHessian::new(g64.as_ref(), DAMPING).expect("positive definite");
        for bits in [2, 3, 4] {
            let decode = |data: &[u8]| {
                let mut out = vec![0.0; rows * cols];
                lowbit::dequantize(bits, data, cols, &mut out);
                out
            };
            let err_of = |q: &[f32]| {
                let e: Vec<f32> = w.iter().zip(q).map(|(a, b)| a - b).collect();
                output_error(&e, rows, cols, g.as_ref())
            };
            let rtn = err_of(&decode(&lowbit::quantize_rtn(&w, cols, bits)));
            let gptq = err_of(&decode(&quantize(&w, rows, cols, bits, &hinv)));
            assert!(
                gptq < 0.8 * rtn,
                "{bits} bits: error feedback {gptq:e} vs rounding {rtn:e}"
            );
        }
    }

    #[test]
    fn output_error_equals_the_error_of_the_outputs() {
        let mut rng = SplitMix64::new(3);
        let (rows, cols, n) = (5, 64, 40);
        let e = rng.centered_vec(rows * cols);
        let x = rng.centered_vec(n * cols);
        let direct: f64 = (0..n)
            .flat_map(|t| (0..rows).map(move |r| (t, r)))
            .map(|(t, r)| {
                let y: f64 = (0..cols)
                    .map(|c| x[t * cols + c] as f64 * e[r * cols + c] as f64)
                    .sum();
                y * y
            })
            .sum();
        let via_gram = output_error(&e, rows, cols, gram(&x, n, cols).as_ref());
        assert!(
            (direct - via_gram).abs() <= 1e-4 * direct,
            "{direct} vs {via_gram}"
        );
    }
}
