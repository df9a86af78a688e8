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

/// Everything that can go wrong reading a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or mapped.
    #[error("{path}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file opened with [`GgufFile::open`] is malformed; `source` says how.
    #[error("{path}")]
    InFile {
        /// The file involved.
        path: PathBuf,
        /// The parse error.
        source: Box<GgufError>,
    },
    /// The first four bytes are not `GGUF`.
    #[error("not a GGUF file (magic {found:02x?}, expected \"GGUF\")")]
    BadMagic {
        /// The bytes found.
        found: [u8; 4],
    },
    /// The version is not 2 or 3 (version 1 used 32-bit counts; a byte-swapped version means a
    /// big-endian file).
    #[error("unsupported GGUF version {0} (this reader handles versions 2 and 3)")]
    UnsupportedVersion(u32),
    /// The input ended inside a fixed-size field.
    #[error("file truncated while reading {what} at byte {offset}")]
    Truncated {
        /// The field being read.
        what: &'static str,
        /// Where it starts.
        offset: u64,
    },
    /// A length or count field claims more than the rest of the file can hold.
    #[error("{what} at byte {offset} is {len}, more than the {remaining} bytes that remain allow")]
    ImplausibleLength {
        /// The field being read.
        what: &'static str,
        /// The value found.
        len: u64,
        /// Where the field starts.
        offset: u64,
        /// Bytes after the field.
        remaining: u64,
    },
    /// A metadata array is longer than [`MAX_ARRAY_LEN`].
    #[error(
        "metadata array at byte {offset} has {len} elements (at most {MAX_ARRAY_LEN} are accepted)"
    )]
    ArrayTooLong {
        /// The element count found.
        len: u64,
        /// Where the count starts.
        offset: u64,
    },
    /// Metadata arrays are nested deeper than [`MAX_ARRAY_DEPTH`].
    #[error("metadata arrays nested deeper than {MAX_ARRAY_DEPTH} at byte {offset}")]
    ArrayTooDeep {
        /// Where the innermost array starts.
        offset: u64,
    },
    /// A string is not UTF-8.
    #[error("{what} at byte {offset} is not valid UTF-8")]
    InvalidUtf8 {
        /// The string being read.
        what: &'static str,
        /// Where its length field starts.
        offset: u64,
    },
    /// A bool value is neither 0 nor 1.
    #[error("bool at byte {offset} has value {value} (expected 0 or 1)")]
    InvalidBool {
        /// The byte found.
        value: u8,
        /// Where it is.
        offset: u64,
    },
    /// A metadata value type id is not one GGUF defines.
    #[error("unknown metadata value type {0}")]
    UnknownValueType(u32),
    /// A metadata key occurs twice.
    #[error("duplicate metadata key '{0}'")]
    DuplicateKey(String),
    /// `general.alignment` is zero or not a power of two.
    #[error("general.alignment = {0} is not a power of two")]
    BadAlignment(u64),
    /// A tensor name occurs twice.
    #[error("duplicate tensor name '{0}'")]
    DuplicateTensor(String),
    /// A tensor has more than [`MAX_DIMS`] dimensions.
    #[error("tensor '{name}' has {n_dims} dimensions (at most {MAX_DIMS} are allowed)")]
    TooManyDims {
        /// The tensor.
        name: String,
        /// Dimensions claimed.
        n_dims: u32,
    },
    /// A tensor's ggml type id is not one ggml defines.
    #[error("tensor '{name}' has unknown ggml type id {id}")]
    UnknownType {
        /// The tensor.
        name: String,
        /// The type id found.
        id: u32,
    },
    /// A tensor's element count or byte size overflows.
    #[error("tensor '{name}': the size of dims {dims:?} overflows")]
    DimsOverflow {
        /// The tensor.
        name: String,
        /// Its dimensions (ggml order).
        dims: Vec<u64>,
    },
    /// A tensor's row (`dims[0]`) is not a whole number of blocks of its type.
    #[error("tensor '{name}': row length {row} is not a multiple of the {dtype} block size")]
    RowNotBlockAligned {
        /// The tensor.
        name: String,
        /// Its element type.
        dtype: GgmlType,
        /// `dims[0]`.
        row: u64,
    },
    /// A tensor's offset is not a multiple of the alignment.
    #[error("tensor '{name}': offset {offset} is not a multiple of the alignment {alignment}")]
    MisalignedTensor {
        /// The tensor.
        name: String,
        /// Its offset relative to the data section.
        offset: u64,
        /// The file's alignment.
        alignment: u64,
    },
    /// A tensor's bytes are not inside the file's data section.
    #[error(
        "tensor '{name}': bytes at data offset {offset} (+{n_bytes}) lie outside the data \
         section (file is {file_len} bytes, data starts at {data_start})"
    )]
    TensorOutOfBounds {
        /// The tensor.
        name: String,
        /// Its offset relative to the data section.
        offset: u64,
        /// Its size in bytes.
        n_bytes: u64,
        /// Where the data section starts.
        data_start: u64,
        /// Length of the file.
        file_len: u64,
    },
    /// Two tensors share bytes.
    #[error("tensors '{first}' and '{second}' overlap")]
    TensorsOverlap {
        /// The tensor that starts first.
        first: String,
        /// The tensor that starts inside it.
        second: String,
    },
    /// A metadata key the caller needs is absent.
    #[error("metadata key '{0}' not found")]
    MissingKey(String),
    /// A metadata value has a different type than the caller needs.
    #[error("metadata key '{key}' is {found}, expected {expected}")]
    WrongValueType {
        /// The key.
        key: String,
        /// What the caller accepts.
        expected: &'static str,
        /// What the file holds.
        found: String,
    },
    /// An integer metadata value does not fit the type the caller needs.
    #[error("metadata key '{key}' has value {value}, which does not fit in {expected}")]
    OutOfRange {
        /// The key.
        key: String,
        /// The value found.
        value: i128,
        /// The target type.
        expected: &'static str,
    },
    /// No tensor has this name.
    #[error("tensor '{0}' not found")]
    TensorNotFound(String),
    /// The tensor has more elements than fit in memory on this platform.
    #[error("tensor '{name}' has {n_elements} elements, too many to dequantize in memory")]
    TensorTooLarge {
        /// The tensor.
        name: String,
        /// Its element count.
        n_elements: u64,
    },
    /// Dequantizing a tensor failed (typically: its type has no decoder).
    #[error("tensor '{name}'")]
    Quant {
        /// The tensor.
        name: String,
        /// What the decoder said.
        source: QuantError,
    },
}

