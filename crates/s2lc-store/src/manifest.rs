//! What a pushed version is: its [`Manifest`] of [`FileEntry`]s, the [`Listing`] of a stored
//! version, and the BLAKE3 [`digest`] that names every object.

use semver::Version;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// BLAKE3 of `bytes`, hex.
pub fn digest(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// One file of a pushed version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path inside the version's directory (`/`-separated, relative).
    pub path: String,
    /// BLAKE3 of its bytes: the blob holding it.
    pub digest: String,
    /// Bytes.
    pub size: u64,
}

/// What one pushed version holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Adapter name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Digest of the base model it was made for, if recorded.
    pub base_digest: Option<String>,
    /// The files.
    pub files: Vec<FileEntry>,
    /// Caller metadata (packing parameters, provenance).
    pub meta: Value,
}

impl Manifest {
    /// Bytes of all its files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// A version in the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Listing {
    /// Adapter name.
    pub name: String,
    /// Version.
    pub version: Version,
    /// Manifest digest.
    pub manifest: String,
    /// Bytes of its files.
    pub bytes: u64,
    /// Tags pointing at it.
    pub tags: Vec<String>,
}

/// Whether `s` is a digest as [`digest`] writes it (64 lowercase hex digits).
pub(crate) fn is_digest(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
