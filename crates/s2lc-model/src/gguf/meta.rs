//! GGUF metadata: the value type and the typed getters of [`GgufFile`] (wrong types and
//! out-of-range integers are errors, never panics).

use super::{GgufError, GgufFile};

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

impl GgufFile {
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

/// Converts an integer metadata value to `T`, with typed errors for non-integers and overflow.
pub(super) fn integer_as<T: TryFrom<i128>>(
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
