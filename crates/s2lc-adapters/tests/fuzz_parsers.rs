//! Fuzzing of the parsers of store content and model files (issue 22): S2LC packs (plain and
//! entropy-coded), PEFT adapters, safetensors files and GGUF files, each as the server or CLI
//! runs it (a pack loaded and every member unpacked and applied; an adapter loaded and applied).
//!
//! `cargo test` runs each target for a few seconds (`S2LC_FUZZ_SECS` sets the time);
//! `scripts/fuzz` builds this binary with coverage counters and runs each target for longer.
//! What the fuzzer found is kept under `tests/fixtures/fuzz/<target>/` and replayed here.

mod fuzz;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use s2lc_adapters::artifact::AdapterLimits;
use s2lc_adapters::pack::{PackedSet, QMat};
use s2lc_adapters::{format, pack, Member, PackParams};
use s2lc_model::config::ModelConfig;
use s2lc_model::gguf::{GgufFile, MetaValue};
use s2lc_model::kernels::dot::QuantizedActs;
use s2lc_model::lora::{DeltaScratch, LoraAdapter};
use s2lc_spectral::blockquant::QuantBits;

use fuzz::{Input, Runner, Target};

#[global_allocator]
static ALLOC: fuzz::Counting = fuzz::Counting;

/// Seconds per target in a plain `cargo test`.
const QUICK_SECS: f64 = 3.0;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn regressions(target: &str) -> PathBuf {
    repo().join("tests/fixtures/fuzz").join(target)
}

/// SmolLM2-135M, the base model of the committed adapters.
fn smollm2() -> ModelConfig {
    ModelConfig::smollm2_135m()
}

fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures/adapters").join(name)
}

/// An adapter with only its first `n` layers.
fn first_layers(a: &LoraAdapter, n: usize) -> LoraAdapter {
    let mut a = a.clone();
    a.layers.truncate(n);
    a
}

/// Runs every delta of `a` on one row of input: what a rank-0 or misshapen delta would panic in.
fn exercise(a: &LoraAdapter) {
    let (mut mid, mut acts) = (DeltaScratch::default(), QuantizedActs::default());
    for (_, _, d) in a.deltas() {
        let x = vec![0.5f32; d.in_dim()];
        let mut y = vec![0.0f32; d.out_dim()];
        d.apply(&x, 1, &mut y, &mut mid, &mut acts);
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("s2lc-fuzz-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---------------------------------------------------------------------------------------------
// Packs.

/// The files of a pack as an input: `pack.json`, the bases, then member `m{i}`'s file.
fn pack_names(n: usize) -> Vec<String> {
    let mut names = vec!["pack.json".to_string(), "basis.safetensors".to_string()];
    names.extend((0..n.saturating_sub(2)).map(|i| format!("members/m{i}.safetensors")));
    names
}

fn pack_input(set: &PackedSet, tag: &str) -> Input {
    let dir = scratch(tag);
    format::save(set, &dir).unwrap();
    let n = set.members.len() + 2;
    let input = pack_names(n)
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect();
    std::fs::remove_dir_all(&dir).ok();
    input
}

/// Values a pack's matrices charge to a loader's budget (as `format` counts them).
fn charge(set: &PackedSet) -> usize {
    let q = |m: &QMat| m.q.len.div_ceil(m.q.block) * m.q.block + 64;
    let bases: usize = set
        .modules
        .values()
        .flat_map(|m| m.u.groups.iter().chain(&m.v.groups))
        .map(q)
        .sum();
    let cores: usize = set
        .members
        .iter()
        .flat_map(|m| m.cores.values())
        .map(|c| q(&c.core_b) + q(&c.core_a) + c.extra.as_ref().map_or(0, |(b, a)| q(b) + q(a)))
        .sum();
    bases + cores
}

struct PackSeeds {
    inputs: Vec<Input>,
    limits: AdapterLimits,
}

/// Packs of the committed adapters: plain (uniform and mixed widths) and entropy-coded, of the
/// first two layers (fast to fuzz) and of all 30 (the largest legitimate input).
fn pack_seeds() -> &'static PackSeeds {
    static SEEDS: OnceLock<PackSeeds> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let a = LoraAdapter::load(&fixture("alice-r4")).unwrap();
        let b = LoraAdapter::load(&fixture("alice-r4-e90")).unwrap();
        let members = |n: usize| {
            vec![
                Member::from_lora("m0", &first_layers(&a, n)),
                Member::from_lora("m1", &first_layers(&b, n)),
            ]
        };
        let plain = PackParams {
            bits: QuantBits::Int4,
            basis_bits: QuantBits::Int8,
            energy: 0.95,
            ..PackParams::default()
        };
        let mixed = PackParams {
            mixed_bases: true,
            basis_bits: QuantBits::Int4,
            ..plain
        };
        let coded = PackParams {
            entropy: true,
            ..mixed
        };
        let mut sets = vec![
            pack(&members(2), plain).unwrap(),
            pack(&members(2), mixed).unwrap(),
            pack(&members(2), coded).unwrap(),
            pack(&members(30), coded).unwrap(),
        ];
        // One member alone, as `s2lc store push --member` stores it.
        let mut single = sets[2].clone();
        single.members.truncate(1);
        sets.push(single);
        let max = sets.iter().map(charge).max().unwrap();
        PackSeeds {
            inputs: sets
                .iter()
                .enumerate()
                .map(|(i, s)| pack_input(s, &format!("seed{i}")))
                .collect(),
            limits: AdapterLimits::for_model(&smollm2()).with_max_values(max),
        }
    })
}

