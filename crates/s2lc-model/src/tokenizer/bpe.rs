//! The byte-level BPE tokenizer a GGUF describes (`tokenizer.ggml.model = "gpt2"`), rebuilt on
//! the `tokenizers` crate.
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

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use super::{Tokenizer, TokenizerError};

/// GGUF `tokenizer.ggml.token_type` value of a control token (`<|im_start|>`, `<|endoftext|>`).
const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF `tokenizer.ggml.token_type` value of a user-defined token (matched whole, not special).
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// llama.cpp's Qwen2 pre-tokenizer regex (the `qwen2` tag). Contractions are spelled with explicit
/// case classes rather than `(?i:...)`, which would also fold characters like `ſ` or `K` (Kelvin).
const QWEN2_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

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

impl Tokenizer {
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::tokenizer::stream::unicode_to_byte;

    /// The 256 single-byte tokens in GPT-2 spelling, in byte order.
    pub(crate) fn byte_tokens() -> Vec<String> {
        let table = unicode_to_byte();
        let mut by_byte = vec!['\0'; 256];
        for (&c, &b) in table {
            by_byte[b as usize] = c;
        }
        by_byte.into_iter().map(String::from).collect()
    }

    /// A tiny byte-level BPE: 3 control tokens, the 256 bytes, and merges for "the", " the",
    /// " a", "ing", "日" (three bytes) and two spaces.
    pub(crate) fn tiny(pre: &str, add_bos: bool) -> Tokenizer {
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
}
