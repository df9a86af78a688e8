//! A real PEFT LoRA adapter (trained by `scripts/reference/train_adapters.py` on `alice29.txt`,
//! committed under `tests/fixtures/adapters/alice-r4`) in the runtime, against PyTorch + PEFT, and
//! an adapter written by S2LC read back by PEFT (`tests/fixtures/adapters/alice-r4-e90`).

use std::path::{Path, PathBuf};

use s2lc_model::eval::perplexity;
use s2lc_model::kv::DenseKvCache;
use s2lc_model::llama::{ForwardScratch, LlamaModel};
use s2lc_model::lora::{AdapterDtype, LoraAdapter};
use s2lc_model::source::WeightStorage;
use s2lc_model::tokenizer::{read_text_file, Tokenizer};
use s2lc_model::ModelSource;
use serde_json::Value;

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/adapters")
        .join(name)
}

fn fixture() -> PathBuf {
    fixture_dir("alice-r4")
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("fixture JSON")
}

/// S2LC's last-position logits of the fixture's prompt against PEFT's (`reference.json` and the
/// logits file beside it): same prompt ids, max difference within 1e-3 of PEFT's logit range.
fn assert_logits_match_peft(model: &LlamaModel, tokenizer: &Tokenizer, dir: &Path) {
    let reference = read_json(&dir.join("reference.json"));
    let prompt = reference["prompt"].as_str().unwrap();
    let ids = tokenizer
        .encode(prompt, reference["bos_added"].as_bool().unwrap())
        .unwrap();
    let want_ids: Vec<u32> = reference["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids, want_ids, "prompt token ids");
    let bytes = std::fs::read(dir.join(reference["logits_file"].as_str().unwrap())).unwrap();
    let want: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let mut logits = Vec::new();
    let mut cache = DenseKvCache::new(model.config().n_layers, model.attn_shape(), 64);
    model
        .forward_last(
            &ids,
            &mut cache,
            &mut ForwardScratch::default(),
            &mut logits,
        )
        .unwrap();
    let range =
        reference["logits_max"].as_f64().unwrap() - reference["logits_min"].as_f64().unwrap();
    let diff = logits
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs() as f64)
        .fold(0.0, f64::max);
    eprintln!(
        "{}: max |S2LC − PEFT| logit difference {diff:.2e} (range {range:.2})",
        dir.display()
    );
    assert!(diff <= 1e-3 * range, "{diff} vs range {range}");
}

/// The SmolLM2 GGUF loaded in f32 with its tokenizer, or `None` when the assets are absent.
fn smollm2_f32() -> Option<(LlamaModel, Tokenizer)> {
    let model_path = s2lc_model::assets::smollm2();
    if !model_path.exists() {
        eprintln!("skipped: SmolLM2 absent (run scripts/fetch-assets)");
        return None;
    }
    let source = ModelSource::open(&model_path).unwrap();
    let tokenizer = source.tokenizer().unwrap();
    Some((
        source.load_llama(WeightStorage::F32, |_| {}).unwrap(),
        tokenizer,
    ))
}

/// An adapter written by S2LC (`s2lc adapters truncate` of alice-r4 at 90 % energy, per-module
/// ranks in `rank_pattern`) gives PEFT's logits when PEFT loads it
/// (`scripts/reference/check_peft_roundtrip.py`), and S2LC's own truncation reproduces it.
#[test]
fn s2lc_written_adapter_matches_peft() {
    let Some((base, tokenizer)) = smollm2_f32() else {
        return;
    };
    let dir = fixture_dir("alice-r4-e90");
    let reference = read_json(&dir.join("reference.json"));
    let written = LoraAdapter::load(&dir).unwrap();
    let mut adapted = base.clone();
    adapted.attach_adapter(&written).unwrap();
    assert_logits_match_peft(&adapted, &tokenizer, &dir);

    let energy = reference["energy"].as_f64().unwrap();
    let (again, _) = LoraAdapter::load(&fixture())
        .unwrap()
        .truncate(Some(energy), None)
        .unwrap();
    assert_eq!(again.n_deltas(), written.n_deltas());
    for ((l0, t0, d0), (l1, t1, d1)) in again.deltas().zip(written.deltas()) {
        assert_eq!((l0, t0, d0.rank()), (l1, t1, d1.rank()), "module ranks");
        let (x, y) = (d0.dense(), d1.dense());
        let scale = y.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = x
            .iter()
            .zip(&y)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff <= 1e-4 * scale,
            "layer {l0} target {t0}: {diff} vs {scale}"
        );
    }
}

