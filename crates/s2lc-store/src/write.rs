//! The write side: blobs, pushes (their files hashed, then uploaded under a lease), tags and
//! removals.

use std::path::{Path, PathBuf};

use semver::Version;
use serde_json::Value;

use crate::lease::Lease;
use crate::raw::ref_key;
use crate::{check_name, check_tag, digest, FileEntry, Manifest, Result, Store, StoreError};

impl Store {
    /// Stores `bytes` as a blob (once: an existing blob is kept); returns its digest. Outside a
    /// push the blob holds no lease: gc may collect it once it is older than the grace period,
    /// unless a version references it by then.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<String> {
        let d = digest(bytes);
        self.put_once(&format!("blobs/{d}"), || Ok(bytes.to_vec()))?;
        Ok(d)
    }

    /// Pushes the files of `dir` (recursively) as `name@version` with `meta`: blobs first, then
    /// the manifest, then the ref (refused if the version exists). `progress(k)` is called after
    /// the k-th blob; an error it returns aborts the push, leaving the store valid (the orphaned
    /// blobs are reachable by a later push of the same files, or collected by `gc`).
    ///
    /// The push holds a lease on every object it will reference from before it looks for them
    /// until its ref is written, so a concurrent `gc` keeps them (see [`lease`](crate::lease));
    /// it waits while a gc that started before the lease and does not honour it is running.
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

    /// P4 of [`lease`](crate::lease): the blobs, the manifest and the ref, each step under the
    /// lease.
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
