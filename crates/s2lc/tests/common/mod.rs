//! Helpers shared by the binary's integration tests.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::PathBuf;
use std::process::{Command, Output};

/// Runs the built `s2lc` binary with `args`.
pub fn s2lc(args: &[&str]) -> Output {
    s2lc_env(args, &[])
}

/// Runs the built `s2lc` binary with `args` and extra environment variables.
pub fn s2lc_env(args: &[&str], env: &[(&str, String)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_s2lc"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("running s2lc")
}

/// The standard error of a run, as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A fresh, empty scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("s2lc-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `$S2LC_HOME`, default `~/.cache/s2lc`.
pub fn s2lc_home() -> PathBuf {
    s2lc_model::assets::home()
}

/// The SmolLM2 GGUF fetched by `scripts/fetch-assets`, or `None` (with the reason printed).
pub fn smollm2() -> Option<PathBuf> {
    let p = s2lc_model::assets::smollm2();
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipped: {} absent (run scripts/fetch-assets)", p.display());
        None
    }
}
