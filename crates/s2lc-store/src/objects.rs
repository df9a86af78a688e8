//! The few operations the store needs from a backend — get, exists, put (create-if-absent or
//! overwrite), list with modification times, delete — on a local directory ([`crate::local`]) or,
//! with the `s3` feature, an S3-compatible bucket through object_store. Also the fault injection
//! the crash tests use: a handle that "dies" at its n-th write or delete.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::local::{LocalDir, Meta, Publish};
use crate::{Result, StoreError};

/// Where a store's objects are.
pub(crate) enum Objects {
    Local(LocalDir),
    #[cfg(feature = "s3")]
    S3(s3::Bucket),
}

/// A simulated crash: the `at`-th mutation (0-based) of this handle stops half way — a local
/// write leaves its staging file, unpublished — and every operation after it fails.
#[derive(Debug, Default)]
pub(crate) struct Fault {
    at: Option<usize>,
    done: AtomicUsize,
    dead: AtomicBool,
}

enum Step {
    Go,
    CrashNow,
}

impl Fault {
    pub fn at(n: usize) -> Fault {
        Fault {
            at: Some(n),
            ..Fault::default()
        }
    }

    fn alive(&self) -> Result<()> {
        if self.dead.load(Ordering::SeqCst) {
            Err(crashed())
        } else {
            Ok(())
        }
    }

    fn mutation(&self) -> Result<Step> {
        self.alive()?;
        let n = self.done.fetch_add(1, Ordering::SeqCst);
        if self.at == Some(n) {
            self.dead.store(true, Ordering::SeqCst);
            return Ok(Step::CrashNow);
        }
        Ok(Step::Go)
    }
}

fn crashed() -> StoreError {
    StoreError::Aborted("simulated crash".into())
}

impl Objects {
    pub fn local(dir: &Path) -> Objects {
        Objects::Local(LocalDir::new(dir))
    }

    fn io(&self, rel: &str, source: std::io::Error) -> StoreError {
        let path = match self {
            Objects::Local(l) => l.path(rel).unwrap_or_else(|_| rel.into()),
            #[cfg(feature = "s3")]
            Objects::S3(_) => rel.into(),
        };
        StoreError::Io { path, source }
    }

    pub fn get(&self, fault: &Fault, rel: &str) -> Result<Option<Vec<u8>>> {
        fault.alive()?;
        match self {
            Objects::Local(l) => l.get(rel).map_err(|e| self.io(rel, e)),
            #[cfg(feature = "s3")]
            Objects::S3(b) => b.get(rel),
        }
    }

    pub fn exists(&self, fault: &Fault, rel: &str) -> Result<bool> {
        fault.alive()?;
        match self {
            Objects::Local(l) => l.exists(rel).map_err(|e| self.io(rel, e)),
            #[cfg(feature = "s3")]
            Objects::S3(b) => b.exists(rel),
        }
    }

    /// Writes `rel`; with `create`, returns `false` (changing nothing) if it exists.
    pub fn put(&self, fault: &Fault, rel: &str, bytes: Vec<u8>, create: bool) -> Result<bool> {
        let step = fault.mutation()?;
        let publish = match (&step, create) {
            (Step::CrashNow, _) => Publish::Never,
            (Step::Go, true) => Publish::Create,
            (Step::Go, false) => Publish::Overwrite,
        };
        let done = match self {
            Objects::Local(l) => l.put(rel, &bytes, publish).map_err(|e| self.io(rel, e))?,
            #[cfg(feature = "s3")]
            // An S3 put is atomic: a crash before it completes leaves nothing.
            Objects::S3(_) if publish == Publish::Never => false,
            #[cfg(feature = "s3")]
            Objects::S3(b) => b.put(rel, bytes, create)?,
        };
        match step {
            Step::CrashNow => Err(crashed()),
            Step::Go => Ok(done),
        }
    }

    /// Deletes an object (absent is fine), or with `staging` a staging file listed by
    /// [`Objects::list`].
    pub fn delete(&self, fault: &Fault, rel: &str, staging: bool) -> Result<()> {
        if let Step::CrashNow = fault.mutation()? {
            return Err(crashed());
        }
        match self {
            Objects::Local(l) => l.delete(rel, staging).map_err(|e| self.io(rel, e)),
            #[cfg(feature = "s3")]
            Objects::S3(b) => b.delete(rel),
        }
    }

