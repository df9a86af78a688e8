//! Held-out text: the part of each real text domain no adapter, expert or route centroid was
//! built from, and how it is scored.
//!
//! Two protocols exist and must stay distinct, because committed figures were measured with each:
//!
//! - **Tokens** ([`HeldoutSplit`]): the last `fraction` of a text's *tokens*, scored in
//!   independent windows. This is the split of the adapter/expert training script
//!   (`train_adapters.py` holds out the last 10 % of the token stream), so perplexity of an
//!   adapter on its own domain is measured on tokens it never saw. Used by `bench adapters`,
//!   `bench pack` and `experts eval`.
//! - **Characters** ([`split_chars`]): the last `fraction` of a text's *characters*. The Context
//!   Router embeds raw text (a different tokenizer, MiniLM's), so its centroids and its held-out
//!   paragraphs are cut from the text itself, before any tokenizer. Used by `router build|eval|
//!   morph` and `bench encoder`.
//!
//! The two cuts land a few dozen characters apart on the same text; moving either would change
//! which text the committed figures were scored on.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::error::ModelError;
use crate::eval::perplexity;
use crate::llama::LlamaModel;
use crate::tokenizer::{read_text_file, Tokenizer, TokenizerError};

/// What can go wrong choosing or scoring held-out text.
#[derive(Debug, thiserror::Error)]
pub enum HeldoutError {
    /// The split's parameters are out of range.
    #[error("invalid held-out split: {0}")]
    Invalid(String),
    /// A domain's text could not be read or tokenized.
    #[error("the text of '{name}' (run scripts/fetch-assets)")]
    Text {
        /// Domain name.
        name: String,
        /// What failed.
        source: TokenizerError,
    },
    /// A domain's held-out part is shorter than one window.
    #[error("'{name}': {tokens} held-out tokens, fewer than one window of {seq}")]
    TooShort {
        /// Domain name.
        name: String,
        /// Held-out tokens available.
        tokens: usize,
        /// Tokens per window.
        seq: usize,
    },
    /// Scoring failed.
    #[error("scoring '{name}'")]
    Score {
        /// Domain name.
        name: String,
        /// What the model said.
        source: ModelError,
    },
}

/// The token protocol: the last `fraction` of each text's tokens, in up to `max_windows`
/// independent windows of `seq` tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HeldoutSplit {
    /// Held-out fraction at the end of each text, in (0, 1).
    pub fraction: f64,
    /// Tokens per independent evaluation window (at least 2).
    pub seq: usize,
    /// Most held-out windows scored per text (at least 1).
    pub max_windows: usize,
}

/// One text's held-out tokens.
#[derive(Clone, Debug)]
pub struct Domain {
    /// Domain name.
    pub name: String,
    /// The text file.
    pub path: PathBuf,
    /// Token index where the held-out part starts.
    pub start: usize,
    /// `windows × seq` held-out tokens.
    pub tokens: Vec<u32>,
}

impl HeldoutSplit {
    /// Checks the parameters' ranges.
    pub fn check(&self) -> Result<(), HeldoutError> {
        if !(self.fraction > 0.0 && self.fraction < 1.0) {
            return Err(HeldoutError::Invalid(format!(
                "held-out fraction {} is outside (0, 1)",
                self.fraction
            )));
        }
        if self.seq < 2 || self.max_windows == 0 {
            return Err(HeldoutError::Invalid(
                "windows need at least 2 tokens and at least 1 window".into(),
            ));
        }
        Ok(())
    }

    /// Token index where the held-out part of a text of `n_tokens` tokens starts.
    pub fn start(&self, n_tokens: usize) -> usize {
        (n_tokens as f64 * (1.0 - self.fraction)).floor() as usize
    }

    /// The held-out windows of already tokenized text.
    pub fn domain(&self, name: &str, path: &Path, tokens: &[u32]) -> Result<Domain, HeldoutError> {
        self.check()?;
        let start = self.start(tokens.len());
        let windows = ((tokens.len() - start) / self.seq).min(self.max_windows);
        if windows == 0 {
            return Err(HeldoutError::TooShort {
                name: name.to_string(),
                tokens: tokens.len() - start,
                seq: self.seq,
            });
        }
        Ok(Domain {
            name: name.to_string(),
            path: path.to_path_buf(),
            start,
            tokens: tokens[start..start + windows * self.seq].to_vec(),
        })
    }

    /// Reads and tokenizes each `(name, path)` text and keeps its held-out windows.
    pub fn load(
        &self,
        tokenizer: &Tokenizer,
        texts: &[(String, PathBuf)],
    ) -> Result<Vec<Domain>, HeldoutError> {
        self.check()?;
        texts
            .iter()
            .map(|(name, path)| {
                let text_err = |source| HeldoutError::Text {
                    name: name.clone(),
                    source,
                };
                let text = read_text_file(path).map_err(text_err)?;
                let tokens = tokenizer.encode(&text, false).map_err(text_err)?;
                self.domain(name, path, &tokens)
            })
            .collect()
    }

    /// Held-out perplexity of `model` on every domain.
    pub fn score(&self, model: &LlamaModel, domains: &[Domain]) -> Result<Vec<f64>, HeldoutError> {
        domains
            .iter()
            .map(|d| {
                perplexity(model, &d.tokens, self.seq, self.seq, |_, _| {})
                    .map(|r| r.perplexity())
                    .map_err(|source| HeldoutError::Score {
                        name: d.name.clone(),
                        source,
                    })
            })
            .collect()
    }

