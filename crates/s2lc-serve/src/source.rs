//! Where the server's adapters come from: resolve `name@semver-req` to one version, then load it
//! when the cache misses: its blobs are fetched into memory (each checked against its digest)
//! and parsed there, within the base model's limits. A PEFT adapter is held in the resident form
//! the server was started with ([`AdapterDtype`]); a pack is handed over as stored, for its
//! bases and cores to be held once ([`crate::resident`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use s2lc_adapters::pack::PackedSet;
use s2lc_model::lora::{AdapterDtype, AdapterLimits, LoraAdapter};
use s2lc_store::{parse_selector, parse_versioned, Store, StoreError};

/// Why an adapter could not be resolved or loaded; each maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The request names something malformed (a bad name or version requirement) → 400.
    #[error("{0}")]
    BadRequest(String),
    /// No such adapter or version → 404.
    #[error("{0}")]
    NotFound(String),
    /// The adapter exists but does not fit this server (another base model, a broken pack) → 422.
    #[error("{0}")]
    Unusable(String),
    /// The store cannot be reached or read → 503.
    #[error("{0}")]
    Unavailable(String),
}

impl From<StoreError> for SourceError {
    fn from(e: StoreError) -> Self {
        let msg = e.to_string();
        match e {
            StoreError::BadName(_) => SourceError::BadRequest(msg),
            StoreError::NotFound(_) => SourceError::NotFound(msg),
            StoreError::Invalid(_) | StoreError::Corrupt { .. } => SourceError::Unusable(msg),
            StoreError::Backend(_) | StoreError::Io { .. } => SourceError::Unavailable(msg),
            StoreError::VersionExists { .. } | StoreError::Aborted(_) => {
                SourceError::Unavailable(msg)
            }
        }
    }
}

/// What identifies an adapter version's content ([`AdapterSource::content`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content {
    /// Two keys with the same id hold the same adapter, which the server keeps resident once.
    pub id: String,
    /// For a pack, what identifies its shared bases: versions with the same bases (members of
    /// one pack pushed one by one) share one resident copy.
    pub bases: Option<String>,
}

/// An adapter version as read from its source.
#[derive(Debug)]
pub enum Loaded {
    /// A PEFT adapter, in the server's resident dtype.
    Lora(LoraAdapter),
    /// An S2LC pack (one member or several), as stored.
    Pack(PackedSet),
}

/// A provider of adapters by name and version.
pub trait AdapterSource: Send + Sync {
    /// Resolves `name@requirement` (`legal@^1.2`, `legal@1.0.0`, `legal@prod`, `legal`) to the
    /// cache key `name@version`.
    fn resolve(&self, spec: &str) -> Result<String, SourceError>;
    /// What identifies the content of a key returned by [`AdapterSource::resolve`]. By default
    /// every key is its own content.
    fn content(&self, key: &str) -> Result<Content, SourceError> {
        Ok(Content {
            id: key.to_string(),
            bases: None,
        })
    }
    /// Reads the adapter of a key returned by [`AdapterSource::resolve`].
    fn load(&self, key: &str) -> Result<Loaded, SourceError>;
    /// Every available `name@version`.
    fn list(&self) -> Result<Vec<String>, SourceError>;
}

/// Adapters from an S2LC Adapter Store, checked against the base model's digest.
#[derive(Debug)]
pub struct StoreSource {
    store: Store,
    base_digest: Option<String>,
    limits: AdapterLimits,
    dtype: AdapterDtype,
}

impl StoreSource {
    /// Serves from `store`; adapters recorded for another base than `base_digest` are refused.
    /// Until [`StoreSource::with_limits`] narrows them, entries are read within
    /// [`AdapterLimits::GENEROUS`]; adapters are held as f16 factors until
    /// [`StoreSource::with_dtype`] says otherwise.
    pub fn new(store: Store, base_digest: Option<String>) -> Self {
        StoreSource {
            store,
            base_digest,
            limits: AdapterLimits::GENEROUS,
            dtype: AdapterDtype::default(),
        }
    }