impl GgufError {
    /// The error itself, without the file context that [`GgufFile::open`] adds
    /// ([`GgufError::InFile`]); handy for matching on the variant.
    pub fn inner(&self) -> &GgufError {
        match self {
            GgufError::InFile { source, .. } => source.inner(),
            other => other,
        }
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// Type 0.
    U8(u8),
    /// Type 1.
    I8(i8),
    /// Type 2.
    U16(u16),
    /// Type 3.
    I16(i16),
    /// Type 4.
    U32(u32),
    /// Type 5.
    I32(i32),
    /// Type 10.
    U64(u64),
    /// Type 11.
    I64(i64),
    /// Type 6.
    F32(f32),
    /// Type 12.
    F64(f64),
    /// Type 7.
    Bool(bool),
    /// Type 8.
    String(String),
    /// Type 9; all elements have one type.
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The value's GGUF type, as a word for messages (`"u32"`, `"string"`, `"array of i32"`).
    pub fn type_name(&self) -> String {
        match self {
            MetaValue::Array(v) => match v.first() {
                Some(first) => format!("array of {}", first.type_name()),
                None => "empty array".to_string(),
            },
            other => other.scalar_type_name().to_string(),
        }
    }

    fn scalar_type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "u8",
            MetaValue::I8(_) => "i8",
            MetaValue::U16(_) => "u16",
            MetaValue::I16(_) => "i16",
            MetaValue::U32(_) => "u32",
            MetaValue::I32(_) => "i32",
            MetaValue::U64(_) => "u64",
            MetaValue::I64(_) => "i64",
            MetaValue::F32(_) => "f32",
            MetaValue::F64(_) => "f64",
            MetaValue::Bool(_) => "bool",
            MetaValue::String(_) => "string",
            MetaValue::Array(_) => "array",
        }
    }

    /// The string, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements, if this is an array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(v) => Some(v),
            _ => None,
        }
    }

    /// The value as a wide integer, if this is an integer type (not bool).
    pub fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            MetaValue::U8(v) => v.into(),
            MetaValue::I8(v) => v.into(),
            MetaValue::U16(v) => v.into(),
            MetaValue::I16(v) => v.into(),
            MetaValue::U32(v) => v.into(),
            MetaValue::I32(v) => v.into(),
            MetaValue::U64(v) => v.into(),
            MetaValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// The value as f32, if this is an F32 or F64 (rounded).
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            MetaValue::F32(v) => Some(v),
            MetaValue::F64(v) => Some(v as f32),
            _ => None,
        }
    }
}

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

    /// The metadata value at `key`.
    pub fn get(&self, key: &str) -> Result<&MetaValue, GgufError> {
        self.metadata
            .get(key)
            .ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }

    fn wrong_type(key: &str, expected: &'static str, found: &MetaValue) -> GgufError {
        GgufError::WrongValueType {
            key: key.to_string(),
            expected,
            found: found.type_name(),
        }
    }

    /// The string at `key`.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.get(key)?;
        v.as_str()
            .ok_or_else(|| Self::wrong_type(key, "a string", v))
    }

    /// The integer at `key` as u32; any integer type whose value fits is accepted.
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        let v = self.get(key)?;
        integer_as(key, v, "u32")
    }

    /// The integer at `key` as u64; any non-negative integer is accepted.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.get(key)?;
        integer_as(key, v, "u64")
    }

    /// The float at `key` as f32 (F32, or F64 rounded).
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        let v = self.get(key)?;
        v.as_f32()
            .ok_or_else(|| Self::wrong_type(key, "a float", v))
    }

    /// The bool at `key`.
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        match self.get(key)? {
            MetaValue::Bool(b) => Ok(*b),
            v => Err(Self::wrong_type(key, "a bool", v)),
        }
    }

    /// The elements of the array at `key`, or a typed error naming `expected`.
    fn get_array(&self, key: &str, expected: &'static str) -> Result<&[MetaValue], GgufError> {
        let v = self.get(key)?;
        v.as_array()
            .ok_or_else(|| Self::wrong_type(key, expected, v))
    }

    /// The array of strings at `key` (e.g. `tokenizer.ggml.tokens`, `tokenizer.ggml.merges`).
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        const EXPECTED: &str = "an array of strings";
        let arr = self.get_array(key, EXPECTED)?;
        // Arrays are homogeneous, so one wrong element means a wrongly typed array.
        arr.iter()
            .map(|e| e.as_str())
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| self.wrong_array_type(key, EXPECTED))
    }

    /// The array of integers at `key` as i32 (e.g. `tokenizer.ggml.token_type`); any integer
    /// element type whose values fit is accepted.
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>, GgufError> {
        const EXPECTED: &str = "an array of integers";
        let arr = self.get_array(key, EXPECTED)?;
        arr.iter()
            .map(|e| match e.as_integer() {
                Some(_) => integer_as(key, e, "i32"),
                None => Err(self.wrong_array_type(key, EXPECTED)),
            })
            .collect()
    }

    /// The array of floats at `key` as f32 (e.g. `tokenizer.ggml.scores`).
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>, GgufError> {
        const EXPECTED: &str = "an array of floats";
        let arr = self.get_array(key, EXPECTED)?;
        arr.iter()
            .map(|e| e.as_f32())
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| self.wrong_array_type(key, EXPECTED))
    }

    fn wrong_array_type(&self, key: &str, expected: &'static str) -> GgufError {
        match self.metadata.get(key) {
            Some(v) => Self::wrong_type(key, expected, v),
            None => GgufError::MissingKey(key.to_string()),
        }
    }

    /// `general.architecture` (`"llama"`, `"qwen2"`, ...).
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.get_str("general.architecture")
    }
}

