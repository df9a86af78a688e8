//! Tests of the GGUF reader on images built in memory: valid files, every truncation and
//! single-byte corruption, hostile lengths, counts, offsets and dims.

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
