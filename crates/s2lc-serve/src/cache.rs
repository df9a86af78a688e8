//! The just-in-time adapter cache: adapters are loaded (pulled from the store, unpacked) on first
//! use and kept within a byte budget, least recently used first out, pinned ones never.
//!
//! Concurrency contract:
//! - **Single flight**: concurrent requests for the same cold key run one load; the others wait
//!   for its result (success or error) instead of loading again.
//! - **No head-of-line blocking**: the cache lock is never held while loading, so a slow load never
//!   delays requests for other keys.
//! - **Budget**: after an insert the resident bytes are at most the budget; entries still in use
//!   by a request (an `Arc` held elsewhere) may be evicted from the cache, their memory is freed
//!   when the request drops them. A value larger than the whole budget is refused with an error.
//! - **Shared parts**: a value that others depend on (a pack's bases and cores, held by every
//!   member and blend of the pack, resident or running in a batch row) is never evicted while
//!   the cache's `busy` test says so ([`JitCache::with_busy`]): evicting it would free nothing.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Why a value could not be had from the cache.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheError<E> {
    /// The loader failed; waiters of the same flight get the same error.
    #[error("{0}")]
    Load(E),
    /// The loader panicked (a bug); the slot is cleared so a later get loads again.
    #[error("loading {0} panicked")]
    Panicked(String),
    /// The value does not fit: larger than the budget, or the rest is pinned.
    #[error("{key} needs {needed} bytes but the adapter cache has {free} of {budget} bytes free (the rest is pinned)")]
    OverBudget {
        /// The key.
        key: String,
        /// Its size.
        needed: usize,
        /// Bytes that can be freed or are free.
        free: usize,
        /// The budget.
        budget: usize,
    },
}

/// Counters for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Gets served from a resident value.
    pub hits: u64,
    /// Gets that started a load.
    pub misses: u64,
    /// Gets that waited for another request's load of the same key.
    pub coalesced: u64,
    /// Entries evicted to stay within the budget.
    pub evictions: u64,
    /// Loads that failed.
    pub failures: u64,
    /// Bytes resident now.
    pub resident_bytes: usize,
    /// Entries resident now.
    pub resident: usize,
}

/// A load in progress, shared by the request that runs it and those that wait for it.
struct Flight<V, E> {
    result: Mutex<Option<Result<Arc<V>, CacheError<E>>>>,
    done: Condvar,
}

enum Slot<V, E> {
    Loading(Arc<Flight<V, E>>),
    Ready {
        value: Arc<V>,
        bytes: usize,
        last_used: u64,
        pinned: bool,
    },
}

struct Inner<V, E> {
    slots: HashMap<String, Slot<V, E>>,
    /// Logical clock for LRU order.
    clock: u64,
    resident_bytes: usize,
    stats: CacheStats,
    /// Seconds of every completed load, for the latency histogram.
    load_seconds: Vec<f64>,
}

/// A byte-budgeted, LRU, single-flight cache of shared values (unpacked adapters); `E` is the
/// loader's error.
pub struct JitCache<V, E = String> {
    budget: usize,
    /// Whether a resident value is in use by other resident values or by requests in a way
    /// that evicting it would not free its memory (a pack's bases while any view of the pack
    /// exists): such entries are never evicted.
    busy: fn(&V) -> bool,
    inner: Mutex<Inner<V, E>>,
}

impl<V, E> std::fmt::Debug for JitCache<V, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JitCache(budget {} bytes)", self.budget)
    }
}

