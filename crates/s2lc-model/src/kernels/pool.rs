//! A persistent fork-join pool for the runtime's hot loop.
//!
//! Batch-1 decode issues ~200 small parallel products per token. Handing each to rayon costs a
//! wake-up of a sleeping worker (tens of microseconds); here the workers spin on a generation
//! counter for a short while after each job, so back-to-back jobs start in well under a
//! microsecond, and park on a condition variable once idle so a quiet process burns no CPU.
//!
//! A job is a `Fn(part, parts)` run once for every `part` in `0..parts`, the caller taking part 0.
//! [`ThreadPool::run`] returns only after every part has finished, which is what lets a job borrow
//! from the caller's stack. One job runs at a time; a caller that finds the pool busy (another
//! thread's job, or a job calling `run` from inside) runs every part itself, in order.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, TryLockError};
use std::thread::JoinHandle;

/// How many empty polls a worker makes before it parks (~50–100 µs here).
const SPIN_POLLS: u32 = 1 << 16;

/// The job being run: a type-erased `&dyn Fn(usize, usize) + Sync` with its lifetime removed.
/// Valid from the generation bump that publishes it until `pending` reaches zero.
#[derive(Clone, Copy)]
struct JobPtr(*const (dyn Fn(usize, usize) + Sync));

// SAFETY: the pointee is `Sync` and outlives every use (see `ThreadPool::run`).
unsafe impl Send for JobPtr {}

struct Shared {
    /// Bumped once per job; workers run a job when they see a new value.
    generation: AtomicUsize,
    /// Parts not yet finished by workers.
    pending: AtomicUsize,
    /// Workers parked on `wake`.
    sleepers: AtomicUsize,
    shutdown: AtomicBool,
    panicked: AtomicBool,
    job: Mutex<Option<JobPtr>>,
    park: Mutex<()>,
    wake: Condvar,
}

/// A fixed set of worker threads that run fork-join jobs (see the module docs).
pub struct ThreadPool {
    shared: Arc<Shared>,
    parts: usize,
    submit: Mutex<()>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("threads", &self.parts)
            .finish()
    }
}

impl ThreadPool {
    /// A pool running jobs on `threads` threads in all (the caller plus `threads − 1` workers).
    pub fn new(threads: usize) -> Self {
        let parts = threads.max(1);
        let shared = Arc::new(Shared {
            generation: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            job: Mutex::new(None),
            park: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = (1..parts)
            .map(|part| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("s2lc-worker-{part}"))
                    .spawn(move || worker(&shared, part, parts))
                    .expect("spawning a worker thread")
            })
            .collect();
        ThreadPool {
            shared,
            parts,
            submit: Mutex::new(()),
            workers,
        }
    }

    /// Threads a job is split over.
    pub fn threads(&self) -> usize {
        self.parts
    }

