//! The read side: versions and their resolution, manifests, fetching a version into memory or
//! pulling it into a directory, and listings with usage.

use std::collections::BTreeMap;
use std::path::Path;

use semver::Version;

use crate::local::{self, Meta};
use crate::raw::ref_key;
use crate::{check_name, Listing, Manifest, Result, Selector, Store, StoreError};

impl Store {
    /// Reads a blob, checking its hash.
    pub fn get_blob(&self, d: &str) -> Result<Vec<u8>> {
        self.get_verified("blobs", d)
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

    /// Reads `name@version` into memory: its manifest and each file's bytes by path, every blob
    /// checked against its digest. Refused when the version was made for another base model than
    /// `base_digest`, when the manifest names an unsafe path, or when a file is larger than
    /// `max_file_bytes` (checked on the manifest's declared size before the blob is read, and on
    /// the blob itself). A server parses these bytes directly: nothing touches its disk.
    /// The version is exact (a caller holding a requirement resolves it first), so a fetch
    /// reads the ref and manifest and lists nothing.
    pub fn fetch(
        &self,
        name: &str,
        version: &Version,
        base_digest: Option<&str>,
        max_file_bytes: u64,
    ) -> Result<(Manifest, BTreeMap<String, Vec<u8>>)> {
        let (_, m) = self.manifest(name, version)?;
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

    /// Writes `name` at `sel` into `dir` (resolved, then [`Store::fetch`]; no size cap): every
    /// blob is read and checked before the first file is written, and each file is staged under
    /// a unique name, fsynced, renamed and its directory fsynced.
    pub fn pull(
        &self,
        name: &str,
        sel: &Selector,
        dir: &Path,
        base_digest: Option<&str>,
    ) -> Result<Manifest> {
        let version = self.resolve(name, sel)?;
        let (m, contents) = self.fetch(name, &version, base_digest, u64::MAX)?;
        for (rel, bytes) in contents {
            let path = dir.join(&rel);
            local::write_atomic(&path, &bytes, local::Publish::Overwrite, true)
                .map_err(|source| StoreError::Io { path, source })?;
        }
        Ok(m)
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
}
