//! Low-rank compression of a loaded model: every chosen linear layer `W` is replaced by thin
//! factors `u·vs` chosen by plain SVD or by activation-aware (whitened) SVD, with ranks from an
//! energy threshold or a global parameter budget.
//!
//! Whitening needs calibration activations. With `sequential` calibration each block is whitened
//! with the activations produced by the already-compressed blocks before it, so later layers
//! compensate earlier errors instead of compounding them.
//!
//! Parts: this module (options, reports, decomposing and replacing the decoder's linears, export),
//! `pipeline` (the order of passes, shared with the sentence encoder) and `calibration` (windows,
//! Gram collection).

use std::collections::HashMap;
use std::sync::Arc;

use faer::{Mat, MatRef};
use rayon::prelude::*;
use s2lc_spectral::{
    allocate_ranks, break_even_rank, rank_for_energy, refit_left, thin_svd, BudgetError,
    LowRankFactors, Spectrum, Svd, WhitenError, Whitening,
};

mod calibration;
mod gptq;
pub(crate) mod pipeline;
pub mod quantlr;

use pipeline::Cut;

use crate::atomic::write_file_atomic;
use crate::error::ModelError;
use crate::kv::KvCache;
use crate::linear::{Linear, LowRankLinear};
use crate::llama::{ActivationObserver, ForwardScratch, LinearInput, LlamaModel};
pub use calibration::calibration_windows;
use calibration::{cross_gram, to_f64, GramCollector};
pub use quantlr::{quantize_lowrank, QuantLrMatrix, QuantLrOptions, QuantLrReport};

/// How ranks are chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RankPolicy {
    /// Per matrix, the smallest rank keeping this fraction of the (whitened) spectral energy.
    Energy(f64),
    /// Globally, keep this fraction of the linear-layer parameters (ranks by largest marginal
    /// energy per parameter, never above break-even).
    KeepParams(f64),
}

/// How a weight is factored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Truncated SVD of `W`: optimal for the weight error, blind to the inputs.
    Svd,
    /// Truncated SVD of `W·L` with `L·Lᵀ = XᵀX` from calibration inputs (SVD-LLM).
    Whitened,
}

impl Method {
    /// The name used on the command line and in metadata.
    pub fn name(self) -> &'static str {
        match self {
            Method::Svd => "svd",
            Method::Whitened => "whitened",
        }
    }
}

/// What to compress and how.
#[derive(Debug, Clone)]
pub struct CompressOptions {
    /// Rank policy.
    pub policy: RankPolicy,
    /// Factorization method.
    pub method: Method,
    /// Calibration windows (token ids, each run from an empty cache); required for `Whitened`.
    pub calibration: Vec<Vec<u32>>,
    /// Whiten each block with activations of the already-compressed blocks before it.
    pub sequential: bool,
    /// After factoring, refit each `u` by least squares so the compressed layer, fed the
    /// compressed model's inputs, reproduces the dense model's outputs (sequential whitening only).
    pub refit: bool,
}

/// Why compression failed.
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    /// The energy threshold is outside (0, 1].
    #[error("energy threshold {0} is outside (0, 1]")]
    BadThreshold(f64),
    /// The parameter budget cannot be met.
    #[error(transparent)]
    Budget(#[from] BudgetError),
    /// Whitening needs calibration text.
    #[error("whitened compression needs calibration windows (none given)")]
    NoCalibration,
    /// A factorization failed.
    #[error("{name}: {source}")]
    Factor {
        /// The matrix.
        name: String,
        /// What failed.
        source: WhitenError,
    },
    /// The calibration text is shorter than one window.
    #[error("calibration text has {tokens} tokens, fewer than one window of {window}")]
    CalibrationTooShort {
        /// Tokens in the text.
        tokens: usize,
        /// Window length.
        window: usize,
    },
    /// Running the model on calibration text failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Quantization with a low-rank correction cannot run as asked (budget, ranks, shapes).
    #[error("quant-lr: {0}")]
    QuantLr(String),
}

/// What happened to one matrix.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MatrixReport {
    /// Hugging Face name without `.weight` (`model.layers.3.self_attn.q_proj`).
    pub name: String,
    /// Rows (`out`).
    pub rows: usize,
    /// Columns (`in`).
    pub cols: usize,
    /// The rank kept, or `None` when the matrix stays dense (rank at or above break-even).
    pub rank: Option<usize>,
    /// Fraction of the (whitened, for `Whitened`) spectral energy kept.
    pub energy_kept: f64,
    /// Relative damping that made the Gram matrix positive definite (0: none needed).
    pub damping: f64,
}

