//! The S2LC Adapter Store: content-addressed blobs, manifests and semantic-version refs — in a
//! local directory by default, in any S3-compatible store (through [`object_store`]) with the
//! `s3` feature.
//!
//! Layout under the store's root:
//!
//! ```text
//! blobs/<blake3>              file contents, named by the BLAKE3 of their bytes (stored once)
//! manifests/<blake3>          JSON manifest of one pushed version (itself content-addressed)
//! refs/<name>/<version>       the manifest digest of name@version (written last, never replaced)
//! tags/<name>/<tag>           a version of name
//! leases/<id>                 a push in flight: the blobs and manifest it will reference
//! gc/<id>                     a gc in flight: the leases it honours
//! ```
//!
//! Every read re-hashes what it got; every object is written whole (a local write is staged under
//! a unique name, fsynced, published by link or rename and its directory fsynced; an S3 put is
//! atomic) and a push writes its blobs, then its manifest, then — with a conditional put that
//! fails if it exists — its ref, so a version is visible only once complete and two pushes of one
//! version cannot both win. `gc` removes only unreachable objects older
//! than a grace period that no push in flight has leased; pushes and gc coordinate through
//! leases and gc locks so that gc never deletes an object a push re-uses (the protocol, and why
//! it is race-free on both backends, is in [`lease`]). Staging files left by a killed writer are
//! reported by `verify` and swept by `gc`. The store knows nothing of tensors: a pushed version is
//! a directory of files plus caller metadata (base model digest, packing parameters).
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod lease;
mod local;
#[cfg(feature = "s3")]
pub mod loopback;
mod objects;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use semver::{Version, VersionReq};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::lease::{GcLock, Lease, GC_LOCKS, LEASES};
use crate::local::Meta;
use crate::objects::{Fault, Objects};

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
    /// The caller aborted a push (see [`Store::push`]'s `progress`).
    #[error("push aborted: {0}")]
    Aborted(String),
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

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

/// What [`Store::verify`] found.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct VerifyReport {
    /// Objects re-hashed.
    pub checked: usize,
    /// Problems, one line each (corrupt blobs, manifests or refs pointing at missing objects).
    pub problems: Vec<String>,
    /// Traces of writers in flight or killed, one line each: staging files of unfinished writes,
    /// leases of pushes and locks of gcs. Not problems: `gc` sweeps them once they are old.
    pub leftovers: Vec<String>,
}

/// What [`Store::gc`] did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct GcReport {
    /// Objects (blobs and manifests) removed.
    pub removed: usize,
    /// Bytes freed (objects and staging files).
    pub freed: u64,
    /// Unreachable objects kept because they are younger than the grace period.
    pub young: usize,
    /// Unreachable objects kept because a push in flight holds a lease on them.
    pub leased: usize,
    /// Staging files of unfinished writes removed.
    pub staging: usize,
    /// Expired leases and gc locks (of killed pushes and gcs) removed.
    pub expired: usize,
}

/// A reference to an adapter in a pull: `name@REQ` where REQ is an exact version (`1.2.0`), a
/// requirement (`^1.2`, `>=1, <2`, `*`) or a tag (`prod`); a bare `name` means `name@*`.
#[derive(Debug, Clone, PartialEq)]
pub enum Selector {
    /// Exactly this version.
    Exact(Version),
    /// The highest version matching.
    Req(VersionReq),
    /// The version a tag points at.
    Tag(String),
}

/// Checks an adapter name: lowercase letters, digits, `.`, `_`, `-`, starting with a letter or
/// digit (it becomes part of object keys).
pub fn check_name(name: &str) -> Result<()> {
    let ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
        && name.len() <= 128;
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadName(format!(
            "bad adapter name '{name}' (lowercase letters, digits, '.', '_', '-'; at most 128)"
        )))
    }
}

