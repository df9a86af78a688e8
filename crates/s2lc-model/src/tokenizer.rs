//! Tokenizers: a Hugging Face `tokenizer.json`, or the byte-level BPE a GGUF file describes.
//!
//! [`Tokenizer`] wraps the `tokenizers` crate (pure Rust, `fancy-regex`). It is built either from a
//! `tokenizer.json` ([`Tokenizer::from_file`]) or from the `tokenizer.ggml.*` metadata of a GGUF
//! whose `tokenizer.ggml.model` is `"gpt2"` ([`Tokenizer::from_gguf_bpe`]); this module does not
//! read GGUF itself, the caller hands the arrays over in a [`GgufBpe`].
//!
//! A GGUF BPE tokenizer is rebuilt the way llama.cpp runs it:
//! - the model is byte-level BPE over the file's tokens (id = index) and merges (rank = index), no
//!   unknown token (every byte has a token);
//! - the pre-tokenizer is chosen by `tokenizer.ggml.pre` (see [`GgufBpe::pre`]);
//! - tokens typed control (3) are added as *special* tokens and user-defined ones (4) as plain
//!   added tokens, both matched whole in the text before pre-tokenization; decoding can skip the
//!   special ones;
//! - BOS is prepended by [`Tokenizer::encode`] with `add_special_tokens` only when the file says
//!   `tokenizer.ggml.add_bos_token = true` (a post-processor, so [`Tokenizer::save`] keeps it).
//!
//! For SmolLM2 ("smollm") this reproduces llama.cpp's `llama-tokenize` id for id on the Canterbury
//! texts (`tests/fixtures/tokenizer`). transformers' GGUF loader (5.23) has no "smollm" rule and
//! uses GPT-2's regex alone, so its ids differ where whitespace runs precede a digit (`"a  1"`:
//! `a|ĠĠ|1` here and in llama.cpp, `a|Ġ|Ġ|1` there), e.g. 140 fewer ids here on `lcet10.txt`.
//!
//! Text files are read with [`read_text_file`], which normalises line endings like Python's text
//! mode so token ids match the reference scripts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

/// GGUF `tokenizer.ggml.token_type` value of a control token (`<|im_start|>`, `<|endoftext|>`).
const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF `tokenizer.ggml.token_type` value of a user-defined token (matched whole, not special).
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// llama.cpp's Qwen2 pre-tokenizer regex (the `qwen2` tag). Contractions are spelled with explicit
/// case classes rather than `(?i:...)`, which would also fold characters like `ſ` or `K` (Kelvin).
const QWEN2_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

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

