//! `s2lc store ...` end to end: push, pull, ls, tag, verify, rm and gc on a local store and, with
//! the `s3` feature, on a loopback S3-compatible server.

mod common;
use common::{alice_r4, assert_clean_error, s2lc, s2lc_env, scratch, stderr, unpack_ok};

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