/// Checks a tag name: a lowercase letter, then letters, digits, `_`, `-`; and not something
/// [`parse_selector`] reads as a version or requirement first (`x` is the requirement `*`), which
/// could never select the tag.
pub fn check_tag(tag: &str) -> Result<()> {
    let ok = tag.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && tag
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-".contains(c))
        && tag.len() <= 128;
    if !ok {
        return Err(StoreError::BadName(format!(
            "bad tag '{tag}' (a lowercase letter, then letters, digits, '_', '-'; at most 128)"
        )));
    }
    if Version::parse(tag).is_ok() || VersionReq::parse(tag).is_ok() {
        return Err(StoreError::BadName(format!(
            "bad tag '{tag}': it reads as a version requirement, so NAME@{tag} would never \
             select the tag"
        )));
    }
    Ok(())
}

/// Whether `s` is a digest as [`digest`] writes it (64 lowercase hex digits).
pub(crate) fn is_digest(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Splits `name@version` (exact semantic version) for a push.
pub fn parse_versioned(s: &str) -> Result<(String, Version)> {
    let (name, version) = s.split_once('@').ok_or_else(|| {
        StoreError::BadName(format!("'{s}' needs a version: NAME@MAJOR.MINOR.PATCH"))
    })?;
    check_name(name)?;
    let version = Version::parse(version).map_err(|e| {
        StoreError::BadName(format!(
            "bad version '{version}' in '{s}': {e} (expected e.g. 1.2.0)"
        ))
    })?;
    Ok((name.to_string(), version))
}

/// Splits `name[@selector]` for a pull.
pub fn parse_selector(s: &str) -> Result<(String, Selector)> {
    let (name, sel) = s.split_once('@').unwrap_or((s, "*"));
    check_name(name)?;
    let sel = if let Ok(v) = Version::parse(sel) {
        Selector::Exact(v)
    } else if let Ok(r) = VersionReq::parse(sel) {
        Selector::Req(r)
    } else if check_tag(sel).is_ok() {
        Selector::Tag(sel.to_string())
    } else {
        return Err(StoreError::BadName(format!(
            "bad version requirement '{sel}' in '{s}' (e.g. 1.2.0, ^1.2, >=1.0, <2, or a tag)"
        )));
    };
    Ok((name.to_string(), sel))
}

/// How long a lease or gc lock lives without being renewed, by default: a push or gc that has
/// not renewed its own for this long is taken for dead (see [`lease`]).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(300);

/// The adapter store.
pub struct Store {
    objects: Objects,
    location: String,
    /// See [`Store::with_lease_ttl`].
    pub(crate) lease_ttl: Duration,
    /// Added to the clock when judging ages (tests).
    clock_ahead: Duration,
    fault: Fault,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.location)
    }
}

impl Store {
    /// Opens a store: `s3://bucket[/prefix]` (with the `s3` feature; credentials, region and
    /// `AWS_ENDPOINT_URL` from the usual AWS variables) or a local directory (created if needed).
    pub fn open(location: &str) -> Result<Store> {
        Store::open_with(location, &[])
    }

