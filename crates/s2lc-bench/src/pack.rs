//! `s2lc bench pack`: S2LC packing of the real adapter set and the expert set, in one process —
//! bytes against f16 PEFT (or f16 dense residuals), error of the unpacked deltas, own-domain
//! perplexity of each unpacked member against the original, and unpack time, for every energy ×
//! bits, with and without the shared basis.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use s2lc_adapters::loss::{loss_weights, Sensitivity, SensitivityFile};
use s2lc_adapters::pack::{pack_separately, PackedSet};
use s2lc_adapters::{pack_with, EnergyScope, InputWhitening, Member, PackParams};
use s2lc_model::experts::{ExpertSet, FfnWeights};
use s2lc_model::llama::LlamaModel;
use s2lc_model::lora::LoraAdapter;
use s2lc_spectral::QuantBits;

use s2lc_model::heldout::{adapter_domain, default_texts, domain_of_text, Domain};

use crate::adapter_io::{
    calibration, domain_adapters, input_whitening, loss_sensitivities, parse_bits, parse_scope,
    print_sensitivity, read_members,
};
use crate::common::{
    progress_bar, write_json, AdapterSetArgs, BaseModelArgs, ExpertSetArgs, JsonArg,
};
use crate::domains::HeldoutArgs;

/// Options of `s2lc bench pack`.
#[derive(Args)]
pub struct PackBenchArgs {
    #[command(flatten)]
    base: BaseModelArgs,
    #[command(flatten)]
    adapters: AdapterSetArgs,
    /// Skip the LoRA adapters (pack only the expert set).
    #[arg(long, conflicts_with = "adapters")]
    no_adapters: bool,
    #[command(flatten)]
    experts: ExpertSetArgs,
    /// Energies to try (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "0.9,0.95,0.99")]
    energies: Vec<f64>,
    /// Core bits to try (comma-separated: int8, int6, int5, int4, int3, int2).
    #[arg(long, value_delimiter = ',', default_value = "int8,int4")]
    bits: Vec<String>,
    /// What each energy is a share of: `matrix` or `member` (see `s2lc adapters pack --scope`).
    #[arg(long, default_value = "matrix", value_parser = parse_scope)]
    scope: EnergyScope,
    /// Bits of the shared bases (with `--mixed-bases`, their average).
    #[arg(long, default_value = "int8", value_parser = parse_bits)]
    basis_bits: QuantBits,
    /// Mixed-width bases (see `s2lc adapters pack --mixed-bases`).
    #[arg(long)]
    mixed_bases: bool,
    /// Entropy-coded codes (see `s2lc adapters pack --entropy`).
    #[arg(long)]
    entropy: bool,
    /// Average coded bits per basis value (see `s2lc adapters pack --basis-rate`).
    #[arg(long)]
    basis_rate: Option<f64>,
    /// Share of pooled energy the bases keep (see `s2lc adapters pack --basis-energy`)
    /// [default: each energy].
    #[arg(long)]
    basis_energy: Option<f64>,
    /// Values per quantization block (even).
    #[arg(long, default_value_t = 32)]
    block: usize,
    /// Share of each core's energy that dropped blocks may hold.
    #[arg(long, default_value_t = 0.0)]
    drop_energy: f64,
    /// Which packings to measure: over shared bases (`true`), each member alone (`false`), or
    /// both.
    #[arg(long, value_delimiter = ',', default_value = "true,false")]
    shared: Vec<bool>,
    /// Pack activation-aware (see `s2lc adapters pack --calibrate`), calibrated on windows of
    /// the training part of every domain text (never the held-out part that is scored).
    #[arg(long)]
    whiten: bool,
    /// Calibration windows per domain text with `--whiten` (of `--seq` tokens).
    #[arg(long, default_value_t = 16)]
    calib_windows: usize,
    /// Loss-aware packing of the LoRA adapters (see `s2lc adapters pack --loss-weights`): each
    /// adapter's matrices weighed by the KL their removal causes on windows of the training part
    /// of its own domain's text.
    #[arg(long)]
    loss_aware: bool,
    /// Windows per adapter with `--loss-aware`.
    #[arg(long, default_value_t = 4)]
    loss_windows: usize,
    /// Tokens per window with `--loss-aware`.
    #[arg(long, default_value_t = 128)]
    loss_window: usize,
    /// With `--loss-aware`: loss budgets to try (nats of estimated KL per token each adapter's
    /// truncation may drop; comma-separated), each with every energy (which then only sets what
    /// the bases keep) [default: cut by energy].
    #[arg(long, value_delimiter = ',', requires = "loss_aware")]
    loss_budgets: Vec<f64>,
    /// Instead of the grid (for the LoRA adapters): pack each adapter alone at its own energy,
    /// the lowest of `--energies` whose perplexity on validation text (up to `--select-windows`
    /// windows of its own domain's held-out part after the scored windows: never scored, never
    /// trained on) rises by at most this fraction (e.g. 0.01), at the first `--bits` (loss
    /// budgets are not used); then score those packs on the held-out windows.
    #[arg(long)]
    select_delta: Option<f64>,
    /// Most validation windows (of `--seq` tokens) for `--select-delta`.
    #[arg(long, default_value_t = 8)]
    select_windows: usize,
    /// With `--loss-aware`: keep each adapter's measured sensitivities in `DIR/NAME.json` and
    /// reuse them when the windows match (measuring takes minutes per adapter).
    #[arg(long, value_name = "DIR")]
    loss_cache: Option<PathBuf>,
    #[command(flatten)]
    heldout: HeldoutArgs,
    /// Unpack timings per configuration (the median is reported).
    #[arg(long, default_value_t = 9)]
    unpack_runs: usize,
    #[command(flatten)]
    json: JsonArg,
}

