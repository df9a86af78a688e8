//! The store suite (`common`) on the local-directory backend, plus name and version parsing.

mod common;

use common::{scratch, Backend};
use s2lc_store::{parse_selector, parse_versioned, Store};

fn local(name: &str) -> Backend {
    let scratch = scratch(name);
    let objects = scratch.join("store");
    let location = objects.to_str().unwrap().to_string();
    Backend {
        open: Box::new(move || Store::open(&location).unwrap()),
        objects,
        scratch,
        atomic_create: true,
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