    /// [`Store::open`] with S3 settings that override the environment, named as object_store's
    /// `AmazonS3ConfigKey` parses them (`aws_endpoint`, `aws_access_key_id`, `aws_allow_http`, ...).
    /// A local store takes no settings.
    pub fn open_with(location: &str, s3_options: &[(&str, &str)]) -> Result<Store> {
        let objects = if let Some(rest) = location.strip_prefix("s3://") {
            open_s3(rest, s3_options, location)?
        } else if location.contains("://") {
            return Err(StoreError::BadName(format!(
                "unsupported store '{location}' (a directory or s3://bucket/prefix)"
            )));
        } else if let Some((key, _)) = s3_options.first() {
            return Err(StoreError::BadName(format!(
                "S3 setting '{key}' given for the local store '{location}'"
            )));
        } else {
            let dir = Path::new(location);
            local::ensure_dir(dir).map_err(|source| StoreError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
            Objects::local(dir)
        };
        Ok(Store {
            objects,
            location: location.to_string(),
            lease_ttl: DEFAULT_LEASE_TTL,
            clock_ahead: Duration::ZERO,
            fault: Fault::default(),
        })
    }

    /// Sets how long a lease or gc lock lives unrenewed ([`DEFAULT_LEASE_TTL`]). Every handle
    /// that pushes or collects on one store at the same time must use the same TTL, longer than
    /// twice the clock skew plus one request's latency; a push renews its lease every TTL/4, so
    /// a crashed push's objects are kept, and a crashed gc makes pushes wait, for at most a TTL.
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Store {
        self.lease_ttl = ttl;
        self
    }

    /// Judges ages as if the clock were `ahead` later (for tests of expiry).
    #[doc(hidden)]
    pub fn with_clock_ahead(mut self, ahead: Duration) -> Store {
        self.clock_ahead = ahead;
        self
    }

    /// Makes this handle "crash" at its `n`-th write or delete (0-based): a local write leaves
    /// its staging file unpublished, nothing is cleaned up, and every later operation fails with
    /// [`StoreError::Aborted`] (for tests of killed pushes).
    #[doc(hidden)]
    pub fn crash_at_mutation(mut self, n: usize) -> Store {
        self.fault = Fault::at(n);
        self
    }

    /// Skips fsync on a local store: writes stay atomic and ordered for other processes, but
    /// not durable across a power loss. Only for tests that race many tiny pushes, where fsync
    /// latency (30x higher on a busy disk) would set the pace.
    #[doc(hidden)]
    pub fn without_fsync(mut self) -> Store {
        match &mut self.objects {
            Objects::Local(l) => l.fsync = false,
            #[cfg(feature = "s3")]
            Objects::S3(_) => {}
        }
        self
    }

    /// Where the store is.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Whether a lease or gc lock last written at `modified` is expired: older than the TTL plus
    /// a second, as S3 servers may stamp times to the second (erring towards "alive" is safe:
    /// gc keeps more, a push waits longer).
    pub(crate) fn expired(&self, modified: SystemTime) -> bool {
        self.age(modified) >= self.lease_ttl + Duration::from_secs(1)
    }

    /// How long ago `modified` was.
    pub(crate) fn age(&self, modified: SystemTime) -> Duration {
        (SystemTime::now() + self.clock_ahead)
            .duration_since(modified)
            .unwrap_or_default()
    }

    pub(crate) fn get_raw(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        self.objects.get(&self.fault, rel)
    }

    /// Writes `bytes` at `rel`; with `create`, fails with `Ok(false)` if it exists.
    pub(crate) fn put_raw(&self, rel: &str, bytes: Vec<u8>, create: bool) -> Result<bool> {
        self.objects.put(&self.fault, rel, bytes, create)
    }

    /// Every object under `rel/`.
    pub(crate) fn list_raw(&self, rel: &str) -> Result<Vec<Meta>> {
        self.objects.list(&self.fault, rel)
    }

    pub(crate) fn delete_raw(&self, rel: &str) -> Result<()> {
        self.objects.delete(&self.fault, rel, false)
    }

    /// Stores a content-addressed object once. A present one is seen with a HEAD and its bytes
    /// are not sent: that saves the upload, and some S3 servers (s3s-fs 0.14.1) answer a
    /// create-if-absent put of an existing object by closing the connection before reading the
    /// body, which the client sees as a broken pipe rather than "already exists". Within a push,
    /// the lease makes relying on a present object safe against gc.
    fn put_once(&self, rel: &str, bytes: impl FnOnce() -> Result<Vec<u8>>) -> Result<()> {
        if !self.objects.exists(&self.fault, rel)? {
            self.put_raw(rel, bytes()?, true)?;
        }
        Ok(())
    }

    /// Stores `bytes` as a blob (once: an existing blob is kept); returns its digest. Outside a
    /// push the blob holds no lease: gc may collect it once it is older than the grace period,
    /// unless a version references it by then.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<String> {
        let d = digest(bytes);
        self.put_once(&format!("blobs/{d}"), || Ok(bytes.to_vec()))?;
        Ok(d)
    }

