//! `s2lc analyze` end to end: on the real SmolLM2 it reports all 210 linear weights with sane
//! ranks and draws the plots; bad input gives one clear line and writes nothing.

use std::path::Path;

mod common;
use common::{s2lc, scratch, smollm2, stderr};

use s2lc_spectral::analysis::{SpectralReport, DEFAULT_THRESHOLDS};

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .len()
}

#[test]
fn smollm2_spectra() {
    let Some(model) = smollm2() else { return };
    let dir = scratch("smollm2");
    let out = dir.join("out");
    let plots = dir.join("figures/fig");
    let o = s2lc(&[
        "analyze",
        "--model",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--plot",
        plots.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    for needle in [
        "model.layers.0.self_attn.q_proj",
        "model.layers.29.mlp.down_proj",
        "per layer type",
        "whole model: 106,168,320 parameters in 210 linear weights",
    ] {
        assert!(stdout.contains(needle), "expected '{needle}' in:\n{stdout}");
    }

    // JSON at the default place under -o.
    let json = std::fs::read(out.join("spectra.json")).unwrap();
    let report: SpectralReport = serde_json::from_slice(&json).unwrap();
    assert_eq!(report.model, model.display().to_string());
    assert_eq!(report.tool_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(report.thresholds, DEFAULT_THRESHOLDS);
    assert_eq!(report.matrices.len(), 210);
    assert_eq!(report.kinds.len(), 7);
    for m in &report.matrices {
        let full = m.rows.min(m.cols);
        assert_eq!(m.name, format!("model.layers.{}.{}", m.layer, m.kind));
        assert_eq!(m.singular_values.len(), full, "{}", m.name);
        assert!(
            m.singular_values.windows(2).all(|w| w[0] >= w[1]),
            "{}",
            m.name
        );
        assert!(m.singular_values[0] > 0.0, "{}", m.name);
        let ranks: Vec<usize> = m.ranks.iter().map(|r| r.rank).collect();
        assert!(
            ranks.windows(2).all(|w| w[0] <= w[1]),
            "{}: {ranks:?}",
            m.name
        );
        assert!(ranks.iter().all(|&r| (1..=full).contains(&r)), "{}", m.name);
        assert_eq!(
            m.break_even_rank,
            (m.rows * m.cols - 1) / (m.rows + m.cols),
            "{}",
            m.name
        );
    }
    let shapes: Vec<(usize, usize)> = report.kinds.iter().map(|k| (k.rows, k.cols)).collect();
    assert_eq!(
        shapes,
        [
            (576, 576),
            (192, 576),
            (192, 576),
            (576, 576),
            (1536, 576),
            (1536, 576),
            (576, 1536)
        ]
    );
    for t in &report.totals {
        assert_eq!(t.dense_params, 106_168_320);
        assert!(t.params <= t.dense_params);
    }
    assert!(
        report.totals.windows(2).all(|w| w[0].params <= w[1].params),
        "parameters kept grow with the threshold"
    );

    // Plots at the --plot prefix; nothing was left behind in -o but the JSON.
    let svg = plots.with_extension("svg");
    let png = plots.with_extension("png");
    assert!(file_len(&svg) > 50_000 && file_len(&png) > 50_000);
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    assert!(svg_text.starts_with("<svg") && svg_text.contains("<polyline"));
    let png_bytes = std::fs::read(&png).unwrap();
    assert_eq!(&png_bytes[..8], b"\x89PNG\r\n\x1a\n");
    let mut left: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["spectra.json"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_model_is_one_line_and_writes_nothing() {
    let dir = scratch("missing");
    let out = dir.join("out");
    let o = s2lc(&[
        "analyze",
        "--model",
        "/nonexistent/model.gguf",
        "-o",
        out.to_str().unwrap(),
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert!(err.starts_with("error: "), "stderr: {err}");
    assert!(err.contains("/nonexistent/model.gguf"), "stderr: {err}");
    assert!(!err.contains("panicked"), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "stderr: {err}");
    assert!(!out.exists(), "nothing is written on failure");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unsupported_architecture_is_one_line() {
    let bert = s2lc_model::assets::minilm();
    if !bert.exists() {
        eprintln!(
            "skipped: {} absent (run scripts/fetch-assets)",
            bert.display()
        );
        return;
    }
    let dir = scratch("bert");
    let out = dir.join("out");
    let o = s2lc(&[
        "analyze",
        "--model",
        bert.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert!(
        err.starts_with("error: ") && err.contains("unsupported architecture 'bert'"),
        "stderr: {err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "stderr: {err}");
    assert!(!out.exists(), "nothing is written on failure");
    let _ = std::fs::remove_dir_all(&dir);
}
