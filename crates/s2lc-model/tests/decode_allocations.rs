//! A decode step allocates nothing once its buffers exist: every heap allocation made by this
//! test binary is counted, on the real SmolLM2 in each weight storage.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use s2lc_model::llama::ForwardScratch;
use s2lc_model::source::WeightStorage;
use s2lc_model::ModelSource;

/// The system allocator, counting calls to `alloc`/`realloc`.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

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

#[test]
fn decode_steps_allocate_nothing() {
    let path = s2lc_model::assets::smollm2();
    if !path.exists() {
        eprintln!(
            "skipped: {} absent (run scripts/fetch-assets)",
            path.display()
        );
        return;
    }
    let source = ModelSource::open(&path).unwrap();
    for storage in [WeightStorage::Native, WeightStorage::F32] {
        let model = source.load_llama(storage, |_| {}).unwrap();
        let mut cache = model.dense_cache(256);
        let mut scratch = ForwardScratch::default();
        let mut logits = Vec::new();
        // Warm-up: a 64-token prefill and two decode steps size every buffer and start the pool.
        let prompt: Vec<u32> = (1..65).collect();
        model
            .forward_last(&prompt, &mut cache, &mut scratch, &mut logits)
            .unwrap();
        for t in [100, 200] {
            model
                .forward_last(&[t], &mut cache, &mut scratch, &mut logits)
                .unwrap();
        }
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        assert!(before > 0, "the counting allocator is not in use");
        for t in 0..32u32 {
            model
                .forward_last(&[300 + t], &mut cache, &mut scratch, &mut logits)
                .unwrap();
        }
        let made = ALLOCATIONS.load(Ordering::Relaxed) - before;
        assert_eq!(
            made, 0,
            "{storage:?}: {made} allocations in 32 decode steps"
        );
    }
}
