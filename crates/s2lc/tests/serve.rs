//! `s2lc serve` end to end on the real model: adapters pushed to a store (a PEFT adapter and an
//! S2LC pack member) are served by name and semver requirement, the server's text equals `s2lc
//! generate` with the same adapter, concurrent requests with different adapters batched together
//! get the text they get alone, the cache loads a cold adapter once under concurrent requests,
//! and every bad request gets a JSON error while the server keeps serving.

use std::path::PathBuf;
use std::process::Command;

mod common;
use common::server::*;
use common::{s2lc, scratch, smollm2, stderr};
use serde_json::{json, Value};

#[test]
fn serve_completions_with_store_adapters() {
    let Some(model) = smollm2() else { return };
    let dir = scratch("serve");
    let (store, pack) = store_with_alice(&dir, &model);
    push(
        &store,
        &model,
        &pack,
        "alice-packed@1.1.0",
        Some("alice-r4"),
    );

    let server = start(&[
        "--store",
        store.to_str().unwrap(),
        "--model-id",
        "smollm2",
        "--max-tokens",
        "64",
        "--adapter-memory",
        "64MiB",
        "--pin",
        "alice@1",
    ]);
    let addr = server.addr.as_str();
    // The pinned adapter was loaded at start.
    assert_eq!(metric(addr, "s2lc_adapter_cache_misses_total"), 1.0);
    assert_eq!(http(addr, "GET", "/health", b"").0, 200);
    let (status, models) = http(addr, "GET", "/v1/models", b"");
    assert_eq!(status, 200);
    assert!(
        models.contains("\"smollm2\"") && models.contains("smollm2:alice@1.0.0"),
        "{models}"
    );

    // The server's greedy text with the adapter equals `s2lc generate` with the same adapter.
    let prompt = "Alice was beginning to get very tired of";
    let req =
        |model: &str| json!({"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0});
    let (status, with) = post(addr, "/v1/completions", &req("smollm2:alice@^1"));
    assert_eq!(status, 200, "{with}");
    assert_eq!(with["s2lc"]["adapter"], "alice@1.0.0");
    assert_eq!(with["s2lc"]["adapter_cache"], "hit", "pinned at start");
    assert_eq!(with["model"], "smollm2:alice@1.0.0");
    let text = with["choices"][0]["text"].as_str().unwrap();
    let cli = s2lc(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--raw",
        "--prompt",
        prompt,
        "--max-tokens",
        "12",
        "--adapter",
        fixture("alice-r4").to_str().unwrap(),
    ]);
    assert!(cli.status.success(), "{}", stderr(&cli));
    assert_eq!(
        String::from_utf8_lossy(&cli.stdout).trim_end(),
        text.trim_end()
    );
    let (_, again) = post(addr, "/v1/completions", &req("smollm2:alice@1.0.0"));
    assert_eq!(again["s2lc"]["adapter_cache"], "hit");
    assert_eq!(again["choices"][0]["text"], text);
    let (_, base) = post(addr, "/v1/completions", &req("smollm2"));
    assert_eq!(base["s2lc"]["adapter"], Value::Null);
    assert!(base["usage"]["completion_tokens"].as_u64().unwrap() <= 12);

    // Concurrent requests decode in one batch (each row with its own adapter, or none) and get
    // the text they get alone.
    let models = ["smollm2:alice@1", "smollm2", "smollm2:alice@1", "smollm2"];
    let batched: Vec<Value> = std::thread::scope(|s| {
        let hs: Vec<_> = models
            .iter()
            .map(|m| s.spawn(|| post(addr, "/v1/completions", &req(m)).1))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (m, b) in models.iter().zip(&batched) {
        let alone = if m.contains("alice") { &with } else { &base };
        assert_eq!(b["choices"][0]["text"], alone["choices"][0]["text"], "{m}");
    }

    // Four concurrent requests for a cold pack member: one load.
    let misses = metric(addr, "s2lc_adapter_cache_misses_total");
    let bodies: Vec<Value> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let r =
                        json!({"prompt": prompt, "max_tokens": 4, "adapter": "alice-packed@~1.1"});
                    post(addr, "/v1/completions", &r)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap().1).collect()
    });
    for b in &bodies {
        assert_eq!(b["s2lc"]["adapter"], "alice-packed@1.1.0", "{b}");
    }
    assert_eq!(
        metric(addr, "s2lc_adapter_cache_misses_total"),
        misses + 1.0
    );

    // Streaming: server-sent events whose pieces add up to the same text.
    let mut streamed = req("smollm2:alice@1.0.0");
    streamed["stream"] = json!(true);
    let (status, raw) = http(
        addr,
        "POST",
        "/v1/completions",
        streamed.to_string().as_bytes(),
    );
    assert_eq!(status, 200, "{raw}");
    let events: Vec<&str> = raw
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{raw}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let joined: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(joined, text);
    assert!(chunks.len() > 2, "one event per piece: {raw}");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    // The load benchmark's timed client sees one arrival per piece of text, in order.
    let timed =
        s2lc_serve::client::request_timed(addr, "/v1/completions", streamed.to_string().as_bytes())
            .unwrap();
    assert_eq!(timed.response.status, 200);
    assert_eq!(
        timed.pieces.len(),
        chunks.len() - 1,
        "{}",
        timed.response.body
    );
    assert!(timed.pieces.windows(2).all(|w| w[0] <= w[1]));

    // Chat.
    let (status, chat) = post(
        addr,
        "/v1/chat/completions",
        &json!({"model": "smollm2", "max_tokens": 8,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}),
    );
    assert_eq!(status, 200, "{chat}");
    assert_eq!(chat["object"], "chat.completion");
    assert!(chat["choices"][0]["message"]["content"].is_string());

    // Bad requests: a JSON error each, naming the problem.
    let p = |extra: Value| complete_with(addr, json!({"prompt": "hi", "max_tokens": 4}), extra);
    assert_error(
        p(json!({"adapter": "nobody@1.0.0"})),
        404,
        "no adapter 'nobody'",
    );
    assert_error(
        p(json!({"adapter": "alice@^2"})),
        404,
        "no version of 'alice' satisfies ^2",
    );
    assert_error(
        p(json!({"adapter": "alice@>>1"})),
        400,
        "bad version requirement",
    );
    assert_error(
        p(json!({"model": "gpt-4"})),
        404,
        "model 'gpt-4' is not served",
    );
    assert_error(
        p(json!({"max_tokens": 100000})),
        400,
        "over this server's limit of 64",
    );
    assert_error(p(json!({"temperature": -1})), 400, "temperature");
    assert_error(
        p(json!({"model": "smollm2:alice@1.0.0", "adapter": "x@1.0.0"})),
        400,
        "adapter field names 'x@1.0.0'",
    );
    let long = "hello ".repeat(9000);
    assert_error(p(json!({"prompt": long})), 400, "over the context");
    let (status, body) = http(addr, "POST", "/v1/completions", b"{\"prompt\": ");
    assert_eq!(status, 400);
    assert!(body.contains("malformed JSON"), "{body}");
    let (status, body) = http(addr, "POST", "/v1/completions", &vec![b' '; 2 << 20]);
    assert_eq!(status, 413, "{body}");
    assert_eq!(http(addr, "GET", "/nope", b"").0, 404);
    assert_eq!(
        post(
            addr,
            "/v1/chat/completions",
            &json!({"messages": [{"role": "robot", "content": "x"}]})
        )
        .0,
        400
    );

    // Still serving, and the counters saw it all.
    assert_eq!(post(addr, "/v1/completions", &req("smollm2")).0, 200);
    assert_eq!(
        metric(addr, "s2lc_request_errors_total"),
        11.0,
        "one per bad request"
    );
    assert!(metric(addr, "s2lc_adapter_cache_resident_bytes") > 0.0);
    drop(server);
    std::fs::remove_dir_all(&dir).ok();
}