    /// Reads store entries within `limits` (those of the base model the server runs,
    /// [`AdapterLimits::for_model`], and its adapter budget): a store entry is untrusted input.
    pub fn with_limits(mut self, limits: AdapterLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Holds loaded adapters as `dtype` factors (f16 by default; int8 and int4 block-quantize
    /// them).
    pub fn with_dtype(mut self, dtype: AdapterDtype) -> Self {
        self.dtype = dtype;
        self
    }
}

impl AdapterSource for StoreSource {
    fn resolve(&self, spec: &str) -> Result<String, SourceError> {
        let (name, sel) = parse_selector(spec)?;
        let version = self.store.resolve(&name, &sel)?;
        Ok(format!("{name}@{version}"))
    }

    /// The digest of the base model the version was made for and of its files (each path with
    /// its blob's digest, in path order): the same files pushed for the same base under two
    /// names are one content. (The base is part of it so that a version made for another base
    /// can never be served from the cache entry of one that was checked.) A pack's bases are
    /// its bases file's digest, with the base's.
    fn content(&self, key: &str) -> Result<Content, SourceError> {
        let (name, version) = parse_versioned(key)?;
        let (_, manifest) = self.store.manifest(&name, &version)?;
        let mut files: Vec<String> = manifest
            .files
            .iter()
            .map(|f| format!("{}\0{}\n", f.path, f.digest))
            .collect();
        files.sort();
        let base = manifest.base_digest.unwrap_or_default();
        let id = s2lc_store::digest(format!("{base}\n{}", files.concat()).as_bytes());
        let bases = manifest
            .files
            .iter()
            .find(|f| f.path == BASES_FILE)
            .map(|f| format!("{base}:{}", f.digest));
        Ok(Content {
            id: format!("content:{id}"),
            bases,
        })
    }

    fn load(&self, key: &str) -> Result<Loaded, SourceError> {
        let (name, version) = parse_versioned(key)?;
        let result = (|| {
            let (_, files) = self.store.fetch(
                &name,
                &version,
                self.base_digest.as_deref(),
                self.limits.max_file_bytes,
            )?;
            Ok(match read_adapter(&files, key, &self.limits)? {
                Loaded::Lora(a) => Loaded::Lora(
                    a.to_dtype(self.dtype)
                        .map_err(|e| SourceError::Unusable(format!("{key}: {e}")))?,
                ),
                pack => pack,
            })
        })();
        // Errors name the store entry, never where a local store lives.
        result.map_err(|e| scrub(e, Path::new(self.store.location())))
    }

    fn list(&self) -> Result<Vec<String>, SourceError> {
        Ok(self
            .store
            .list()?
            .into_iter()
            .map(|l| format!("{}@{}", l.name, l.version))
            .collect())
    }
}

/// The files of a PEFT adapter version.
const PEFT_CONFIG: &str = "adapter_config.json";
const PEFT_WEIGHTS: &str = "adapter_model.safetensors";

/// The shared-bases file of a pack.
const BASES_FILE: &str = "basis.safetensors";

/// A fetched version: an S2LC pack (what `s2lc adapters pack` writes, or one member of it as
/// `s2lc store push --member` stores), or a PEFT adapter.
fn read_adapter(
    files: &BTreeMap<String, Vec<u8>>,
    key: &str,
    limits: &AdapterLimits,
) -> Result<Loaded, SourceError> {
    let unusable = |e: &dyn std::fmt::Display| SourceError::Unusable(format!("{key}: {e}"));
    if files.contains_key("pack.json") {
        let set = s2lc_adapters::format::load_files(files, limits).map_err(|e| unusable(&e))?;
        return Ok(Loaded::Pack(set));
    }
    let file = |name: &str| {
        files.get(name).ok_or_else(|| {
            SourceError::Unusable(format!(
                "{key} is neither an S2LC pack (no pack.json) nor a PEFT adapter (no {name})"
            ))
        })
    };
    let (config, weights) = (file(PEFT_CONFIG)?, file(PEFT_WEIGHTS)?);
    let mut adapter = LoraAdapter::from_bytes(Path::new(key), config, weights, limits)
        .map_err(|e| unusable(&e))?;
    adapter.path = PathBuf::from(key);
    Ok(Loaded::Lora(adapter))
}

/// `e` with a local store's directory replaced by a placeholder in its message.
fn scrub(e: SourceError, store: &Path) -> SourceError {
    let clean = |msg: String| {
        // Only absolute paths: a relative store name could be a word of the message.
        let p = store.display().to_string();
        if store.is_absolute() && p.len() > 1 {
            msg.replace(&format!("{p}/"), "").replace(&p, "<store>")
        } else {
            msg
        }
    };
    match e {
        SourceError::BadRequest(m) => SourceError::BadRequest(clean(m)),
        SourceError::NotFound(m) => SourceError::NotFound(clean(m)),
        SourceError::Unusable(m) => SourceError::Unusable(clean(m)),
        SourceError::Unavailable(m) => SourceError::Unavailable(clean(m)),
    }
}
