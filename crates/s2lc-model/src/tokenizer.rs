//! Tokenizers: Hugging Face `tokenizer.json`, or GPT-2-style byte-level BPE rebuilt from a GGUF's
//! embedded vocabulary (`tokenizer.ggml.*`), both on the `tokenizers` crate (pure Rust regex).

use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, DecoderWrapper, ModelWrapper, SplitDelimiterBehavior};

/// Why a tokenizer could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `tokenizer.json` could not be parsed.
    #[error("{path}: invalid tokenizer: {message}")]
    Load {
        /// The file involved.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A text file is not UTF-8.
    #[error("{0}: not UTF-8 text")]
    NotUtf8(PathBuf),
    /// A text file holds no text.
    #[error("{0}: the file is empty")]
    EmptyText(PathBuf),
    /// The GGUF vocabulary could not be turned into a tokenizer.
    #[error("cannot build the tokenizer: {0}")]
    Build(String),
    /// The GGUF tokenizer model is not byte-level BPE (`gpt2`).
    #[error("unsupported GGUF tokenizer model '{0}' (only byte-level BPE, 'gpt2', is supported)")]
    UnsupportedModel(String),
    /// The GGUF pre-tokenizer tag is unknown.
    #[error("unknown GGUF pre-tokenizer '{0}' (supported: smollm, gpt-2, default, qwen2)")]
    UnknownPreTokenizer(String),
    /// Encoding failed.
    #[error("encoding failed: {0}")]
    Encode(String),
    /// Decoding failed (e.g. an id outside the vocabulary).
    #[error("decoding failed: {0}")]
    Decode(String),
}

/// The `tokenizer.ggml.*` fields of a GGUF file that define a byte-level BPE tokenizer.
#[derive(Debug, Clone)]
pub struct GgufBpe<'a> {
    /// `tokenizer.ggml.tokens`: the vocabulary, by id.
    pub tokens: Vec<&'a str>,
    /// `tokenizer.ggml.merges`: `"left right"` pairs in priority order.
    pub merges: Vec<&'a str>,
    /// `tokenizer.ggml.token_type`: 1 normal, 3 control (special), 4 user-defined, ...
    pub token_types: Option<Vec<i32>>,
    /// `tokenizer.ggml.pre`: the pre-tokenizer tag (`smollm`, `gpt-2`, `qwen2`, ...).
    pub pre: Option<&'a str>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`: prepend BOS when special tokens are requested.
    pub add_bos: bool,
}

/// GPT-2's regex with byte-level handling, as `ByteLevel(use_regex = true)` applies it.
fn byte_level(use_regex: bool) -> ByteLevel {
    ByteLevel::new(false, false, use_regex)
}

