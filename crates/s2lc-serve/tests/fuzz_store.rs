//! Store entries as the server pulls them (issue 22): a manifest fuzzed through the whole path a
//! request takes (the store's manifest parse and pull, then the pack or PEFT reader with the
//! model's limits, unpack, Expert Morphing), and the issue's attacks pushed as real entries.
//!
//! `cargo test` fuzzes for a few seconds (`S2LC_FUZZ_SECS` sets the time); `scripts/fuzz` builds
//! this with coverage counters and runs it longer.

#[path = "../../s2lc-adapters/tests/fuzz/mod.rs"]
mod fuzz;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use serde_json::{json, Value};

use s2lc_adapters::pack::{PackView, ResidentBases, ResidentCores};
use s2lc_adapters::{format, pack, Member, PackParams};
use s2lc_model::config::ModelConfig;
use s2lc_model::lora::{AdapterDeltas, AdapterLimits, LoraAdapter, LoraDelta};
use s2lc_serve::source::{AdapterSource, Loaded, SourceError, StoreSource};
use s2lc_store::Store;

use fuzz::{Input, Target};

#[global_allocator]
static ALLOC: fuzz::Counting = fuzz::Counting;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn smollm2() -> AdapterLimits {
    AdapterLimits::for_model(&ModelConfig::smollm2_135m())
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("s2lc-fuzz-store-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn adapter(n_layers: usize) -> LoraAdapter {
    let mut a = LoraAdapter::load(&repo().join("tests/fixtures/adapters/alice-r4-e90")).unwrap();
    a.layers.truncate(n_layers);
    a
}

fn push(store: &Store, name: &str, dir: &Path) {
    let (_, v) = s2lc_store::parse_versioned("x@1.0.0").unwrap();
    store
        .push(name, &v, dir, None, json!({}), &mut |_| Ok(()))
        .unwrap();
}

/// A store holding a PEFT adapter (`peft`), a one-member coded pack (`one`) and a two-member
/// plain pack (`two`), all of two layers; and the store's directory.
struct Fixture {
    root: PathBuf,
    source: StoreSource,
    seeds: Vec<Input>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let root = temp("store");
        let store = Store::open(root.to_str().unwrap()).unwrap();
        let a = adapter(2);
        let peft = temp("peft");
        a.save(&peft).unwrap();
        push(&store, "peft", &peft);
        let b = LoraAdapter::load(&repo().join("tests/fixtures/adapters/alice-r4")).unwrap();
        let mut b2 = b.clone();
        b2.layers.truncate(2);
        let members = [Member::from_lora("m0", &a), Member::from_lora("m1", &b2)];
        let params = PackParams {
            mixed_bases: true,
            ..PackParams::default()
        };
        let two = pack(&members, params).unwrap();
        let coded = pack(
            &members,
            PackParams {
                entropy: true,
                ..params
            },
        )
        .unwrap();
        let dir = temp("one");
        format::save_member(&coded, "m0", &dir).unwrap();
        push(&store, "one", &dir);
        let dir = temp("two");
        format::save(&two, &dir).unwrap();
        push(&store, "two", &dir);
        // The seeds: each entry's manifest, as stored.
        let seeds = ["peft", "one", "two"]
            .iter()
            .map(|name| {
                let (_, v) = s2lc_store::parse_versioned("x@1.0.0").unwrap();
                let (digest, _) = store.manifest(name, &v).unwrap();
                vec![std::fs::read(root.join("manifests").join(digest)).unwrap()]
            })
            .collect();
        let values = 4 * adapter(30).n_params();
        let source = StoreSource::new(store, None).with_limits(smollm2().with_max_values(values));
        Fixture {
            root,
            source,
            seeds,
        }
    })
}

/// Stores `manifest` as the manifest of `fuzz@1.0.0` (replacing the last one).
fn put_manifest(root: &Path, manifest: &[u8]) {
    let digest = s2lc_store::digest(manifest);
    std::fs::write(root.join("manifests").join(&digest), manifest).unwrap();
    std::fs::create_dir_all(root.join("refs/fuzz")).unwrap();
    std::fs::write(root.join("refs/fuzz/1.0.0"), digest).unwrap();
}

/// What the server does with a request for `fuzz@1.0.0`, plain and morphed; an error naming a
/// path of the machine is a finding (a panic).
fn run_manifest(files: &[Vec<u8>]) -> Result<(), String> {
    let f = fixture();
    put_manifest(&f.root, files.first().ok_or("no file")?);
    let tmp = std::env::temp_dir().display().to_string();
    // What the server holds resident: a PEFT adapter's factors, or a pack's bases and cores and
    // a view of them (one member, or the blend of `morph`).
    let check = |r: Result<Loaded, SourceError>, morph: &[(&str, f32)]| -> Result<(), String> {
        match r {
            Ok(Loaded::Lora(a)) => {
                assert!(a.layers.len() <= 30);
                if morph.is_empty() {
                    Ok(())
                } else {
                    Err("a PEFT adapter has no members".into())
                }
            }
            Ok(Loaded::Pack(set)) => {
                let bases = ResidentBases::new(&set).map_err(|e| e.to_string())?;
                let cores = Arc::new(ResidentCores::new(&set).map_err(|e| e.to_string())?);
                let weights: Vec<(&str, f32)> = match (morph, cores.members()) {
                    ([], [one]) => vec![(one.as_str(), 1.0)],
                    ([], _) => return Err("a pack of several members needs a morph".into()),
                    (m, _) => m.to_vec(),
                };
                let view = PackView::new("fuzz", Arc::new(bases), cores.clone(), &weights)
                    .map_err(|e| e.to_string())?;
                assert!(view.n_layers() <= 30);
                Ok(())
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(!msg.contains(&tmp), "an error names a server path: {msg}");
                Err(msg)
            }
        }
    };
    let plain = check(f.source.load("fuzz@1.0.0"), &[]);
    let morph = check(f.source.load("fuzz@1.0.0"), &[("m0", 0.5)]);
    // A seed works one way or the other (a PEFT adapter has no members, a pack of two is
    // loaded only as a blend).
    plain.or(morph)
}