/// Loads a pack from its files, unpacks every member and applies it, and blends them.
fn run_pack(files: &[Vec<u8>], limits: &AdapterLimits) -> Result<(), String> {
    let map: BTreeMap<String, Vec<u8>> = pack_names(files.len())
        .into_iter()
        .zip(files.iter().cloned())
        .collect();
    let set = format::load_files(&map, limits).map_err(|e| e.to_string())?;
    for m in &set.members {
        exercise(&set.unpack_lora(&m.name).map_err(|e| e.to_string())?);
    }
    if set.members.len() > 1 {
        let weights: Vec<(&str, f32)> =
            set.members.iter().map(|m| (m.name.as_str(), 0.5)).collect();
        exercise(
            &set.morph_lora("morph", &weights)
                .map_err(|e| e.to_string())?,
        );
    }
    Ok(())
}

/// Makes the sizes `pack.json` declares those of the files again (half the mutants), so that
/// mutations of the files reach their parsers.
fn fix_pack_sizes(input: &mut Input) {
    let Some(Ok(mut manifest)) = input
        .first()
        .map(|t| serde_json::from_slice::<serde_json::Value>(t))
    else {
        return;
    };
    if !manifest.is_object() {
        return;
    }
    if let Some(basis) = input.get(1) {
        manifest["basis_bytes"] = basis.len().into();
    }
    if let Some(members) = manifest["members"].as_array_mut() {
        for (m, file) in members.iter_mut().zip(input.iter().skip(2)) {
            if m.is_object() {
                m["bytes"] = file.len().into();
            }
        }
    }
    input[0] = serde_json::to_vec_pretty(&manifest).unwrap();
}

fn tokens(list: &[&str]) -> Vec<Vec<u8>> {
    list.iter().map(|t| t.as_bytes().to_vec()).collect()
}

fn pack_target<'a>(run: &'a Runner, fix: &'a dyn Fn(&mut Input)) -> Target<'a> {
    Target {
        name: "pack",
        seeds: pack_seeds().inputs.clone(),
        run,
        dict: tokens(&[
            "../../../../etc/hostname",
            "/dev/zero",
            "members/../../x",
            "s2lc-pack/3",
            "s2lc-pack/2",
            "\"block\": 65536",
            "{\"matrices\": 16777216}",
            "L0.q_proj.u.1",
            "L29.v_proj.core_b",
            "ans.int2.freqs",
            "scales.lo",
            "index.stream",
        ]),
        fixup: Some(fix),
        references: Vec::new(),
    }
}

#[test]
fn fuzz_pack() {
    let _one = fuzz::exclusive();
    let limits = pack_seeds().limits;
    let run = move |f: &[Vec<u8>]| run_pack(f, &limits);
    fuzz::run_and_check(&pack_target(&run, &fix_pack_sizes), QUICK_SECS);
}