    /// Tokens scored in a domain (the first token of each window is not predicted).
    pub fn scored(&self, d: &Domain) -> usize {
        d.tokens.len() - d.tokens.len() / self.seq
    }

    /// The domains as JSON (name, path, split, tokens scored), as the bench reports write them.
    pub fn domains_json(&self, domains: &[Domain]) -> Value {
        domains
            .iter()
            .map(|d| {
                json!({
                    "name": d.name,
                    "path": d.path,
                    "heldout_start_token": d.start,
                    "tokens_scored": self.scored(d),
                })
            })
            .collect()
    }
}

/// The character protocol: `text` cut into (training part, held-out part) at the first character
/// boundary at or after `(1 − fraction) × len` bytes. See the module documentation for why the
/// router's split is by characters and not by tokens.
pub fn split_chars(text: &str, fraction: f64) -> (&str, &str) {
    let mut cut = (((1.0 - fraction) * text.len() as f64) as usize).min(text.len());
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    text.split_at(cut)
}

/// The real text domains of [`crate::assets::DOMAINS`] under `$S2LC_HOME`, as (name, path).
pub fn default_texts() -> Vec<(String, PathBuf)> {
    let home = crate::assets::home();
    crate::assets::DOMAINS
        .iter()
        .map(|(name, rel)| (name.to_string(), home.join(rel)))
        .collect()
}

/// Text files as (name, path) domains, each named by its file stem.
pub fn named_texts(paths: &[PathBuf]) -> Vec<(String, PathBuf)> {
    paths
        .iter()
        .map(|p| {
            let name = p.file_stem().map_or_else(
                || p.display().to_string(),
                |s| s.to_string_lossy().into_owned(),
            );
            (name, p.clone())
        })
        .collect()
}

/// Index of the domain whose text is `text` (a file name, or a path whose last two components
/// must match): how an adapter's or expert's recorded training text is matched to a domain.
pub fn domain_of_text(text: &str, domains: &[Domain]) -> Option<usize> {
    let text = Path::new(text);
    let parent = |p: &Path| p.parent().and_then(Path::file_name).map(|s| s.to_owned());
    domains.iter().position(|d| {
        d.path.file_name() == text.file_name()
            && (text.parent().is_none_or(|p| p.as_os_str().is_empty())
                || parent(&d.path) == parent(text))
    })
}

/// The domain a trained adapter directory belongs to: the text named by its
/// `s2lc_training.json` (`args.text`, written by `train_adapters.py`) or, for a committed fixture,
/// its `reference.json` (`text`).
pub fn adapter_domain(dir: &Path, domains: &[Domain]) -> Option<usize> {
    let read = |file: &str| -> Option<Value> {
        serde_json::from_str(&std::fs::read_to_string(dir.join(file)).ok()?).ok()
    };
    let text = read("s2lc_training.json")
        .and_then(|r| r["args"]["text"].as_str().map(str::to_string))
        .or_else(|| read("reference.json").and_then(|r| r["text"].as_str().map(str::to_string)))?;
    domain_of_text(&text, domains)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split() -> HeldoutSplit {
        HeldoutSplit {
            fraction: 0.1,
            seq: 4,
            max_windows: 2,
        }
    }

    #[test]
    fn the_token_split_keeps_whole_windows_of_the_last_fraction() {
        let tokens: Vec<u32> = (0..100).collect();
        let d = split()
            .domain("t", Path::new("t.txt"), &tokens)
            .expect("domain");
        assert_eq!(d.start, 90);
        assert_eq!(d.tokens, (90..98).collect::<Vec<u32>>());
        assert_eq!(split().scored(&d), 6);
        let short = split().domain("t", Path::new("t.txt"), &tokens[..30]);
        assert!(matches!(
            short,
            Err(HeldoutError::TooShort { tokens: 3, .. })
        ));
    }

    #[test]
    fn out_of_range_splits_are_refused() {
        for fraction in [0.0, 1.0, -0.5] {
            let s = HeldoutSplit {
                fraction,
                ..split()
            };
            assert!(
                matches!(s.check(), Err(HeldoutError::Invalid(_))),
                "{fraction}"
            );
        }
        let s = HeldoutSplit { seq: 1, ..split() };
        assert!(s.check().is_err());
    }

    #[test]
    fn the_character_split_lands_on_a_char_boundary() {
        let text = "aé".repeat(10); // 30 bytes, 'é' is two
        let (train, held) = split_chars(&text, 0.5);
        assert_eq!(train.len() + held.len(), text.len());
        assert_eq!(train.len(), 15);
        let (train, held) = split_chars("abcdefghij", 0.0);
        assert_eq!((train, held), ("abcdefghij", ""));
    }

    #[test]
    fn texts_match_domains_by_name_and_parent() {
        let domain = |p: &str| Domain {
            name: p.into(),
            path: PathBuf::from(p),
            start: 0,
            tokens: Vec::new(),
        };
        let domains = [domain("/a/canterbury/alice29.txt"), domain("/a/code/x.py")];
        assert_eq!(domain_of_text("alice29.txt", &domains), Some(0));
        assert_eq!(
            domain_of_text("text/canterbury/alice29.txt", &domains),
            Some(0)
        );
        assert_eq!(domain_of_text("other/alice29.txt", &domains), None);
        assert_eq!(
            named_texts(&[PathBuf::from("/t/plrabn12.txt")])[0].0,
            "plrabn12"
        );
    }
}
