//! Model configuration: a serde mirror of Hugging Face `config.json` and the strict runtime config
//! derived from it or from GGUF metadata.

use serde::Deserialize;

use crate::error::ModelError;
use crate::gguf::GgufFile;

/// Architecture families the runtime executes. All are decoder-only pre-norm transformers run by
/// the one Llama-family decoder; they differ by the options below ([`NormKind`],
/// [`PositionKind`], [`MlpKind`]) and by which linears carry biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama family (Llama, SmolLM2, Mistral-style without sliding window).
    Llama,
    /// Qwen2 family: Llama plus q/k/v biases.
    Qwen2,
    /// GPT-2 (Hugging Face layout): LayerNorm with bias, learned absolute positions, a GELU
    /// (tanh approximation) MLP without gate, biases on every linear, tied head.
    Gpt2,
}

/// The normalization before attention, before the MLP and before the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// `x / √(mean(x²) + ε) · w` (Llama, Qwen2).
    Rms,
    /// `(x − mean) / √(var + ε) · w + b` (GPT-2).
    Layer,
}

/// How positions enter the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PositionKind {
    /// Rotary embedding of queries and keys (Llama, Qwen2).
    Rope,
    /// A learned embedding per absolute position added to the token embedding (GPT-2's `wpe`);
    /// positions end at the table's length.
    Learned,
}

/// The feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpKind {
    /// `down(silu(gate·x) ⊙ up·x)` (Llama, Qwen2).
    SwiGlu,
    /// `down(gelu_tanh(up·x))`, no gate (GPT-2's `c_fc` → `gelu_new` → `c_proj`).
    GeluTanh,
}

impl Arch {
    /// Parses the architecture name used by GGUF (`general.architecture`) or HF (`model_type`).
    pub fn from_name(name: &str) -> Result<Self, ModelError> {
        match name {
            "llama" | "mistral" => Ok(Arch::Llama),
            "qwen2" => Ok(Arch::Qwen2),
            "gpt2" => Ok(Arch::Gpt2),
            other => Err(ModelError::UnsupportedArchitecture(other.to_string())),
        }
    }

    /// The name as GGUF and HF spell it.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Gpt2 => "gpt2",
        }
    }
}

/// `config.json` of a Hugging Face Llama-family model, as written by transformers.
/// Fields the runtime does not need are ignored; optional ones get the transformers defaults.
/// GPT-2 spells its fields differently (`n_embd`, `n_layer`, ...): see [`crate::gpt2::Gpt2Config`].
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    /// `llama`, `qwen2`, ...
    pub model_type: String,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU hidden layer.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); defaults to `num_attention_heads`.
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RoPE base frequency.
    pub rope_theta: Option<f32>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: Option<f32>,
    /// Maximum context length the model was trained for.
    pub max_position_embeddings: Option<usize>,
    /// Whether `lm_head` reuses the embedding matrix.
    pub tie_word_embeddings: Option<bool>,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id.
    pub eos_token_id: Option<u32>,
}

/// The strict configuration the runtime executes.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Architecture family.
    pub arch: Arch,
    /// Width of the residual stream (`d`).
    pub hidden_size: usize,
    /// Width of the SwiGLU hidden layer.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads; `n_heads` is a multiple of it.
    pub n_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// Epsilon of the norms (RMSNorm or LayerNorm, see [`ModelConfig::norm`]).
    pub rms_eps: f32,
    /// Trained context length (for learned positions, the rows of the position table).
    pub max_seq_len: usize,
    /// `lm_head` is the embedding matrix.
    pub tie_embeddings: bool,
}

impl ModelConfig {
    /// The shapes of SmolLM2-135M (its `config.json`): for checks that need a real model's
    /// shapes without its file, such as the caps on untrusted adapters in tests and fuzzing.
    pub fn smollm2_135m() -> Self {
        ModelConfig {
            arch: Arch::Llama,
            hidden_size: 576,
            intermediate_size: 1536,
            n_layers: 30,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            vocab_size: 49152,
            rope_theta: 1e5,
            rms_eps: 1e-5,
            max_seq_len: 8192,
            tie_embeddings: true,
        }
    }

    /// Derives the runtime config from a parsed `config.json`.
    pub fn from_hf(hf: &HfConfig) -> Result<Self, ModelError> {
        let arch = Arch::from_name(&hf.model_type)?;
        let n_heads = hf.num_attention_heads;
        let cfg = ModelConfig {
            arch,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            n_layers: hf.num_hidden_layers,
            n_heads,
            n_kv_heads: hf.num_key_value_heads.unwrap_or(n_heads),
            head_dim: hf.head_dim.unwrap_or(hf.hidden_size / n_heads.max(1)),
            vocab_size: hf.vocab_size,
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            rms_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            max_seq_len: hf.max_position_embeddings.unwrap_or(2048),
            tie_embeddings: hf.tie_word_embeddings.unwrap_or(false),
        };
        cfg.validate()
    }

