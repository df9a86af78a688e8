//! The store suite (`common`) on the local-directory backend, plus name and version parsing.

mod common;

use std::time::Duration;

use common::{scratch, Backend};
use s2lc_store::{check_tag, parse_selector, parse_versioned, Store};

fn local(name: &str) -> Backend {
    let scratch = scratch(name);
    let objects = scratch.join("store");
    let location = objects.to_str().unwrap().to_string();
    Backend {
        open: Box::new(move || Store::open(&location).unwrap()),
        objects,
        scratch,
        atomic_create: true,
        race_rounds: 1000,
    }
}

store_suite!(local);

#[test]
fn bad_names_and_versions_are_named() {
    for (s, needle) in [
        ("legal", "needs a version"),
        ("legal@1.2", "bad version '1.2'"),
        ("Legal@1.0.0", "bad adapter name 'Legal'"),
        ("../x@1.0.0", "bad adapter name"),
    ] {
        let err = parse_versioned(s).unwrap_err().to_string();
        assert!(err.contains(needle), "{s}: {err}");
    }
    for tag in ["x", "x-x"] {
        // Requirements for parse_selector, so `NAME@TAG` could never select such a tag.
        let err = check_tag(tag).map(|()| parse_selector(&format!("a@{tag}")));
        assert!(
            err.as_ref()
                .is_err_and(|e| e.to_string().contains("reads as a version requirement"))
                || matches!(err, Ok(Ok((_, s2lc_store::Selector::Tag(_))))),
            "{tag}: {err:?}"
        );
    }
    assert!(check_tag("x").is_err() && check_tag("prod").is_ok() && check_tag("Prod").is_err());
    let err = parse_selector("legal@>>1").unwrap_err().to_string();
    assert!(err.contains("bad version requirement '>>1'"), "{err}");
    assert!(Store::open("ftp://x")
        .unwrap_err()
        .to_string()
        .contains("unsupported store"));
}

#[test]
fn s3_settings_are_refused_for_a_local_store() {
    let dir = scratch("settings");
    let err = Store::open_with(dir.to_str().unwrap(), &[("aws_region", "x")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("S3 setting 'aws_region'"), "{err}");
}

/// Issue 22, failure 4, for stores written before this version: object_store's local backend
/// staged every write as `<key>#<n>`, which listings hide; a killed push left such a file (150 MB
/// for a large blob) that verify, ls and gc never saw. Now verify names it and gc removes it.
#[test]
fn staging_files_of_the_old_local_backend_are_reported_and_swept() {
    let dir = scratch("legacy-staging");
    let store = Store::open(dir.to_str().unwrap()).unwrap();
    std::fs::create_dir_all(dir.join("blobs")).unwrap();
    let legacy = dir.join(format!("blobs/{}#1", s2lc_store::digest(b"big")));
    std::fs::write(&legacy, vec![0u8; 1000]).unwrap();
    let report = store.verify().unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.leftovers.len(), 1, "{:?}", report.leftovers);
    assert!(
        report.leftovers[0].contains("#1 (1000 bytes"),
        "{:?}",
        report.leftovers
    );
    // Kept while younger than the grace period, removed after.
    assert_eq!(store.gc(Duration::from_secs(3600)).unwrap().staging, 0);
    let gc = store.gc(Duration::ZERO).unwrap();
    assert_eq!((gc.staging, gc.freed), (1, 1000));
    assert!(!legacy.exists());
    assert!(store.verify().unwrap().leftovers.is_empty());
}
