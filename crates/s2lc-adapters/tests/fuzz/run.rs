//! The loop: targets, runs of one input (heap, time, panics), fuzzing for a budget,
//! reporting, and the replay of saved regressions.

use std::collections::HashSet;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::coverage::Coverage;
use super::heap::{live, HARD_CAP, PEAK};
use super::input::{decode, encode, out_dir, save_current, Input, CURRENT};
use super::mutate::{chance, mutate, Rng};

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
