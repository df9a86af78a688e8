//! A decode step allocates nothing once its buffers exist: every heap allocation made by this
//! test binary is counted, on the real SmolLM2 in each weight storage and with low-rank layers,
//! and on the GPT-2 fixture (learned positions, LayerNorm, GELU MLP). One test function, since
//! the count is global to the process.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use s2lc_model::linear::{Linear, LowRankLinear};
use s2lc_model::llama::{ForwardScratch, LlamaModel};
use s2lc_model::source::WeightStorage;
use s2lc_model::ModelSource;

/// The system allocator, counting calls to `alloc`/`realloc`.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System`, which meets the `GlobalAlloc` contract; counting
// neither allocates nor touches the memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Warms `model` up (a `prompt`-token prefill and two steps), then runs up to three runs of
/// `steps` decode steps, one of which must allocate nothing (see the comment inside).
fn assert_decode_allocates_nothing(model: &LlamaModel, prompt: usize, steps: u32, label: &str) {
    let mut cache = model.dense_cache(prompt + 2 + 3 * steps as usize);
    let mut scratch = ForwardScratch::default();
    let mut logits = Vec::new();
    let prompt: Vec<u32> = (1..=prompt as u32).collect();
    model
        .forward_last(&prompt, &mut cache, &mut scratch, &mut logits)
        .unwrap();
    for t in [100, 200] {
        model
            .forward_last(&[t], &mut cache, &mut scratch, &mut logits)
            .unwrap();
    }
    assert!(
        ALLOCATIONS.load(Ordering::Relaxed) > 0,
        "the counting allocator is not in use"
    );
    // Up to three runs, one of which must allocate nothing. A step that allocates fails all
    // three; on a loaded machine the thread pool's own work queues may grow once when a worker
    // is descheduled (seen as 2 allocations in one run), which is not the decode path's doing.
    let mut runs = Vec::new();
    for run in 0..3u32 {
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for t in 0..steps {
            model
                .forward_last(
                    &[300 + steps * run + t],
                    &mut cache,
                    &mut scratch,
                    &mut logits,
                )
                .unwrap();
        }
        runs.push(ALLOCATIONS.load(Ordering::Relaxed) - before);
        if runs.last() == Some(&0) {
            break;
        }
    }
    assert_eq!(
        runs.last(),
        Some(&0),
        "{label}: allocations per run of {steps} decode steps: {runs:?}"
    );
}

#[test]
fn decode_steps_allocate_nothing() {
    // GPT-2 (the committed fixture; its positions end at 64, its vocabulary at 512).
    let gpt2 = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2-tiny");
    let source = ModelSource::open(&gpt2).unwrap();
    for storage in [WeightStorage::F32, WeightStorage::Q8_0] {
        let model = source.load_llama(storage, |_| {}).unwrap();
        assert_decode_allocates_nothing(&model, 8, 16, &format!("gpt2 {storage:?}"));
    }

    let path = s2lc_model::assets::smollm2();
    if !path.exists() {
        eprintln!(
            "skipped: {} absent (run scripts/fetch-assets)",
            path.display()
        );
        return;
    }
    let source = ModelSource::open(&path).unwrap();
    for (storage, low_rank) in [
        (WeightStorage::Native, false),
        (WeightStorage::F32, false),
        (WeightStorage::F32, true),
    ] {
        let mut model = source.load_llama(storage, |_| {}).unwrap();
        if low_rank {
            // Rank-32 layers in place of every block's q/k/gate/down projections (the values
            // do not matter here, only that decode runs the two thin products).
            for block in model.blocks_mut() {
                let gate = block.gate_proj.as_mut().expect("a Llama block has a gate");
                for lin in [
                    &mut block.q_proj,
                    &mut block.k_proj,
                    gate,
                    &mut block.down_proj,
                ] {
                    let (o, i, r) = (lin.out_dim(), lin.in_dim(), 32);
                    let u = (0..o * r).map(|k| ((k % 7) as f32 - 3.0) * 1e-2).collect();
                    let vs = (0..r * i).map(|k| ((k % 5) as f32 - 2.0) * 1e-2).collect();
                    *lin = Linear::LowRank(LowRankLinear::new(u, vs, o, i, None));
                }
            }
        }
        let label = format!("{storage:?} (low-rank layers: {low_rank})");
        assert_decode_allocates_nothing(&model, 64, 32, &label);
    }
}