    /// Reads the object `dir/digest` and checks its hash.
    fn get_verified(&self, dir: &str, d: &str) -> Result<Vec<u8>> {
        let rel = format!("{dir}/{d}");
        if !is_digest(d) {
            return Err(StoreError::Invalid(format!(
                "'{rel}' is not a BLAKE3 digest"
            )));
        }
        let bytes = self
            .get_raw(&rel)?
            .ok_or_else(|| StoreError::NotFound(format!("{rel} is missing from the store")))?;
        let actual = digest(&bytes);
        if actual != d {
            return Err(StoreError::Corrupt { key: rel, actual });
        }
        Ok(bytes)
    }

    /// Reads a blob, checking its hash.
    pub fn get_blob(&self, d: &str) -> Result<Vec<u8>> {
        self.get_verified("blobs", d)
    }

    /// Pushes the files of `dir` (recursively) as `name@version` with `meta`: blobs first, then
    /// the manifest, then the ref (refused if the version exists). `progress(k)` is called after
    /// the k-th blob; an error it returns aborts the push, leaving the store valid (the orphaned
    /// blobs are reachable by a later push of the same files, or collected by `gc`).
    ///
    /// The push holds a lease on every object it will reference from before it looks for them
    /// until its ref is written, so a concurrent `gc` keeps them (see [`lease`]); it waits while
    /// a gc that started before the lease and does not honour it is running.
    pub fn push(
        &self,
        name: &str,
        version: &Version,
        dir: &Path,
        base_digest: Option<String>,
        meta: Value,
        progress: &mut dyn FnMut(usize) -> Result<(), String>,
    ) -> Result<Manifest> {
        check_name(name)?;
        let exists = || StoreError::VersionExists {
            name: name.to_string(),
            version: version.clone(),
        };
        if self.get_raw(&ref_key(name, version))?.is_some() {
            return Err(exists());
        }
        // P1: every digest first (one file in memory at a time; uploads read them again).
        let sources = walk(dir)?;
        let mut files = Vec::with_capacity(sources.len());
        for (path, rel) in &sources {
            let bytes = read(path)?;
            files.push(FileEntry {
                path: rel.clone(),
                digest: digest(&bytes),
                size: bytes.len() as u64,
            });
        }
        if files.is_empty() {
            return Err(StoreError::Invalid(format!(
                "{} holds no files to push",
                dir.display()
            )));
        }
        let manifest = Manifest {
            name: name.to_string(),
            version: version.to_string(),
            base_digest,
            files,
            meta,
        };
        let text =
            serde_json::to_vec_pretty(&manifest).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let md = digest(&text);
        let mut objects: Vec<String> = manifest
            .files
            .iter()
            .map(|f| format!("blobs/{}", f.digest))
            .collect();
        objects.push(format!("manifests/{md}"));
        objects.sort();
        objects.dedup();

        let mut lease = Lease::acquire(self, &format!("{name}@{version}"), objects)?;
        let result = self.push_leased(
            &mut lease, name, version, &sources, &manifest, text, &md, progress,
        );
        lease.release();
        result.map(|()| manifest)
    }