fn quant_row_error(dtype: GgmlType, n: usize) -> QuantError {
    QuantError::NotBlockMultiple {
        dtype,
        n,
        block: dtype.block_size(),
    }
}

/// Converts an integer metadata value to `T`, with typed errors for non-integers and overflow.
fn integer_as<T: TryFrom<i128>>(
    key: &str,
    v: &MetaValue,
    expected: &'static str,
) -> Result<T, GgufError> {
    let i = v.as_integer().ok_or_else(|| GgufError::WrongValueType {
        key: key.to_string(),
        expected: "an integer",
        found: v.type_name(),
    })?;
    T::try_from(i).map_err(|_| GgufError::OutOfRange {
        key: key.to_string(),
        value: i,
        expected,
    })
}

/// What [`parse_header`] extracts.
struct Header {
    version: u32,
    alignment: u64,
    data_start: u64,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
}

/// Smallest encodings, used to cap counts by the bytes that remain.
const MIN_KV_BYTES: u64 = 8 + 4 + 1; // empty key, value type, one-byte value
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8; // empty name, n_dims 0, type, offset

fn parse_header(buf: &[u8]) -> Result<Header, GgufError> {
    let mut r = Reader { buf, pos: 0 };
    let magic: [u8; 4] = r.array("magic")?;
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic { found: magic });
    }
    let version = r.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::UnsupportedVersion(version));
    }
    let n_tensors = r.count("tensor_count", MIN_TENSOR_INFO_BYTES)?;
    let n_kv = r.count("kv_count", MIN_KV_BYTES)?;

    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = r.string("metadata key")?;
        let ty = r.u32("metadata value type")?;
        let value = r.value(ty, 0)?;
        if metadata.contains_key(&key) {
            return Err(GgufError::DuplicateKey(key));
        }
        metadata.insert(key, value);
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => {
            let a: u64 = integer_as("general.alignment", v, "u64")?;
            if !a.is_power_of_two() {
                return Err(GgufError::BadAlignment(a));
            }
            a
        }
    };

    let mut raw = Vec::with_capacity(n_tensors);
    let mut names = HashMap::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = r.string("tensor name")?;
        let n_dims = r.u32("tensor n_dims")?;
        if n_dims > MAX_DIMS {
            return Err(GgufError::TooManyDims { name, n_dims });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64("tensor dimension")?);
        }
        let id = r.u32("tensor type")?;
        let dtype = GgmlType::from_id(id).ok_or_else(|| GgufError::UnknownType {
            name: name.clone(),
            id,
        })?;
        let offset = r.u64("tensor offset")?;
        if names.insert(name.clone(), ()).is_some() {
            return Err(GgufError::DuplicateTensor(name));
        }
        raw.push((name, dims, dtype, offset));
    }

    let file_len = buf.len() as u64;
    let data_start = align_up(r.pos as u64, alignment).ok_or(GgufError::Truncated {
        what: "data section",
        offset: r.pos as u64,
    })?;
    let mut tensors = Vec::with_capacity(raw.len());
    for (name, dims, dtype, offset) in raw {
        let n_bytes = tensor_n_bytes(&name, &dims, dtype)?;
        if offset % alignment != 0 {
            return Err(GgufError::MisalignedTensor {
                name,
                offset,
                alignment,
            });
        }
        let start = data_start.checked_add(offset);
        let end = start.and_then(|s| s.checked_add(n_bytes));
        let (Some(start), Some(end)) = (start, end) else {
            return Err(out_of_bounds(name, offset, n_bytes, data_start, file_len));
        };
        if end > file_len {
            return Err(out_of_bounds(name, offset, n_bytes, data_start, file_len));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            dtype,
            offset: start,
            n_bytes,
        });
    }
    check_overlaps(&tensors)?;

    Ok(Header {
        version,
        alignment,
        data_start,
        metadata,
        tensors,
    })
}

