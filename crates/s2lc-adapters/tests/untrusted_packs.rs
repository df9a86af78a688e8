//! Issue 22's failures of the pack reader, each reproduced by a crafted pack: refused now, with
//! the heap measured (a counting allocator) so that a refusal after a huge allocation fails too.

mod fuzz;

use std::collections::{BTreeMap, HashMap};

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;

use s2lc_adapters::artifact::AdapterLimits;
use s2lc_adapters::{format, PackParams};
use s2lc_model::config::ModelConfig;
use s2lc_spectral::AnsTable;

#[global_allocator]
static ALLOC: fuzz::Counting = fuzz::Counting;

/// Most heap any refusal below may take.
const SMALL: usize = 4 << 20;

fn smollm2() -> AdapterLimits {
    AdapterLimits::for_model(&ModelConfig::smollm2_135m())
}

/// A safetensors file of `tensors` (name, dtype, shape, bytes) with `meta`.
fn file(tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)], meta: (&str, String)) -> Vec<u8> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, Some(HashMap::from([(meta.0.into(), meta.1)]))).unwrap()
}

/// `name.freqs` and `name.stream` coding `symbols` (as a writer of coded files does).
fn coded(name: &str, symbols: &[u8], alphabet: usize) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let table = AnsTable::fit(symbols, alphabet);
    let pairs: Vec<u8> = (0u16..)
        .zip(table.freqs())
        .filter(|(_, &f)| f > 0)
        .flat_map(|(s, &f)| [s.to_le_bytes(), f.to_le_bytes()].concat())
        .collect();
    vec![
        (
            format!("{name}.freqs"),
            Dtype::U16,
            vec![pairs.len() / 4, 2],
            pairs,
        ),
        (
            format!("{name}.stream"),
            Dtype::U8,
            vec![table.encode(symbols).len()],
            table.encode(symbols),
        ),
    ]
}

/// A pack of `basis` (no members) whose module list names layer 0's q_proj.
fn pack(basis: Vec<u8>, params: PackParams, format: &str) -> BTreeMap<String, Vec<u8>> {
    let manifest = json!({
        "format": format,
        "params": params,
        "modules": [{"layer": 0, "target": 0}],
        "basis_file": "basis.safetensors",
        "basis_bytes": basis.len(),
        "members": [],
    });
    BTreeMap::from([
        (
            "pack.json".to_string(),
            serde_json::to_vec(&manifest).unwrap(),
        ),
        ("basis.safetensors".to_string(), basis),
    ])
}

fn load(files: &BTreeMap<String, Vec<u8>>, limits: &AdapterLimits) -> (String, usize) {
    let (r, peak) = fuzz::measure(|| format::load_files(files, limits).map(|_| ()));
    (r.unwrap_err().to_string(), peak)
}

fn coded_params() -> PackParams {
    PackParams {
        entropy: true,
        ..PackParams::default()
    }
}

/// An index record: layer, target, part, group, bits, rows, columns, block.
fn record(layer: u16, part: u8, bits: u8, rows: u32, cols: u32, block: u32) -> Vec<u8> {
    let mut r = layer.to_le_bytes().to_vec();
    r.extend([0, part, 0, bits]);
    for v in [rows, cols, block] {
        r.extend(v.to_le_bytes());
    }
    r
}

/// A coded bases file of `records` (its kept bitmap, scales and codes empty).
fn coded_file(n: usize, index: &[u8]) -> Vec<u8> {
    let mut t = coded("index", index, 256);
    t.extend(coded("kept", &[], 256));
    t.extend(coded("scales.hi", &[], 256));
    t.push(("scales.lo".into(), Dtype::U8, vec![0], vec![]));
    let t: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = t
        .iter()
        .map(|(n, d, s, b)| (n.as_str(), *d, s.clone(), b.clone()))
        .collect();
    file(&t, ("s2lc_coded", json!({ "matrices": n }).to_string()))
}

/// Issue 22: `{"matrices": 16777216}` made the reader allocate 16 Mi × 18 bytes (~300 MB) for
/// the index before decoding it, and a one-symbol table decodes any length from 16 bytes.
#[test]
fn a_huge_matrix_count_allocates_nothing_before_its_records_are_checked() {
    let _one = fuzz::exclusive();
    // Every byte 3: target 3, part 3, int3, and 0x03030303 rows: refused at the first record.
    let basis = coded_file(1 << 24, &[3u8; 18]);
    assert!(basis.len() < 1024, "{} bytes", basis.len());
    let files = pack(basis, coded_params(), "s2lc-pack/3");
    for limits in [AdapterLimits::GENEROUS, smollm2()] {
        let (err, peak) = load(&files, &limits);
        assert!(err.contains("block size 50529027"), "{err}");
        assert!(peak < SMALL, "{peak} B");
    }
}

