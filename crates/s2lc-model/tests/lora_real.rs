//! A real PEFT LoRA adapter (trained by `scripts/reference/train_adapters.py` on `alice29.txt`,
//! committed under `tests/fixtures/adapters/alice-r4`) in the runtime, against PyTorch + PEFT.

use std::path::PathBuf;

use s2lc_model::eval::perplexity;
use s2lc_model::kv::DenseKvCache;
use s2lc_model::llama::ForwardScratch;
use s2lc_model::lora::LoraAdapter;
use s2lc_model::source::WeightStorage;
use s2lc_model::tokenizer::read_text_file;
use s2lc_model::ModelSource;
use serde_json::Value;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/adapters/alice-r4")
}

#[test]
fn real_adapter_matches_peft_and_lowers_its_domains_perplexity() {
    let model_path = s2lc_model::assets::smollm2();
    let text_path = s2lc_model::assets::home().join("text/canterbury/alice29.txt");
    if !model_path.exists() || !text_path.exists() {
        eprintln!("skipped: SmolLM2 or alice29.txt absent (run scripts/fetch-assets)");
        return;
    }
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture().join("reference.json")).expect("fixture"),
    )
    .expect("fixture JSON");
    let source = ModelSource::open(&model_path).unwrap();
    let tokenizer = source.tokenizer().unwrap();
    let base = source.load_llama(WeightStorage::F32, |_| {}).unwrap();
    let adapter = LoraAdapter::load(&fixture()).unwrap();
    assert_eq!(adapter.rank as u64, reference["rank"].as_u64().unwrap());
    let mut adapted = base.clone();
    adapted.attach_adapter(&adapter).unwrap();

    // Last-position logits of the fixed prompt, unmerged, within 1e-3 of PEFT's range.
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
    let bytes = std::fs::read(fixture().join(reference["logits_file"].as_str().unwrap())).unwrap();
    let want: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let mut logits = Vec::new();
    let mut cache = DenseKvCache::new(adapted.config().n_layers, adapted.attn_shape(), 64);
    adapted
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
    eprintln!("max |S2LC − PEFT| logit difference {diff:.2e} (range {range:.2})");
    assert!(diff <= 1e-3 * range, "{diff} vs range {range}");

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
}
