//! quant-lr on SmolLM2: the output error a layer reports equals the error of its outputs run
//! through the runtime's kernels, and a saved model reloads to bit-identical logits.

use faer::Accum;
use s2lc_model::compress::{calibration_windows, quantize_lowrank, save_model_dir, QuantLrOptions};
use s2lc_model::linear::{Linear, LinearScratch};
use s2lc_model::llama::{ActivationObserver, ForwardScratch, LinearInput, LlamaModel};
use s2lc_model::source::WeightStorage;
use s2lc_model::tokenizer::read_text_file;
use s2lc_model::ModelSource;

/// Records the attention input of block 0.
struct Tap(Vec<f32>);

impl ActivationObserver for Tap {
    fn observe(&mut self, layer: usize, input: LinearInput, x: &[f32], _n: usize) {
        if layer == 0 && input == LinearInput::Attention {
            self.0.extend_from_slice(x);
        }
    }
}

fn last_logits(model: &LlamaModel, ids: &[u32]) -> Vec<f32> {
    let mut cache = model.dense_cache(ids.len());
    let mut out = Vec::new();
    model
        .forward_last(ids, &mut cache, &mut ForwardScratch::default(), &mut out)
        .expect("forward");
    out
}

#[test]
fn reported_error_is_the_runtime_error_and_reload_is_bit_identical() {
    let path = s2lc_model::assets::smollm2();
    let text = s2lc_model::assets::home().join("text/canterbury/alice29.txt");
    if !path.exists() || !text.exists() {
        eprintln!("skipped: SmolLM2 or alice29.txt absent (run scripts/fetch-assets)");
        return;
    }
    let source = ModelSource::open(&path).unwrap();
    let tokenizer = source.tokenizer().unwrap();
    let tokens = tokenizer
        .encode(&read_text_file(&text).unwrap(), false)
        .unwrap();
    let dense = source.load_llama(WeightStorage::F32, |_| {}).unwrap();
    let windows = calibration_windows(&tokens, 2, 128, 0).unwrap();
    let mut model = dense.clone();
    let opts = QuantLrOptions {
        bits_per_weight: 3.75,
        bits: vec![3],
        ranks: vec![0, 8],
        iters: 1,
        calibration: windows.clone(),
    };
    let report = quantize_lowrank(&mut model, &opts, |_, _| {}).unwrap();
    assert!(report.bits_per_weight <= 3.75, "{}", report.bits_per_weight);
    assert!(report.matrices.iter().any(|m| m.rank == 8));

    // Block 0's q_proj: the calibration inputs through the dense and the quantized layer.
    let mut x = Vec::new();
    let mut tap = Tap(Vec::new());
    for w in &windows {
        dense.embed(w, &mut x).unwrap();
        let mut cache = dense.dense_cache(w.len());
        dense
            .run_block(
                0,
                &mut x,
                &mut cache,
                &mut ForwardScratch::default(),
                Some(&mut tap),
            )
            .unwrap();
    }
    let n = tap.0.len() / 576;
    let (dl, ql) = (&dense.blocks()[0].q_proj, &model.blocks()[0].q_proj);
    assert!(matches!(ql, Linear::Corrected(_)));
    let (mut yd, mut yq) = (vec![0.0; n * 576], vec![0.0; n * 576]);
    let mut s = LinearScratch::default();
    dl.forward(&tap.0, n, &mut yd, Accum::Replace, &mut s);
    ql.forward(&tap.0, n, &mut yq, Accum::Replace, &mut s);
    let err: f64 = yd
        .iter()
        .zip(&yq)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let norm: f64 = yd.iter().map(|a| (*a as f64).powi(2)).sum();
    let m = &report.matrices[0];
    assert_eq!(m.name, "model.layers.0.self_attn.q_proj");
    let measured = err / norm;
    assert!(
        (measured - m.rel_error).abs() <= 0.02 * m.rel_error,
        "runtime {measured:e} vs reported {:e}",
        m.rel_error
    );

    // Saved and reloaded: the same logits, bit for bit.
    let dir = std::env::temp_dir().join(format!("s2lc-quantlr-{}", std::process::id()));
    save_model_dir(&model, Some(&tokenizer), &dir, &serde_json::json!({})).unwrap();
    let reloaded = ModelSource::open(&dir)
        .unwrap()
        .load_llama(WeightStorage::Native, |_| {})
        .unwrap();
    let ids = &tokens[..24];
    assert_eq!(last_logits(&model, ids), last_logits(&reloaded, ids));
    let _ = std::fs::remove_dir_all(&dir);
}
