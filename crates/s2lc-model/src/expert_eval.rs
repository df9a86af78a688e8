//! A domain expert set measured: held-out perplexity on every domain with the set's base FFN and
//! with each expert swapped in, and the size and spectrum of each expert's residual
//! (`expert − base`, what S2LC compresses as an MoE residual). Shared by `experts eval` and
//! `bench adapters`.

use std::path::{Path, PathBuf};

use faer::{MatRef, Par};
use rayon::prelude::*;

use crate::error::ModelError;
use crate::experts::{ExpertSet, FfnWeights};
use crate::heldout::{domain_of_text, Domain, HeldoutError, HeldoutSplit};
use crate::llama::LlamaModel;

/// What can go wrong measuring an expert set.
#[derive(Debug, thiserror::Error)]
pub enum ExpertEvalError {
    /// The set, one of its experts, or the swap failed.
    #[error("expert set: {what}")]
    Set {
        /// Which step (and expert) failed.
        what: String,
        /// What the model crate said.
        source: ModelError,
    },
    /// Scoring held-out text failed.
    #[error(transparent)]
    Heldout(#[from] HeldoutError),
}

/// Size and spectrum of one expert's residual against the base FFN.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ResidualStats {
    /// `‖expert − base‖_F / ‖base‖_F`.
    pub rel_frobenius: f64,
    /// Mean rank (over the residual's matrices) keeping 90 % of its energy.
    pub mean_rank_90: f64,
    /// Mean rank keeping 99 % of its energy.
    pub mean_rank_99: f64,
}

/// One expert's scores.
#[derive(Clone, Debug)]
pub struct ExpertScore {
    /// Expert name.
    pub name: String,
    /// Held-out perplexity per domain with the expert swapped in.
    pub ppl: Vec<f64>,
    /// The domain the expert was trained on, when its training text is one of the domains.
    pub own: Option<usize>,
    /// Its residual against the base FFN.
    pub residual: ResidualStats,
}

/// A whole set measured.
#[derive(Clone, Debug)]
pub struct ExpertReport {
    /// The set.
    pub set: ExpertSet,
    /// Perplexity per domain with the base FFN.
    pub base: Vec<f64>,
    /// One entry per expert, in manifest order.
    pub experts: Vec<ExpertScore>,
}

/// The default expert set, `$S2LC_HOME/experts/ffn-every3` (as the training script writes it).
pub fn default_set() -> PathBuf {
    crate::assets::home().join("experts/ffn-every3")
}

/// The expert set a bench measures: `explicit` if given, none when `skip`, else the default set
/// when it exists (a bench runs without experts on a machine that never trained them).
pub fn bench_set(explicit: Option<&Path>, skip: bool) -> Option<PathBuf> {
    match (explicit, skip) {
        (Some(dir), _) => Some(dir.to_path_buf()),
        (None, true) => None,
        (None, false) => Some(default_set()).filter(|d| d.join("manifest.json").is_file()),
    }
}

/// Relative Frobenius norm of `residual` against `base`, and the mean rank keeping 90 / 99 % of
/// the residual's energy (one SVD per matrix, in parallel).
pub fn residual_stats(
    residual: &FfnWeights,
    base: &FfnWeights,
) -> Result<ResidualStats, ModelError> {
    let ranks: Vec<(usize, usize)> = residual
        .matrices()
        .collect::<Vec<_>>()
        .par_iter()
        .map(|(_, _, t)| {
            let m = MatRef::from_row_major_slice(&t.data, t.shape[0], t.shape[1]);
            let s = s2lc_spectral::singular_values(m, Par::Seq)?;
            Ok((
                s2lc_spectral::rank_for_energy(&s, 0.9),
                s2lc_spectral::rank_for_energy(&s, 0.99),
            ))
        })
        .collect::<Result<_, ModelError>>()?;
    let n = ranks.len().max(1) as f64;
    let mean = |f: fn(&(usize, usize)) -> usize| ranks.iter().map(f).sum::<usize>() as f64 / n;
    Ok(ResidualStats {
        rel_frobenius: (residual.sq_norm() / base.sq_norm()).sqrt(),
        mean_rank_90: mean(|r| r.0),
        mean_rank_99: mean(|r| r.1),
    })
}

/// Scores `domains` with the set at `dir`'s base FFN and with each expert swapped into `model`
/// (`on_expert` is called after each); the model is left with the base FFN in those layers
/// (dense f32).
pub fn measure(
    dir: &Path,
    model: &mut LlamaModel,
    domains: &[Domain],
    split: &HeldoutSplit,
    mut on_expert: impl FnMut(),
) -> Result<ExpertReport, ExpertEvalError> {
    let step = |what: String| move |source| ExpertEvalError::Set { what, source };
    let set = ExpertSet::open(dir).map_err(step(
        "opening it (train one with scripts/reference/train_adapter_set.sh --experts)".into(),
    ))?;
    let base = set.base().map_err(step("reading the base FFN".into()))?;
    base.swap_into(model)
        .map_err(step("swapping the base FFN in".into()))?;
    let base_ppl = split.score(model, domains)?;
    let mut experts = Vec::new();
    for info in &set.experts {
        let expert = set
            .expert(&info.name)
            .map_err(step(format!("reading expert '{}'", info.name)))?;
        expert
            .swap_into(model)
            .map_err(step(format!("swapping expert '{}' in", info.name)))?;
        let ppl = split.score(model, domains)?;
        let residual = expert
            .minus(&base)
            .and_then(|r| residual_stats(&r, &base))
            .map_err(step(format!("the residual of expert '{}'", info.name)))?;
        experts.push(ExpertScore {
            name: info.name.clone(),
            ppl,
            own: info
                .text
                .as_deref()
                .and_then(|t| domain_of_text(t, domains)),
            residual,
        });
        on_expert();
    }
    base.swap_into(model)
        .map_err(step("swapping the base FFN back".into()))?;
    Ok(ExpertReport {
        set,
        base: base_ppl,
        experts,
    })
}

#[cfg(test)]
mod tests {
    use super::bench_set;
    use std::path::Path;

    #[test]
    fn an_explicit_set_wins_and_skip_means_none() {
        let dir = Path::new("some/set");
        assert_eq!(bench_set(Some(dir), false).as_deref(), Some(dir));
        assert_eq!(bench_set(Some(dir), true).as_deref(), Some(dir));
        assert_eq!(bench_set(None, true), None);
    }
}
