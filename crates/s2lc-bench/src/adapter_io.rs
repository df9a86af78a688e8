//! Adapter plumbing the benches and `s2lc adapters` share: reading PEFT adapters as pack
//! members, the packing flags' parsers, calibration windows, activation whitening and loss-aware
//! sensitivities with a progress bar.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use s2lc_adapters::loss::{loss_weights, sensitivities, Sensitivity};
use s2lc_adapters::{EnergyScope, InputWhitening, Member, ModuleKey};
use s2lc_model::compress::{calibration_windows, input_grams};
use s2lc_model::llama::LlamaModel;
use s2lc_model::lora::{LoraAdapter, TARGETS};
use s2lc_model::tokenizer::{read_text_file, Tokenizer};
use s2lc_spectral::QuantBits;

use crate::common::{progress_bar, s2lc_home};

/// Parses a width name (`int8`, `int4`, …).
pub fn parse_bits(s: &str) -> Result<QuantBits, String> {
    QuantBits::parse(s)
        .ok_or_else(|| format!("unknown bits '{s}' (int8, int6, int5, int4, int3, int2)"))
}

/// Parses `matrix` / `member`.
pub fn parse_scope(s: &str) -> Result<EnergyScope, String> {
    EnergyScope::parse(s).ok_or_else(|| format!("unknown energy scope '{s}' (matrix, member)"))
}

/// `n` seeded windows of `window` tokens from the first `share` of each text's tokens.
pub fn calibration(
    tokenizer: &Tokenizer,
    texts: &[(PathBuf, f64)],
    n: usize,
    window: usize,
) -> Result<Vec<Vec<u32>>> {
    let mut windows = Vec::new();
    for (path, share) in texts {
        let text = read_text_file(path)
            .with_context(|| format!("reading the calibration text {}", path.display()))?;
        let tokens = tokenizer
            .encode(&text, false)
            .with_context(|| format!("tokenizing {}", path.display()))?;
        let end = (tokens.len() as f64 * share).floor() as usize;
        windows.extend(
            calibration_windows(&tokens[..end], n, window, 0)
                .with_context(|| format!("calibration windows of {}", path.display()))?,
        );
    }
    Ok(windows)
}

/// The whitening of `model`'s block inputs over calibration `windows`.
pub fn input_whitening(model: &LlamaModel, windows: &[Vec<u32>]) -> Result<InputWhitening> {
    let grams = input_grams(model, windows).context("running the calibration windows")?;
    InputWhitening::from_grams(&grams).context("whitening the calibration inputs")
}

/// [`sensitivities`] of `adapter` with a progress bar.
pub fn loss_sensitivities(
    model: &LlamaModel,
    adapter: &LoraAdapter,
    windows: Vec<Vec<u32>>,
    name: &str,
) -> Result<BTreeMap<ModuleKey, Sensitivity>> {
    let bar = progress_bar(
        adapter.n_deltas() as u64,
        &format!("loss weights of {name}"),
    );
    let s = sensitivities(model, adapter, windows, |done, _| {
        bar.set_position(done as u64)
    })
    .with_context(|| format!("measuring the loss weights of {name}"))?;
    bar.finish_and_clear();
    Ok(s)
}

/// One line per target kind: the median, least and largest loss weight and the share of the KL
/// of its matrices. Weights are printed relative to the adapter's mean (`ΣKL/Σ‖ΔW‖²`).
pub fn print_sensitivity(
    name: &str,
    sens: &BTreeMap<ModuleKey, Sensitivity>,
    took: std::time::Duration,
) {
    let weights = loss_weights(sens);
    let total_kl: f64 = sens.values().map(|v| v.kl).sum();
    let total_energy: f64 = sens.values().map(|v| v.energy).sum();
    let mean = (total_kl / total_energy).max(f64::MIN_POSITIVE);
    println!(
        "loss weights of {name} ({} matrices, {:.0} s): sum of single-matrix KLs {total_kl:.4} nats",
        sens.len(),
        took.as_secs_f64()
    );
    for (t, target) in TARGETS.iter().enumerate() {
        let mut w: Vec<f64> = weights
            .iter()
            .filter(|(k, _)| k.target == t)
            .map(|(_, &w)| w / mean)
            .collect();
        if w.is_empty() {
            continue;
        }
        w.sort_by(f64::total_cmp);
        let kl: f64 = sens
            .iter()
            .filter(|(k, _)| k.target == t)
            .map(|(_, v)| v.kl)
            .sum();
        println!(
            "  {target:>10}: relative weight median {:.3} (min {:.3}, max {:.3}), KL {:.1} % of the sum",
            w[w.len() / 2],
            w[0],
            w[w.len() - 1],
            100.0 * kl / total_kl.max(f64::MIN_POSITIVE)
        );
    }
}

/// The member name of an adapter directory: its last path component.
pub fn dir_name(dir: &Path) -> String {
    dir.file_name().map_or_else(
        || dir.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Reads PEFT adapters as pack members named after their directories.
pub fn read_members(dirs: &[PathBuf]) -> Result<(Vec<LoraAdapter>, Vec<Member>)> {
    let mut adapters = Vec::new();
    let mut members = Vec::new();
    for dir in dirs {
        let adapter = load_adapter(dir)?;
        members.push(Member::from_lora(&dir_name(dir), &adapter));
        adapters.push(adapter);
    }
    Ok((adapters, members))
}

/// The rank-8 domain adapters `$S2LC_HOME/adapters/DOMAIN-r8` that exist (what
/// `scripts/reference/train_adapter_set.sh` trains), in the order of the asset domains.
pub fn domain_adapters() -> Vec<PathBuf> {
    s2lc_model::assets::DOMAINS
        .iter()
        .map(|(d, _)| s2lc_home().join(format!("adapters/{d}-r8")))
        .filter(|p| p.join("adapter_config.json").is_file())
        .collect()
}

/// Reads a PEFT adapter directory, the error naming it.
pub fn load_adapter(dir: &Path) -> Result<LoraAdapter> {
    LoraAdapter::load(dir).with_context(|| format!("reading the adapter {}", dir.display()))
}
