//! Unpack speed of one real adapter from an S2LC pack: `cargo bench -p s2lc-adapters --bench unpack`.
//!
//! Packs the rank-8 domain adapters in `$S2LC_HOME/adapters/*-r8` (trained by
//! `scripts/reference/train_adapter_set.sh`; the bench says so and exits when they are absent) at
//! energy 0.9 and 0.95 with int4 and int8 cores, with and without shared bases, then times
//! unpacking the first member into a runnable [`LoraAdapter`](s2lc_model::lora::LoraAdapter):
//! cold (bases dequantized on the way) and warm (bases resident, as the server keeps them). The
//! median of [`RUNS`] runs after [`WARMUP`] is reported beside the machine's floor for the same
//! output: the time to copy as many bytes as the unpacked factors hold, measured in this run.
//! The goal of the packing issue is a p50 ≤ 5 ms for a rank-8 SmolLM2 adapter.

use std::hint::black_box;
use std::time::Instant;

use s2lc_adapters::{pack, pack_separately, Member, PackParams, PackedSet};
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

fn main() {
    let dir = s2lc_model::assets::home().join("adapters");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with("-r8"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    if names.is_empty() {
        println!(
            "skipped: no rank-8 adapters in {} (scripts/reference/train_adapter_set.sh)",
            dir.display()
        );
        return;
    }
    let members: Vec<Member> = names
        .iter()
        .map(|n| {
            let a = LoraAdapter::load(&dir.join(n)).expect("loading an adapter");
            Member::from_lora(n, &a)
        })
        .collect();
    let first = names[0].as_str();
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
        "{:>6} {:>5} {:>6} {:>9} {:>9} {:>9} {:>9}",
        "energy", "bits", "shared", "out MB", "cold ms", "warm ms", "copy ms"
    );
    for energy in [0.9, 0.95] {
        for bits in [QuantBits::Int4, QuantBits::Int8] {
            let params = PackParams {
                energy,
                bits,
                ..PackParams::default()
            };
            for shared in [true, false] {
                let set: PackedSet = if shared {
                    pack(&members, params)
                } else {
                    // Each member alone: the first member's own pack.
                    pack_separately(&members[..1], params, None).map(|mut v| v.remove(0))
                }
                .expect("packing");
                let out = set.unpack_lora(first).expect("unpacking");
                let out_bytes = 4 * out.n_params();
                let cold = median_ms(|| drop(black_box(set.unpack_lora(first).unwrap())));
                let bases = set.decode_bases();
                let warm =
                    median_ms(|| drop(black_box(set.unpack_lora_with(&bases, first).unwrap())));
                let floor = copy_floor_ms(out_bytes);
                println!(
                    "{energy:>6} {:>5} {:>6} {:>9.2} {cold:>9.2} {warm:>9.2} {floor:>9.3}",
                    format!("{bits:?}").to_lowercase(),
                    shared,
                    out_bytes as f64 / 1e6
                );
            }
        }
    }
}
