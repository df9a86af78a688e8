//! The runtime against PyTorch + transformers on the real SmolLM2-135M GGUF.
//!
//! The fixture `tests/fixtures/smollm2_reference.json` (and its logits file) is written by
//! `scripts/reference/crosscheck_smollm2.py`; regenerate it with the script, never by hand.

use std::path::PathBuf;

use s2lc_model::eval::perplexity;
use s2lc_model::generate::{generate, Sampler, SamplingParams};
use s2lc_model::kv::DenseKvCache;
use s2lc_model::llama::ForwardScratch;
use s2lc_model::source::WeightStorage;
use s2lc_model::tokenizer::read_text_file;
use s2lc_model::ModelSource;
use serde_json::Value;

fn s2lc_home() -> PathBuf {
    s2lc_model::assets::home()
}

/// The SmolLM2 GGUF fetched by `scripts/fetch-assets`, or `None` (with the reason printed).
fn smollm2() -> Option<PathBuf> {
    let path = s2lc_model::assets::smollm2();
    if path.exists() {
        Some(path)
    } else {
        eprintln!(
            "skipped: {} absent (run scripts/fetch-assets)",
            path.display()
        );
        None
    }
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

#[test]
fn smollm2_matches_pytorch() {
    let Some(model_path) = smollm2() else { return };
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("smollm2_reference.json")).expect("fixture"),
    )
    .expect("fixture JSON");
    let source = ModelSource::open(&model_path).unwrap();
    let tokenizer = source.tokenizer().unwrap();
    let model = source.load_llama(WeightStorage::F32, |_| {}).unwrap();

    // 1. Token ids of the prompt.
    let prompt = reference["prompt"].as_str().unwrap();
    let add_special = reference["bos_added"].as_bool().unwrap();
    let prompt_ids = tokenizer.encode(prompt, add_special).unwrap();
    assert_eq!(
        prompt_ids,
        ids(&reference["prompt_ids"]),
        "prompt token ids"
    );

    // 2. Last-position logits within 1e-3 of their range.
    let bytes = std::fs::read(fixtures().join(reference["logits_file"].as_str().unwrap())).unwrap();
    let want: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let mut cache = DenseKvCache::new(model.config().n_layers, model.attn_shape(), 4096);
    let mut logits = Vec::new();
    model
        .forward_last(
            &prompt_ids,
            &mut cache,
            &mut ForwardScratch::default(),
            &mut logits,
        )
        .unwrap();
    assert_eq!(logits.len(), want.len());
    let range = want.iter().copied().fold(f32::NEG_INFINITY, f32::max)
        - want.iter().copied().fold(f32::INFINITY, f32::min);
    let max_diff = logits
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!("logits: max |ours - torch| = {max_diff:.3e}, range {range:.2}");
    assert!(
        max_diff <= 1e-3 * range,
        "logits differ by {max_diff} (range {range})"
    );

    // 3. Greedy continuation.
    let want_greedy = ids(&reference["greedy_ids"]);
    let mut cache = DenseKvCache::new(model.config().n_layers, model.attn_shape(), 4096);
    let mut sampler = Sampler::new(SamplingParams::default());
    let stats = generate(
        &model,
        &mut cache,
        &prompt_ids,
        want_greedy.len(),
        &mut sampler,
        &[],
        |_| true,
    )
    .unwrap();
    assert_eq!(stats.generated, want_greedy, "greedy continuation");

    // 4. Perplexity over independent 512-token windows of alice29.txt.
    let text = read_text_file(&s2lc_home().join("text/canterbury/alice29.txt")).unwrap();
    let n = reference["ppl_ids"].as_array().unwrap().len();
    let mut tokens = tokenizer.encode(&text, false).unwrap();
    tokens.truncate(n);
    assert_eq!(tokens, ids(&reference["ppl_ids"]), "alice29 token ids");
    let window = reference["ppl_window"].as_u64().unwrap() as usize;
    let stride = reference["ppl_stride"].as_u64().unwrap() as usize;
    let report = perplexity(&model, &tokens, window, stride, |_, _| {}).unwrap();
    let want_ppl = reference["ppl"].as_f64().unwrap();
    assert_eq!(
        report.predictions as u64,
        reference["ppl_predictions"].as_u64().unwrap()
    );
    let rel = (report.perplexity() - want_ppl).abs() / want_ppl;
    eprintln!(
        "perplexity: ours {:.4}, torch {want_ppl:.4} (rel diff {rel:.2e})",
        report.perplexity()
    );
    assert!(
        rel <= 1e-3,
        "perplexity {} vs {want_ppl}",
        report.perplexity()
    );
}