/// Qwen2's pre-tokenizer split (llama.cpp `qwen2`, transformers' Qwen2 converter).
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer for a GGUF `tokenizer.ggml.pre` tag.
fn pre_tokenizer(tag: Option<&str>) -> Result<PreTokenizerWrapper, TokenizerError> {
    match tag.unwrap_or("default") {
        // Single digits first, then the GPT-2 regex (SmolLM2; matches transformers' ids).
        "smollm" => {
            Ok(Sequence::new(vec![Digits::new(true).into(), byte_level(true).into()]).into())
        }
        "gpt-2" | "gpt2" | "default" => Ok(byte_level(true).into()),
        "qwen2" => {
            let split = Split::new(
                SplitPattern::Regex(QWEN2_PATTERN.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| TokenizerError::Build(e.to_string()))?;
            Ok(Sequence::new(vec![split.into(), byte_level(false).into()]).into())
        }
        other => Err(TokenizerError::UnknownPreTokenizer(other.to_string())),
    }
}

/// Text ↔ token ids.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        if !path.exists() {
            return Err(TokenizerError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| TokenizerError::Load {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let bos_id = find(&["<|im_start|>", "<s>", "[CLS]", "<|endoftext|>"]);
        let eos_id = find(&["<|im_end|>", "</s>", "[SEP]", "<|endoftext|>"]);
        Ok(Tokenizer {
            inner,
            bos_id,
            eos_id,
        })
    }

    /// Rebuilds a byte-level BPE tokenizer from GGUF metadata.
    pub fn from_gguf_bpe(spec: GgufBpe<'_>) -> Result<Self, TokenizerError> {
        let vocab: tokenizers::models::bpe::Vocab = spec
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        if vocab.len() != spec.tokens.len() {
            return Err(TokenizerError::Build(
                "duplicate tokens in the vocabulary".into(),
            ));
        }
        let mut merges = Vec::with_capacity(spec.merges.len());
        for m in &spec.merges {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| TokenizerError::Build(format!("merge '{m}' is not 'left right'")))?;
            merges.push((a.to_string(), b.to_string()));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| TokenizerError::Build(e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::new(ModelWrapper::BPE(bpe));
        inner.with_normalizer(None::<NormalizerWrapper>);
        inner.with_pre_tokenizer(Some(pre_tokenizer(spec.pre)?));
        inner.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));

        // Control tokens (type 3) are matched whole and skippable on decode; user-defined
        // tokens (type 4) are matched whole but are ordinary text.
        if let Some(types) = &spec.token_types {
            let added = |kind: i32, special: bool| -> Vec<AddedToken> {
                spec.tokens
                    .iter()
                    .zip(types)
                    .filter(|(_, &t)| t == kind)
                    .map(|(tok, _)| AddedToken::from(tok.to_string(), special))
                    .collect()
            };
            inner.add_special_tokens(&added(3, true));
            inner.add_tokens(&added(4, false));
        }
        if spec.add_bos {
            if let Some(bos) = spec.bos_id {
                let name = spec
                    .tokens
                    .get(bos as usize)
                    .ok_or_else(|| {
                        TokenizerError::Build(format!("bos id {bos} outside the vocabulary"))
                    })?
                    .to_string();
                let template = TemplateProcessing::builder()
                    .try_single(format!("{name}:0 $A:0"))
                    .and_then(|b| b.try_pair(format!("{name}:0 $A:0 $B:1")))
                    .map_err(TokenizerError::Build)?
                    .special_tokens(vec![(name.clone(), bos)])
                    .build()
                    .map_err(|e| TokenizerError::Build(e.to_string()))?;
                inner.with_post_processor(Some(PostProcessorWrapper::Template(template)));
            }
        }
        Ok(Tokenizer {
            inner,
            bos_id: spec.bos_id,
            eos_id: spec.eos_id,
        })
    }

    /// Token ids of `text`; `add_special_tokens` applies the post-processor (e.g. a BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .encode_fast(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// Text of `ids`; `skip_special_tokens` drops control tokens such as `<|im_end|>`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size()) {
            return Err(TokenizerError::Decode(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.vocab_size()
            )));
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// Number of ids, including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of a token string, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Beginning-of-sequence id.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// End-of-sequence id.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Writes the tokenizer as a Hugging Face `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<(), TokenizerError> {
        self.inner
            .save(path, false)
            .map_err(|e| TokenizerError::Load {
                path: path.to_path_buf(),
                message: e.to_string(),
            })
    }

    /// An incremental decoder for streaming generation (special tokens skipped).
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder {
            tokenizer: self,
            ids: Vec::new(),
            emitted: 0,
        }
    }
}

/// Turns ids into text one at a time, holding back bytes of a character split across
/// byte-level tokens until it is complete.
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// Bytes of the decoded text already returned.
    emitted: usize,
}

impl StreamDecoder<'_> {
    /// Adds `id`; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids, true)?;
        // An incomplete UTF-8 sequence decodes to U+FFFD at the end: wait for more bytes.
        if text.ends_with('\u{FFFD}') || text.len() <= self.emitted {
            return Ok(None);
        }
        let piece = text.get(self.emitted..).map(str::to_string);
        self.emitted = text.len();
        // Keep the window short: restart from the last id once text has been emitted.
        if self.ids.len() > 8 {
            self.ids.drain(..self.ids.len() - 1);
            self.emitted = self.tokenizer.decode(&self.ids, true)?.len();
        }
        Ok(piece)
    }
}

/// Reads a text file the way Python's text mode does: UTF-8, with CRLF and lone CR turned into LF.
/// A missing, non-UTF-8 or empty file is an error naming the file.
pub fn read_text_file(path: &Path) -> Result<String, TokenizerError> {
    let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8(bytes).map_err(|_| TokenizerError::NotUtf8(path.to_path_buf()))?;
    if text.trim().is_empty() {
        return Err(TokenizerError::EmptyText(path.to_path_buf()));
    }
    Ok(normalize_newlines(&text))
}

