//! `s2lc adapters pack | add | sensitivity | unpack | morph`: pack PEFT adapters (or an expert
//! set's residuals) over shared spectral bases, add to a pack, measure loss weights, and rebuild
//! or blend members of a pack as PEFT adapters.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use s2lc_adapters::loss::{loss_weights, SensitivityFile};
use s2lc_adapters::pack::{MemberReport, PackedSet};
use s2lc_adapters::{format, pack_with, EnergyScope, InputWhitening, Member, PackParams};
use s2lc_model::experts::ExpertSet;
use s2lc_model::source::WeightStorage;
use s2lc_spectral::QuantBits;

use crate::{load_model, ModelArg};
use s2lc_bench::adapter_io::{
    calibration, dir_name, input_whitening, load_adapter, loss_sensitivities, parse_bits,
    parse_scope, print_sensitivity, read_members,
};

/// How adapters are packed.
#[derive(Args, Clone)]
pub struct PackOptions {
    /// Share of energy kept by each spectral step (delta truncation, shared bases, projection).
    #[arg(long, default_value_t = 0.95)]
    pub energy: f64,
    /// Share of the truncated adapters' pooled energy the shared bases of each matrix keep
    /// [default: `--energy`]. 1 keeps every direction the truncation kept (the bases of a single
    /// adapter then truncate nothing a second time).
    #[arg(long)]
    pub basis_energy: Option<f64>,
    /// With `--loss-weights` and `--scope member`: cut each adapter where the estimated KL of
    /// its dropped directions reaches this many nats per token, instead of at an energy share
    /// (`--energy` then only sets what the bases keep).
    #[arg(long)]
    pub loss_budget: Option<f64>,
    /// What the truncation's energy is a share of: each matrix (`matrix`), or the whole adapter
    /// (`member`: its singular values ranked together, so small deltas lose more).
    #[arg(long, default_value = "matrix", value_parser = parse_scope)]
    pub scope: EnergyScope,
    /// Bits of the cores: int8, int6, int5, int4, int3 or int2.
    #[arg(long, default_value = "int8", value_parser = parse_bits)]
    pub bits: QuantBits,
    /// Bits of the shared bases: int8, int6, int5, int4, int3 or int2 (with `--mixed-bases`,
    /// their average).
    #[arg(long, default_value = "int8", value_parser = parse_bits)]
    pub basis_bits: QuantBits,
    /// Give each basis vector its own width (int2 … int8) by the adapters' energy along it,
    /// averaging at most `--basis-bits`: the strong directions get more bits, the weak fewer.
    #[arg(long)]
    pub mixed_bases: bool,
    /// Values per quantization block (even).
    #[arg(long, default_value_t = 32)]
    pub block: usize,
    /// Share of each core's energy that dropped blocks may hold.
    #[arg(long, default_value_t = 0.0)]
    pub drop_energy: f64,
    /// Store the codes entropy-coded (rANS, one frequency table per width per file; lossless,
    /// format `s2lc-pack/3`) instead of as fixed-width bytes.
    #[arg(long)]
    pub entropy: bool,
    /// With `--entropy --mixed-bases`: the average coded bits per basis value (e.g. 2.4),
    /// instead of `--basis-bits`.
    #[arg(long)]
    pub basis_rate: Option<f64>,
}

impl PackOptions {
    /// The packing parameters, checked.
    pub fn params(&self) -> Result<PackParams> {
        let p = PackParams {
            energy: self.energy,
            basis_energy: self.basis_energy,
            loss_budget: self.loss_budget,
            scope: self.scope,
            bits: self.bits,
            basis_bits: self.basis_bits,
            mixed_bases: self.mixed_bases,
            block: self.block,
            drop_energy: self.drop_energy,
            whitened: false,
            entropy: self.entropy,
            basis_rate: self.basis_rate,
        };
        p.validate()?;
        Ok(p)
    }
}

