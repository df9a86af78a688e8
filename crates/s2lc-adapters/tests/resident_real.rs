//! The resident forms the server runs adapters in, on the real model (SmolLM2, its Q4_1 blocks as
//! served) with the real adapters (`tests/fixtures/adapters/alice-r4` and `alice-r4-e90`): a pack
//! member and a blend of members running from the pack's shared bases and cores, and a PEFT
//! adapter held as int4 blocks, each give the logits of the same adapter decoded to f32 factors
//! and applied unmerged; rows with different forms decoded in one batch step give what each gives
//! alone.

use std::path::PathBuf;
use std::sync::Arc;

use s2lc_adapters::pack::{pack, PackView, ResidentBases, ResidentCores};
use s2lc_adapters::{Member, PackParams};
use s2lc_model::kv::{DenseKvCache, KvCache};
use s2lc_model::llama::{BatchRow, ForwardScratch, LlamaModel};
use s2lc_model::lora::{AdapterDeltas, AdapterDtype, LoraAdapter};
use s2lc_model::source::WeightStorage;
use s2lc_model::ModelSource;

fn fixture(name: &str) -> LoraAdapter {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/adapters")
        .join(name);
    LoraAdapter::load(&dir).expect("fixture adapter")
}

fn smollm2() -> Option<LlamaModel> {
    let path = s2lc_model::assets::smollm2();
    if !path.exists() {
        eprintln!("skipped: SmolLM2 absent (run scripts/fetch-assets)");
        return None;
    }
    let source = ModelSource::open(&path).unwrap();
    Some(source.load_llama(WeightStorage::Native, |_| {}).unwrap())
}

/// Last-position logits of `prompt` with `adapter`, and the cache after it.
fn logits(
    model: &LlamaModel,
    prompt: &[u32],
    adapter: Option<&dyn AdapterDeltas>,
) -> (Vec<f32>, DenseKvCache) {
    let mut cache = DenseKvCache::new(model.config().n_layers, model.attn_shape(), 64);
    let mut out = Vec::new();
    model
        .forward_last_adapted(
            prompt,
            &mut cache,
            adapter,
            &mut ForwardScratch::default(),
            &mut out,
        )
        .unwrap();
    (out, cache)
}

/// `‖got − want‖ / ‖want‖`.
fn rel(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(g, w)| ((g - w) as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|&w| (w as f64).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn resident_forms_give_the_logits_of_their_f32_factors() {
    let Some(model) = smollm2() else { return };
    let (a, b) = (fixture("alice-r4"), fixture("alice-r4-e90"));
    let set = pack(
        &[
            Member::from_lora("alice-r4", &a),
            Member::from_lora("alice-r4-e90", &b),
        ],
        PackParams::default(),
    )
    .unwrap();
    let bases = Arc::new(ResidentBases::new(&set).unwrap());
    let cores = Arc::new(ResidentCores::new(&set).unwrap());
    let view = |w: &[(&str, f32)]| PackView::new("pack", bases.clone(), cores.clone(), w).unwrap();
    let member = view(&[("alice-r4", 1.0)]);
    let blend = view(&[("alice-r4", 0.7), ("alice-r4-e90", 0.3)]);
    let int4 = a.to_dtype(AdapterDtype::Int4).unwrap();
    let int4_f32 = int4.to_dtype(AdapterDtype::F32).unwrap();
    let prompt: Vec<u32> = vec![1, 30125, 436, 3432, 288, 919, 1067, 5072, 282];

    let (base, _) = logits(&model, &prompt, None);
    // What holding the bases and cores as Q8_0 blocks costs against the pack as stored.
    let stored = set.unpack_lora("alice-r4").unwrap();
    let (s_logits, _) = logits(&model, &prompt, Some(&stored));
    let (m_logits, _) = logits(&model, &prompt, Some(&member));
    let held = rel(&m_logits, &s_logits);
    eprintln!("pack member held as Q8_0 blocks: {held:.2e} from the stored pack decoded to f32");
    assert!(held < 1e-2, "{held}");
    let forms: [(&str, &dyn AdapterDeltas, LoraAdapter); 3] = [
        ("pack member", &member, member.to_lora()),
        ("blend", &blend, blend.to_lora()),
        ("int4 PEFT", &int4, int4_f32),
    ];
    let mut alone = Vec::new();
    for (name, resident, f32_form) in &forms {
        let (got, cache) = logits(&model, &prompt, Some(*resident));
        let (want, _) = logits(&model, &prompt, Some(f32_form));
        let (d, moved) = (rel(&got, &want), rel(&want, &base));
        eprintln!("{name}: {d:.2e} from its f32 factors; the adapter moves the logits {moved:.2e}");
        assert!(d < 1e-4, "{name}: {d}");
        assert!(
            moved > 100.0 * d,
            "{name}: the adapter must change the logits ({moved})"
        );
        alone.push((got, cache));
    }

    // One decode step with every form and a base row: each row as it is alone.
    let next = 2343u32;
    let mut want = Vec::new();
    for (i, (_, resident, _)) in forms.iter().enumerate() {
        let mut cache = alone[i].1.clone();
        let mut out = Vec::new();
        model
            .forward_last_adapted(
                &[next],
                &mut cache,
                Some(*resident),
                &mut ForwardScratch::default(),
                &mut out,
            )
            .unwrap();
        want.push(out);
    }
    let (_, mut base_cache) = logits(&model, &prompt, None);
    let mut base_next = Vec::new();
    model
        .forward_last(
            &[next],
            &mut base_cache.clone(),
            &mut ForwardScratch::default(),
            &mut base_next,
        )
        .unwrap();
    want.push(base_next);
    let mut caches: Vec<DenseKvCache> = alone.iter().map(|(_, c)| c.clone()).collect();
    let mut rows: Vec<BatchRow<'_>> = caches
        .iter_mut()
        .zip(&forms)
        .map(|(cache, (_, resident, _))| BatchRow {
            token: next,
            cache: cache as &mut dyn KvCache,
            adapter: Some(*resident),
        })
        .collect();
    rows.push(BatchRow {
        token: next,
        cache: &mut base_cache,
        adapter: None,
    });
    let mut out = Vec::new();
    model
        .decode_batch(&mut rows, &mut ForwardScratch::default(), &mut out)
        .unwrap();
    let vocab = model.config().vocab_size;
    for (i, w) in want.iter().enumerate() {
        let d = rel(&out[i * vocab..(i + 1) * vocab], w);
        assert!(d < 1e-5, "row {i}: {d}");
    }
}