    /// Runs `job(part, parts)` for every part in `0..parts` and returns when all are done.
    ///
    /// # Panics
    /// If any part panicked (after every part has finished).
    pub fn run(&self, job: &(dyn Fn(usize, usize) + Sync)) {
        let parts = self.parts;
        let guard = match self.submit.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                (0..parts).for_each(|p| job(p, parts));
                return;
            }
        };
        if parts == 1 {
            job(0, 1);
            return;
        }
        let s = &*self.shared;
        // SAFETY: only the lifetime is erased. Workers dereference the pointer only between the
        // generation bump below and their decrement of `pending`, and `Finish` (also run on
        // unwinding) waits for `pending == 0` before this function returns.
        let erased: JobPtr = unsafe { std::mem::transmute(job as *const _) };
        *s.job.lock().unwrap_or_else(|p| p.into_inner()) = Some(erased);
        s.pending.store(parts - 1, Ordering::SeqCst);
        s.generation.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _lock = s.park.lock().unwrap_or_else(|p| p.into_inner());
            s.wake.notify_all();
        }
        struct Finish<'a>(&'a Shared);
        impl Drop for Finish<'_> {
            fn drop(&mut self) {
                while self.0.pending.load(Ordering::Acquire) != 0 {
                    std::hint::spin_loop();
                }
            }
        }
        {
            let _finish = Finish(s);
            job(0, parts);
        }
        drop(guard);
        if s.panicked.swap(false, Ordering::AcqRel) {
            panic!("a thread-pool job panicked on a worker thread");
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        {
            let _lock = self.shared.park.lock().unwrap_or_else(|p| p.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(s: &Shared, part: usize, parts: usize) {
    // The generation the pool was created with: a job may be published before this thread
    // first looks.
    let mut seen = 0;
    loop {
        let mut polls = 0u32;
        let mut current = s.generation.load(Ordering::Acquire);
        while current == seen {
            if polls < SPIN_POLLS {
                polls += 1;
                std::hint::spin_loop();
            } else {
                // Park. `sleepers` is raised before the generation is re-checked and the
                // submitter bumps the generation before reading `sleepers` (both SeqCst), so
                // either this thread sees the new job or the submitter sees a sleeper and
                // notifies under `park`, which this thread holds until `wait` releases it.
                let mut lock = s.park.lock().unwrap_or_else(|p| p.into_inner());
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                while s.generation.load(Ordering::SeqCst) == seen {
                    lock = s.wake.wait(lock).unwrap_or_else(|p| p.into_inner());
                }
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
                polls = 0;
            }
            current = s.generation.load(Ordering::Acquire);
        }
        seen = current;
        if s.shutdown.load(Ordering::SeqCst) {
            return;
        }
        let job = *s.job.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(JobPtr(ptr)) = job {
            // SAFETY: see `ThreadPool::run`; the job is alive until `pending` is released below.
            let f = unsafe { &*ptr };
            if catch_unwind(AssertUnwindSafe(|| f(part, parts))).is_err() {
                s.panicked.store(true, Ordering::Release);
            }
        }
        s.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

static POOL: OnceLock<ThreadPool> = OnceLock::new();

/// Sizes the process-wide pool to `threads` (before its first use); false if it already exists.
pub fn init_global(threads: usize) -> bool {
    let mut created = false;
    POOL.get_or_init(|| {
        created = true;
        ThreadPool::new(threads)
    });
    created
}

/// The process-wide pool: as set by [`init_global`], else `S2LC_THREADS` threads, else one per
/// available core.
pub fn global() -> &'static ThreadPool {
    POOL.get_or_init(|| {
        let threads = std::env::var("S2LC_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n: &usize| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        ThreadPool::new(threads)
    })
}

/// The `part`-th of `parts` contiguous, nearly equal ranges of `0..len`, with boundaries on
/// multiples of `align` (except the end).
pub fn split_range(len: usize, part: usize, parts: usize, align: usize) -> std::ops::Range<usize> {
    let units = len.div_ceil(align);
    let lo = units * part / parts;
    let hi = units * (part + 1) / parts;
    (lo * align).min(len)..(hi * align).min(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once_per_job() {
        let pool = ThreadPool::new(3);
        let hits = [
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
        ];
        for _ in 0..1000 {
            pool.run(&|p, n| {
                assert_eq!(n, 3);
                hits[p].fetch_add(1, Ordering::Relaxed);
            });
        }
        for h in &hits {
            assert_eq!(h.load(Ordering::Relaxed), 1000);
        }
    }

    #[test]
    fn jobs_after_parking_and_nested_jobs_still_run() {
        let pool = ThreadPool::new(2);
        let total = AtomicUsize::new(0);
        pool.run(&|_, _| {
            total.fetch_add(1, Ordering::Relaxed);
        });
        // Long enough for the worker to park.
        std::thread::sleep(std::time::Duration::from_millis(50));
        pool.run(&|_, _| {
            // A job that submits a job runs the inner one inline.
            pool.run(&|_, _| {
                total.fetch_add(10, Ordering::Relaxed);
            });
        });
        assert_eq!(total.load(Ordering::Relaxed), 2 + 2 * 20);
    }

    #[test]
    fn a_panicking_part_is_reported_and_the_pool_survives() {
        let pool = ThreadPool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(&|p, _| assert_ne!(p, 1, "part 1 fails"));
        }));
        assert!(r.is_err());
        let ran = AtomicUsize::new(0);
        pool.run(&|_, _| {
            ran.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(ran.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn ranges_cover_without_overlap() {
        for (len, parts, align) in [(10, 3, 1), (1536, 2, 8), (7, 4, 4), (0, 2, 8), (5, 8, 1)] {
            let mut next = 0;
            for p in 0..parts {
                let r = split_range(len, p, parts, align);
                assert_eq!(r.start, next);
                assert!(r.start == len || r.start % align == 0);
                next = r.end;
            }
            assert_eq!(next, len);
        }
    }
}
