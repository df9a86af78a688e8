//! The `s2lc` binary end to end: bad input gives one clear line and a non-zero exit; the real
//! model generates and evaluates.

use std::process::Output;

mod common;
use common::{s2lc, s2lc_env, scratch, smollm2, stderr};

/// One `error:` line naming the problem, no panic or backtrace, exit code 1.
fn assert_clean_error(o: &Output, needle: &str) {
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

#[test]
fn missing_model_file() {
    let o = s2lc(&["info", "--model", "/nonexistent/model.gguf"]);
    assert_clean_error(&o, "/nonexistent/model.gguf");
}

#[test]
fn not_a_model() {
    let dir = scratch("notmodel");
    let p = dir.join("x.gguf");
    std::fs::write(&p, b"hello world").unwrap();
    let o = s2lc(&["info", "--model", p.to_str().unwrap()]);
    assert_clean_error(&o, "not a model");
}

#[test]
fn truncated_gguf() {
    let Some(model) = smollm2() else { return };
    let dir = scratch("trunc");
    let p = dir.join("truncated.gguf");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let o = s2lc(&["info", "--model", p.to_str().unwrap()]);
    assert_clean_error(&o, "truncated.gguf");
    std::fs::write(&p, &bytes[..1000]).unwrap();
    let o = s2lc(&["generate", "--model", p.to_str().unwrap(), "--prompt", "hi"]);
    assert_clean_error(&o, "truncated.gguf");
}

#[test]
fn unknown_architecture_is_named() {
    // A Hugging Face directory whose model_type the runtime does not execute.
    let dir = scratch("arch");
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "gpt_neox", "hidden_size": 8}"#,
    )
    .unwrap();
    let t = s2lc_model::source::Tensor {
        shape: vec![2],
        data: vec![1.0, 2.0],
    };
    s2lc_model::source::write_safetensors(&dir.join("model.safetensors"), [("w", &t)], None)
        .unwrap();
    let o = s2lc(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert_clean_error(&o, "gpt_neox");
    // `info` still describes what it can.
    let o = s2lc(&["info", "--model", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("not runnable"));
}

#[test]
fn empty_text_file() {
    let Some(model) = smollm2() else { return };
    let dir = scratch("empty");
    let p = dir.join("empty.txt");
    std::fs::write(&p, b"").unwrap();
    let o = s2lc(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--text",
        p.to_str().unwrap(),
    ]);
    assert_clean_error(&o, "empty.txt");
}

