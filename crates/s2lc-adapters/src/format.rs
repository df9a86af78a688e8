//! The packed-artifact format: a directory other tools can read with any safetensors reader.
//!
//! ```text
//! pack.json                     format, parameters, target matrices, members and their files
//! basis.safetensors             per matrix: the shared bases U and V
//! members/NAME.safetensors      per matrix: the member's core factors (and orthogonal residual)
//! ```
//!
//! A block-quantized matrix `X` is three tensors: `X.data` (U8, the kept blocks' codes: int8 bytes,
//! or int4 / int3 / int2 bit fields packed little-endian), `X.scales` (F16, one per kept block) and `X.kept` (U8, the bitmap as little-endian
//! 64-bit words); its rows, columns, bits and block size are in the file's `__metadata__` under
//! `s2lc` as JSON. Tensor prefixes are `L{layer}.{target}.u|v|core_b|core_a|extra_b|extra_a`. The bases
//! file is shared by every member, so a content-addressed store keeps it once.
//!
//! A basis of mixed widths is several column groups side by side: the first at `…u`, the next at
//! `…u.1`, `…u.2`, …; such packs are [`FORMAT_MIXED`], since a reader of [`FORMAT`] would see only
//! the first group.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use half::f16;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use s2lc_model::lora::TARGETS;
use s2lc_model::source::write_file_atomic;
use s2lc_spectral::{BlockQuant, QuantBits};

use crate::pack::{
    ModuleKey, PackError, PackParams, PackedCore, PackedMember, PackedModule, PackedSet, QMat,
};
use crate::qbasis::QBasis;

/// Format tag written to `pack.json`.
pub const FORMAT: &str = "s2lc-pack/1";

/// Format tag of a pack whose bases have column groups of several widths.
pub const FORMAT_MIXED: &str = "s2lc-pack/2";

/// Shape and coding of one quantized matrix, as kept in a file's metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct QMatHeader {
    rows: usize,
    cols: usize,
    bits: QuantBits,
    block: usize,
}

/// Tensors of one safetensors file being written: name → (dtype, shape, bytes).
#[derive(Default)]
struct Writer {
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
    headers: BTreeMap<String, QMatHeader>,
}

impl Writer {
    fn put(&mut self, prefix: &str, m: &QMat) {
        let q = &m.q;
        let scales: Vec<u8> = q.scales.iter().flat_map(|s| s.to_le_bytes()).collect();
        let kept: Vec<u8> = q.kept.iter().flat_map(|w| w.to_le_bytes()).collect();
        self.tensors.push((
            format!("{prefix}.data"),
            Dtype::U8,
            vec![q.data.len()],
            q.data.clone(),
        ));
        self.tensors.push((
            format!("{prefix}.scales"),
            Dtype::F16,
            vec![q.scales.len()],
            scales,
        ));
        self.tensors
            .push((format!("{prefix}.kept"), Dtype::U8, vec![kept.len()], kept));
        self.headers.insert(
            prefix.to_string(),
            QMatHeader {
                rows: m.rows,
                cols: m.cols,
                bits: q.bits,
                block: q.block,
            },
        );
    }

    /// A basis: its first column group at `prefix`, the others at `prefix.1`, `prefix.2`, ….
    fn put_basis(&mut self, prefix: &str, b: &QBasis) {
        for (g, group) in b.groups.iter().enumerate() {
            match g {
                0 => self.put(prefix, group),
                _ => self.put(&format!("{prefix}.{g}"), group),
            }
        }
    }

    /// Serializes to `path` through a `.part` file renamed into place.
    fn write(self, path: &Path) -> Result<(), PackError> {
        let fail = |message: String| PackError::Format {
            path: path.to_path_buf(),
            message,
        };
        let views = self
            .tensors
            .iter()
            .map(|(n, d, s, b)| {
                TensorView::new(*d, s.clone(), b)
                    .map(|v| (n.as_str(), v))
                    .map_err(|e| fail(format!("{n}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let meta = HashMap::from([(
            "s2lc".to_string(),
            serde_json::to_string(&self.headers).map_err(|e| fail(e.to_string()))?,
        )]);
        let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| fail(e.to_string()))?;
        Ok(write_file_atomic(path, &bytes)?)
    }
}

/// A parsed safetensors file with its quantized-matrix headers.
struct Reader<'a> {
    path: PathBuf,
    st: SafeTensors<'a>,
    headers: BTreeMap<String, QMatHeader>,
}

