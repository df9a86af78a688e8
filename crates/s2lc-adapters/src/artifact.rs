//! An artifact (a pack directory, as pulled from an Adapter Store) read as untrusted input.
//!
//! Whoever can push to a store controls every byte of what the server later reads: the names in
//! `pack.json`, the sizes and counts in each file's header, the frequency tables of its coded
//! streams. So a reader
//! - opens only names it has checked to be plain file names of the artifact ([`check_file_name`]:
//!   no separators, no `..`, no absolute paths), and only regular files, read no further than a
//!   cap ([`s2lc_model::lora::read_artifact_file`]);
//! - checks every declared size against the bytes actually present and against
//!   [`AdapterLimits`] (derived from the base model's shapes where there is one) before it
//!   allocates for it;
//! - names files in errors relative to the artifact, never by a path of the machine reading it.

use std::collections::BTreeMap;
use std::io::{Error, ErrorKind};
use std::path::Path;

use s2lc_model::lora::read_artifact_file;
pub use s2lc_model::lora::AdapterLimits;

/// The files of an artifact, by name relative to it.
pub trait ArtifactFiles {
    /// The bytes of the file `name` (a path inside the artifact whose parts passed
    /// [`check_file_name`]), refused if it is longer than `max_bytes`.
    fn read(&self, name: &str, max_bytes: u64) -> std::io::Result<Vec<u8>>;
}

/// The files of a directory.
#[derive(Debug, Clone, Copy)]
pub struct DirFiles<'a>(pub &'a Path);

impl ArtifactFiles for DirFiles<'_> {
    fn read(&self, name: &str, max_bytes: u64) -> std::io::Result<Vec<u8>> {
        if let Some(bad) = name.split('/').find_map(|p| check_file_name(p).err()) {
            return Err(Error::new(ErrorKind::InvalidInput, bad));
        }
        read_artifact_file(&self.0.join(name), max_bytes)
    }
}

/// Files held in memory (tests, fuzzing, a pull not yet written out).
impl ArtifactFiles for BTreeMap<String, Vec<u8>> {
    fn read(&self, name: &str, max_bytes: u64) -> std::io::Result<Vec<u8>> {
        let bytes = self
            .get(name)
            .ok_or_else(|| Error::new(ErrorKind::NotFound, "no such file in the artifact"))?;
        if bytes.len() as u64 > max_bytes {
            return Err(Error::new(
                ErrorKind::InvalidData,
                format!("{} bytes, more than the {max_bytes} accepted", bytes.len()),
            ));
        }
        Ok(bytes.clone())
    }
}

/// Longest file name accepted (the usual file-system limit).
const MAX_NAME: usize = 255;

/// Checks that `name` is a plain file name: letters, digits, `.`, `_` or `-`, not starting with
/// `.` (so neither `..` nor a hidden file), at most 255 bytes, so it cannot leave the artifact.
pub fn check_file_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{}' is not a plain file name (letters, digits, '.', '_' or '-', not starting with '.')",
            name.escape_debug()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_pass() {
        for ok in ["basis.safetensors", "m-1_a.safetensors", "x"] {
            assert!(check_file_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "../../../../etc/hostname",
            "/dev/zero",
            "a/b",
            "a\\b",
            "a\0b",
            "C:x",
            "naïve",
            &"a".repeat(256),
        ] {
            assert!(check_file_name(bad).is_err(), "{bad:?}");
        }
        let dir = DirFiles(Path::new("/"));
        for bad in ["../etc/hostname", "dev/../etc/hostname", "/etc/hostname"] {
            let err = dir.read(bad, 1 << 20).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{bad}: {err}");
        }
    }
}
