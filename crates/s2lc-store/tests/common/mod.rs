//! The store's test suite, written once and run against every backend: round trips, dedup,
//! semantic versions, tags, and the faults the design promises to survive (aborted push, flipped
//! byte, racing pushes, gc running during pushes, pushes killed at every write, pushes that
//! outlive their lease). `local.rs` runs it on a directory, `s3.rs` on a real S3-compatible
//! server.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use s2lc_store::{parse_selector, Selector, Store, StoreError, DEFAULT_LEASE_TTL};
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
    /// Rounds of the push + gc race (each a push, a check of every object it references and a
    /// removal, while a gc with no grace period loops).
    pub race_rounds: usize,
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
            racing_pushes_of_one_version_have_one_winner,
            tags_that_read_as_versions_are_refused,
            gc_running_during_pushes_that_reuse_orphans_loses_nothing,
            killed_pushes_leave_a_store_that_verify_passes_and_gc_cleans,
            a_push_that_outlives_its_lease_renews_it);
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

pub fn tags_that_read_as_versions_are_refused(b: &Backend) {
    let store = b.open();
    store
        .push(
            "tagged",
            &v("1.0.0"),
            &version_dir(&b.scratch, "t"),
            None,
            json!({}),
            &mut ok,
        )
        .unwrap();
    // `x` is the requirement `*`: `tagged@x` would select the highest version, never the tag.
    for tag in ["x", "x-1"] {
        let refused = store.tag("tagged", &v("1.0.0"), tag).is_err();
        let selects = parse_selector(&format!("tagged@{tag}")).map(|(_, s)| s);
        assert!(
            refused || matches!(selects, Ok(Selector::Tag(_))),
            "tag '{tag}' accepted, but tagged@{tag} parses as {selects:?}"
        );
    }
    let err = store
        .tag("tagged", &v("1.0.0"), "x")
        .unwrap_err()
        .to_string();
    assert!(err.contains("reads as a version requirement"), "{err}");
    store.tag("tagged", &v("1.0.0"), "prod").unwrap();
    let (_, prod) = parse_selector("tagged@prod").unwrap();
    assert_eq!(store.resolve("tagged", &prod).unwrap(), v("1.0.0"));
}

