//! `s2lc bench adapters`: the real adapter set on the real text domains in one process — a
//! domain × adapter matrix of held-out perplexity, the domain × expert table of the expert set, and
//! what an unmerged adapter costs in speed.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

use s2lc_model::llama::{ForwardScratch, LlamaModel};
use s2lc_model::lora::LoraAdapter;
use s2lc_model::source::WeightStorage;

use s2lc_model::heldout::{adapter_domain, default_texts};
use s2lc_model::speed::{prefill_and_decode, PrefillDecode};

use crate::adapter_io::{dir_name, load_adapter};
use crate::common::{
    progress_bar, s2lc_home, write_json, AdapterSetArgs, BaseModelArgs, ExpertSetArgs, JsonArg,
};
use crate::domains::{print_table, HeldoutArgs, Row};
use crate::experts::{measure_set, print_report, report_json};

/// Options of `s2lc bench adapters`.
#[derive(Args)]
pub struct AdaptersArgs {
    #[command(flatten)]
    base: BaseModelArgs,
    #[command(flatten)]
    adapters: AdapterSetArgs,
    #[command(flatten)]
    heldout: HeldoutArgs,
    /// Tokens decoded per timing run (0 skips the timing).
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Timing rounds; base and every adapter are timed once per round, interleaved, best kept.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[command(flatten)]
    experts: ExpertSetArgs,
    #[command(flatten)]
    json: JsonArg,
}

/// An adapter and the domain it was trained on (from its `s2lc_training.json`, if any).
struct Entry {
    dir: PathBuf,
    adapter: LoraAdapter,
    own: Option<usize>,
}

