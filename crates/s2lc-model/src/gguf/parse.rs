//! The defensive parser of a GGUF image: header, metadata and tensor infos, every read
//! bounds-checked and every count capped by the bytes that remain (layout in the module docs of
//! [`super`]).

use std::collections::{BTreeMap, HashMap};

use super::meta::integer_as;
use super::{
    GgufError, MetaValue, TensorInfo, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_ARRAY_DEPTH,
    MAX_ARRAY_LEN, MAX_DIMS,
};
use crate::quant::GgmlType;

/// What [`parse_header`] extracts.
pub(super) struct Header {
    pub(super) version: u32,
    pub(super) alignment: u64,
    pub(super) data_start: u64,
    pub(super) metadata: BTreeMap<String, MetaValue>,
    pub(super) tensors: Vec<TensorInfo>,
}

/// Smallest encodings, used to cap counts by the bytes that remain.
const MIN_KV_BYTES: u64 = 8 + 4 + 1; // empty key, value type, one-byte value
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8; // empty name, n_dims 0, type, offset

pub(super) fn parse_header(buf: &[u8]) -> Result<Header, GgufError> {
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
