//! Coverage feedback: LLVM SanitizerCoverage's inline 8-bit counters, registered by every
//! instrumented module, read as (edge, hit-count bucket) pairs.

use std::sync::atomic::{AtomicUsize, Ordering};

const MAX_REGIONS: usize = 1 << 14;
static REGIONS: [(AtomicUsize, AtomicUsize); MAX_REGIONS] =
    [const { (AtomicUsize::new(0), AtomicUsize::new(0)) }; MAX_REGIONS];
static N_REGIONS: AtomicUsize = AtomicUsize::new(0);

/// Called by each instrumented module's constructor with its counters.
#[no_mangle]
pub extern "C" fn __sanitizer_cov_8bit_counters_init(start: *mut u8, end: *mut u8) {
    let i = N_REGIONS.fetch_add(1, Ordering::SeqCst);
    if i < MAX_REGIONS && (end as usize) > (start as usize) {
        REGIONS[i].0.store(start as usize, Ordering::SeqCst);
        REGIONS[i].1.store(end as usize, Ordering::SeqCst);
    }
}

/// The registered counter regions (empty in a build without coverage).
fn regions() -> Vec<&'static mut [u8]> {
    let n = N_REGIONS.load(Ordering::SeqCst).min(MAX_REGIONS);
    (0..n)
        .filter_map(|i| {
            let (s, e) = (
                REGIONS[i].0.load(Ordering::SeqCst),
                REGIONS[i].1.load(Ordering::SeqCst),
            );
            // SAFETY: the region is a module's counter array, alive for the whole process; the
            // fuzzer reads and clears it between runs (instrumented code only increments it).
            (e > s).then(|| unsafe { std::slice::from_raw_parts_mut(s as *mut u8, e - s) })
        })
        .collect()
}

/// AFL's hit-count buckets: 1, 2, 3, 4–7, 8–15, 16–31, 32–127, 128+.
fn bucket(hits: u8) -> u8 {
    match hits {
        0 => 0,
        1 => 1,
        2 => 2,
        3 => 4,
        4..=7 => 8,
        8..=15 => 16,
        16..=31 => 32,
        32..=127 => 64,
        _ => 128,
    }
}

pub(super) struct Coverage {
    regions: Vec<&'static mut [u8]>,
    /// Per counter, the buckets seen so far.
    seen: Vec<Vec<u8>>,
}

impl Coverage {
    pub(super) fn new() -> Self {
        let regions = regions();
        let seen = regions.iter().map(|r| vec![0u8; r.len()]).collect();
        Coverage { regions, seen }
    }

    pub(super) fn instrumented(&self) -> bool {
        !self.regions.is_empty()
    }

    pub(super) fn clear(&mut self) {
        for r in &mut self.regions {
            r.fill(0);
        }
    }

    /// New (counter, bucket) pairs the last run reached; the counters are cleared.
    pub(super) fn harvest(&mut self) -> usize {
        let mut new = 0;
        for (r, seen) in self.regions.iter_mut().zip(&mut self.seen) {
            for (c, s) in r.iter_mut().zip(seen.iter_mut()) {
                if *c != 0 {
                    let b = bucket(*c);
                    if *s & b == 0 {
                        *s |= b;
                        new += 1;
                    }
                    *c = 0;
                }
            }
        }
        new
    }

    /// Counters ever hit.
    pub(super) fn edges(&self) -> usize {
        self.seen.iter().flatten().filter(|&&s| s != 0).count()
    }
}