/// Activation-aware packing: calibration text run through the base model.
#[derive(Args, Clone)]
pub struct CalibrationArgs {
    /// Pack activation-aware: measure each delta by how much it changes its matrix's outputs on
    /// windows of this text run through the base model (repeat the flag for several texts).
    /// Adding to such a pack needs the same calibration.
    #[arg(long = "calibrate")]
    pub texts: Vec<PathBuf>,
    /// Calibration windows drawn from each text.
    #[arg(long, default_value_t = 16)]
    pub calib_windows: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 256)]
    pub calib_window: usize,
    #[command(flatten)]
    pub model: ModelArg,
}

impl CalibrationArgs {
    /// The whitening of the base model's block inputs over the texts, `None` without texts.
    pub fn whitening(&self) -> Result<Option<InputWhitening>> {
        if self.texts.is_empty() {
            return Ok(None);
        }
        let (_source, model, tokenizer) = load_model(&self.model.path(), WeightStorage::Native)?;
        let texts: Vec<(PathBuf, f64)> = self.texts.iter().map(|p| (p.clone(), 1.0)).collect();
        let windows = calibration(&tokenizer, &texts, self.calib_windows, self.calib_window)?;
        input_whitening(&model, &windows).map(Some)
    }
}

/// `s2lc adapters pack`.
#[derive(Args)]
pub struct PackArgs {
    /// PEFT adapter directories (each member is named after its directory).
    #[arg(required_unless_present = "experts")]
    dirs: Vec<PathBuf>,
    /// Pack the MoE residuals (`expert − base` FFN) of this expert set instead of adapters; each
    /// member is named after its expert.
    #[arg(long, conflicts_with = "dirs")]
    experts: Option<PathBuf>,
    /// With `--experts`: only this expert (repeat the flag) [default: every expert of the set].
    #[arg(long = "expert", requires = "experts")]
    expert_names: Vec<String>,
    /// Output directory of the pack (must not hold a pack yet).
    #[arg(short, long)]
    out: PathBuf,
    #[command(flatten)]
    options: PackOptions,
    #[command(flatten)]
    calibration: CalibrationArgs,
    /// Loss-aware packing: an adapter's sensitivities from `s2lc adapters sensitivity` (repeat
    /// the flag, one file per adapter, matched by name). With `--scope member`, directions are
    /// then kept by their estimated effect on the loss instead of their energy.
    #[arg(long = "loss-weights", value_name = "FILE")]
    loss_weights: Vec<PathBuf>,
}

/// `s2lc adapters add`.
#[derive(Args)]
pub struct AddArgs {
    /// A pack written by `s2lc adapters pack`.
    pack: PathBuf,
    /// The PEFT adapter directory to add.
    dir: PathBuf,
    /// Member name [default: the directory's name].
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    calibration: CalibrationArgs,
    /// The adapter's sensitivities from `s2lc adapters sensitivity` (see `pack --loss-weights`).
    #[arg(long = "loss-weights", value_name = "FILE")]
    loss_weights: Option<PathBuf>,
}

/// `s2lc adapters sensitivity`.
#[derive(Args)]
pub struct SensitivityArgs {
    /// The PEFT adapter directory.
    dir: PathBuf,
    /// Text to measure on: the adapter's own domain (its training text, not held-out text).
    #[arg(long)]
    text: PathBuf,
    /// Windows drawn from the text (seeded).
    #[arg(long, default_value_t = 4)]
    windows: usize,
    /// Tokens per window.
    #[arg(long, default_value_t = 128)]
    window: usize,
    /// Where to write the sensitivities (JSON).
    #[arg(short, long)]
    out: PathBuf,
    #[command(flatten)]
    model: ModelArg,
}

/// `s2lc adapters unpack`.
#[derive(Args)]
pub struct UnpackArgs {
    /// A pack written by `s2lc adapters pack`.
    pack: PathBuf,
    /// The member to rebuild.
    name: String,
    /// Output directory (PEFT layout).
    #[arg(short, long)]
    out: PathBuf,
}

/// `s2lc adapters morph`.
#[derive(Args)]
pub struct MorphArgs {
    /// A pack written by `s2lc adapters pack`.
    pack: PathBuf,
    /// Members and weights, `NAME=WEIGHT` (e.g. python-r8=0.7 linux-r8=0.3).
    #[arg(required = true, value_parser = parse_weight)]
    weights: Vec<(String, f32)>,
    /// Output directory (PEFT layout).
    #[arg(short, long)]
    out: PathBuf,
}

