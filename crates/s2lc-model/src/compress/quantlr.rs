//! Low-bit quantization with a low-rank correction (`s2lc compress --method quant-lr`): every
//! block linear `W` becomes `Q + L·R`, `Q` in S2LC's low-bit rows ([`crate::kernels::lowbit`])
//! and `L·R` fitted to the whitened quantization error (LQER / QERA / CALDERA).
//!
//! 1. Calibration windows run through the dense model once; each linear's input Gram matrix
//!    `H = XᵀX` is kept.
//! 2. Per matrix and per candidate bit width, `Q_b` comes from error-feedback quantization
//!    ([`super::gptq`]); the error `E_b = W − Q_b` seen through the inputs is `E_b·L` (`L·Lᵀ = H`),
//!    whose top singular values say what a rank-`r` correction removes: the output error left is
//!    `‖E_b·L‖² − Σ_{i≤r} σᵢ²`.
//! 3. A global byte budget (`bits_per_weight` × linear weights) is shared greedily: starting from
//!    the smallest option everywhere, the upgrade (more bits, more rank, or both) that removes
//!    the most output error per byte is taken while it fits.
//! 4. The chosen `(bits, rank)` is refitted `iters` times, alternating (CALDERA): `Q` quantizes
//!    `W − L·R`, then `L·R` is the whitened truncated SVD of `W − Q`. The factors are stored
//!    Q8_0 (`R` as `rank × in`, `L` as `Lᵀ`, `rank × out`), and the error reported is measured
//!    on what the layer holds.
//!
//! Everything counted in the budget: the rows with their scales, and both factors as stored.

use std::collections::HashMap;
use std::sync::Arc;

use faer::{Mat, MatRef};
use s2lc_spectral::rsvd::{rsvd, RsvdParams};
use s2lc_spectral::Whitening;

use super::calibration::to_f64;
use super::gptq::{self, InverseHessian};
use super::{input_grams, whitening_of, CompressError};
use crate::kernels::{lowbit, WeightFormat, WeightMatrix};
use crate::linear::{CorrectedLinear, Linear};
use crate::llama::{LinearInput, LlamaModel};

/// What to quantize to and how.
#[derive(Debug, Clone)]
pub struct QuantLrOptions {
    /// Bytes budget of the block linears, in bits per weight (everything counted).
    pub bits_per_weight: f64,
    /// Candidate bit widths of the rows (each of 2, 3, 4).
    pub bits: Vec<usize>,
    /// Candidate correction ranks (0 for none).
    pub ranks: Vec<usize>,
    /// Alternating refits of the chosen `(bits, rank)` after the first fit.
    pub iters: usize,
    /// Calibration windows (token ids, each run from an empty cache).
    pub calibration: Vec<Vec<u32>>,
}

/// What happened to one matrix.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QuantLrMatrix {
    /// Hugging Face name without `.weight`.
    pub name: String,
    /// Rows (`out`).
    pub rows: usize,
    /// Columns (`in`).
    pub cols: usize,
    /// Bits per code of the rows.
    pub bits: usize,
    /// Rank of the correction.
    pub rank: usize,
    /// Bytes held (rows with scales, both factors).
    pub bytes: usize,
    /// `‖X·(W − Q)ᵀ‖² / ‖X·Wᵀ‖²` of the first fit's `Q` alone.
    pub rel_error_quant: f64,
    /// `‖X·(W − Q − L·R)ᵀ‖² / ‖X·Wᵀ‖²` of what the layer holds.
    pub rel_error: f64,
}

/// The outcome of [`quantize_lowrank`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct QuantLrReport {
    /// One entry per block linear.
    pub matrices: Vec<QuantLrMatrix>,
    /// Weights of the block linears.
    pub weights: usize,
    /// Bytes the block linears hold.
    pub bytes: usize,
    /// `8 · bytes / weights`.
    pub bits_per_weight: f64,
    /// Calibration tokens used.
    pub calibration_tokens: usize,
}

/// What one input's calibration gives every linear reading it: the Gram matrix `H`, the
/// factor of `H⁻¹` error feedback uses, and the whitening `L·Lᵀ = H`.
type InputStats = (Mat<f32>, InverseHessian, Arc<Whitening>);

/// One matrix's candidates: per bit width, the first fit's rows and its error spectrum.
struct Candidates {
    name: String,
    layer: usize,
    /// The linear's name within its block (`self_attn.q_proj`, ...).
    leaf: &'static str,
    rows: usize,
    cols: usize,
    /// `‖X·Wᵀ‖²`.
    norm: f64,
    /// Per candidate bit width: (bits, encoded rows, output error after each candidate rank).
    options: Vec<(usize, Vec<u8>, Vec<f64>)>,
}

