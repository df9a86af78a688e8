//! Linear layers `y = x·Wᵀ (+ b)` over row-major activation slices.
//!
//! Activations are `n × in` row-major slices viewed through `MatRef::from_row_major_slice` (never a
//! padded `Mat`: that made batch-1 matmul 6x slower here). Weights are `out × in` row-major, exactly
//! the Hugging Face layout; viewed transposed as an `in × out` column-major matrix, each output is a
//! dot product over one contiguous weight row, which is what a batch-1 GEMV wants.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

/// A dense f32 linear layer.
#[derive(Debug, Clone)]
pub struct DenseLinear {
    weight: Vec<f32>,
    out_dim: usize,
    in_dim: usize,
    bias: Option<Vec<f32>>,
}

impl DenseLinear {
    /// Builds a layer from an `out_dim × in_dim` row-major weight and an optional bias of `out_dim`.
    ///
    /// # Panics
    /// If the lengths do not match the dimensions (callers load through shape-checked [`crate::source::Weights`]).
    pub fn new(weight: Vec<f32>, out_dim: usize, in_dim: usize, bias: Option<Vec<f32>>) -> Self {
        assert_eq!(weight.len(), out_dim * in_dim, "weight is not out × in");
        if let Some(b) = &bias {
            assert_eq!(b.len(), out_dim, "bias is not out");
        }
        DenseLinear {
            weight,
            out_dim,
            in_dim,
            bias,
        }
    }

    /// The `out × in` row-major weight.
    pub fn weight(&self) -> &[f32] {
        &self.weight
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }
}

/// A linear layer in one of the representations the runtime executes.
#[derive(Debug, Clone)]
pub enum Linear {
    /// Full f32 weight.
    Dense(DenseLinear),
}

impl Linear {
    /// Output features.
    pub fn out_dim(&self) -> usize {
        match self {
            Linear::Dense(d) => d.out_dim,
        }
    }

    /// Input features.
    pub fn in_dim(&self) -> usize {
        match self {
            Linear::Dense(d) => d.in_dim,
        }
    }

    /// Parameters held (weights and bias).
    pub fn n_params(&self) -> usize {
        match self {
            Linear::Dense(d) => d.weight.len() + d.bias.as_ref().map_or(0, Vec::len),
        }
    }

    /// Bytes read from memory per forward pass.
    pub fn weight_bytes(&self) -> usize {
        match self {
            Linear::Dense(_) => self.n_params() * std::mem::size_of::<f32>(),
        }
    }

    /// `out (n × out_dim) = [out +] x (n × in_dim) · Wᵀ + b`, both row-major.
    pub fn forward(&self, x: &[f32], n: usize, out: &mut [f32], accum: Accum, par: Par) {
        match self {
            Linear::Dense(d) => {
                debug_assert_eq!(x.len(), n * d.in_dim);
                debug_assert_eq!(out.len(), n * d.out_dim);
                if let Some(b) = &d.bias {
                    for row in out.chunks_exact_mut(d.out_dim) {
                        match accum {
                            Accum::Replace => row.copy_from_slice(b),
                            Accum::Add => row.iter_mut().zip(b).for_each(|(o, b)| *o += b),
                        }
                    }
                }
                let accum = if d.bias.is_some() { Accum::Add } else { accum };
                let x = MatRef::from_row_major_slice(x, n, d.in_dim);
                let wt = MatRef::from_row_major_slice(&d.weight, d.out_dim, d.in_dim).transpose();
                let y = MatMut::from_row_major_slice_mut(out, n, d.out_dim);
                matmul(y, accum, x, wt, 1.0f32, par);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(w: &[f32], b: Option<&[f32]>, x: &[f32], n: usize, o: usize, i: usize) -> Vec<f32> {
        let mut y = vec![0.0; n * o];
        for r in 0..n {
            for c in 0..o {
                let mut s = b.map_or(0.0, |b| b[c]);
                for k in 0..i {
                    s += x[r * i + k] * w[c * i + k];
                }
                y[r * o + c] = s;
            }
        }
        y
    }

    #[test]
    fn dense_matches_naive_on_awkward_sizes() {
        for &(n, o, i) in &[(1, 15, 17), (3, 16, 16), (17, 127, 129), (1, 129, 128)] {
            let w: Vec<f32> = (0..o * i)
                .map(|k| ((k * 7 % 13) as f32 - 6.0) / 7.0)
                .collect();
            let b: Vec<f32> = (0..o).map(|k| k as f32 * 0.1).collect();
            let x: Vec<f32> = (0..n * i)
                .map(|k| ((k * 5 % 11) as f32 - 5.0) / 3.0)
                .collect();
            for bias in [None, Some(b.clone())] {
                let lin = Linear::Dense(DenseLinear::new(w.clone(), o, i, bias.clone()));
                let want = naive(&w, bias.as_deref(), &x, n, o, i);
                let mut y = vec![f32::NAN; n * o];
                lin.forward(&x, n, &mut y, Accum::Replace, Par::Seq);
                for (a, b) in y.iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
                }
                // Accumulate into a non-zero destination.
                let mut y2 = vec![1.0; n * o];
                lin.forward(&x, n, &mut y2, Accum::Add, Par::rayon(2));
                for (a, b) in y2.iter().zip(&want) {
                    assert!((a - (b + 1.0)).abs() <= 1e-4 * (1.0 + b.abs()));
                }
            }
        }
    }
}
