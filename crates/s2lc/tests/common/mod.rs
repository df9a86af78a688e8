//! Helpers shared by the binary's integration tests.
#![allow(dead_code)] // each test binary uses its own subset

pub mod server;

use std::path::{Path, PathBuf};
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

/// One `error:` line naming the problem, no panic or backtrace, exit code 1.
pub fn assert_clean_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert!(err.starts_with("error: "), "stderr: {err}");
    assert!(err.contains(needle), "expected '{needle}' in: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "stderr: {err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "stderr: {err}");
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

/// `alice29.txt` fetched by `scripts/fetch-assets`, or `None` (with the reason printed).
pub fn alice29() -> Option<PathBuf> {
    let p = s2lc_home().join("text/canterbury/alice29.txt");
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipped: {} absent (run scripts/fetch-assets)", p.display());
        None
    }
}

/// The committed real adapter (trained with PEFT on alice29.txt, rank 4 on q/v).
pub fn alice_r4() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/adapters/alice-r4")
}

/// `s2lc adapters unpack PACK NAME -o OUT`, which must succeed.
pub fn unpack_ok(pack: &Path, name: &str, out: &Path) {
    let o = s2lc(&[
        "adapters",
        "unpack",
        pack.to_str().unwrap(),
        name,
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Writes an expert set under `dir` built from the real model: layer 0's FFN as the base, and
/// per `(name, factor)` an expert that is that FFN scaled by `factor` (so its residual is
/// `factor − 1` times the base, spread over the whole spectrum), trained on `alice29.txt`.
pub fn write_expert_set(model: &std::path::Path, dir: &std::path::Path, experts: &[(&str, f32)]) {
    use s2lc_model::source::{write_safetensors, Tensor};
    let source = s2lc_model::ModelSource::open(model).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let files: Vec<(String, f32)> = std::iter::once(("base".to_string(), 1.0))
        .chain(experts.iter().map(|(n, f)| (n.to_string(), *f)))
        .collect();
    for (name, factor) in &files {
        let tensors: Vec<(String, Tensor)> = ["gate_proj", "up_proj", "down_proj"]
            .iter()
            .map(|m| {
                let name = format!("model.layers.0.mlp.{m}.weight");
                let mut t = source.tensors().load(&name).unwrap();
                t.data.iter_mut().for_each(|v| *v *= factor);
                (name, t)
            })
            .collect();
        write_safetensors(
            &dir.join(format!("{name}.safetensors")),
            tensors.iter().map(|(n, t)| (n.as_str(), t)),
            None,
        )
        .unwrap();
    }
    let listed: serde_json::Map<String, serde_json::Value> = experts
        .iter()
        .map(|(n, _)| {
            (
                n.to_string(),
                serde_json::json!({"file": format!("{n}.safetensors"), "text": "alice29.txt"}),
            )
        })
        .collect();
    let manifest = serde_json::json!({
        "layers": [0], "modules": ["gate_proj", "up_proj", "down_proj"],
        "base_file": "base.safetensors", "experts": listed,
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
}
