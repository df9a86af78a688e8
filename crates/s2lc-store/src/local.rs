//! The local-directory backend: an object is the file `root/<key>`, written durably.
//!
//! A write goes to a staging file beside its destination, named uniquely and recognisably
//! ([`staging_name`]: `<name>~<pid>-<counter>-<random>.staging`), is fsynced, then published — by a
//! hard link for create-if-absent (atomic: exactly one of racing creators wins) or a rename for an
//! overwrite — and the directory is fsynced, so a write that returned is on disk under its name
//! and a crash leaves either nothing, the old object, or the whole new object plus at most a
//! staging file. Leases and gc locks are written the same way but not fsynced, nor are deletions
//! of garbage (see [`durable`]). `~` occurs in no object name (names, tags, versions, digests and lease ids are
//! checked), so listings skip staging files and `gc` can find and sweep them. The `<name>#<digits>`
//! staging files of object_store's local backend, which earlier versions of this store used, are
//! recognised as staging files too.

use std::collections::hash_map::RandomState;
use std::fs::{File, OpenOptions};
use std::hash::BuildHasher;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

/// A listed object or staging file: its key below the root, size and modification time.
#[derive(Debug, Clone)]
pub(crate) struct Meta {
    pub rel: String,
    pub size: u64,
    pub modified: SystemTime,
}

/// An id unique across processes and time: `<pid>-<counter>-<64 random bits>` (the random part
/// from std's per-process SipHash keys, seeded by the OS).
pub(crate) fn unique_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let random = RandomState::new().hash_one((n, nanos));
    format!("{}-{n}-{random:016x}", std::process::id())
}

/// The staging file name for a write of `name`.
pub(crate) fn staging_name(name: &str) -> String {
    format!("{name}~{}.staging", unique_id())
}

/// If `file_name` is a staging file, the name of the object it was writing.
pub(crate) fn staging_target(file_name: &str) -> Option<&str> {
    if let Some(t) = file_name
        .strip_suffix(".staging")
        .and_then(|s| s.split_once('~'))
    {
        return Some(t.0);
    }
    // object_store's LocalFileSystem: `<name>#<digits>`.
    let (name, n) = file_name.rsplit_once('#')?;
    (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then_some(name)
}

/// Fsyncs a directory so that entries just created, renamed or removed in it are durable (a
/// no-op where directories cannot be opened, i.e. off Unix).
pub(crate) fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Creates `dir` and missing ancestors, fsyncing the parent of each one created.
pub(crate) fn ensure_dir(dir: &Path) -> std::io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        ensure_dir(parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(e) => return Err(e),
    }
    match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => fsync_dir(p),
        _ => Ok(()),
    }
}

/// How a staged file is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Publish {
    /// Only if nothing is at the destination (hard link; atomic).
    Create,
    /// Replacing whatever is there (rename; atomic).
    Overwrite,
    /// Not at all: the staging file is left behind, as by a process killed before publishing
    /// (fault injection for tests).
    Never,
}

/// Writes `bytes` to `path` atomically — a uniquely named staging file beside it, then published —
/// and with `fsync` durably: the staging file fsynced before, the directory after publishing.
/// Returns `false` when `Publish::Create` found the destination taken (nothing is changed then).
pub(crate) fn write_atomic(
    path: &Path,
    bytes: &[u8],
    publish: Publish,
    fsync: bool,
) -> std::io::Result<bool> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| std::io::Error::new(ErrorKind::InvalidInput, "no UTF-8 file name"))?;
    ensure_dir(dir)?;
    let staging = dir.join(staging_name(name));
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&staging)?;
        f.write_all(bytes)?;
        if fsync {
            f.sync_all()?;
        }
        Ok(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&staging);
        return Err(e);
    }
    let published = match publish {
        Publish::Never => return Ok(false),
        Publish::Overwrite => std::fs::rename(&staging, path).map(|()| true),
        Publish::Create => {
            let linked = match std::fs::hard_link(&staging, path) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(e),
            };
            let _ = std::fs::remove_file(&staging);
            linked
        }
    };
    match published {
        Ok(true) if fsync => fsync_dir(dir).map(|()| true),
        Ok(true) => Ok(true),
        Ok(false) => Ok(false),
        Err(e) => {
            let _ = std::fs::remove_file(&staging);
            Err(e)
        }
    }
}

/// Whether a write (or with `delete`, a removal) of `rel` must survive a crash. Leases and gc
/// locks coordinate live processes and mean nothing once their writers are gone (an expired one
/// is swept), and a deleted blob or manifest that comes back is garbage the next gc removes
/// again: neither is fsynced. Everything else — objects, refs, tags, and the removal of a ref or
/// tag — is.
fn durable(rel: &str, delete: bool) -> bool {
    let top = rel.split('/').next().unwrap_or_default();
    match top {
        crate::lease::LEASES | crate::lease::GC_LOCKS => false,
        "blobs" | "manifests" => !delete,
        _ => true,
    }
}