/// The outcome of [`compress`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct CompressionReport {
    /// One entry per linear layer considered.
    pub matrices: Vec<MatrixReport>,
    /// Linear-layer parameters before.
    pub params_before: usize,
    /// Linear-layer parameters after.
    pub params_after: usize,
    /// Calibration tokens used (0 for plain SVD).
    pub calibration_tokens: usize,
    /// Notes worth telling the user (damped Gram matrices, ...).
    pub notes: Vec<String>,
}

/// One matrix's spectrum and how to turn it into factors.
pub(crate) struct Decomposition {
    pub(crate) svd: Svd,
    /// Shared by the linears reading the same input.
    whitening: Option<Arc<Whitening>>,
}

impl Decomposition {
    /// The SVD of `w` (`out × in`), of `w·L` when whitened; `name` labels a failure.
    pub(crate) fn new(
        name: &str,
        w: MatRef<'_, f32>,
        whitening: Option<Arc<Whitening>>,
    ) -> Result<Self, CompressError> {
        let svd = match &whitening {
            Some(wh) => wh.svd(w),
            None => thin_svd(w).map_err(WhitenError::from),
        }
        .map_err(|source| CompressError::Factor {
            name: name.to_string(),
            source,
        })?;
        Ok(Decomposition { svd, whitening })
    }

    fn factors(&self, rank: usize) -> LowRankFactors {
        match &self.whitening {
            Some(w) => w.factors(&self.svd, rank),
            None => LowRankFactors::from_svd(&self.svd, rank),
        }
    }

    /// The report of matrix `name` (`rows × cols`) cut to `rank`, and its factors, or `None`
    /// when the matrix stays dense (the rank reaches break-even or the full rank).
    pub(crate) fn truncate(
        &self,
        name: String,
        rows: usize,
        cols: usize,
        rank: usize,
    ) -> (MatrixReport, Option<LowRankFactors>) {
        let keep = rank <= break_even_rank(rows, cols) && rank < self.svd.s.len();
        let energy_kept = if keep && rank > 0 {
            s2lc_spectral::cumulative_energy(&self.svd.s)[rank - 1]
        } else {
            1.0
        };
        let report = MatrixReport {
            name,
            rows,
            cols,
            rank: keep.then_some(rank),
            energy_kept,
            damping: self.whitening.as_ref().map_or(0.0, |w| w.damping),
        };
        (report, keep.then(|| self.factors(rank)))
    }
}

/// Whitening of one input from its (f32) Gram matrix; `name` labels a failure.
pub(crate) fn whitening_of(name: &str, gram: &Mat<f32>) -> Result<Arc<Whitening>, CompressError> {
    Whitening::from_gram(to_f64(gram).as_ref())
        .map(Arc::new)
        .map_err(|source| CompressError::Factor {
            name: name.to_string(),
            source,
        })
}

/// Fails early when the rank policy cannot be met by matrices of these shapes.
pub(crate) fn check_policy(
    policy: RankPolicy,
    shapes: &[(usize, usize)],
) -> Result<(), CompressError> {
    match policy {
        RankPolicy::Energy(e) if !(e > 0.0 && e <= 1.0) => Err(CompressError::BadThreshold(e)),
        RankPolicy::Energy(_) => Ok(()),
        RankPolicy::KeepParams(keep) => {
            // Even rank 1 everywhere must fit.
            let ones = [1.0f32];
            let probe: Vec<Spectrum> = shapes
                .iter()
                .map(|&(rows, cols)| Spectrum {
                    rows,
                    cols,
                    values: &ones,
                })
                .collect();
            allocate_ranks(&probe, keep)?;
            Ok(())
        }
    }
}

