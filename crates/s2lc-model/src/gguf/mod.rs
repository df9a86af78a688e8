//! A defensive reader for GGUF, llama.cpp's model container (versions 2 and 3).
//!
//! Layout (every integer little-endian):
//! ```text
//! header       magic "GGUF" | version: u32 (2 or 3) | tensor_count: u64 | kv_count: u64
//! metadata     kv_count × { key: string | value_type: u32 | value }
//! tensor infos tensor_count × { name: string | n_dims: u32 (≤ 4) | dims: n_dims × u64
//!                               | ggml_type: u32 | offset: u64 }
//! padding      up to a multiple of `general.alignment` (a u32 key; 32 when absent)
//! data         tensor bytes; a tensor starts at data_start + offset (offset a multiple of the
//!              alignment) and takes row_bytes(dims[0]) · dims[1] · … bytes
//!
//! string       len: u64 | len bytes of UTF-8 (no terminator)
//! value        by value_type: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool (one byte, 0/1),
//!              8 string, 9 array { elem_type: u32 | count: u64 | count × value }, 10 u64, 11 i64,
//!              12 f64
//! ```
//! `dims[0]` is the fastest-varying dimension, so a tensor is stored row-major with shape
//! `dims` reversed (a Linear weight `[out, in]` has `dims = [in, out]`).
//!
//! The file is untrusted: every read is bounds-checked, lengths and counts are capped by the bytes
//! that remain, arithmetic is checked, each tensor's byte range must lie inside the data section
//! (and not overlap another's), and every failure is its own [`GgufError`] variant. No input
//! makes the parser panic.
//!
//! The parser is in `parse`, the errors in [`GgufError`], the metadata values and their typed
//! getters in [`MetaValue`] and `meta`; this module holds the parsed file and its tensors.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;

use crate::quant::{self, GgmlType, QuantError};

/// The file magic.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a ggml tensor has (`GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;
/// Deepest nesting of metadata arrays accepted (real files use at most 1).
pub const MAX_ARRAY_DEPTH: usize = 4;
/// Most elements accepted in one metadata array (real vocabularies are a few hundred thousand);
/// bounds the memory a hostile file can make the parser allocate.
pub const MAX_ARRAY_LEN: u64 = 1 << 24;

mod error;
mod meta;
mod parse;
#[cfg(test)]
mod tests;

pub use error::GgufError;
pub use meta::MetaValue;

use parse::parse_header;

/// Where a tensor is and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The GGUF tensor name (`blk.3.attn_q.weight`).
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the fastest-varying (the row length).
    pub dims: Vec<u64>,
    /// Element type.
    pub dtype: GgmlType,
    /// Absolute byte offset of the first block in the file.
    pub offset: u64,
    /// Size in bytes.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Number of elements (the product of `dims`; 1 for no dims).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |acc, &d| acc.saturating_mul(d))
    }

    /// Row-major shape: `dims` reversed, e.g. `[out, in]` for a Linear weight.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// The bytes behind a [`GgufFile`].
enum Storage {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file: metadata and tensor infos, with the tensor bytes borrowed from the mapped
/// (or owned) buffer.
pub struct GgufFile {
    storage: Storage,
    path: Option<PathBuf>,
    version: u32,
    alignment: u64,
    data_start: u64,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("bytes", &self.storage.bytes().len())
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and parses the file at `path`. Parse errors come wrapped in
    /// [`GgufError::InFile`] with the path.
    ///
    /// As with any memory map, the file must not be modified while the `GgufFile` lives.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and we never hand out mutable access; the documented
        // requirement is that the file is not modified concurrently, as for every mmap reader.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let mut parsed = Self::parse(Storage::Mapped(map)).map_err(|e| GgufError::InFile {
            path: path.to_path_buf(),
            source: Box::new(e),
        })?;
        parsed.path = Some(path.to_path_buf());
        Ok(parsed)
    }

    /// Parses a GGUF image held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::parse(Storage::Owned(bytes))
    }

    fn parse(storage: Storage) -> Result<Self, GgufError> {
        let header = parse_header(storage.bytes())?;
        Ok(GgufFile {
            storage,
            path: None,
            version: header.version,
            alignment: header.alignment,
            data_start: header.data_start,
            metadata: header.metadata,
            by_name: header
                .tensors
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.clone(), i))
                .collect(),
            tensors: header.tensors,
        })
    }

    /// The path given to [`GgufFile::open`], if the file came from one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The data-section alignment in bytes.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute byte offset where the data section starts.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// All metadata, by key.
    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.metadata
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor called `name`, if any.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).and_then(|&i| self.tensors.get(i))
    }

    /// The raw (quantized) bytes of a tensor of this file, borrowed from the buffer.
    ///
    /// For an `info` that does not describe a range of this file (e.g. one from another file)
    /// the result is empty.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let range = usize::try_from(info.offset).ok().and_then(|start| {
            let len = usize::try_from(info.n_bytes).ok()?;
            Some(start..start.checked_add(len)?)
        });
        range
            .and_then(|r| self.storage.bytes().get(r))
            .unwrap_or(&[])
    }

    /// Dequantizes the tensor called `name` to f32, row-major with shape [`TensorInfo::shape`].
    /// Large tensors are decoded in parallel over rows.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| GgufError::TensorNotFound(name.to_string()))?;
        let quant_err = |source| GgufError::Quant {
            name: name.to_string(),
            source,
        };
        if !info.dtype.can_dequantize() {
            return Err(quant_err(QuantError::Unsupported(info.dtype)));
        }
        let n = usize::try_from(info.n_elements()).map_err(|_| GgufError::TensorTooLarge {
            name: name.to_string(),
            n_elements: info.n_elements(),
        })?;
        let bytes = self.tensor_bytes(info);
        let mut out = vec![0f32; n];
        // Rows are whole blocks (checked at parse), so chunks of whole rows decode independently.
        let row = info.dims.first().map_or(1, |&d| d as usize);
        const PAR_MIN_ELEMENTS: usize = 1 << 16;
        if n < 2 * PAR_MIN_ELEMENTS || row == 0 {
            quant::dequantize(info.dtype, bytes, &mut out).map_err(quant_err)?;
        } else {
            let rows_per_chunk = PAR_MIN_ELEMENTS.div_ceil(row);
            let chunk_elems = rows_per_chunk * row;
            let chunk_bytes = info
                .dtype
                .row_bytes(chunk_elems)
                .ok_or_else(|| quant_err(quant_row_error(info.dtype, chunk_elems)))?;
            out.par_chunks_mut(chunk_elems)
                .zip(bytes.par_chunks(chunk_bytes))
                .try_for_each(|(o, b)| quant::dequantize(info.dtype, b, o))
                .map_err(quant_err)?;
        }
        Ok(out)
    }
}

fn quant_row_error(dtype: GgmlType, n: usize) -> QuantError {
    QuantError::NotBlockMultiple {
        dtype,
        n,
        block: dtype.block_size(),
    }
}