/// A member set with what it is measured by.
struct Suite {
    label: &'static str,
    members: Vec<Member>,
    /// Own-domain index per member.
    own: Vec<Option<usize>>,
    /// Perplexity of each original member on its own domain.
    reference: Vec<Option<f64>>,
    /// For expert residuals: the base FFN they are added to (`None`: LoRA adapters).
    expert_base: Option<FfnWeights>,
    /// Activation-aware packing's calibration (`--whiten`).
    whitening: Option<InputWhitening>,
}

/// One packing configuration's results.
struct Outcome {
    energy: f64,
    bits: QuantBits,
    shared: bool,
    f16_bytes: usize,
    packed_bytes: usize,
    max_rel_error: f64,
    ppl_delta: Vec<Option<f64>>,
    /// Median unpack time of one member: (cold, bases resident, from its own pack's files).
    unpack_ms: (f64, f64, f64),
}

/// Perplexity on `domain` with a LoRA adapter attached.
fn lora_ppl(
    model: &mut LlamaModel,
    adapter: &LoraAdapter,
    domain: &Domain,
    h: &HeldoutArgs,
) -> Result<f64> {
    model.attach_adapter(adapter)?;
    let ppl = h.score(model, std::slice::from_ref(domain));
    model.detach_adapters();
    Ok(ppl?[0])
}

/// `base + Σ b·a` for the expert matrices unpacked from a pack.
fn expert_ffn(base: &FfnWeights, set: &PackedSet, name: &str) -> Result<FfnWeights> {
    let unpacked = set.unpack(name)?;
    let mut out = base.clone();
    for (layer, tensors) in &mut out.layers {
        for (m, t) in tensors.iter_mut().enumerate() {
            let key = s2lc_adapters::ModuleKey {
                layer: *layer,
                target: 4 + m,
            };
            let Some(f) = unpacked.get(&key) else {
                continue;
            };
            let delta = s2lc_spectral::row_major(f.to_dense().as_ref());
            for (w, d) in t.data.iter_mut().zip(delta) {
                *w += d;
            }
        }
    }
    Ok(out)
}