fn parse_weight(s: &str) -> Result<(String, f32), String> {
    let (name, w) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not NAME=WEIGHT"))?;
    let w: f32 = w
        .parse()
        .map_err(|_| format!("weight '{w}' of '{name}' is not a number"))?;
    Ok((name.to_string(), w))
}

/// The residuals `expert − base` of an expert set's experts (`names`, or all) as pack members.
pub fn expert_members(dir: &Path, names: &[String]) -> Result<Vec<Member>> {
    let set = ExpertSet::open(dir)
        .with_context(|| format!("opening the expert set {}", dir.display()))?;
    let base = set.base().context("reading the base FFN")?;
    let names: Vec<&str> = if names.is_empty() {
        set.experts.iter().map(|e| e.name.as_str()).collect()
    } else {
        names.iter().map(String::as_str).collect()
    };
    names
        .iter()
        .map(|name| {
            let expert = set
                .expert(name)
                .with_context(|| format!("reading expert '{name}'"))?;
            let residual = expert
                .minus(&base)
                .with_context(|| format!("residual of expert '{name}'"))?;
            Ok(Member::from_residual(name, &residual))
        })
        .collect()
}

/// Prints what packing did: per member, f16 PEFT bytes vs its packed bytes (cores plus an even
/// share of the bases), the ratio, and the relative error of the unpacked deltas.
fn print_pack_report(set: &PackedSet, reports: &[MemberReport]) {
    let share = set.basis_bytes() as f64 / set.members.len().max(1) as f64;
    println!(
        "shared bases: {:.3} MB over {} matrices ({} members)",
        set.basis_bytes() as f64 / 1e6,
        set.modules.len(),
        set.members.len()
    );
    println!(
        "{:<20} {:>11} {:>11} {:>11} {:>8} {:>10} {:>9}",
        "member", "f16 MB", "core MB", "+bases MB", "ratio", "rel.error", "residuals"
    );
    for r in reports {
        let f16 = 2.0 * r.input_values as f64;
        let packed = r.core_bytes as f64 + share;
        println!(
            "{:<20} {:>11.3} {:>11.3} {:>11.3} {:>7.2}x {:>10.4} {:>9}",
            r.name,
            f16 / 1e6,
            r.core_bytes as f64 / 1e6,
            packed / 1e6,
            f16 / packed,
            r.rel_error,
            r.residuals
        );
    }
    let f16: f64 = reports.iter().map(|r| 2.0 * r.input_values as f64).sum();
    println!(
        "total: {:.3} MB as f16 (PEFT factors or dense residuals) -> {:.3} MB packed ({:.2}x)",
        f16 / 1e6,
        set.bytes() as f64 / 1e6,
        f16 / set.bytes() as f64
    );
}

pub(super) fn pack_cmd(args: &PackArgs) -> Result<()> {
    if args.out.join("pack.json").exists() {
        bail!(
            "{} already holds a pack (add to it with `s2lc adapters add`, or choose another directory)",
            args.out.display()
        );
    }
    let params = args.options.params()?;
    let mut members = match &args.experts {
        Some(dir) => expert_members(dir, &args.expert_names)?,
        None => read_members(&args.dirs)?.1,
    };
    apply_loss_weights(&mut members, &args.loss_weights)?;
    let whitening = args.calibration.whitening()?;
    let set = pack_with(&members, params, whitening.as_ref()).context("packing")?;
    let reports = set.report(&members).context("measuring the pack")?;
    format::save(&set, &args.out).with_context(|| format!("writing {}", args.out.display()))?;
    print_pack_report(&set, &reports);
    println!("written: {}", args.out.display());
    Ok(())
}

