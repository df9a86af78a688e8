//! The tokenizer on real assets (fetched by `scripts/fetch-assets` into `$S2LC_HOME`): SmolLM2's
//! byte-level BPE rebuilt from its GGUF metadata against `tests/fixtures/tokenizer` (written by
//! `scripts/reference/tokenizer_fixture.py`: transformers' vocabulary with llama.cpp's "smollm"
//! pre-tokenizer, checked against llama.cpp's own tokenizer), exact round trips on the Canterbury
//! and python-docs texts, and the MiniLM `tokenizer.json`. Skips with a printed reason when an asset
//! is absent.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use s2lc_model::gguf::GgufFile;
use s2lc_model::tokenizer::{read_text_file, GgufBpe, Tokenizer};
use serde_json::Value;

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn home() -> PathBuf {
    s2lc_model::assets::home()
}

fn fixture() -> &'static Value {
    static FIXTURE: OnceLock<Value> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/tokenizer/tokenizer_reference.json");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap()
    })
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| u32::try_from(x.as_u64().unwrap()).unwrap())
        .collect()
}

/// FNV-1a 64 of the ids as little-endian u32 bytes, as in the fixture script.
fn fnv1a64(ids: &[u32]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in ids.iter().flat_map(|id| id.to_le_bytes()) {
        h = (h ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn smollm_with_pre(pre: Option<&str>) -> Option<Tokenizer> {
    let path = home().join("models").join(MODEL);
    if !path.is_file() {
        eprintln!(
            "skipping: {} not found (run scripts/fetch-assets)",
            path.display()
        );
        return None;
    }
    let f = GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(f.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
    let spec = GgufBpe {
        tokens: f.get_str_array("tokenizer.ggml.tokens").unwrap(),
        merges: f.get_str_array("tokenizer.ggml.merges").unwrap(),
        token_types: Some(f.get_i32_array("tokenizer.ggml.token_type").unwrap()),
        pre: pre.or(Some(f.get_str("tokenizer.ggml.pre").unwrap())),
        bos_id: Some(f.get_u32("tokenizer.ggml.bos_token_id").unwrap()),
        eos_id: Some(f.get_u32("tokenizer.ggml.eos_token_id").unwrap()),
        add_bos: f.get_bool("tokenizer.ggml.add_bos_token").unwrap(),
    };
    Some(Tokenizer::from_gguf_bpe(spec).unwrap())
}

/// SmolLM2's tokenizer as the GGUF describes it (pre-tokenizer "smollm"), built once.
fn smollm() -> Option<&'static Tokenizer> {
    static TOKENIZER: OnceLock<Option<Tokenizer>> = OnceLock::new();
    TOKENIZER.get_or_init(|| smollm_with_pre(None)).as_ref()
}

fn canterbury(name: &str) -> Option<String> {
    let path = home().join("text/canterbury").join(name);
    if !path.is_file() {
        eprintln!(
            "skipping {name}: {} not found (run scripts/fetch-assets)",
            path.display()
        );
        return None;
    }
    Some(read_text_file(&path).unwrap())
}

#[test]
fn smollm_special_ids_and_bos() {
    let Some(tok) = smollm() else { return };
    let fx = fixture();
    assert_eq!(tok.vocab_size() as u64, fx["vocab_size"].as_u64().unwrap());
    assert_eq!(tok.vocab_size(), 49_152);
    assert_eq!(tok.bos_id().map(u64::from), fx["bos_id"].as_u64());
    assert_eq!(tok.eos_id().map(u64::from), fx["eos_id"].as_u64());
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tok.token_to_id("Ġthe"), Some(260));
    // tokenizer.ggml.add_bos_token = false: no BOS even with special tokens, like transformers.
    let with_special = tok.encode("Hello", true).unwrap();
    assert_eq!(with_special, tok.encode("Hello", false).unwrap());
    assert_eq!(
        with_special.first() == tok.bos_id().as_ref(),
        fx["add_bos_default"].as_bool().unwrap()
    );
}

#[test]
fn canterbury_texts_match_reference_and_round_trip() {
    let Some(tok) = smollm() else { return };
    let fx = fixture();
    for (name, entry) in fx["texts"].as_object().unwrap() {
        let Some(text) = canterbury(name) else {
            continue;
        };
        assert_eq!(
            text.chars().count() as u64,
            entry["chars"].as_u64().unwrap(),
            "{name}"
        );
        let start = std::time::Instant::now();
        let ids = tok.encode(&text, false).unwrap();
        let elapsed = start.elapsed();
        let prefix = ids_of(&entry["prefix"]);
        assert_eq!(
            &ids[..prefix.len()],
            &prefix[..],
            "{name}: first {} ids",
            prefix.len()
        );
        assert_eq!(
            ids.len() as u64,
            entry["count"].as_u64().unwrap(),
            "{name}: count"
        );
        assert_eq!(
            fnv1a64(&ids),
            entry["fnv1a64"].as_str().unwrap(),
            "{name}: checksum"
        );
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "{name}: round trip");

        let mut stream = tok.stream_decoder();
        let mut streamed = String::with_capacity(text.len());
        for &id in &ids {
            streamed.extend(stream.push(id).unwrap());
        }
        streamed.extend(stream.flush().unwrap());
        assert!(streamed == text, "{name}: stream decode differs");
        eprintln!(
            "{name}: {} ids, encoded in {:.0} ms ({:.1} MB/s)",
            ids.len(),
            elapsed.as_secs_f64() * 1e3,
            text.len() as f64 / elapsed.as_secs_f64() / 1e6
        );
    }
}

/// transformers' own GGUF tokenizer (no "smollm" rule: GPT-2's regex alone) is what the "gpt-2" tag
/// builds: where the fixture records that transformers differs, rebuilding with "gpt-2" gives
/// exactly transformers' ids. So the difference is the pre-tokenizer and nothing else.
#[test]
fn gpt2_pre_tokenizer_reproduces_unmodified_transformers() {
    let fx = fixture();
    let texts = fx["texts"].as_object().unwrap();
    if texts
        .values()
        .all(|e| e["transformers_equal"].as_bool().unwrap())
    {
        return;
    }
    let Some(gpt2) = smollm_with_pre(Some("gpt-2")) else {
        return;
    };
    for (name, entry) in texts {
        if entry["transformers_equal"].as_bool().unwrap() {
            continue;
        }
        let Some(text) = canterbury(name) else {
            continue;
        };
        let ids = gpt2.encode(&text, false).unwrap();
        assert_eq!(
            ids.len() as u64,
            entry["transformers_count"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            fnv1a64(&ids),
            entry["transformers_fnv1a64"].as_str().unwrap(),
            "{name}"
        );
    }
    for entry in fx["strings"].as_array().unwrap() {
        if let Some(hf) = entry.get("transformers_ids") {
            let text = entry["text"].as_str().unwrap();
            assert_eq!(gpt2.encode(text, false).unwrap(), ids_of(hf), "{text:?}");
        }
    }
}

#[test]
fn tricky_strings_match_reference() {
    let Some(tok) = smollm() else { return };
    for entry in fixture()["strings"].as_array().unwrap() {
        let text = entry["text"].as_str().unwrap();
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(ids, ids_of(&entry["ids"]), "{text:?}");
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "{text:?}");
    }
    let chat = tok.encode("<|im_start|>user\nHi<|im_end|>", false).unwrap();
    assert_eq!(tok.decode(&chat, true).unwrap(), "user\nHi");
}

#[test]
fn python_docs_round_trip() {
    let Some(tok) = smollm() else { return };
    let dir = home().join("text/python-docs");
    if !dir.is_dir() {
        eprintln!(
            "skipping: {} not found (run scripts/fetch-assets)",
            dir.display()
        );
        return;
    }
    // The tutorial page plus every file with non-ASCII text (about 90 files, ~2 MB).
    let mut files = vec![dir.join("tutorial/controlflow.rst.txt")];
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.to_string_lossy().ends_with(".rst.txt")
                && !std::fs::read(&path).unwrap().is_ascii()
            {
                files.push(path);
            }
        }
    }
    let (mut n_files, mut n_ids) = (0, 0);
    for path in &files {
        let text = read_text_file(path).unwrap();
        let ids = tok.encode(&text, false).unwrap();
        assert!(
            tok.decode(&ids, false).unwrap() == text,
            "{}: round trip",
            path.display()
        );
        n_files += 1;
        n_ids += ids.len();
    }
    eprintln!("python-docs: {n_files} files, {n_ids} ids round-tripped");
    assert!(n_files > 1);
}

