//! The GGUF reader on the real SmolLM2-135M-Instruct Q4_1 file (fetched by `scripts/fetch-assets`
//! into `$S2LC_HOME/models`): metadata, the byte range of every tensor, dequantization of every
//! tensor, and the real-file blocks of `tests/fixtures/gguf` (gguf-py's values) at their offsets.
//! Skips with a printed reason when the file is absent.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use s2lc_model::gguf::GgufFile;
use s2lc_model::quant::GgmlType;

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn model_path() -> PathBuf {
    s2lc_model::assets::home().join("models").join(MODEL)
}

fn open_model() -> Option<GgufFile> {
    let path = model_path();
    if !path.is_file() {
        eprintln!(
            "skipping: {} not found (run scripts/fetch-assets)",
            path.display()
        );
        return None;
    }
    Some(GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}")))
}

#[test]
fn metadata() {
    let Some(f) = open_model() else { return };
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.get_u32("llama.block_count").unwrap(), 30);
    assert_eq!(f.get_u32("llama.embedding_length").unwrap(), 576);
    assert_eq!(f.get_u32("llama.feed_forward_length").unwrap(), 1536);
    assert_eq!(f.get_u32("llama.attention.head_count").unwrap(), 9);
    assert_eq!(f.get_u32("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(f.get_u32("llama.vocab_size").unwrap(), 49152);
    assert_eq!(f.get_f32("llama.rope.freq_base").unwrap(), 100_000.0);
    assert_eq!(
        f.get_f32("llama.attention.layer_norm_rms_epsilon").unwrap(),
        1e-5
    );
    assert_eq!(f.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert_eq!(f.get_str("tokenizer.ggml.pre").unwrap(), "smollm");
    assert!(!f.get_bool("tokenizer.ggml.add_bos_token").unwrap());
    let tokens = f.get_str_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len(), 49152);
    assert_eq!(tokens[..3], ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]);
    let merges = f.get_str_array("tokenizer.ggml.merges").unwrap();
    assert_eq!(merges.len(), 48900);
    assert_eq!(merges[0], "Ġ t");
    assert_eq!(
        f.get_i32_array("tokenizer.ggml.token_type").unwrap().len(),
        49152
    );
    assert_eq!(f.get_u32("tokenizer.ggml.eos_token_id").unwrap(), 2);
}

#[test]
fn tensor_table_and_byte_ranges() {
    let Some(f) = open_model() else { return };
    let file_len = std::fs::metadata(model_path()).unwrap().len();
    let tensors = f.tensors();
    assert_eq!(tensors.len(), 272);

    let mut by_type: BTreeMap<GgmlType, usize> = BTreeMap::new();
    let mut names = HashSet::new();
    for t in tensors {
        *by_type.entry(t.dtype).or_default() += 1;
        assert!(names.insert(t.name.as_str()), "duplicate {}", t.name);
        assert!(t.offset >= f.data_start(), "{}", t.name);
        assert_eq!((t.offset - f.data_start()) % f.alignment(), 0, "{}", t.name);
        assert!(t.offset + t.n_bytes <= file_len, "{}", t.name);
        let row = t.dims[0] as usize;
        let rows: u64 = t.dims[1..].iter().product();
        assert_eq!(
            t.n_bytes,
            t.dtype.row_bytes(row).unwrap() as u64 * rows,
            "{}",
            t.name
        );
        assert_eq!(f.tensor_bytes(t).len() as u64, t.n_bytes, "{}", t.name);
    }
    assert_eq!(
        by_type,
        BTreeMap::from([
            (GgmlType::F32, 61),
            (GgmlType::Q4_1, 210),
            (GgmlType::Q8_0, 1)
        ])
    );

    // Ranges are disjoint and the last one ends the file.
    let mut ranges: Vec<(u64, u64)> = tensors
        .iter()
        .map(|t| (t.offset, t.offset + t.n_bytes))
        .collect();
    ranges.sort();
    assert!(ranges.windows(2).all(|w| w[0].1 <= w[1].0));
    assert_eq!(ranges.last().unwrap().1, file_len);

    let shape = |name: &str| f.tensor_info(name).unwrap().shape();
    assert_eq!(shape("token_embd.weight"), [49152, 576]);
    assert_eq!(shape("blk.0.attn_q.weight"), [576, 576]);
    assert_eq!(shape("blk.0.attn_k.weight"), [192, 576]);
    assert_eq!(shape("blk.29.ffn_gate.weight"), [1536, 576]);
    assert_eq!(shape("blk.29.ffn_down.weight"), [576, 1536]);
    assert_eq!(shape("output_norm.weight"), [576]);
    assert!(
        f.tensor_info("output.weight").is_none(),
        "embeddings are tied"
    );
}

#[test]
fn dequantizes_every_tensor() {
    let Some(f) = open_model() else { return };
    let start = Instant::now();
    let mut total = 0u64;
    for t in f.tensors() {
        let v = f
            .dequantize(&t.name)
            .unwrap_or_else(|e| panic!("{}: {e}", t.name));
        assert_eq!(v.len() as u64, t.n_elements(), "{}", t.name);
        assert!(v.iter().all(|x| x.is_finite()), "{}: non-finite", t.name);
        assert!(v.iter().any(|&x| x != 0.0), "{}: all zeros", t.name);
        total += v.len() as u64;
    }
    assert_eq!(total, 134_515_008);
    eprintln!(
        "dequantized {} tensors ({total} elements) in {:.2?}",
        f.tensors().len(),
        start.elapsed()
    );
}

/// The `real_*` fixtures are the first rows of one tensor per type, as bytes and as gguf-py
/// decoded them: the bytes must be at the tensor's offset in this file, and our full-tensor
/// dequantization must start with exactly those values.
#[test]
fn matches_gguf_py_on_real_blocks() {
    let Some(f) = open_model() else { return };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gguf");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let mut checked = 0;
    for case in index["cases"].as_array().unwrap() {
        let Some(name) = case["tensor"].as_str() else {
            continue;
        };
        let info = f.tensor_info(name).unwrap();
        assert_eq!(info.dtype.name(), case["type"].as_str().unwrap());
        assert_eq!(info.offset, case["file_offset"].as_u64().unwrap(), "{name}");
        let bytes = std::fs::read(dir.join(case["bytes"].as_str().unwrap())).unwrap();
        assert_eq!(&f.tensor_bytes(info)[..bytes.len()], &bytes[..], "{name}");
        let want: Vec<u32> = std::fs::read(dir.join(case["values"].as_str().unwrap()))
            .unwrap()
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let got = f.dequantize(name).unwrap();
        let got: Vec<u32> = got[..want.len()].iter().map(|x| x.to_bits()).collect();
        assert_eq!(got, want, "{name}");
        checked += 1;
    }
    assert_eq!(checked, 3, "one real case per type in the file");
}