/// The rank of every decomposition under `policy`: per matrix by energy, or by the global
/// budget over all of them (`shapes` in the same order).
pub(crate) fn policy_ranks(
    policy: RankPolicy,
    decs: &[Decomposition],
    shapes: &[(usize, usize)],
) -> Result<Vec<usize>, CompressError> {
    match policy {
        RankPolicy::Energy(e) => Ok(decs.iter().map(|d| rank_for_energy(&d.svd.s, e)).collect()),
        RankPolicy::KeepParams(keep) => {
            let spectra: Vec<Spectrum> = decs
                .iter()
                .zip(shapes)
                .map(|(d, &(rows, cols))| Spectrum {
                    rows,
                    cols,
                    values: &d.svd.s,
                })
                .collect();
            Ok(allocate_ranks(&spectra, keep)?)
        }
    }
}

/// One note per matrix whose Gram matrix needed damping.
pub(crate) fn damping_notes(matrices: &[MatrixReport]) -> Vec<String> {
    matrices
        .iter()
        .filter(|m| m.damping > 0.0)
        .map(|m| {
            format!(
                "{}: Gram matrix not positive definite, damped by {:e}·mean(diag)",
                m.name, m.damping
            )
        })
        .collect()
}

/// The name of linear `index` of a block, counted in [`crate::llama::Block::linears`] order (the
/// linears the architecture has: seven for Llama and Qwen2, six for GPT-2, which has no gate).
fn linear_name(model: &LlamaModel, layer: usize, index: usize) -> Option<&'static str> {
    model.blocks()[layer]
        .linears()
        .nth(index)
        .map(|(name, _)| name)
}

/// The f32 weight of a dense layer (compression works on a model loaded with
/// [`crate::source::WeightStorage::F32`]; layers held in other formats are left alone).
fn dense_weight(l: &Linear) -> Option<MatRef<'_, f32>> {
    match l {
        Linear::Dense(d) => d
            .matrix()
            .as_f32()
            .map(|w| MatRef::from_row_major_slice(w, l.out_dim(), l.in_dim())),
        Linear::LowRank(_) | Linear::Corrected(_) => None,
    }
}

/// Decomposes the dense linears of `layer` (plain or whitened by `grams`), in parallel.
fn decompose_layer(
    model: &LlamaModel,
    layer: usize,
    grams: Option<&HashMap<(usize, LinearInput), Mat<f32>>>,
) -> Result<Vec<Option<Decomposition>>, CompressError> {
    let block = &model.blocks()[layer];
    let linears: Vec<_> = block.linears().collect();
    // One whitening per input kind, shared by the layers reading it.
    let mut whitenings: HashMap<LinearInput, Arc<Whitening>> = HashMap::new();
    if let Some(grams) = grams {
        for (name, _) in &linears {
            let input = LinearInput::of(name).expect("block linear names are known");
            if whitenings.contains_key(&input) {
                continue;
            }
            let g = grams
                .get(&(layer, input))
                .ok_or(CompressError::NoCalibration)?;
            whitenings.insert(
                input,
                whitening_of(&format!("model.layers.{layer}.{name}"), g)?,
            );
        }
    }
    linears
        .par_iter()
        .map(|(name, lin)| {
            let Some(w) = dense_weight(lin) else {
                return Ok(None);
            };
            let whitening = LinearInput::of(name)
                .and_then(|i| whitenings.get(&i))
                .cloned();
            Decomposition::new(&format!("model.layers.{layer}.{name}"), w, whitening).map(Some)
        })
        .collect()
}

/// Replaces the block linear `cut` names by its factors (or leaves it dense when the rank
/// reaches break-even), the left factor refitted when `refit` gives its Gram matrices, and
/// reports it.
fn apply(
    model: &mut LlamaModel,
    Cut {
        layer,
        index,
        dec,
        rank,
    }: Cut<'_>,
    refit: Option<(&Mat<f64>, &Mat<f64>)>,
) -> Result<MatrixReport, CompressError> {
    let leaf = linear_name(model, layer, index).expect("cuts index the block's linears");
    let block = &mut model.blocks_mut()[layer];
    let slot = block
        .linear_mut(leaf)
        .expect("the block has its own linears");
    let (rows, cols) = (slot.out_dim(), slot.in_dim());
    let name = format!("model.layers.{layer}.{leaf}");
    let (report, factors) = dec.truncate(name, rows, cols, rank);
    if let Some(mut f) = factors {
        if let (Some((g_cc, g_cd)), Some(w)) = (refit, dense_weight(slot)) {
            let u = refit_left(w, f.vs(), g_cc.as_ref(), g_cd.as_ref()).map_err(|source| {
                CompressError::Factor {
                    name: report.name.clone(),
                    source,
                }
            })?;
            f = LowRankFactors::from_mats(u.as_ref(), f.vs());
        }
        let bias = slot.bias().map(<[f32]>::to_vec);
        let (u, vs) = f.into_row_major();
        *slot = Linear::LowRank(LowRankLinear::new(u, vs, rows, cols, bias));
    }
    Ok(report)
}

