//! A coverage-guided mutation fuzzer that runs on the stable toolchain, shared by the fuzz test
//! binaries (`#[path]`-included; each binary gets its own allocator and coverage hooks).
//!
//! - **Inputs** are lists of files (a pack is `pack.json`, a bases file and a member file); a
//!   mutation edits one of them: bit flips, interesting bytes and integers (little-endian, at
//!   any offset), arithmetic, truncation, deletion, insertion, duplication, splices from other
//!   inputs, dictionary tokens, and JSON-aware edits of numbers and strings.
//! - **Coverage**: built with `-C passes=sancov-module` and LLVM's inline 8-bit counters (what
//!   `scripts/fuzz` does), every module registers its counters through
//!   `__sanitizer_cov_8bit_counters_init`, defined here; an input that reaches a new (edge,
//!   hit-count bucket) pair joins the corpus, as in AFL/libFuzzer. Built plainly (`cargo test`),
//!   there are no counters and the fuzzer falls back to the distinct outcomes (error messages
//!   without their numbers) as its feedback.
//! - **Findings**: a panic; a run whose peak heap exceeds the memory limit (twice the largest
//!   peak of the legitimate seeds); a single allocation above the hard cap, or a run stuck for
//!   longer than the hang timeout (both abort the process, after the input is written to
//!   `$S2LC_FUZZ_OUT`).

#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashSet;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use s2lc_spectral::rng::SplitMix64;

// ---------------------------------------------------------------------------------------------
// Heap accounting.