#[test]
fn info_describes_the_real_model() {
    let Some(model) = smollm2() else { return };
    let o = s2lc(&["info", "--model", model.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("architecture: llama"), "{out}");
    assert!(
        out.contains("layers=30") && out.contains("heads=9/3"),
        "{out}"
    );
    assert!(
        out.contains("model.layers.29.mlp.down_proj.weight"),
        "{out}"
    );
    assert!(out.contains("Q4_1") && out.contains("Q8_0"), "{out}");
    assert!(out.contains("134515008 parameters"), "{out}");
}

#[test]
fn generate_and_eval_on_the_real_model() {
    let Some(model) = smollm2() else { return };
    let m = model.to_str().unwrap();
    let o = s2lc(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "What is the capital of France?",
        "--max-tokens",
        "24",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("Paris"), "{text}");

    let home = model.parent().unwrap().parent().unwrap();
    let alice = home.join("text/canterbury/alice29.txt");
    let o = s2lc(&[
        "eval",
        "--model",
        m,
        "--text",
        alice.to_str().unwrap(),
        "--max-tokens",
        "1024",
        "--decode-tokens",
        "8",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let ppl: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("perplexity: "))
        .expect("a perplexity line")
        .trim()
        .parse()
        .unwrap();
    // The first two 512-token windows of the reference fixture's four (NLL sums 1629.83 and
    // 1659.74 over 1022 predictions) give exp(3289.57 / 1022) = 25.0.
    assert!((ppl - 25.0).abs() < 0.05, "perplexity {ppl}");
    assert!(out.contains("tokens scored: 1022"), "{out}");
    assert!(out.contains("decode: "), "{out}");
}

#[test]
fn compress_bad_input_is_one_line() {
    let Some(model) = smollm2() else { return };
    let m = model.to_str().unwrap();
    let out = scratch("compress-bad");
    let o = out.join("never");
    let o = o.to_str().unwrap();
    let r = s2lc(&[
        "compress", "--model", m, "-o", o, "--energy", "1.5", "--method", "svd",
    ]);
    assert_clean_error(&r, "1.5");
    let r = s2lc(&[
        "compress",
        "--model",
        m,
        "-o",
        o,
        "--keep-params",
        "0.001",
        "--method",
        "svd",
    ]);
    assert_clean_error(&r, "cannot keep");
    let tiny = out.join("tiny.txt");
    std::fs::write(&tiny, "Too short for a window.").unwrap();
    let r = s2lc(&[
        "compress",
        "--model",
        m,
        "-o",
        o,
        "--energy",
        "0.9",
        "--calib-text",
        tiny.to_str().unwrap(),
    ]);
    assert_clean_error(&r, "fewer than one window");
    assert!(!out.join("never").exists(), "nothing is written on failure");
}

#[test]
fn compress_then_eval_the_real_model() {
    let Some(model) = smollm2() else { return };
    let m = model.to_str().unwrap();
    let dir = scratch("compress").join("svd99");
    let d = dir.to_str().unwrap();
    let r = s2lc(&[
        "compress", "--model", m, "-o", d, "--energy", "0.99", "--method", "svd",
    ]);
    assert!(r.status.success(), "{}", stderr(&r));
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("s2lc_compression.json")).unwrap())
            .unwrap();
    assert_eq!(record["method"], "svd");
    assert_eq!(record["matrices"].as_array().unwrap().len(), 210);
    assert!(record["params_after"].as_u64().unwrap() < record["params_before"].as_u64().unwrap());
    let info = s2lc(&["info", "--model", d]);
    let listing = String::from_utf8_lossy(&info.stdout);
    assert!(
        listing.contains("lowrank_u") && listing.contains("lowrank_vs"),
        "{listing}"
    );

    let home = model.parent().unwrap().parent().unwrap();
    let text = home.join("text/canterbury/lcet10.txt");
    let t = text.to_str().unwrap();
    let ppl = |model: &str| -> f64 {
        let r = s2lc(&[
            "eval",
            "--model",
            model,
            "--text",
            t,
            "--max-tokens",
            "1024",
            "--decode-tokens",
            "0",
        ]);
        assert!(r.status.success(), "{}", stderr(&r));
        let out = String::from_utf8_lossy(&r.stdout).into_owned();
        out.lines()
            .find_map(|l| l.strip_prefix("perplexity: "))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let (dense, compressed) = (ppl(m), ppl(d));
    eprintln!("lcet10 perplexity: dense {dense:.2}, svd 99% energy {compressed:.2}");
    assert!(
        compressed.is_finite() && compressed > dense,
        "dense {dense}, compressed {compressed}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_weight_storage_and_thread_count_are_named() {
    let o = s2lc(&["eval", "--text", "x.txt", "--weights", "q3"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(
        err.contains("unknown weight storage 'q3' (f32, f16, q8_0, native)"),
        "{err}"
    );
    let o = s2lc(&["--threads", "0", "info", "--model", "x.gguf"]);
    assert_clean_error(&o, "--threads must be at least 1");
}

#[test]
fn bad_kv_specs_are_named_before_the_model_loads() {
    for (spec, needle) in [
        ("spectral:energy=1.5", "energy 1.5 is outside (0, 1]"),
        (
            "spectral:block=100",
            "block 100 is not a positive multiple of 32",
        ),
        (
            "spectral:rank=600",
            "rank 600 is larger than the block of 512 tokens",
        ),
        ("zip", "unknown cache 'zip'"),
    ] {
        // A missing model: the spec is rejected first, by argument parsing (exit code 2).
        let o = s2lc(&["eval", "--text", "x.txt", "--kv", spec]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{spec}: {err}");
        assert!(err.contains(needle), "{spec}: {err}");
    }
}

#[test]
fn eval_and_generate_through_a_spectral_cache() {
    let Some(model) = smollm2() else { return };
    let m = model.to_str().unwrap();
    let home = model.parent().unwrap().parent().unwrap();
    let text = home.join("text/canterbury/plrabn12.txt");
    let o = s2lc(&[
        "eval",
        "--model",
        m,
        "--text",
        text.to_str().unwrap(),
        "--max-tokens",
        "600",
        "--kv",
        "spectral:block=128,window=64",
        "--decode-tokens",
        "4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("tokens scored: 599 (one sequence of 600"),
        "{out}"
    );
    assert!(out.contains("smaller than dense f16"), "{out}");
    assert!(out.contains("decode at 600 tokens of context"), "{out}");
    // The rank check needs the model's head size (64): rejected after loading, still one line.
    let o = s2lc(&[
        "eval",
        "--model",
        m,
        "--text",
        text.to_str().unwrap(),
        "--kv",
        "spectral:rank=65,block=128",
    ]);
    assert_clean_error(&o, "rank 65 is larger than the head size 64");
    let o = s2lc(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "What is the capital of France?",
        "--max-tokens",
        "24",
        "--kv",
        "spectral:block=32,window=0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("Paris"), "{text}");
    assert!(
        stderr(&o).contains("KV cache: keys spectral"),
        "{}",
        stderr(&o)
    );
}

/// Writes a PEFT-layout adapter: `config` as adapter_config.json and rank-`r` A/B tensors for
/// `q_proj` of layer 0 with the given (in, out) sizes.
fn write_adapter(dir: &std::path::Path, config: &str, r: usize, inp: usize, out: usize) {
    use s2lc_model::source::{write_safetensors, Tensor};
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
    let a = Tensor {
        shape: vec![r, inp],
        data: vec![0.01; r * inp],
    };
    let b = Tensor {
        shape: vec![out, r],
        data: vec![0.01; out * r],
    };
    let p = "base_model.model.model.layers.0.self_attn.q_proj";
    let (na, nb) = (format!("{p}.lora_A.weight"), format!("{p}.lora_B.weight"));
    write_safetensors(
        &dir.join("adapter_model.safetensors"),
        [(na.as_str(), &a), (nb.as_str(), &b)],
        None,
    )
    .unwrap();
}

#[test]
fn bad_adapters_are_one_clear_error() {
    let Some(model) = smollm2() else { return };
    let m = model.to_str().unwrap();
    let dir = scratch("adapters");
    let ok = r#"{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}"#;
    let cases: Vec<(&str, String, &str)> = vec![
        ("missing", String::new(), "adapter_config.json"),
        (
            "rank0",
            r#"{"r": 0, "lora_alpha": 4, "target_modules": ["q_proj"]}"#.into(),
            "LoRA rank r is 0",
        ),
        (
            "target",
            r#"{"r": 2, "lora_alpha": 4, "target_modules": ["qkv"]}"#.into(),
            "unknown target module 'qkv'",
        ),
        (
            "other-base",
            ok.into(),
            "LoRA is 576×960 (B·A) but the layer is 576×576",
        ),
        ("corrupt", ok.into(), "invalid safetensors"),
    ];
    for (name, config, needle) in &cases {
        let d = dir.join(name);
        match *name {
            "missing" => {}
            "other-base" => write_adapter(&d, config, 2, 960, 576),
            _ => write_adapter(&d, config, 2, 576, 576),
        }
        if *name == "corrupt" {
            std::fs::write(
                d.join("adapter_model.safetensors"),
                b"not a safetensors file",
            )
            .unwrap();
        }
        let o = s2lc(&[
            "generate",
            "--model",
            m,
            "--prompt",
            "Hi",
            "--adapter",
            d.to_str().unwrap(),
        ]);
        assert_clean_error(&o, needle);
    }
    // A well-formed adapter loads and runs.
    let d = dir.join("fine");
    write_adapter(&d, ok, 2, 576, 576);
    let o = s2lc(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "Hi",
        "--max-tokens",
        "4",
        "--adapter",
        d.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("rank 2, scale 2, 1 layers adapted"),
        "{}",
        stderr(&o)
    );
}

/// Runs `s2lc args… --json DIR/report.json`, checks it succeeded, and returns the report.
fn s2lc_json(args: &[&str], dir: &std::path::Path) -> serde_json::Value {
    let json = dir.join("report.json");
    let mut all = args.to_vec();
    all.extend(["--json", json.to_str().unwrap()]);
    let o = s2lc(&all);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

/// The committed real adapter (trained with PEFT on alice29.txt, rank 4 on q/v).
/// `s2lc adapters unpack PACK NAME -o OUT`, which must succeed.
fn unpack_ok(pack: &std::path::Path, name: &str, out: &std::path::Path) {
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

fn alice_r4() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/adapters/alice-r4")
}

#[test]
fn adapter_info_and_truncate_on_a_real_adapter() {
    let src = alice_r4();
    let src = src.to_str().unwrap();
    let o = s2lc(&["adapters", "info", src]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("rank 4 · lora_alpha 8 · scale 2 · 60 deltas"),
        "{out}"
    );
    assert!(out.contains("q_proj") && out.contains("v_proj"), "{out}");

    let dir = scratch("truncate");
    let dst = dir.join("r2");
    let o = s2lc(&[
        "adapters",
        "truncate",
        src,
        "--rank",
        "2",
        "-o",
        dst.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("230400 -> 115200 (2.00x fewer)"), "{out}");
    let o = s2lc(&["adapters", "info", dst.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("rank 2 · lora_alpha 2 · scale 1 · 60 deltas"),
        "{out}"
    );

    for (args, needle) in [
        (vec!["--energy", "0"], "outside (0, 1]"),
        (vec!["--rank", "0"], "at least 1"),
        (vec![], "give --energy, --rank or both"),
    ] {
        let mut all = vec!["adapters", "truncate", src, "-o", dst.to_str().unwrap()];
        all.extend(args);
        assert_clean_error(&s2lc(&all), needle);
    }
    assert_clean_error(
        &s2lc(&["adapters", "truncate", src, "--rank", "1", "-o", src]),
        "is the input adapter",
    );
    assert_clean_error(
        &s2lc(&["adapters", "info", dir.join("nothing").to_str().unwrap()]),
        "adapter_config.json",
    );
    std::fs::remove_dir_all(&dir).ok();
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

/// Activation-aware packing on the real model: calibrated on real text, it packs and adds with
/// the calibration, and refuses an add without it.
#[test]
fn whitened_pack_calibrates_on_real_text() {
    let (Some(model), Some(text)) = (smollm2(), common::alice29()) else {
        return;
    };
    let r4 = alice_r4();
    let dir = scratch("wpack");
    let pack = dir.join("pack");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let calibrate = [
        "--calibrate".to_string(),
        s(&text),
        "--calib-windows".into(),
        "2".into(),
        "--model".into(),
        s(&model),
    ];
    let run = |args: &[String]| s2lc(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut args: Vec<String> = ["adapters", "pack", &s(&r4), "-o", &s(&pack)]
        .map(String::from)
        .to_vec();
    args.extend(calibrate.iter().cloned());
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pack.join("pack.json")).unwrap()).unwrap();
    assert_eq!(manifest["params"]["whitened"], true);
    assert_clean_error(
        &s2lc(&["adapters", "add", &s(&pack), &s(&r4), "--name", "again"]),
        "needs its calibration",
    );
    let mut args: Vec<String> = ["adapters", "add", &s(&pack), &s(&r4), "--name", "again"]
        .map(String::from)
        .to_vec();
    args.extend(calibrate.iter().cloned());
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("again"));
    std::fs::remove_dir_all(&dir).ok();
}

/// Loss-aware packing on the real model: sensitivities measured on real text for every delta
/// (all positive), written, and used by `pack --loss-weights` and `add --loss-weights`; files
/// that name another adapter or are not sensitivity files are refused.
#[test]
fn loss_aware_pack_measures_on_real_text() {
    let (Some(model), Some(text)) = (smollm2(), common::alice29()) else {
        return;
    };
    let r4 = alice_r4();
    let dir = scratch("losspack");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let sens = dir.join("alice-r4.json");
    let o = s2lc(&[
        "adapters",
        "sensitivity",
        &s(&r4),
        "--text",
        &s(&text),
        "--windows",
        "1",
        "--window",
        "16",
        "--model",
        &s(&model),
        "-o",
        &s(&sens),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("v_proj: relative weight median"));
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&sens).unwrap()).unwrap();
    assert_eq!(file["adapter"], "alice-r4");
    let matrices = file["matrices"].as_array().unwrap();
    assert_eq!(matrices.len(), 60);
    assert!(matrices
        .iter()
        .all(|m| m["kl"].as_f64().unwrap() > 0.0 && m["energy"].as_f64().unwrap() > 0.0));

    let pack = dir.join("pack");
    let o = s2lc(&[
        "adapters",
        "pack",
        &s(&r4),
        "-o",
        &s(&pack),
        "--scope",
        "member",
        "--energy",
        "0.9",
        "--loss-weights",
        &s(&sens),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = s2lc(&[
        "adapters",
        "add",
        &s(&pack),
        &s(&r4),
        "--name",
        "again",
        "--loss-weights",
        &s(&sens),
    ]);
    // The file names alice-r4, the member is 'again'.
    assert_clean_error(&o, "sensitivities of 'alice-r4', which is not being packed");
    unpack_ok(&pack, "alice-r4", &dir.join("unpacked"));
    assert_clean_error(
        &s2lc(&[
            "adapters",
            "pack",
            &s(&r4),
            "-o",
            &s(&dir.join("p2")),
            "--loss-weights",
            &s(&text),
        ]),
        "not a sensitivity file",
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn adapters_pack_add_unpack_round_trip() {
    let fixtures = alice_r4().parent().unwrap().to_path_buf();
    let (r4, e90) = (fixtures.join("alice-r4"), fixtures.join("alice-r4-e90"));
    let dir = scratch("pack");
    let pack = dir.join("pack");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let o = s2lc(&[
        "adapters",
        "pack",
        &s(&r4),
        &s(&e90),
        "-o",
        &s(&pack),
        "--energy",
        "0.99",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("alice-r4 ") && out.contains("alice-r4-e90"),
        "{out}"
    );
    assert!(pack.join("pack.json").is_file() && pack.join("basis.safetensors").is_file());
    let o = s2lc(&[
        "adapters",
        "add",
        &s(&pack),
        &s(&r4),
        "--name",
        "alice-again",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let un = dir.join("unpacked");
    unpack_ok(&pack, "alice-again", &un);
    // The unpacked adapter is a PEFT directory S2LC reads back, with the original's 60 deltas.
    let o = s2lc(&["adapters", "info", &s(&un)]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("60 deltas"));

    // Mixed-width bases: written as column groups under the format that names them, and
    // unpacked like any other pack.
    let mixed = dir.join("mixed");
    let o = s2lc(&[
        "adapters",
        "pack",
        &s(&r4),
        &s(&e90),
        "-o",
        &s(&mixed),
        "--basis-bits",
        "int3",
        "--mixed-bases",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let manifest = std::fs::read_to_string(mixed.join("pack.json")).unwrap();
    assert!(manifest.contains("s2lc-pack/2"), "{manifest}");
    unpack_ok(&mixed, "alice-r4", &dir.join("mixed-unpacked"));

    // Entropy-coded: the same quantization in smaller files, unpacked to the same adapter.
    let coded = dir.join("coded");
    let o = s2lc(&[
        "adapters",
        "pack",
        &s(&r4),
        &s(&e90),
        "-o",
        &s(&coded),
        "--energy",
        "0.99",
        "--entropy",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let manifest = std::fs::read_to_string(coded.join("pack.json")).unwrap();
    assert!(manifest.contains("s2lc-pack/3"), "{manifest}");
    let files_bytes = |p: &std::path::Path| -> u64 {
        [
            "basis.safetensors",
            "members/alice-r4.safetensors",
            "members/alice-r4-e90.safetensors",
        ]
        .iter()
        .map(|f| std::fs::metadata(p.join(f)).unwrap().len())
        .sum()
    };
    // `pack` is the same packing in plain files (`add` left these three files as they were).
    let (plain_bytes, coded_bytes) = (files_bytes(&pack), files_bytes(&coded));
    assert!(coded_bytes < plain_bytes, "{coded_bytes} vs {plain_bytes}");
    unpack_ok(&coded, "alice-r4", &dir.join("coded-unpacked"));
    unpack_ok(&pack, "alice-r4", &dir.join("plain-unpacked"));
    let weights =
        |p: std::path::PathBuf| std::fs::read(p.join("adapter_model.safetensors")).unwrap();
    assert!(
        weights(dir.join("coded-unpacked")) == weights(dir.join("plain-unpacked")),
        "the coded pack unpacks to other weights than the plain one"
    );

    assert_clean_error(
        &s2lc(&["adapters", "pack", &s(&r4), "-o", &s(&pack)]),
        "already holds a pack",
    );
    assert_clean_error(
        &s2lc(&["adapters", "unpack", &s(&pack), "nobody", "-o", &s(&un)]),
        "no member 'nobody'",
    );
    assert_clean_error(
        &s2lc(&[
            "adapters",
            "add",
            &s(&pack),
            &s(&r4),
            "--name",
            "alice-again",
        ]),
        "already has a member 'alice-again'",
    );
    assert_clean_error(
        &s2lc(&[
            "adapters",
            "pack",
            &s(&r4),
            "-o",
            &s(&dir.join("p2")),
            "--energy",
            "0",
        ]),
        "outside (0, 1]",
    );
    assert_clean_error(
        &s2lc(&[
            "adapters",
            "unpack",
            &s(&dir.join("missing")),
            "x",
            "-o",
            &s(&un),
        ]),
        "pack.json",
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
fn store_push_pull_ls_verify_gc() {
    let dir = scratch("store");
    let store = dir.join("store").to_str().unwrap().to_string();
    store_commands(&dir, &store, &[]);
    std::fs::remove_dir_all(&dir).ok();
}

/// The same commands against a real S3-compatible server (`s3s-fs` on loopback), configured the
/// way a user would: `--store s3://bucket/prefix` and the AWS environment variables.
#[cfg(feature = "s3")]
#[test]
fn store_push_pull_ls_verify_gc_on_s3() {
    let dir = scratch("store-s3");
    let server = s2lc_store::loopback::S3sFs::start(&dir.join("s3")).unwrap();
    std::fs::create_dir_all(server.root().join("fleet")).unwrap();
    store_commands(&dir, "s3://fleet/adapters", &server.env());
    std::fs::remove_dir_all(&dir).ok();
}

/// push (whole adapter and pack members), ls with dedup, pull + unpack, base-model refusal,
/// immutable versions, bad versions, tag, verify, rm, gc — on the store at `store`.
fn store_commands(dir: &std::path::Path, store: &str, env: &[(&str, String)]) {
    let fixtures = alice_r4().parent().unwrap().to_path_buf();
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    // A small stand-in base model: the digest is what matters here.
    let base = dir.join("base.gguf");
    std::fs::write(&base, b"base model bytes").unwrap();
    let other = dir.join("other.gguf");
    std::fs::write(&other, b"another base").unwrap();
    let run = |args: &[&str]| {
        let mut all = vec!["store", "--store", store];
        all.extend_from_slice(args);
        s2lc_env(&all, env)
    };
    let o = run(&[
        "push",
        &s(&fixtures.join("alice-r4")),
        "alice@1.0.0",
        "--model",
        &s(&base),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Two members of one pack: their shared bases are stored once.
    let pack = dir.join("pack");
    let o = s2lc(&[
        "adapters",
        "pack",
        &s(&fixtures.join("alice-r4")),
        &s(&fixtures.join("alice-r4-e90")),
        "-o",
        &s(&pack),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for (member, target) in [
        ("alice-r4", "alice-packed@1.0.0"),
        ("alice-r4-e90", "alice-e90@1.0.0"),
    ] {
        let o = run(&[
            "push",
            &s(&pack),
            target,
            "--member",
            member,
            "--model",
            &s(&base),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let o = run(&["ls"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("3 versions") && out.contains("dedup saves"),
        "{out}"
    );
    let saving: f64 = out
        .split("dedup saves ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|t| t.parse().ok())
        .unwrap();
    assert!(saving > 10.0, "the shared bases are stored once: {out}");

    let pulled = dir.join("pulled");
    let o = run(&[
        "pull",
        "alice-packed@^1",
        "-o",
        &s(&pulled),
        "--model",
        &s(&base),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    unpack_ok(&pulled, "alice-r4", &dir.join("un"));
    assert_clean_error(
        &run(&[
            "pull",
            "alice@1.0.0",
            "-o",
            &s(&dir.join("x")),
            "--model",
            &s(&other),
        ]),
        "was made for base model",
    );
    assert_clean_error(
        &run(&[
            "push",
            &s(&fixtures.join("alice-r4")),
            "alice@1.0.0",
            "--model",
            &s(&base),
        ]),
        "alice@1.0.0 already exists",
    );
    assert_clean_error(
        &run(&["push", &s(&pack), "alice@1.x", "--model", &s(&base)]),
        "bad version '1.x'",
    );
    assert_clean_error(
        &run(&["pull", "alice@^2", "-o", &s(&dir.join("x")), "--any-base"]),
        "no version of 'alice' satisfies ^2",
    );
    let o = run(&["tag", "alice@1.0.0", "prod"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&["verify"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&["rm", "alice@1.0.0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&["gc", "--grace-secs", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("removed"));
}
