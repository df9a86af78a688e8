//! `s2lc experts eval`: a domain expert set scored with each expert swapped in, and the size and
//! spectrum of each expert's residual (`expert − base`, what S2LC compresses as an MoE residual).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use faer::{MatRef, Par};
use rayon::prelude::*;
use serde_json::{json, Value};

use s2lc_model::experts::{ExpertSet, FfnWeights};
use s2lc_model::llama::LlamaModel;
use s2lc_model::source::WeightStorage;

use crate::heldout::{
    default_texts, domain_of_text, named_texts, print_table, Domain, HeldoutArgs, Row,
};
use crate::{load_model, parse_weights, ModelArg};

/// What to do with an expert set.
#[derive(Subcommand)]
pub enum ExpertsCommand {
    /// Held-out perplexity of the base and of each expert swapped in, on the real text domains
    /// (or `--text` files), plus each expert's residual norm and spectrum.
    Eval(EvalArgs),
}

/// `s2lc experts eval`.
#[derive(Args)]
pub struct EvalArgs {
    /// Expert set directory (manifest.json) [default: $S2LC_HOME/experts/ffn-every3].
    set: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArg,
    /// Weight storage of the layers the experts do not replace.
    #[arg(long, default_value = "native", value_parser = parse_weights)]
    weights: WeightStorage,
    /// Score these texts instead of the real text domains (repeat the flag).
    #[arg(long = "text")]
    texts: Vec<PathBuf>,
    #[command(flatten)]
    heldout: HeldoutArgs,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Runs an `experts` subcommand.
pub fn run(cmd: &ExpertsCommand) -> Result<()> {
    match cmd {
        ExpertsCommand::Eval(args) => eval(args),
    }
}

/// Relative Frobenius norm of a residual and the mean rank keeping 90 / 99 % of its energy.
fn residual_stats(residual: &FfnWeights, base: &FfnWeights) -> Result<(f64, f64, f64)> {
    let ranks: Vec<(usize, usize)> = residual
        .matrices()
        .collect::<Vec<_>>()
        .par_iter()
        .map(|(layer, module, t)| {
            let m = MatRef::from_row_major_slice(&t.data, t.shape[0], t.shape[1]);
            let s = s2lc_spectral::singular_values(m, Par::Seq)
                .with_context(|| format!("SVD of layer {layer} {module}"))?;
            Ok((
                s2lc_spectral::rank_for_energy(&s, 0.9),
                s2lc_spectral::rank_for_energy(&s, 0.99),
            ))
        })
        .collect::<Result<_>>()?;
    let n = ranks.len().max(1) as f64;
    let mean = |f: fn(&(usize, usize)) -> usize| ranks.iter().map(f).sum::<usize>() as f64 / n;
    Ok((
        (residual.sq_norm() / base.sq_norm()).sqrt(),
        mean(|r| r.0),
        mean(|r| r.1),
    ))
}

/// What [`measure`] found: the base perplexities, one row per expert, and each residual's
/// (relative norm, mean rank at 90 %, at 99 %).
pub struct ExpertReport {
    /// The set as opened.
    pub set: ExpertSet,
    /// Perplexity per domain with the base FFN.
    pub base: Vec<f64>,
    /// One row per expert.
    pub rows: Vec<Row>,
    /// Per expert: `‖Δ‖/‖W_base‖`, mean rank at 90 % and at 99 % of the residual's energy.
    pub residuals: Vec<(f64, f64, f64)>,
}

/// Scores `domains` with the set's base FFN and with each expert swapped into `model`; the model
/// is left with the base FFN in those layers (dense f32).
pub fn measure(
    dir: &Path,
    model: &mut LlamaModel,
    domains: &[Domain],
    h: &HeldoutArgs,
) -> Result<ExpertReport> {
    let set = ExpertSet::open(dir).with_context(|| {
        format!(
            "opening the expert set {} (train one with scripts/reference/train_adapter_set.sh --experts)",
            dir.display()
        )
    })?;
    let base = set.base().context("reading the base FFN")?;
    base.swap_into(model).context("swapping the base FFN in")?;
    let base_ppl = h.score(model, domains)?;
    let mut rows = Vec::new();
    let mut residuals = Vec::new();
    let bar = crate::progress::bar(set.experts.len() as u64, "scoring experts");
    for info in &set.experts {
        let expert = set
            .expert(&info.name)
            .with_context(|| format!("reading expert '{}'", info.name))?;
        expert
            .swap_into(model)
            .with_context(|| format!("swapping expert '{}' in", info.name))?;
        let ppl = h.score(model, domains)?;
        residuals.push(residual_stats(&expert.minus(&base)?, &base)?);
        rows.push(Row {
            label: info.name.clone(),
            extra: Vec::new(),
            ppl,
            own: info
                .text
                .as_deref()
                .and_then(|t| domain_of_text(t, domains)),
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    base.swap_into(model)?;
    Ok(ExpertReport {
        set,
        base: base_ppl,
        rows,
        residuals,
    })
}

impl ExpertReport {
    /// Prints the domain table and the residual table; returns the own-domain failures.
    pub fn print(&self, domains: &[Domain], h: &HeldoutArgs, weights: &str) -> Vec<String> {
        h.print_title(&format!(
            "held-out perplexity with each expert's FFN in layers {:?} ({weights} weights elsewhere), change vs base",
            self.set.layers
        ));
        let failures = print_table(domains, &[], &self.base, &self.rows);
        h.print_scored(domains);
        println!("\nresiduals (expert − base FFN), per expert:");
        println!(
            "{:<18} {:>14} {:>12} {:>12}",
            "expert", "‖Δ‖/‖W_base‖", "rank@90%", "rank@99%"
        );
        for (r, (rel, r90, r99)) in self.rows.iter().zip(&self.residuals) {
            println!("{:<18} {rel:>14.5} {r90:>12.1} {r99:>12.1}", r.label);
        }
        failures
    }

    /// The report as JSON.
    pub fn to_json(&self, domains: &[Domain], failures: &[String]) -> Value {
        json!({
            "set": self.set.dir,
            "layers": self.set.layers,
            "base": self.base,
            "experts": self.rows.iter().zip(&self.residuals).map(|(r, (rel, r90, r99))| json!({
                "name": r.label,
                "own_domain": r.own.map(|i| &domains[i].name),
                "perplexity": r.ppl,
                "residual_rel_frobenius": rel,
                "residual_mean_rank_90": r90,
                "residual_mean_rank_99": r99,
            })).collect::<Vec<_>>(),
            "failures": failures,
        })
    }
}

/// The default expert set, `$S2LC_HOME/experts/ffn-every3`.
pub fn default_set() -> PathBuf {
    crate::s2lc_home().join("experts/ffn-every3")
}

/// The expert set a bench measures: `--experts DIR` if given, none with `--no-experts`, else the
/// default set when it exists.
pub fn bench_set(explicit: Option<&Path>, skip: bool) -> Option<PathBuf> {
    match (explicit, skip) {
        (Some(dir), _) => Some(dir.to_path_buf()),
        (None, true) => None,
        (None, false) => Some(default_set()).filter(|d| d.join("manifest.json").is_file()),
    }
}

fn eval(args: &EvalArgs) -> Result<()> {
    let dir = args.set.clone().unwrap_or_else(default_set);
    // Open the set before the model loads, so a wrong path fails fast.
    ExpertSet::open(&dir).with_context(|| {
        format!(
            "opening the expert set {} (train one with scripts/reference/train_adapter_set.sh --experts)",
            dir.display()
        )
    })?;
    let (_source, mut model, tokenizer) = load_model(&args.model.path(), args.weights)?;
    let texts = if args.texts.is_empty() {
        default_texts()
    } else {
        named_texts(&args.texts)
    };
    let h = &args.heldout;
    let domains = h.load(&tokenizer, &texts)?;
    let report = measure(&dir, &mut model, &domains, h)?;
    let failures = report.print(&domains, h, args.weights.name());
    for f in &failures {
        eprintln!("warning: {f}");
    }
    if let Some(path) = &args.json {
        let mut json = report.to_json(&domains, &failures);
        json["weights"] = json!(args.weights.name());
        json["heldout"] = json!(h.heldout);
        json["seq"] = json!(h.seq);
        json["domains"] = h.domains_json(&domains);
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