/// Bytes of a rank-`rank` correction of a `rows × cols` matrix (both factors, Q8_0 when their
/// long side is whole blocks of 32, f16 otherwise).
fn correction_bytes(rows: usize, cols: usize, rank: usize) -> usize {
    let side = |n: usize| {
        let f = if n % 32 == 0 {
            WeightFormat::Q8_0
        } else {
            WeightFormat::F16
        };
        f.row_bytes(n)
    };
    rank * (side(cols) + side(rows))
}

/// Checks options against the model before any work.
fn check(opts: &QuantLrOptions, shapes: &[(usize, usize)]) -> Result<(), CompressError> {
    let bad = |m: String| Err(CompressError::QuantLr(m));
    if opts.bits.is_empty() || opts.bits.iter().any(|b| !(2..=4).contains(b)) {
        return bad(format!(
            "bit widths {:?}: each must be 2, 3 or 4",
            opts.bits
        ));
    }
    if opts.ranks.is_empty() {
        return bad("no candidate rank (give at least 0)".into());
    }
    if opts.calibration.is_empty() {
        return Err(CompressError::NoCalibration);
    }
    for &(rows, cols) in shapes {
        if cols % lowbit::GROUP != 0 {
            return bad(format!(
                "a {rows} × {cols} matrix: rows must be whole groups of {}",
                lowbit::GROUP
            ));
        }
        if let Some(&r) = opts.ranks.iter().find(|&&r| r > rows.min(cols)) {
            return bad(format!(
                "rank {r} is above the size of a {rows} × {cols} matrix (at most {})",
                rows.min(cols)
            ));
        }
    }
    let weights: usize = shapes.iter().map(|(r, c)| r * c).sum();
    let min_bits = *opts.bits.iter().min().unwrap_or(&2);
    let smallest: usize = shapes
        .iter()
        .map(|&(r, c)| r * lowbit::row_bytes(min_bits, c))
        .sum();
    let smallest_bpw = 8.0 * smallest as f64 / weights.max(1) as f64;
    if opts.bits_per_weight < smallest_bpw {
        return bad(format!(
            "a budget of {} bits per weight is below the smallest format's {smallest_bpw:.3} \
             ({min_bits}-bit rows with their scales, no correction)",
            opts.bits_per_weight
        ));
    }
    Ok(())
}