impl<'a> Reader<'a> {
    fn new(path: &Path, bytes: &'a [u8]) -> Result<Self, PackError> {
        let fail = |message: String| PackError::Format {
            path: path.to_path_buf(),
            message,
        };
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| fail(e.to_string()))?;
        let headers = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("s2lc"))
            .ok_or_else(|| fail("no s2lc metadata (not an S2LC pack file)".into()))?;
        let headers = serde_json::from_str(headers).map_err(|e| fail(e.to_string()))?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| fail(e.to_string()))?;
        Ok(Reader {
            path: path.to_path_buf(),
            st,
            headers,
        })
    }

    fn fail(&self, message: String) -> PackError {
        PackError::Format {
            path: self.path.clone(),
            message,
        }
    }

    fn bytes(&self, name: &str, dtype: Dtype) -> Result<&'a [u8], PackError> {
        let view = self
            .st
            .tensor(name)
            .map_err(|_| self.fail(format!("tensor {name} is missing")))?;
        if view.dtype() != dtype {
            return Err(self.fail(format!(
                "tensor {name} is {:?}, not {dtype:?}",
                view.dtype()
            )));
        }
        Ok(view.data())
    }

    fn has(&self, prefix: &str) -> bool {
        self.headers.contains_key(prefix)
    }

    fn get(&self, prefix: &str) -> Result<QMat, PackError> {
        let h = self
            .headers
            .get(prefix)
            .ok_or_else(|| self.fail(format!("matrix {prefix} is missing")))?;
        let data = self.bytes(&format!("{prefix}.data"), Dtype::U8)?.to_vec();
        let scales = self
            .bytes(&format!("{prefix}.scales"), Dtype::F16)?
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]))
            .collect();
        let kept_bytes = self.bytes(&format!("{prefix}.kept"), Dtype::U8)?;
        if kept_bytes.len() % 8 != 0 {
            return Err(self.fail(format!("{prefix}.kept is not whole 64-bit words")));
        }
        let kept = kept_bytes
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        let q = BlockQuant {
            bits: h.bits,
            block: h.block,
            len: h.rows * h.cols,
            kept,
            scales,
            data,
        };
        q.validate()
            .map_err(|e| self.fail(format!("matrix {prefix}: {e}")))?;
        Ok(QMat {
            rows: h.rows,
            cols: h.cols,
            q,
        })
    }

    /// A basis written by [`Writer::put_basis`].
    fn get_basis(&self, prefix: &str) -> Result<QBasis, PackError> {
        let mut groups = vec![self.get(prefix)?];
        while self.has(&format!("{prefix}.{}", groups.len())) {
            groups.push(self.get(&format!("{prefix}.{}", groups.len()))?);
        }
        QBasis::from_groups(groups).map_err(|e| self.fail(format!("{prefix}: {e}")))
    }
}

fn prefix(key: &ModuleKey, part: &str) -> String {
    format!("L{}.{}.{part}", key.layer, TARGETS[key.target])
}

/// A member name usable as a file name.
fn check_name(name: &str) -> Result<(), PackError> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(PackError::Invalid(format!(
            "member name '{name}' must be letters, digits, '.', '_' or '-'"
        )))
    }
}

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
    let mut basis = Writer::default();
    for (key, module) in &set.modules {
        basis.put_basis(&prefix(key, "u"), &module.u);
        basis.put_basis(&prefix(key, "v"), &module.v);
    }
    basis.write(&dir.join("basis.safetensors"))?;
    let mut members = Vec::new();
    for m in &set.members {
        let mut w = Writer::default();
        for (key, core) in &m.cores {
            w.put(&prefix(key, "core_b"), &core.core_b);
            w.put(&prefix(key, "core_a"), &core.core_a);
            if let Some((b, a)) = &core.extra {
                w.put(&prefix(key, "extra_b"), b);
                w.put(&prefix(key, "extra_a"), a);
            }
        }
        let file = format!("members/{}.safetensors", m.name);
        w.write(&dir.join(&file))?;
        members.push(json!({"name": m.name, "file": file, "bytes": m.bytes()}));
    }
    let mixed = set
        .modules
        .values()
        .any(|m| m.u.groups.len() > 1 || m.v.groups.len() > 1);
    let manifest = json!({
        "format": if mixed { FORMAT_MIXED } else { FORMAT },
        "params": set.params,
        "modules": set.modules.keys().collect::<Vec<_>>(),
        "basis_file": "basis.safetensors",
        "basis_bytes": set.basis_bytes(),
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

/// Reads a pack written by [`save`]; every matrix is checked for consistency.
pub fn load(dir: &Path) -> Result<PackedSet, PackError> {
    let manifest_path = dir.join("pack.json");
    let text = std::fs::read_to_string(&manifest_path).map_err(|source| PackError::Io {
        path: manifest_path.clone(),
        source,
    })?;
    let fail = |message: String| PackError::Format {
        path: manifest_path.clone(),
        message,
    };
    let manifest: Value = serde_json::from_str(&text).map_err(|e| fail(e.to_string()))?;
    if manifest["format"] != FORMAT && manifest["format"] != FORMAT_MIXED {
        return Err(fail(format!(
            "format {} is not {FORMAT} or {FORMAT_MIXED}",
            manifest["format"]
        )));
    }
    let params: PackParams =
        serde_json::from_value(manifest["params"].clone()).map_err(|e| fail(e.to_string()))?;
    let keys: Vec<ModuleKey> =
        serde_json::from_value(manifest["modules"].clone()).map_err(|e| fail(e.to_string()))?;
    let read = |file: &str| -> Result<Vec<u8>, PackError> {
        let path = dir.join(file);
        std::fs::read(&path).map_err(|source| PackError::Io { path, source })
    };
    let basis_file = manifest["basis_file"]
        .as_str()
        .ok_or_else(|| fail("no basis_file".into()))?;
    let basis_bytes = read(basis_file)?;
    let basis = Reader::new(&dir.join(basis_file), &basis_bytes)?;
    let mut modules = BTreeMap::new();
    for key in &keys {
        if key.target >= TARGETS.len() {
            return Err(fail(format!("target index {} out of range", key.target)));
        }
        let module = PackedModule {
            u: basis.get_basis(&prefix(key, "u"))?,
            v: basis.get_basis(&prefix(key, "v"))?,
        };
        modules.insert(*key, module);
    }
    let mut members = Vec::new();
    for m in manifest["members"]
        .as_array()
        .ok_or_else(|| fail("no members list".into()))?
    {
        let name = m["name"]
            .as_str()
            .ok_or_else(|| fail("a member has no name".into()))?;
        check_name(name)?;
        let file = m["file"]
            .as_str()
            .ok_or_else(|| fail(format!("member {name} has no file")))?;
        let bytes = read(file)?;
        let r = Reader::new(&dir.join(file), &bytes)?;
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