/// Runs `s2lc bench pack`.
pub fn run(args: &PackBenchArgs) -> Result<()> {
    let bits: Vec<QuantBits> = args
        .bits
        .iter()
        .map(|b| parse_bits(b).map_err(anyhow::Error::msg))
        .collect::<Result<_>>()?;
    let params_at = |energy: f64, bits: QuantBits, loss_budget: Option<f64>| PackParams {
        energy,
        loss_budget,
        basis_energy: args.basis_energy,
        scope: args.scope,
        bits,
        basis_bits: args.basis_bits,
        mixed_bases: args.mixed_bases,
        block: args.block,
        drop_energy: args.drop_energy,
        entropy: args.entropy,
        basis_rate: args.basis_rate,
        ..PackParams::default()
    };
    for &e in &args.energies {
        for &b in &args.loss_budgets {
            params_at(e, QuantBits::Int8, Some(b)).validate()?;
        }
        params_at(e, QuantBits::Int8, None).validate()?;
    }
    let dirs: Vec<PathBuf> = if args.no_adapters {
        Vec::new()
    } else {
        args.adapters.dirs_or(|| Ok(domain_adapters()))?
    };
    let experts_dir = args.experts.dir();
    if dirs.is_empty() && experts_dir.is_none() {
        bail!("nothing to pack: no adapters (scripts/reference/train_adapter_set.sh) and no expert set");
    }
    let (_source, mut model, tokenizer) = args.base.load()?;
    let h = &args.heldout;
    let domains = h.load(&tokenizer, &default_texts())?;
    let whitening = if args.whiten {
        let texts: Vec<(PathBuf, f64)> = default_texts()
            .into_iter()
            .map(|(_, p)| (p, 1.0 - h.heldout))
            .collect();
        let windows = calibration(&tokenizer, &texts, args.calib_windows, h.seq)?;
        println!(
            "activation-aware: {} calibration windows of {} tokens from the training part of {} texts",
            windows.len(),
            h.seq,
            texts.len()
        );
        Some(input_whitening(&model, &windows)?)
    } else {
        None
    };

    let mut suites = Vec::new();
    let mut sensitivity_json = Vec::new();
    let mut adapters_of_suite: Vec<LoraAdapter> = Vec::new();
    if !dirs.is_empty() {
        let (adapters, members) = read_members(&dirs)?;
        let own: Vec<Option<usize>> = dirs.iter().map(|d| adapter_domain(d, &domains)).collect();
        let mut reference = Vec::new();
        for (a, o) in adapters.iter().zip(&own) {
            reference.push(match o {
                Some(i) => Some(lora_ppl(&mut model, a, &domains[*i], h)?),
                None => None,
            });
        }
        let mut members: Vec<Member> = members
            .iter()
            .map(Member::with_svds)
            .collect::<Result<_, _>>()?;
        if args.loss_aware {
            for ((member, adapter), own) in members.iter_mut().zip(&adapters).zip(&own) {
                let Some(i) = own else {
                    bail!(
                        "--loss-aware needs each adapter's own domain; {} has none",
                        member.name
                    );
                };
                let path = &domains[*i].path;
                let t = Instant::now();
                let sens = cached_sensitivities(args, &model, &tokenizer, adapter, member, path)?;
                member.weights = loss_weights(&sens);
                print_sensitivity(&member.name, &sens, t.elapsed());
                sensitivity_json.push(json!({
                    "member": member.name,
                    "matrices": sens.iter().map(|(k, v)| json!({
                        "module": k.name(), "kl": v.kl, "energy": v.energy,
                        "weight": member.weights[k],
                    })).collect::<Vec<_>>(),
                }));
            }
        }
        adapters_of_suite = adapters;
        suites.push(Suite {
            label: "LoRA adapters",
            members,
            own,
            reference,
            expert_base: None,
            whitening: whitening.clone(),
        });
    }
    if let Some(dir) = &experts_dir {
        let set = ExpertSet::open(dir)
            .with_context(|| format!("opening the expert set {}", dir.display()))?;
        let base = set.base()?;
        let bar = progress_bar(set.experts.len() as u64, "decomposing expert residuals");
        let (mut members, mut own, mut reference) = (Vec::new(), Vec::new(), Vec::new());
        for info in &set.experts {
            let expert = set.expert(&info.name)?;
            let o = info
                .text
                .as_deref()
                .and_then(|t| domain_of_text(t, &domains));
            reference.push(match o {
                Some(i) => {
                    expert.swap_into(&mut model)?;
                    Some(h.score(&model, std::slice::from_ref(&domains[i]))?[0])
                }
                None => None,
            });
            own.push(o);
            members.push(Member::from_residual(&info.name, &expert.minus(&base)?).with_svds()?);
            bar.inc(1);
        }
        bar.finish_and_clear();
        base.swap_into(&mut model)?;
        suites.push(Suite {
            label: "expert residuals",
            members,
            own,
            reference,
            expert_base: Some(base),
            whitening: whitening.clone(),
        });
    }

    let mut report = Vec::new();
    for suite in &suites {
        let names: Vec<&str> = suite.members.iter().map(|m| m.name.as_str()).collect();
        println!(
            "\n{}: {} (own-domain perplexity of the originals: {})",
            suite.label,
            names.join(", "),
            suite
                .reference
                .iter()
                .map(|r| r.map_or("-".into(), |v| format!("{v:.3}")))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "{:>6} {:>5} {:>7} {:>10} {:>10} {:>8} {:>9} {:>14} {:>14} {:>10}",
            "energy",
            "bits",
            "shared",
            "f16 MB",
            "packed MB",
            "ratio",
            "max err",
            "max Δppl",
            "mean Δppl",
            "unpack ms cold / warm / disk"
        );
        let mut rows = Vec::new();
        let budgets: Vec<Option<f64>> = if args.loss_budgets.is_empty() {
            vec![None]
        } else {
            args.loss_budgets.iter().copied().map(Some).collect()
        };
        let grid = args.select_delta.is_none() || suite.expert_base.is_some();
        for (&energy, &budget) in args
            .energies
            .iter()
            .flat_map(|e| budgets.iter().map(move |b| (e, b)))
            .filter(|_| grid)
        {
            for &b in &bits {
                for &shared in &args.shared {
                    let params = params_at(energy, b, budget);
                    let o = measure_config(
                        suite,
                        params,
                        shared,
                        &mut model,
                        &domains,
                        h,
                        args.unpack_runs,
                    )?;
                    let deltas: Vec<f64> = o.ppl_delta.iter().flatten().copied().collect();
                    let max = deltas.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let mean = deltas.iter().sum::<f64>() / deltas.len().max(1) as f64;
                    if let Some(budget) = budget {
                        print!("budget {budget} ");
                    }
                    println!(
                        "{:>6} {:>5} {:>7} {:>10.3} {:>10.3} {:>7.2}x {:>9.4} {:>9.2}% {:>9.2}% {:>7.2} /{:>6.2} /{:>6.2}",
                        o.energy,
                        o.bits.name(),
                        if o.shared { "yes" } else { "no" },
                        o.f16_bytes as f64 / 1e6,
                        o.packed_bytes as f64 / 1e6,
                        o.f16_bytes as f64 / o.packed_bytes as f64,
                        o.max_rel_error,
                        max * 100.0,
                        mean * 100.0,
                        o.unpack_ms.0,
                        o.unpack_ms.1,
                        o.unpack_ms.2
                    );
                    rows.push(json!({
                        "energy": o.energy, "loss_budget": budget, "bits": o.bits.name(), "shared": o.shared,
                        "f16_bytes": o.f16_bytes, "packed_bytes": o.packed_bytes,
                        "max_rel_error": o.max_rel_error,
                        "ppl_delta": o.ppl_delta,
                        "unpack_ms_p50_cold": o.unpack_ms.0, "unpack_ms_p50_warm": o.unpack_ms.1,
                        "unpack_ms_p50_from_disk": o.unpack_ms.2,
                    }));
                }
            }
        }
        if let (Some(target), None) = (args.select_delta, &suite.expert_base) {
            let params = params_at(1.0, bits[0], None);
            let sel = select_energies(
                suite,
                &adapters_of_suite,
                params,
                target,
                args,
                &tokenizer,
                &mut model,
                &domains,
            )?;
            rows.push(sel);
        }
        report.push(json!({
            "suite": suite.label,
            "members": names,
            "own_domain": suite.own.iter().map(|o| o.map(|i| &domains[i].name)).collect::<Vec<_>>(),
            "reference_ppl": suite.reference,
            "configs": rows,
        }));
    }
    if let Some(path) = &args.json.path {
        let out = json!({
            "model": args.base.path(),
            "weights": args.base.weights.name(),
            "heldout": h.heldout, "seq": h.seq, "max_windows": h.max_windows,
            "scope": args.scope.name(), "basis_bits": args.basis_bits.name(),
            "mixed_bases": args.mixed_bases, "block": args.block, "entropy": args.entropy, "basis_rate": args.basis_rate,
            "basis_energy": args.basis_energy,
            "drop_energy": args.drop_energy,
            "whitened": args.whiten, "calib_windows_per_text": args.whiten.then_some(args.calib_windows),
            "loss_aware": args.loss_aware.then_some(json!({
                "windows": args.loss_windows, "window": args.loss_window,
                "members": sensitivity_json,
            })),
            "suites": report,
        });
        write_json(path, &out)?;
    }
    Ok(())
}