#[test]
fn fuzz_manifest() {
    let _one = fuzz::exclusive();
    let f = fixture();
    let run = |files: &[Vec<u8>]| run_manifest(files);
    let t = Target {
        name: "manifest",
        seeds: f.seeds.clone(),
        run: &run,
        dict: [
            "../../../../etc/hostname",
            "/dev/zero",
            "pack.json",
            "members/../../pack.json",
            "adapter_config.json",
            "\"size\": 18446744073709551615",
            ".",
            "",
        ]
        .iter()
        .map(|t| t.as_bytes().to_vec())
        .collect(),
        fixup: None,
        references: Vec::new(),
    };
    fuzz::run_and_check(&t, 3.0);
}

#[test]
fn manifest_regressions() {
    let _one = fuzz::exclusive();
    let f = fixture();
    let run = |files: &[Vec<u8>]| run_manifest(files);
    let t = Target {
        name: "manifest",
        seeds: f.seeds.clone(),
        run: &run,
        dict: Vec::new(),
        fixup: None,
        references: Vec::new(),
    };
    fuzz::replay(&t, &repo().join("tests/fixtures/fuzz/manifest"), 64 << 20);
}

/// Issue 22: a pushed `pack.json` naming `../../../../etc/hostname` made the server read it (and
/// echo the path of its staging directory); `/dev/zero` grew its heap past 2 GB in 5 s.
#[test]
fn a_pushed_pack_cannot_make_the_server_read_outside_it() {
    let _one = fuzz::exclusive();
    let root = temp("traversal");
    let store = Store::open(root.to_str().unwrap()).unwrap();
    let set = {
        let a = adapter(1);
        pack(&[Member::from_lora("m0", &a)], PackParams::default()).unwrap()
    };
    for (i, bad) in ["../../../../etc/hostname", "/dev/zero", "/etc/hostname"]
        .iter()
        .enumerate()
    {
        let dir = temp(&format!("traversal-{i}"));
        format::save(&set, &dir).unwrap();
        let mut manifest: Value =
            serde_json::from_slice(&std::fs::read(dir.join("pack.json")).unwrap()).unwrap();
        manifest["basis_file"] = json!(bad);
        std::fs::write(dir.join("pack.json"), manifest.to_string()).unwrap();
        push(&store, &format!("evil{i}"), &dir);
        let source = StoreSource::new(Store::open(root.to_str().unwrap()).unwrap(), None)
            .with_limits(smollm2());
        let (r, peak) = fuzz::measure(|| source.load(&format!("evil{i}@1.0.0")));
        let Err(SourceError::Unusable(msg)) = r else {
            panic!("{bad}: {r:?}");
        };
        assert!(msg.contains("not a plain file name"), "{msg}");
        assert!(msg.starts_with(&format!("evil{i}@1.0.0: ")), "{msg}");
        assert!(
            !msg.contains(&std::env::temp_dir().display().to_string()),
            "{msg}"
        );
        assert!(peak < 16 << 20, "{peak} B");
    }
    std::fs::remove_dir_all(&root).ok();
}

/// Issue 22: a `rank_pattern` of 0.5 became rank 0, passed every check with rank-0 tensors and
/// panicked in `gemv` (failing every request of the batch); now the pull is refused.
#[test]
fn a_pushed_rank_pattern_of_one_half_is_refused() {
    let _one = fuzz::exclusive();
    let root = temp("rank");
    let store = Store::open(root.to_str().unwrap()).unwrap();
    let dir = temp("rank-adapter");
    // Rank-0 factors of layer 0's q_proj, written as PEFT does.
    let mut layers: Vec<[Option<LoraDelta>; 7]> = vec![Default::default()];
    layers[0][0] = Some(LoraDelta::new(Vec::new(), Vec::new(), 0, 576, 576, 1.0));
    let zero = LoraAdapter {
        path: dir.clone(),
        rank: 4,
        alpha: 8.0,
        scale: 2.0,
        base_model: None,
        layers,
    };
    zero.save(&dir).unwrap();
    let config = json!({
        "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
        "rank_pattern": {"q_proj": 0.5},
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    push(&store, "half", &dir);
    let source = StoreSource::new(store, None).with_limits(smollm2());
    let r = source.load("half@1.0.0");
    let Err(SourceError::Unusable(msg)) = r else {
        panic!("{r:?}");
    };
    assert!(
        msg.contains("rank_pattern['q_proj'] is 0.5, not a whole rank"),
        "{msg}"
    );
    assert!(
        !msg.contains(&std::env::temp_dir().display().to_string()),
        "{msg}"
    );
    std::fs::remove_dir_all(&root).ok();
}
