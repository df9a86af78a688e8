//! Writing a pack: its files, then `pack.json` naming them.

use std::path::Path;

use serde_json::json;

use s2lc_model::source::write_file_atomic;

use crate::pack::files::{basis_file, member_file};
use crate::pack::{PackError, PackedMember, PackedSet};

use super::{check_name, FORMAT, FORMAT_CODED, FORMAT_MIXED};

/// Writes `set` into `dir` (created if needed). Every file goes through a temporary name, and
/// `pack.json` is written last, so a reader never sees a pack whose files are incomplete.
pub fn save(set: &PackedSet, dir: &Path) -> Result<(), PackError> {
    for m in &set.members {
        check_name(&m.name)?;
    }
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| PackError::Io { path: p, source }
    };
    std::fs::create_dir_all(dir.join("members")).map_err(io(dir))?;
    let basis = basis_file(set).serialize();
    write_file_atomic(&dir.join("basis.safetensors"), &basis)?;
    let mut members = Vec::new();
    for m in &set.members {
        let file = format!("members/{}.safetensors", m.name);
        let bytes = member_file(set, m).serialize();
        write_file_atomic(&dir.join(&file), &bytes)?;
        members.push(json!({"name": m.name, "file": file, "bytes": bytes.len()}));
    }
    let mixed = set
        .modules
        .values()
        .any(|m| m.u.groups.len() > 1 || m.v.groups.len() > 1);
    let format = if set.params.entropy {
        FORMAT_CODED
    } else if mixed {
        FORMAT_MIXED
    } else {
        FORMAT
    };
    let manifest = json!({
        "format": format,
        "params": set.params,
        "modules": set.modules.keys().collect::<Vec<_>>(),
        "basis_file": "basis.safetensors",
        "basis_bytes": basis.len(),
        "members": members,
    });
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| PackError::Format {
        path: dir.join("pack.json"),
        message: e.to_string(),
    })?;
    Ok(write_file_atomic(&dir.join("pack.json"), text.as_bytes())?)
}

/// Writes a pack holding only the member `name` (same bases, byte for byte: a content-addressed
/// store keeps them once however many members are pushed).
pub fn save_member(set: &PackedSet, name: &str, dir: &Path) -> Result<(), PackError> {
    let member = set.member(name)?.clone();
    let single = PackedSet {
        params: set.params,
        modules: set.modules.clone(),
        members: vec![member],
    };
    save(&single, dir)
}

/// Bytes of the bases file of `set`: the whole file, header included, as a store keeps it
/// ([`PackedSet::basis_bytes`]).
pub fn basis_bytes(set: &PackedSet) -> usize {
    set.basis_bytes()
}

/// Bytes of the file of member `m` of `set`, header included ([`PackedSet::member_bytes`]).
pub fn member_bytes(set: &PackedSet, m: &PackedMember) -> usize {
    set.member_bytes(m)
}
