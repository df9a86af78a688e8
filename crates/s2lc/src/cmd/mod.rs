//! The bodies of the commands, one command family per module; `main.rs` parses the arguments and
//! dispatches here (`experts`, `router` and `bench` live in `s2lc-bench`). This module holds what
//! the commands that run one model (`generate`, `eval`, `logits`) share: `--weights` and its
//! adapters.

use std::path::Path;

use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

use s2lc_model::llama::LlamaModel;
use s2lc_model::source::WeightStorage;
use s2lc_model::tokenizer::Tokenizer;
use s2lc_model::ModelSource;

use crate::{load_model, parse_weights};

pub mod adapters;
pub mod analyze;
pub mod compress;
pub mod eval;
pub mod generate;
pub mod info;
pub mod logits;
pub mod serve;
pub mod store;

/// How the runtime stores weight matrices (`--weights`) and which LoRA adapters it applies.
#[derive(Args, Clone)]
pub struct WeightsArg {
    /// Weight storage: f32 (dequantized reference), f16, q8_0, or native (the file's own
    /// quantized blocks; f32 for unquantized files).
    #[arg(long = "weights", default_value = "native", value_parser = parse_weights)]
    pub storage: WeightStorage,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors), applied
    /// unmerged; repeat the flag to stack several.
    #[arg(long = "adapter")]
    pub adapters: Vec<PathBuf>,
    /// Swap this FFN of an expert set (`--expert-set`) into its layers, dense f32, before any
    /// adapter is attached: an expert's name, or `base` for the set's base FFN.
    #[arg(long, requires = "expert_set")]
    pub expert: Option<String>,
    /// The expert set directory of `--expert`.
    #[arg(long, requires = "expert")]
    pub expert_set: Option<PathBuf>,
}

impl WeightsArg {
    /// Loads the model in the chosen storage, with the expert FFN swapped in and the adapters
    /// attached.
    pub fn load(&self, path: &Path) -> Result<(ModelSource, LlamaModel, Tokenizer)> {
        let (source, mut model, tokenizer) = load_model(path, self.storage)?;
        if let (Some(name), Some(dir)) = (&self.expert, &self.expert_set) {
            let set = s2lc_model::experts::ExpertSet::open(dir)
                .with_context(|| format!("opening the expert set {}", dir.display()))?;
            let ffn = if name == "base" {
                set.base().context("reading the base FFN")?
            } else {
                set.expert(name)
                    .with_context(|| format!("reading expert '{name}'"))?
            };
            ffn.swap_into(&mut model)
                .with_context(|| format!("swapping the FFN of '{name}' in"))?;
            eprintln!("expert {name}: FFN of layers {:?} swapped in", set.layers);
        }
        for dir in &self.adapters {
            let adapter = s2lc_bench::adapter_io::load_adapter(dir)?;
            model
                .attach_adapter(&adapter)
                .with_context(|| format!("attaching the adapter {}", dir.display()))?;
            eprintln!(
                "adapter {}: rank {}, scale {}, {} layers adapted",
                dir.display(),
                adapter.rank,
                adapter.scale,
                adapter.n_deltas()
            );
        }
        Ok((source, model, tokenizer))
    }
}
