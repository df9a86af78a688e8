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

mod error;
pub mod lease;
mod local;
#[cfg(feature = "s3")]
pub mod loopback;
mod maintenance;
mod manifest;
mod names;
mod objects;
mod raw;
mod read;
mod write;

use std::path::Path;
use std::time::{Duration, SystemTime};

pub(crate) use crate::error::Result;
pub use crate::error::StoreError;
pub use crate::maintenance::{GcReport, VerifyReport};
pub(crate) use crate::manifest::is_digest;
pub use crate::manifest::{digest, FileEntry, Listing, Manifest};
pub use crate::names::{check_name, check_tag, parse_selector, parse_versioned, Selector};
use crate::objects::{Fault, Objects};

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
}

#[cfg(feature = "s3")]
fn open_s3(rest: &str, options: &[(&str, &str)], location: &str) -> Result<Objects> {
    use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
    use object_store::path::Path as Key;
    use std::path::PathBuf;
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
