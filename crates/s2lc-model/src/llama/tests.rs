//! Tests of the model on small random weights: LoRA merged and unmerged, adapters for another
//! base, low-rank loading, prefill against decode and batched against single steps.

use faer::Accum;

use super::*;
use crate::kernels::WeightFormat;
use crate::kv::{DenseKvCache, KvCache};
use crate::linear::LinearScratch;
use crate::lora::LoraDelta;
use crate::source::MemorySource;

#[test]
fn rms_norm_by_hand() {
    let x = [3.0, 4.0, 0.0, 0.0];
    let mut out = [0.0; 4];
    rms_norm(&x, &[1.0, 2.0, 1.0, 1.0], 0.0, &mut out);
    // mean square = 25/4, rms = 2.5
    assert_eq!(out, [1.2, 3.2, 0.0, 0.0]);
}

/// A one-layer model with hidden size 4 built in memory.
fn tiny() -> LlamaModel {
    random_model(4, 6, 1, (2, 1), 5, 0)
}

/// An adapter with a delta on every linear of every layer of `model`.
fn full_adapter(model: &LlamaModel, rank: usize, scale: f32) -> LoraAdapter {
    let layers = model
        .blocks()
        .iter()
        .enumerate()
        .map(|(l, b)| {
            let ls = b.slots();
            std::array::from_fn(|t| {
                let lin = ls[t].1?;
                let (out, inp) = (lin.out_dim(), lin.in_dim());
                let v = |n: usize, s: usize| {
                    (0..n)
                        .map(|i| (((i * 31 + s * 17 + l * 5) % 23) as f32 - 11.0) / 23.0)
                        .collect::<Vec<f32>>()
                };
                Some(LoraDelta::new(
                    v(rank * inp, t),
                    v(out * rank, t + 7),
                    rank,
                    inp,
                    out,
                    scale,
                ))
            })
        })
        .collect();
    LoraAdapter {
        path: "test-adapter".into(),
        rank,
        alpha: scale * rank as f32,
        scale,
        base_model: None,
        layers,
    }
}

pub(crate) fn last_logits(model: &LlamaModel, tokens: &[u32]) -> Vec<f32> {
    let mut cache = DenseKvCache::new(model.config().n_layers, model.attn_shape(), 64);
    let mut out = Vec::new();
    model
        .forward_last(tokens, &mut cache, &mut ForwardScratch::default(), &mut out)
        .unwrap();
    out
}

#[test]
fn unmerged_lora_equals_merged_lora_and_changes_the_output() {
    let base = random_model(8, 12, 2, (2, 1), 11, 3);
    let tokens = [1u32, 4, 7, 2, 9];
    let plain = last_logits(&base, &tokens);
    let adapter = full_adapter(&base, 2, 0.5);
    let mut unmerged = base.clone();
    unmerged.attach_adapter(&adapter).unwrap();
    let a = last_logits(&unmerged, &tokens);
    let mut merged = unmerged.clone();
    merged.merge_adapters().unwrap();
    assert!(merged
        .blocks()
        .iter()
        .all(|b| b.lora.iter().all(Vec::is_empty)));
    let b = last_logits(&merged, &tokens);
    let diff = a
        .iter()
        .zip(&plain)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(diff > 1e-3, "the adapter changes the logits ({diff})");
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
    }
    // Detaching restores the base model exactly.
    let mut detached = unmerged.clone();
    detached.detach_adapters();
    assert_eq!(last_logits(&detached, &tokens), plain);
    // Two adapters add up: attaching the same one twice doubles the delta.
    let mut twice = base.clone();
    twice.attach_adapter(&adapter).unwrap();
    twice.attach_adapter(&adapter).unwrap();
    let doubled = full_adapter(&base, 2, 1.0);
    let mut once = base.clone();
    once.attach_adapter(&doubled).unwrap();
    for (x, y) in last_logits(&twice, &tokens)
        .iter()
        .zip(&last_logits(&once, &tokens))
    {
        assert!((x - y).abs() < 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
    }
}