/// The `tokenizer.ggml.*` metadata of a GGUF whose `tokenizer.ggml.model` is `"gpt2"`, borrowed
/// from the file, needed to rebuild its byte-level BPE tokenizer.
#[derive(Debug, Clone)]
pub struct GgufBpe<'a> {
    /// `tokenizer.ggml.tokens`: token strings in the GPT-2 byte-to-unicode spelling; id = index.
    pub tokens: Vec<&'a str>,
    /// `tokenizer.ggml.merges`: `"left right"` pairs, highest priority first.
    pub merges: Vec<&'a str>,
    /// `tokenizer.ggml.token_type`, one per token (1 normal, 3 control, 4 user-defined, ...).
    /// Without it no token is matched whole in text.
    pub token_types: Option<Vec<i32>>,
    /// `tokenizer.ggml.pre`: which pre-tokenizer splits the text before BPE. `"smollm"` (single
    /// digits, then the GPT-2 regex), `"gpt-2"` / `"default"` or absent (the GPT-2 regex), `"qwen2"`
    /// (llama.cpp's Qwen2 regex); anything else is [`TokenizerError::UnknownPreTokenizer`].
    pub pre: Option<&'a str>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token` (false when absent): prepend BOS when encoding with special
    /// tokens.
    pub add_bos: bool,
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

    /// Rebuild the byte-level BPE tokenizer described by a GGUF's `tokenizer.ggml.*` metadata.
    ///
    /// Only for `tokenizer.ggml.model = "gpt2"`: the caller checks that first and reports any other
    /// model (`"llama"`, SentencePiece) as [`TokenizerError::UnsupportedModel`]. Fails with
    /// [`TokenizerError::UnknownPreTokenizer`] for an unknown `spec.pre`, and with
    /// [`TokenizerError::Build`] when the arrays are inconsistent (duplicate tokens, a merge of
    /// unknown tokens, `token_types` of the wrong length, special ids out of range).
    pub fn from_gguf_bpe(spec: GgufBpe<'_>) -> Result<Self, TokenizerError> {
        let pre_tokenizer = gguf_pre_tokenizer(spec.pre)?;
        let n = spec.tokens.len();
        if n == 0 {
            return Err(TokenizerError::Build("the vocabulary is empty".into()));
        }
        let n_u32 = u32::try_from(n)
            .map_err(|_| TokenizerError::Build(format!("{n} tokens do not fit u32 ids")))?;
        if let Some(types) = &spec.token_types {
            if types.len() != n {
                return Err(TokenizerError::Build(format!(
                    "{} token types for {n} tokens",
                    types.len()
                )));
            }
        }
        for (what, id) in [("bos", spec.bos_id), ("eos", spec.eos_id)] {
            if let Some(id) = id.filter(|&id| id >= n_u32) {
                return Err(TokenizerError::Build(format!(
                    "{what} id {id} is outside the vocabulary ({n} tokens)"
                )));
            }
        }
        if spec.add_bos && spec.bos_id.is_none() {
            return Err(TokenizerError::Build(
                "add_bos_token is set but there is no bos_token_id".into(),
            ));
        }

        let mut vocab = Vocab::with_capacity(n);
        for (id, token) in (0..n_u32).zip(&spec.tokens) {
            if let Some(first) = vocab.insert((*token).to_string(), id) {
                return Err(TokenizerError::Build(format!(
                    "token {token:?} appears twice (ids {first} and {id})"
                )));
            }
        }
        let merges = spec
            .merges
            .iter()
            .enumerate()
            .map(|(rank, merge)| match merge.split_once(' ') {
                Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => {
                    Ok((a.to_string(), b.to_string()))
                }
                _ => Err(TokenizerError::Build(format!(
                    "merge {rank} ({merge:?}) is not two tokens separated by one space"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| TokenizerError::Build(e.to_string()))?;

        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        if let (true, Some(bos)) = (spec.add_bos, spec.bos_id) {
            // A post-processor rather than a prepend in `encode`, so `save` keeps it. "BOS" is
            // only the template's name for the piece, not a token spelling.
            let spelling = spec.tokens[bos as usize].to_string();
            let bos_token = SpecialToken::new("BOS".into(), vec![bos], vec![spelling])
                .map_err(|e| TokenizerError::Build(e.to_string()))?;
            let template = TemplateProcessing::builder()
                .try_single("BOS $A:0")
                .and_then(|b| b.try_pair("BOS $A:0 BOS:1 $B:1"))
                .map_err(TokenizerError::Build)?
                .special_tokens(vec![bos_token])
                .build()
                .map_err(|e| TokenizerError::Build(e.to_string()))?;
            inner.with_post_processor(Some(template));
        }

        if let Some(types) = &spec.token_types {
            // `normalized(false)`: matched against the raw text, exactly as written in the vocab.
            // Each content is already a model token, so the added vocabulary reuses its id.
            let added = |kind: i32, special: bool| -> Vec<AddedToken> {
                spec.tokens
                    .iter()
                    .zip(types)
                    .filter(|(_, &t)| t == kind)
                    .map(|(token, _)| AddedToken::from(*token, special).normalized(false))
                    .collect()
            };
            inner.add_special_tokens(&added(TOKEN_TYPE_CONTROL, true));
            inner.add_tokens(&added(TOKEN_TYPE_USER_DEFINED, false));
        }

        let tokenizer = Self::assemble(inner, spec.bos_id, spec.eos_id);
        if tokenizer.vocab_size != n {
            // An added token got a fresh id instead of its own: the vocabulary would no longer
            // line up with the model's embedding rows.
            return Err(TokenizerError::Build(format!(
                "vocabulary grew from {n} to {} ids while adding special tokens",
                tokenizer.vocab_size
            )));
        }
        Ok(tokenizer)
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

/// Incremental decoding for streaming generation: feed one id at a time with
/// [`StreamDecoder::push`], get the text that id completed.
///
/// The concatenation of everything `push` and then [`StreamDecoder::flush`] return equals
/// [`Tokenizer::decode`] of all the ids pushed. A multi-byte UTF-8 character split across
/// byte-level tokens is held back until its last byte arrives; a byte sequence that can never be
/// valid UTF-8 comes out as U+FFFD as soon as that is certain.
#[derive(Debug)]
pub struct StreamDecoder<'t> {
    tokenizer: &'t Tokenizer,
    skip_special_tokens: bool,
    /// Byte-level tokenizers: bytes of a UTF-8 character not yet complete.
    pending_bytes: Vec<u8>,
    /// Other tokenizers: the ids already emitted that give context to the next ones (a WordPiece
    /// `##` piece or a Metaspace `▁` decodes differently at the start of a text) ...
    context_ids: Vec<u32>,
    /// ... how many of those ids are context (the rest are pending) ...
    context_len: usize,
    /// ... and the text of the context ids alone.
    context_text: String,
}

impl<'t> StreamDecoder<'t> {
    fn new(tokenizer: &'t Tokenizer, skip_special_tokens: bool) -> Self {
        Self {
            tokenizer,
            skip_special_tokens,
            pending_bytes: Vec::new(),
            context_ids: Vec::new(),
            context_len: 0,
            context_text: String::new(),
        }
    }

    /// Add one id; returns the newly completed text, or `None` while a character is incomplete
    /// (or the id was a skipped special token).
    pub fn push(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        let tok = self.tokenizer;
        if id as usize >= tok.vocab_size {
            return Err(tok.unknown_id(id));
        }
        if tok.byte_level {
            self.push_bytes(id)
        } else {
            self.push_generic(id)
        }
    }

    /// End of the stream: any incomplete character left over, as U+FFFD (the text
    /// [`Tokenizer::decode`] would give for it).
    pub fn flush(&mut self) -> Result<Option<String>, TokenizerError> {
        if self.tokenizer.byte_level {
            let had_pending = !self.pending_bytes.is_empty();
            self.pending_bytes.clear();
            return Ok(had_pending.then(|| char::REPLACEMENT_CHARACTER.to_string()));
        }
        if self.context_ids.len() == self.context_len {
            return Ok(None);
        }
        let text = self.decode_window()?;
        self.context_ids.clear();
        self.context_len = 0;
        let new = text
            .strip_prefix(self.context_text.as_str())
            .map(str::to_string)
            .ok_or_else(|| self.prefix_error(&text))?;
        self.context_text.clear();
        Ok((!new.is_empty()).then_some(new))
    }

    fn push_bytes(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        let inner = &self.tokenizer.inner;
        let token = inner
            .id_to_token(id)
            .ok_or_else(|| self.tokenizer.unknown_id(id))?;
        if self.skip_special_tokens && inner.get_added_vocabulary().is_special_token(&token) {
            return Ok(None);
        }
        // Same rule as the byte-level decoder: a token spelled entirely in the byte alphabet
        // stands for those bytes; any other token (an added token with e.g. a space) for its
        // own UTF-8.
        let table = unicode_to_byte();
        match token
            .chars()
            .map(|c| table.get(&c).copied())
            .collect::<Option<Vec<u8>>>()
        {
            Some(bytes) => self.pending_bytes.extend_from_slice(&bytes),
            None => self.pending_bytes.extend_from_slice(token.as_bytes()),
        }

        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending_bytes[start..]) {
                Ok(valid) => {
                    out.push_str(valid);
                    start = self.pending_bytes.len();
                    break;
                }
                Err(e) => {
                    let valid_end = start + e.valid_up_to();
                    // Safety of the unwrap: from_utf8 just said these bytes are valid.
                    out.push_str(
                        std::str::from_utf8(&self.pending_bytes[start..valid_end]).unwrap(),
                    );
                    match e.error_len() {
                        // Definitely invalid: one U+FFFD per maximal invalid sequence, like
                        // `String::from_utf8_lossy`.
                        Some(len) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start = valid_end + len;
                        }
                        // A character cut short at the end: wait for more bytes.
                        None => {
                            start = valid_end;
                            break;
                        }
                    }
                }
            }
        }
        self.pending_bytes.drain(..start);
        Ok((!out.is_empty()).then_some(out))
    }

    fn push_generic(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        self.context_ids.push(id);
        let text = self.decode_window()?;
        if text.len() <= self.context_text.len() || text.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(None);
        }
        let new = text
            .strip_prefix(self.context_text.as_str())
            .map(str::to_string)
            .ok_or_else(|| self.prefix_error(&text))?;
        // The ids just emitted become the context of the next ones.
        self.context_ids.drain(..self.context_len);
        self.context_len = self.context_ids.len();
        self.context_text = self.decode_window()?;
        Ok(Some(new))
    }

    fn decode_window(&self) -> Result<String, TokenizerError> {
        self.tokenizer
            .decode(&self.context_ids, self.skip_special_tokens)
    }

    fn prefix_error(&self, text: &str) -> TokenizerError {
        TokenizerError::Decode(format!(
            "stream decode: text {text:?} does not extend the already emitted {:?}",
            self.context_text
        ))
    }
}

