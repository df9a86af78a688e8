//! `s2lc compress` end to end: bad input is one clear line and writes nothing; the real model
//! compressed by SVD is listed by `info` and evaluates.

mod common;
use common::{assert_clean_error, s2lc, scratch, smollm2, stderr};

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