/// An adapter's sensitivities on the training part of `text`: from `--loss-cache` when a file
/// there was measured with the same windows on the same text, else measured (and cached).
fn cached_sensitivities(
    args: &PackBenchArgs,
    model: &LlamaModel,
    tokenizer: &s2lc_model::tokenizer::Tokenizer,
    adapter: &LoraAdapter,
    member: &Member,
    text: &std::path::Path,
) -> Result<std::collections::BTreeMap<s2lc_adapters::ModuleKey, Sensitivity>> {
    let text_name = text.display().to_string();
    let cached = args
        .loss_cache
        .as_ref()
        .map(|dir| dir.join(format!("{}.json", member.name)));
    if let Some(f) = cached.as_ref().filter(|f| f.exists()) {
        let file = SensitivityFile::load(f)?;
        if file.windows == args.loss_windows
            && file.window == args.loss_window
            && file.text == text_name
        {
            return Ok(file.sensitivities()?);
        }
    }
    let part = [(text.to_path_buf(), 1.0 - args.heldout.heldout)];
    let windows = calibration(tokenizer, &part, args.loss_windows, args.loss_window)?;
    let sens = loss_sensitivities(model, adapter, windows, &member.name)?;
    if let Some(f) = &cached {
        if let Some(dir) = f.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        SensitivityFile::new(
            &member.name,
            &text_name,
            args.loss_windows,
            args.loss_window,
            &sens,
        )
        .save(f)?;
    }
    Ok(sens)
}