#[test]
fn minilm_tokenizer_json() {
    let path = home().join("models/all-MiniLM-L6-v2/tokenizer.json");
    if !path.is_file() {
        eprintln!(
            "skipping: {} not found (run scripts/fetch-assets)",
            path.display()
        );
        return;
    }
    let tok = Tokenizer::from_file(&path).unwrap();
    assert_eq!(tok.vocab_size(), 30_522);
    assert_eq!(tok.token_to_id("[CLS]"), Some(101));
    // tokenizer_config.json names no BOS/EOS for BERT.
    assert_eq!((tok.bos_id(), tok.eos_id()), (None, None));
    for entry in fixture()["minilm"]["strings"].as_array().unwrap() {
        let text = entry["text"].as_str().unwrap();
        // No padding to 128 and no truncation, although tokenizer.json asks for both.
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(ids, ids_of(&entry["ids"]), "{text:?}");

        let decoded = tok.decode(&ids, true).unwrap();
        let mut stream = tok.stream_decoder();
        let mut streamed = String::new();
        for &id in &ids {
            streamed.extend(stream.push(id).unwrap());
        }
        streamed.extend(stream.flush().unwrap());
        assert_eq!(streamed, decoded, "{text:?}");
    }
    let ids = tok.encode("The quick brown fox", true).unwrap();
    assert_eq!(tok.decode(&ids, true).unwrap(), "the quick brown fox");
}
