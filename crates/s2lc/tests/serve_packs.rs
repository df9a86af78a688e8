//! `s2lc serve` with packs on the real model: a pack pushed whole is resident once (its bases
//! and cores) and every member or morph of it only as its weights.

mod common;
use common::server::*;
use common::{s2lc, scratch, smollm2, stderr};
use serde_json::{json, Value};

/// Expert Morphing of an MoE expert set: a pack of expert residuals is pushed whole and served
/// like an adapter pack. Two experts whose residuals are opposite (the base FFN scaled by 1.02
/// and by 0.98) blend at ½ + ½ to nothing: the server's text is the base model's, while one
/// expert alone is served too; the pack is resident once, each blend only as its weights.
#[test]
fn an_expert_set_is_morphed_in_the_server() {
    let Some(model) = smollm2() else { return };
    let dir = scratch("serve-experts");
    let set = dir.join("experts");
    common::write_expert_set(&model, &set, &[("up", 1.02), ("down", 0.98)]);
    let pack = dir.join("pack");
    let o = s2lc(&[
        "adapters",
        "pack",
        "--experts",
        set.to_str().unwrap(),
        "--energy",
        "0.9",
        "-o",
        pack.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let store = dir.join("store");
    push(&store, &model, &pack, "ffn-experts@1.0.0", None);
    let server = start(&[
        "--store",
        store.to_str().unwrap(),
        "--max-tokens",
        "16",
        "--adapter-memory",
        "64MiB",
    ]);
    let addr = server.addr.as_str();
    let base = json!({"prompt": "The Queen said to Alice", "max_tokens": 8, "temperature": 0});
    let p = |extra: Value| complete_with(addr, base.clone(), extra);
    let (status, plain) = p(json!({}));
    assert_eq!(status, 200, "{plain}");
    let (status, blend) = p(json!({"adapter": "ffn-experts@1", "morph": {"up": 0.5, "down": 0.5}}));
    assert_eq!(status, 200, "{blend}");
    assert_eq!(blend["choices"][0]["text"], plain["choices"][0]["text"]);
    // The pack is resident once (its bases and cores); another blend of it adds only its
    // weight vector.
    let kind = |k: &str| {
        metric(
            addr,
            &format!("s2lc_adapter_resident_bytes{{kind=\"{k}\"}}"),
        )
    };
    let (bases, cores, views) = (kind("bases"), kind("cores"), kind("views"));
    assert!(
        bases > 0.0 && cores > 0.0 && views > 0.0,
        "{bases} {cores} {views}"
    );
    let (status, up) = p(json!({"adapter": "ffn-experts@1", "morph": {"up": 1.0}}));
    assert_eq!(status, 200, "{up}");
    assert_eq!((kind("bases"), kind("cores")), (bases, cores));
    let added = kind("views") - views;
    assert!(
        added > 0.0 && added < 1024.0,
        "a second blend holds {added} B"
    );
    assert_eq!(kind("peft"), 0.0);
    assert_error(
        p(json!({"adapter": "ffn-experts@1", "morph": {"sideways": 1.0}})),
        404,
        "no member 'sideways'",
    );
    std::fs::remove_dir_all(&dir).ok();
}
