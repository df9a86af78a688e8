//! `s2lc bench adapters`: the real adapter set on the real text domains in one process — a
//! domain × adapter matrix of held-out perplexity, and what an unmerged adapter costs in speed.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

use s2lc_model::eval::perplexity;
use s2lc_model::llama::{ForwardScratch, LlamaModel};
use s2lc_model::lora::LoraAdapter;
use s2lc_model::source::WeightStorage;
use s2lc_model::tokenizer::read_text_file;

use crate::bench::prefill_and_decode;
use crate::{load_model, parse_weights, progress, s2lc_home, ModelArg};

/// Options of `s2lc bench adapters`.
#[derive(Args)]
pub struct AdaptersArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Weight storage of the base model.
    #[arg(long, default_value = "native", value_parser = parse_weights)]
    weights: WeightStorage,
    /// A PEFT adapter directory (repeat the flag) [default: every adapter under
    /// $S2LC_HOME/adapters, as `scripts/reference/train_adapter_set.sh` writes them].
    #[arg(long = "adapter")]
    adapters: Vec<PathBuf>,
    /// Held-out fraction at the end of each domain text (the training script's split).
    #[arg(long, default_value_t = 0.1)]
    heldout: f64,
    /// Tokens per independent evaluation window.
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Most held-out windows scored per domain.
    #[arg(long, default_value_t = 16)]
    max_windows: usize,
    /// Tokens decoded per timing run (0 skips the timing).
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Timing rounds; base and every adapter are timed once per round, interleaved, best kept.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One text domain's held-out tokens.
struct Domain {
    name: &'static str,
    path: PathBuf,
    /// Token index where the held-out part starts.
    start: usize,
    /// `windows × seq` held-out tokens.
    heldout: Vec<u32>,
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

/// Index of the domain whose text file the adapter was trained on.
fn own_domain(dir: &Path, domains: &[Domain]) -> Option<usize> {
    let record: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("s2lc_training.json")).ok()?)
            .ok()?;
    let text = Path::new(record["args"]["text"].as_str()?);
    domains.iter().position(|d| {
        d.path.file_name() == text.file_name()
            && d.path.parent().and_then(Path::file_name) == text.parent().and_then(Path::file_name)
    })
}

/// Held-out perplexity of `model` on every domain.
fn score(model: &LlamaModel, domains: &[Domain], seq: usize) -> Result<Vec<f64>> {
    domains
        .iter()
        .map(|d| {
            Ok(perplexity(model, &d.heldout, seq, seq, |_, _| {})
                .with_context(|| format!("scoring {}", d.path.display()))?
                .perplexity())
        })
        .collect()
}