#[test]
fn pack_regressions() {
    let _one = fuzz::exclusive();
    let limits = pack_seeds().limits;
    let run = move |f: &[Vec<u8>]| run_pack(f, &limits);
    let t = pack_target(&run, &fix_pack_sizes);
    fuzz::replay(&t, &regressions("pack"), 64 << 20);
}

// ---------------------------------------------------------------------------------------------
// PEFT adapters.

struct PeftSeeds {
    inputs: Vec<Input>,
    limits: AdapterLimits,
}

fn peft_input(dir: &Path) -> Input {
    ["adapter_config.json", "adapter_model.safetensors"]
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect()
}

/// The committed adapters (F32, 30 layers) and two layers of one re-saved by S2LC (mixed ranks
/// in `rank_pattern`).
fn peft_seeds() -> &'static PeftSeeds {
    static SEEDS: OnceLock<PeftSeeds> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let a = LoraAdapter::load(&fixture("alice-r4")).unwrap();
        let (cut, _) = first_layers(&a, 2).truncate(Some(0.9), None).unwrap();
        let dir = scratch("peft-seed");
        cut.save(&dir).unwrap();
        let inputs = vec![
            peft_input(&dir),
            peft_input(&fixture("alice-r4-e90")),
            peft_input(&fixture("alice-r4")),
        ];
        std::fs::remove_dir_all(&dir).ok();
        let values = |a: &LoraAdapter| -> usize {
            a.deltas()
                .map(|(_, _, d)| d.rank() * (d.in_dim() + d.out_dim()))
                .sum()
        };
        PeftSeeds {
            inputs,
            limits: AdapterLimits::for_model(&smollm2()).with_max_values(values(&a)),
        }
    })
}

fn run_peft(files: &[Vec<u8>], limits: &AdapterLimits) -> Result<(), String> {
    let [config, weights] = files else {
        return Err("two files".into());
    };
    let a = LoraAdapter::from_bytes(Path::new("fuzz"), config, weights, limits)
        .map_err(|e| e.to_string())?;
    exercise(&a);
    Ok(())
}

fn peft_target<'a>(run: &'a Runner) -> Target<'a> {
    Target {
        name: "peft",
        seeds: peft_seeds().inputs.clone(),
        run,
        dict: tokens(&[
            "\"rank_pattern\": {\"q_proj\": 0.5}",
            "\"r\": 0",
            "0.5",
            "base_model.model.model.layers.4294967296.self_attn.q_proj.lora_A.weight",
            "lora_A.default.weight",
            "\"F16\"",
            "\"BF16\"",
            "\"I64\"",
            "\"shape\":[0,576]",
            "\"use_rslora\": true",
        ]),
        fixup: None,
        references: Vec::new(),
    }
}

#[test]
fn fuzz_peft() {
    let _one = fuzz::exclusive();
    let limits = peft_seeds().limits;
    let run = move |f: &[Vec<u8>]| run_peft(f, &limits);
    fuzz::run_and_check(&peft_target(&run), QUICK_SECS);
}

#[test]
fn peft_regressions() {
    let _one = fuzz::exclusive();
    let limits = peft_seeds().limits;
    let run = move |f: &[Vec<u8>]| run_peft(f, &limits);
    fuzz::replay(&peft_target(&run), &regressions("peft"), 64 << 20);
}

// ---------------------------------------------------------------------------------------------
// Safetensors files (the reader of model weights and adapters).

