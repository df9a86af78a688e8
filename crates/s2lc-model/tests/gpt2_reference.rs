//! GPT-2 in Hugging Face layout against transformers, on a seeded random GPT-2-shaped model.
//!
//! The fixture (`tests/fixtures/gpt2-tiny/`, `gpt2_tiny_logits.safetensors`,
//! `gpt2_tiny_reference.json`) is written by `scripts/reference/gpt2_fixture.py`; regenerate it
//! with the script, never by hand. Errors are measured relative to the largest |logit| of the
//! reference: `max |ours − theirs| / max |theirs| ≤ 1e-4`.

use std::path::{Path, PathBuf};

use s2lc_model::compress::{compress, save_model_dir, CompressOptions, Method, RankPolicy};
use s2lc_model::kv::KvCache;
use s2lc_model::llama::{BatchRow, ForwardScratch, LlamaModel};
use s2lc_model::source::{read_safetensors, WeightStorage};
use s2lc_model::{Arch, ModelError, ModelSource};
use serde_json::Value;

const TOLERANCE: f32 = 1e-4;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn model_dir() -> PathBuf {
    fixtures().join("gpt2-tiny")
}

/// The reference ids and transformers' logits (`ids.len() × vocab`, row-major).
fn reference() -> (Vec<u32>, Vec<f32>, usize) {
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("gpt2_tiny_reference.json")).expect("fixture"),
    )
    .expect("fixture JSON");
    let ids: Vec<u32> = json["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect();
    let file = json["logits_file"].as_str().expect("logits_file");
    let mut tensors = read_safetensors(&fixtures().join(file)).expect("logits fixture");
    let logits = tensors.remove("logits").expect("logits tensor");
    assert_eq!(logits.shape[0], ids.len());
    (ids, logits.data, logits.shape[1])
}

fn load(dir: &Path, storage: WeightStorage) -> LlamaModel {
    ModelSource::open(dir)
        .expect("open")
        .load_llama(storage, |_| {})
        .expect("load")
}