    /// Derives the runtime config from GGUF metadata (`{arch}.block_count`, ...).
    /// `tie_embeddings` is true when the file has no `output.weight`.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        let arch = Arch::from_name(file.architecture()?)?;
        if arch == Arch::Gpt2 {
            // llama.cpp stores GPT-2 with fused q/k/v and its own names; only the Hugging Face
            // layout is mapped.
            return Err(ModelError::InvalidConfig(
                "GPT-2 runs from a Hugging Face directory (config.json + model.safetensors), not from GGUF".into(),
            ));
        }
        let a = arch.name();
        let key = |k: &str| format!("{a}.{k}");
        let hidden_size = file.get_u32(&key("embedding_length"))? as usize;
        let n_heads = file.get_u32(&key("attention.head_count"))? as usize;
        let n_kv_heads = file
            .get_u32(&key("attention.head_count_kv"))
            .map(|v| v as usize)
            .unwrap_or(n_heads);
        let vocab_size = match file.tensor_info("token_embd.weight") {
            Some(info) => info.shape()[0],
            None => return Err(ModelError::MissingTensor("token_embd.weight".into())),
        };
        let head_dim = file
            .get_u32(&key("attention.key_length"))
            .map(|v| v as usize)
            .unwrap_or(hidden_size / n_heads.max(1));
        let cfg = ModelConfig {
            arch,
            hidden_size,
            intermediate_size: file.get_u32(&key("feed_forward_length"))? as usize,
            n_layers: file.get_u32(&key("block_count"))? as usize,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size,
            rope_theta: file.get_f32(&key("rope.freq_base")).unwrap_or(10_000.0),
            rms_eps: file
                .get_f32(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-6),
            max_seq_len: file
                .get_u32(&key("context_length"))
                .map(|v| v as usize)
                .unwrap_or(2048),
            tie_embeddings: file.tensor_info("output.weight").is_none(),
        };
        cfg.validate()
    }

    /// The `config.json` transformers writes for this configuration (so other tools load our output).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let arch = match self.arch {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Gpt2 => return crate::gpt2::Gpt2Config::from_runtime(self).to_json(),
        };
        serde_json::json!({
            "architectures": [arch],
            "model_type": self.arch.name(),
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_eps,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        })
    }

    /// Checks the invariants the runtime relies on.
    pub fn validate(self) -> Result<Self, ModelError> {
        let bad = |why: String| Err(ModelError::InvalidConfig(why));
        if self.hidden_size == 0 || self.n_layers == 0 || self.n_heads == 0 || self.vocab_size == 0
        {
            return bad(format!("zero-sized dimension in {self:?}"));
        }
        if self.n_kv_heads == 0 || self.n_heads % self.n_kv_heads != 0 {
            return bad(format!(
                "{} query heads is not a multiple of {} key/value heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        // RoPE rotates pairs of a head's elements: its width must be even.
        let even = self.positions() == PositionKind::Learned || self.head_dim % 2 == 0;
        if self.head_dim == 0 || !even {
            return bad(format!(
                "head_dim {} must be even and non-zero",
                self.head_dim
            ));
        }
        Ok(self)
    }

    /// The normalization the architecture uses.
    pub fn norm(&self) -> NormKind {
        match self.arch {
            Arch::Llama | Arch::Qwen2 => NormKind::Rms,
            Arch::Gpt2 => NormKind::Layer,
        }
    }

    /// How positions enter the model.
    pub fn positions(&self) -> PositionKind {
        match self.arch {
            Arch::Llama | Arch::Qwen2 => PositionKind::Rope,
            Arch::Gpt2 => PositionKind::Learned,
        }
    }

    /// The feed-forward block.
    pub fn mlp(&self) -> MlpKind {
        match self.arch {
            Arch::Llama | Arch::Qwen2 => MlpKind::SwiGlu,
            Arch::Gpt2 => MlpKind::GeluTanh,
        }
    }

    /// Whether every linear layer (not only q/k/v) carries a bias, as GPT-2's do.
    pub fn biases_everywhere(&self) -> bool {
        self.arch == Arch::Gpt2
    }

    /// Width of the concatenated query heads.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of the concatenated key (or value) heads.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_config_defaults_and_validation() {
        let json = r#"{"model_type":"llama","hidden_size":576,"intermediate_size":1536,
            "num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,
            "vocab_size":49152,"rope_theta":100000.0,"tie_word_embeddings":true}"#;
        let hf: HfConfig = serde_json::from_str(json).unwrap();
        let cfg = ModelConfig::from_hf(&hf).unwrap();
        let again: HfConfig = serde_json::from_value(cfg.to_hf_json()).unwrap();
        assert_eq!(ModelConfig::from_hf(&again).unwrap(), cfg);
        assert_eq!(cfg.head_dim, 64);
        assert_eq!(cfg.kv_dim(), 192);
        assert!(cfg.tie_embeddings);
        assert_eq!(cfg.rms_eps, 1e-6);

        let bad = r#"{"model_type":"llama","hidden_size":576,"intermediate_size":1536,
            "num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":4,"vocab_size":10}"#;
        let hf: HfConfig = serde_json::from_str(bad).unwrap();
        let err = ModelConfig::from_hf(&hf).unwrap_err().to_string();
        assert!(err.contains("multiple"), "{err}");

        let neox = r#"{"model_type":"gpt_neox","hidden_size":8,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":1,"vocab_size":10}"#;
        let hf: HfConfig = serde_json::from_str(neox).unwrap();
        assert!(matches!(
            ModelConfig::from_hf(&hf),
            Err(ModelError::UnsupportedArchitecture(a)) if a == "gpt_neox"
        ));
    }
}
