//! The store's error type, [`StoreError`], and its `Result` alias.

use std::path::PathBuf;

use semver::Version;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed (I/O, network, permissions).
    #[error("store backend: {0}")]
    Backend(#[from] object_store::Error),
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// An object's bytes do not hash to its name.
    #[error("corrupt object {key}: BLAKE3 is {actual}")]
    Corrupt {
        /// The object.
        key: String,
        /// Hash of what was read.
        actual: String,
    },
    /// A name, version, tag or requirement is malformed.
    #[error("{0}")]
    BadName(String),
    /// `name@version` is already in the store.
    #[error("{name}@{version} already exists (versions are immutable; push a new version)")]
    VersionExists {
        /// Adapter name.
        name: String,
        /// The version.
        version: Version,
    },
    /// Nothing matches.
    #[error("{0}")]
    NotFound(String),
    /// A manifest is malformed, or the pull does not fit the local base model.
    #[error("{0}")]
    Invalid(String),
    /// The caller aborted a push (see [`Store::push`](crate::Store::push)'s `progress`).
    #[error("push aborted: {0}")]
    Aborted(String),
}

pub(crate) type Result<T, E = StoreError> = std::result::Result<T, E>;