/// Adapter directories under `root` (those holding `adapter_config.json`), sorted.
fn find_adapters(root: &Path) -> Result<Vec<PathBuf>> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .with_context(|| {
            format!(
                "listing {} (train adapters with scripts/reference/train_adapter_set.sh or pass --adapter)",
                root.display()
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("adapter_config.json").is_file())
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// Runs `s2lc bench adapters`.
pub fn run(args: &AdaptersArgs) -> Result<()> {
    let (_source, mut model, tokenizer) = args.base.load()?;
    let h = &args.heldout;
    let domains = h.load(&tokenizer, &default_texts())?;
    let home = s2lc_home();
    let dirs = args
        .adapters
        .dirs_or(|| find_adapters(&home.join("adapters")))?;
    if dirs.is_empty() {
        bail!("no adapters to measure (train them with scripts/reference/train_adapter_set.sh)");
    }
    let mut entries = Vec::new();
    for dir in dirs {
        let adapter = load_adapter(&dir)?;
        let own = adapter_domain(&dir, &domains);
        entries.push(Entry { dir, adapter, own });
    }

    let bar = progress_bar(entries.len() as u64 + 1, "scoring base and adapters");
    let base_ppl = h.score(&model, &domains)?;
    bar.inc(1);
    let mut rows = Vec::new();
    for e in &entries {
        model
            .attach_adapter(&e.adapter)
            .with_context(|| format!("attaching {}", e.dir.display()))?;
        let ppl = h.score(&model, &domains);
        model.detach_adapters();
        rows.push(ppl?);
        bar.inc(1);
    }
    bar.finish_and_clear();

    let name = |e: &Entry| dir_name(&e.dir);
    h.print_title(&format!(
        "held-out perplexity, {} weights, change vs base",
        args.base.weights.name()
    ));
    let table: Vec<Row> = entries
        .iter()
        .zip(&rows)
        .map(|(e, ppl)| Row {
            label: name(e),
            extra: vec![e.adapter.rank.to_string(), e.adapter.n_params().to_string()],
            ppl: ppl.clone(),
            own: e.own,
        })
        .collect();
    let failures = print_table(&domains, &[("rank", 5), ("params", 9)], &base_ppl, &table);
    h.print_scored(&domains);
    for f in &failures {
        eprintln!("warning: {f}");
    }

    let experts_dir = args.experts.dir();
    let mut experts_json = Value::Null;
    if let Some(dir) = &experts_dir {
        println!();
        // On a copy: the experts replace FFN weights, and the timing below measures the base.
        let report = measure_set(dir, &mut model.clone(), &domains, h)?;
        let failures = print_report(&report, &domains, h, args.base.weights.name());
        for f in &failures {
            eprintln!("warning: {f}");
        }
        experts_json = report_json(&report, &domains, &failures);
    }

    let timing = if args.decode_tokens > 0 {
        time_adapters(&mut model, &entries, &domains[0].tokens, args)?
    } else {
        Vec::new()
    };
    if !timing.is_empty() {
        let (base_prefill, base_decode) = (timing[0].1, timing[0].2);
        println!(
            "\nbatch-1 speed, {} weights (prefill {} tokens, decode {} after 64; best of {}):",
            args.base.weights.name(),
            h.seq,
            args.decode_tokens,
            args.runs
        );
        println!(
            "{:<26} {:>10} {:>8} {:>10} {:>8}",
            "model", "prefill/s", "vs base", "decode/s", "vs base"
        );
        for (label, prefill, decode) in &timing {
            println!(
                "{label:<26} {prefill:>10.1} {:>8.3} {decode:>10.1} {:>8.3}",
                prefill / base_prefill,
                decode / base_decode
            );
        }
    }

    if let Some(path) = &args.json.path {
        let report = json!({
            "model": args.base.path(),
            "weights": args.base.weights.name(),
            "heldout": h.heldout,
            "seq": h.seq,
            "domains": h.domains_json(&domains),
            "base": base_ppl,
            "adapters": entries.iter().zip(&rows).map(|(e, ppl)| json!({
                "name": name(e),
                "path": e.dir,
                "rank": e.adapter.rank,
                "params": e.adapter.n_params(),
                "own_domain": e.own.map(|i| &domains[i].name),
                "perplexity": ppl,
            })).collect::<Vec<_>>(),
            "speed": timing.iter().map(|(label, p, d)| json!({
                "model": label, "prefill_tok_s": p, "decode_tok_s": d,
            })).collect::<Vec<_>>(),
            "failures": failures,
            "experts": experts_json,
        });
        write_json(path, &report)?;
    }
    Ok(())
}

/// Best (prefill, decode) tok/s of the base, each adapter unmerged and, with f32 weights, the
/// first adapter merged; all timed once per round, interleaved, so load drifts hit all alike.
fn time_adapters(
    model: &mut LlamaModel,
    entries: &[Entry],
    text: &[u32],
    args: &AdaptersArgs,
) -> Result<Vec<(String, f64, f64)>> {
    let prompt = &text[..args.heldout.seq.min(text.len())];
    let mut merged = None;
    if args.base.weights == WeightStorage::F32 {
        let mut m = model.clone();
        m.attach_adapter(&entries[0].adapter)?;
        m.merge_adapters()?;
        merged = Some(m);
    }
    let label = |e: &Entry, how: &str| format!("{} {how}", dir_name(&e.dir));
    let mut best: Vec<(String, f64, f64)> = std::iter::once("base".to_string())
        .chain(entries.iter().map(|e| label(e, "unmerged")))
        .chain(merged.iter().map(|_| label(&entries[0], "merged")))
        .map(|l| (l, 0.0, 0.0))
        .collect();
    let mut scratch = ForwardScratch::default();
    let bar = progress_bar((args.runs.max(1) * best.len()) as u64, "timing");
    let keep = |slot: &mut (String, f64, f64), t: PrefillDecode| {
        slot.1 = f64::max(slot.1, t.prefill);
        slot.2 = f64::max(slot.2, t.decode);
        bar.inc(1);
    };
    for _ in 0..args.runs.max(1) {
        let t = prefill_and_decode(model, prompt, 64, args.decode_tokens, &mut scratch, false)?;
        keep(&mut best[0], t);
        for (i, e) in entries.iter().enumerate() {
            model.attach_adapter(&e.adapter)?;
            let t = prefill_and_decode(model, prompt, 64, args.decode_tokens, &mut scratch, false);
            model.detach_adapters();
            keep(&mut best[1 + i], t?);
        }
        if let Some(m) = &merged {
            let t = prefill_and_decode(m, prompt, 64, args.decode_tokens, &mut scratch, false)?;
            keep(&mut best[1 + entries.len()], t);
        }
    }
    bar.finish_and_clear();
    Ok(best)
}