    /// P4 of [`lease`]: the blobs, the manifest and the ref, each step under the lease.
    #[allow(clippy::too_many_arguments)]
    fn push_leased(
        &self,
        lease: &mut Lease<'_>,
        name: &str,
        version: &Version,
        sources: &[(PathBuf, String)],
        manifest: &Manifest,
        text: Vec<u8>,
        md: &str,
        progress: &mut dyn FnMut(usize) -> Result<(), String>,
    ) -> Result<()> {
        let exists = || StoreError::VersionExists {
            name: name.to_string(),
            version: version.clone(),
        };
        let n = manifest.files.len();
        let mut reported = 0;
        let mut step = 0;
        loop {
            if lease.hold()? {
                // The lease may have looked expired: check everything again.
                step = 0;
                continue;
            }
            if step < n {
                let (f, (path, _)) = (&manifest.files[step], &sources[step]);
                self.put_once(&format!("blobs/{}", f.digest), || {
                    let bytes = read(path)?;
                    if digest(&bytes) != f.digest {
                        return Err(StoreError::Invalid(format!(
                            "{} changed during the push",
                            path.display()
                        )));
                    }
                    Ok(bytes)
                })?;
                if step + 1 > reported {
                    reported = step + 1;
                    progress(reported).map_err(StoreError::Aborted)?;
                }
            } else if step == n {
                self.put_once(&format!("manifests/{md}"), || Ok(text.clone()))?;
            } else {
                if !self.put_raw(&ref_key(name, version), md.as_bytes().to_vec(), true)? {
                    return Err(exists());
                }
                break;
            }
            step += 1;
        }
        // Read the ref back: on a server whose create-if-absent is check-then-write rather than
        // atomic (s3s-fs 0.14.1), a racing push can overwrite ours after our put succeeded. The
        // one whose digest stayed wins; this narrows that window but cannot close it, which
        // only an atomic conditional put (local files, AWS S3) does.
        let stored = self.get_raw(&ref_key(name, version))?.unwrap_or_default();
        if String::from_utf8_lossy(&stored).trim() != md {
            return Err(exists());
        }
        Ok(())
    }

    /// Versions of `name`, ascending.
    pub fn versions(&self, name: &str) -> Result<Vec<Version>> {
        check_name(name)?;
        let mut v: Vec<Version> = self
            .list_raw(&format!("refs/{name}"))?
            .into_iter()
            .filter_map(|m| Version::parse(m.rel.rsplit('/').next()?).ok())
            .collect();
        v.sort();
        Ok(v)
    }

    /// The version `sel` picks for `name`.
    pub fn resolve(&self, name: &str, sel: &Selector) -> Result<Version> {
        let versions = self.versions(name)?;
        if versions.is_empty() {
            return Err(StoreError::NotFound(format!(
                "no adapter '{name}' in the store"
            )));
        }
        let found =
            match sel {
                Selector::Exact(v) => versions.iter().find(|x| *x == v).cloned(),
                Selector::Req(r) => versions.iter().rev().find(|x| r.matches(x)).cloned(),
                Selector::Tag(t) => {
                    let bytes = self
                        .get_raw(&format!("tags/{name}/{t}"))?
                        .ok_or_else(|| StoreError::NotFound(format!("{name} has no tag '{t}'")))?;
                    let text = String::from_utf8_lossy(&bytes);
                    Some(Version::parse(text.trim()).map_err(|e| {
                        StoreError::Invalid(format!("tag {name}@{t} is corrupt: {e}"))
                    })?)
                }
            };
        found.ok_or_else(|| {
            let all: Vec<String> = versions.iter().map(Version::to_string).collect();
            StoreError::NotFound(format!(
                "no version of '{name}' satisfies {} (have {})",
                match sel {
                    Selector::Exact(v) => v.to_string(),
                    Selector::Req(r) => r.to_string(),
                    Selector::Tag(t) => t.clone(),
                },
                all.join(", ")
            ))
        })
    }

    /// The manifest of `name@version` (ref and manifest hashes checked).
    pub fn manifest(&self, name: &str, version: &Version) -> Result<(String, Manifest)> {
        let md = self
            .get_raw(&ref_key(name, version))?
            .ok_or_else(|| StoreError::NotFound(format!("{name}@{version} is not in the store")))?;
        let md = String::from_utf8_lossy(&md).trim().to_string();
        let text = self.get_verified("manifests", &md)?;
        let m: Manifest = serde_json::from_slice(&text)
            .map_err(|e| StoreError::Invalid(format!("manifest {md}: {e}")))?;
        Ok((md, m))
    }

