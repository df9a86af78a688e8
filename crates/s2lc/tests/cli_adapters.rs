//! `s2lc adapters ...` end to end on the committed real adapters: info and truncate, and
//! packing (plain, mixed-width, entropy-coded, activation-aware, loss-aware), add and unpack.

mod common;
use common::{alice_r4, assert_clean_error, s2lc, scratch, smollm2, stderr, unpack_ok};

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