fn out_of_bounds(
    name: String,
    offset: u64,
    n_bytes: u64,
    data_start: u64,
    file_len: u64,
) -> GgufError {
    GgufError::TensorOutOfBounds {
        name,
        offset,
        n_bytes,
        data_start,
        file_len,
    }
}

fn align_up(x: u64, alignment: u64) -> Option<u64> {
    // `alignment` is a power of two.
    Some(x.checked_add(alignment - 1)? & !(alignment - 1))
}

/// Bytes a tensor of `dims` and `dtype` takes; its element count must fit in an i64 (as ggml's
/// does) and its rows must be whole blocks.
fn tensor_n_bytes(name: &str, dims: &[u64], dtype: GgmlType) -> Result<u64, GgufError> {
    let overflow = || GgufError::DimsOverflow {
        name: name.to_string(),
        dims: dims.to_vec(),
    };
    let n_elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or_else(overflow)?;
    let row = dims.first().copied().unwrap_or(1);
    let block = dtype.block_size() as u64;
    if row % block != 0 {
        return Err(GgufError::RowNotBlockAligned {
            name: name.to_string(),
            dtype,
            row,
        });
    }
    (n_elements / block)
        .checked_mul(dtype.type_size() as u64)
        .ok_or_else(overflow)
}

fn check_overlaps(tensors: &[TensorInfo]) -> Result<(), GgufError> {
    let mut order: Vec<&TensorInfo> = tensors.iter().filter(|t| t.n_bytes > 0).collect();
    order.sort_by_key(|t| t.offset);
    for pair in order.windows(2) {
        if let [a, b] = pair {
            // Both ends were checked not to overflow.
            if b.offset < a.offset + a.n_bytes {
                return Err(GgufError::TensorsOverlap {
                    first: a.name.clone(),
                    second: b.name.clone(),
                });
            }
        }
    }
    Ok(())
}

/// A bounds-checked cursor over the header.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> u64 {
        self.buf.len().saturating_sub(self.pos) as u64
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], GgufError> {
        let slice = self
            .pos
            .checked_add(n)
            .and_then(|end| self.buf.get(self.pos..end))
            .ok_or(GgufError::Truncated {
                what,
                offset: self.pos as u64,
            })?;
        self.pos += n;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, GgufError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Reads a u64 count of items that each take at least `min_size` bytes, rejecting counts the
    /// rest of the buffer cannot hold (so callers may preallocate).
    fn count(&mut self, what: &'static str, min_size: u64) -> Result<usize, GgufError> {
        let offset = self.pos as u64;
        let len = self.u64(what)?;
        let remaining = self.remaining();
        match len.checked_mul(min_size) {
            Some(total) if total <= remaining => Ok(len as usize),
            _ => Err(GgufError::ImplausibleLength {
                what,
                len,
                offset,
                remaining,
            }),
        }
    }

    fn string(&mut self, what: &'static str) -> Result<String, GgufError> {
        let offset = self.pos as u64;
        let len = self.count(what, 1)?;
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| GgufError::InvalidUtf8 { what, offset })
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<MetaValue, GgufError> {
        const W: &str = "metadata value";
        Ok(match ty {
            0 => MetaValue::U8(self.u8(W)?),
            1 => MetaValue::I8(i8::from_le_bytes(self.array(W)?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(W)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(W)?)),
            4 => MetaValue::U32(self.u32(W)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(W)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(W)?)),
            7 => {
                let offset = self.pos as u64;
                match self.u8(W)? {
                    0 => MetaValue::Bool(false),
                    1 => MetaValue::Bool(true),
                    value => return Err(GgufError::InvalidBool { value, offset }),
                }
            }
            8 => MetaValue::String(self.string("metadata string")?),
            9 => {
                let offset = self.pos as u64;
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::ArrayTooDeep { offset });
                }
                let elem = self.u32("array element type")?;
                let min_size = value_min_size(elem).ok_or(GgufError::UnknownValueType(elem))?;
                let len_offset = self.pos as u64;
                let len = self.count("array length", min_size)?;
                if len as u64 > MAX_ARRAY_LEN {
                    return Err(GgufError::ArrayTooLong {
                        len: len as u64,
                        offset: len_offset,
                    });
                }
                let mut items = Vec::with_capacity(len);
                for _ in 0..len {
                    items.push(self.value(elem, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64(W)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(W)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(W)?)),
            other => return Err(GgufError::UnknownValueType(other)),
        })
    }
}