#[test]
fn adapters_for_another_base_are_rejected_untouched() {
    let base = random_model(8, 12, 2, (2, 1), 11, 3);
    let other = random_model(8, 16, 2, (2, 1), 11, 3);
    let mut model = base.clone();
    let err = model
        .attach_adapter(&full_adapter(&other, 2, 1.0))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("layer 0 mlp.gate_proj") && err.contains("another base"),
        "{err}"
    );
    assert!(model
        .blocks()
        .iter()
        .all(|b| b.lora.iter().all(Vec::is_empty)));
    let deeper = random_model(8, 12, 3, (2, 1), 11, 3);
    let err = model
        .attach_adapter(&full_adapter(&deeper, 2, 1.0))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("adapts layer 2 but the model has 2 layers"),
        "{err}"
    );
}

#[test]
fn low_rank_factors_load_as_q8_0_with_the_rank_padded_to_a_block() {
    let (out, inp, rank) = (40, 64, 5);
    let val = |i: usize, k: usize| (((i * 7 + k * 13) % 17) as f32 - 8.0) / 8.0;
    let mut src = MemorySource::new();
    src.insert(
        "l.lowrank_u",
        vec![out, rank],
        (0..out * rank).map(|i| val(i, 1)).collect(),
    );
    src.insert(
        "l.lowrank_vs",
        vec![rank, inp],
        (0..rank * inp).map(|i| val(i, 2)).collect(),
    );
    let w = Weights::new(&src).pp("l");
    let exact = load_linear(&w, out, inp, false, WeightStorage::F32).unwrap();
    let int8 = load_linear(&w, out, inp, false, WeightStorage::Q8_0).unwrap();
    let Linear::LowRank(lr) = &int8 else {
        panic!("not low-rank")
    };
    assert_eq!(lr.rank(), 32);
    assert_eq!(lr.matrices().0.format(), WeightFormat::Q8_0);
    assert_eq!(lr.matrices().1.format(), WeightFormat::Q8_0);
    let x: Vec<f32> = (0..inp).map(|i| val(i, 3)).collect();
    let (mut a, mut b) = (vec![0.0; out], vec![0.0; out]);
    let mut scratch = LinearScratch::default();
    exact.forward(&x, 1, &mut a, Accum::Replace, &mut scratch);
    int8.forward(&x, 1, &mut b, Accum::Replace, &mut scratch);
    let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for (p, q) in a.iter().zip(&b) {
        assert!((p - q).abs() < 0.02 * scale, "{p} vs {q}");
    }
}

