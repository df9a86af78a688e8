//! Reading a pack: `pack.json` checked, then the files it names, each matrix fitted to the rest.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

use s2lc_model::lora::TARGETS;

use crate::artifact::{check_file_name, AdapterLimits, ArtifactFiles, DirFiles};
use crate::pack::files::prefix;
use crate::pack::{
    ModuleKey, PackError, PackParams, PackedCore, PackedMember, PackedModule, PackedSet,
};

use super::read::{Budget, Reader, MAX_BLOCK};
use super::{check_name, FORMAT, FORMAT_CODED, FORMAT_MIXED};

/// Largest `pack.json` read (a pack of hundreds of members and matrices takes some 100 KB).
const MAX_MANIFEST_BYTES: u64 = 1 << 24;

/// Reads a pack written by [`save`]; every matrix is checked for consistency. Sizes are checked
/// against [`AdapterLimits::GENEROUS`] only: a pack from untrusted storage is read with
/// [`load_with`] and the limits of the model it is for.
///
/// [`save`]: super::save
pub fn load(dir: &Path) -> Result<PackedSet, PackError> {
    load_with(dir, &AdapterLimits::GENEROUS)
}

/// Reads the pack in `dir` as untrusted input (see [`crate::artifact`]): only the files the
/// format names (`basis_file` a plain file name, each member's file
/// `members/NAME.safetensors`), each a regular file of the size `pack.json` declares; every
/// matrix within `limits`. Errors name files relative to the pack, never `dir`.
pub fn load_with(dir: &Path, limits: &AdapterLimits) -> Result<PackedSet, PackError> {
    load_files(&DirFiles(dir), limits)
}

/// [`load_with`] over any source of the pack's files.
pub fn load_files(
    files: &dyn ArtifactFiles,
    limits: &AdapterLimits,
) -> Result<PackedSet, PackError> {
    let fail = |message: String| PackError::Format {
        path: PathBuf::from("pack.json"),
        message,
    };
    // A file of the pack: its declared size (if `pack.json` gives one) is the most read, and
    // must be its size.
    let read = |name: &str, declared: &Value| -> Result<Vec<u8>, PackError> {
        let fail = |message: String| PackError::Format {
            path: PathBuf::from(name),
            message,
        };
        let declared = match declared {
            Value::Null => None,
            v => Some(
                v.as_u64()
                    .ok_or_else(|| fail(format!("declared size {v}")))?,
            ),
        };
        let cap = declared.map_or(limits.max_file_bytes, |d| d.min(limits.max_file_bytes));
        let bytes = files.read(name, cap).map_err(|e| fail(e.to_string()))?;
        match declared {
            Some(d) if d != bytes.len() as u64 => Err(fail(format!(
                "{} bytes, but pack.json declares {d}",
                bytes.len()
            ))),
            _ => Ok(bytes),
        }
    };
    let text = files
        .read("pack.json", MAX_MANIFEST_BYTES)
        .map_err(|e| fail(e.to_string()))?;
    let manifest: Value = serde_json::from_slice(&text).map_err(|e| fail(e.to_string()))?;
    drop(text);
    if ![FORMAT, FORMAT_MIXED, FORMAT_CODED]
        .iter()
        .any(|f| manifest["format"] == *f)
    {
        return Err(fail(format!(
            "format {} is not {FORMAT}, {FORMAT_MIXED} or {FORMAT_CODED}",
            manifest["format"]
        )));
    }
    let params: PackParams =
        serde_json::from_value(manifest["params"].clone()).map_err(|e| fail(e.to_string()))?;
    params
        .validate()
        .map_err(|e| fail(format!("params: {e}")))?;
    if params.block > MAX_BLOCK {
        return Err(fail(format!(
            "block size {} (at most {MAX_BLOCK})",
            params.block
        )));
    }
    let keys: Vec<ModuleKey> =
        serde_json::from_value(manifest["modules"].clone()).map_err(|e| fail(e.to_string()))?;
    let mut seen = HashSet::new();
    for key in &keys {
        if key.target >= TARGETS.len() || key.layer >= limits.max_layers {
            return Err(fail(format!(
                "module of layer {} target {} (at most {} layers, {} targets)",
                key.layer,
                key.target,
                limits.max_layers,
                TARGETS.len()
            )));
        }
        if !seen.insert(*key) {
            return Err(fail(format!("module {} listed twice", key.name())));
        }
    }
    let basis_name = manifest["basis_file"]
        .as_str()
        .ok_or_else(|| fail("no basis_file".into()))?;
    check_file_name(basis_name).map_err(|e| fail(format!("basis_file: {e}")))?;
    let members_list = manifest["members"]
        .as_array()
        .ok_or_else(|| fail("no members list".into()))?;
    // Every name is checked before any file is read.
    let mut member_files = Vec::with_capacity(members_list.len());
    let mut names = HashSet::new();
    for m in members_list {
        let name = m["name"]
            .as_str()
            .ok_or_else(|| fail("a member has no name".into()))?;
        check_name(name)?;
        if !names.insert(name) {
            return Err(fail(format!("member {name} listed twice")));
        }
        // The file is where `save` puts it, or nowhere: the name is never used as a path.
        let file = format!("members/{name}.safetensors");
        if m["file"].as_str() != Some(file.as_str()) {
            return Err(fail(format!(
                "member {name}: file {} is not {file}",
                m["file"]
            )));
        }
        member_files.push((name, file, &m["bytes"]));
    }
    let mut budget = Budget::new(limits, params.block);
    let basis_bytes = read(basis_name, &manifest["basis_bytes"])?;
    let mut basis = Reader::new(basis_name, &basis_bytes, &mut budget)?;
    drop(basis_bytes);
    let mut modules = BTreeMap::new();
    for key in &keys {
        let module = PackedModule {
            u: basis.get_basis(&prefix(key, "u"), limits.max_rank)?,
            v: basis.get_basis(&prefix(key, "v"), limits.max_rank)?,
        };
        modules.insert(*key, module);
    }
    let mut members = Vec::new();
    for (name, file, declared) in member_files {
        let bytes = read(&file, declared)?;
        let mut r = Reader::new(&file, &bytes, &mut budget)?;
        drop(bytes);
        let mut cores = BTreeMap::new();
        for key in &keys {
            let core_prefix = prefix(key, "core_b");
            if !r.has(&core_prefix) {
                continue;
            }
            let module = &modules[key];
            let (core_b, core_a) = (r.get(&core_prefix)?, r.get(&prefix(key, "core_a"))?);
            if core_b.rows != module.u.cols
                || core_a.cols != module.v.cols
                || core_b.cols != core_a.rows
            {
                return Err(r.fail(format!(
                    "{core_prefix}: core factors {}×{} and {}×{} do not fit bases of {} and {} vectors",
                    core_b.rows, core_b.cols, core_a.rows, core_a.cols, module.u.cols, module.v.cols
                )));
            }
            let extra = if r.has(&prefix(key, "extra_b")) {
                let (b, a) = (
                    r.get(&prefix(key, "extra_b"))?,
                    r.get(&prefix(key, "extra_a"))?,
                );
                if b.rows != module.u.rows || a.cols != module.v.rows || b.cols != a.rows {
                    return Err(r.fail(format!("{core_prefix}: residual factors do not fit")));
                }
                Some((b, a))
            } else {
                None
            };
            cores.insert(
                *key,
                PackedCore {
                    core_b,
                    core_a,
                    extra,
                },
            );
        }
        members.push(PackedMember {
            name: name.to_string(),
            cores,
        });
    }
    Ok(PackedSet {
        params,
        modules,
        members,
    })
}
