//! The commands `s2lc-bench` drives, end to end on the real model: `bench adapters`,
//! `bench pack` and `experts eval` (with an expert set packed, morphed and swapped in).

mod common;
use common::{alice_r4, assert_clean_error, s2lc, scratch, smollm2, stderr};

/// Runs `s2lc args… --json DIR/report.json`, checks it succeeded, and returns the report.
fn s2lc_json(args: &[&str], dir: &std::path::Path) -> serde_json::Value {
    let json = dir.join("report.json");
    let mut all = args.to_vec();
    all.extend(["--json", json.to_str().unwrap()]);
    let o = s2lc(&all);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

#[test]
fn bench_adapters_scores_every_domain() {
    let Some(model) = smollm2() else { return };
    let home = common::s2lc_home();
    if let Some((_, rel)) = s2lc_model::assets::DOMAINS
        .iter()
        .find(|(_, rel)| !home.join(rel).exists())
    {
        eprintln!("skipped: {rel} absent (run scripts/fetch-assets)");
        return;
    }
    let dir = scratch("bench-adapters");
    let adapter = alice_r4();
    let report = s2lc_json(
        &[
            "bench",
            "adapters",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--max-windows",
            "1",
            "--decode-tokens",
            "0",
            "--no-experts",
        ],
        &dir,
    );
    let domains = report["domains"].as_array().unwrap();
    assert_eq!(domains.len(), s2lc_model::assets::DOMAINS.len());
    assert!(domains.iter().all(|d| d["tokens_scored"] == 255));
    let carroll = domains.iter().position(|d| d["name"] == "carroll").unwrap();
    let base = report["base"][carroll].as_f64().unwrap();
    let adapted = report["adapters"][0]["perplexity"][carroll]
        .as_f64()
        .unwrap();
    assert!(
        adapted < base,
        "the alice29 adapter lowers perplexity on alice29's held-out text: {adapted} vs {base}"
    );
    assert_clean_error(
        &s2lc(&["bench", "adapters", "--heldout", "1.5"]),
        "--heldout 1.5 is outside (0, 1)",
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// An expert set built from the real model: layer 0's FFN as base, and one expert that is the
/// base scaled by 1.01 (residual exactly 1 % of the base, rank 1536 spread over the spectrum).
#[test]
fn experts_eval_swaps_each_expert_in() {
    let (Some(model), Some(text)) = (smollm2(), common::alice29()) else {
        return;
    };
    let dir = scratch("experts");
    common::write_expert_set(&model, &dir, &[("scaled", 1.01)]);
    let report = s2lc_json(
        &[
            "experts",
            "eval",
            dir.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--max-windows",
            "1",
        ],
        &dir,
    );
    let expert = &report["experts"][0];
    assert_eq!(expert["own_domain"], "alice29");
    let rel = expert["residual_rel_frobenius"].as_f64().unwrap();
    assert!((rel - 0.01).abs() < 1e-4, "{rel}");
    let (base, scaled) = (
        report["base"][0].as_f64().unwrap(),
        expert["perplexity"][0].as_f64().unwrap(),
    );
    assert!(
        base.is_finite() && scaled.is_finite() && base != scaled,
        "{base} {scaled}"
    );
    assert_clean_error(
        &s2lc(&["experts", "eval", dir.join("absent").to_str().unwrap()]),
        "manifest.json",
    );

    // The residuals pack like adapters, and a morph of them is a PEFT adapter on the FFN.
    let (pack, morph) = (dir.join("pack"), dir.join("morph"));
    let o = s2lc(&[
        "adapters",
        "pack",
        "--experts",
        dir.to_str().unwrap(),
        "--energy",
        "0.9",
        "-o",
        pack.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("scaled "));
    let o = s2lc(&[
        "adapters",
        "morph",
        pack.to_str().unwrap(),
        "scaled=0.5",
        "-o",
        morph.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = s2lc(&["adapters", "info", morph.to_str().unwrap()]);
    let info = String::from_utf8_lossy(&o.stdout);
    assert!(
        info.contains("3 deltas") && info.contains("down_proj"),
        "{info}"
    );
    // `eval` scores the model with an expert's FFN swapped in.
    let eval = |expert: &str| {
        s2lc(&[
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--max-tokens",
            "300",
            "--window",
            "128",
            "--stride",
            "128",
            "--decode-tokens",
            "0",
            "--expert-set",
            dir.to_str().unwrap(),
            "--expert",
            expert,
        ])
    };
    let o = eval("scaled");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("expert scaled: FFN of layers [0]"),
        "{}",
        stderr(&o)
    );
    assert_clean_error(&eval("nope"), "no expert 'nope'");
    assert_clean_error(
        &s2lc(&[
            "adapters",
            "pack",
            "--experts",
            dir.to_str().unwrap(),
            "--expert",
            "nope",
            "-o",
            dir.join("p2").to_str().unwrap(),
        ]),
        "no expert 'nope'",
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_pack_measures_a_real_adapter() {
    let Some(model) = smollm2() else { return };
    let home = common::s2lc_home();
    if s2lc_model::assets::DOMAINS
        .iter()
        .any(|(_, rel)| !home.join(rel).exists())
    {
        eprintln!("skipped: domain texts absent (run scripts/fetch-assets)");
        return;
    }
    let dir = scratch("bench-pack");
    let (model_s, adapter_s) = (model.to_str().unwrap(), alice_r4());
    let args = [
        "bench",
        "pack",
        "--model",
        model_s,
        "--adapter",
        adapter_s.to_str().unwrap(),
        "--no-experts",
        "--energies",
        "0.99",
        "--bits",
        "int8",
        "--max-windows",
        "1",
        "--unpack-runs",
        "1",
    ];
    let report = s2lc_json(&args, &dir);
    let configs = report["suites"][0]["configs"].as_array().unwrap();
    assert_eq!(configs.len(), 2, "shared and separate");
    for c in configs {
        let (f16, packed) = (
            c["f16_bytes"].as_f64().unwrap(),
            c["packed_bytes"].as_f64().unwrap(),
        );
        assert!(packed > 0.0 && packed < f16, "{packed} vs {f16}");
        assert!(c["max_rel_error"].as_f64().unwrap() < 0.2);
        // The fixture's own domain (alice29.txt, from its reference.json) is scored.
        let delta = c["ppl_delta"][0].as_f64().unwrap();
        assert!(
            delta.abs() < 0.05,
            "perplexity change after packing: {delta}"
        );
    }
    assert_eq!(report["suites"][0]["own_domain"][0], "carroll");
    // Activation-aware, calibrated on the training part of every domain text.
    let whitened = s2lc_json(
        &[&args[..], &["--whiten", "--calib-windows", "1"]].concat(),
        &dir,
    );
    assert_eq!(whitened["whitened"], true);
    for c in whitened["suites"][0]["configs"].as_array().unwrap() {
        let delta = c["ppl_delta"][0].as_f64().unwrap();
        assert!(delta.abs() < 0.05, "whitened packing: {delta}");
    }
    assert_clean_error(
        &s2lc(&["bench", "pack", "--bits", "int7", "--no-experts"]),
        "unknown bits 'int7'",
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_weights_compares_variants_with_the_dense_model() {
    let (Some(model), Some(text)) = (smollm2(), common::alice29()) else {
        return;
    };
    let dir = scratch("bench-weights");
    let (m, t) = (model.to_str().unwrap(), text.to_str().unwrap());
    // The shipped file as its own variant: same bytes, same perplexity, Q4_1 = 5 bits per weight.
    let report = s2lc_json(
        &[
            "bench",
            "weights",
            "--model",
            m,
            "--variant",
            m,
            "--texts",
            t,
            "--eval-tokens",
            "512",
            "--decode-tokens",
            "4",
            "--runs",
            "2",
        ],
        &dir,
    );
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for r in rows {
        let bits = r["bits_per_linear_weight"].as_f64().unwrap();
        assert!((bits - 5.0).abs() < 1e-9, "Q4_1 linears: {bits} bits");
        assert_eq!(r["decode_tok_s_runs"].as_array().unwrap().len(), 2);
        assert_eq!(r["decode_requantized"], false);
    }
    let ppl = |i: usize| rows[i]["perplexity"]["alice29.txt"].as_f64().unwrap();
    assert!(ppl(0) > 1.0 && ppl(0) == ppl(1), "{} vs {}", ppl(0), ppl(1));
    assert_clean_error(
        &s2lc(&["bench", "weights", "--variant", m, "--runs", "0"]),
        "--runs must be at least 1",
    );
}
