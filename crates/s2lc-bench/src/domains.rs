//! Held-out evaluation on the real text domains from the command line (`--heldout`, `--seq`,
//! `--max-windows`), and the domain × model perplexity table `bench adapters` and `experts eval`
//! print. The split itself is [`s2lc_model::heldout`]'s token protocol.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use serde_json::Value;

use s2lc_model::heldout::{Domain, HeldoutSplit};
use s2lc_model::llama::LlamaModel;
use s2lc_model::tokenizer::Tokenizer;

/// How the held-out part of each text is chosen and scored.
#[derive(Args, Clone, Debug)]
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

impl HeldoutArgs {
    /// The split these flags describe.
    pub fn split(&self) -> HeldoutSplit {
        HeldoutSplit {
            fraction: self.heldout,
            seq: self.seq,
            max_windows: self.max_windows,
        }
    }

    /// Tokenizes each text and keeps its held-out windows.
    pub fn load(&self, tokenizer: &Tokenizer, texts: &[(String, PathBuf)]) -> Result<Vec<Domain>> {
        // The flags named as the user typed them (the library's own check names no flag).
        if !(self.heldout > 0.0 && self.heldout < 1.0) {
            bail!("--heldout {} is outside (0, 1)", self.heldout);
        }
        if self.seq < 2 || self.max_windows == 0 {
            bail!("--seq must be at least 2 and --max-windows at least 1");
        }
        Ok(self.split().load(tokenizer, texts)?)
    }

    /// Held-out perplexity of `model` on every domain.
    pub fn score(&self, model: &LlamaModel, domains: &[Domain]) -> Result<Vec<f64>> {
        Ok(self.split().score(model, domains)?)
    }

    /// The domains as JSON (name, path, split, tokens scored).
    pub fn domains_json(&self, domains: &[Domain]) -> Value {
        self.split().domains_json(domains)
    }

    /// Prints the title line of a table over the domains.
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
        let split = self.split();
        let parts: Vec<String> = domains
            .iter()
            .map(|d| format!("{} {}", d.name, split.scored(d)))
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