fn run_safetensors(files: &[Vec<u8>]) -> Result<(), String> {
    // One file per thread, rewritten for every input.
    thread_local! {
        static PATH: PathBuf = scratch(&format!("st-{:?}", std::thread::current().id()))
            .join("f.safetensors");
    }
    let path = PATH.with(|p| p.clone());
    let bytes = files.first().ok_or("no file")?;
    std::fs::write(&path, bytes).map_err(|e| e.to_string())?;
    // The float tensors (the reader converts those; a pack's U8 codes are read as bytes).
    let floats: Vec<String> = match safetensors::SafeTensors::deserialize(bytes) {
        Ok(st) => st
            .tensors()
            .into_iter()
            .filter(|(_, v)| {
                use safetensors::Dtype::*;
                matches!(v.dtype(), F32 | F16 | BF16)
            })
            .map(|(n, _)| n)
            .collect(),
        Err(_) => Vec::new(),
    };
    let tensors =
        s2lc_model::source::read_safetensors_where(&path, |n| floats.iter().any(|f| f == n))
            .map_err(|e| e.to_string())?;
    for t in tensors.values() {
        let n: usize = t.shape.iter().product();
        if n != t.data.len() {
            return Err(format!("shape {:?} but {} values", t.shape, t.data.len()));
        }
    }
    Ok(())
}

fn safetensors_target<'a>(run: &'a Runner) -> Target<'a> {
    let mut seeds: Vec<Input> = peft_seeds()
        .inputs
        .iter()
        .map(|i| vec![i[1].clone()])
        .collect();
    // A pack's plain bases file: U8 and F16 tensors and JSON metadata.
    seeds.push(vec![pack_seeds().inputs[1][1].clone()]);
    Target {
        name: "safetensors",
        seeds,
        run,
        dict: tokens(&[
            "\"dtype\":\"F16\"",
            "\"dtype\":\"BF16\"",
            "\"dtype\":\"F64\"",
            "\"data_offsets\":[0,18446744073709551615]",
            "\"shape\":[4294967296,4294967296]",
            "\"__metadata__\":{}",
        ]),
        fixup: None,
        references: Vec::new(),
    }
}

#[test]
fn fuzz_safetensors() {
    let _one = fuzz::exclusive();
    fuzz::run_and_check(&safetensors_target(&run_safetensors), QUICK_SECS);
}

#[test]
fn safetensors_regressions() {
    let _one = fuzz::exclusive();
    fuzz::replay(
        &safetensors_target(&run_safetensors),
        &regressions("safetensors"),
        64 << 20,
    );
}

// ---------------------------------------------------------------------------------------------
// GGUF files.