/// `max |a − b| / max |b|`.
fn relative_error(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

/// Logits of every position of `ids` in one prefill pass from an empty cache.
fn prefill_logits(model: &LlamaModel, ids: &[u32]) -> Vec<f32> {
    let mut cache = model.dense_cache(ids.len());
    let mut scratch = ForwardScratch::default();
    let hidden = model
        .forward_hidden(ids, &mut cache, &mut scratch)
        .expect("prefill")
        .to_vec();
    let mut logits = Vec::new();
    model.logits(&hidden, &mut logits);
    logits
}

/// Logits of every position of `ids`, one token at a time through the KV cache.
fn decode_logits(model: &LlamaModel, ids: &[u32]) -> Vec<f32> {
    let mut cache = model.dense_cache(ids.len());
    let mut scratch = ForwardScratch::default();
    let (mut all, mut step) = (Vec::new(), Vec::new());
    for &id in ids {
        model
            .forward_last(&[id], &mut cache, &mut scratch, &mut step)
            .expect("decode step");
        all.extend_from_slice(&step);
    }
    all
}

#[test]
fn gpt2_matches_transformers_prefill_and_decode() {
    let (ids, want, vocab) = reference();
    let source = ModelSource::open(&model_dir()).expect("open");
    let cfg = source.config().expect("config");
    assert_eq!(cfg.arch, Arch::Gpt2);
    assert_eq!(cfg.vocab_size, vocab);
    let model = source.load_llama(WeightStorage::F32, |_| {}).expect("load");

    let prefill = prefill_logits(&model, &ids);
    let err = relative_error(&prefill, &want);
    eprintln!("prefill: max |Δlogit| / max |logit| = {err:.3e}");
    assert!(err <= TOLERANCE, "prefill error {err}");

    let decode = decode_logits(&model, &ids);
    let err = relative_error(&decode, &want);
    eprintln!("decode: max |Δlogit| / max |logit| = {err:.3e}");
    assert!(err <= TOLERANCE, "decode error {err}");

    // Two sequences at different positions in one batched step: each row reads its own
    // position embedding.
    let (split, mut logits) = (5, Vec::new());
    let mut caches = [model.dense_cache(ids.len()), model.dense_cache(ids.len())];
    let mut scratch = ForwardScratch::default();
    let mut last = Vec::new();
    model
        .forward_last(&ids[..split], &mut caches[0], &mut scratch, &mut last)
        .expect("prefill a");
    model
        .forward_last(&ids[..2], &mut caches[1], &mut scratch, &mut last)
        .expect("prefill b");
    let [a, b] = &mut caches;
    let mut rows = [
        BatchRow {
            token: ids[split],
            cache: a as &mut dyn KvCache,
            adapter: None,
        },
        BatchRow {
            token: ids[2],
            cache: b as &mut dyn KvCache,
            adapter: None,
        },
    ];
    model
        .decode_batch(&mut rows, &mut scratch, &mut logits)
        .expect("batched step");
    let row = |p: usize| &want[p * vocab..][..vocab];
    assert!(relative_error(&logits[..vocab], row(split)) <= TOLERANCE);
    assert!(relative_error(&logits[vocab..], row(2)) <= TOLERANCE);

    // Half and 8-bit storage run the same model, close to f32.
    for storage in [WeightStorage::F16, WeightStorage::Q8_0] {
        let m = source.load_llama(storage, |_| {}).expect("load");
        let err = relative_error(&prefill_logits(&m, &ids), &want);
        eprintln!("{}: {err:.3e}", storage.name());
        assert!(err < 0.05, "{}: {err}", storage.name());
    }
}

#[test]
fn gpt2_limits_and_missing_tokenizer_are_clear_errors() {
    let source = ModelSource::open(&model_dir()).expect("open");
    let model = source.load_llama(WeightStorage::F32, |_| {}).expect("load");
    let limit = model.config().max_seq_len;
    // One token more than the learned position table holds.
    let ids = vec![1u32; limit + 1];
    let mut cache = model.dense_cache(limit + 1);
    let err = model
        .forward_hidden(&ids, &mut cache, &mut ForwardScratch::default())
        .unwrap_err();
    assert!(
        matches!(err, ModelError::ContextOverflow { needed, limit: l } if needed == limit + 1 && l == limit),
        "{err}"
    );
    let err = source.tokenizer().unwrap_err();
    assert!(matches!(err, ModelError::MissingTokenizer(_)), "{err}");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn gpt2_compresses_and_the_saved_model_reloads() {
    let (ids, _, _) = reference();
    let dense = load(&model_dir(), WeightStorage::F32);
    let dense_logits = prefill_logits(&dense, &ids);
    // Calibration windows of token ids (no tokenizer: the ids are the text).
    let calibration: Vec<Vec<u32>> = (0..4)
        .map(|w| (0..32).map(|i| ((i * 37 + w * 101) % 512) as u32).collect())
        .collect();
    let runs = [
        (Method::Svd, RankPolicy::Energy(0.9)),
        (Method::Whitened, RankPolicy::Energy(0.9)),
        (Method::Svd, RankPolicy::KeepParams(0.6)),
        (Method::Whitened, RankPolicy::KeepParams(0.6)),
    ];
    for (run, (method, policy)) in runs.into_iter().enumerate() {
        let mut model = dense.clone();
        let opts = CompressOptions {
            policy,
            method,
            calibration: calibration.clone(),
            sequential: true,
            refit: false,
        };
        let report = compress(&mut model, &opts, |_, _| {}).expect("compress");
        // Six linears per block (no gate), every one visited.
        assert_eq!(report.matrices.len(), 6 * model.config().n_layers);
        assert!(report
            .matrices
            .iter()
            .any(|m| m.name.ends_with("mlp.up_proj")));
        assert!(report.matrices.iter().any(|m| m.rank.is_some()));
        assert!(report.params_after < report.params_before);
        if let RankPolicy::KeepParams(keep) = policy {
            // The budget is over the weight matrices; the biases stay as they are.
            let biases = report.params_before
                - dense
                    .linear_shapes()
                    .iter()
                    .map(|(o, i)| o * i)
                    .sum::<usize>();
            let weights_after = (report.params_after - biases) as f64;
            assert!(
                weights_after <= keep * (report.params_before - biases) as f64,
                "{} of {}",
                report.params_after,
                report.params_before
            );
        }
        let compressed = prefill_logits(&model, &ids);
        let drift = relative_error(&compressed, &dense_logits);
        eprintln!("{} {policy:?}: drift from dense {drift:.3e}", method.name());
        assert!(drift.is_finite() && drift > 0.0);

        let dir = std::env::temp_dir().join(format!("s2lc-gpt2-{run}-{}", std::process::id()));
        save_model_dir(&model, None, &dir, &serde_json::json!({"test": true})).expect("save");
        assert!(!dir.join("tokenizer.json").exists());
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["model_type"], "gpt2");
        let reloaded = load(&dir, WeightStorage::F32);
        assert_eq!(reloaded.linear_params(), model.linear_params());
        assert_eq!(reloaded.n_params(), model.n_params());
        let again = prefill_logits(&reloaded, &ids);
        let err = relative_error(&again, &compressed);
        assert!(err <= 1e-6, "{}: reloaded differs by {err}", method.name());
        // The reloaded model decodes through its cache too.
        let err = relative_error(&decode_logits(&reloaded, &ids), &compressed);
        assert!(err <= TOLERANCE, "{}: decode {err}", method.name());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn gpt2_dense_export_reloads_bit_identically() {
    let (ids, _, _) = reference();
    let model = load(&model_dir(), WeightStorage::F32);
    let dir = std::env::temp_dir().join(format!("s2lc-gpt2-dense-{}", std::process::id()));
    save_model_dir(&model, None, &dir, &serde_json::json!({})).expect("save");
    let reloaded = load(&dir, WeightStorage::F32);
    assert_eq!(
        prefill_logits(&reloaded, &ids),
        prefill_logits(&model, &ids)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
