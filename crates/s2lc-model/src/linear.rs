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
pub(crate) fn load_encoded(
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
                if n <= SMALL_BATCH {
                    // One pass over x for Q·x and R·x.
                    Self::fused(&[self], x, n, &mut [out], accum, scratch);
                    return;
                }
                let accum = apply_bias(c.bias.as_deref(), out, accum);
                c.weight.matmul(x, n, out, accum, &mut scratch.acts);
                if c.rank() > 0 {
                    let mid = &mut scratch.low_rank;
                    mid.resize(n * c.rank(), 0.0);
                    c.r.matmul(x, n, mid, Accum::Replace, &mut scratch.acts);
                    c.lt.axpy_rows(mid, n, out, &mut scratch.row);
                }
            }
        }
    }

    /// `outs[i] = x · W_iᵀ + b_i` for layers sharing the input `x` (q/k/v, gate/up). A decode
    /// step (`n ≤` [`SMALL_BATCH`] rows) over dense or corrected layers runs as one fused pass
    /// over all their rows (a correction's `R` included, its `Lᵀ` added after); anything else
    /// runs the layers one by one.
    pub fn forward_shared(
        layers: &[&Linear],
        x: &[f32],
        n: usize,
        outs: &mut [&mut [f32]],
        scratch: &mut LinearScratch,
    ) {
        debug_assert_eq!(layers.len(), outs.len());
        let fusable = |l: &&Linear| matches!(l, Linear::Dense(_) | Linear::Corrected(_));
        if n > SMALL_BATCH || layers.len() > 3 || !layers.iter().all(fusable) {
            for (l, out) in layers.iter().zip(outs.iter_mut()) {
                l.forward(x, n, out, Accum::Replace, scratch);
            }
            return;
        }
        Self::fused(layers, x, n, outs, Accum::Replace, scratch);
    }

    /// The fused decode-step pass of [`Linear::forward_shared`] (and of a corrected layer's
    /// [`Linear::forward`]): up to three dense or corrected layers, `n ≤` [`SMALL_BATCH`] rows,
    /// each output written (`Replace`) or added to (`Add`).
    fn fused(
        layers: &[&Linear],
        x: &[f32],
        n: usize,
        outs: &mut [&mut [f32]],
        accum: Accum,
        scratch: &mut LinearScratch,
    ) {
        // Each corrected layer's R·x lands in its own part of the low-rank scratch.
        let rank = |l: &Linear| match l {
            Linear::Corrected(c) => c.rank(),
            _ => 0,
        };
        let total: usize = layers.iter().map(|l| n * rank(l)).sum();
        let LinearScratch {
            low_rank,
            acts,
            row,
        } = scratch;
        low_rank.resize(total, 0.0);
        let mut mids: [&mut [f32]; 3] = Default::default();
        let mut rest = &mut low_rank[..];
        for (m, l) in mids.iter_mut().zip(layers) {
            let (head, tail) = rest.split_at_mut(n * rank(l));
            *m = head;
            rest = tail;
        }
        {
            // Tasks on the stack (no allocation per token): each layer's weight (bias written
            // first) and, for a correction, its `R`; all of them one pass over `x`.
            let mut slots: [Option<GemvTask<'_>>; 6] = Default::default();
            let mut k = 0;
            for ((l, out), mid) in layers.iter().zip(outs.iter_mut()).zip(mids.iter_mut()) {
                let (weight, bias, r) = match l {
                    Linear::Dense(d) => (&d.weight, d.bias.as_deref(), None),
                    Linear::Corrected(c) => (&c.weight, c.bias.as_deref(), Some(&c.r)),
                    Linear::LowRank(_) => unreachable!("fused layers are dense or corrected"),
                };
                let add = apply_bias(bias, out, accum) == Accum::Add;
                slots[k] = Some(GemvTask::new(weight, out, add));
                k += 1;
                if let Some(r) = r.filter(|_| !mid.is_empty()) {
                    slots[k] = Some(GemvTask::new(r, mid, false));
                    k += 1;
                }
            }
            match slots {
                [Some(a), None, ..] => gemv(&mut [a], x, acts),
                [Some(a), Some(b), None, ..] => gemv(&mut [a, b], x, acts),
                [Some(a), Some(b), Some(c), None, ..] => gemv(&mut [a, b, c], x, acts),
                [Some(a), Some(b), Some(c), Some(d), None, ..] => gemv(&mut [a, b, c, d], x, acts),
                [Some(a), Some(b), Some(c), Some(d), Some(e), None] => {
                    gemv(&mut [a, b, c, d, e], x, acts)
                }
                [Some(a), Some(b), Some(c), Some(d), Some(e), Some(f)] => {
                    gemv(&mut [a, b, c, d, e, f], x, acts)
                }
                _ => {}
            }
        }
        for ((l, out), mid) in layers.iter().zip(outs.iter_mut()).zip(&mids) {
            if let Linear::Corrected(c) = l {
                if !mid.is_empty() {
                    c.lt.axpy_rows(mid, n, out, row);
                }
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

    /// A corrected layer of `o × i` (3-bit rows, Q8_0 factors of `rank`) from fixed values.
    fn corrected(o: usize, i: usize, rank: usize, bias: bool, seed: u64) -> Linear {
        let mut rng = s2lc_spectral::rng::SplitMix64::new(seed);
        let q = WeightMatrix::quantize(&rng.centered_vec(o * i), o, i, WeightFormat::Sq3).unwrap();
        let r =
            WeightMatrix::quantize_or_f16(&rng.centered_vec(rank * i), rank, i, WeightFormat::Q8_0)
                .unwrap();
        let lt =
            WeightMatrix::quantize_or_f16(&rng.centered_vec(rank * o), rank, o, WeightFormat::Q8_0)
                .unwrap();
        let b = bias.then(|| rng.centered_vec(o));
        Linear::Corrected(CorrectedLinear::new(q, r, lt, b))
    }

    #[test]
    fn fused_layers_with_corrections_equal_each_layer_and_the_effective_weight() {
        let i = 96;
        let dense_w: Vec<f32> = (0..64 * i)
            .map(|k| ((k * 7 % 13) as f32 - 6.0) / 9.0)
            .collect();
        let layers = [
            Linear::Dense(DenseLinear::new(dense_w, 64, i, Some(vec![0.5; 64]))),
            corrected(160, i, 5, true, 1),
            corrected(32, i, 0, false, 2),
        ];
        let refs: Vec<&Linear> = layers.iter().collect();
        for n in [1, 3, SMALL_BATCH, SMALL_BATCH + 1] {
            let x: Vec<f32> = (0..n * i).map(|k| (k as f32 * 0.37).sin()).collect();
            let mut fused: Vec<Vec<f32>> = layers
                .iter()
                .map(|l| vec![f32::NAN; n * l.out_dim()])
                .collect();
            let mut outs: Vec<&mut [f32]> = fused.iter_mut().map(|v| &mut v[..]).collect();
            Linear::forward_shared(&refs, &x, n, &mut outs, &mut LinearScratch::default());
            for (l, got) in layers.iter().zip(&fused) {
                let mut alone = vec![f32::NAN; n * l.out_dim()];
                l.forward(
                    &x,
                    n,
                    &mut alone,
                    Accum::Replace,
                    &mut LinearScratch::default(),
                );
                assert!(
                    got.iter()
                        .zip(&alone)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "n = {n}: fused and single-layer results differ"
                );
                let w = match l {
                    Linear::Corrected(c) => c.effective_weight(),
                    Linear::Dense(d) => d.weight().into_owned(),
                    Linear::LowRank(_) => unreachable!(),
                };
                let want = naive(&w, l.bias(), &x, n, l.out_dim(), i);
                for (a, b) in got.iter().zip(&want) {
                    // Block kernels take x quantized to 16 bits per block of 32.
                    assert!(
                        (a - b).abs() <= 2e-3 * (1.0 + b.abs()),
                        "n = {n}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