/// The inverse of GPT-2's `bytes_to_unicode`: every byte is spelled as one printable character
/// (printable Latin-1 bytes as themselves, the others as U+0100 onwards, in byte order).
fn unicode_to_byte() -> &'static HashMap<char, u8> {
    static TABLE: OnceLock<HashMap<char, u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let mut next = 0x100u32;
        (0..=255u8)
            .map(|b| {
                let c = if printable(b) {
                    char::from(b)
                } else {
                    let c = char::from_u32(next).expect("U+0100..U+0143 are chars");
                    next += 1;
                    c
                };
                (c, b)
            })
            .collect()
    })
}

/// The pre-tokenizer llama.cpp uses for a `tokenizer.ggml.pre` tag.
fn gguf_pre_tokenizer(pre: Option<&str>) -> Result<PreTokenizerWrapper, TokenizerError> {
    // ByteLevel(add_prefix_space, trim_offsets, use_regex); with use_regex it applies the GPT-2
    // split `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
    let gpt2 = || ByteLevel::new(false, false, true);
    match pre.unwrap_or("default") {
        "default" | "gpt-2" | "gpt2" => Ok(gpt2().into()),
        // llama.cpp splits with `\p{N}` first, then the GPT-2 regex: every digit is its own
        // piece, and whitespace before a digit is no longer followed by a non-space.
        "smollm" => Ok(Sequence::new(vec![Digits::new(true).into(), gpt2().into()]).into()),
        "qwen2" => {
            let split = Split::new(
                SplitPattern::Regex(QWEN2_SPLIT.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| TokenizerError::Build(format!("qwen2 split regex: {e}")))?;
            Ok(Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, false, false).into(),
            ])
            .into())
        }
        other => Err(TokenizerError::UnknownPreTokenizer(other.to_string())),
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