/// Issue 22, failure 3: a push that re-uses orphaned blobs while gc runs must not end
/// "successful" with objects gc deleted under it. Round r pushes `race@0.0.r` from files it
/// shares with round r-1 (one always, one every other round), after removing `race@0.0.(r-1)`, so
/// every push re-uses orphans that a gc with no grace period, looping in another thread, is
/// trying to delete. Local stores skip fsync here: it orders nothing, and on a busy disk its
/// latency would make the race slow rather than tight.
pub fn gc_running_during_pushes_that_reuse_orphans_loses_nothing(b: &Backend) {
    let rounds = b.race_rounds;
    let src = b.scratch.join("race-src");
    std::fs::create_dir_all(&src).unwrap();
    let stop = AtomicBool::new(false);
    let gc_errors = Mutex::new(Vec::new());
    let started = Instant::now();
    let (gc_runs, gc_removed, lost, pushes) = std::thread::scope(|s| {
        let gc = s.spawn(|| {
            let store = b.open().without_fsync();
            let (mut runs, mut removed) = (0usize, 0usize);
            while !stop.load(Ordering::SeqCst) {
                match store.gc(Duration::ZERO) {
                    Ok(r) => removed += r.removed,
                    Err(e) => gc_errors.lock().unwrap().push(e.to_string()),
                }
                runs += 1;
            }
            (runs, removed)
        });
        let store = b.open().without_fsync();
        let mut lost = Vec::new();
        let mut pushes = 0;
        let mut previous = None;
        for r in 0..rounds {
            std::fs::write(src.join("common"), "shared by every round").unwrap();
            std::fs::write(src.join("pair"), format!("shared by a pair: {}", r / 2)).unwrap();
            std::fs::write(src.join("own"), format!("round {r}")).unwrap();
            let version = Version::new(0, 0, r as u64);
            let pushed = store.push("race", &version, &src, None, json!({}), &mut ok);
            let m = match pushed {
                Ok(m) => m,
                Err(e) => {
                    stop.store(true, Ordering::SeqCst);
                    panic!("round {r}: push failed: {e}");
                }
            };
            pushes += 1;
            // Right after the push, and once more a round later (gc may have decided before the
            // push ended and delete after it), every object the version references is there.
            let mut check = |when: &str, version: &Version, m: &s2lc_store::Manifest| {
                if let Err(e) = store.manifest("race", version) {
                    lost.push(format!("{when} race@{version}: manifest: {e}"));
                }
                for f in &m.files {
                    if let Err(e) = store.get_blob(&f.digest) {
                        lost.push(format!("{when} race@{version}: {}: {e}", f.path));
                    }
                }
            };
            check("after its push", &version, &m);
            if let Some((prev, pm)) = previous.replace((version, m)) {
                check("a round later", &prev, &pm);
                if let Err(e) = store.remove("race", &prev) {
                    lost.push(format!("removing race@{prev}: {e}"));
                }
            }
        }
        stop.store(true, Ordering::SeqCst);
        let (runs, removed) = gc.join().unwrap();
        (runs, removed, lost, pushes)
    });
    let store = b.open();
    let report = store.verify().unwrap();
    let gc_errors = gc_errors.into_inner().unwrap();
    eprintln!(
        "push + gc race: {pushes} rounds in {:.1} s, {gc_runs} gc runs removed {gc_removed} \
         objects; lost objects: {}; gc errors: {}; verify problems: {}",
        started.elapsed().as_secs_f64(),
        lost.len(),
        gc_errors.len(),
        report.problems.len()
    );
    assert!(lost.is_empty(), "objects lost: {lost:#?}");
    assert!(gc_errors.is_empty(), "{gc_errors:#?}");
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    assert!(
        gc_runs > 0 && gc_removed > 0,
        "the race ran: {gc_runs} {gc_removed}"
    );
}

