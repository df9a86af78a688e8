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

/// A rank-`r` layer `y = (x·vsᵀ)·uᵀ + b`: `u` is `out × r`, `vs` is `r × in`, both row-major.
/// Two thin products replace one dense one; the `n × r` intermediate lives in caller scratch.
#[derive(Debug, Clone)]
pub struct LowRankLinear {
    u: Vec<f32>,
    vs: Vec<f32>,
    out_dim: usize,
    in_dim: usize,
    rank: usize,
    bias: Option<Vec<f32>>,
}

impl LowRankLinear {
    /// Builds a layer from `u` (`out_dim × rank`) and `vs` (`rank × in_dim`), row-major.
    ///
    /// # Panics
    /// If the lengths do not match the dimensions (callers load through shape-checked [`crate::source::Weights`]).
    pub fn new(
        u: Vec<f32>,
        vs: Vec<f32>,
        out_dim: usize,
        in_dim: usize,
        bias: Option<Vec<f32>>,
    ) -> Self {
        let rank = u.len().checked_div(out_dim).unwrap_or(0);
        assert_eq!(u.len(), out_dim * rank, "u is not out × rank");
        assert_eq!(vs.len(), rank * in_dim, "vs is not rank × in");
        if let Some(b) = &bias {
            assert_eq!(b.len(), out_dim, "bias is not out");
        }
        LowRankLinear {
            u,
            vs,
            out_dim,
            in_dim,
            rank,
            bias,
        }
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The left factor `u` (`out × r`, row-major).
    pub fn u(&self) -> &[f32] {
        &self.u
    }

    /// The right factor `vs` (`r × in`, row-major).
    pub fn vs(&self) -> &[f32] {
        &self.vs
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
    /// Thin f32 factors.
    LowRank(LowRankLinear),
}

#[allow(clippy::too_many_arguments)]
/// `y = [y +] x · wᵀ` for row-major `x` (`n × k`), `w` (`m × k`), `y` (`n × m`).
fn matmul_xwt(
    x: &[f32],
    n: usize,
    w: &[f32],
    m: usize,
    k: usize,
    y: &mut [f32],
    accum: Accum,
    par: Par,
) {
    let x = MatRef::from_row_major_slice(x, n, k);
    let wt = MatRef::from_row_major_slice(w, m, k).transpose();
    matmul(
        MatMut::from_row_major_slice_mut(y, n, m),
        accum,
        x,
        wt,
        1.0f32,
        par,
    );
}

/// Writes (or adds) the bias into each row of `out`; returns the accumulation mode for what follows.
fn apply_bias(bias: Option<&[f32]>, out: &mut [f32], accum: Accum) -> Accum {
    let Some(b) = bias else { return accum };
    for row in out.chunks_exact_mut(b.len()) {
        match accum {
            Accum::Replace => row.copy_from_slice(b),
            Accum::Add => row.iter_mut().zip(b).for_each(|(o, b)| *o += b),
        }
    }
    Accum::Add
}

impl Linear {
    /// Output features.
    pub fn out_dim(&self) -> usize {
        match self {
            Linear::Dense(d) => d.out_dim,
            Linear::LowRank(l) => l.out_dim,
        }
    }

    /// Input features.
    pub fn in_dim(&self) -> usize {
        match self {
            Linear::Dense(d) => d.in_dim,
            Linear::LowRank(l) => l.in_dim,
        }
    }

    /// Parameters held (weights and bias).
    pub fn n_params(&self) -> usize {
        match self {
            Linear::Dense(d) => d.weight.len() + d.bias.as_ref().map_or(0, Vec::len),
            Linear::LowRank(l) => l.u.len() + l.vs.len() + l.bias.as_ref().map_or(0, Vec::len),
        }
    }

    /// Bytes read from memory per forward pass.
    pub fn weight_bytes(&self) -> usize {
        self.n_params() * std::mem::size_of::<f32>()
    }

    /// `out (n × out_dim) = [out +] x (n × in_dim) · Wᵀ + b`, both row-major. `scratch` holds the
    /// low-rank intermediate and is reused across calls.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &[f32],
        n: usize,
        out: &mut [f32],
        accum: Accum,
        par: Par,
        scratch: &mut Vec<f32>,
    ) {
        debug_assert_eq!(x.len(), n * self.in_dim());
        debug_assert_eq!(out.len(), n * self.out_dim());
        // Batch-1 low-rank products under ~1 MB of weights run faster on one thread than with a
        // hand-off to the pool (benches/lowrank.rs); dense layers gained nothing from it.
        let par_of = |values: usize| {
            if n == 1 && values < (1 << 18) {
                Par::Seq
            } else {
                par
            }
        };
        match self {
            Linear::Dense(d) => {
                let accum = apply_bias(d.bias.as_deref(), out, accum);
                matmul_xwt(x, n, &d.weight, d.out_dim, d.in_dim, out, accum, par);
            }
            Linear::LowRank(l) => {
                scratch.resize(n * l.rank, 0.0);
                let first = par_of(l.vs.len());
                matmul_xwt(
                    x,
                    n,
                    &l.vs,
                    l.rank,
                    l.in_dim,
                    scratch,
                    Accum::Replace,
                    first,
                );
                let accum = apply_bias(l.bias.as_deref(), out, accum);
                let second = par_of(l.u.len());
                matmul_xwt(scratch, n, &l.u, l.out_dim, l.rank, out, accum, second);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_rank_equals_dense_product_of_its_factors() {
        let (o, i, r) = (17, 15, 3);
        let u: Vec<f32> = (0..o * r)
            .map(|k| ((k * 3 % 7) as f32 - 3.0) / 5.0)
            .collect();
        let vs: Vec<f32> = (0..r * i)
            .map(|k| ((k * 5 % 11) as f32 - 5.0) / 4.0)
            .collect();
        let mut w = vec![0.0; o * i];
        for a in 0..o {
            for b in 0..i {
                w[a * i + b] = (0..r).map(|k| u[a * r + k] * vs[k * i + b]).sum();
            }
        }
        let bias: Vec<f32> = (0..o).map(|k| k as f32).collect();
        let lr = Linear::LowRank(LowRankLinear::new(u, vs, o, i, Some(bias.clone())));
        let dense = Linear::Dense(DenseLinear::new(w, o, i, Some(bias)));
        assert_eq!(lr.n_params(), o * r + r * i + o);
        let n = 4;
        let x: Vec<f32> = (0..n * i).map(|k| (k as f32 * 0.37).sin()).collect();
        let (mut a, mut b) = (vec![0.5; n * o], vec![0.5; n * o]);
        let mut scratch = Vec::new();
        lr.forward(&x, n, &mut a, Accum::Add, Par::Seq, &mut scratch);
        dense.forward(&x, n, &mut b, Accum::Add, Par::Seq, &mut scratch);
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 1e-4, "{p} vs {q}");
        }
    }

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
                lin.forward(&x, n, &mut y, Accum::Replace, Par::Seq, &mut Vec::new());
                for (a, b) in y.iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
                }
                // Accumulate into a non-zero destination.
                let mut y2 = vec![1.0; n * o];
                lin.forward(&x, n, &mut y2, Accum::Add, Par::rayon(2), &mut Vec::new());
                for (a, b) in y2.iter().zip(&want) {
                    assert!((a - (b + 1.0)).abs() <= 1e-4 * (1.0 + b.abs()));
                }
            }
        }
    }
}