/// A GGUF v3 writer: metadata and tensors (`dims` innermost first, ggml type id, bytes).
fn gguf(meta: &[(String, MetaValue)], tensors: &[(String, Vec<u64>, u32, Vec<u8>)]) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    fn type_id(v: &MetaValue) -> u32 {
        match v {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::String(_) => 8,
            MetaValue::Array(_) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }
    fn value(out: &mut Vec<u8>, v: &MetaValue) {
        match v {
            MetaValue::U8(x) => out.push(*x),
            MetaValue::I8(x) => out.extend(x.to_le_bytes()),
            MetaValue::U16(x) => out.extend(x.to_le_bytes()),
            MetaValue::I16(x) => out.extend(x.to_le_bytes()),
            MetaValue::U32(x) => out.extend(x.to_le_bytes()),
            MetaValue::I32(x) => out.extend(x.to_le_bytes()),
            MetaValue::F32(x) => out.extend(x.to_le_bytes()),
            MetaValue::Bool(x) => out.push(*x as u8),
            MetaValue::String(s) => string(out, s),
            MetaValue::Array(items) => {
                out.extend(items.first().map_or(0, type_id).to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for i in items {
                    value(out, i);
                }
            }
            MetaValue::U64(x) => out.extend(x.to_le_bytes()),
            MetaValue::I64(x) => out.extend(x.to_le_bytes()),
            MetaValue::F64(x) => out.extend(x.to_le_bytes()),
        }
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        string(&mut out, k);
        out.extend(type_id(v).to_le_bytes());
        value(&mut out, v);
    }
    let mut offset = 0u64;
    let mut data = Vec::new();
    for (name, dims, ty, bytes) in tensors {
        string(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(ty.to_le_bytes());
        out.extend(offset.to_le_bytes());
        data.extend(bytes);
        data.resize(data.len().div_ceil(32) * 32, 0);
        offset = data.len() as u64;
    }
    out.resize(out.len().div_ceil(32) * 32, 0);
    out.extend(data);
    out
}

/// The committed dequantization fixtures (real and synthetic blocks of every decoded type) as
/// tensors, with llama metadata (a small vocabulary); and, when the real SmolLM2 GGUF is here,
/// its whole metadata (49 152 tokens: the largest legitimate header) with two of them.
fn gguf_seeds() -> &'static Vec<Input> {
    static SEEDS: OnceLock<Vec<Input>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let dir = repo().join("tests/fixtures/gguf");
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
        let tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)> = index["cases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let n = c["n_elements"].as_u64().unwrap();
                let rows = c["rows"].as_u64().unwrap_or(1).max(1);
                let bytes = std::fs::read(dir.join(c["bytes"].as_str().unwrap())).unwrap();
                let ty = c["type_id"].as_u64().unwrap() as u32;
                (
                    c["name"].as_str().unwrap().to_string(),
                    vec![n / rows, rows],
                    ty,
                    bytes,
                )
            })
            .collect();
        let s = |v: &str| MetaValue::String(v.into());
        let vocab: Vec<MetaValue> = (0..64).map(|i| s(&format!("tok{i}"))).collect();
        let meta = vec![
            ("general.architecture".to_string(), s("llama")),
            ("general.name".to_string(), s("fuzz")),
            ("llama.block_count".to_string(), MetaValue::U32(2)),
            ("llama.embedding_length".to_string(), MetaValue::U32(64)),
            ("llama.feed_forward_length".to_string(), MetaValue::U32(128)),
            ("llama.attention.head_count".to_string(), MetaValue::U32(4)),
            (
                "llama.attention.head_count_kv".to_string(),
                MetaValue::U32(2),
            ),
            ("llama.rope.freq_base".to_string(), MetaValue::F32(1e4)),
            (
                "llama.attention.layer_norm_rms_epsilon".to_string(),
                MetaValue::F32(1e-5),
            ),
            ("tokenizer.ggml.model".to_string(), s("gpt2")),
            ("tokenizer.ggml.tokens".to_string(), MetaValue::Array(vocab)),
            (
                "tokenizer.ggml.token_type".to_string(),
                MetaValue::Array((0..64).map(MetaValue::I32).collect()),
            ),
            ("general.alignment".to_string(), MetaValue::U32(32)),
        ];
        let mut seeds: Vec<Input> = tensors.chunks(4).map(|t| vec![gguf(&meta, t)]).collect();
        if let Ok(f) = GgufFile::open(&real_gguf()) {
            let meta: Vec<(String, MetaValue)> = f
                .metadata()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            seeds.push(vec![gguf(&meta, &tensors[..2])]);
        }
        seeds
    })
}

fn run_gguf(files: &[Vec<u8>]) -> Result<(), String> {
    let f =
        GgufFile::from_bytes(files.first().ok_or("no file")?.clone()).map_err(|e| e.to_string())?;
    let _ = ModelConfig::from_gguf(&f);
    let _ = f.get_str_array("tokenizer.ggml.tokens");
    let names: Vec<String> = f.tensors().iter().map(|t| t.name.clone()).collect();
    for name in names.iter().take(64) {
        let _ = f.dequantize(name);
    }
    Ok(())
}

fn gguf_target<'a>(run: &'a Runner) -> Target<'a> {
    Target {
        name: "gguf",
        seeds: gguf_seeds().clone(),
        run,
        dict: vec![
            b"GGUF".to_vec(),
            u64::MAX.to_le_bytes().to_vec(),
            (1u64 << 24).to_le_bytes().to_vec(),
            9u32.to_le_bytes().to_vec(),
        ],
        fixup: None,
        // The model file itself, when it is here: the largest legitimate GGUF input.
        references: std::fs::read(real_gguf())
            .map(|b| vec![vec![b]])
            .unwrap_or_default(),
    }
}

fn real_gguf() -> PathBuf {
    s2lc_model::assets::home().join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

#[test]
fn fuzz_gguf() {
    let _one = fuzz::exclusive();
    fuzz::run_and_check(&gguf_target(&run_gguf), QUICK_SECS);
}

#[test]
fn gguf_regressions() {
    let _one = fuzz::exclusive();
    fuzz::replay(&gguf_target(&run_gguf), &regressions("gguf"), 64 << 20);
}
