//! Linear layers `y = x·Wᵀ (+ b)` over row-major activation slices.
//!
//! Activations are `n × in` row-major slices viewed through `MatRef::from_row_major_slice` (never a
//! padded `Mat`: that made batch-1 matmul 6x slower here). Weights are `out × in` row-major, exactly
//! the Hugging Face layout; viewed transposed as an `in × out` column-major matrix, each output is a
//! dot product over one contiguous weight row, which is what a batch-1 GEMV wants.

use std::borrow::Cow;

use faer::Accum;

use crate::error::ModelError;
use crate::kernels::dot::QuantizedActs;
use crate::kernels::{gemv, GemvTask, WeightFormat, WeightMatrix, SMALL_BATCH};
use crate::source::{BytesTensor, Weights};

/// A dense linear layer: one [`WeightMatrix`] (f32 or a quantized format) and an optional bias.
#[derive(Debug, Clone)]
pub struct DenseLinear {
    weight: WeightMatrix,
    bias: Option<Vec<f32>>,
}

impl DenseLinear {
    /// Builds a layer from an `out_dim × in_dim` row-major f32 weight and an optional bias.
    ///
    /// # Panics
    /// If the lengths do not match the dimensions (callers load through shape-checked [`crate::source::Weights`]).
    pub fn new(weight: Vec<f32>, out_dim: usize, in_dim: usize, bias: Option<Vec<f32>>) -> Self {
        Self::from_matrix(WeightMatrix::from_f32(weight, out_dim, in_dim), bias)
    }

    /// Builds a layer from a weight in any format and an optional bias of `weight.rows()`.
    ///
    /// # Panics
    /// If the bias length is not `weight.rows()`.
    pub fn from_matrix(weight: WeightMatrix, bias: Option<Vec<f32>>) -> Self {
        if let Some(b) = &bias {
            assert_eq!(b.len(), weight.rows(), "bias is not out");
        }
        DenseLinear { weight, bias }
    }

    /// The weight as stored.
    pub fn matrix(&self) -> &WeightMatrix {
        &self.weight
    }

    /// The weight, mutable (merging adapters into it).
    pub fn matrix_mut(&mut self) -> &mut WeightMatrix {
        &mut self.weight
    }

    /// The `out × in` row-major weight as f32 (dequantized if stored otherwise).
    pub fn weight(&self) -> Cow<'_, [f32]> {
        self.weight.to_f32()
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
    u: WeightMatrix,
    vs: WeightMatrix,
    bias: Option<Vec<f32>>,
}

impl LowRankLinear {
    /// Builds a layer from f32 `u` (`out_dim × rank`) and `vs` (`rank × in_dim`), row-major.
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
        Self::from_matrices(
            WeightMatrix::from_f32(u, out_dim, rank),
            WeightMatrix::from_f32(vs, rank, in_dim),
            bias,
        )
    }

    /// Builds a layer from factors in any format.
    ///
    /// # Panics
    /// If the inner dimensions or the bias length do not match.
    pub fn from_matrices(u: WeightMatrix, vs: WeightMatrix, bias: Option<Vec<f32>>) -> Self {
        assert_eq!(
            u.cols(),
            vs.rows(),
            "u is not out × rank or vs not rank × in"
        );
        if let Some(b) = &bias {
            assert_eq!(b.len(), u.rows(), "bias is not out");
        }
        LowRankLinear { u, vs, bias }
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.vs.rows()
    }

    /// The left factor `u` (`out × r`, row-major) as f32.
    pub fn u(&self) -> Cow<'_, [f32]> {
        self.u.to_f32()
    }

    /// The right factor `vs` (`r × in`, row-major) as f32.
    pub fn vs(&self) -> Cow<'_, [f32]> {
        self.vs.to_f32()
    }

    /// The factors as stored (`u`, `vs`).
    pub fn matrices(&self) -> (&WeightMatrix, &WeightMatrix) {
        (&self.u, &self.vs)
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }
}

/// A quantized weight plus a low-rank correction of its quantization error:
/// `y = x·(Q + L·R)ᵀ + b`, with `Q` in a block format, `R` (`rank × in`) and `L` held
/// transposed (`Lᵀ`, `rank × out`) so both factors can be block-quantized along their long side.
/// A decode step computes `Q·x` and `R·x` in one pass over `x`, then adds `(R·x)·Lᵀ`.
#[derive(Debug, Clone)]
pub struct CorrectedLinear {
    weight: WeightMatrix,
    r: WeightMatrix,
    lt: WeightMatrix,
    bias: Option<Vec<f32>>,
}