#[test]
fn prefill_and_decode_agree() {
    let model = tiny();
    let tokens = [1u32, 3, 0, 4, 2];
    let mut scratch = ForwardScratch::default();
    let mut cache = DenseKvCache::new(1, model.attn_shape(), 16);
    let hidden = model
        .forward_hidden(&tokens, &mut cache, &mut scratch)
        .unwrap()
        .to_vec();
    let mut all = Vec::new();
    model.logits(&hidden, &mut all);
    let mut step_cache = DenseKvCache::new(1, model.attn_shape(), 16);
    let mut out = Vec::new();
    for (i, &t) in tokens.iter().enumerate() {
        model
            .forward_last(&[t], &mut step_cache, &mut scratch, &mut out)
            .unwrap();
        for (a, b) in out.iter().zip(&all[i * 5..][..5]) {
            assert!((a - b).abs() < 1e-5, "position {i}: {a} vs {b}");
        }
    }
    assert_eq!(step_cache.len(), 5);
    assert!(matches!(
        model.forward_last(&[9], &mut step_cache, &mut scratch, &mut out),
        Err(ModelError::TokenOutOfRange { id: 9, vocab: 5 })
    ));
}
#[test]
fn a_batched_step_equals_each_sequence_run_alone() {
    // Two layers, 2 query heads over 1 KV head; three sequences at different positions:
    // no adapter, adapter A, adapter A again (one shared delta product), then adapter B.
    let model = random_model(8, 12, 2, (2, 1), 7, 3);
    let (a, b) = (full_adapter(&model, 2, 0.7), full_adapter(&model, 3, -0.4));
    let prompts: [&[u32]; 4] = [&[1, 2, 3], &[4], &[0, 5, 6, 2, 1], &[3, 3]];
    let adapters = [None, Some(&a), Some(&a), Some(&b)];
    let next = [5u32, 0, 6, 1];
    let mut scratch = ForwardScratch::default();
    let mut want = Vec::new();
    let mut caches = Vec::new();
    for ((prompt, adapter), t) in prompts.iter().zip(adapters).zip(next) {
        // The reference attaches the adapter; the batch's prefill passes it per call.
        let mut m = model.clone();
        if let Some(ad) = adapter {
            m.attach_adapter(ad).unwrap();
        }
        let mut out = Vec::new();
        let mut cache = DenseKvCache::new(2, m.attn_shape(), 16);
        model
            .forward_last_adapted(
                prompt,
                &mut cache,
                adapter.map(|a| a as _),
                &mut scratch,
                &mut out,
            )
            .unwrap();
        caches.push(cache);
        let mut cache = DenseKvCache::new(2, m.attn_shape(), 16);
        m.forward_last(prompt, &mut cache, &mut scratch, &mut out)
            .unwrap();
        m.forward_last(&[t], &mut cache, &mut scratch, &mut out)
            .unwrap();
        want.push(out);
    }
    let mut rows: Vec<BatchRow<'_>> = caches
        .iter_mut()
        .zip(adapters)
        .zip(next)
        .map(|((cache, adapter), token)| BatchRow {
            token,
            cache,
            adapter: adapter.map(|a| a as _),
        })
        .collect();
    let mut out = Vec::new();
    model
        .decode_batch(&mut rows, &mut scratch, &mut out)
        .unwrap();
    for (i, w) in want.iter().enumerate() {
        for (x, y) in out[i * 7..][..7].iter().zip(w) {
            assert!((x - y).abs() < 1e-5, "sequence {i}: {x} vs {y}");
        }
    }
    for (cache, prompt) in caches.iter().zip(prompts) {
        assert_eq!(cache.len(), prompt.len() + 1);
    }
    // An adapter for another base is refused before anything is committed.
    let other = random_model(8, 12, 3, (2, 1), 7, 4);
    let stranger = full_adapter(&other, 2, 1.0);
    let mut rows = vec![BatchRow {
        token: 1,
        cache: &mut caches[0],
        adapter: Some(&stranger),
    }];
    let err = model
        .decode_batch(&mut rows, &mut scratch, &mut out)
        .unwrap_err();
    assert!(err.to_string().contains("another base"), "{err}");
    assert_eq!(caches[0].len(), 4);
}

/// The GPT-2 fixture (no gate): an adapter on every linear it has runs unmerged and merged
/// alike; one that adapts the absent gate is refused by name.
#[test]
fn gpt2_adapters_cover_its_six_linears_and_refuse_a_gate() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2-tiny");
    let source = crate::ModelSource::open(&dir).unwrap();
    let mut model = source
        .load_llama(crate::source::WeightStorage::F32, |_| {})
        .unwrap();
    assert!(model.blocks().iter().all(|b| b.gate_proj.is_none()));
    assert_eq!(model.blocks()[0].linears().count(), 6);
    let tokens = [3, 1, 4, 1, 5, 9, 2, 6];
    let base = last_logits(&model, &tokens);
    let adapter = full_adapter(&model, 2, 0.5);
    assert!(adapter.layers.iter().all(|l| l[4].is_none()));
    model.attach_adapter(&adapter).unwrap();
    let unmerged = last_logits(&model, &tokens);
    model.merge_adapters().unwrap();
    let merged = last_logits(&model, &tokens);
    let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff(&unmerged, &base) > 1e-3, "the adapter changes nothing");
    assert!(diff(&unmerged, &merged) < 1e-4);

    let mut gated = full_adapter(&model, 2, 0.5);
    let up = gated.layers[0][5].clone();
    gated.layers[0][4] = up;
    let err = model.attach_adapter(&gated).unwrap_err().to_string();
    assert!(
        err.contains("mlp.gate_proj") && err.contains("gpt2"),
        "{err}"
    );
}
