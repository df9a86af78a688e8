//! Unpack speed of one real adapter from an S2LC pack: `cargo bench -p s2lc-adapters --bench unpack`.
//!
//! Packs the rank-8 domain adapters in `$S2LC_HOME/adapters/*-r8` (trained by
//! `scripts/reference/train_adapter_set.sh`); on a machine without them, the real rank-4 adapter
//! committed as a test fixture (`tests/fixtures/adapters/alice-r4`), so the bench always measures a
//! real adapter. Then times unpacking the first member into a runnable
//! [`LoraAdapter`](s2lc_model::lora::LoraAdapter):
//! - cold: the bases dequantized on the way; warm: bases resident, as the server keeps them;
//! - from files: the member's own pack written to disk, then read, decoded and unpacked, as a
//!   server pulling it from the store does; "load" is the read and decode alone.
//!
//! The first grid is the first packing measurement's (energy × core bits × sharing, plain files);
//! the last rows are the configuration of the best measured point (member scope, int4 cores,
//! mixed-width bases at 2.35 coded bits, blocks of 64, energy 0.993), plain and entropy-coded.
//! The median of [`RUNS`] runs after [`WARMUP`] is reported beside the machine's floor for the
//! same output: the time to copy as many bytes as the unpacked factors hold, measured in this run.
//! The goal of the packing issue is a p50 ≤ 5 ms for a rank-8 SmolLM2 adapter.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Instant;

use s2lc_adapters::{format, pack, pack_separately, EnergyScope, Member, PackParams, PackedSet};
use s2lc_model::lora::LoraAdapter;
use s2lc_spectral::blockquant::QuantBits;

const WARMUP: usize = 3;
const RUNS: usize = 31;

fn median_ms(mut f: impl FnMut()) -> f64 {
    for _ in 0..WARMUP {
        f();
    }
    let mut t: Vec<f64> = (0..RUNS)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[RUNS / 2]
}

/// Median time to copy `bytes` once (read + write), in ms: the floor for producing that output.
fn copy_floor_ms(bytes: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    median_ms(|| {
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
    })
}

/// The rank-8 domain adapters, or the committed rank-4 fixture when none are trained here.
fn adapter_dirs() -> Vec<(String, PathBuf)> {
    let dir = s2lc_model::assets::home().join("adapters");
    let mut found: Vec<(String, PathBuf)> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                .filter(|(n, _)| n.ends_with("-r8"))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    if found.is_empty() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/adapters");
        println!(
            "no rank-8 adapters in {} (scripts/reference/train_adapter_set.sh): the committed \
             rank-4 fixture instead",
            dir.display()
        );
        found.push(("alice-r4".into(), fixture.join("alice-r4")));
    }
    found
}

/// One row: cold, warm and from-files unpack of `set`'s member `first`, and the load alone.
fn row(label: &str, set: &PackedSet, first: &str, scratch: &Path) {
    let out = set.unpack_lora(first).expect("unpacking");
    let out_bytes = 4 * out.n_params();
    let cold = median_ms(|| drop(black_box(set.unpack_lora(first).unwrap())));
    let bases = set.decode_bases();
    let warm = median_ms(|| drop(black_box(set.unpack_lora_with(&bases, first).unwrap())));
    let _ = std::fs::remove_dir_all(scratch);
    format::save_member(set, first, scratch).expect("writing the member's pack");
    let file_bytes: u64 = walk_bytes(scratch);
    let load = median_ms(|| drop(black_box(format::load(scratch).unwrap())));
    let files = median_ms(|| {
        let set = format::load(scratch).unwrap();
        drop(black_box(set.unpack_lora(first).unwrap()))
    });
    let floor = copy_floor_ms(out_bytes);
    println!(
        "{label:<34} {:>8.3} {:>8.2} {cold:>8.2} {warm:>8.2} {files:>8.2} {load:>8.2} {floor:>8.3}",
        file_bytes as f64 / 1e6,
        out_bytes as f64 / 1e6,
    );
}

/// Bytes of every file under `dir`.
fn walk_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => walk_bytes(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}

fn main() {
    let dirs = adapter_dirs();
    let members: Vec<Member> = dirs
        .iter()
        .map(|(n, d)| {
            let a = LoraAdapter::load(d).expect("loading an adapter");
            Member::from_lora(n, &a)
        })
        .collect();
    let names: Vec<&str> = dirs.iter().map(|(n, _)| n.as_str()).collect();
    let first = names[0];
    println!(
        "{} adapters ({}), unpacking '{first}'; threads {}; load average {}",
        names.len(),
        names.join(", "),
        rayon::current_num_threads(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split(' ')
            .next()
            .unwrap_or("?")
    );
    println!(
        "{:<34} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "pack", "file MB", "out MB", "cold ms", "warm ms", "files ms", "load ms", "copy ms"
    );
    let scratch = std::env::temp_dir().join(format!("s2lc-unpack-bench-{}", std::process::id()));
    for energy in [0.9, 0.95] {
        for bits in [QuantBits::Int4, QuantBits::Int8] {
            let params = PackParams {
                energy,
                bits,
                ..PackParams::default()
            };
            for shared in [true, false] {
                let set = if shared {
                    pack(&members, params)
                } else {
                    // Each member alone: the first member's own pack.
                    pack_separately(&members[..1], params, None).map(|mut v| v.remove(0))
                }
                .expect("packing");
                let label = format!("{energy} {} shared={shared}", bits.name());
                row(&label, &set, first, &scratch);
            }
        }
    }
    for entropy in [false, true] {
        let params = PackParams {
            energy: 0.993,
            scope: EnergyScope::Member,
            bits: QuantBits::Int4,
            basis_bits: QuantBits::Int3,
            mixed_bases: true,
            block: 64,
            entropy,
            basis_rate: entropy.then_some(2.35),
            ..PackParams::default()
        };
        let set = pack_separately(&members[..1], params, None)
            .map(|mut v| v.remove(0))
            .expect("packing");
        let label = format!(
            "0.993 member int4/mixed {}",
            if entropy { "coded 2.35" } else { "int3 plain" }
        );
        row(&label, &set, first, &scratch);
    }
    let _ = std::fs::remove_dir_all(&scratch);
}