/// `--adapter-dtype`: the cache holds and charges an adapter in the form asked for (the real
/// rank-4 adapter: 4 bytes per value as f32, 2 as f16, 17/16 as int8 and 9/16 as int4: blocks
/// of 32 values with an f16 scale), and every form serves the same request.
#[test]
fn adapters_are_resident_in_the_dtype_asked_for() {
    let Some(model) = smollm2() else { return };
    let dir = scratch("serve-dtype");
    let (store, _) = store_with_alice(&dir, &model);
    let mut resident = Vec::new();
    for dtype in ["f32", "f16", "int8", "int4"] {
        let server = start(&[
            "--store",
            store.to_str().unwrap(),
            "--adapter-dtype",
            dtype,
            "--pin",
            "alice@1",
        ]);
        let addr = server.addr.as_str();
        let (status, body) = post(
            addr,
            "/v1/completions",
            &json!({"prompt": "Alice was beginning", "max_tokens": 4, "temperature": 0,
                    "adapter": "alice@1"}),
        );
        assert_eq!(status, 200, "{dtype}: {body}");
        assert_eq!(body["s2lc"]["adapter_cache"], "hit", "{dtype}: pinned");
        assert!(body["usage"]["completion_tokens"].as_u64().unwrap() > 0);
        resident.push(metric(addr, "s2lc_adapter_cache_resident_bytes"));
    }
    let f32_bytes = resident[0];
    assert!(f32_bytes > 0.0);
    let ratios: Vec<f64> = resident.iter().map(|b| b / f32_bytes).collect();
    assert_eq!(ratios, [1.0, 0.5, 17.0 / 64.0, 9.0 / 64.0], "{resident:?}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The same files pushed under two names are resident once: the second name is a cache hit and
/// adds no bytes.
#[test]
fn identical_content_under_two_names_is_resident_once() {
    let Some(model) = smollm2() else { return };
    let dir = scratch("serve-dedup");
    let (store, _) = store_with_alice(&dir, &model);
    push(
        &store,
        &model,
        &fixture("alice-r4"),
        "alice-copy@2.0.0",
        None,
    );
    let server = start(&["--store", store.to_str().unwrap()]);
    let addr = server.addr.as_str();
    let ask = |adapter: &str| {
        let (status, body) = post(
            addr,
            "/v1/completions",
            &json!({"prompt": "Alice was beginning", "max_tokens": 4, "temperature": 0,
                    "adapter": adapter}),
        );
        assert_eq!(status, 200, "{adapter}: {body}");
        body
    };
    let first = ask("alice@1");
    assert_eq!(first["s2lc"]["adapter_cache"], "miss");
    let one = metric(addr, "s2lc_adapter_cache_resident_bytes");
    let copy = ask("alice-copy@2");
    assert_eq!(copy["s2lc"]["adapter"], "alice-copy@2.0.0");
    assert_eq!(copy["s2lc"]["adapter_cache"], "hit", "same content");
    assert_eq!(copy["choices"], first["choices"]);
    assert_eq!(metric(addr, "s2lc_adapter_cache_resident_bytes"), one);
    assert_eq!(metric(addr, "s2lc_adapter_cache_resident"), 1.0);
    assert_eq!(metric(addr, "s2lc_adapter_cache_misses_total"), 1.0);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn serve_refuses_bad_flags_with_one_line() {
    let o = s2lc(&["serve", "--adapter-memory", "12 parsecs"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("unknown unit 'parsecs'"),
        "{}",
        stderr(&o)
    );
    let o = s2lc(&["serve", "--adapter-dtype", "int3"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("unknown adapter dtype 'int3'"),
        "{}",
        stderr(&o)
    );
    let Some(_) = smollm2() else { return };
    let o = s2lc(&["serve", "--model-id", "a:b", "--port", "0"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("free of ':'"), "{}", stderr(&o));
    let dir = scratch("serve-pin");
    let store = dir.join("store");
    let o = s2lc(&[
        "serve",
        "--port",
        "0",
        "--store",
        store.to_str().unwrap(),
        "--pin",
        "nobody@^1",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("pinning nobody@^1: no adapter 'nobody'"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Settings from a TOML file and flags; tag rules pick adapters by a request's `route` tags;
/// `morph` blends the members of a pack pushed whole; each misuse is one JSON error.
#[test]
fn tag_rules_and_morphs_from_a_config_file() {
    let Some(model) = smollm2() else { return };
    let dir = scratch("serve-rules");
    let (store, pack) = store_with_alice(&dir, &model);
    push(&store, &model, &pack, "alice-set@1.0.0", None);
    let config = dir.join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "store = {:?}\nmodel-id = \"smollm2\"\nmax-tokens = 32\nadapter-memory = \"64MiB\"\n\
             pin = [\"alice@1\"]\n\n[[rule]]\nwhen = {{ book = \"alice\" }}\nadapter = \"alice@^1\"\n",
            store.to_str().unwrap()
        ),
    )
    .unwrap();
    let server = start(&[
        "--config",
        config.to_str().unwrap(),
        "--rule",
        "book=other, lang=en : alice-set@1.0.0",
    ]);
    let addr = server.addr.as_str();
    assert_eq!(
        metric(addr, "s2lc_adapter_cache_misses_total"),
        1.0,
        "pinned from the file"
    );
    let base = json!({"prompt": "Alice was beginning to", "max_tokens": 4, "temperature": 0});
    let p = |extra: Value| complete_with(addr, base.clone(), extra);
    let (status, v) = p(json!({"route": "book=alice"}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["s2lc"]["adapter"], "alice@1.0.0");
    assert_eq!(v["s2lc"]["route"]["by"], "rule");
    assert_eq!(v["s2lc"]["route"]["rule"], 0);
    // The flag's rule comes after the file's; an object of tags works like the string form.
    let blend = json!({"alice-r4": 0.5, "alice-r4-e90": 0.5});
    let (status, v) = p(json!({"route": {"lang": "en", "book": "other"}, "morph": blend}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["s2lc"]["adapter"], "alice-set@1.0.0");
    assert_eq!(v["s2lc"]["route"]["rule"], 1);
    assert_eq!(v["s2lc"]["morph"], blend);
    assert_eq!(v["s2lc"]["adapter_cache"], "miss");
    assert_eq!(v["usage"]["completion_tokens"], 4);
    // The same blend, keys in another order: one cache entry.
    let (status, v) = p(json!({"adapter": "alice-set@^1",
                                "morph": {"alice-r4-e90": 0.5, "alice-r4": 0.5}}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["s2lc"]["adapter_cache"], "hit");

    assert_error(p(json!({"route": "book=none"})), 404, "no tag rule matches");
    assert_error(
        p(json!({"route": "book=alice", "adapter": "alice@1"})),
        400,
        "names adapter 'alice@1' and route tags",
    );
    assert_error(p(json!({"route": 5})), 400, "route must be");
    assert_error(p(json!({"route": "book"})), 400, "not key=value");
    assert_error(p(json!({"route": {"book": 1}})), 400, "must be a string");
    assert_error(
        p(json!({"adapter": "alice-set@1.0.0", "morph": {"alice-r4": -1.0}})),
        400,
        "'alice-r4' is negative",
    );
    assert_error(
        p(json!({"adapter": "alice-set@1.0.0", "morph": {"alice-r4": 0.001}})),
        400,
        "sum to a positive number",
    );
    assert_error(
        p(json!({"adapter": "alice-set@1.0.0", "morph": {"nobody": 1.0}})),
        404,
        "no member 'nobody'",
    );
    assert_error(
        p(json!({"adapter": "alice-set@1.0.0", "morph": {}})),
        400,
        "non-empty object",
    );
    assert_error(
        p(json!({"adapter": "alice-set@1.0.0", "morph": {"alice-r4": "a lot"}})),
        400,
        "finite number",
    );
    assert_error(
        p(json!({"morph": {"alice-r4": 1.0}})),
        400,
        "morph needs an adapter",
    );
    assert_error(
        p(json!({"adapter": "alice@1.0.0", "morph": {"alice-r4": 1.0}})),
        400,
        "not an S2LC pack",
    );
    assert_error(
        p(json!({"adapter": "alice-set@1.0.0"})),
        400,
        "a pack of 2 members",
    );
    assert_error(
        p(json!({"adapter": "auto"})),
        400,
        "needs a server started with --router",
    );
    assert_eq!(p(json!({})).0, 200, "still serving");
    drop(server);

    // A bad settings file is one clear error.
    std::fs::write(&config, "adapter-memory = \"12 parsecs\"\n").unwrap();
    let o = s2lc(&["serve", "--config", config.to_str().unwrap(), "--port", "0"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("unknown unit 'parsecs'"),
        "{}",
        stderr(&o)
    );
    std::fs::write(&config, "portt = 80\n").unwrap();
    let o = s2lc(&["serve", "--config", config.to_str().unwrap(), "--port", "0"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("unknown field `portt`"),
        "{}",
        stderr(&o)
    );
    let o = s2lc(&["serve", "--rule", "domain=python", "--port", "0"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("rule 'domain=python'"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// The real `openai` Python client talks to the server (`scripts/reference/openai_client_check.py`).
/// Runs with `$S2LC_PYTHON` (required to import `openai`; `.ci/run` sets it up), else with
/// `python3` when that can import `openai`, else skips saying why.
#[test]
fn the_openai_python_client_talks_to_the_server() {
    let Some(model) = smollm2() else { return };
    let explicit = std::env::var("S2LC_PYTHON").ok();
    let python = explicit.clone().unwrap_or_else(|| "python3".into());
    let importable = Command::new(&python)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !importable {
        assert!(
            explicit.is_none(),
            "S2LC_PYTHON={python} cannot import openai"
        );
        eprintln!("skipped: {python} cannot import openai (set S2LC_PYTHON)");
        return;
    }
    let dir = scratch("serve-openai");
    let store = dir.join("store");
    push(&store, &model, &fixture("alice-r4"), "alice@1.0.0", None);
    let server = start(&["--store", store.to_str().unwrap(), "--model-id", "smollm2"]);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts/reference/openai_client_check.py");
    let o = Command::new(&python)
        .arg(&script)
        .args(["--base-url", &format!("http://{}/v1", server.addr)])
        .args(["--model", "smollm2", "--adapter", "alice@^1"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", stderr(&o));
    let summary: Value = serde_json::from_str(out.trim()).unwrap();
    assert!(
        summary["not_found"].as_str().unwrap().contains("404"),
        "{summary}"
    );
    drop(server);
    std::fs::remove_dir_all(&dir).ok();
}

/// With the store on a real S3-compatible server (`s3s-fs` on loopback): once the store goes
/// away, a resident adapter keeps serving and a cold one gets 503 naming the problem.
#[cfg(feature = "s3")]
#[test]
fn warm_adapters_keep_serving_when_the_store_goes_away() {
    let Some(model) = smollm2() else { return };
    let dir = scratch("serve-s3");
    let s3 = s2lc_store::loopback::S3sFs::start(&dir.join("s3")).unwrap();
    std::fs::create_dir_all(s3.root().join("fleet")).unwrap();
    let env = s3.env();
    // Three contents (the cache holds one adapter under two names once): the cold one is the
    // alice fixture with its delta scaled by 1.01.
    let cold =
        s2lc_bench::serve::scaled_copy(&fixture("alice-r4"), &dir.join("alice-scaled"), 1.01)
            .unwrap();
    for (src, target) in [
        (fixture("alice-r4"), "alice@1.0.0"),
        (cold, "cold@1.0.0"),
        (fixture("alice-r4-e90"), "pinned@1.0.0"),
    ] {
        let o = common::s2lc_env(
            &[
                "store",
                "--store",
                "s3://fleet/adapters",
                "push",
                src.to_str().unwrap(),
                target,
                "--model",
                model.to_str().unwrap(),
            ],
            &env,
        );
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let server = start_env(
        &[
            "--store",
            "s3://fleet/adapters",
            "--model-id",
            "smollm2",
            "--pin",
            "pinned@^1",
        ],
        &env,
    );
    let addr = server.addr.as_str();
    let req = |adapter: &str| json!({"prompt": "Alice", "max_tokens": 3, "adapter": adapter});
    let (status, warm) = post(addr, "/v1/completions", &req("alice@^1"));
    assert_eq!(
        (status, &warm["s2lc"]["adapter_cache"]),
        (200, &json!("miss")),
        "{warm}"
    );
    drop(s3);
    let (status, again) = post(addr, "/v1/completions", &req("alice@^1"));
    assert_eq!(
        (status, &again["s2lc"]["adapter_cache"]),
        (200, &json!("hit")),
        "{again}"
    );
    // Pinned at start, never requested before the store went away: still served.
    let (status, pinned) = post(addr, "/v1/completions", &req("pinned@^1"));
    assert_eq!(
        (status, &pinned["s2lc"]["adapter_cache"]),
        (200, &json!("hit")),
        "{pinned}"
    );
    assert_error(
        post(addr, "/v1/completions", &req("cold@^1")),
        503,
        "the adapter store is unreachable and cold@^1 is not resident",
    );
    assert_eq!(http(addr, "GET", "/v1/models", b"").0, 503);
    assert_eq!(http(addr, "GET", "/health", b"").0, 200);
    drop(server);
    std::fs::remove_dir_all(&dir).ok();
}

/// The Context Router on the real encoder and texts: centroids built from two domains' training
/// text, accuracy measured on their held-out paragraphs, and a server with `--router` sends a
/// request for the adapter `auto` to the adapter its prompt is nearest to, and blends a pack's
/// members by the prompt's similarity for `"morph": "auto"`.
#[test]
fn the_router_sends_auto_requests_to_the_nearest_domain() {
    let Some(model) = smollm2() else { return };
    let home = s2lc_model::assets::home();
    let (py, lx) = (
        home.join("text/domains/python.txt"),
        home.join("text/domains/linux.txt"),
    );
    if !s2lc_model::assets::minilm()
        .join("model.safetensors")
        .exists()
        || !py.exists()
    {
        eprintln!("skipped: MiniLM or the domain texts absent (run scripts/fetch-assets)");
        return;
    }
    let dir = scratch("router");
    let table = dir.join("router.json");
    let pairs = [
        format!("python-docs={}", py.display()),
        format!("linux-docs={}", lx.display()),
    ];
    let t = table.to_str().unwrap();
    let o = s2lc(&[
        "router", "build", &pairs[0], &pairs[1], "--pieces", "6", "--chars", "600", "-o", t,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report = dir.join("eval.json");
    let o = s2lc(&[
        "router",
        "eval",
        t,
        &pairs[0],
        &pairs[1],
        "--pieces",
        "5",
        "--json",
        report.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["domains"][0]["paragraphs"], 5);
    let acc = r["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc), "{r}");
    eprintln!("router accuracy on 2 × 5 held-out paragraphs: {acc}");

    let store = dir.join("store");
    for name in ["python-docs@1.0.0", "linux-docs@1.0.0"] {
        push(&store, &model, &fixture("alice-r4"), name, None);
    }
    // A pack whose members are named like the routes: copies of the alice fixtures.
    let mut members = Vec::new();
    for (name, src) in [("python-docs", "alice-r4"), ("linux-docs", "alice-r4-e90")] {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in std::fs::read_dir(fixture(src)).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, d.join(f.file_name().unwrap())).unwrap();
        }
        members.push(d.to_str().unwrap().to_string());
    }
    let pack = dir.join("docs-pack");
    let o = s2lc(&[
        "adapters",
        "pack",
        &members[0],
        &members[1],
        "-o",
        pack.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    push(&store, &model, &pack, "docs@1.0.0", None);
    let server = start(&[
        "--store",
        store.to_str().unwrap(),
        "--model-id",
        "smollm2",
        "--router",
        t,
    ]);
    let prompt =
        "import os\nfor name in os.listdir('.'):\n    print(name)  # a Python for loop over a list";
    let (status, v) = post(
        &server.addr,
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 2, "adapter": "auto"}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["s2lc"]["route"]["by"], "embedding", "{v}");
    assert_eq!(v["s2lc"]["adapter"], "python-docs@1.0.0", "{v}");

    // `"morph": "auto"`: the router weighs the pack's members (named like the routes) by the
    // prompt's similarity to each; the nearer domain gets the larger share.
    let (status, v) = post(
        &server.addr,
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 2, "adapter": "docs@1.0.0", "morph": "auto"}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["s2lc"]["route"]["morph"], "auto", "{v}");
    let scores = &v["s2lc"]["route"]["scores"];
    assert!(
        scores["python-docs"].as_f64() > scores["linux-docs"].as_f64(),
        "{v}"
    );
    let w = &v["s2lc"]["morph"];
    eprintln!("router morph of a Python prompt: {w}, scores {scores}");
    let share = |m: &str| w[m].as_f64().unwrap_or(0.0);
    assert!(share("python-docs") > share("linux-docs"), "{v}");
    assert!(
        (share("python-docs") + share("linux-docs") - 1.0).abs() < 1e-9,
        "{v}"
    );
    drop(server);
    // Without a router, `auto` is refused with the reason.
    let server = start(&["--store", store.to_str().unwrap(), "--model-id", "smollm2"]);
    assert_error(
        post(
            &server.addr,
            "/v1/completions",
            &json!({"prompt": "x", "adapter": "auto"}),
        ),
        400,
        "needs a server started with --router",
    );
    assert_error(
        post(
            &server.addr,
            "/v1/completions",
            &json!({"prompt": "x", "adapter": "docs@1.0.0", "morph": "auto"}),
        ),
        400,
        "morph 'auto' needs a server started with --router",
    );
    assert_error(
        post(
            &server.addr,
            "/v1/completions",
            &json!({"prompt": "x", "morph": "auto"}),
        ),
        400,
        "morph 'auto' needs an adapter that names a pack",
    );
    drop(server);
    std::fs::remove_dir_all(&dir).ok();
}

/// `s2lc bench serve` on the real model with a small load: held-out prompts, streamed answers,
/// and a report with time to first token and inter-token latency for the base model and for
/// copies of a PEFT adapter, in two rounds whose ratios are each to their own base run.
#[test]
fn bench_serve_times_streamed_answers() {
    let Some(model) = smollm2() else { return };
    let dir = scratch("bench-serve");
    let report = dir.join("serve.json");
    let o = s2lc(&[
        "bench",
        "serve",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        fixture("alice-r4").to_str().unwrap(),
        "--workload",
        "base,peft",
        "--max-batch",
        "4",
        "--clients",
        "4",
        "--requests",
        "8",
        "--n-adapters",
        "3",
        "--prompt-tokens",
        "24",
        "--max-tokens",
        "4",
        "--rounds",
        "2",
        "--json",
        report.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("time to first token"), "{stdout}");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["prompt_tokens"], 24);
    let runs = r["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4, "{r}");
    // Each round's ratios are to its own base run: the base's are 1.
    let ratios = r["ratios"].as_array().unwrap();
    assert_eq!(ratios.len(), 2, "{r}");
    assert_eq!(ratios[0]["rounds"], json!([1.0, 1.0]), "{r}");
    assert_eq!(ratios[1]["rounds"].as_array().unwrap().len(), 2, "{r}");
    for run in runs {
        assert_eq!(run["ok"], 8, "{run}");
        let (ttft, lat) = (&run["ttft_ms"]["p50"], &run["latency_ms"]["p50"]);
        let (ttft, lat) = (ttft.as_f64().unwrap(), lat.as_f64().unwrap());
        assert!(ttft > 0.0 && ttft <= lat, "{run}");
        let itl = run["itl_ms"]["p50"].as_f64().unwrap();
        assert!(itl > 0.0 && itl < lat, "{run}");
    }
    assert!(runs[1]["cache"]["loads"].as_f64().unwrap() >= 1.0, "{r}");
    assert_eq!(runs[3]["round"], 1, "{r}");
}