/// Smallest encoding of a value of type `ty`, or `None` for an unknown type.
fn value_min_size(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 4 + 8,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds GGUF images for tests, following the layout in the module docs.
    struct Builder {
        version: u32,
        kv: Vec<(String, u32, Vec<u8>)>,
        tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
        alignment: u64,
    }

    fn gstr(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    }

    impl Builder {
        fn new() -> Self {
            Builder {
                version: 3,
                kv: Vec::new(),
                tensors: Vec::new(),
                alignment: DEFAULT_ALIGNMENT,
            }
        }

        fn kv(mut self, key: &str, ty: u32, value: Vec<u8>) -> Self {
            self.kv.push((key.to_string(), ty, value));
            self
        }

        fn tensor(mut self, name: &str, dims: &[u64], dtype: GgmlType, data: Vec<u8>) -> Self {
            self.tensors
                .push((name.to_string(), dims.to_vec(), dtype.id(), data));
            self
        }

        /// The image; tensors are laid out in order, each padded to the alignment, and the file
        /// ends exactly at the last tensor's last byte.
        fn build(&self) -> Vec<u8> {
            let mut b = GGUF_MAGIC.to_vec();
            b.extend(self.version.to_le_bytes());
            b.extend((self.tensors.len() as u64).to_le_bytes());
            b.extend((self.kv.len() as u64).to_le_bytes());
            for (k, ty, v) in &self.kv {
                b.extend(gstr(k));
                b.extend(ty.to_le_bytes());
                b.extend(v);
            }
            let a = self.alignment as usize;
            let mut offset = 0usize;
            let mut data = Vec::new();
            for (name, dims, ty, bytes) in &self.tensors {
                b.extend(gstr(name));
                b.extend((dims.len() as u32).to_le_bytes());
                for d in dims {
                    b.extend(d.to_le_bytes());
                }
                b.extend(ty.to_le_bytes());
                b.extend((offset as u64).to_le_bytes());
                data.resize(offset, 0);
                data.extend(bytes);
                offset = (offset + bytes.len()).div_ceil(a) * a;
            }
            if !self.tensors.is_empty() {
                b.resize(b.len().div_ceil(a) * a, 0);
                b.extend(data);
            }
            b
        }
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn array(elem_ty: u32, items: &[Vec<u8>]) -> Vec<u8> {
        let mut v = elem_ty.to_le_bytes().to_vec();
        v.extend((items.len() as u64).to_le_bytes());
        for i in items {
            v.extend(i);
        }
        v
    }

    /// A small but complete file: every scalar type, string and int arrays, two tensors.
    fn sample() -> Builder {
        // One Q8_0 block: d = 0.5, quants 0..32.
        let mut q8 = half::f16::from_f32(0.5).to_le_bytes().to_vec();
        q8.extend(0u8..32);
        Builder::new()
            .kv("general.architecture", 8, gstr("llama"))
            .kv("llama.block_count", 4, 30u32.to_le_bytes().to_vec())
            .kv("u8", 0, vec![7])
            .kv("i8", 1, vec![0xFF])
            .kv("u16", 2, 600u16.to_le_bytes().to_vec())
            .kv("i16", 3, (-600i16).to_le_bytes().to_vec())
            .kv("i32", 5, (-5i32).to_le_bytes().to_vec())
            .kv("u64", 10, (1u64 << 40).to_le_bytes().to_vec())
            .kv("i64", 11, 12i64.to_le_bytes().to_vec())
            .kv("f32", 6, 1e-5f32.to_le_bytes().to_vec())
            .kv("f64", 12, 0.25f64.to_le_bytes().to_vec())
            .kv("flag", 7, vec![1])
            .kv(
                "tokenizer.ggml.tokens",
                9,
                array(8, &[gstr("a"), gstr("b"), gstr("ab")]),
            )
            .kv(
                "tokenizer.ggml.token_type",
                9,
                array(
                    5,
                    &[1i32.to_le_bytes().to_vec(), 3i32.to_le_bytes().to_vec()],
                ),
            )
            .kv(
                "tokenizer.ggml.scores",
                9,
                array(6, &[0.5f32.to_le_bytes().to_vec()]),
            )
            .tensor("norm", &[3], GgmlType::F32, f32_bytes(&[1.0, 2.0, 3.0]))
            .tensor("w", &[32, 1], GgmlType::Q8_0, q8)
    }

    #[test]
    fn parses_a_valid_file() {
        let f = GgufFile::from_bytes(sample().build()).unwrap();
        assert_eq!(f.version(), 3);
        assert_eq!(f.architecture().unwrap(), "llama");
        assert_eq!(f.get_u32("llama.block_count").unwrap(), 30);
        assert_eq!(f.get_u32("u8").unwrap(), 7);
        assert_eq!(f.get_u32("u16").unwrap(), 600);
        assert_eq!(f.get_u32("i64").unwrap(), 12);
        assert_eq!(f.get_u64("u64").unwrap(), 1 << 40);
        assert_eq!(f.metadata()["i8"], MetaValue::I8(-1));
        assert_eq!(f.metadata()["i16"], MetaValue::I16(-600));
        assert_eq!(f.get_f32("f32").unwrap(), 1e-5);
        assert_eq!(f.get_f32("f64").unwrap(), 0.25);
        assert!(f.get_bool("flag").unwrap());
        assert_eq!(
            f.get_str_array("tokenizer.ggml.tokens").unwrap(),
            ["a", "b", "ab"]
        );
        assert_eq!(
            f.get_i32_array("tokenizer.ggml.token_type").unwrap(),
            [1, 3]
        );
        assert_eq!(f.get_f32_array("tokenizer.ggml.scores").unwrap(), [0.5]);

        assert_eq!(f.tensors().len(), 2);
        let norm = f.tensor_info("norm").unwrap();
        assert_eq!(norm.offset, f.data_start());
        assert_eq!(f.data_start() % 32, 0);
        assert_eq!(norm.shape(), [3]);
        assert_eq!(f.dequantize("norm").unwrap(), [1.0, 2.0, 3.0]);
        let w = f.tensor_info("w").unwrap();
        assert_eq!((w.n_elements(), w.n_bytes), (32, 34));
        assert_eq!(w.shape(), [1, 32]);
        assert_eq!(w.offset, f.data_start() + 32);
        assert_eq!(f.tensor_bytes(w).len(), 34);
        let y = f.dequantize("w").unwrap();
        assert_eq!(y, (0..32).map(|i| 0.5 * i as f32).collect::<Vec<_>>());
    }

    #[test]
    fn getter_errors_are_typed() {
        let f = GgufFile::from_bytes(sample().build()).unwrap();
        assert!(matches!(f.get_u32("nope"), Err(GgufError::MissingKey(k)) if k == "nope"));
        assert!(matches!(
            f.get_u32("general.architecture"),
            Err(GgufError::WrongValueType {
                expected: "an integer",
                ..
            })
        ));
        assert!(matches!(
            f.get_u32("i32"),
            Err(GgufError::OutOfRange { value: -5, .. })
        ));
        assert!(matches!(
            f.get_u32("u64"),
            Err(GgufError::OutOfRange {
                expected: "u32",
                ..
            })
        ));
        assert!(matches!(
            f.get_str("u8"),
            Err(GgufError::WrongValueType { .. })
        ));
        assert!(matches!(
            f.get_f32("u8"),
            Err(GgufError::WrongValueType { .. })
        ));
        assert!(matches!(
            f.get_bool("u8"),
            Err(GgufError::WrongValueType { .. })
        ));
        let e = f.get_str_array("tokenizer.ggml.token_type").unwrap_err();
        assert!(e.to_string().contains("array of i32"), "{e}");
        assert!(matches!(
            f.get_i32_array("tokenizer.ggml.tokens"),
            Err(GgufError::WrongValueType { .. })
        ));
        assert!(matches!(
            f.dequantize("missing"),
            Err(GgufError::TensorNotFound(_))
        ));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample().build();
        for len in 0..bytes.len() {
            let r = GgufFile::from_bytes(bytes[..len].to_vec());
            assert!(r.is_err(), "prefix of {len} bytes parsed");
        }
        assert!(GgufFile::from_bytes(bytes).is_ok());
    }

    #[test]
    fn every_single_byte_corruption_is_handled() {
        // Not every corruption is detectable (a changed quant is still valid), but none may panic.
        let bytes = sample().build();
        for i in 0..bytes.len() {
            for v in [0x00, 0xFF, 0x80, 0x7F, 0x01] {
                let mut b = bytes.clone();
                b[i] = v;
                if let Ok(f) = GgufFile::from_bytes(b) {
                    for t in f.tensors() {
                        let _ = f.dequantize(&t.name);
                    }
                }
            }
        }
    }

    #[test]
    fn bad_magic_and_version() {
        let mut b = sample().build();
        b[0] = b'X';
        assert!(matches!(
            GgufFile::from_bytes(b),
            Err(GgufError::BadMagic { found }) if &found == b"XGUF"
        ));
        for version in [1, 4, 0x0300_0000] {
            let mut s = sample();
            s.version = version;
            assert!(matches!(
                GgufFile::from_bytes(s.build()),
                Err(GgufError::UnsupportedVersion(v)) if v == version
            ));
        }
        let mut s = sample();
        s.version = 2;
        assert_eq!(GgufFile::from_bytes(s.build()).unwrap().version(), 2);
    }

    #[test]
    fn huge_lengths_and_counts() {
        // A key whose length claims the whole address space.
        let mut b = GGUF_MAGIC.to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(u64::MAX.to_le_bytes());
        b.extend([b'a'; 64]);
        assert!(matches!(
            GgufFile::from_bytes(b),
            Err(GgufError::ImplausibleLength {
                what: "metadata key",
                len: u64::MAX,
                ..
            })
        ));

        // Counts of tensors and kvs beyond what the file could hold.
        for (tc, kc, what) in [(u64::MAX, 0u64, "tensor_count"), (0, 1 << 40, "kv_count")] {
            let mut b = GGUF_MAGIC.to_vec();
            b.extend(3u32.to_le_bytes());
            b.extend(tc.to_le_bytes());
            b.extend(kc.to_le_bytes());
            let e = GgufFile::from_bytes(b).unwrap_err();
            assert!(
                matches!(e, GgufError::ImplausibleLength { what: w, .. } if w == what),
                "{e}"
            );
        }

        // A string value and an array whose lengths overflow when multiplied.
        let s = Builder::new().kv("k", 8, u64::MAX.to_le_bytes().to_vec());
        assert!(matches!(
            GgufFile::from_bytes(s.build()),
            Err(GgufError::ImplausibleLength {
                what: "metadata string",
                ..
            })
        ));
        let mut arr = 10u32.to_le_bytes().to_vec();
        arr.extend((u64::MAX / 4).to_le_bytes());
        let s = Builder::new().kv("k", 9, arr);
        assert!(matches!(
            GgufFile::from_bytes(s.build()),
            Err(GgufError::ImplausibleLength {
                what: "array length",
                ..
            })
        ));
    }

    #[test]
    fn malformed_values() {
        let s = Builder::new().kv("b", 7, vec![2]);
        assert!(matches!(
            GgufFile::from_bytes(s.build()),
            Err(GgufError::InvalidBool { value: 2, .. })
        ));
        let s = Builder::new().kv("k", 13, vec![0; 8]);
        assert!(matches!(
            GgufFile::from_bytes(s.build()),
            Err(GgufError::UnknownValueType(13))
        ));
        let s = Builder::new().kv("k", 9, array(99, &[]));
        assert!(matches!(
            GgufFile::from_bytes(s.build()),
            Err(GgufError::UnknownValueType(99))
        ));
        let mut bad = 2u64.to_le_bytes().to_vec();
        bad.extend([0xC3, 0x28]);
        let s = Builder::new().kv("k", 8, bad);
        assert!(matches!(
            GgufFile::from_bytes(s.build()),
            Err(GgufError::InvalidUtf8 {
                what: "metadata string",
                ..
            })
        ));
        let s = Builder::new().kv("k", 0, vec![1]).kv("k", 0, vec![2]);
        assert!(matches!(
            GgufFile::from_bytes(s.build()),
            Err(GgufError::DuplicateKey(k)) if k == "k"
        ));
        // Arrays of arrays nested too deep (each level holds one array).
        let mut v = array(0, &[vec![1]]);
        for _ in 0..MAX_ARRAY_DEPTH {
            v = array(9, &[v]);
        }
        let s = Builder::new().kv("deep", 9, v);
        assert!(matches!(
            GgufFile::from_bytes(s.build()),
            Err(GgufError::ArrayTooDeep { .. })
        ));
        // ... and one level less is fine.
        let mut v = array(0, &[vec![1]]);
        for _ in 0..MAX_ARRAY_DEPTH - 1 {
            v = array(9, &[v]);
        }
        let f = GgufFile::from_bytes(Builder::new().kv("deep", 9, v).build()).unwrap();
        assert_eq!(
            f.get("deep").unwrap().type_name(),
            "array of array of array of array of u8"
        );
    }

    #[test]
    fn alignment_key() {
        let mut s = sample().kv("general.alignment", 4, 64u32.to_le_bytes().to_vec());
        s.alignment = 64;
        let f = GgufFile::from_bytes(s.build()).unwrap();
        assert_eq!(f.alignment(), 64);
        assert_eq!(f.data_start() % 64, 0);
        assert_eq!(f.dequantize("norm").unwrap(), [1.0, 2.0, 3.0]);

        for a in [0u32, 48] {
            let s = sample().kv("general.alignment", 4, a.to_le_bytes().to_vec());
            assert!(matches!(
                GgufFile::from_bytes(s.build()),
                Err(GgufError::BadAlignment(x)) if x == a as u64
            ));
        }
        let s = sample().kv("general.alignment", 8, gstr("32"));
        assert!(matches!(
            GgufFile::from_bytes(s.build()),
            Err(GgufError::WrongValueType { .. })
        ));
    }

    /// Overwrites the little-endian u64 at byte `at`.
    fn patch_u64(bytes: &mut [u8], at: usize, v: u64) {
        bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn find(bytes: &[u8], needle: &[u8]) -> usize {
        bytes
            .windows(needle.len())
            .position(|w| w == needle)
            .unwrap()
    }

    #[test]
    fn tensor_offsets_out_of_bounds() {
        let bytes = sample().build();
        // The `w` tensor info: name, n_dims, dims[2], type, offset.
        let name_at = find(&bytes, b"\x01\0\0\0\0\0\0\0w") + 9;
        let offset_at = name_at + 4 + 16 + 4;
        for off in [32 * 1000, u64::MAX - 31, 1 << 63] {
            let mut b = bytes.clone();
            patch_u64(&mut b, offset_at, off);
            let e = GgufFile::from_bytes(b).unwrap_err();
            assert!(
                matches!(&e, GgufError::TensorOutOfBounds { name, .. } if name == "w"),
                "{e}"
            );
        }
        let mut b = bytes.clone();
        patch_u64(&mut b, offset_at, 33);
        assert!(matches!(
            GgufFile::from_bytes(b),
            Err(GgufError::MisalignedTensor { offset: 33, .. })
        ));
        // Moving `w` onto `norm`.
        let mut b = bytes.clone();
        patch_u64(&mut b, offset_at, 0);
        assert!(matches!(
            GgufFile::from_bytes(b),
            Err(GgufError::TensorsOverlap { .. })
        ));
    }

    #[test]
    fn tensor_dims_are_checked() {
        let bytes = sample().build();
        let name_at = find(&bytes, b"\x01\0\0\0\0\0\0\0w") + 9;
        let dims_at = name_at + 4;
        // Product of dims overflows u64.
        let mut b = bytes.clone();
        patch_u64(&mut b, dims_at, 1 << 40);
        patch_u64(&mut b, dims_at + 8, 1 << 40);
        assert!(matches!(
            GgufFile::from_bytes(b),
            Err(GgufError::DimsOverflow { .. })
        ));
        // Product fits u64 but not i64.
        let mut b = bytes.clone();
        patch_u64(&mut b, dims_at, 1 << 32);
        patch_u64(&mut b, dims_at + 8, 1 << 31);
        assert!(matches!(
            GgufFile::from_bytes(b),
            Err(GgufError::DimsOverflow { .. })
        ));
        // A huge but representable tensor is simply out of bounds.
        let mut b = bytes.clone();
        patch_u64(&mut b, dims_at + 8, 1 << 50);
        assert!(matches!(
            GgufFile::from_bytes(b),
            Err(GgufError::TensorOutOfBounds { .. })
        ));
        // A row that is not whole Q8_0 blocks.
        let mut b = bytes.clone();
        patch_u64(&mut b, dims_at, 33);
        assert!(matches!(
            GgufFile::from_bytes(b),
            Err(GgufError::RowNotBlockAligned { row: 33, .. })
        ));
        // n_dims > 4 and an unknown type id.
        let mut b = bytes.clone();
        b[name_at..name_at + 4].copy_from_slice(&5u32.to_le_bytes());
        assert!(matches!(
            GgufFile::from_bytes(b),
            Err(GgufError::TooManyDims { n_dims: 5, .. })
        ));
        let mut b = bytes.clone();
        b[name_at + 20..name_at + 24].copy_from_slice(&4u32.to_le_bytes());
        assert!(matches!(
            GgufFile::from_bytes(b),
            Err(GgufError::UnknownType { id: 4, .. })
        ));
    }

    #[test]
    fn duplicate_tensor_and_unsupported_type() {
        let s = Builder::new()
            .tensor("t", &[1], GgmlType::F32, vec![0; 4])
            .tensor("t", &[1], GgmlType::F32, vec![0; 4]);
        assert!(matches!(
            GgufFile::from_bytes(s.build()),
            Err(GgufError::DuplicateTensor(t)) if t == "t"
        ));
        let s = Builder::new().tensor("iq", &[256], GgmlType::IQ2_XXS, vec![0; 66]);
        let f = GgufFile::from_bytes(s.build()).unwrap();
        let e = f.dequantize("iq").unwrap_err();
        assert!(matches!(
            &e,
            GgufError::Quant {
                source: QuantError::Unsupported(GgmlType::IQ2_XXS),
                ..
            }
        ));
        let cause = std::error::Error::source(&e)
            .map(|c| c.to_string())
            .unwrap_or_default();
        assert!(cause.contains("IQ2_XXS"), "{e}: {cause}");
    }

    #[test]
    fn no_tensors_and_foreign_infos() {
        let f = GgufFile::from_bytes(Builder::new().kv("a", 0, vec![1]).build()).unwrap();
        assert!(f.tensors().is_empty());
        let foreign = TensorInfo {
            name: "x".into(),
            dims: vec![u64::MAX, 2],
            dtype: GgmlType::F32,
            offset: u64::MAX,
            n_bytes: u64::MAX,
        };
        assert!(f.tensor_bytes(&foreign).is_empty());
        assert_eq!(foreign.n_elements(), u64::MAX);
    }

    #[test]
    fn parallel_dequantize_matches_serial() {
        // 600 rows of 256 F16 elements: large enough for the parallel path, with a chunk size
        // that does not divide the row count.
        let (rows, cols) = (600usize, 256usize);
        let vals: Vec<f32> = (0..rows * cols)
            .map(|i| (i % 977) as f32 * 0.5 - 100.0)
            .collect();
        let data: Vec<u8> = vals
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect();
        let s = Builder::new().tensor("t", &[cols as u64, rows as u64], GgmlType::F16, data);
        let f = GgufFile::from_bytes(s.build()).unwrap();
        assert_eq!(f.dequantize("t").unwrap(), vals);
    }

    #[test]
    fn open_reports_the_path() {
        let dir = std::env::temp_dir().join(format!("s2lc-gguf-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.gguf");
        std::fs::write(&good, sample().build()).unwrap();
        let f = GgufFile::open(&good).unwrap();
        assert_eq!(f.architecture().unwrap(), "llama");
        assert_eq!(f.path(), Some(good.as_path()));
        assert_eq!(f.dequantize("norm").unwrap(), [1.0, 2.0, 3.0]);

        let bad = dir.join("bad.gguf");
        std::fs::write(&bad, b"GGUF\x03\0\0").unwrap();
        let e = GgufFile::open(&bad).unwrap_err();
        assert!(e.to_string().contains("bad.gguf"), "{e}");
        assert!(matches!(e, GgufError::InFile { .. }));
        assert!(matches!(
            e.inner(),
            GgufError::Truncated {
                what: "version",
                ..
            }
        ));

        let empty = dir.join("empty.gguf");
        std::fs::write(&empty, b"").unwrap();
        assert!(GgufFile::open(&empty).is_err());

        let e = GgufFile::open(&dir.join("missing.gguf")).unwrap_err();
        assert!(matches!(e, GgufError::Io { .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