/// `--select-delta`: packs each adapter of `suite` alone at the lowest energy of `--energies`
/// whose perplexity on validation text (its domain's held-out tokens after the scored windows)
/// rises by at most `target`, then scores the chosen packs on the held-out windows; prints the
/// row and returns it as JSON.
#[allow(clippy::too_many_arguments)]
fn select_energies(
    suite: &Suite,
    adapters: &[LoraAdapter],
    params: PackParams,
    target: f64,
    args: &PackBenchArgs,
    tokenizer: &s2lc_model::tokenizer::Tokenizer,
    model: &mut LlamaModel,
    domains: &[Domain],
) -> Result<serde_json::Value> {
    let h = &args.heldout;
    let mut energies = args.energies.clone();
    energies.sort_by(f64::total_cmp);
    let (mut packed, mut f16, mut chosen, mut deltas, mut validation_deltas) =
        (0usize, 0usize, Vec::new(), Vec::new(), Vec::new());
    let mut validation_windows = Vec::new();
    for ((member, adapter), (own, reference)) in suite
        .members
        .iter()
        .zip(adapters)
        .zip(suite.own.iter().zip(&suite.reference))
    {
        let (Some(i), Some(reference)) = (own, reference) else {
            bail!(
                "--select-delta needs each adapter's own domain; {} has none",
                member.name
            );
        };
        // Validation text: the held-out part's tokens after the scored windows (the adapter
        // never saw them, and they are never scored). The training part would not do: there
        // the adapter's fitted directions all matter, so every cut looks costlier than it is.
        let d = &domains[*i];
        let text = s2lc_model::tokenizer::read_text_file(&d.path)
            .with_context(|| format!("reading {}", d.path.display()))?;
        let tokens = tokenizer
            .encode(&text, false)
            .with_context(|| format!("tokenizing {}", d.path.display()))?;
        let from = d.start + d.tokens.len();
        let n = ((tokens.len() - from) / h.seq).min(args.select_windows);
        if n == 0 {
            bail!(
                "{}: no held-out tokens left after the scored windows to select on (lower --max-windows)",
                d.path.display()
            );
        }
        let validation = Domain {
            name: format!("{} (validation)", d.name),
            path: d.path.clone(),
            start: from,
            tokens: tokens[from..from + n * h.seq].to_vec(),
        };
        validation_windows.push(n);
        let base = lora_ppl(model, adapter, &validation, h)?;
        let mut pick = None;
        for &energy in &energies {
            let set = pack_with(
                std::slice::from_ref(member),
                PackParams { energy, ..params },
                suite.whitening.as_ref(),
            )?;
            let delta =
                lora_ppl(model, &set.unpack_lora(&member.name)?, &validation, h)? / base - 1.0;
            pick = Some((energy, set, delta));
            if delta <= target {
                break;
            }
        }
        let (energy, set, validation_delta) = pick.context("no energies to select from")?;
        let held =
            lora_ppl(model, &set.unpack_lora(&member.name)?, &domains[*i], h)? / reference - 1.0;
        packed += set.bytes();
        f16 += f16_bytes(member);
        chosen.push(energy);
        deltas.push(Some(held));
        validation_deltas.push(validation_delta);
    }
    let max = deltas
        .iter()
        .flatten()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    println!(
        "selected per adapter (validation Δppl ≤ {:.2} %): energies {:?}, {:.2}x, held-out Δppl {} (max {:+.2} %)",
        target * 100.0,
        chosen,
        f16 as f64 / packed as f64,
        deltas
            .iter()
            .flatten()
            .map(|d| format!("{:+.2} %", d * 100.0))
            .collect::<Vec<_>>()
            .join(", "),
        max * 100.0
    );
    Ok(json!({
        "selected": true, "select_delta": target, "validation_windows": validation_windows,
        "energies": chosen, "validation_ppl_delta": validation_deltas,
        "bits": params.bits.name(), "shared": false,
        "f16_bytes": f16, "packed_bytes": packed,
        "ppl_delta": deltas,
    }))
}

