//! `s2lc experts eval`: a domain expert set scored with each expert swapped in, and the size and
//! spectrum of each expert's residual (`expert − base`, what S2LC compresses as an MoE residual).
//! The measuring is [`s2lc_model::expert_eval`]; this prints it and writes it as JSON.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use s2lc_model::expert_eval::{default_set, measure, ExpertReport};
use s2lc_model::experts::ExpertSet;
use s2lc_model::heldout::{default_texts, named_texts, Domain};
use s2lc_model::llama::LlamaModel;

use crate::common::{progress_bar, write_json, BaseModelArgs, JsonArg};
use crate::domains::{print_table, HeldoutArgs, Row};

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
    base: BaseModelArgs,
    /// Score these texts instead of the real text domains (repeat the flag).
    #[arg(long = "text")]
    texts: Vec<PathBuf>,
    #[command(flatten)]
    heldout: HeldoutArgs,
    #[command(flatten)]
    json: JsonArg,
}

/// Runs an `experts` subcommand.
pub fn run(cmd: &ExpertsCommand) -> Result<()> {
    match cmd {
        ExpertsCommand::Eval(args) => eval(args),
    }
}

/// [`measure`] with a progress bar.
pub fn measure_set(
    dir: &std::path::Path,
    model: &mut LlamaModel,
    domains: &[Domain],
    h: &HeldoutArgs,
) -> Result<ExpertReport> {
    let n = ExpertSet::open(dir).map_or(0, |s| s.experts.len());
    let bar = progress_bar(n as u64, "scoring experts");
    let report = measure(dir, model, domains, &h.split(), || bar.inc(1))
        .with_context(|| format!("measuring the expert set {}", dir.display()))?;
    bar.finish_and_clear();
    Ok(report)
}

/// The experts of a report as rows of the domain table.
fn rows(report: &ExpertReport) -> Vec<Row> {
    report
        .experts
        .iter()
        .map(|e| Row {
            label: e.name.clone(),
            extra: Vec::new(),
            ppl: e.ppl.clone(),
            own: e.own,
        })
        .collect()
}

/// Prints the domain table and the residual table; returns the own-domain failures.
pub fn print_report(
    report: &ExpertReport,
    domains: &[Domain],
    h: &HeldoutArgs,
    weights: &str,
) -> Vec<String> {
    h.print_title(&format!(
        "held-out perplexity with each expert's FFN in layers {:?} ({weights} weights elsewhere), change vs base",
        report.set.layers
    ));
    let failures = print_table(domains, &[], &report.base, &rows(report));
    h.print_scored(domains);
    println!("\nresiduals (expert − base FFN), per expert:");
    println!(
        "{:<18} {:>14} {:>12} {:>12}",
        "expert", "‖Δ‖/‖W_base‖", "rank@90%", "rank@99%"
    );
    for e in &report.experts {
        let r = &e.residual;
        println!(
            "{:<18} {:>14.5} {:>12.1} {:>12.1}",
            e.name, r.rel_frobenius, r.mean_rank_90, r.mean_rank_99
        );
    }
    failures
}

/// The report as JSON.
pub fn report_json(report: &ExpertReport, domains: &[Domain], failures: &[String]) -> Value {
    json!({
        "set": report.set.dir,
        "layers": report.set.layers,
        "base": report.base,
        "experts": report.experts.iter().map(|e| json!({
            "name": e.name,
            "own_domain": e.own.map(|i| &domains[i].name),
            "perplexity": e.ppl,
            "residual_rel_frobenius": e.residual.rel_frobenius,
            "residual_mean_rank_90": e.residual.mean_rank_90,
            "residual_mean_rank_99": e.residual.mean_rank_99,
        })).collect::<Vec<_>>(),
        "failures": failures,
    })
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
    let (_source, mut model, tokenizer) = args.base.load()?;
    let texts = if args.texts.is_empty() {
        default_texts()
    } else {
        named_texts(&args.texts)
    };
    let h = &args.heldout;
    let domains = h.load(&tokenizer, &texts)?;
    let report = measure_set(&dir, &mut model, &domains, h)?;
    let failures = print_report(&report, &domains, h, args.base.weights.name());
    for f in &failures {
        eprintln!("warning: {f}");
    }
    if let Some(path) = &args.json.path {
        let mut json = report_json(&report, &domains, &failures);
        json["weights"] = json!(args.base.weights.name());
        json["heldout"] = json!(h.heldout);
        json["seq"] = json!(h.seq);
        json["domains"] = h.domains_json(&domains);
        write_json(path, &json)?;
    }
    Ok(())
}