/// The system allocator, counting live bytes and their peak, and refusing (after saving the
/// input) any single allocation above [`HARD_CAP`] while a fuzz run is on.
pub struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// Largest single allocation allowed while fuzzing (0: no cap).
static HARD_CAP: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !admit(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !admit(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !admit(new_size) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

fn grew(size: usize) {
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

/// Whether an allocation of `size` may go ahead; if not, the current input is saved first (the
/// process then aborts in `handle_alloc_error`).
fn admit(size: usize) -> bool {
    let cap = HARD_CAP.load(Ordering::Relaxed);
    if cap == 0 || size <= cap {
        return true;
    }
    save_current("alloc", size);
    false
}

/// `f`'s result and the peak heap it reached above the live bytes at its start.
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = live();
    PEAK.store(base, Ordering::Relaxed);
    let r = f();
    (r, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

/// Live heap bytes now.
pub fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------------
// Coverage counters (LLVM SanitizerCoverage, inline 8-bit counters).

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

struct Coverage {
    regions: Vec<&'static mut [u8]>,
    /// Per counter, the buckets seen so far.
    seen: Vec<Vec<u8>>,
}

impl Coverage {
    fn new() -> Self {
        let regions = regions();
        let seen = regions.iter().map(|r| vec![0u8; r.len()]).collect();
        Coverage { regions, seen }
    }

    fn instrumented(&self) -> bool {
        !self.regions.is_empty()
    }

    fn clear(&mut self) {
        for r in &mut self.regions {
            r.fill(0);
        }
    }

    /// New (counter, bucket) pairs the last run reached; the counters are cleared.
    fn harvest(&mut self) -> usize {
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
    fn edges(&self) -> usize {
        self.seen.iter().flatten().filter(|&&s| s != 0).count()
    }
}

// ---------------------------------------------------------------------------------------------
// Inputs.

/// An input: one or more files.
pub type Input = Vec<Vec<u8>>;

/// An input as one blob: `S2LCFUZZ`, a u32 count, then each file as a u32 length and its bytes.
pub fn encode(input: &Input) -> Vec<u8> {
    let mut out = b"S2LCFUZZ".to_vec();
    out.extend((input.len() as u32).to_le_bytes());
    for f in input {
        out.extend((f.len() as u32).to_le_bytes());
        out.extend(f);
    }
    out
}

/// The input of a blob written by [`encode`].
pub fn decode(blob: &[u8]) -> Option<Input> {
    let mut rest = blob.strip_prefix(b"S2LCFUZZ")?;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (a, b) = rest.split_at_checked(n)?;
        rest = b;
        Some(a)
    };
    let count = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
    let mut files = Vec::new();
    for _ in 0..count {
        let len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        files.push(take(len)?.to_vec());
    }
    Some(files)
}

/// The input being run (encoded), its target's name, and where findings go: what the allocator
/// and the hang watchdog save before they abort.
static CURRENT: Mutex<Option<(String, Vec<u8>)>> = Mutex::new(None);
static SAVING: AtomicBool = AtomicBool::new(false);

/// Where findings are written: `$S2LC_FUZZ_OUT`, else `target/fuzz-findings`.
pub fn out_dir() -> PathBuf {
    std::env::var_os("S2LC_FUZZ_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/fuzz-findings"))
}

/// Saves the current input as `{kind}-{detail}.bin` (without allocating much: called from the
/// allocator, once).
fn save_current(kind: &str, detail: usize) {
    if SAVING.swap(true, Ordering::SeqCst) {
        return;
    }
    HARD_CAP.store(0, Ordering::SeqCst);
    if let Ok(guard) = CURRENT.try_lock() {
        if let Some((target, blob)) = guard.as_ref() {
            let dir = out_dir().join(target);
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join(format!("{kind}-{detail}.bin"));
            if let Ok(mut f) = std::fs::File::create(&path) {
                let _ = f.write_all(blob);
            }
            eprintln!(
                "fuzz {target}: {kind} ({detail}); input saved to {}",
                path.display()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Mutation.

/// The mutation stream: the workspace's generator.
pub type Rng = SplitMix64;

/// True once in `one_in` draws.
fn chance(rng: &mut Rng, one_in: usize) -> bool {
    rng.below(one_in) == 0
}

const INTERESTING: [u64; 16] = [
    0,
    1,
    2,
    3,
    7,
    8,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    u64::MAX,
];

const JSON_NUMBERS: [&str; 12] = [
    "0",
    "-1",
    "0.5",
    "1",
    "2",
    "65536",
    "4294967296",
    "18446744073709551615",
    "1e30",
    "99999999",
    "-0",
    "NaN",
];

/// Edits one file of `input` (1–4 stacked mutations); `others` supplies splices.
fn mutate(input: &mut Input, others: &[Input], dict: &[Vec<u8>], rng: &mut Rng) {
    if input.is_empty() {
        input.push(Vec::new());
    }
    let f = rng.below(input.len());
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        let v = &mut input[f];
        let len = v.len();
        match rng.below(15) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = match rng.below(3) {
                    0 => INTERESTING[rng.below(9)] as u8,
                    _ => rng.next_u64() as u8,
                };
            }
            2 if len > 0 => {
                // An interesting integer, little-endian, of 2, 4 or 8 bytes.
                let width = [2usize, 4, 8][rng.below(3)];
                let i = rng.below(len);
                let value = match rng.below(4) {
                    0 => rng.next_u64(),
                    1 => (len as u64 + rng.below(16) as u64).wrapping_sub(8),
                    _ => INTERESTING[rng.below(INTERESTING.len())],
                };
                let bytes = value.to_le_bytes();
                let n = width.min(len - i);
                v[i..i + n].copy_from_slice(&bytes[..n]);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let d = 1 + rng.below(16) as u8;
                v[i] = if chance(rng, 2) {
                    v[i].wrapping_add(d)
                } else {
                    v[i].wrapping_sub(d)
                };
            }
            4 if len > 0 => v.truncate(rng.below(len)),
            5 if len > 1 => {
                let a = rng.below(len);
                let n = 1 + rng.below((len - a).min(256));
                v.drain(a..a + n);
            }
            6 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(32);
                let fill: Vec<u8> = if chance(rng, 2) {
                    vec![rng.next_u64() as u8; n]
                } else {
                    (0..n).map(|_| rng.next_u64() as u8).collect()
                };
                v.splice(at..at, fill);
            }
            7 if len > 1 => {
                let a = rng.below(len);
                let n = 1 + rng.below((len - a).min(512));
                let chunk = v[a..a + n].to_vec();
                let at = rng.below(len + 1);
                v.splice(at..at, chunk);
            }
            8 if !others.is_empty() => {
                // A splice: a range of the same file of another input.
                let o = &others[rng.below(others.len())];
                if let Some(src) = o.get(f).filter(|s| !s.is_empty()) {
                    let a = rng.below(src.len());
                    let n = 1 + rng.below((src.len() - a).min(4096));
                    let at = rng.below(len + 1);
                    let end = (at + n).min(len);
                    v.splice(at..end, src[a..a + n].iter().copied());
                }
            }
            9 | 10 if !dict.is_empty() => {
                let token = &dict[rng.below(dict.len())];
                let at = rng.below(len + 1);
                if chance(rng, 2) {
                    v.splice(at..at, token.iter().copied());
                } else {
                    let end = (at + token.len()).min(len);
                    v.splice(at..end, token.iter().copied());
                }
            }
            11 | 12 => json_number(v, rng),
            13 | 14 => json_string(v, dict, rng),
            _ => {
                if len > 0 {
                    let i = rng.below(len);
                    v[i] = rng.next_u64() as u8;
                }
            }
        }
    }
}

/// Replaces a run of digits (a JSON number, say) with an interesting number.
fn json_number(v: &mut Vec<u8>, rng: &mut Rng) {
    let starts: Vec<usize> = (0..v.len())
        .filter(|&i| v[i].is_ascii_digit() && (i == 0 || !v[i - 1].is_ascii_digit()))
        .collect();
    if starts.is_empty() {
        return;
    }
    let a = starts[rng.below(starts.len())];
    let mut b = a;
    while b < v.len() && (v[b].is_ascii_digit() || v[b] == b'.') {
        b += 1;
    }
    let n = JSON_NUMBERS[rng.below(JSON_NUMBERS.len())];
    v.splice(a..b, n.bytes());
}

/// Replaces the contents of a quoted string with a dictionary token.
fn json_string(v: &mut Vec<u8>, dict: &[Vec<u8>], rng: &mut Rng) {
    let quotes: Vec<usize> = (0..v.len()).filter(|&i| v[i] == b'"').collect();
    if quotes.len() < 2 || dict.is_empty() {
        return;
    }
    let k = rng.below(quotes.len() - 1);
    let (a, b) = (quotes[k] + 1, quotes[k + 1]);
    let token = &dict[rng.below(dict.len())];
    v.splice(a..b, token.iter().copied());
}

// ---------------------------------------------------------------------------------------------
// The loop.

/// A target's run over one input (its parts): `Err` is a finding.
pub type Runner = dyn Fn(&[Vec<u8>]) -> Result<(), String> + Sync;

/// One parser under test.
pub struct Target<'a> {
    /// Its name (findings go to `$S2LC_FUZZ_OUT/{name}/`).
    pub name: &'static str,
    /// Legitimate inputs: the starting corpus, and the measure of the memory limit.
    pub seeds: Vec<Input>,
    /// Larger legitimate inputs, measured for the memory limit but not mutated (too slow to run
    /// often: a whole model file).
    pub references: Vec<Input>,
    /// Runs the parser: `Err` is a refused input (fine), a panic is a finding.
    pub run: &'a Runner,
    /// Tokens the mutator inserts.
    pub dict: Vec<Vec<u8>>,
    /// A repair applied to half the mutants (e.g. a pack's declared sizes made true again), so
    /// that mutations reach past the first check.
    pub fixup: Option<&'a dyn Fn(&mut Input)>,
}

/// What a run found.
#[derive(Debug, Clone)]
pub struct Finding {
    /// `panic` or `memory`.
    pub kind: &'static str,
    pub message: String,
    /// Where the input was saved.
    pub path: PathBuf,
}

/// What a fuzz run did.
#[derive(Debug)]
pub struct Report {
    pub target: &'static str,
    pub secs: f64,
    pub execs: u64,
    pub corpus: usize,
    /// Counters reached (0 without coverage instrumentation).
    pub edges: usize,
    pub instrumented: bool,
    /// Distinct outcomes (Ok, or an error message without its numbers).
    pub outcomes: usize,
    pub findings: Vec<Finding>,
    /// Largest peak heap of a seed, and of any run (bytes).
    pub seed_peak: usize,
    pub max_peak: usize,
    /// The memory limit: twice the seeds' largest peak.
    pub limit: usize,
    pub slowest_ms: f64,
}

impl Report {
    pub fn line(&self) -> String {
        format!(
            "fuzz {}: {:.0} s, {} executions ({:.0}/s), corpus {}, {} edges{}, {} outcomes, \
             peak heap {:.1} MiB (limit {:.1} MiB = 2 × largest seed peak {:.1} MiB), slowest {:.0} ms, {} findings",
            self.target,
            self.secs,
            self.execs,
            self.execs as f64 / self.secs.max(1e-9),
            self.corpus,
            self.edges,
            if self.instrumented { "" } else { " (not instrumented)" },
            self.outcomes,
            self.max_peak as f64 / (1 << 20) as f64,
            self.limit as f64 / (1 << 20) as f64,
            self.seed_peak as f64 / (1 << 20) as f64,
            self.slowest_ms,
            self.findings.len()
        )
    }
}

/// Fuzz runs are serialized: the heap counters and coverage are process-wide.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Holds the process to one test at a time: every test of a fuzz binary takes this first, so
/// that no other test allocates while a run's heap is measured.
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Seconds to fuzz each target: `$S2LC_FUZZ_SECS`, else `default`.
pub fn budget_secs(default: f64) -> f64 {
    std::env::var("S2LC_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// An error message without its numbers and paths: the shape of an outcome.
fn outcome_shape(r: &Result<(), String>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match r {
        Ok(()) => 0u8.hash(&mut h),
        Err(e) => {
            let shape: String = e
                .chars()
                .filter(|c| !c.is_ascii_digit())
                .take(160)
                .collect();
            shape.hash(&mut h);
        }
    }
    h.finish()
}

fn hash(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Runs `t.run` on `input`, returning its result (a panic as `Err("panic: …")` with
/// `panicked`), the run's peak heap above the start, and its time.
fn execute(t: &Target<'_>, input: &Input) -> (Result<(), String>, bool, usize, Duration) {
    let base = live();
    PEAK.store(base, Ordering::Relaxed);
    let start = Instant::now();
    RUNNING_INPUT.store(true, Ordering::Relaxed);
    let r = catch_unwind(AssertUnwindSafe(|| (t.run)(input)));
    RUNNING_INPUT.store(false, Ordering::Relaxed);
    let took = start.elapsed();
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    match r {
        Ok(r) => (r, false, peak, took),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into());
            (Err(format!("panic: {msg}")), true, peak, took)
        }
    }
}

/// Silences the panic hook of the parser's panics: only while the current thread (or a rayon
/// worker under it) is running an input.
static RUNNING_INPUT: AtomicBool = AtomicBool::new(false);

struct QuietPanics;

impl QuietPanics {
    fn new() -> Self {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !RUNNING_INPUT.load(Ordering::Relaxed) {
                previous(info);
            }
        }));
        QuietPanics
    }
}

impl Drop for QuietPanics {
    fn drop(&mut self) {
        RUNNING_INPUT.store(false, Ordering::Relaxed);
        if !std::thread::panicking() {
            let _ = std::panic::take_hook();
        }
    }
}

/// Fuzzes `t` for `secs` seconds.
pub fn fuzz(t: &Target<'_>, secs: f64, seed: u64) -> Report {
    // Panics of the parser are findings, reported at the end, not printed as they happen; a
    // panic of the fuzzer itself is printed (the hook comes back when the guard drops).
    let _quiet = QuietPanics::new();
    let mut cov = Coverage::new();
    // The seeds: each must be accepted, and their peak heap sets the limit (run twice: the
    // first run pays for lazily built statics and thread pools).
    let mut seed_peak = 0;
    for s in t.seeds.iter().chain(&t.references) {
        let _ = execute(t, s);
        let (r, _, peak, _) = execute(t, s);
        if let Err(e) = r {
            drop(_quiet);
            panic!("fuzz {}: a seed is refused: {e}", t.name);
        }
        seed_peak = seed_peak.max(peak);
    }
    let limit = 2 * seed_peak;
    cov.clear();
    let mut corpus: Vec<Input> = t.seeds.clone();
    let mut outcomes: HashSet<u64> = HashSet::new();
    let mut findings: Vec<Finding> = Vec::new();
    let mut found: HashSet<String> = HashSet::new();
    let mut rng = Rng::new(seed);
    let (mut execs, mut max_peak, mut slowest) = (0u64, 0usize, Duration::ZERO);
    // A run stuck for minutes is a finding too: the watchdog saves it and aborts.
    let running = std::sync::Arc::new(AtomicU64::new(0));
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (running, done) = (running.clone(), done.clone());
        let started = Instant::now();
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(500));
                let since = running.load(Ordering::Relaxed);
                if since > 0
                    && (started.elapsed().as_millis() as u64).saturating_sub(since) > 60_000
                {
                    save_current("hang", 60);
                    std::process::abort();
                }
            }
        })
    };
    let began = Instant::now();
    HARD_CAP.store((8 * limit).max(64 << 20), Ordering::SeqCst);
    while began.elapsed().as_secs_f64() < secs {
        let mut input = corpus[rng.below(corpus.len())].clone();
        mutate(&mut input, &corpus, &t.dict, &mut rng);
        if let Some(fix) = t.fixup {
            if chance(&mut rng, 2) {
                fix(&mut input);
            }
        }
        *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((t.name.to_string(), encode(&input)));
        running.store(began.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
        let (r, panicked, peak, took) = execute(t, &input);
        running.store(0, Ordering::Relaxed);
        execs += 1;
        max_peak = max_peak.max(peak);
        slowest = slowest.max(took);
        let new_edges = cov.harvest();
        let new_outcome = outcomes.insert(outcome_shape(&r));
        let over = peak > limit;
        if panicked || over {
            let (kind, message) = if panicked {
                ("panic", r.clone().unwrap_err())
            } else {
                (
                    "memory",
                    format!("peak heap {peak} B above the limit of {limit} B ({r:?})"),
                )
            };
            // One finding per message shape.
            let key = format!(
                "{kind}:{}",
                message
                    .chars()
                    .filter(|c| !c.is_ascii_digit())
                    .collect::<String>()
            );
            if found.insert(key) {
                let blob = encode(&input);
                let dir = out_dir().join(t.name);
                let _ = std::fs::create_dir_all(&dir);
                let path = dir.join(format!("{kind}-{:016x}.bin", hash(&blob)));
                let _ = std::fs::write(&path, &blob);
                findings.push(Finding {
                    kind,
                    message,
                    path,
                });
            }
            continue;
        }
        let interesting = if cov.instrumented() {
            new_edges > 0
        } else {
            new_outcome
        };
        if interesting && corpus.len() < 1 << 14 {
            corpus.push(input);
        }
    }
    HARD_CAP.store(0, Ordering::SeqCst);
    *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = None;
    done.store(true, Ordering::Relaxed);
    let _ = watchdog.join();
    Report {
        target: t.name,
        secs: began.elapsed().as_secs_f64(),
        execs,
        corpus: corpus.len(),
        edges: cov.edges(),
        instrumented: cov.instrumented(),
        outcomes: outcomes.len(),
        findings,
        seed_peak,
        max_peak,
        limit,
        slowest_ms: slowest.as_secs_f64() * 1e3,
    }
}

