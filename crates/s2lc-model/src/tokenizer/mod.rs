//! Tokenizers: a Hugging Face `tokenizer.json`, or the byte-level BPE a GGUF file describes.
//!
//! [`Tokenizer`] wraps the `tokenizers` crate (pure Rust, `fancy-regex`). It is built either from a
//! `tokenizer.json` ([`Tokenizer::from_file`]) or from the `tokenizer.ggml.*` metadata of a GGUF
//! whose `tokenizer.ggml.model` is `"gpt2"` ([`Tokenizer::from_gguf_bpe`]); this module does not
//! read GGUF itself, the caller hands the arrays over in a [`GgufBpe`].
//!
//! The GGUF byte-level BPE is rebuilt in `bpe`, streaming decoding is in [`StreamDecoder`] and
//! text-file reading in `text`.
//!
//! Text files are read with [`read_text_file`], which normalises line endings like Python's text
//! mode so token ids match the reference scripts.

use std::path::{Path, PathBuf};

use tokenizers::decoders::DecoderWrapper;

mod bpe;
mod stream;
mod text;

pub use bpe::GgufBpe;
pub use stream::StreamDecoder;
pub use text::{normalize_newlines, read_text_file};

/// Everything that can go wrong loading a tokenizer, encoding, decoding or reading text.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A `tokenizer.json` (or its sibling `tokenizer_config.json`) could not be parsed.
    #[error("cannot load tokenizer from {path}: {message}")]
    Load {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A text file is not valid UTF-8.
    #[error("{path} is not UTF-8 text (invalid byte at offset {valid_up_to})")]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// Length of the valid UTF-8 prefix, i.e. the offset of the first bad byte.
        valid_up_to: usize,
    },
    /// A text file has no text (no bytes, or only whitespace).
    #[error("{path} has no text (empty or only whitespace)")]
    EmptyFile {
        /// The file.
        path: PathBuf,
    },
    /// A tokenizer could not be written as `tokenizer.json`.
    #[error("cannot save tokenizer to {path}: {message}")]
    Save {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The vocabulary, merges or special ids do not form a valid tokenizer.
    #[error("cannot build tokenizer: {0}")]
    Build(String),
    /// The GGUF names a tokenizer model this module does not build (e.g. `"llama"`, SentencePiece).
    #[error("unsupported GGUF tokenizer model {0:?} (only \"gpt2\" byte-level BPE is supported)")]
    UnsupportedModel(String),
    /// The GGUF's `tokenizer.ggml.pre` tag names a pre-tokenizer this module does not know.
    #[error("unknown GGUF pre-tokenizer {0:?} (supported: smollm, gpt-2, default, qwen2)")]
    UnknownPreTokenizer(String),
    /// Encoding failed inside the `tokenizers` crate.
    #[error("encode failed: {0}")]
    Encode(String),
    /// Decoding failed inside the `tokenizers` crate.
    #[error("decode failed: {0}")]
    Decode(String),
    /// A token id outside the vocabulary was passed to decode.
    #[error("token id {id} is outside the vocabulary (size {vocab_size})")]
    UnknownId {
        /// The offending id.
        id: u32,
        /// The tokenizer's vocabulary size.
        vocab_size: usize,
    },
}