/// Locks, recovering from a poisoned lock: the cache's invariants hold between statements, so a
/// panic elsewhere (a loader's) leaves nothing half-done.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<V, E: Clone> JitCache<V, E> {
    /// An empty cache holding at most `budget` bytes.
    pub fn new(budget: usize) -> Self {
        Self::with_busy(budget, |_| false)
    }

    /// [`JitCache::new`], never evicting a value while `busy` says it is in use.
    pub fn with_busy(budget: usize, busy: fn(&V) -> bool) -> Self {
        JitCache {
            budget,
            busy,
            inner: Mutex::new(Inner {
                slots: HashMap::new(),
                clock: 0,
                resident_bytes: 0,
                stats: CacheStats::default(),
                load_seconds: Vec::new(),
            }),
        }
    }

    /// The byte budget.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// The value of `key`, loading it with `load` (which returns the value and its size in bytes)
    /// if it is not resident. Blocking: call it off the async executor.
    pub fn get_or_load<F>(&self, key: &str, load: F) -> Result<Arc<V>, CacheError<E>>
    where
        F: FnOnce() -> Result<(V, usize), E>,
    {
        self.get_or_load_counted(key, load, true)
    }

    /// [`JitCache::get_or_load`] for a part of an entry being loaded (a pack's bases or cores
    /// under a member or morph): hits and misses are not counted, the entry's own are.
    pub fn get_or_load_part<F>(&self, key: &str, load: F) -> Result<Arc<V>, CacheError<E>>
    where
        F: FnOnce() -> Result<(V, usize), E>,
    {
        self.get_or_load_counted(key, load, false)
    }

    fn get_or_load_counted<F>(
        &self,
        key: &str,
        load: F,
        count: bool,
    ) -> Result<Arc<V>, CacheError<E>>
    where
        F: FnOnce() -> Result<(V, usize), E>,
    {
        let flight = {
            let mut inner = lock(&self.inner);
            inner.clock += 1;
            let now = inner.clock;
            match inner.slots.get_mut(key) {
                Some(Slot::Ready {
                    value, last_used, ..
                }) => {
                    *last_used = now;
                    let value = value.clone();
                    inner.stats.hits += u64::from(count);
                    return Ok(value);
                }
                Some(Slot::Loading(flight)) => {
                    let flight = flight.clone();
                    inner.stats.coalesced += u64::from(count);
                    drop(inner);
                    return wait(&flight);
                }
                None => {
                    let flight = Arc::new(Flight {
                        result: Mutex::new(None),
                        done: Condvar::new(),
                    });
                    inner
                        .slots
                        .insert(key.to_string(), Slot::Loading(flight.clone()));
                    inner.stats.misses += u64::from(count);
                    flight
                }
            }
        };
        // Load without the lock. A panicking loader must not leave waiters hanging: the guard
        // publishes an error and clears the slot if the load does not complete.
        let mut guard = FlightGuard {
            cache: self,
            key,
            flight: &flight,
            armed: true,
        };
        let start = Instant::now();
        let loaded = load();
        let elapsed = start.elapsed();
        let result = match loaded {
            Ok((value, bytes)) => self.insert(key, Arc::new(value), bytes, elapsed),
            Err(e) => {
                let mut inner = lock(&self.inner);
                inner.slots.remove(key);
                inner.stats.failures += 1;
                Err(CacheError::Load(e))
            }
        };
        guard.armed = false;
        publish(&flight, result.clone());
        result
    }

    /// Puts a loaded value in its slot, evicting least recently used unpinned entries first.
    fn insert(
        &self,
        key: &str,
        value: Arc<V>,
        bytes: usize,
        elapsed: Duration,
    ) -> Result<Arc<V>, CacheError<E>> {
        let mut inner = lock(&self.inner);
        inner.load_seconds.push(elapsed.as_secs_f64());
        let evictable: usize = inner
            .slots
            .values()
            .filter_map(|s| match s {
                Slot::Ready {
                    bytes,
                    pinned: false,
                    value,
                    ..
                } if !(self.busy)(value) => Some(*bytes),
                _ => None,
            })
            .sum();
        let free = self.budget.saturating_sub(inner.resident_bytes) + evictable;
        if bytes > free {
            inner.slots.remove(key);
            inner.stats.failures += 1;
            return Err(CacheError::OverBudget {
                key: key.to_string(),
                needed: bytes,
                free,
                budget: self.budget,
            });
        }
        while inner.resident_bytes + bytes > self.budget {
            let victim = inner
                .slots
                .iter()
                .filter_map(|(k, s)| match s {
                    Slot::Ready {
                        last_used,
                        pinned: false,
                        value,
                        ..
                    } if !(self.busy)(value) => Some((*last_used, k.clone())),
                    _ => None,
                })
                .min()
                .map(|(_, k)| k)
                .expect("enough evictable bytes were counted above");
            if let Some(Slot::Ready { bytes: b, .. }) = inner.slots.remove(&victim) {
                inner.resident_bytes -= b;
                inner.stats.evictions += 1;
            }
        }
        inner.clock += 1;
        let now = inner.clock;
        inner.resident_bytes += bytes;
        inner.slots.insert(
            key.to_string(),
            Slot::Ready {
                value: value.clone(),
                bytes,
                last_used: now,
                pinned: false,
            },
        );
        Ok(value)
    }

    /// Pins or unpins a resident key (a pinned entry is never evicted). Returns whether it was
    /// resident.
    pub fn set_pinned(&self, key: &str, pin: bool) -> bool {
        match lock(&self.inner).slots.get_mut(key) {
            Some(Slot::Ready { pinned, .. }) => {
                *pinned = pin;
                true
            }
            _ => false,
        }
    }

    /// The value of `key` if it is resident (counted as neither hit nor miss: for parts of an
    /// entry being loaded).
    pub fn peek(&self, key: &str) -> Option<Arc<V>> {
        let mut inner = lock(&self.inner);
        inner.clock += 1;
        let now = inner.clock;
        match inner.slots.get_mut(key) {
            Some(Slot::Ready {
                value, last_used, ..
            }) => {
                *last_used = now;
                Some(value.clone())
            }
            _ => None,
        }
    }

    /// Resident bytes summed by `kind` of value (for `/metrics`).
    pub fn bytes_by<K: Ord>(&self, kind: impl Fn(&V) -> K) -> std::collections::BTreeMap<K, usize> {
        let mut out = std::collections::BTreeMap::new();
        for s in lock(&self.inner).slots.values() {
            if let Slot::Ready { value, bytes, .. } = s {
                *out.entry(kind(value)).or_insert(0) += bytes;
            }
        }
        out
    }

    /// Whether `key` is resident.
    pub fn contains(&self, key: &str) -> bool {
        matches!(lock(&self.inner).slots.get(key), Some(Slot::Ready { .. }))
    }

    /// The counters, with the resident bytes and entries.
    pub fn stats(&self) -> CacheStats {
        let inner = lock(&self.inner);
        CacheStats {
            resident_bytes: inner.resident_bytes,
            resident: inner
                .slots
                .values()
                .filter(|s| matches!(s, Slot::Ready { .. }))
                .count(),
            ..inner.stats
        }
    }

    /// Cumulative counts of load durations at or under each bound in `bounds` (seconds), plus
    /// the count and sum of all: a Prometheus histogram.
    pub fn load_histogram(&self, bounds: &[f64]) -> (Vec<u64>, u64, f64) {
        let inner = lock(&self.inner);
        let counts = bounds
            .iter()
            .map(|&b| inner.load_seconds.iter().filter(|&&s| s <= b).count() as u64)
            .collect();
        (
            counts,
            inner.load_seconds.len() as u64,
            inner.load_seconds.iter().sum(),
        )
    }
}

