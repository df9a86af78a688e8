//! Why packing, unpacking or reading a pack fails: the crate's one error type.

use std::path::PathBuf;

use s2lc_model::llama::LinearInput;
use s2lc_spectral::{SvdError, WhitenError};

/// Why packing, unpacking or reading a pack failed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// A decomposition failed (non-finite values).
    #[error(transparent)]
    Svd(#[from] SvdError),
    /// Reading an adapter or expert failed.
    #[error(transparent)]
    Model(#[from] s2lc_model::ModelError),
    /// A calibration Gram matrix could not be factored.
    #[error("whitening layer {layer} {input:?}: {source}")]
    Whiten {
        /// The layer.
        layer: usize,
        /// Which input of the layer.
        input: LinearInput,
        /// What failed.
        source: WhitenError,
    },
    /// The members or parameters are inconsistent.
    #[error("{0}")]
    Invalid(String),
    /// A file could not be read or written.
    #[error("{path}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A pack file is malformed.
    #[error("{path}: {message}")]
    Format {
        /// The file involved.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}