/// Issue 22: the bitmaps of all records were summed and allocated uncapped (records of 2³²
/// values each); now each record is charged to the budget as it is decoded.
#[test]
fn records_beyond_the_budget_are_refused_before_their_bitmaps_exist() {
    let _one = fuzz::exclusive();
    // 4096 distinct records of u bases 1536 × 576 (each within SmolLM2's shapes): 3.6 G values.
    let index: Vec<u8> = (0..4096u16)
        .flat_map(|l| record(l % 30, (l / 30 % 2) as u8, 8, 1536, 576, 32))
        .collect();
    let files = pack(coded_file(4096, &index), coded_params(), "s2lc-pack/3");
    let (err, peak) = load(&files, &smollm2().with_max_values(1 << 22));
    assert!(err.contains("values accepted"), "{err}");
    assert!(peak < SMALL, "{peak} B");
    // Without a model: the same records, 2³² values each, are refused by the shape caps.
    let index: Vec<u8> = (0..4096u16)
        .flat_map(|l| record(l, 0, 8, 1 << 16, 1 << 16, 1))
        .collect();
    let files = pack(coded_file(4096, &index), coded_params(), "s2lc-pack/3");
    let (err, peak) = load(&files, &AdapterLimits::GENEROUS);
    assert!(
        err.contains("accepted") || err.contains("block size"),
        "{err}"
    );
    assert!(peak < SMALL, "{peak} B");
}

/// Issue 22: a plain file's matrix of 2³² values with an 8-byte bitmap (one block of 2³²
/// values, dropped) passed every check; dequantizing it takes 16 GiB.
#[test]
fn a_plain_matrix_cannot_declare_more_values_than_its_block_size_and_limits_allow() {
    let _one = fuzz::exclusive();
    let files = |block: u64| {
        let header = json!({
            "L0.q_proj.u": {"rows": 65536, "cols": 65536, "bits": "Int8", "block": block},
            "L0.q_proj.v": {"rows": 65536, "cols": 65536, "bits": "Int8", "block": block},
        });
        let mut tensors = Vec::new();
        for m in ["L0.q_proj.u", "L0.q_proj.v"] {
            tensors.push((format!("{m}.data"), Dtype::U8, vec![0], vec![]));
            tensors.push((format!("{m}.scales"), Dtype::F16, vec![0], vec![]));
            tensors.push((format!("{m}.kept"), Dtype::U8, vec![8], vec![0; 8]));
        }
        let t: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.as_str(), *d, s.clone(), b.clone()))
            .collect();
        let basis = file(&t, ("s2lc", header.to_string()));
        pack(basis, PackParams::default(), "s2lc-pack/2")
    };
    // One block of 2³² values: not the pack's block size.
    for limits in [AdapterLimits::GENEROUS, smollm2()] {
        let (err, peak) = load(&files(1 << 32), &limits);
        assert!(
            err.contains("block size 4294967296, not the pack's 32"),
            "{err}"
        );
        assert!(peak < SMALL, "{peak} B");
    }
    // Blocks of 32: past SmolLM2's shapes, and without a model the bitmap must be present.
    let (err, peak) = load(&files(32), &smollm2());
    assert!(err.contains("more than the 1536×576 accepted"), "{err}");
    assert!(peak < SMALL, "{peak} B");
    let (err, peak) = load(&files(32), &AdapterLimits::GENEROUS);
    assert!(err.contains("kept: 8 bytes for 134217728 blocks"), "{err}");
    assert!(peak < SMALL, "{peak} B");
}