#[test]
fn real_adapter_matches_peft_and_lowers_its_domains_perplexity() {
    let text_path = s2lc_model::assets::home().join("text/canterbury/alice29.txt");
    if !text_path.exists() {
        eprintln!("skipped: alice29.txt absent (run scripts/fetch-assets)");
        return;
    }
    let Some((base, tokenizer)) = smollm2_f32() else {
        return;
    };
    let reference = read_json(&fixture().join("reference.json"));
    let adapter = LoraAdapter::load(&fixture()).unwrap();
    assert_eq!(adapter.rank as u64, reference["rank"].as_u64().unwrap());
    let mut adapted = base.clone();
    adapted.attach_adapter(&adapter).unwrap();

    // Last-position logits of the fixed prompt, unmerged, within 1e-3 of PEFT's range.
    assert_logits_match_peft(&adapted, &tokenizer, &fixture());

    // Held-out perplexity on its own domain, with PyTorch's protocol (independent full windows).
    let tokens = tokenizer
        .encode(&read_text_file(&text_path).unwrap(), false)
        .unwrap();
    let start = reference["heldout_start_token"].as_u64().unwrap() as usize;
    let seq = reference["seq"].as_u64().unwrap() as usize;
    let windows = (tokens.len() - start) / seq;
    let held_out = &tokens[start..start + windows * seq];
    let ppl_base = perplexity(&base, held_out, seq, seq, |_, _| {}).unwrap();
    let ppl_adapted = perplexity(&adapted, held_out, seq, seq, |_, _| {}).unwrap();
    assert_eq!(
        ppl_base.predictions as u64,
        reference["heldout_tokens_scored"].as_u64().unwrap()
    );
    let (b, a) = (ppl_base.perplexity(), ppl_adapted.perplexity());
    let (tb, ta) = (
        reference["base_heldout_ppl"].as_f64().unwrap(),
        reference["adapter_heldout_ppl"].as_f64().unwrap(),
    );
    eprintln!("held-out perplexity: base {b:.4} (PyTorch {tb:.4}), adapter {a:.4} (PEFT {ta:.4})");
    assert!(
        a < b,
        "the adapter lowers perplexity on its own domain: {a} vs {b}"
    );
    assert!((b / tb - 1.0).abs() < 1e-3 && (a / ta - 1.0).abs() < 1e-3);

    // The compact resident forms the server holds adapters in (`--adapter-dtype`): f16 factors
    // are within rounding of f32; int8 and int4 (Q8_0, Q4_0 blocks) cost at most 0.5 % perplexity,
    // the bound a compact form must meet to be offered.
    for (dtype, bound) in [
        (AdapterDtype::F16, 1e-4),
        (AdapterDtype::Int8, 5e-3),
        (AdapterDtype::Int4, 5e-3),
    ] {
        let compact = adapter.to_dtype(dtype).unwrap();
        let mut model = base.clone();
        model.attach_adapter(&compact).unwrap();
        let p = perplexity(&model, held_out, seq, seq, |_, _| {})
            .unwrap()
            .perplexity();
        let cost = p / a - 1.0;
        eprintln!(
            "{dtype} factors: held-out perplexity {p:.4} ({:+.4} % vs f32), {} of {} bytes",
            100.0 * cost,
            compact.resident_bytes(),
            adapter.resident_bytes()
        );
        assert!(cost.abs() <= bound, "{dtype}: {cost}");
    }
}