/// Quantizes every block linear of `model` (loaded as f32) to `Q + L·R` under the byte budget,
/// and holds the embedding in Q8_0 ([`LlamaModel::quantize_embedding`]; not in the budget, which
/// counts block linears only).
/// `on_step(done, total)` reports progress over matrices (candidates, then final fits).
pub fn quantize_lowrank(
    model: &mut LlamaModel,
    opts: &QuantLrOptions,
    mut on_step: impl FnMut(usize, usize),
) -> Result<QuantLrReport, CompressError> {
    let shapes = model.linear_shapes();
    check(opts, &shapes)?;
    let mut ranks = opts.ranks.clone();
    ranks.sort_unstable();
    ranks.dedup();
    let max_rank = *ranks.last().unwrap_or(&0);
    let grams = input_grams(model, &opts.calibration)?;
    let n_layers = model.config().n_layers;
    let total = 2 * shapes.len();
    let mut done = 0;

    // 1–2. Candidates per matrix.
    let mut cands = Vec::with_capacity(shapes.len());
    let mut hessians: HashMap<(usize, LinearInput), InputStats> = HashMap::new();
    for layer in 0..n_layers {
        let leaves: Vec<&'static str> = model.blocks()[layer].linears().map(|(n, _)| n).collect();
        for name in leaves {
            let kind = LinearInput::of(name).expect("block linear names are known");
            let full = format!("model.layers.{layer}.{name}");
            if let std::collections::hash_map::Entry::Vacant(slot) = hessians.entry((layer, kind)) {
                let g = grams
                    .get(&(layer, kind))
                    .ok_or(CompressError::NoCalibration)?;
                let hinv =
                    InverseHessian::new(to_f64(g).as_ref(), gptq::DAMPING).ok_or_else(|| {
                        CompressError::QuantLr(format!("{full}: input Gram matrix not invertible"))
                    })?;
                let wh = whitening_of(&full, g)?;
                slot.insert((g.clone(), hinv, wh));
            }
            let (g, hinv, wh) = &hessians[&(layer, kind)];
            let w = dense_f32(linear_of(model, layer, name), &full)?;
            let (rows, cols) = (w.nrows(), w.ncols());
            let wv = row_major(w.as_ref());
            let norm = gptq::output_error(&wv, rows, cols, g.as_ref());
            let mut options = Vec::new();
            for &bits in &opts.bits {
                let q = gptq::quantize(&wv, rows, cols, bits, hinv);
                let e = residual(&wv, &q, bits, cols);
                let base = gptq::output_error(&e, rows, cols, g.as_ref());
                let s = top_singular_values(wh, &e, rows, cols, max_rank)?;
                let errs = ranks
                    .iter()
                    .map(|&r| {
                        let kept: f64 = s.iter().take(r).map(|&v| (v as f64).powi(2)).sum();
                        (base - kept).max(0.0)
                    })
                    .collect();
                options.push((bits, q, errs));
            }
            cands.push(Candidates {
                name: full,
                layer,
                leaf: name,
                rows,
                cols,
                norm,
                options,
            });
            done += 1;
            on_step(done, total);
        }
    }

    // 3. Greedy allocation of the byte budget.
    let weights: usize = shapes.iter().map(|(r, c)| r * c).sum();
    let budget = (opts.bits_per_weight * weights as f64 / 8.0).floor() as usize;
    let choice = allocate(&cands, &ranks, budget);

    // 4. Final fits.
    let mut matrices = Vec::with_capacity(cands.len());
    for (c, &(oi, ri)) in cands.iter().zip(&choice) {
        let (bits, first_q, errs) = &c.options[oi];
        let rank = ranks[ri];
        let kind = LinearInput::of(c.leaf).expect("block linear names are known");
        let (g, hinv, wh) = &hessians[&(c.layer, kind)];
        let w = dense_f32(linear_of(model, c.layer, c.leaf), &c.name)?;
        let wv = row_major(w.as_ref());
        let (rows, cols) = (c.rows, c.cols);
        let mut q = first_q.clone();
        let mut factors = correction(wh, &residual(&wv, &q, *bits, cols), rows, cols, rank)?;
        for _ in 0..opts.iters {
            if rank == 0 {
                break;
            }
            let target: Vec<f32> = wv
                .iter()
                .zip(&factors.dense())
                .map(|(a, b)| a - b)
                .collect();
            q = gptq::quantize(&target, rows, cols, *bits, hinv);
            factors = correction(wh, &residual(&wv, &q, *bits, cols), rows, cols, rank)?;
        }
        let format = WeightFormat::lowbit(*bits).expect("bits checked");
        let weight = WeightMatrix::from_blocks(format, q, rows, cols)?;
        let r = WeightMatrix::quantize_or_f16(&factors.r, rank, cols, WeightFormat::Q8_0)?;
        let lt = WeightMatrix::quantize_or_f16(&factors.lt, rank, rows, WeightFormat::Q8_0)?;
        let slot = model.blocks_mut()[c.layer]
            .linear_mut(c.leaf)
            .expect("the block has its own linears");
        let bias = slot.bias().map(<[f32]>::to_vec);
        let layer = CorrectedLinear::new(weight, r, lt, bias);
        let held = layer.effective_weight();
        let e: Vec<f32> = wv.iter().zip(&held).map(|(a, b)| a - b).collect();
        let err = gptq::output_error(&e, rows, cols, g.as_ref());
        let linear = Linear::Corrected(layer);
        let bytes = linear.weight_bytes() - linear.bias().map_or(0, |b| 4 * b.len());
        *slot = linear;
        matrices.push(QuantLrMatrix {
            name: c.name.clone(),
            rows,
            cols,
            bits: *bits,
            rank,
            bytes,
            rel_error_quant: errs[0] / c.norm.max(f64::MIN_POSITIVE),
            rel_error: err / c.norm.max(f64::MIN_POSITIVE),
        });
        done += 1;
        on_step(done, total);
    }
    // The embedding (the head too, when tied) as the llama.cpp quants of such models hold it.
    model.quantize_embedding()?;
    let bytes: usize = matrices.iter().map(|m| m.bytes).sum();
    Ok(QuantLrReport {
        matrices,
        weights,
        bytes,
        bits_per_weight: 8.0 * bytes as f64 / weights.max(1) as f64,
        calibration_tokens: opts.calibration.iter().map(Vec::len).sum(),
    })
}