    /// Reads `name` at `sel` into memory: its manifest and each file's bytes by path, every blob
    /// checked against its digest. Refused when the version was made for another base model than
    /// `base_digest`, when the manifest names an unsafe path, or when a file is larger than
    /// `max_file_bytes` (checked on the manifest's declared size before the blob is read, and on
    /// the blob itself). A server parses these bytes directly: nothing touches its disk.
    pub fn fetch(
        &self,
        name: &str,
        sel: &Selector,
        base_digest: Option<&str>,
        max_file_bytes: u64,
    ) -> Result<(Manifest, BTreeMap<String, Vec<u8>>)> {
        let version = self.resolve(name, sel)?;
        let (_, m) = self.manifest(name, &version)?;
        if let (Some(want), Some(have)) = (base_digest, m.base_digest.as_deref()) {
            if want != have {
                return Err(StoreError::Invalid(format!(
                    "{name}@{version} was made for base model {have}, not this one ({want})"
                )));
            }
        }
        let mut contents = BTreeMap::new();
        for f in &m.files {
            if f.path
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..")
            {
                return Err(StoreError::Invalid(format!(
                    "manifest of {name}@{version} names an unsafe path '{}'",
                    f.path
                )));
            }
            let too_big = |size: u64| {
                StoreError::Invalid(format!(
                    "{name}@{version}: '{}' has {size} bytes, more than the {max_file_bytes} accepted",
                    f.path
                ))
            };
            if f.size > max_file_bytes {
                return Err(too_big(f.size));
            }
            let bytes = self.get_blob(&f.digest)?;
            if bytes.len() as u64 > max_file_bytes {
                return Err(too_big(bytes.len() as u64));
            }
            contents.insert(f.path.clone(), bytes);
        }
        Ok((m, contents))
    }

    /// Writes `name` at `sel` into `dir` (see [`Store::fetch`]; no size cap): every blob is read
    /// and checked before the first file is written, and each file is staged under a unique
    /// name, fsynced, renamed and its directory fsynced.
    pub fn pull(
        &self,
        name: &str,
        sel: &Selector,
        dir: &Path,
        base_digest: Option<&str>,
    ) -> Result<Manifest> {
        let (m, contents) = self.fetch(name, sel, base_digest, u64::MAX)?;
        for (rel, bytes) in contents {
            let path = dir.join(&rel);
            local::write_atomic(&path, &bytes, local::Publish::Overwrite, true)
                .map_err(|source| StoreError::Io { path, source })?;
        }
        Ok(m)
    }

    /// Points `name@tag` at an existing version (moving the tag if it exists).
    pub fn tag(&self, name: &str, version: &Version, tag: &str) -> Result<()> {
        check_name(name)?;
        check_tag(tag)?;
        self.manifest(name, version)?;
        self.put_raw(
            &format!("tags/{name}/{tag}"),
            version.to_string().into_bytes(),
            false,
        )?;
        Ok(())
    }

    /// Removes `name@version` (its ref and the tags on it); blobs stay until `gc`.
    pub fn remove(&self, name: &str, version: &Version) -> Result<()> {
        self.manifest(name, version)?;
        for m in self.list_raw(&format!("tags/{name}"))? {
            if self
                .get_raw(&m.rel)?
                .is_some_and(|b| String::from_utf8_lossy(&b).trim() == version.to_string())
            {
                self.delete_raw(&m.rel)?;
            }
        }
        self.delete_raw(&ref_key(name, version))
    }

    /// Every version in the store, with its tags.
    pub fn list(&self) -> Result<Vec<Listing>> {
        let mut tags: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for Meta { rel, .. } in self.list_raw("tags")? {
            let parts: Vec<&str> = rel.split('/').collect();
            if let [_, name, tag] = parts[..] {
                if let Some(v) = self.get_raw(&rel)? {
                    let v = String::from_utf8_lossy(&v).trim().to_string();
                    tags.entry((name.to_string(), v))
                        .or_default()
                        .push(tag.to_string());
                }
            }
        }
        let mut out = Vec::new();
        for Meta { rel, .. } in self.list_raw("refs")? {
            let parts: Vec<&str> = rel.split('/').collect();
            let [_, name, version] = parts[..] else {
                continue;
            };
            let Ok(version) = Version::parse(version) else {
                continue;
            };
            let (md, m) = self.manifest(name, &version)?;
            out.push(Listing {
                name: name.to_string(),
                tags: tags
                    .remove(&(name.to_string(), version.to_string()))
                    .unwrap_or_default(),
                version,
                manifest: md,
                bytes: m.bytes(),
            });
        }
        out.sort_by(|a, b| (&a.name, &a.version).cmp(&(&b.name, &b.version)));
        Ok(out)
    }