/// Fuzzes `t` for the budget, prints the report (and appends it to `$S2LC_FUZZ_REPORT`), and
/// fails on any finding.
pub fn run_and_check(t: &Target<'_>, default_secs: f64) {
    let secs = budget_secs(default_secs);
    let seed = std::env::var("S2LC_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let report = fuzz(t, secs, seed);
    eprintln!("{}", report.line());
    if let Some(path) = std::env::var_os("S2LC_FUZZ_REPORT") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(
                f,
                "{}\t{:.0}\t{}\t{}\t{}\t{}\t{}\t{}",
                report.target,
                report.secs,
                report.execs,
                report.findings.len(),
                report.edges,
                report.corpus,
                report.max_peak,
                report.limit
            );
        }
    }
    for f in &report.findings {
        eprintln!("  {}: {} ({})", f.kind, f.message, f.path.display());
    }
    assert!(
        report.findings.is_empty(),
        "fuzz {}: {} findings",
        t.name,
        report.findings.len()
    );
}

/// Replays every saved input under `dir` (regressions: each once made a parser panic or
/// over-allocate) and checks it runs without a panic within `max_heap` bytes.
pub fn replay(t: &Target<'_>, dir: &Path, max_heap: usize) -> usize {
    let mut n = 0;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut paths: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        let blob = std::fs::read(&path).unwrap();
        let input = decode(&blob).unwrap_or_else(|| panic!("{}: not a fuzz input", path.display()));
        let (r, panicked, peak, _) = execute(t, &input);
        assert!(!panicked, "{}: {r:?}", path.display());
        assert!(
            peak <= max_heap,
            "{}: peak heap {peak} B > {max_heap} B ({r:?})",
            path.display()
        );
        n += 1;
    }
    n
}
