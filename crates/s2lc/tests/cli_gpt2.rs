//! The commands on a GPT-2 in Hugging Face layout (the random GPT-2-shaped fixture of
//! `s2lc-model`, no tokenizer): `info`, `analyze` and plain-SVD `compress` run from the weights;
//! commands that tokenize text name the missing `tokenizer.json`.

use std::path::PathBuf;

mod common;
use common::{assert_clean_error, s2lc, scratch, stderr};

use s2lc_spectral::analysis::SpectralReport;

fn gpt2_tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../s2lc-model/tests/fixtures/gpt2-tiny")
}

#[test]
fn gpt2_analyze_compress_and_the_missing_tokenizer() {
    let model = gpt2_tiny();
    let m = model.to_str().unwrap();
    let dir = scratch("gpt2");

    let o = s2lc(&["info", "--model", m]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("architecture: gpt2"), "{stdout}");
    assert!(stdout.contains("positions=learned(64)"), "{stdout}");

    // analyze: six linears per block (q/k/v split out of c_attn, no gate), two blocks.
    let out = dir.join("analysis");
    let o = s2lc(&["analyze", "--model", m, "-o", out.to_str().unwrap()]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    let report: SpectralReport =
        serde_json::from_slice(&std::fs::read(out.join("spectra.json")).unwrap()).unwrap();
    assert_eq!(report.matrices.len(), 12);
    let names: Vec<&str> = report.matrices.iter().map(|m| m.name.as_str()).collect();
    for want in [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj",
    ] {
        assert!(names.contains(&want), "{want} not in {names:?}");
    }
    assert!(!names.iter().any(|n| n.contains("gate_proj")), "{names:?}");

    // compress with plain SVD needs no tokenizer; the output reloads.
    let compressed = dir.join("compressed");
    let c = compressed.to_str().unwrap();
    let o = s2lc(&[
        "compress", "--model", m, "-o", c, "--method", "svd", "--energy", "0.8",
    ]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("of 12 matrices (svd)"), "{stdout}");
    assert!(!compressed.join("tokenizer.json").exists());
    let o = s2lc(&["info", "--model", c]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("architecture: gpt2"), "{stdout}");
    assert!(stdout.contains(".lowrank_u"), "{stdout}");
    let o = s2lc(&[
        "analyze",
        "--model",
        c,
        "-o",
        dir.join("a2").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));

    // Whitening and evaluation tokenize text: one clear line naming tokenizer.json.
    let text = dir.join("text.txt");
    std::fs::write(&text, "some text to score\n").unwrap();
    let t = text.to_str().unwrap();
    let o = s2lc(&[
        "compress",
        "--model",
        m,
        "-o",
        dir.join("w").to_str().unwrap(),
        "--energy",
        "0.9",
        "--calib-text",
        t,
    ]);
    assert_clean_error(&o, "tokenizer.json");
    let o = s2lc(&["eval", "--model", m, "--text", t]);
    assert_clean_error(&o, "tokenizer.json");
    std::fs::remove_dir_all(&dir).unwrap();
}