/// The GGUF model written as a Hugging Face directory (config.json + safetensors) loads back
/// through the safetensors source and computes the same logits.
#[test]
fn smollm2_hf_directory_round_trip() {
    let Some(model_path) = smollm2() else { return };
    let gguf = ModelSource::open(&model_path).unwrap();
    let cfg = gguf.config().unwrap();
    let dir = std::env::temp_dir().join(format!("s2lc-hf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tensors: Vec<(String, s2lc_model::source::Tensor)> = gguf
        .tensors()
        .describe()
        .into_iter()
        .map(|d| {
            let t = gguf.tensors().load(&d.name).unwrap();
            (d.name, t)
        })
        .collect();
    s2lc_model::source::write_safetensors(
        &dir.join("model.safetensors"),
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
        None,
    )
    .unwrap();
    drop(tensors);
    std::fs::write(dir.join("config.json"), cfg.to_hf_json().to_string()).unwrap();

    let hf = ModelSource::open(&dir).unwrap();
    assert_eq!(hf.format_name(), "hf");
    assert_eq!(hf.config().unwrap(), cfg);
    let prompt = [504u32, 2365, 6354, 16438, 27003, 690, 260, 23790];
    let logits_of = |source: &ModelSource| {
        let model = source.load_llama(WeightStorage::F32, |_| {}).unwrap();
        let mut cache = DenseKvCache::new(cfg.n_layers, model.attn_shape(), 64);
        let mut logits = Vec::new();
        model
            .forward_last(
                &prompt,
                &mut cache,
                &mut ForwardScratch::default(),
                &mut logits,
            )
            .unwrap();
        logits
    };
    let a = logits_of(&gguf);
    let b = logits_of(&hf);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(a, b);
}

/// Perplexity of `tokens[1..]` scored one token at a time through the KV cache: the batch-1
/// decode path (quantized activations for the block formats), not the batched prefill.
fn decode_path_perplexity(model: &s2lc_model::llama::LlamaModel, tokens: &[u32]) -> f64 {
    let mut cache = model.dense_cache(tokens.len());
    let mut scratch = ForwardScratch::default();
    let mut logits = Vec::new();
    let mut nll = 0.0f64;
    for (i, &t) in tokens[..tokens.len() - 1].iter().enumerate() {
        model
            .forward_last(&[t], &mut cache, &mut scratch, &mut logits)
            .unwrap();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max
            + logits
                .iter()
                .map(|&v| (v as f64 - max).exp())
                .sum::<f64>()
                .ln();
        nll += lse - logits[tokens[i + 1] as usize] as f64;
    }
    (nll / (tokens.len() - 1) as f64).exp()
}

#[test]
fn weight_formats_keep_the_decode_perplexity_and_f32_is_deterministic() {
    let Some(model_path) = smollm2() else { return };
    let source = ModelSource::open(&model_path).unwrap();
    let tokenizer = source.tokenizer().unwrap();
    let text = read_text_file(&s2lc_home().join("text/canterbury/lcet10.txt")).unwrap();
    let mut tokens = tokenizer.encode(&text, false).unwrap();
    tokens.truncate(769);

    let f32_model = source.load_llama(WeightStorage::F32, |_| {}).unwrap();
    let reference = decode_path_perplexity(&f32_model, &tokens);
    // Bit-for-bit deterministic: the same prefill twice gives identical logits.
    let run = || {
        let mut cache = f32_model.dense_cache(tokens.len());
        let mut logits = Vec::new();
        f32_model
            .forward_last(
                &tokens,
                &mut cache,
                &mut ForwardScratch::default(),
                &mut logits,
            )
            .unwrap();
        logits
    };
    assert!(run() == run(), "f32 prefill logits differ between runs");
    drop(f32_model);

    let mut failures = Vec::new();
    for storage in [
        WeightStorage::F16,
        WeightStorage::Q8_0,
        WeightStorage::Native,
    ] {
        let model = source.load_llama(storage, |_| {}).unwrap();
        if storage == WeightStorage::Native {
            // The file's own blocks, not a dequantized copy: Q4_1 linears, Q8_0 tied head.
            assert_eq!(
                model.blocks()[0].q_proj.format(),
                s2lc_model::kernels::WeightFormat::Q4_1
            );
            assert!(model.weight_bytes_per_token() < 100_000_000);
        }
        let ppl = decode_path_perplexity(&model, &tokens);
        let rel = ppl / reference - 1.0;
        eprintln!(
            "{storage:?}: decode-path perplexity {ppl:.4} vs f32 {reference:.4} ({:+.3}%)",
            100.0 * rel
        );
        if rel.abs() >= 0.005 {
            failures.push(format!("{storage:?}: {ppl:.4} vs f32 {reference:.4}"));
        }
    }
    assert!(failures.is_empty(), "beyond 0.5 %: {failures:?}");
}