/// A store's directory.
#[derive(Debug)]
pub(crate) struct LocalDir {
    root: PathBuf,
    /// False only in tests that race many small pushes and care about ordering, not crashes.
    pub fsync: bool,
}

impl LocalDir {
    pub fn new(root: &Path) -> LocalDir {
        LocalDir {
            root: root.to_path_buf(),
            fsync: true,
        }
    }

    /// The file of key `rel` (`/`-separated; each part a plain name; empty: the root).
    pub fn path(&self, rel: &str) -> std::io::Result<PathBuf> {
        let mut p = self.root.clone();
        for part in rel.split('/').filter(|_| !rel.is_empty()) {
            if part.is_empty()
                || part == "."
                || part == ".."
                || part.contains(['\\', '~', '#'])
                || part.contains(std::path::MAIN_SEPARATOR)
            {
                return Err(std::io::Error::new(
                    ErrorKind::InvalidInput,
                    format!("bad object key '{rel}'"),
                ));
            }
            p.push(part);
        }
        Ok(p)
    }

    pub fn get(&self, rel: &str) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.path(rel)?) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn exists(&self, rel: &str) -> std::io::Result<bool> {
        match std::fs::metadata(self.path(rel)?) {
            Ok(m) => Ok(m.is_file()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn put(&self, rel: &str, bytes: &[u8], publish: Publish) -> std::io::Result<bool> {
        let fsync = self.fsync && durable(rel, false);
        write_atomic(&self.path(rel)?, bytes, publish, fsync)
    }

    /// Removes an object or a staging file (absent is fine) and fsyncs its directory.
    pub fn delete(&self, rel: &str, staging: bool) -> std::io::Result<()> {
        let path = if staging {
            // A staging file's own name contains `~` or `#`: check the directory part only.
            let (dir, file) = rel.rsplit_once('/').unwrap_or(("", rel));
            if staging_target(file).is_none() || file.contains('/') {
                return Err(std::io::Error::new(
                    ErrorKind::InvalidInput,
                    format!("'{rel}' is not a staging file"),
                ));
            }
            let base = if dir.is_empty() {
                self.root.clone()
            } else {
                self.path(dir)?
            };
            base.join(file)
        } else {
            self.path(rel)?
        };
        match std::fs::remove_file(&path) {
            Ok(()) if self.fsync && !staging && durable(rel, true) => {
                fsync_dir(path.parent().unwrap_or(&self.root))
            }
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Objects and staging files under `rel/` (recursively), in that order.
    pub fn list(&self, rel: &str) -> std::io::Result<(Vec<Meta>, Vec<Meta>)> {
        let mut objects = Vec::new();
        let mut staging = Vec::new();
        let mut stack = vec![(self.path(rel)?, rel.to_string())];
        while let Some((dir, prefix)) = stack.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for e in entries {
                let e = e?;
                let Some(name) = e.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                let key = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}/{name}")
                };
                // Follows symlinks, as the object_store backend did; a file vanishing between
                // the listing and the stat (a concurrent delete) is skipped.
                let meta = match std::fs::metadata(e.path()) {
                    Ok(m) => m,
                    Err(err) if err.kind() == ErrorKind::NotFound => continue,
                    Err(err) => return Err(err),
                };
                if meta.is_dir() {
                    stack.push((e.path(), key));
                    continue;
                }
                let m = Meta {
                    rel: key,
                    size: meta.len(),
                    modified: meta.modified()?,
                };
                if staging_target(&name).is_some() {
                    staging.push(m);
                } else {
                    objects.push(m);
                }
            }
        }
        Ok((objects, staging))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_names_are_unique_and_recognised() {
        let a = staging_name("abc");
        let b = staging_name("abc");
        assert_ne!(a, b);
        assert_eq!(staging_target(&a), Some("abc"));
        assert_eq!(staging_target("abc#12"), Some("abc"));
        for plain in ["abc", "abc#x1", "1.0.0-rc.1", "abc.staging", "abc#"] {
            assert_eq!(staging_target(plain), None, "{plain}");
        }
    }

    #[test]
    fn durable_writes_publish_once_and_leave_no_staging() {
        let dir = std::env::temp_dir().join(format!("s2lc-store-local-{}", unique_id()));
        let path = dir.join("a/b/obj");
        assert!(write_atomic(&path, b"one", Publish::Create, true).unwrap());
        assert!(!write_atomic(&path, b"two", Publish::Create, true).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        assert!(write_atomic(&path, b"three", Publish::Overwrite, true).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"three");
        let names: Vec<_> = std::fs::read_dir(dir.join("a/b"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["obj"]);
        assert!(!write_atomic(&path, b"four", Publish::Never, true).unwrap());
        let store = LocalDir::new(&dir);
        let (objects, staging) = store.list("a").unwrap();
        assert_eq!(objects.len(), 1);
        assert_eq!(staging.len(), 1);
        assert_eq!(staging[0].size, 4);
        store.delete(&staging[0].rel, true).unwrap();
        assert!(store.list("a").unwrap().1.is_empty());
        assert!(store.path("a/../x").is_err() && store.path("a/x~1.staging").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
