//! Crash-safe file writes: the workspace's one way to replace a file (the store's local backend
//! adds link-once publishing on top of the same steps, `s2lc_store::local`).
//!
//! A write goes to a uniquely named temporary file beside the target (two writers never share
//! one), which is fsynced, renamed over the target (atomic on POSIX file systems), and then the
//! directory is fsynced so the rename itself survives a crash. A reader sees the old file or the
//! new one, never a half-written one; a failed write removes its temporary file.

use std::collections::hash_map::RandomState;
use std::fs::File;
use std::hash::BuildHasher;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::ModelError;

/// A temporary path beside `path`, unique across threads and processes:
/// `.tmp-<pid>-<counter>-<random>-<name>`: hidden, so listings of the directory skip it, and
/// ending in the target's own name, so a writer that picks its format by the extension (an
/// image encoder) sees the right one.
fn temp_sibling(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // std's RandomState keys are drawn from the OS per process.
    let random = RandomState::new().hash_one(n);
    let name = path
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(
        ".tmp-{}-{n}-{random:016x}-{name}",
        std::process::id()
    ))
}

/// Fsyncs a directory so entries just renamed into it are durable (a no-op off Unix, where a
/// directory cannot be opened as a file).
fn fsync_dir(dir: &Path) -> std::io::Result<()> {
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

/// Creates `path` (or replaces it) with whatever `fill` writes to the temporary path it is given,
/// crash-safely (see the module comment). Missing parent directories are created. `fill` may
/// create the file itself (a plotting or serializing library that takes a path); it is fsynced
/// after `fill` returns. `fill`'s error comes back as it is; I/O errors of the steps around it
/// as [`ModelError::Io`] converted into `E`.
pub fn write_atomic_with<E: From<ModelError>>(
    path: &Path,
    fill: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let tmp = temp_sibling(path);
    let written = fill(&tmp).and_then(|()| {
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| ModelError::io(path, e).into())
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    fsync_dir(dir).map_err(|e| ModelError::io(dir, e).into())
}

/// Creates `path` (or replaces it) with `bytes`, crash-safely (see the module comment).
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    write_atomic_with(path, |tmp| {
        File::create_new(tmp)
            .and_then(|mut f| f.write_all(bytes))
            .map_err(|e| ModelError::io(path, e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("s2lc-atomic-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn replaces_and_leaves_no_temporary_file() {
        let dir = scratch("replace");
        let path = dir.join("sub/out.json");
        write_file_atomic(&path, b"first").unwrap();
        write_file_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(dir.join("sub")).unwrap().collect();
        assert_eq!(names.len(), 1, "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_fill_keeps_the_old_file_and_cleans_up() {
        let dir = scratch("fail");
        let path = dir.join("out.bin");
        write_file_atomic(&path, b"old").unwrap();
        let err = write_atomic_with(&path, |tmp| {
            std::fs::write(tmp, b"half").map_err(|e| ModelError::io(&path, e))?;
            Err(ModelError::io(
                &path,
                std::io::Error::other("the encoder failed"),
            ))
        })
        .unwrap_err();
        let cause = std::error::Error::source(&err).map(|e| e.to_string());
        assert_eq!(cause.as_deref(), Some("the encoder failed"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn temporary_names_are_unique() {
        let p = Path::new("/x/out.json");
        assert_ne!(temp_sibling(p), temp_sibling(p));
        assert_eq!(temp_sibling(p).parent(), p.parent());
        assert_eq!(temp_sibling(p).extension(), p.extension());
    }
}