/// The greedy choice `(option index, rank index)` per matrix within `budget` bytes.
fn allocate(cands: &[Candidates], ranks: &[usize], budget: usize) -> Vec<(usize, usize)> {
    let cost = |c: &Candidates, o: usize, r: usize| {
        c.rows * lowbit::row_bytes(c.options[o].0, c.cols)
            + correction_bytes(c.rows, c.cols, ranks[r])
    };
    let err = |c: &Candidates, o: usize, r: usize| c.options[o].2[r];
    // Start: the cheapest option of each matrix.
    let mut choice: Vec<(usize, usize)> = cands
        .iter()
        .map(|c| {
            let mut best = (0, 0);
            for o in 0..c.options.len() {
                if cost(c, o, 0) < cost(c, best.0, 0) {
                    best = (o, 0);
                }
            }
            best
        })
        .collect();
    let mut spent: usize = cands
        .iter()
        .zip(&choice)
        .map(|(c, &(o, r))| cost(c, o, r))
        .sum();
    loop {
        let mut best: Option<(f64, usize, (usize, usize))> = None;
        for (i, c) in cands.iter().enumerate() {
            let (o0, r0) = choice[i];
            let (c0, e0) = (cost(c, o0, r0), err(c, o0, r0));
            for o in 0..c.options.len() {
                for r in 0..ranks.len() {
                    let (c1, e1) = (cost(c, o, r), err(c, o, r));
                    if c1 <= c0 || e1 >= e0 || spent - c0 + c1 > budget {
                        continue;
                    }
                    let gain = (e0 - e1) / (c1 - c0) as f64;
                    if best.is_none_or(|(g, _, _)| gain > g) {
                        best = Some((gain, i, (o, r)));
                    }
                }
            }
        }
        let Some((_, i, next)) = best else { break };
        let (o0, r0) = choice[i];
        spent = spent - cost(&cands[i], o0, r0) + cost(&cands[i], next.0, next.1);
        choice[i] = next;
    }
    choice
}

/// A correction's factors: `r` (`rank × cols`) and `lt` (`rank × rows`), row-major.
struct Correction {
    r: Vec<f32>,
    lt: Vec<f32>,
    rows: usize,
    cols: usize,
    rank: usize,
}

impl Correction {
    /// `L·R` (`rows × cols`, row-major).
    fn dense(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.rows * self.cols];
        for k in 0..self.rank {
            let rk = &self.r[k * self.cols..(k + 1) * self.cols];
            for (a, row) in out.chunks_exact_mut(self.cols).enumerate() {
                let l = self.lt[k * self.rows + a];
                row.iter_mut().zip(rk).for_each(|(o, v)| *o += l * v);
            }
        }
        out
    }
}

/// The rank-`rank` correction of `e` minimizing the output error: the whitened truncated SVD.
fn correction(
    wh: &Whitening,
    e: &[f32],
    rows: usize,
    cols: usize,
    rank: usize,
) -> Result<Correction, CompressError> {
    if rank == 0 {
        return Ok(Correction {
            r: Vec::new(),
            lt: Vec::new(),
            rows,
            cols,
            rank,
        });
    }
    let a = wh.whiten(MatRef::from_row_major_slice(e, rows, cols));
    let svd = rsvd(a.as_ref(), &RsvdParams::new(rank)).map_err(|err| {
        CompressError::QuantLr(format!(
            "SVD of a {rows} × {cols} quantization error: {err}"
        ))
    })?;
    let f = wh.factors(&svd, rank);
    let rank = f.rank();
    let u = f.u();
    let lt = (0..rank)
        .flat_map(|k| (0..rows).map(move |i| u[(i, k)]))
        .collect();
    Ok(Correction {
        r: f.vs_values().to_vec(),
        lt,
        rows,
        cols,
        rank,
    })
}

/// The `max_rank` largest singular values of `e·L`.
fn top_singular_values(
    wh: &Whitening,
    e: &[f32],
    rows: usize,
    cols: usize,
    max_rank: usize,
) -> Result<Vec<f32>, CompressError> {
    if max_rank == 0 {
        return Ok(Vec::new());
    }
    let a = wh.whiten(MatRef::from_row_major_slice(e, rows, cols));
    rsvd(a.as_ref(), &RsvdParams::new(max_rank))
        .map(|s| s.s)
        .map_err(|err| CompressError::QuantLr(format!("SVD of a quantization error: {err}")))
}

/// `w − decode(q)`.
fn residual(w: &[f32], q: &[u8], bits: usize, cols: usize) -> Vec<f32> {
    let mut d = vec![0.0f32; w.len()];
    lowbit::dequantize(bits, q, cols, &mut d);
    w.iter().zip(&d).map(|(a, b)| a - b).collect()
}

fn row_major(m: MatRef<'_, f32>) -> Vec<f32> {
    (0..m.nrows())
        .flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)]))
        .collect()
}

/// The f32 weight of a dense layer, or an error naming the layer.
fn dense_f32(l: &Linear, name: &str) -> Result<Mat<f32>, CompressError> {
    super::dense_weight(l).map(|m| m.to_owned()).ok_or_else(|| {
        CompressError::QuantLr(format!(
            "{name} is not a dense f32 weight (load the model with f32 weights)"
        ))
    })
}

/// Block `layer`'s linear `leaf` (one of the names its `linears()` lists).
fn linear_of<'m>(model: &'m LlamaModel, layer: usize, leaf: &str) -> &'m Linear {
    model.blocks()[layer]
        .linears()
        .find(|(n, _)| *n == leaf)
        .map(|(_, l)| l)
        .expect("the block has its own linears")
}
