//! The commands that run one model (`info`, `generate`, `eval`) end to end: bad input (a missing
//! or broken model, an empty text, bad flags, bad adapters) gives one clear line and a non-zero
//! exit; the real model generates and evaluates, also through a spectral KV cache.

mod common;
use common::{assert_clean_error, s2lc, scratch, smollm2, stderr};

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
