//! `s2lc adapters info | truncate | pack | add | sensitivity | unpack | morph`: inspect PEFT LoRA
//! adapters and re-rank them by their spectra here; packing many of them over shared spectral
//! bases (S2LC packing) and what works on packs is in [`pack`].

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use s2lc_model::lora::{DeltaTruncation, LoraAdapter, TARGETS};

use s2lc_bench::adapter_io::load_adapter;

mod pack;

pub use pack::{AddArgs, MorphArgs, PackArgs, SensitivityArgs, UnpackArgs};

/// What to do with an adapter.
#[derive(Subcommand)]
pub enum AdaptersCommand {
    /// Rank, scale, targets, parameters and the spectrum of every delta (`s·B·A`) of an adapter.
    Info {
        /// A PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
        dir: PathBuf,
    },
    /// Re-rank every delta by its singular values and write a PEFT adapter (per-module ranks in
    /// `rank_pattern`).
    Truncate(TruncateArgs),
    /// Pack PEFT adapters over shared spectral bases: energy-truncated, block-quantized cores.
    Pack(PackArgs),
    /// Add a PEFT adapter to an existing pack, projected onto its bases (which stay unchanged).
    Add(AddArgs),
    /// Loss weights of an adapter's matrices for `pack --loss-weights`: the KL divergence its
    /// outputs move by when each matrix's delta is removed, on windows of a text (one forward
    /// pass per window and matrix).
    Sensitivity(SensitivityArgs),
    /// Rebuild one adapter of a pack as a PEFT adapter directory.
    Unpack(UnpackArgs),
    /// Expert Morphing: blend members of a pack in its shared basis (`NAME=WEIGHT ...`) into one
    /// PEFT adapter.
    Morph(MorphArgs),
}

/// `s2lc adapters truncate`.
#[derive(Args)]
pub struct TruncateArgs {
    /// The PEFT adapter directory to read.
    dir: PathBuf,
    /// Output directory (PEFT layout); must differ from the input.
    #[arg(short, long)]
    out: PathBuf,
    /// Keep the smallest rank holding this fraction of each delta's energy `‖s·B·A‖²_F`.
    #[arg(long)]
    energy: Option<f64>,
    /// Never keep more than this rank.
    #[arg(long)]
    rank: Option<usize>,
}

/// Runs an `adapter` subcommand.
pub fn run(cmd: &AdaptersCommand) -> Result<()> {
    match cmd {
        AdaptersCommand::Info { dir } => info(dir),
        AdaptersCommand::Truncate(args) => truncate(args),
        AdaptersCommand::Pack(args) => pack::pack_cmd(args),
        AdaptersCommand::Add(args) => pack::add_cmd(args),
        AdaptersCommand::Sensitivity(args) => pack::sensitivity_cmd(args),
        AdaptersCommand::Unpack(args) => pack::unpack_cmd(args),
        AdaptersCommand::Morph(args) => pack::morph_cmd(args),
    }
}

/// Energy thresholds of the `info` table.
const INFO_ENERGIES: [f64; 3] = [0.9, 0.95, 0.99];

fn info(dir: &Path) -> Result<()> {
    let adapter = load_adapter(dir)?;
    println!("adapter:     {}", dir.display());
    println!(
        "base model:  {}",
        adapter.base_model.as_deref().unwrap_or("(not recorded)")
    );
    println!(
        "rank {} · lora_alpha {} · scale {} · {} deltas · {} parameters ({:.2} MB f32, {:.2} MB f16)",
        adapter.rank,
        adapter.alpha,
        adapter.scale,
        adapter.n_deltas(),
        adapter.n_params(),
        adapter.n_params() as f64 * 4e-6,
        adapter.n_params() as f64 * 2e-6
    );
    // Per target: deltas, mean rank, and the mean rank that keeps each energy of `s·B·A`.
    println!(
        "\n{:<10} {:>6} {:>6} {}",
        "target",
        "deltas",
        "rank",
        INFO_ENERGIES
            .iter()
            .map(|e| format!("{:>9}", format!("r@{:.0}%", e * 100.0)))
            .collect::<String>()
    );
    let mut rows: Vec<(usize, usize, [usize; 3])> = vec![(0, 0, [0; 3]); TARGETS.len()];
    for (layer, target, delta) in adapter.deltas() {
        let svd = delta
            .svd()
            .with_context(|| format!("SVD of layer {layer} {}", TARGETS[target]))?;
        let row = &mut rows[target];
        row.0 += 1;
        row.1 += delta.rank();
        for (sum, e) in row.2.iter_mut().zip(INFO_ENERGIES) {
            *sum += s2lc_spectral::rank_for_energy(&svd.s, e);
        }
    }
    for (target, (n, rank, at)) in rows.iter().enumerate() {
        if *n == 0 {
            continue;
        }
        let mean = |v: usize| v as f64 / *n as f64;
        println!(
            "{:<10} {:>6} {:>6.1} {}",
            TARGETS[target],
            n,
            mean(*rank),
            at.iter()
                .map(|v| format!("{:>9.1}", mean(*v)))
                .collect::<String>()
        );
    }
    Ok(())
}

fn truncate(args: &TruncateArgs) -> Result<()> {
    if args.energy.is_none() && args.rank.is_none() {
        bail!("give --energy, --rank or both");
    }
    if let Some(e) = args.energy {
        if !(e > 0.0 && e <= 1.0) {
            bail!("--energy {e} is outside (0, 1]");
        }
    }
    if args.rank == Some(0) {
        bail!("--rank must be at least 1");
    }
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same(&args.dir, &args.out) {
        bail!(
            "--out {} is the input adapter; write to another directory",
            args.out.display()
        );
    }
    let adapter = load_adapter(&args.dir)?;
    let (cut, report) = adapter
        .truncate(args.energy, args.rank)
        .context("re-ranking the deltas")?;
    cut.save(&args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    print_truncation(&adapter, &cut, &report);
    println!("written: {}", args.out.display());
    Ok(())
}

fn print_truncation(before: &LoraAdapter, after: &LoraAdapter, report: &[DeltaTruncation]) {
    let total: f64 = report.iter().map(|t| t.sq_norm).sum();
    let kept: f64 = report.iter().map(|t| t.energy_kept * t.sq_norm).sum();
    let worst = report
        .iter()
        .map(|t| t.energy_kept)
        .fold(f64::INFINITY, f64::min);
    let mut hist = std::collections::BTreeMap::<usize, usize>::new();
    for t in report {
        *hist.entry(t.rank_after).or_default() += 1;
    }
    println!(
        "parameters: {} -> {} ({:.2}x fewer)",
        before.n_params(),
        after.n_params(),
        before.n_params() as f64 / after.n_params().max(1) as f64
    );
    println!(
        "energy kept: {:.4} of ‖ΔW‖² over all deltas (lowest single delta {:.4})",
        if total > 0.0 { kept / total } else { 1.0 },
        worst
    );
    println!(
        "ranks: {}",
        hist.iter()
            .map(|(r, n)| format!("{n}×r{r}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