impl CorrectedLinear {
    /// Builds a layer from the quantized `weight` (`out × in`), the correction's `r` (`rank ×
    /// in`) and `lt` (`rank × out`), and an optional bias.
    ///
    /// # Panics
    /// If the shapes do not fit together.
    pub fn new(
        weight: WeightMatrix,
        r: WeightMatrix,
        lt: WeightMatrix,
        bias: Option<Vec<f32>>,
    ) -> Self {
        assert!(
            r.cols() == weight.cols() && lt.cols() == weight.rows() && r.rows() == lt.rows(),
            "correction factors do not fit the weight"
        );
        if let Some(b) = &bias {
            assert_eq!(b.len(), weight.rows(), "bias is not out");
        }
        CorrectedLinear {
            weight,
            r,
            lt,
            bias,
        }
    }

    /// The rank of the correction.
    pub fn rank(&self) -> usize {
        self.r.rows()
    }

    /// The quantized weight `Q`, the correction's `R` and `Lᵀ`, as stored.
    pub fn matrices(&self) -> (&WeightMatrix, &WeightMatrix, &WeightMatrix) {
        (&self.weight, &self.r, &self.lt)
    }

    /// `Q + L·R` as f32 (`out × in`, row-major): the weight the layer applies.
    pub fn effective_weight(&self) -> Vec<f32> {
        let (o, i) = (self.weight.rows(), self.weight.cols());
        let mut w = self.weight.to_f32().into_owned();
        let r = self.r.to_f32();
        let lt = self.lt.to_f32();
        for k in 0..self.rank() {
            let rk = &r[k * i..(k + 1) * i];
            for (a, row) in w.chunks_exact_mut(i).enumerate() {
                let l = lt[k * o + a];
                if l != 0.0 {
                    crate::kernels::ops::axpy(row, l, rk);
                }
            }
        }
        w
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// The layer's matrices as `u8` tensors under scope `name`: `weight_sq` (the low-bit rows,
    /// `[out, row_bytes]`), `correction_r` (`[rank, row_bytes]`) and `correction_lt` (`[rank,
    /// row_bytes]`), each in its stored format; [`CorrectedLinear::load`] infers every format
    /// from its row length (the bias is an f32 tensor of its own).
    pub fn export(&self, name: &str) -> Vec<(String, BytesTensor)> {
        let enc = |m: &WeightMatrix| BytesTensor {
            shape: vec![m.rows(), m.format().row_bytes(m.cols())],
            bytes: m.encoded().map(<[u8]>::to_vec).unwrap_or_else(|| {
                // f32 storage: written as its little-endian bytes.
                m.to_f32().iter().flat_map(|v| v.to_le_bytes()).collect()
            }),
        };
        vec![
            (format!("{name}.weight_sq"), enc(&self.weight)),
            (format!("{name}.correction_r"), enc(&self.r)),
            (format!("{name}.correction_lt"), enc(&self.lt)),
        ]
    }

    /// Loads the layer [`CorrectedLinear::export`] wrote under scope `w` (`out × inp`), or
    /// `None` when the scope holds no `weight_sq`.
    pub fn load(
        w: &Weights,
        out: usize,
        inp: usize,
        bias: Option<Vec<f32>>,
    ) -> Result<Option<Self>, ModelError> {
        let Some(weight) = load_encoded(w, "weight_sq", Some(out), inp, LOWBIT)? else {
            return Ok(None);
        };
        let r = load_encoded(w, "correction_r", None, inp, FACTOR)?
            .ok_or_else(|| ModelError::MissingTensor(w.full("correction_r")))?;
        let lt = load_encoded(w, "correction_lt", Some(r.rows()), out, FACTOR)?
            .ok_or_else(|| ModelError::MissingTensor(w.full("correction_lt")))?;
        Ok(Some(CorrectedLinear::new(weight, r, lt, bias)))
    }
}

/// Formats a quantized weight may be stored in.
const LOWBIT: &[WeightFormat] = &[WeightFormat::Sq2, WeightFormat::Sq3, WeightFormat::Sq4];
/// Formats a correction factor may be stored in.
const FACTOR: &[WeightFormat] = &[WeightFormat::Q8_0, WeightFormat::F16, WeightFormat::F32];

/// The `u8` tensor `leaf` of scope `w` as a matrix of `cols` columns (and `rows` rows when
/// given) in whichever of `formats` has its row length; `None` when absent.
fn load_encoded(
    w: &Weights,
    leaf: &str,
    rows: Option<usize>,
    cols: usize,
    formats: &[WeightFormat],
) -> Result<Option<WeightMatrix>, ModelError> {
    let name = w.full(leaf);
    let Some(t) = w.source().load_bytes(&name)? else {
        return Ok(None);
    };
    let [r, rb] = t.shape[..] else {
        return Err(ModelError::WeightFormat(format!(
            "{name}: encoded rows must be 2-D, got shape {:?}",
            t.shape
        )));
    };
    if rows.is_some_and(|want| want != r) {
        return Err(ModelError::ShapeMismatch {
            name,
            expected: vec![rows.unwrap_or(r), rb],
            got: t.shape,
        });
    }
    let format = formats
        .iter()
        .copied()
        .find(|f| cols % f.block_size() == 0 && f.row_bytes(cols) == rb)
        .ok_or_else(|| {
            ModelError::WeightFormat(format!(
                "{name}: rows of {rb} bytes are none of {} at {cols} columns",
                formats
                    .iter()
                    .map(|f| f.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    WeightMatrix::from_blocks(format, t.bytes, r, cols).map(Some)
}

/// A linear layer in one of the representations the runtime executes.
#[derive(Debug, Clone)]
pub enum Linear {
    /// Full weight.
    Dense(DenseLinear),
    /// Thin factors.
    LowRank(LowRankLinear),
    /// Quantized weight plus a low-rank correction.
    Corrected(CorrectedLinear),
}

/// Buffers a [`Linear::forward`] reuses across calls: the low-rank intermediate and the
/// activation quantized for block formats.
#[derive(Debug, Default)]
pub struct LinearScratch {
    low_rank: Vec<f32>,
    acts: QuantizedActs,
    /// One decoded row of a correction's `Lᵀ`.
    row: Vec<f32>,
}

impl LinearScratch {
    /// The quantized-activation buffer (for products outside a [`Linear`], e.g. a tied head).
    pub fn acts_mut(&mut self) -> &mut QuantizedActs {
        &mut self.acts
    }
}

/// The fused-GEMV task of a dense layer, its bias written into `out` first.
fn dense_task<'t>(l: &'t Linear, out: &'t mut [f32]) -> GemvTask<'t> {
    let Linear::Dense(d) = l else {
        unreachable!("forward_shared fuses dense layers only")
    };
    let add = apply_bias(d.bias.as_deref(), out, Accum::Replace) == Accum::Add;
    GemvTask::new(&d.weight, out, add)
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
            Linear::Dense(d) => d.weight.rows(),
            Linear::LowRank(l) => l.u.rows(),
            Linear::Corrected(c) => c.weight.rows(),
        }
    }

    /// Input features.
    pub fn in_dim(&self) -> usize {
        match self {
            Linear::Dense(d) => d.weight.cols(),
            Linear::LowRank(l) => l.vs.cols(),
            Linear::Corrected(c) => c.weight.cols(),
        }
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        match self {
            Linear::Dense(d) => d.bias(),
            Linear::LowRank(l) => l.bias(),
            Linear::Corrected(c) => c.bias(),
        }
    }

    /// Parameters held (weights and bias).
    pub fn n_params(&self) -> usize {
        let bias = |b: &Option<Vec<f32>>| b.as_ref().map_or(0, Vec::len);
        match self {
            Linear::Dense(d) => d.weight.rows() * d.weight.cols() + bias(&d.bias),
            Linear::LowRank(l) => {
                l.u.rows() * l.u.cols() + l.vs.rows() * l.vs.cols() + bias(&l.bias)
            }
            Linear::Corrected(c) => {
                let (w, r, lt) = (&c.weight, &c.r, &c.lt);
                w.rows() * w.cols() + r.rows() * r.cols() + lt.rows() * lt.cols() + bias(&c.bias)
            }
        }
    }

    /// Bytes read from memory per forward pass (weights as stored, f32 bias).
    pub fn weight_bytes(&self) -> usize {
        let bias = |b: &Option<Vec<f32>>| b.as_ref().map_or(0, |b| 4 * b.len());
        match self {
            Linear::Dense(d) => d.weight.bytes() + bias(&d.bias),
            Linear::LowRank(l) => l.u.bytes() + l.vs.bytes() + bias(&l.bias),
            Linear::Corrected(c) => c.weight.bytes() + c.r.bytes() + c.lt.bytes() + bias(&c.bias),
        }
    }

    /// The storage format of the (largest) weight.
    pub fn format(&self) -> WeightFormat {
        match self {
            Linear::Dense(d) => d.weight.format(),
            Linear::LowRank(l) => l.vs.format(),
            Linear::Corrected(c) => c.weight.format(),
        }
    }

    /// `out (n × out_dim) = [out +] x (n × in_dim) · Wᵀ + b`, both row-major.
    pub fn forward(
        &self,
        x: &[f32],
        n: usize,
        out: &mut [f32],
        accum: Accum,
        scratch: &mut LinearScratch,
    ) {
        debug_assert_eq!(x.len(), n * self.in_dim());
        debug_assert_eq!(out.len(), n * self.out_dim());
        match self {
            Linear::Dense(d) => {
                let accum = apply_bias(d.bias.as_deref(), out, accum);
                d.weight.matmul(x, n, out, accum, &mut scratch.acts);
            }
            Linear::LowRank(l) => {
                let mid = &mut scratch.low_rank;
                mid.resize(n * l.rank(), 0.0);
                l.vs.matmul(x, n, mid, Accum::Replace, &mut scratch.acts);
                let accum = apply_bias(l.bias.as_deref(), out, accum);
                l.u.matmul(mid, n, out, accum, &mut scratch.acts);
            }
            Linear::Corrected(c) => {
                let mid = &mut scratch.low_rank;
                mid.resize(n * c.rank(), 0.0);
                let accum = apply_bias(c.bias.as_deref(), out, accum);
                if c.rank() == 0 {
                    c.weight.matmul(x, n, out, accum, &mut scratch.acts);
                    return;
                }
                if n <= SMALL_BATCH {
                    // One pass over x for Q·x and R·x.
                    let add = accum == Accum::Add;
                    let tasks = &mut [
                        GemvTask::new(&c.weight, out, add),
                        GemvTask::new(&c.r, mid, false),
                    ];
                    gemv(tasks, x, &mut scratch.acts);
                } else {
                    c.weight.matmul(x, n, out, accum, &mut scratch.acts);
                    c.r.matmul(x, n, mid, Accum::Replace, &mut scratch.acts);
                }
                c.lt.axpy_rows(mid, n, out, &mut scratch.row);
            }
        }
    }

    /// `outs[i] = x · W_iᵀ + b_i` for layers sharing the input `x` (q/k/v, gate/up). A decode
    /// step (`n ≤` [`SMALL_BATCH`] rows) over dense layers runs as one fused pass over all their
    /// rows; anything else runs the layers one by one.
    pub fn forward_shared(
        layers: &[&Linear],
        x: &[f32],
        n: usize,
        outs: &mut [&mut [f32]],
        scratch: &mut LinearScratch,
    ) {
        debug_assert_eq!(layers.len(), outs.len());
        let all_dense = layers.iter().all(|l| matches!(l, Linear::Dense(_)));
        if n > SMALL_BATCH || !all_dense || layers.len() > 3 {
            for (l, out) in layers.iter().zip(outs.iter_mut()) {
                l.forward(x, n, out, Accum::Replace, scratch);
            }
            return;
        }
        // Tasks on the stack (no allocation per token): one per layer, bias written first.
        let acts = &mut scratch.acts;
        match (layers, outs) {
            ([a], [oa]) => gemv(&mut [dense_task(a, oa)], x, acts),
            ([a, b], [oa, ob]) => gemv(&mut [dense_task(a, oa), dense_task(b, ob)], x, acts),
            ([a, b, c], [oa, ob, oc]) => gemv(
                &mut [dense_task(a, oa), dense_task(b, ob), dense_task(c, oc)],
                x,
                acts,
            ),
            _ => {}
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
        let mut scratch = LinearScratch::default();
        lr.forward(&x, n, &mut a, Accum::Add, &mut scratch);
        dense.forward(&x, n, &mut b, Accum::Add, &mut scratch);
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
                lin.forward(&x, n, &mut y, Accum::Replace, &mut LinearScratch::default());
                for (a, b) in y.iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
                }
                // Accumulate into a non-zero destination.
                let mut y2 = vec![1.0; n * o];
                lin.forward(&x, n, &mut y2, Accum::Add, &mut LinearScratch::default());
                for (a, b) in y2.iter().zip(&want) {
                    assert!((a - (b + 1.0)).abs() <= 1e-4 * (1.0 + b.abs()));
                }
            }
        }
    }
}