fn rank_for(policy: RankPolicy, dec: &Decomposition, fixed: Option<usize>) -> usize {
    match (policy, fixed) {
        (_, Some(r)) => r,
        (RankPolicy::Energy(e), None) => rank_for_energy(&dec.svd.s, e),
        (RankPolicy::KeepParams(_), None) => dec.svd.s.len(),
    }
}

/// Runs calibration windows through block `layer` (in place on each window's residual stream),
/// collecting Gram matrices when `collect` is set.
fn advance_block(
    model: &LlamaModel,
    layer: usize,
    streams: &mut [Vec<f32>],
    collect: Option<&mut GramCollector>,
) -> Result<(), ModelError> {
    let cfg = model.config();
    let window = streams
        .iter()
        .map(|s| s.len() / cfg.hidden_size)
        .max()
        .unwrap_or(1);
    let mut cache = model.dense_cache(window);
    let mut scratch = ForwardScratch::default();
    let mut collect = collect;
    for x in streams.iter_mut() {
        cache.clear();
        let obs = collect
            .as_deref_mut()
            .map(|c| c as &mut dyn ActivationObserver);
        model.run_block(layer, x, &mut cache, &mut scratch, obs)?;
    }
    Ok(())
}

/// The Gram matrix `XᵀX` of every block linear's input over `windows` (one pass of `model` as
/// it is, block by block), keyed by (layer, input kind): what activation-aware packing of adapter
/// deltas whitens with.
pub fn input_grams(
    model: &LlamaModel,
    windows: &[Vec<u32>],
) -> Result<HashMap<(usize, LinearInput), Mat<f32>>, ModelError> {
    let mut streams = Vec::with_capacity(windows.len());
    for w in windows {
        let mut x = Vec::new();
        model.embed(w, &mut x)?;
        streams.push(x);
    }
    let mut grams = GramCollector::default();
    for layer in 0..model.config().n_layers {
        advance_block(model, layer, &mut streams, Some(&mut grams))?;
    }
    Ok(grams.grams)
}

/// Compresses the block linears of `model` in place. `on_layer(done, total)` reports progress.
pub fn compress(
    model: &mut LlamaModel,
    opts: &CompressOptions,
    on_layer: impl FnMut(usize, usize),
) -> Result<CompressionReport, CompressError> {
    let refit = (opts.method == Method::Whitened && opts.sequential && opts.refit).then(|| Refit {
        dense_streams: Vec::new(),
        grams: HashMap::new(),
    });
    let mut decoder = Decoder {
        model,
        calibration: &opts.calibration,
        refit,
    };
    pipeline::run(
        &mut decoder,
        opts.policy,
        opts.method,
        opts.sequential,
        on_layer,
    )
}

/// The decoder as [`pipeline::run`] compresses it: block by block, calibration windows as
/// residual streams.
struct Decoder<'a> {
    model: &'a mut LlamaModel,
    calibration: &'a [Vec<u32>],
    refit: Option<Refit>,
}

/// What refitting each `u` needs: the dense model's residual streams, and per input kind of the
/// current block the Gram matrix `X_cᵀX_c` and cross-Gram matrix `X_cᵀX_d`.
struct Refit {
    dense_streams: Vec<Vec<f32>>,
    grams: HashMap<LinearInput, (Mat<f64>, Mat<f64>)>,
}