/// Runs `s2lc bench adapters`.
pub fn run(args: &AdaptersArgs) -> Result<()> {
    if !(args.heldout > 0.0 && args.heldout < 1.0) {
        bail!("--heldout {} is outside (0, 1)", args.heldout);
    }
    if args.seq < 2 || args.max_windows == 0 {
        bail!("--seq must be at least 2 and --max-windows at least 1");
    }
    let (_source, mut model, tokenizer) = load_model(&args.model.path(), args.weights)?;
    let home = s2lc_home();
    let mut domains = Vec::new();
    for (name, rel) in s2lc_model::assets::DOMAINS {
        let path = home.join(rel);
        let text = read_text_file(&path)
            .with_context(|| format!("reading domain '{name}' (run scripts/fetch-assets)"))?;
        let tokens = tokenizer
            .encode(&text, false)
            .with_context(|| format!("tokenizing {}", path.display()))?;
        let start = (tokens.len() as f64 * (1.0 - args.heldout)).floor() as usize;
        let windows = ((tokens.len() - start) / args.seq).min(args.max_windows);
        if windows == 0 {
            bail!(
                "{}: {} held-out tokens, fewer than one window of {}",
                path.display(),
                tokens.len() - start,
                args.seq
            );
        }
        let heldout = tokens[start..start + windows * args.seq].to_vec();
        domains.push(Domain {
            name,
            path,
            start,
            heldout,
        });
    }
    let dirs = if args.adapters.is_empty() {
        find_adapters(&home.join("adapters"))?
    } else {
        args.adapters.clone()
    };
    if dirs.is_empty() {
        bail!("no adapters to measure (train them with scripts/reference/train_adapter_set.sh)");
    }
    let mut entries = Vec::new();
    for dir in dirs {
        let adapter = LoraAdapter::load(&dir)
            .with_context(|| format!("reading the adapter {}", dir.display()))?;
        let own = own_domain(&dir, &domains);
        entries.push(Entry { dir, adapter, own });
    }

    let bar = progress::bar(entries.len() as u64 + 1, "scoring base and adapters");
    let base_ppl = score(&model, &domains, args.seq)?;
    bar.inc(1);
    let mut rows = Vec::new();
    for e in &entries {
        model
            .attach_adapter(&e.adapter)
            .with_context(|| format!("attaching {}", e.dir.display()))?;
        let ppl = score(&model, &domains, args.seq);
        model.detach_adapters();
        rows.push(ppl?);
        bar.inc(1);
    }
    bar.finish_and_clear();

    let name = |e: &Entry| {
        e.dir.file_name().map_or_else(
            || e.dir.display().to_string(),
            |n| n.to_string_lossy().into(),
        )
    };
    let scored: Vec<usize> = domains.iter().map(|d| d.heldout.len()).collect();
    println!(
        "held-out perplexity ({} weights; last {:.0} % of each text, up to {} windows of {}; * = the adapter's own domain)",
        args.weights.name(),
        args.heldout * 100.0,
        args.max_windows,
        args.seq
    );
    print!("{:<18} {:>5} {:>9}", "adapter", "rank", "params");
    for d in &domains {
        print!(" {:>11}", d.name);
    }
    println!();
    print!("{:<18} {:>5} {:>9}", "(base)", "-", "-");
    for p in &base_ppl {
        print!(" {p:>11.3}");
    }
    println!();
    let mut failures = Vec::new();
    for (e, ppl) in entries.iter().zip(&rows) {
        print!(
            "{:<18} {:>5} {:>9}",
            name(e),
            e.adapter.rank,
            e.adapter.n_params()
        );
        for (i, (p, b)) in ppl.iter().zip(&base_ppl).enumerate() {
            let mark = if e.own == Some(i) { "*" } else { " " };
            print!(" {:>10}{mark}", format!("{:+.1}%", (p / b - 1.0) * 100.0));
        }
        println!();
        if let Some(i) = e.own {
            if ppl[i] >= base_ppl[i] {
                failures.push(format!(
                    "{} does not beat the base on its own domain {} ({:.3} vs {:.3})",
                    name(e),
                    domains[i].name,
                    ppl[i],
                    base_ppl[i]
                ));
            }
        }
    }
    println!(
        "tokens scored per domain: {}",
        domains
            .iter()
            .zip(&scored)
            .map(|(d, n)| format!("{} {}", d.name, n - n / args.seq))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for f in &failures {
        eprintln!("warning: {f}");
    }

    let timing = if args.decode_tokens > 0 {
        time_adapters(&mut model, &entries, &domains[0].heldout, args)?
    } else {
        Vec::new()
    };
    if !timing.is_empty() {
        let (base_prefill, base_decode) = (timing[0].1, timing[0].2);
        println!(
            "\nbatch-1 speed, {} weights (prefill {} tokens, decode {} after 64; best of {}):",
            args.weights.name(),
            args.seq,
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

    if let Some(path) = &args.json {
        let report = json!({
            "model": args.model.path(),
            "weights": args.weights.name(),
            "heldout": args.heldout,
            "seq": args.seq,
            "domains": domains.iter().zip(&scored).map(|(d, n)| json!({
                "name": d.name,
                "path": d.path,
                "heldout_start_token": d.start,
                "tokens_scored": n - n / args.seq,
            })).collect::<Vec<_>>(),
            "base": base_ppl,
            "adapters": entries.iter().zip(&rows).map(|(e, ppl)| json!({
                "name": name(e),
                "path": e.dir,
                "rank": e.adapter.rank,
                "params": e.adapter.n_params(),
                "own_domain": e.own.map(|i| domains[i].name),
                "perplexity": ppl,
            })).collect::<Vec<_>>(),
            "speed": timing.iter().map(|(label, p, d)| json!({
                "model": label, "prefill_tok_s": p, "decode_tok_s": d,
            })).collect::<Vec<_>>(),
            "failures": failures,
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
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
    let prompt = &text[..args.seq.min(text.len())];
    let mut merged = None;
    if args.weights == WeightStorage::F32 {
        let mut m = model.clone();
        m.attach_adapter(&entries[0].adapter)?;
        m.merge_adapters()?;
        merged = Some(m);
    }
    let label = |e: &Entry, how: &str| {
        let n = e.dir.file_name().map(|n| n.to_string_lossy().into_owned());
        format!("{} {how}", n.unwrap_or_default())
    };
    let mut best: Vec<(String, f64, f64)> = std::iter::once("base".to_string())
        .chain(entries.iter().map(|e| label(e, "unmerged")))
        .chain(merged.iter().map(|_| label(&entries[0], "merged")))
        .map(|l| (l, 0.0, 0.0))
        .collect();
    let mut scratch = ForwardScratch::default();
    let bar = progress::bar((args.runs.max(1) * best.len()) as u64, "timing");
    let keep = |slot: &mut (String, f64, f64), (p, d, _)| {
        slot.1 = f64::max(slot.1, p);
        slot.2 = f64::max(slot.2, d);
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
