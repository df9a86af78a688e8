//! The error type of the model crate.

use std::path::PathBuf;

use crate::gguf::GgufError;
use crate::tokenizer::TokenizerError;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Reading a file or directory failed.
    #[error("{path}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The path is neither a GGUF file nor a Hugging Face model directory.
    #[error("{0}: not a model (expected a .gguf file or a directory with config.json and *.safetensors)")]
    NotAModel(PathBuf),
    /// A GGUF file could not be read.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// The tokenizer could not be built or used.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// A command needs the model's tokenizer and the model directory has no `tokenizer.json`.
    #[error("{0} not found: this needs the model's tokenizer (a directory of weights alone can be analyzed, or compressed with --method svd)")]
    MissingTokenizer(PathBuf),
    /// A safetensors file is malformed.
    #[error("{path}: invalid safetensors: {message}")]
    Safetensors {
        /// The file involved.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// `config.json` is malformed or misses a field.
    #[error("{path}: invalid config.json")]
    Config {
        /// The file involved.
        path: PathBuf,
        /// What serde said.
        source: serde_json::Error,
    },
    /// The architecture is not one the runtime executes.
    #[error("unsupported architecture '{0}' (the runtime executes llama, qwen2 and gpt2)")]
    UnsupportedArchitecture(String),
    /// The configuration is inconsistent.
    #[error("invalid model configuration: {0}")]
    InvalidConfig(String),
    /// A tensor the architecture needs is absent.
    #[error("tensor '{0}' not found")]
    MissingTensor(String),
    /// A tensor has a different shape than the configuration implies.
    #[error("tensor '{name}' has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Full tensor name.
        name: String,
        /// Shape implied by the configuration.
        expected: Vec<usize>,
        /// Shape found in the file.
        got: Vec<usize>,
    },
    /// A tensor's element type cannot be converted to f32.
    #[error("tensor '{name}' has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// Full tensor name.
        name: String,
        /// The dtype as the file names it.
        dtype: String,
    },
    /// A token id is outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange {
        /// The offending id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// The request needs more context than the model or cache allows.
    #[error("sequence of {needed} tokens exceeds the context limit of {limit}")]
    ContextOverflow {
        /// Tokens the request needs.
        needed: usize,
        /// The limit.
        limit: usize,
    },
    /// A weight cannot be stored or read in the requested format.
    #[error("weight format: {0}")]
    WeightFormat(String),
    /// An input that must not be empty is empty.
    #[error("empty input: {0}")]
    EmptyInput(String),
    /// A decomposition failed (non-finite weights).
    #[error(transparent)]
    Svd(#[from] s2lc_spectral::SvdError),
}

impl ModelError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }
}
