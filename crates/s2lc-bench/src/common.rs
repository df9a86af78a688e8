//! Command-line plumbing the benches and the `s2lc` binary share: the model flag, weight and KV
//! cache parsers, model loading with a progress bar, and JSON report writing.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use s2lc_model::kv::KvSpec;
use s2lc_model::llama::LlamaModel;
use s2lc_model::source::WeightStorage;
use s2lc_model::tokenizer::Tokenizer;
use s2lc_model::ModelSource;

/// Which model to run (`--model`, the same flag in every command).
#[derive(Args, Clone, Debug, Default)]
pub struct ModelArg {
    /// A .gguf file or a Hugging Face directory [default: SmolLM2-135M-Instruct in $S2LC_HOME].
    #[arg(long)]
    pub model: Option<PathBuf>,
}

impl ModelArg {
    /// The model path, defaulting to the SmolLM2 asset fetched by `scripts/fetch-assets`.
    pub fn path(&self) -> PathBuf {
        self.model
            .clone()
            .unwrap_or_else(s2lc_model::assets::smollm2)
    }
}

/// A base model and the one storage its weights run in (`--model`, `--weights`): the same two
/// flags in every command that loads one model.
#[derive(Args, Clone, Debug)]
pub struct BaseModelArgs {
    /// `--model`.
    #[command(flatten)]
    pub model: ModelArg,
    /// Weight storage of the base model: f32, f16, q8_0, or native (the file's own quantized
    /// blocks; f32 for unquantized files).
    #[arg(long, default_value = "native", value_parser = parse_weights)]
    pub weights: WeightStorage,
}

impl BaseModelArgs {
    /// The model path (see [`ModelArg::path`]).
    pub fn path(&self) -> PathBuf {
        self.model.path()
    }

    /// Loads the model in the chosen storage with a progress bar.
    pub fn load(&self) -> Result<(ModelSource, LlamaModel, Tokenizer)> {
        load_model(&self.path(), self.weights)
    }
}

/// The adapters a bench measures (`--adapter DIR`, repeated), else the command's default set.
#[derive(Args, Clone, Debug, Default)]
pub struct AdapterSetArgs {
    /// A PEFT adapter directory (repeat the flag) [default: the adapters
    /// scripts/reference/train_adapter_set.sh writes under $S2LC_HOME/adapters].
    #[arg(long = "adapter")]
    pub adapters: Vec<PathBuf>,
}

impl AdapterSetArgs {
    /// The directories given, or `default()` when none were.
    pub fn dirs_or(&self, default: impl FnOnce() -> Result<Vec<PathBuf>>) -> Result<Vec<PathBuf>> {
        if self.adapters.is_empty() {
            default()
        } else {
            Ok(self.adapters.clone())
        }
    }
}

/// The expert set a bench measures (`--experts DIR` / `--no-experts`).
#[derive(Args, Clone, Debug, Default)]
pub struct ExpertSetArgs {
    /// Expert set to measure as well [default: $S2LC_HOME/experts/ffn-every3 when it exists].
    #[arg(long)]
    pub experts: Option<PathBuf>,
    /// Skip the expert set.
    #[arg(long, conflicts_with = "experts")]
    pub no_experts: bool,
}

impl ExpertSetArgs {
    /// The set to measure, if any (see [`s2lc_model::expert_eval::bench_set`]).
    pub fn dir(&self) -> Option<PathBuf> {
        s2lc_model::expert_eval::bench_set(self.experts.as_deref(), self.no_experts)
    }
}

/// `$S2LC_HOME`, default `~/.cache/s2lc` (where `scripts/fetch-assets` puts the assets).
pub fn s2lc_home() -> PathBuf {
    s2lc_model::assets::home()
}

/// Parses a KV cache spec (`dense`, `q8`, `spectral:energy=0.99`, ...) for clap.
pub fn parse_kv(s: &str) -> Result<KvSpec, String> {
    KvSpec::parse(s).map_err(|e| e.to_string())
}

