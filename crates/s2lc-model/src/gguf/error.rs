//! The errors of the GGUF reader: one variant per way a file can be malformed.

use std::path::PathBuf;

use super::{MAX_ARRAY_DEPTH, MAX_ARRAY_LEN, MAX_DIMS};
use crate::quant::{GgmlType, QuantError};

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
    /// A file opened with [`GgufFile::open`](super::GgufFile::open) is malformed; `source` says
    /// how.
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
    /// The error itself, without the file context that
    /// [`GgufFile::open`](super::GgufFile::open) adds ([`GgufError::InFile`]); handy for matching
    /// on the variant.
    pub fn inner(&self) -> &GgufError {
        match self {
            GgufError::InFile { source, .. } => source.inner(),
            other => other,
        }
    }
}