    /// `(bytes all versions reference, bytes of distinct blobs)`: the dedup saving.
    pub fn usage(&self) -> Result<(u64, u64)> {
        let logical = self.list()?.iter().map(|l| l.bytes).sum();
        let physical = self.list_raw("blobs")?.iter().map(|m| m.size).sum();
        Ok((logical, physical))
    }

    /// Digests of the manifests and blobs every ref reaches.
    fn reachable(&self, problems: &mut Vec<String>) -> Result<BTreeSet<String>> {
        let mut keep = BTreeSet::new();
        for Meta { rel, .. } in self.list_raw("refs")? {
            let Some(md) = self.get_raw(&rel)? else {
                continue;
            };
            let md = String::from_utf8_lossy(&md).trim().to_string();
            keep.insert(format!("manifests/{md}"));
            match self.get_verified("manifests", &md) {
                Ok(text) => match serde_json::from_slice::<Manifest>(&text) {
                    Ok(m) => keep.extend(m.files.iter().map(|f| format!("blobs/{}", f.digest))),
                    Err(e) => problems.push(format!("{rel}: manifest {md} is malformed: {e}")),
                },
                Err(e) => problems.push(format!("{rel}: {e}")),
            }
        }
        Ok(keep)
    }

    /// Re-hashes every blob and manifest, checks that every ref reaches existing objects, and
    /// lists staging files, leases and gc locks as leftovers.
    pub fn verify(&self) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let reachable = self.reachable(&mut report.problems)?;
        let mut present = BTreeSet::new();
        for dir in ["blobs", "manifests"] {
            for m in self.list_raw(dir)? {
                let name = m.rel.rsplit('/').next().unwrap_or_default().to_string();
                report.checked += 1;
                match self.get_verified(dir, &name) {
                    Ok(_) => {}
                    Err(e) => report.problems.push(e.to_string()),
                }
                present.insert(m.rel);
            }
        }
        for missing in reachable.difference(&present) {
            report
                .problems
                .push(format!("{missing} is referenced but missing"));
        }
        for m in self.objects.staging(&self.fault)? {
            report.leftovers.push(format!(
                "staging file {} ({} bytes, {} s old): an unfinished write; gc removes it",
                m.rel,
                m.size,
                self.age(m.modified).as_secs()
            ));
        }
        for (dir, what) in [(LEASES, "lease of a push"), (GC_LOCKS, "lock of a gc")] {
            for m in self.list_raw(dir)? {
                let age = self.age(m.modified);
                let state = if self.expired(m.modified) {
                    "expired: its owner died; gc removes it"
                } else {
                    "in flight"
                };
                report.leftovers.push(format!(
                    "{what} {} ({} s old, {state})",
                    m.rel,
                    age.as_secs()
                ));
            }
        }
        Ok(report)
    }

    /// Removes blobs and manifests that no ref reaches, no push in flight has leased and that
    /// are older than `grace`; then staging files of unfinished writes older than `grace`
    /// (those of leased objects are kept; others outside `blobs/` and `manifests/` are kept for
    /// a lease TTL too, as they may be a live ref, tag or lease write), and expired leases and
    /// gc locks. Runs the gc side of the protocol in [`lease`], so it never deletes an object a
    /// concurrent push relies on.
    pub fn gc(&self, grace: Duration) -> Result<GcReport> {
        let mut lock = GcLock::acquire(self)?;
        let result = self.gc_locked(&mut lock, grace);
        lock.release();
        result
    }

    fn gc_locked(&self, lock: &mut GcLock<'_>, grace: Duration) -> Result<GcReport> {
        // G2-G3 before G4: a lease that is gone by the time it is read belongs to a push that
        // wrote its ref first.
        let leased = lock.read_leases()?;
        let mut problems = Vec::new();
        let keep = self.reachable(&mut problems)?;
        if !problems.is_empty() {
            return Err(StoreError::Invalid(format!(
                "gc refused: the store has problems (run verify): {}",
                problems.join("; ")
            )));
        }
        let mut report = GcReport::default();
        for dir in ["blobs", "manifests"] {
            for m in self.list_raw(dir)? {
                if keep.contains(&m.rel) {
                    continue;
                }
                if leased.objects.contains(&m.rel) {
                    report.leased += 1;
                    continue;
                }
                if self.age(m.modified) < grace {
                    report.young += 1;
                    continue;
                }
                lock.hold()?;
                self.delete_raw(&m.rel)?;
                report.removed += 1;
                report.freed += m.size;
            }
        }
        for m in self.objects.staging(&self.fault)? {
            let (dir, file) = m.rel.rsplit_once('/').unwrap_or(("", &m.rel));
            let target = format!("{dir}/{}", local::staging_target(file).unwrap_or_default());
            let content = dir == "blobs" || dir == "manifests";
            let min_age = if content {
                grace
            } else {
                grace.max(self.lease_ttl)
            };
            if leased.objects.contains(&target) || self.age(m.modified) < min_age {
                continue;
            }
            lock.hold()?;
            self.objects.delete(&self.fault, &m.rel, true)?;
            report.staging += 1;
            report.freed += m.size;
        }
        for rel in &leased.expired {
            self.delete_raw(rel)?;
            report.expired += 1;
        }
        for m in self.list_raw(GC_LOCKS)? {
            if !lock.is(&m.rel) && self.expired(m.modified) {
                self.delete_raw(&m.rel)?;
                report.expired += 1;
            }
        }
        Ok(report)
    }
}