/// Issue 22: kept blocks marked in a 16-byte one-symbol bitmap stream must each have a scale
/// byte present; their count is checked before the scales and codes are decoded.
#[test]
fn kept_blocks_need_their_scale_bytes_present() {
    let _one = fuzz::exclusive();
    let index = [
        record(0, 0, 8, 1536, 576, 32),
        record(0, 1, 8, 576, 576, 32),
    ]
    .concat();
    let mut t = coded("index", &index, 256);
    // Every block kept: a bitmap of 0xFF bytes, one symbol, 16 bytes of stream.
    let blocks = [1536usize * 576 / 32, 576 * 576 / 32];
    let kept: Vec<u8> = vec![0xff; blocks.iter().map(|b| b.div_ceil(8)).sum()];
    t.extend(coded("kept", &kept, 256));
    t.extend(coded("scales.hi", &[], 256));
    t.push(("scales.lo".into(), Dtype::U8, vec![10], vec![0; 10]));
    let t: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = t
        .iter()
        .map(|(n, d, s, b)| (n.as_str(), *d, s.clone(), b.clone()))
        .collect();
    let basis = file(&t, ("s2lc_coded", json!({"matrices": 2}).to_string()));
    assert!(basis.len() < 2048);
    let files = pack(basis, coded_params(), "s2lc-pack/3");
    let (err, peak) = load(&files, &smollm2());
    assert!(err.contains("10 scales for 38016 kept blocks"), "{err}");
    // The bitmaps of two matrices (4.6 KB): nothing sized by the 38 016 kept blocks' codes.
    assert!(peak < 1 << 20, "{peak} B");
}

/// Issue 22: names from `pack.json` were joined to the pack's directory and read whole:
/// `../../../../etc/hostname` left it, `/dev/zero` grew without end. Only plain names are
/// opened now (and member files only where `save` puts them), and errors name no path of the
/// machine.
#[test]
fn pack_json_names_cannot_leave_the_pack() {
    let _one = fuzz::exclusive();
    let dir = std::env::temp_dir().join(format!("s2lc-untrusted-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("members")).unwrap();
    let manifest = |basis: &str, member_file: &str| {
        json!({
            "format": "s2lc-pack/2",
            "params": PackParams::default(),
            "modules": [],
            "basis_file": basis,
            "members": [{"name": "m", "file": member_file}],
        })
    };
    for (basis, member) in [
        ("../../../../etc/hostname", "members/m.safetensors"),
        ("/dev/zero", "members/m.safetensors"),
        ("/etc/hostname", "members/m.safetensors"),
        ("members", "members/m.safetensors"),
        ("basis.safetensors", "../../../../etc/hostname"),
        ("basis.safetensors", "/dev/zero"),
        ("basis.safetensors", "members/../../../../etc/hostname"),
    ] {
        std::fs::write(
            dir.join("pack.json"),
            serde_json::to_vec(&manifest(basis, member)).unwrap(),
        )
        .unwrap();
        let (r, peak) = fuzz::measure(|| format::load_with(&dir, &AdapterLimits::GENEROUS));
        let err = r.unwrap_err().to_string();
        assert!(
            err.contains("not a plain file name")
                || err.contains("is not members/m.safetensors")
                || err.contains("not a regular file"),
            "{basis} {member}: {err}"
        );
        assert!(!err.contains(dir.to_str().unwrap()), "{err}");
        assert!(peak < SMALL, "{peak} B");
    }
    // A device or directory under a plain name is refused as not a regular file.
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink("/dev/zero", dir.join("zero")).unwrap();
        std::fs::write(
            dir.join("pack.json"),
            serde_json::to_vec(&manifest("zero", "members/m.safetensors")).unwrap(),
        )
        .unwrap();
        let (r, peak) = fuzz::measure(|| format::load_with(&dir, &AdapterLimits::GENEROUS));
        let err = r.unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        assert!(!err.contains(dir.to_str().unwrap()), "{err}");
        assert!(peak < SMALL, "{peak} B");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A declared size that is not the file's is refused, and caps what is read.
#[test]
fn declared_sizes_must_match_the_files() {
    let _one = fuzz::exclusive();
    let mut files = pack(coded_file(0, &[]), coded_params(), "s2lc-pack/3");
    let mut manifest: serde_json::Value = serde_json::from_slice(&files["pack.json"]).unwrap();
    manifest["modules"] = json!([]);
    files.insert("pack.json".into(), serde_json::to_vec(&manifest).unwrap());
    assert!(format::load_files(&files, &AdapterLimits::GENEROUS).is_ok());
    for declared in [json!(1), json!(1u64 << 40), json!("12"), json!(-1)] {
        manifest["basis_bytes"] = declared;
        files.insert("pack.json".into(), serde_json::to_vec(&manifest).unwrap());
        let err = format::load_files(&files, &AdapterLimits::GENEROUS)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("basis.safetensors")
                && (err.contains("declare") || err.contains("accepted")),
            "{err}"
        );
    }
}
