//! The store's test suite, written once and run against every backend: round trips, dedup,
//! semantic versions, tags, and the faults the design promises to survive (aborted push, flipped
//! byte, racing pushes). `local.rs` runs it on a directory, `s3.rs` on a real S3-compatible server.

use std::path::{Path, PathBuf};
use std::time::Duration;

use s2lc_store::{parse_selector, Selector, Store, StoreError};
use semver::Version;
use serde_json::json;

/// One backend under test.
pub struct Backend {
    /// Opens a fresh handle on the same store (each racing thread opens its own).
    pub open: Box<dyn Fn() -> Store + Sync>,
    /// The directory where the store's objects are files (`blobs/<digest>`, ...), to corrupt one.
    pub objects: PathBuf,
    /// Scratch space for sources and pulls.
    pub scratch: PathBuf,
    /// Whether the backend's create-if-absent is atomic, so racing pushes have exactly one
    /// winner. False for s3s-fs 0.14.1, whose `If-None-Match: *` checks that the object is
    /// absent and then writes it (s3.rs, `put_object`): two racers can both pass the check.
    pub atomic_create: bool,
}

impl Backend {
    fn open(&self) -> Store {
        (self.open)()
    }
}

/// An empty scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("s2lc-store-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs every suite test as its own `#[test]`, on the backend `$make(test_name)` builds.
#[macro_export]
macro_rules! store_suite {
    ($make:expr) => {
        store_suite!($make; push_pull_dedup_versions_tags,
            aborted_push_leaves_a_valid_store_that_accepts_the_push_again,
            a_flipped_byte_is_caught_on_read_and_by_verify,
            racing_pushes_of_one_version_have_one_winner);
    };
    ($make:expr; $($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                let backend = $make(stringify!($name));
                common::$name(&backend);
            }
        )*
    };
}

/// A version directory: a shared "basis" file, a per-version "core" and a nested file.
fn version_dir(root: &Path, tag: &str) -> PathBuf {
    let d = root.join(format!("src-{tag}"));
    std::fs::create_dir_all(d.join("members")).unwrap();
    std::fs::write(d.join("basis.safetensors"), vec![7u8; 4096]).unwrap();
    std::fs::write(d.join("members/core.safetensors"), format!("core {tag}")).unwrap();
    std::fs::write(d.join("pack.json"), format!("{{\"v\": \"{tag}\"}}")).unwrap();
    d
}

fn v(s: &str) -> Version {
    Version::parse(s).unwrap()
}

fn ok(_: usize) -> Result<(), String> {
    Ok(())
}

