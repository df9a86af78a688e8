//! Held-out evaluation on the real text domains, shared by `bench adapters` and `experts eval`:
//! the training script's split (the last fraction of each text's tokens), independent windows,
//! and the domain × model perplexity table.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

use s2lc_model::eval::perplexity;
use s2lc_model::llama::LlamaModel;
use s2lc_model::tokenizer::{read_text_file, Tokenizer};

use crate::s2lc_home;

/// How the held-out part of each text is chosen and scored.
#[derive(Args, Clone)]
pub struct HeldoutArgs {
    /// Held-out fraction at the end of each text (the training script's split).
    #[arg(long, default_value_t = 0.1)]
    pub heldout: f64,
    /// Tokens per independent evaluation window.
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// Most held-out windows scored per text.
    #[arg(long, default_value_t = 16)]
    pub max_windows: usize,
}

/// One text's held-out tokens.
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

/// The real text domains of `s2lc_model::assets::DOMAINS` under `$S2LC_HOME`.
pub fn default_texts() -> Vec<(String, PathBuf)> {
    let home = s2lc_home();
    s2lc_model::assets::DOMAINS
        .iter()
        .map(|(name, rel)| (name.to_string(), home.join(rel)))
        .collect()
}

/// `--text FILE` arguments as (name, path), the name being the file stem.
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

impl HeldoutArgs {
    /// Tokenizes each text and keeps its held-out windows.
    pub fn load(&self, tokenizer: &Tokenizer, texts: &[(String, PathBuf)]) -> Result<Vec<Domain>> {
        if !(self.heldout > 0.0 && self.heldout < 1.0) {
            bail!("--heldout {} is outside (0, 1)", self.heldout);
        }
        if self.seq < 2 || self.max_windows == 0 {
            bail!("--seq must be at least 2 and --max-windows at least 1");
        }
        let mut domains = Vec::new();
        for (name, path) in texts {
            let text = read_text_file(path).with_context(|| {
                format!("reading the text of '{name}' (run scripts/fetch-assets)")
            })?;
            let tokens = tokenizer
                .encode(&text, false)
                .with_context(|| format!("tokenizing {}", path.display()))?;
            let start = (tokens.len() as f64 * (1.0 - self.heldout)).floor() as usize;
            let windows = ((tokens.len() - start) / self.seq).min(self.max_windows);
            if windows == 0 {
                bail!(
                    "{}: {} held-out tokens, fewer than one window of {}",
                    path.display(),
                    tokens.len() - start,
                    self.seq
                );
            }
            domains.push(Domain {
                name: name.clone(),
                path: path.clone(),
                start,
                tokens: tokens[start..start + windows * self.seq].to_vec(),
            });
        }
        Ok(domains)
    }

    /// Held-out perplexity of `model` on every domain.
    pub fn score(&self, model: &LlamaModel, domains: &[Domain]) -> Result<Vec<f64>> {
        domains
            .iter()
            .map(|d| {
                Ok(perplexity(model, &d.tokens, self.seq, self.seq, |_, _| {})
                    .with_context(|| format!("scoring {}", d.path.display()))?
                    .perplexity())
            })
            .collect()
    }

    /// Tokens scored per window (the first of each window is not predicted).
    fn scored(&self, d: &Domain) -> usize {
        d.tokens.len() - d.tokens.len() / self.seq
    }

    /// The domains as JSON (name, path, split, tokens scored).
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

    /// Prints the title line of a table over `domains`.
    pub fn print_title(&self, what: &str) {
        println!(
            "{what} (last {:.0} % of each text, up to {} windows of {}; * = own domain)",
            self.heldout * 100.0,
            self.max_windows,
            self.seq
        );
    }

    /// Prints how many tokens each domain scored.
    pub fn print_scored(&self, domains: &[Domain]) {
        let parts: Vec<String> = domains
            .iter()
            .map(|d| format!("{} {}", d.name, self.scored(d)))
            .collect();
        println!("tokens scored per domain: {}", parts.join(", "));
    }
}

/// One model's row of a domain table.
pub struct Row {
    /// Model label.
    pub label: String,
    /// Values of the extra columns.
    pub extra: Vec<String>,
    /// Perplexity per domain.
    pub ppl: Vec<f64>,
    /// The domain this model was trained on.
    pub own: Option<usize>,
}

/// Prints the base perplexities and, per row, the change against them (own domain starred);
/// returns a message for every row that does not beat the base on its own domain.
pub fn print_table(
    domains: &[Domain],
    extra: &[(&str, usize)],
    base: &[f64],
    rows: &[Row],
) -> Vec<String> {
    let head = |label: &str, cells: &[String]| {
        print!("{label:<18}");
        for ((_, w), c) in extra.iter().zip(cells) {
            print!(" {c:>w$}");
        }
    };
    head(
        "model",
        &extra.iter().map(|(h, _)| h.to_string()).collect::<Vec<_>>(),
    );
    for d in domains {
        print!(" {:>11}", d.name);
    }
    println!();
    head("(base)", &vec!["-".to_string(); extra.len()]);
    for p in base {
        print!(" {p:>11.3}");
    }
    println!();
    let mut failures = Vec::new();
    for r in rows {
        head(&r.label, &r.extra);
        for (i, (p, b)) in r.ppl.iter().zip(base).enumerate() {
            let mark = if r.own == Some(i) { "*" } else { " " };
            print!(" {:>10}{mark}", format!("{:+.1}%", (p / b - 1.0) * 100.0));
        }
        println!();
        if let Some(i) = r.own {
            if r.ppl[i] >= base[i] {
                failures.push(format!(
                    "{} does not beat the base on its own domain {} ({:.3} vs {:.3})",
                    r.label, domains[i].name, r.ppl[i], base[i]
                ));
            }
        }
    }
    failures
}

/// Index of the domain whose text is `text` (a file name, or a path whose last two components
/// must match).
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