    /// Objects under `rel/`.
    pub fn list(&self, fault: &Fault, rel: &str) -> Result<Vec<Meta>> {
        fault.alive()?;
        match self {
            Objects::Local(l) => Ok(l.list(rel).map_err(|e| self.io(rel, e))?.0),
            #[cfg(feature = "s3")]
            Objects::S3(b) => b.list(rel),
        }
    }

    /// Staging files left by unfinished writes, anywhere in the store (local only: an S3 put
    /// is atomic and leaves none).
    pub fn staging(&self, fault: &Fault) -> Result<Vec<Meta>> {
        fault.alive()?;
        match self {
            Objects::Local(l) => Ok(l.list("").map_err(|e| self.io("", e))?.1),
            #[cfg(feature = "s3")]
            Objects::S3(_) => Ok(Vec::new()),
        }
    }
}

#[cfg(feature = "s3")]
pub(crate) mod s3 {
    //! An S3-compatible bucket through object_store.

    use std::sync::Arc;
    use std::time::{Duration, UNIX_EPOCH};

    use futures::TryStreamExt;
    use object_store::path::Path as Key;
    use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

    use crate::local::Meta;
    use crate::{Result, StoreError};

    pub(crate) struct Bucket {
        pub store: Arc<dyn ObjectStore>,
        /// Prefix of every key (the part of an `s3://bucket/prefix` URL after the bucket).
        pub root: Key,
        pub rt: tokio::runtime::Runtime,
    }

    impl Bucket {
        fn key(&self, rel: &str) -> Key {
            let mut parts: Vec<String> =
                self.root.parts().map(|p| p.as_ref().to_string()).collect();
            parts.extend(rel.split('/').map(str::to_string));
            Key::from_iter(parts)
        }

        /// `rel` of a listed key (its path below the root).
        fn rel(&self, key: &Key) -> String {
            let root: Vec<_> = self.root.parts().collect();
            key.parts()
                .skip(root.len())
                .map(|p| p.as_ref().to_string())
                .collect::<Vec<_>>()
                .join("/")
        }

        pub fn get(&self, rel: &str) -> Result<Option<Vec<u8>>> {
            let key = self.key(rel);
            self.rt.block_on(async {
                match self.store.get(&key).await {
                    Ok(r) => Ok(Some(r.bytes().await?.to_vec())),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e.into()),
                }
            })
        }

        pub fn exists(&self, rel: &str) -> Result<bool> {
            let key = self.key(rel);
            self.rt.block_on(async {
                match self.store.head(&key).await {
                    Ok(_) => Ok(true),
                    Err(object_store::Error::NotFound { .. }) => Ok(false),
                    Err(e) => Err(e.into()),
                }
            })
        }

        pub fn put(&self, rel: &str, bytes: Vec<u8>, create: bool) -> Result<bool> {
            let key = self.key(rel);
            let opts = PutOptions {
                mode: if create {
                    PutMode::Create
                } else {
                    PutMode::Overwrite
                },
                ..Default::default()
            };
            self.rt.block_on(async {
                match self
                    .store
                    .put_opts(&key, PutPayload::from(bytes), opts)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
                    Err(e) => Err(StoreError::from(e)),
                }
            })
        }

        pub fn delete(&self, rel: &str) -> Result<()> {
            let key = self.key(rel);
            self.rt.block_on(async {
                match self.store.delete(&key).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            })
        }

        pub fn list(&self, rel: &str) -> Result<Vec<Meta>> {
            let prefix = self.key(rel);
            let metas: Vec<_> = self
                .rt
                .block_on(self.store.list(Some(&prefix)).try_collect::<Vec<_>>())?;
            Ok(metas
                .into_iter()
                .map(|m| {
                    let ms = m.last_modified.timestamp_millis().max(0) as u64;
                    Meta {
                        rel: self.rel(&m.location),
                        size: m.size,
                        modified: UNIX_EPOCH + Duration::from_millis(ms),
                    }
                })
                .collect())
        }
    }
}