fn wait<V, E: Clone>(flight: &Flight<V, E>) -> Result<Arc<V>, CacheError<E>> {
    let mut result = lock(&flight.result);
    loop {
        if let Some(r) = result.as_ref() {
            return r.clone();
        }
        result = flight.done.wait(result).unwrap_or_else(|p| p.into_inner());
    }
}

fn publish<V, E>(flight: &Flight<V, E>, result: Result<Arc<V>, CacheError<E>>) {
    *lock(&flight.result) = Some(result);
    flight.done.notify_all();
}

/// Clears a flight whose loader panicked, so waiters get an error and a later get retries.
struct FlightGuard<'a, V, E> {
    cache: &'a JitCache<V, E>,
    key: &'a str,
    flight: &'a Arc<Flight<V, E>>,
    armed: bool,
}

impl<V, E> Drop for FlightGuard<'_, V, E> {
    fn drop(&mut self) {
        if self.armed {
            let mut inner = lock(&self.cache.inner);
            inner.slots.remove(self.key);
            inner.stats.failures += 1;
            drop(inner);
            publish(self.flight, Err(CacheError::Panicked(self.key.to_string())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Barrier;

    fn ok(v: u32, bytes: usize) -> impl FnOnce() -> Result<(u32, usize), String> {
        move || Ok((v, bytes))
    }

    #[test]
    fn least_recently_used_goes_first_and_the_budget_holds() {
        let c = JitCache::<u32>::new(100);
        c.get_or_load("a", ok(1, 40)).unwrap();
        c.get_or_load("b", ok(2, 40)).unwrap();
        // Touch a: b is now the least recently used.
        assert_eq!(*c.get_or_load("a", ok(9, 40)).unwrap(), 1);
        c.get_or_load("c", ok(3, 40)).unwrap();
        assert!(c.contains("a") && c.contains("c") && !c.contains("b"));
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.evictions), (1, 3, 1));
        assert_eq!((s.resident, s.resident_bytes), (2, 80));
    }

    #[test]
    fn pinned_entries_stay_and_what_cannot_fit_is_refused() {
        let c = JitCache::<u32>::new(100);
        c.get_or_load("a", ok(1, 60)).unwrap();
        assert!(c.set_pinned("a", true));
        assert!(!c.set_pinned("nope", true));
        let err = c.get_or_load("b", ok(2, 50)).unwrap_err();
        assert_eq!(
            err,
            CacheError::OverBudget {
                key: "b".into(),
                needed: 50,
                free: 40,
                budget: 100
            }
        );
        assert!(err.to_string().contains("b needs 50 bytes"));
        assert!(c.contains("a") && !c.contains("b"));
        // Larger than the whole budget: refused even with nothing pinned.
        c.set_pinned("a", false);
        assert!(matches!(
            c.get_or_load("huge", ok(3, 101)),
            Err(CacheError::OverBudget { .. })
        ));
        // Unpinned, a can go now.
        c.get_or_load("b", ok(2, 50)).unwrap();
        assert!(!c.contains("a"));
        assert_eq!(c.stats().resident_bytes, 50);
    }

    #[test]
    fn concurrent_gets_of_a_cold_key_load_once() {
        let c = JitCache::<u32>::new(1000);
        let loads = AtomicUsize::new(0);
        let start = Barrier::new(8);
        let values: Vec<u32> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        *c.get_or_load("cold", || {
                            loads.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(100));
                            Ok((7, 10))
                        })
                        .unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(values, vec![7; 8]);
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        let s = c.stats();
        assert_eq!(s.misses, 1);
        assert_eq!(s.hits + s.coalesced, 7);
        let (counts, n, sum) = c.load_histogram(&[0.05, 10.0]);
        assert_eq!((counts, n), (vec![0, 1], 1));
        assert!(sum >= 0.1);
    }

    #[test]
    fn a_slow_load_does_not_block_other_keys() {
        let c = JitCache::<u32>::new(1000);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        std::thread::scope(|s| {
            let slow = s.spawn(|| {
                c.get_or_load("slow", move || {
                    // Held until the fast key has been served.
                    rx.recv_timeout(Duration::from_secs(10))
                        .map_err(|e| e.to_string())?;
                    Ok((1, 10))
                })
            });
            // Wait until the slow load is in flight, then serve another key meanwhile.
            while c.stats().misses == 0 {
                std::thread::yield_now();
            }
            assert_eq!(*c.get_or_load("fast", ok(2, 10)).unwrap(), 2);
            tx.send(()).unwrap();
            assert_eq!(*slow.join().unwrap().unwrap(), 1);
        });
    }

    #[test]
    fn a_failed_or_panicking_load_reaches_every_waiter_and_is_retried_later() {
        let c = JitCache::<u32, String>::new(1000);
        let start = Barrier::new(4);
        let errs: Vec<CacheError<String>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        c.get_or_load("bad", || {
                            std::thread::sleep(Duration::from_millis(50));
                            Err("no adapter 'bad' in the store".into())
                        })
                        .unwrap_err()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for e in &errs {
            assert_eq!(e.to_string(), "no adapter 'bad' in the store");
        }
        assert!(!c.contains("bad"));
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            c.get_or_load("boom", || -> Result<(u32, usize), String> {
                panic!("loader bug")
            })
        }));
        assert!(panicked.is_err());
        // The slot was cleared: the next get loads again.
        assert_eq!(*c.get_or_load("boom", ok(5, 1)).unwrap(), 5);
        assert_eq!(*c.get_or_load("bad", ok(6, 1)).unwrap(), 6);
    }
}
