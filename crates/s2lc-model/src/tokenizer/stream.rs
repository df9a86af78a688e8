//! Incremental decoding for streaming generation: text as soon as each token completes it.

use std::collections::HashMap;
use std::sync::OnceLock;

use super::{Tokenizer, TokenizerError};

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
    pub(super) fn new(tokenizer: &'t Tokenizer, skip_special_tokens: bool) -> Self {
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
pub(super) fn unicode_to_byte() -> &'static HashMap<char, u8> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::bpe::tests::{byte_tokens, tiny};

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
}
