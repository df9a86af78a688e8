//! [`ModelSource`]: one entry point that opens a GGUF file or a Hugging Face model directory and
//! yields its configuration, tokenizer, tensors and the runnable model.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::config::{Arch, HfConfig, ModelConfig};
use crate::error::ModelError;
use crate::gguf::GgufFile;
use crate::gpt2::{Gpt2Config, Gpt2Source};
use crate::llama::LlamaModel;
use crate::source::{GgufSource, SafetensorsSource, TensorSource, WeightStorage, Weights};
use crate::tokenizer::{GgufBpe, Tokenizer};

enum Format {
    Gguf(GgufSource),
    HfDir {
        /// The safetensors files, under the runtime's names ([`Gpt2Source`] for GPT-2).
        tensors: Box<dyn TensorSource>,
        config_json: serde_json::Value,
    },
}

/// A model on disk: a GGUF file (weights, config and tokenizer in one file) or a Hugging Face
/// directory (`config.json`, `*.safetensors`, `tokenizer.json`).
pub struct ModelSource {
    path: PathBuf,
    format: Format,
}

impl ModelSource {
    /// Opens `path`, deciding the format from what it is: a directory is read as Hugging Face
    /// layout, a file must start with the GGUF magic.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
        let format = if meta.is_dir() {
            let config_path = path.join("config.json");
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| ModelError::io(&config_path, e))?;
            let config_json: serde_json::Value =
                serde_json::from_str(&text).map_err(|source| ModelError::Config {
                    path: config_path,
                    source,
                })?;
            let files = Box::new(SafetensorsSource::open_dir(path)?);
            let gpt2 = config_json.get("model_type").and_then(|v| v.as_str()) == Some("gpt2");
            Format::HfDir {
                tensors: if gpt2 {
                    Box::new(Gpt2Source::new(files))
                } else {
                    files
                },
                config_json,
            }
        } else {
            let mut magic = [0u8; 4];
            let mut f = File::open(path).map_err(|e| ModelError::io(path, e))?;
            if f.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
                return Err(ModelError::NotAModel(path.to_path_buf()));
            }
            Format::Gguf(GgufSource::new(GgufFile::open(path)?))
        };
        Ok(ModelSource {
            path: path.to_path_buf(),
            format,
        })
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `"gguf"` or `"hf"`.
    pub fn format_name(&self) -> &'static str {
        match self.format {
            Format::Gguf(_) => "gguf",
            Format::HfDir { .. } => "hf",
        }
    }

    /// The architecture name as the file states it, even one the runtime cannot execute (`bert`).
    pub fn architecture(&self) -> Result<String, ModelError> {
        match &self.format {
            Format::Gguf(g) => Ok(g.file().architecture()?.to_string()),
            Format::HfDir { config_json, .. } => config_json
                .get("model_type")
                .and_then(|v| v.as_str())
                .map(str::to_string)
                .ok_or_else(|| ModelError::InvalidConfig("config.json has no model_type".into())),
        }
    }

    /// The runtime configuration (fails for architectures the runtime does not execute).
    pub fn config(&self) -> Result<ModelConfig, ModelError> {
        match &self.format {
            Format::Gguf(g) => ModelConfig::from_gguf(g.file()),
            Format::HfDir { config_json, .. } => {
                // Name an unsupported architecture before complaining about its fields.
                let arch = Arch::from_name(&self.architecture()?)?;
                let invalid = |source| ModelError::Config {
                    path: self.path.join("config.json"),
                    source,
                };
                if arch == Arch::Gpt2 {
                    let hf: Gpt2Config =
                        serde_json::from_value(config_json.clone()).map_err(invalid)?;
                    return hf.to_runtime();
                }
                let hf: HfConfig = serde_json::from_value(config_json.clone()).map_err(invalid)?;
                ModelConfig::from_hf(&hf)
            }
        }
    }

    /// The model's tensors under Hugging Face names.
    pub fn tensors(&self) -> &dyn TensorSource {
        match &self.format {
            Format::Gguf(g) => g,
            Format::HfDir { tensors, .. } => tensors.as_ref(),
        }
    }

    /// The GGUF file, when the model is one (raw quantized blocks, metadata).
    pub fn gguf(&self) -> Option<&GgufFile> {
        match &self.format {
            Format::Gguf(g) => Some(g.file()),
            Format::HfDir { .. } => None,
        }
    }

    /// The tokenizer: `tokenizer.json` in a directory, the embedded BPE vocabulary in a GGUF. A
    /// directory without `tokenizer.json` is [`ModelError::MissingTokenizer`].
    pub fn tokenizer(&self) -> Result<Tokenizer, ModelError> {
        match &self.format {
            Format::HfDir { .. } => {
                let path = self.path.join("tokenizer.json");
                if !path.exists() {
                    return Err(ModelError::MissingTokenizer(path));
                }
                Ok(Tokenizer::from_file(&path)?)
            }
            Format::Gguf(g) => {
                let f = g.file();
                let model = f.get_str("tokenizer.ggml.model")?;
                if model != "gpt2" {
                    return Err(crate::tokenizer::TokenizerError::UnsupportedModel(
                        model.to_string(),
                    )
                    .into());
                }
                let spec = GgufBpe {
                    tokens: f.get_str_array("tokenizer.ggml.tokens")?,
                    merges: f.get_str_array("tokenizer.ggml.merges")?,
                    token_types: f.get_i32_array("tokenizer.ggml.token_type").ok(),
                    pre: f.get_str("tokenizer.ggml.pre").ok(),
                    bos_id: f.get_u32("tokenizer.ggml.bos_token_id").ok(),
                    eos_id: f.get_u32("tokenizer.ggml.eos_token_id").ok(),
                    add_bos: f.get_bool("tokenizer.ggml.add_bos_token").unwrap_or(false),
                };
                Ok(Tokenizer::from_gguf_bpe(spec)?)
            }
        }
    }

    /// The chat template (Jinja source) the model ships, if any.
    pub fn chat_template(&self) -> Option<String> {
        match &self.format {
            Format::Gguf(g) => g
                .file()
                .get_str("tokenizer.chat_template")
                .ok()
                .map(str::to_string),
            Format::HfDir { .. } => {
                let p = self.path.join("tokenizer_config.json");
                let v: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
                v.get("chat_template")?.as_str().map(str::to_string)
            }
        }
    }

    /// Loads the runnable model, weight matrices kept in `storage`; `on_block` sees each loaded
    /// block.
    pub fn load_llama(
        &self,
        storage: WeightStorage,
        on_block: impl FnMut(usize),
    ) -> Result<LlamaModel, ModelError> {
        let cfg = self.config()?;
        LlamaModel::load(&cfg, &Weights::new(self.tensors()), storage, on_block)
    }
}

/// Whether a model's chat template is ChatML (SmolLM2, Qwen2): the one template the runtime
/// renders itself.
pub fn uses_chatml(template: Option<&str>) -> bool {
    template.is_some_and(|t| t.contains("<|im_start|>"))
}

/// A conversation of `(role, content)` messages in ChatML, ending with the assistant's turn
/// opened: `<|im_start|>role\ncontent<|im_end|>\n` per message, then `<|im_start|>assistant\n`.
pub fn chatml<'a>(messages: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    for (role, content) in messages {
        out.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
    }
    out.push_str("<|im_start|>assistant\n");
    out
}

/// Wraps `prompt` in a ChatML conversation of one user message when `template` uses ChatML
/// markers ([`uses_chatml`]); otherwise returns the prompt unchanged.
pub fn apply_chat_template(template: Option<&str>, prompt: &str) -> String {
    if uses_chatml(template) {
        chatml([("user", prompt)])
    } else {
        prompt.to_string()
    }
}