pub(super) fn add_cmd(args: &AddArgs) -> Result<()> {
    let mut set =
        format::load(&args.pack).with_context(|| format!("reading {}", args.pack.display()))?;
    let adapter = load_adapter(&args.dir)?;
    let name = args.name.clone().unwrap_or_else(|| dir_name(&args.dir));
    let mut member = Member::from_lora(&name, &adapter);
    apply_loss_weights(
        std::slice::from_mut(&mut member),
        args.loss_weights.as_slice(),
    )?;
    set.add_with(&member, args.calibration.whitening()?.as_ref())
        .with_context(|| format!("adding {} to {}", args.dir.display(), args.pack.display()))?;
    let reports = set.report(std::slice::from_ref(&member))?;
    format::save(&set, &args.pack).with_context(|| format!("writing {}", args.pack.display()))?;
    print_pack_report(&set, &reports);
    Ok(())
}

/// Sets each member's loss weights from the sensitivity file that names it; a file naming no
/// member is an error (a typo would otherwise pack silently without weights).
fn apply_loss_weights(members: &mut [Member], files: &[PathBuf]) -> Result<()> {
    for path in files {
        let file = SensitivityFile::load(path)?;
        let member = members
            .iter_mut()
            .find(|m| m.name == file.adapter)
            .with_context(|| {
                format!(
                    "{}: sensitivities of '{}', which is not being packed",
                    path.display(),
                    file.adapter
                )
            })?;
        member.weights = loss_weights(&file.sensitivities()?);
    }
    Ok(())
}

pub(super) fn sensitivity_cmd(args: &SensitivityArgs) -> Result<()> {
    let adapter = load_adapter(&args.dir)?;
    let name = dir_name(&args.dir);
    let (_source, model, tokenizer) = load_model(&args.model.path(), WeightStorage::Native)?;
    let windows = calibration(
        &tokenizer,
        &[(args.text.clone(), 1.0)],
        args.windows,
        args.window,
    )?;
    let t = std::time::Instant::now();
    let sens = loss_sensitivities(&model, &adapter, windows, &name)?;
    print_sensitivity(&name, &sens, t.elapsed());
    SensitivityFile::new(
        &name,
        &args.text.display().to_string(),
        args.windows,
        args.window,
        &sens,
    )
    .save(&args.out)
    .with_context(|| format!("writing {}", args.out.display()))?;
    println!("written: {}", args.out.display());
    Ok(())
}

pub(super) fn unpack_cmd(args: &UnpackArgs) -> Result<()> {
    let set =
        format::load(&args.pack).with_context(|| format!("reading {}", args.pack.display()))?;
    let t = std::time::Instant::now();
    let adapter = set
        .unpack_lora(&args.name)
        .with_context(|| format!("unpacking '{}'", args.name))?;
    let took = t.elapsed();
    adapter
        .save(&args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "{}: {} deltas, rank up to {}, {} parameters, unpacked in {:.2} ms; written: {}",
        args.name,
        adapter.n_deltas(),
        adapter.rank,
        adapter.n_params(),
        took.as_secs_f64() * 1e3,
        args.out.display()
    );
    Ok(())
}

pub(super) fn morph_cmd(args: &MorphArgs) -> Result<()> {
    let set =
        format::load(&args.pack).with_context(|| format!("reading {}", args.pack.display()))?;
    let weights: Vec<(&str, f32)> = args.weights.iter().map(|(n, w)| (n.as_str(), *w)).collect();
    let name = args
        .out
        .file_name()
        .map_or("morph".into(), |n| n.to_string_lossy().into_owned());
    let t = std::time::Instant::now();
    let adapter = set.morph_lora(&name, &weights).context("morphing")?;
    let took = t.elapsed();
    adapter
        .save(&args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    let members: usize = weights
        .iter()
        .map(|(n, _)| set.unpack_lora(n).map(|a| a.n_params()))
        .sum::<Result<usize, _>>()?;
    println!(
        "morph of {}: {} deltas, rank up to {}, {} parameters ({:.2}x fewer than the {} members unpacked), built in {:.1} ms; written: {}",
        weights.iter().map(|(n, w)| format!("{n}={w}")).collect::<Vec<_>>().join(" "),
        adapter.n_deltas(),
        adapter.rank,
        adapter.n_params(),
        members as f64 / adapter.n_params().max(1) as f64,
        weights.len(),
        took.as_secs_f64() * 1e3,
        args.out.display()
    );
    Ok(())
}