/// Read a UTF-8 text file the way Python's text mode does: `\r\n` and a lone `\r` become `\n`
/// (a byte-order mark is kept, as with `encoding="utf-8"`).
///
/// Fails with [`TokenizerError::Io`] for a missing or unreadable file,
/// [`TokenizerError::NotUtf8`] for invalid UTF-8 and [`TokenizerError::EmptyFile`] for a file with
/// no bytes or only whitespace.
pub fn read_text_file(path: &Path) -> Result<String, TokenizerError> {
    let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8(bytes).map_err(|e| TokenizerError::NotUtf8 {
        path: path.to_path_buf(),
        valid_up_to: e.utf8_error().valid_up_to(),
    })?;
    if text.trim().is_empty() {
        return Err(TokenizerError::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    if text.contains('\r') {
        Ok(normalize_newlines(&text))
    } else {
        Ok(text)
    }
}

/// `\r\n` → `\n`, then a lone `\r` → `\n` (Python's universal newlines on read).
pub fn normalize_newlines(text: &str) -> String {
    text.replace("\r\n", "\n").replace('\r', "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 256 single-byte tokens in GPT-2 spelling, in byte order.
    fn byte_tokens() -> Vec<String> {
        let table = unicode_to_byte();
        let mut by_byte = vec!['\0'; 256];
        for (&c, &b) in table {
            by_byte[b as usize] = c;
        }
        by_byte.into_iter().map(String::from).collect()
    }

    /// A tiny byte-level BPE: 3 control tokens, the 256 bytes, and merges for "the", " the",
    /// " a", "ing", "日" (three bytes) and two spaces.
    fn tiny(pre: &str, add_bos: bool) -> Tokenizer {
        let mut tokens: Vec<String> = vec![
            "<|endoftext|>".into(),
            "<|im_start|>".into(),
            "<|im_end|>".into(),
        ];
        tokens.extend(byte_tokens());
        let merges = [
            "t h", "th e", "Ġ the", "Ġ a", "i n", "in g", "æ Ĺ", "æĹ ¥", "Ġ Ġ",
        ];
        for m in merges {
            tokens.push(m.replace(' ', ""));
        }
        let mut types = vec![3; 3];
        types.extend(std::iter::repeat_n(1, tokens.len() - 3));
        Tokenizer::from_gguf_bpe(GgufBpe {
            tokens: tokens.iter().map(String::as_str).collect(),
            merges: merges.to_vec(),
            token_types: Some(types),
            pre: Some(pre),
            bos_id: Some(1),
            eos_id: Some(2),
            add_bos,
        })
        .unwrap()
    }

    #[test]
    fn byte_table_is_gpt2() {
        let table = unicode_to_byte();
        assert_eq!(table.len(), 256);
        assert_eq!(table[&'Ġ'], b' ');
        assert_eq!(table[&'Ċ'], b'\n');
        assert_eq!(table[&'A'], b'A');
        assert_eq!(table[&'\u{100}'], 0);
        assert_eq!(table[&'\u{143}'], 0xAD);
    }

    #[test]
    fn round_trips_synthetic_strings() {
        let tok = tiny("smollm", false);
        assert_eq!(tok.vocab_size(), 3 + 256 + 9);
        for text in [
            "the thing",
            "  leading and trailing  ",
            "tabs\tand\r\nnewlines\n\n\n",
            "digits 12345 3.14159 and  007",
            "naïve café — ☕ 日本語 🦀",
            "I'll don't WE'RE",
            "<|im_start|>user\nHi<|im_end|>",
            "\u{0}\u{7f}\u{ad}",
        ] {
            let ids = tok.encode(text, true).unwrap();
            assert_eq!(tok.decode(&ids, false).unwrap(), text, "{ids:?}");
        }
    }

    #[test]
    fn applies_merges_and_special_tokens() {
        let tok = tiny("smollm", false);
        let id = |t: &str| tok.token_to_id(t).unwrap();
        assert_eq!(tok.encode("the", false).unwrap(), vec![id("the")]);
        assert_eq!(tok.encode(" the", false).unwrap(), vec![id("Ġthe")]);
        assert_eq!(tok.encode("日", false).unwrap(), vec![id("æĹ¥")]);
        let ids = tok.encode("<|im_start|>the<|im_end|>", false).unwrap();
        assert_eq!(ids, vec![1, id("the"), 2]);
        assert_eq!(tok.decode(&ids, true).unwrap(), "the");
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            "<|im_start|>the<|im_end|>"
        );
    }

    #[test]
    fn smollm_splits_digits_gpt2_does_not_merge_across() {
        let smollm = tiny("smollm", false);
        let gpt2 = tiny("gpt-2", false);
        let id = |t: &str| smollm.token_to_id(t).unwrap();
        // GPT-2's regex keeps " 1" together and `\s+(?!\S)` leaves one space for it; after the
        // digit split the run of spaces is one piece.
        assert_eq!(
            gpt2.encode("a  1", false).unwrap(),
            vec![id("a"), id("Ġ"), id("Ġ"), id("1")]
        );
        assert_eq!(
            smollm.encode("a  1", false).unwrap(),
            vec![id("a"), id("ĠĠ"), id("1")]
        );
        let ids = smollm.encode("12", false).unwrap();
        assert_eq!(ids, vec![id("1"), id("2")]);
    }

    #[test]
    fn qwen2_pre_tokenizer_builds_and_round_trips() {
        let tok = tiny("qwen2", false);
        let text = "Hello, World's 123 naïve\n\n  x";
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }

    #[test]
    fn bos_only_when_asked() {
        let with = tiny("smollm", true);
        assert_eq!(with.encode("the", true).unwrap()[0], 1);
        assert_eq!(with.encode("the", false).unwrap().len(), 1);
        let without = tiny("smollm", false);
        assert_eq!(without.encode("the", true).unwrap().len(), 1);
        assert_eq!(without.bos_id(), Some(1));
        assert_eq!(without.eos_id(), Some(2));
    }

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
    fn stream_decoder_on_wordpiece_matches_decode() {
        let dir = std::env::temp_dir().join(format!("s2lc-tokenizer-wp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        let special = |id: u32, content: &str| {
            serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        };
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [special(0, "[UNK]"), special(1, "[CLS]"), special(2, "[SEP]")],
            "normalizer": null, "pre_tokenizer": {"type": "BertPreTokenizer"}, "post_processor": null,
            "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
            "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                "max_input_chars_per_word": 100,
                "vocab": {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "hel": 3, "##lo": 4, "world": 5, "!": 6}}
        });
        std::fs::write(&path, json.to_string()).unwrap();
        let tok = Tokenizer::from_file(&path).unwrap();
        assert_eq!((tok.bos_id(), tok.eos_id()), (None, None));
        let mut ids = vec![1];
        ids.extend(tok.encode("hello world! hello", false).unwrap());
        ids.push(2);
        assert_eq!(ids, vec![1, 3, 4, 5, 6, 3, 4, 2]);
        for skip in [true, false] {
            let mut stream = if skip {
                tok.stream_decoder()
            } else {
                tok.stream_decoder_keeping_special()
            };
            let mut text = String::new();
            for &id in &ids {
                text.extend(stream.push(id).unwrap());
            }
            text.extend(stream.flush().unwrap());
            assert_eq!(text, tok.decode(&ids, skip).unwrap());
        }
        assert_eq!(tok.decode(&ids, true).unwrap(), "hello world! hello");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_bad_specs() {
        let tokens = byte_tokens();
        let spec = || GgufBpe {
            tokens: tokens.iter().map(String::as_str).collect(),
            merges: vec![],
            token_types: None,
            pre: Some("smollm"),
            bos_id: None,
            eos_id: None,
            add_bos: false,
        };
        assert!(Tokenizer::from_gguf_bpe(spec()).is_ok());
        let err = |s| Tokenizer::from_gguf_bpe(s).unwrap_err();
        assert!(
            matches!(err(GgufBpe { pre: Some("llama-bpe"), ..spec() }), TokenizerError::UnknownPreTokenizer(p) if p == "llama-bpe")
        );
        assert!(matches!(
            err(GgufBpe {
                merges: vec!["a"],
                ..spec()
            }),
            TokenizerError::Build(_)
        ));
        assert!(matches!(
            err(GgufBpe {
                merges: vec!["a b"],
                ..spec()
            }),
            TokenizerError::Build(_)
        ));
        assert!(matches!(
            err(GgufBpe {
                token_types: Some(vec![1]),
                ..spec()
            }),
            TokenizerError::Build(_)
        ));
        assert!(matches!(
            err(GgufBpe {
                bos_id: Some(256),
                ..spec()
            }),
            TokenizerError::Build(_)
        ));
        assert!(matches!(
            err(GgufBpe {
                add_bos: true,
                ..spec()
            }),
            TokenizerError::Build(_)
        ));
        let mut dup = spec();
        dup.tokens.push("a");
        assert!(matches!(err(dup), TokenizerError::Build(m) if m.contains("twice")));
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

    #[test]
    fn stream_decoder_holds_multibyte_chars() {
        let tok = tiny("smollm", false);
        // No merges for 本 or 🦀: one token per byte.
        let text = "a本🦀<|im_end|>日";
        let ids = tok.encode(text, false).unwrap();
        let mut stream = tok.stream_decoder_keeping_special();
        let pieces: Vec<Option<String>> = ids.iter().map(|&id| stream.push(id).unwrap()).collect();
        let expected: Vec<Option<&str>> = vec![
            Some("a"),
            None,
            None,
            Some("本"),
            None,
            None,
            None,
            Some("🦀"),
            Some("<|im_end|>"),
            Some("日"),
        ];
        assert_eq!(
            pieces.iter().map(Option::as_deref).collect::<Vec<_>>(),
            expected
        );
        assert_eq!(stream.flush().unwrap(), None);

        let mut skipping = tok.stream_decoder();
        let text: String = ids
            .iter()
            .filter_map(|&id| skipping.push(id).unwrap())
            .collect();
        assert_eq!(text, "a本🦀日");
    }

    #[test]
    fn stream_decoder_matches_decode_on_invalid_utf8() {
        let tok = tiny("smollm", false);
        let byte = |b: u8| tok.token_to_id(&byte_tokens()[b as usize]).unwrap();
        // A lead byte cut off by ASCII, a stray continuation byte, then a truncated character.
        let ids = [
            byte(0xE6),
            byte(b'x'),
            byte(0x80),
            byte(b'y'),
            byte(0xF0),
            byte(0x9F),
        ];
        let mut stream = tok.stream_decoder_keeping_special();
        let mut text = String::new();
        for &id in &ids {
            text.extend(stream.push(id).unwrap());
        }
        text.extend(stream.flush().unwrap());
        assert_eq!(text, tok.decode(&ids, false).unwrap());
        assert_eq!(text, "\u{FFFD}x\u{FFFD}y\u{FFFD}");
    }

    #[test]
    fn read_text_file_normalises_newlines() {
        let dir = std::env::temp_dir().join(format!("s2lc-tokenizer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("crlf.txt");
        std::fs::write(&file, b"a\r\nb\rc\n\r\n\r\rd\r").unwrap();
        assert_eq!(read_text_file(&file).unwrap(), "a\nb\nc\n\n\n\nd\n");

        let empty = dir.join("empty.txt");
        for blank in [&b""[..], b" \r\n\t\n"] {
            std::fs::write(&empty, blank).unwrap();
            assert!(matches!(
                read_text_file(&empty),
                Err(TokenizerError::EmptyFile { .. })
            ));
        }

        let latin1 = dir.join("latin1.txt");
        std::fs::write(&latin1, b"caf\xe9").unwrap();
        assert!(matches!(
            read_text_file(&latin1),
            Err(TokenizerError::NotUtf8 { valid_up_to: 3, .. })
        ));

        let missing = dir.join("missing.txt");
        let err = read_text_file(&missing).unwrap_err();
        assert!(matches!(err, TokenizerError::Io { .. }));
        assert!(err.to_string().contains("missing.txt"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