/// Files under `dir`, recursively (the objects, staging files included, of a store).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Issue 22, failure 4: a push killed at any write or delete — before its first blob, half way
/// through writing each blob, the manifest or the ref, or before dropping its lease — leaves a
/// store that verify passes and that gc cleans down to what versions reference, without harming
/// the version already there that shares a blob with it.
pub fn killed_pushes_leave_a_store_that_verify_passes_and_gc_cleans(b: &Backend) {
    let root = &b.scratch;
    let store = b.open();
    store
        .push(
            "keep",
            &v("1.0.0"),
            &version_dir(root, "keep"),
            None,
            json!({}),
            &mut ok,
        )
        .unwrap();
    let src = version_dir(root, "killed");
    let after_ttl = || b.open().with_clock_ahead(2 * DEFAULT_LEASE_TTL);
    let mut crashes = 0;
    for n in 0.. {
        assert!(n < 20, "a push takes fewer than 20 writes");
        let version = Version::new(1, 0, n as u64);
        let dying = b.open().crash_at_mutation(n);
        let pushed = dying.push("killed", &version, &src, None, json!({}), &mut ok);
        let report = store.verify().unwrap();
        match pushed {
            // Killed after its ref was written, while dropping its lease: the caller saw success.
            Ok(_) if !report.leftovers.is_empty() => {}
            Ok(_) => break,
            Err(e) => assert!(
                matches!(&e, StoreError::Aborted(m) if m.contains("simulated crash")),
                "{e}"
            ),
        }
        crashes += 1;
        assert!(
            report.problems.is_empty(),
            "killed at write {n}: {:#?}",
            report.problems
        );
        eprintln!("killed at write {n}: leftovers {:?}", report.leftovers);
        // The dead push's lease is live for a TTL: gc keeps what it names (staging included).
        let content = || {
            let mut f = files_under(&b.objects.join("blobs"));
            f.extend(files_under(&b.objects.join("manifests")));
            f
        };
        let before = content();
        let early = store.gc(Duration::ZERO).unwrap();
        assert_eq!(content(), before, "killed at write {n}: {early:?}");
        // Once the lease has expired, gc removes every trace of the dead push.
        let late = after_ttl().gc(Duration::ZERO).unwrap();
        let report = store.verify().unwrap();
        assert!(
            report.problems.is_empty() && report.leftovers.is_empty(),
            "killed at write {n}, after gc {late:?}: {report:?}"
        );
        let listed = store.list().unwrap();
        let mut referenced: Vec<String> = Vec::new();
        for l in &listed {
            let (md, m) = store.manifest(&l.name, &l.version).unwrap();
            referenced.push(md);
            referenced.extend(m.files.iter().map(|f| f.digest.clone()));
        }
        referenced.sort();
        referenced.dedup();
        let mut on_disk: Vec<String> = files_under(&b.objects.join("blobs"))
            .into_iter()
            .chain(files_under(&b.objects.join("manifests")))
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        assert_eq!(on_disk, referenced, "killed at write {n}: gc left garbage");
        for dir in ["leases", "gc"] {
            assert!(files_under(&b.objects.join(dir)).is_empty(), "{dir}");
        }
        // The version is there only if its ref was written, and then whole.
        let committed = listed.iter().any(|l| l.name == "killed");
        if committed {
            let out = root.join(format!("pull-{n}"));
            store
                .pull("killed", &Selector::Exact(version), &out, None)
                .unwrap();
        }
    }
    // The lease, each of the two new blobs, the manifest, the ref and the lease's removal.
    assert_eq!(crashes, 6, "one simulated crash per write");
    let out = root.join("keep-out");
    store
        .pull("keep", &Selector::Exact(v("1.0.0")), &out, None)
        .unwrap();
    assert!(store.verify().unwrap().problems.is_empty());
}

/// A push slower than its lease TTL renews the lease (and re-checks its objects when it may have
/// lapsed) while gc runs with the same TTL: it completes and nothing is lost.
pub fn a_push_that_outlives_its_lease_renews_it(b: &Backend) {
    let ttl = Duration::from_millis(400);
    let src = version_dir(&b.scratch, "slow");
    let stop = AtomicBool::new(false);
    let (pushed, gc_runs) = std::thread::scope(|s| {
        let gc = s.spawn(|| {
            let store = b.open().with_lease_ttl(ttl);
            let mut runs = 0;
            while !stop.load(Ordering::SeqCst) {
                if let Err(e) = store.gc(Duration::ZERO) {
                    // A gc that could not renew its lock in time stops: the safe outcome.
                    assert!(e.to_string().contains("gc stopped"), "{e}");
                }
                runs += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            runs
        });
        let store = b.open().with_lease_ttl(ttl);
        // Past TTL/4 after the first blob (renewal), past TTL/2 after the second (the lease may
        // have lapsed: re-established, every object checked again).
        let mut slow = |k: usize| {
            std::thread::sleep(Duration::from_millis(match k {
                1 => 150,
                2 => 250,
                _ => 0,
            }));
            Ok(())
        };
        let pushed = store.push("slow", &v("1.0.0"), &src, None, json!({}), &mut slow);
        stop.store(true, Ordering::SeqCst);
        (pushed, gc.join().unwrap())
    });
    let m = pushed.unwrap();
    let store = b.open();
    for f in &m.files {
        store.get_blob(&f.digest).unwrap();
    }
    let report = store.verify().unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(
        report.leftovers.iter().all(|l| !l.contains("lease")),
        "a finished push leaves no lease: {:?}",
        report.leftovers
    );
    assert!(gc_runs > 0);
}
