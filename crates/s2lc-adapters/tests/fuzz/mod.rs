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
//!
//! Parts: `heap` (the counting allocator), `coverage` (the counters), `input` (inputs and
//! findings on disk), `mutate` (mutations), `run` (the loop, reports and replays).

#![allow(dead_code)]

mod coverage;
mod heap;
mod input;
mod mutate;
mod run;

// Each fuzz binary uses its own part of this interface.
#[allow(unused_imports)]
pub use heap::{live, measure, Counting};
#[allow(unused_imports)]
pub use input::{decode, encode, out_dir, Input};
#[allow(unused_imports)]
pub use mutate::Rng;
#[allow(unused_imports)]
pub use run::{
    budget_secs, exclusive, fuzz, replay, run_and_check, Finding, Report, Runner, Target,
};