/// Parses a weight storage (`f32`, `f16`, `q8_0`, `native`) for clap.
pub fn parse_weights(s: &str) -> Result<WeightStorage, String> {
    WeightStorage::parse(s)
        .ok_or_else(|| format!("unknown weight storage '{s}' (f32, f16, q8_0, native)"))
}

/// Parses `256MiB`, `1GiB`, `64KiB`, `1MB` or a plain byte count.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        u => {
            return Err(format!(
                "unknown unit '{u}' in '{s}' (B, KB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 256MiB)"))?;
    Ok((n * scale) as usize)
}

/// A progress bar of `len` steps on stderr (hidden when stderr is not a terminal), for anything
/// that takes over a second.
pub fn progress_bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:>16} [{bar:40}] {pos}/{len} {elapsed}/{eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// Opens a model and loads its runtime weights in `storage` with a progress bar, and its
/// tokenizer (a model directory without `tokenizer.json` is an error naming it).
pub fn load_model(
    path: &Path,
    storage: WeightStorage,
) -> Result<(ModelSource, LlamaModel, Tokenizer)> {
    let source = ModelSource::open(path).context("opening the model")?;
    source.config().context("reading the model configuration")?;
    let tokenizer = source.tokenizer().context("building the tokenizer")?;
    let model = load_weights_of(&source, storage)?;
    Ok((source, model, tokenizer))
}

/// [`load_model`] without the tokenizer, for commands that work from the weights alone
/// (`analyze`, plain-SVD `compress`): a directory of weights without `tokenizer.json` loads.
pub fn load_weights(path: &Path, storage: WeightStorage) -> Result<(ModelSource, LlamaModel)> {
    let source = ModelSource::open(path).context("opening the model")?;
    let model = load_weights_of(&source, storage)?;
    Ok((source, model))
}

/// The runtime model of an open source in `storage`, with a progress bar over its blocks.
fn load_weights_of(source: &ModelSource, storage: WeightStorage) -> Result<LlamaModel> {
    let cfg = source.config().context("reading the model configuration")?;
    let bar = progress_bar(cfg.n_layers as u64, "loading blocks");
    let model = source
        .load_llama(storage, |_| bar.inc(1))
        .context("loading the weights")?;
    bar.finish_and_clear();
    Ok(model)
}

/// `--json FILE`, the same flag in every benchmark: also write the results as JSON there.
#[derive(Args, Debug, Clone, Default)]
pub struct JsonArg {
    /// Also write the results as JSON here.
    #[arg(long = "json", value_name = "FILE")]
    pub path: Option<PathBuf>,
}

/// Writes a JSON report (`--json FILE`), pretty-printed, atomically: a reader never sees half a
/// report, and a failed run leaves the previous one in place.
pub fn write_json(path: &Path, report: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(report).context("serializing the report")?;
    s2lc_model::atomic::write_file_atomic(path, text.as_bytes())
        .with_context(|| format!("writing the report {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_and_without_units() {
        assert_eq!(parse_bytes("256MiB"), Ok(256 << 20));
        assert_eq!(parse_bytes("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_bytes(" 4096 "), Ok(4096));
        assert!(parse_bytes("3 parsecs").unwrap_err().contains("parsecs"));
        assert!(parse_bytes("MiB").is_err());
    }

    #[test]
    fn storages_and_kv_specs_parse_by_name() {
        assert_eq!(parse_weights("f16"), Ok(WeightStorage::F16));
        assert!(parse_weights("int3").unwrap_err().contains("int3"));
        assert!(parse_kv("q8").expect("q8 parses").name().contains("q8"));
        assert!(parse_kv("zip").is_err());
    }

    #[test]
    fn a_report_is_written_whole() {
        let path =
            std::env::temp_dir().join(format!("s2lc-bench-report-{}.json", std::process::id()));
        write_json(&path, &serde_json::json!({"rows": [1, 2]})).expect("write");
        let back: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        assert_eq!(back["rows"][1], 2);
        std::fs::remove_file(&path).ok();
    }
}