/// CRLF → LF and lone CR → LF.
pub fn normalize_newlines(text: &str) -> String {
    if !text.contains('\r') {
        return text.to_string();
    }
    text.replace("\r\n", "\n").replace('\r', "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level BPE over the 256 byte symbols plus a few merges.
    fn tiny() -> Tokenizer {
        // The 256 byte symbols of GPT-2's byte ↔ unicode table.
        let bytes: Vec<String> = ByteLevel::alphabet()
            .into_iter()
            .map(|c| c.to_string())
            .collect();
        let mut tokens: Vec<String> = bytes;
        tokens.sort();
        for extra in ["he", "ll", "hell", "hello", "Ġw", "<|im_end|>"] {
            tokens.push(extra.to_string());
        }
        let merges = ["h e", "l l", "he ll", "hell o", "Ġ w"];
        let types: Vec<i32> = tokens
            .iter()
            .map(|t| if t == "<|im_end|>" { 3 } else { 1 })
            .collect();
        let eos = (tokens.len() - 1) as u32;
        Tokenizer::from_gguf_bpe(GgufBpe {
            tokens: tokens.iter().map(String::as_str).collect(),
            merges: merges.to_vec(),
            token_types: Some(types),
            pre: Some("smollm"),
            bos_id: None,
            eos_id: Some(eos),
            add_bos: false,
        })
        .unwrap()
    }

    #[test]
    fn byte_level_round_trip_and_merges() {
        let tok = tiny();
        let ids = tok.encode("hello world", false).unwrap();
        assert_eq!(ids[0], tok.token_to_id("hello").unwrap());
        assert_eq!(ids[1], tok.token_to_id("Ġw").unwrap());
        for text in [
            "hello world",
            "naïve café — ☕ 日本語",
            "a\n\n  b\t42 3.14",
            "x<|im_end|>y",
        ] {
            let ids = tok.encode(text, false).unwrap();
            assert_eq!(tok.decode(&ids, false).unwrap(), text);
        }
        // Digits are split one by one; the control token is one id and skippable.
        let ids = tok.encode("123", false).unwrap();
        assert_eq!(ids.len(), 3);
        let ids = tok.encode("x<|im_end|>", false).unwrap();
        assert_eq!(ids.last(), tok.eos_id().as_ref());
        assert_eq!(tok.decode(&ids, true).unwrap(), "x");
        assert!(tok.decode(&[1_000_000], false).is_err());
    }

    #[test]
    fn stream_decoder_waits_for_whole_characters() {
        let tok = tiny();
        let text = "日本 ☕ hello";
        let ids = tok.encode(text, false).unwrap();
        let mut stream = tok.stream_decoder();
        let mut out = String::new();
        for id in ids {
            if let Some(piece) = stream.push(id).unwrap() {
                assert!(!piece.contains('\u{FFFD}'));
                out.push_str(&piece);
            }
        }
        assert_eq!(out, text);
    }

    #[test]
    fn unknown_pre_tokenizer_is_named() {
        let err = Tokenizer::from_gguf_bpe(GgufBpe {
            tokens: vec!["a"],
            merges: vec![],
            token_types: None,
            pre: Some("martian"),
            bos_id: None,
            eos_id: None,
            add_bos: false,
        })
        .unwrap_err();
        assert!(err.to_string().contains("martian"));
    }

    #[test]
    fn text_files_read_like_python_text_mode() {
        let dir = std::env::temp_dir().join(format!("s2lc-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t.txt");
        std::fs::write(&p, b"a\r\nb\rc\n").unwrap();
        assert_eq!(read_text_file(&p).unwrap(), "a\nb\nc\n");
        std::fs::write(&p, b"").unwrap();
        assert!(matches!(
            read_text_file(&p),
            Err(TokenizerError::EmptyText(_))
        ));
        std::fs::write(&p, [0xff, 0xfe, 0x00]).unwrap();
        assert!(matches!(
            read_text_file(&p),
            Err(TokenizerError::NotUtf8(_))
        ));
        assert!(matches!(
            read_text_file(&dir.join("missing.txt")),
            Err(TokenizerError::Io { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
