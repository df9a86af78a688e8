//! The store suite (`common`) against a real S3-compatible server: `s3s-fs` on loopback, one
//! server and one bucket per test, objects under a prefix so key mapping is exercised too.
#![cfg(feature = "s3")]

mod common;

use common::{scratch, Backend};
use s2lc_store::loopback::S3sFs;
use std::sync::Arc;

fn s3(name: &str) -> Backend {
    let scratch = scratch(&format!("s3-{name}"));
    let server = Arc::new(S3sFs::start(&scratch.join("s3")).unwrap());
    let bucket = "adapters";
    let objects = server.root().join(bucket).join("fleet/a");
    Backend {
        open: Box::new(move || server.store(bucket, "fleet/a").unwrap()),
        objects,
        scratch,
        atomic_create: false,
        // Every request crosses HTTP: fewer rounds keep the test within seconds.
        race_rounds: 300,
    }
}

store_suite!(s3);

#[test]
fn unknown_s3_settings_and_missing_buckets_are_named() {
    let scratch = scratch("s3-settings");
    let server = S3sFs::start(&scratch.join("s3")).unwrap();
    let err = s2lc_store::Store::open_with("s3://b", &[("aws_colour", "blue")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown S3 setting 'aws_colour'"), "{err}");
    // A bucket that does not exist: the first access fails with the backend's error.
    let options = server.options();
    let options: Vec<(&str, &str)> = options.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let store = s2lc_store::Store::open_with("s3://nobucket", &options).unwrap();
    let err = store.list().unwrap_err().to_string();
    assert!(err.contains("store backend"), "{err}");
}
