//! The compression pipeline, shared by the decoder ([`super::compress`]) and the sentence encoder
//! ([`crate::encoder::SentenceEncoder::compress`]): which layers are decomposed with which
//! calibration statistics, in which order ranks are fixed and factors applied. A model takes part
//! through [`Layered`]: how its calibration streams are made and run through one layer, how one
//! layer's linears are decomposed and replaced.

use super::{
    check_policy, damping_notes, policy_ranks, rank_for, CompressError, CompressionReport,
    Decomposition, MatrixReport, Method, RankPolicy,
};

/// A stack of layers of linears, as the pipeline compresses it.
pub(crate) trait Layered {
    /// The calibration activations at the input of the current layer (one entry per window).
    type Streams: Clone;
    /// What one layer's decompositions are whitened with (its inputs' Gram matrices).
    type Grams;

    /// Layers in the stack.
    fn n_layers(&self) -> usize;
    /// Linears in each layer.
    fn per_layer(&self) -> usize;
    /// `(out, in)` of every linear, layer by layer.
    fn shapes(&self) -> Vec<(usize, usize)>;
    /// Parameters of the linear layers' weights, as stored.
    fn linear_params(&self) -> usize;
    /// Whether any calibration input was given.
    fn has_calibration(&self) -> bool;
    /// The calibration streams at the input of the first layer, and the tokens they hold.
    fn streams(&self) -> Result<(Self::Streams, usize), CompressError>;
    /// Runs layer `layer` on `streams` in place; with `collect`, returns its inputs' Gram matrices.
    fn advance(
        &self,
        layer: usize,
        streams: &mut Self::Streams,
        collect: bool,
    ) -> Result<Option<Self::Grams>, CompressError>;
    /// The Gram matrices of layer `layer`'s inputs on `streams`, which are left as they are: the
    /// layer is about to be compressed, and the streams then go through it as compressed.
    fn probe(
        &mut self,
        layer: usize,
        streams: &Self::Streams,
    ) -> Result<Option<Self::Grams>, CompressError> {
        self.advance(layer, &mut streams.clone(), true)
    }
    /// The decompositions of layer `layer`'s linears (`None`: a linear that is left alone),
    /// whitened by `grams` when given.
    fn decompose(
        &self,
        layer: usize,
        grams: Option<&Self::Grams>,
    ) -> Result<Vec<Option<Decomposition>>, CompressError>;
    /// Replaces the linear `cut` names by its factors (or leaves it dense when they would not
    /// shrink it) and reports it.
    fn apply(&mut self, cut: Cut<'_>) -> Result<MatrixReport, CompressError>;
}

/// One linear to cut: linear `index` of layer `layer`, its decomposition and the rank to keep.
#[derive(Clone, Copy)]
pub(crate) struct Cut<'a> {
    /// The layer.
    pub(crate) layer: usize,
    /// The linear within the layer.
    pub(crate) index: usize,
    /// Its decomposition.
    pub(crate) dec: &'a Decomposition,
    /// The rank to keep.
    pub(crate) rank: usize,
}

/// Compresses `model`'s linears: plain or whitened SVD, ranks by energy or a global budget.
/// With `sequential` whitening each layer is whitened by the states of the already-compressed
/// layers before it. `on_layer(done, total)` reports progress.
pub(crate) fn run<M: Layered>(
    model: &mut M,
    policy: RankPolicy,
    method: Method,
    sequential: bool,
    mut on_layer: impl FnMut(usize, usize),
) -> Result<CompressionReport, CompressError> {
    check_policy(policy, &model.shapes())?;
    let n_layers = model.n_layers();
    let per = model.per_layer();
    let params_before = model.linear_params();
    let whitened = method == Method::Whitened;
    if whitened && !model.has_calibration() {
        return Err(CompressError::NoCalibration);
    }
    // Calibration streams at the input of the current layer.
    let (mut streams, calibration_tokens) = if whitened {
        let (s, tokens) = model.streams()?;
        (Some(s), tokens)
    } else {
        (None, 0)
    };
    let finish = |model: &M, matrices: Vec<MatrixReport>| CompressionReport {
        notes: damping_notes(&matrices),
        matrices,
        params_before,
        params_after: model.linear_params(),
        calibration_tokens,
    };

    // A global budget needs every spectrum before any rank is fixed: allocate on a first pass
    // (dense activations for whitening), then factor (sequentially, if asked) with those ranks.
    let fixed_ranks: Option<Vec<usize>> = match policy {
        RankPolicy::KeepParams(_) => {
            let mut all: Vec<Decomposition> = Vec::new();
            let mut dense_streams = streams.clone();
            for layer in 0..n_layers {
                let grams = match dense_streams.as_mut() {
                    Some(s) => model.advance(layer, s, true)?,
                    None => None,
                };
                all.extend(
                    model
                        .decompose(layer, grams.as_ref())?
                        .into_iter()
                        .flatten(),
                );
                on_layer(layer + 1, 2 * n_layers);
            }
            let ranks = policy_ranks(policy, &all, &model.shapes())?;
            if !(whitened && sequential) {
                // Non-sequential factors are already computed: apply them.
                let mut matrices = Vec::new();
                for (i, dec) in all.iter().enumerate() {
                    matrices.push(model.apply(Cut {
                        layer: i / per,
                        index: i % per,
                        dec,
                        rank: ranks[i],
                    })?);
                }
                on_layer(2 * n_layers, 2 * n_layers);
                return Ok(finish(model, matrices));
            }
            Some(ranks)
        }
        RankPolicy::Energy(_) => None,
    };

    let mut matrices = Vec::new();
    let mut pending = Vec::new();
    for layer in 0..n_layers {
        let grams = match streams.as_mut() {
            // This layer changes before the streams go through it.
            Some(s) if sequential => model.probe(layer, s)?,
            // Every layer stays dense until the end: one pass collects and advances.
            Some(s) => model.advance(layer, s, true)?,
            None => None,
        };
        if !whitened || sequential {
            let fixed = |index: usize| fixed_ranks.as_ref().map(|r| r[layer * per + index]);
            let rank = |index, dec: &Decomposition| rank_for(policy, dec, fixed(index));
            matrices.extend(cut_layer(model, layer, grams.as_ref(), rank)?);
            if let Some(s) = streams.as_mut() {
                // Through this layer as it now is.
                model.advance(layer, s, false)?;
            }
        } else {
            pending.push(grams);
        }
        let base = if fixed_ranks.is_some() { n_layers } else { 0 };
        on_layer(base + layer + 1, base + n_layers);
    }
    for (layer, grams) in pending.iter().enumerate() {
        let rank = |_, dec: &Decomposition| rank_for(policy, dec, None);
        matrices.extend(cut_layer(model, layer, grams.as_ref(), rank)?);
    }
    Ok(finish(model, matrices))
}

/// Decomposes layer `layer` (whitened by `grams` when given) and cuts each of its linears to
/// `rank(index, decomposition)`.
fn cut_layer<M: Layered>(
    model: &mut M,
    layer: usize,
    grams: Option<&M::Grams>,
    rank: impl Fn(usize, &Decomposition) -> usize,
) -> Result<Vec<MatrixReport>, CompressError> {
    let decs = model.decompose(layer, grams)?;
    let mut reports = Vec::with_capacity(decs.len());
    for (index, dec) in decs.iter().enumerate() {
        let Some(dec) = dec else { continue };
        let rank = rank(index, dec);
        reports.push(model.apply(Cut {
            layer,
            index,
            dec,
            rank,
        })?);
    }
    Ok(reports)
}