/// Bytes of a member as f16 PEFT factors (or an f16 dense residual).
fn f16_bytes(member: &Member) -> usize {
    2 * member
        .deltas
        .values()
        .map(|d| d.stored_values())
        .sum::<usize>()
}

/// Packs a suite with `params` (over shared bases, or each member alone), unpacks every member,
/// and scores it on its own domain against the original.
fn measure_config(
    suite: &Suite,
    params: PackParams,
    shared: bool,
    model: &mut LlamaModel,
    domains: &[Domain],
    h: &HeldoutArgs,
    unpack_runs: usize,
) -> Result<Outcome> {
    let whitening = suite.whitening.as_ref();
    let sets: Vec<PackedSet> = if shared {
        vec![pack_with(&suite.members, params, whitening)?]
    } else {
        pack_separately(&suite.members, params, whitening)?
    };
    let set_of = |name: &str| {
        sets.iter()
            .find(|s| s.members.iter().any(|m| m.name == name))
            .expect("every member is packed")
    };
    let mut max_rel_error: f64 = 0.0;
    let mut ppl_delta = Vec::new();
    for ((m, own), reference) in suite.members.iter().zip(&suite.own).zip(&suite.reference) {
        let set = set_of(&m.name);
        let rep = set.report(std::slice::from_ref(m))?;
        max_rel_error = max_rel_error.max(rep[0].rel_error);
        let (Some(i), Some(reference)) = (own, reference) else {
            ppl_delta.push(None);
            continue;
        };
        let ppl = match &suite.expert_base {
            None => lora_ppl(model, &set.unpack_lora(&m.name)?, &domains[*i], h)?,
            Some(base) => {
                expert_ffn(base, set, &m.name)?.swap_into(model)?;
                let p = h.score(model, std::slice::from_ref(&domains[*i]))?[0];
                base.swap_into(model)?;
                p
            }
        };
        ppl_delta.push(Some(ppl / reference - 1.0));
    }
    // Median time to unpack the first member: cold (bases dequantized inside), warm (bases
    // resident, as a server keeps them), and from disk (its own pack's files read, decoded and
    // unpacked, as a server pulling it from the store does).
    let first = &suite.members[0].name;
    let set = set_of(first);
    let median = |f: &dyn Fn() -> Result<(), s2lc_adapters::PackError>| -> Result<f64> {
        let mut times = Vec::new();
        for _ in 0..unpack_runs.max(1) {
            let t = Instant::now();
            f()?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    };
    let cold = median(&|| set.unpack(first).map(drop))?;
    let bases = set.decode_bases();
    let warm = median(&|| set.unpack_with(&bases, first).map(drop))?;
    let dir = std::env::temp_dir().join(format!("s2lc-bench-unpack-{}", std::process::id()));
    s2lc_adapters::format::save_member(set, first, &dir)?;
    let disk = median(&|| s2lc_adapters::format::load(&dir)?.unpack(first).map(drop));
    std::fs::remove_dir_all(&dir).ok();
    let disk = disk?;
    Ok(Outcome {
        energy: params.energy,
        bits: params.bits,
        shared,
        f16_bytes: suite.members.iter().map(f16_bytes).sum(),
        packed_bytes: sets.iter().map(PackedSet::bytes).sum(),
        max_rel_error,
        ppl_delta,
        unpack_ms: (cold, warm, disk),
    })
}