pub fn push_pull_dedup_versions_tags(b: &Backend) {
    let root = &b.scratch;
    let store = b.open();
    for ver in ["1.0.0", "1.2.0", "1.2.5", "2.0.0"] {
        let src = version_dir(root, ver);
        let m = store
            .push(
                "legal",
                &v(ver),
                &src,
                Some("base-1".into()),
                json!({"energy": 0.95}),
                &mut ok,
            )
            .unwrap();
        assert_eq!(m.files.len(), 3);
    }
    // Same version again: refused, nothing changes.
    let again = store.push(
        "legal",
        &v("1.2.0"),
        &version_dir(root, "x"),
        None,
        json!({}),
        &mut ok,
    );
    assert!(
        matches!(again, Err(StoreError::VersionExists { .. })),
        "{again:?}"
    );

    // Semver resolution.
    let (name, sel) = parse_selector("legal@^1.2").unwrap();
    assert_eq!(store.resolve(&name, &sel).unwrap(), v("1.2.5"));
    assert_eq!(
        store
            .resolve("legal", &Selector::Exact(v("1.2.0")))
            .unwrap(),
        v("1.2.0")
    );
    let (_, any) = parse_selector("legal").unwrap();
    assert_eq!(store.resolve("legal", &any).unwrap(), v("2.0.0"));
    let (_, none) = parse_selector("legal@^3").unwrap();
    let err = store.resolve("legal", &none).unwrap_err().to_string();
    assert!(
        err.contains("no version of 'legal' satisfies ^3") && err.contains("2.0.0"),
        "{err}"
    );
    assert!(store
        .resolve("nobody", &any)
        .unwrap_err()
        .to_string()
        .contains("no adapter 'nobody'"));

    // Pull writes the files of the resolved version.
    let out = root.join("out");
    let m = store.pull("legal", &sel, &out, Some("base-1")).unwrap();
    assert_eq!(m.version, "1.2.5");
    assert_eq!(
        std::fs::read_to_string(out.join("members/core.safetensors")).unwrap(),
        "core 1.2.5"
    );
    // A different base model is refused.
    let err = store
        .pull("legal", &sel, &root.join("o2"), Some("base-2"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("made for base model base-1"), "{err}");

    // Dedup: the 4 KiB basis is stored once for four versions.
    let (logical, physical) = store.usage().unwrap();
    assert!(
        logical >= 4 * 4096 && physical < 2 * 4096,
        "{logical} {physical}"
    );

    // Tags, listing, removal.
    store.tag("legal", &v("1.2.0"), "prod").unwrap();
    let (_, prod) = parse_selector("legal@prod").unwrap();
    assert_eq!(store.resolve("legal", &prod).unwrap(), v("1.2.0"));
    let list = store.list().unwrap();
    assert_eq!(list.len(), 4);
    assert_eq!(list[1].tags, vec!["prod".to_string()]);
    store.remove("legal", &v("1.2.0")).unwrap();
    assert!(store.resolve("legal", &prod).is_err());
    assert_eq!(store.list().unwrap().len(), 3);
    assert!(store.verify().unwrap().problems.is_empty());
}

pub fn aborted_push_leaves_a_valid_store_that_accepts_the_push_again(b: &Backend) {
    let root = &b.scratch;
    let store = b.open();
    let src = version_dir(root, "a");
    let mut fail_after_two = |k: usize| {
        if k >= 2 {
            Err("injected failure".to_string())
        } else {
            Ok(())
        }
    };
    let err = store
        .push(
            "med",
            &v("1.0.0"),
            &src,
            None,
            json!({}),
            &mut fail_after_two,
        )
        .unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");
    // Not visible, store valid, and the orphaned blobs are young (kept by gc's grace period).
    assert!(store.list().unwrap().is_empty());
    assert!(store.verify().unwrap().problems.is_empty());
    assert_eq!(store.gc(Duration::from_secs(3600)).unwrap().removed, 0);
    store
        .push("med", &v("1.0.0"), &src, None, json!({}), &mut ok)
        .unwrap();
    assert_eq!(store.list().unwrap().len(), 1);
    // Removing the version makes its objects unreachable; gc with no grace deletes them.
    store.remove("med", &v("1.0.0")).unwrap();
    let gc = store.gc(Duration::ZERO).unwrap();
    assert_eq!(gc.removed, 4, "three blobs and the manifest");
    assert!(store.verify().unwrap().problems.is_empty());
}

pub fn a_flipped_byte_is_caught_on_read_and_by_verify(b: &Backend) {
    let root = &b.scratch;
    let store = b.open();
    let m = store
        .push(
            "fin",
            &v("0.1.0"),
            &version_dir(root, "f"),
            None,
            json!({}),
            &mut ok,
        )
        .unwrap();
    let core = m.files.iter().find(|f| f.path.contains("core")).unwrap();
    let blob = b.objects.join("blobs").join(&core.digest);
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    let err = store
        .pull("fin", &Selector::Exact(v("0.1.0")), &root.join("out"), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("corrupt object") && err.contains(&core.digest),
        "{err}"
    );
    assert!(
        !root.join("out/pack.json").exists(),
        "nothing is written from a corrupt pull"
    );
    let report = store.verify().unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(
        store.gc(Duration::ZERO).is_ok(),
        "gc skips nothing it should keep"
    );
}

pub fn racing_pushes_of_one_version_have_one_winner(b: &Backend) {
    let root = &b.scratch;
    let srcs: Vec<PathBuf> = (0..4)
        .map(|i| version_dir(root, &format!("r{i}")))
        .collect();
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = srcs
            .iter()
            .map(|src| {
                s.spawn(move || {
                    let store = b.open();
                    store.push("race", &v("1.0.0"), src, None, json!({}), &mut ok)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    for r in results.iter().filter(|r| r.is_err()) {
        assert!(matches!(r, Err(StoreError::VersionExists { .. })), "{r:?}");
    }
    let store = b.open();
    assert!(store.verify().unwrap().problems.is_empty());
    // The version that stays is a winner's.
    let out = root.join("race-out");
    let pulled = store
        .pull("race", &Selector::Exact(v("1.0.0")), &out, None)
        .unwrap();
    assert!(
        winners.iter().any(|w| w.files == pulled.files),
        "{results:?}"
    );
    if b.atomic_create {
        assert_eq!(winners.len(), 1, "{results:?}");
    } else {
        // Not exactly one on this backend (see `Backend::atomic_create`); say so when it shows.
        assert!(!winners.is_empty(), "{results:?}");
        if winners.len() > 1 {
            eprintln!(
                "racing pushes: {} reported success on a backend without atomic create",
                winners.len()
            );
        }
    }
}