/// A text tokenizer: text to token ids and back.
///
/// Encoding never truncates or pads (a `tokenizer.json`'s truncation and padding settings are
/// dropped on load); windowing is the caller's job.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    /// One more than the largest id, added tokens included.
    vocab_size: usize,
    /// The decoder is GPT-2 byte-level, so the stream decoder can work on bytes.
    byte_level: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("byte_level", &self.byte_level)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Load a Hugging Face `tokenizer.json`.
    ///
    /// BOS/EOS ids come from a sibling `tokenizer_config.json` (`bos_token` / `eos_token`, either a
    /// string or `{"content": ...}`), else from a sibling `config.json` (`bos_token_id` /
    /// `eos_token_id`, the first of a list), else they are `None`. Truncation and padding stored
    /// in the file are removed.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| TokenizerError::Load {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        inner
            .with_truncation(None)
            .map_err(|e| TokenizerError::Build(e.to_string()))?;
        inner.with_padding(None);

        let dir = path.parent().unwrap_or(Path::new("."));
        let tokenizer_config = dir.join("tokenizer_config.json");
        let model_config = dir.join("config.json");
        let (bos, eos) = if tokenizer_config.is_file() {
            special_tokens_from_config(&tokenizer_config)?
        } else {
            (None, None)
        };
        let (bos_fallback, eos_fallback) = if model_config.is_file() {
            special_ids_from_model_config(&model_config)?
        } else {
            (None, None)
        };
        let lookup = |name: Option<String>, what: &str| -> Result<Option<u32>, TokenizerError> {
            match name {
                None => Ok(None),
                Some(name) => {
                    inner
                        .token_to_id(&name)
                        .map(Some)
                        .ok_or_else(|| TokenizerError::Load {
                            path: tokenizer_config.clone(),
                            message: format!("{what} {name:?} is not in the vocabulary"),
                        })
                }
            }
        };
        let bos_id = lookup(bos, "bos_token")?.or(bos_fallback);
        let eos_id = lookup(eos, "eos_token")?.or(eos_fallback);
        Ok(Self::assemble(inner, bos_id, eos_id))
    }

    fn assemble(inner: tokenizers::Tokenizer, bos_id: Option<u32>, eos_id: Option<u32>) -> Self {
        let vocab_size = inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&id| id as usize + 1);
        let byte_level = matches!(inner.get_decoder(), Some(DecoderWrapper::ByteLevel(_)));
        Self {
            inner,
            bos_id,
            eos_id,
            vocab_size,
            byte_level,
        }
    }

    /// Token ids of `text`. With `add_special_tokens`, the tokenizer's own additions are made
    /// (BOS for a GGUF that asks for it; `[CLS] ... [SEP]` for a BERT `tokenizer.json`). Special
    /// tokens written in the text (`<|im_start|>`) are always matched whole.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .encode_fast(text, add_special_tokens)
            .map(|encoding| encoding.get_ids().to_vec())
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// Text of `ids`; with `skip_special_tokens`, special tokens are left out. Invalid UTF-8 (a
    /// multi-byte character cut by the ids' ends) comes out as U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(self.unknown_id(id));
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// Number of token ids: one more than the largest id, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The id of a token, spelled as in the vocabulary (byte-level spelling for BPE: `"Ġthe"`),
    /// or of an added token (`"<|im_end|>"`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The beginning-of-sequence id, if the tokenizer has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The end-of-sequence id, if the tokenizer has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// The ids that end a generated reply: EOS and, for ChatML models, `<|im_end|>`.
    pub fn stop_ids(&self) -> Vec<u32> {
        [self.eos_id, self.token_to_id("<|im_end|>")]
            .into_iter()
            .flatten()
            .collect()
    }

    /// An incremental decoder for streaming generation; special tokens (`<|im_end|>`) are left
    /// out of its text, as with `decode(ids, true)`.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(self, true)
    }

    /// An incremental decoder that keeps special tokens in its text, as `decode(ids, false)`.
    pub fn stream_decoder_keeping_special(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(self, false)
    }

    /// Write the tokenizer as a Hugging Face `tokenizer.json` (a GGUF-built one included, with its
    /// BOS post-processor; BOS/EOS ids themselves belong in `tokenizer_config.json`/`config.json`).
    pub fn save(&self, path: &Path) -> Result<(), TokenizerError> {
        self.inner
            .save(path, false)
            .map_err(|e| TokenizerError::Save {
                path: path.to_path_buf(),
                message: e.to_string(),
            })
    }

    fn unknown_id(&self, id: u32) -> TokenizerError {
        TokenizerError::UnknownId {
            id,
            vocab_size: self.vocab_size,
        }
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value, TokenizerError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| TokenizerError::Load {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// `bos_token_id` and `eos_token_id` of a Hugging Face model `config.json` (the first id of a list).
fn special_ids_from_model_config(
    path: &Path,
) -> Result<(Option<u32>, Option<u32>), TokenizerError> {
    let config = read_json(path)?;
    let id = |key: &str| {
        let v = config.get(key)?;
        let v = v.as_array().map_or(Some(v), |a| a.first())?;
        v.as_u64().and_then(|id| u32::try_from(id).ok())
    };
    Ok((id("bos_token_id"), id("eos_token_id")))
}

/// `bos_token` and `eos_token` of a Hugging Face `tokenizer_config.json`.
fn special_tokens_from_config(
    path: &Path,
) -> Result<(Option<String>, Option<String>), TokenizerError> {
    let config = read_json(path)?;
    let token = |key: &str| match config.get(key) {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    };
    Ok((token("bos_token"), token("eos_token")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::bpe::tests::tiny;

    #[test]
    fn save_and_reload_as_tokenizer_json() {
        let dir = std::env::temp_dir().join(format!("s2lc-tokenizer-save-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        let original = tiny("smollm", true);
        original.save(&path).unwrap();
        // No tokenizer_config.json: BOS/EOS come from config.json (EOS may be a list).
        std::fs::write(
            dir.join("config.json"),
            r#"{"bos_token_id": 1, "eos_token_id": [2, 0]}"#,
        )
        .unwrap();
        let reloaded = Tokenizer::from_file(&path).unwrap();
        assert_eq!(reloaded.vocab_size(), original.vocab_size());
        assert_eq!((reloaded.bos_id(), reloaded.eos_id()), (Some(1), Some(2)));
        for text in ["the 12 naïve <|im_end|>", "a  1\n\n"] {
            for special in [false, true] {
                let ids = original.encode(text, special).unwrap();
                assert_eq!(reloaded.encode(text, special).unwrap(), ids, "{text:?}");
                assert_eq!(
                    reloaded.decode(&ids, false).unwrap(),
                    original.decode(&ids, false).unwrap()
                );
            }
        }
        assert_eq!(reloaded.encode("the", true).unwrap()[0], 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn decode_rejects_unknown_ids() {
        let tok = tiny("smollm", false);
        let n = tok.vocab_size() as u32;
        assert!(
            matches!(tok.decode(&[0, n], false), Err(TokenizerError::UnknownId { id, .. }) if id == n)
        );
        assert!(tok.stream_decoder().push(n).is_err());
    }
}