fn ref_key(name: &str, version: &Version) -> String {
    format!("refs/{name}/{version}")
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Files under `dir`, recursively, in byte order of their relative paths (`/`-separated).
fn walk(dir: &Path) -> Result<Vec<(PathBuf, String)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|source| StoreError::Io {
            path: d.clone(),
            source,
        })?;
        for e in entries {
            let e = e.map_err(|source| StoreError::Io {
                path: d.clone(),
                source,
            })?;
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path
                    .strip_prefix(dir)
                    .map_err(|_| StoreError::Invalid(format!("{} escapes", path.display())))?
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                out.push((path, rel));
            }
        }
    }
    out.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(out)
}

#[cfg(feature = "s3")]
fn open_s3(rest: &str, options: &[(&str, &str)], location: &str) -> Result<Objects> {
    use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
    use object_store::path::Path as Key;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(StoreError::BadName("s3:// needs a bucket".into()));
    }
    // Few, quick retries: a server must answer "store unreachable" in about a second, not after
    // object_store's default of 10 retries over up to 3 minutes.
    let retry = object_store::RetryConfig {
        max_retries: 3,
        retry_timeout: std::time::Duration::from_secs(15),
        ..Default::default()
    };
    let mut b = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_retry(retry);
    for (key, value) in options {
        let key: AmazonS3ConfigKey = key
            .parse()
            .map_err(|_| StoreError::BadName(format!("unknown S3 setting '{key}'")))?;
        b = b.with_config(key, *value);
    }
    // A plain-http endpoint (a local S3-compatible server) needs no separate AWS_ALLOW_HTTP.
    if let Some(endpoint) = b.get_config_value(&AmazonS3ConfigKey::Endpoint) {
        if endpoint.starts_with("http://") {
            b = b.with_allow_http(true);
        }
    }
    let s3 = b.build()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| StoreError::Io {
            path: PathBuf::from(location),
            source,
        })?;
    Ok(Objects::S3(objects::s3::Bucket {
        store: std::sync::Arc::new(s3),
        root: Key::from(prefix),
        rt,
    }))
}

#[cfg(not(feature = "s3"))]
fn open_s3(_: &str, _: &[(&str, &str)], _: &str) -> Result<Objects> {
    Err(StoreError::BadName(
        "this build has no S3 support (build s2lc with --features s3)".into(),
    ))
}