impl pipeline::Layered for Decoder<'_> {
    type Streams = Vec<Vec<f32>>;
    type Grams = GramCollector;

    fn n_layers(&self) -> usize {
        self.model.config().n_layers
    }

    fn per_layer(&self) -> usize {
        self.model
            .blocks()
            .first()
            .map_or(0, |b| b.linears().count())
    }

    fn shapes(&self) -> Vec<(usize, usize)> {
        self.model.linear_shapes()
    }

    fn linear_params(&self) -> usize {
        self.model.linear_params()
    }

    fn has_calibration(&self) -> bool {
        !self.calibration.is_empty()
    }

    fn streams(&self) -> Result<(Self::Streams, usize), CompressError> {
        let mut streams = Vec::with_capacity(self.calibration.len());
        for w in self.calibration {
            let mut x = Vec::new();
            self.model.embed(w, &mut x)?;
            streams.push(x);
        }
        Ok((streams, self.calibration.iter().map(Vec::len).sum()))
    }

    fn advance(
        &self,
        layer: usize,
        streams: &mut Self::Streams,
        collect: bool,
    ) -> Result<Option<GramCollector>, CompressError> {
        let mut grams = collect.then(GramCollector::default);
        advance_block(self.model, layer, streams, grams.as_mut())?;
        Ok(grams)
    }

    /// With refitting, also runs the dense model's streams through the (still dense) block and
    /// keeps the cross-Gram matrices of its inputs for [`Self::apply`].
    fn probe(
        &mut self,
        layer: usize,
        streams: &Self::Streams,
    ) -> Result<Option<GramCollector>, CompressError> {
        let Some(refit) = self.refit.as_mut() else {
            return self.advance(layer, &mut streams.clone(), true);
        };
        if layer == 0 {
            refit.dense_streams = streams.clone();
        }
        let mut grams = GramCollector::recording();
        advance_block(self.model, layer, &mut streams.clone(), Some(&mut grams))?;
        let mut dense_taps = GramCollector::recording();
        advance_block(
            self.model,
            layer,
            &mut refit.dense_streams,
            Some(&mut dense_taps),
        )?;
        refit.grams.clear();
        let (rc, rd) = (grams.record.take(), dense_taps.record.take());
        for (kind, xc) in rc.iter().flatten() {
            let Some(xd) = rd.as_ref().and_then(|r| r.get(kind)) else {
                continue;
            };
            if let Some(g_cc) = grams.grams.get(&(layer, *kind)).map(to_f64) {
                let width = g_cc.nrows();
                refit.grams.insert(*kind, (g_cc, cross_gram(xc, xd, width)));
            }
        }
        Ok(Some(grams))
    }

    fn decompose(
        &self,
        layer: usize,
        grams: Option<&GramCollector>,
    ) -> Result<Vec<Option<Decomposition>>, CompressError> {
        decompose_layer(self.model, layer, grams.map(|g| &g.grams))
    }

    fn apply(&mut self, cut: Cut<'_>) -> Result<MatrixReport, CompressError> {
        let name = linear_name(self.model, cut.layer, cut.index).expect("cuts index the linears");
        let kind = LinearInput::of(name).expect("block linear names are known");
        let pair = self
            .refit
            .as_ref()
            .and_then(|r| r.grams.get(&kind))
            .map(|(a, b)| (a, b));
        apply(self.model, cut, pair)
    }
}

/// Writes `model` as a Hugging Face directory: `config.json`, `model.safetensors` (with the
/// compression record as `__metadata__["s2lc"]`), `tokenizer.json` when a tokenizer is given (a
/// model directory of weights alone, such as a GPT-2 without one, is saved without it) and
/// `s2lc_compression.json`. Files are written under temporary names and renamed, so a failure
/// leaves no partial model. Tensors carry the runtime's names ([`LlamaModel::export_tensors`]),
/// a GPT-2 too: `config.json` says `gpt2` and loading maps either layout.
pub fn save_model_dir(
    model: &LlamaModel,
    tokenizer: Option<&crate::tokenizer::Tokenizer>,
    dir: &std::path::Path,
    record: &serde_json::Value,
) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let write = |name: &str, text: String| write_file_atomic(&dir.join(name), text.as_bytes());
    let tensors = model.export_tensors();
    let encoded = model.export_byte_tensors();
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("s2lc".to_string(), record.to_string()),
    ]);
    crate::source::write_safetensors_with_bytes(
        &dir.join("model.safetensors"),
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
        encoded.iter().map(|(n, t)| (n.as_str(), t)),
        Some(meta),
    )?;
    if let Some(tokenizer) = tokenizer {
        crate::atomic::write_atomic_with(&dir.join("tokenizer.json"), |tmp| {
            tokenizer.save(tmp).map_err(ModelError::from)
        })?;
    }
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
    write("config.json", pretty(&model.config().to_hf_json()))?;
    write("s2lc_compression.json", pretty(record))
}

#[cfg(test)]
mod tests;
