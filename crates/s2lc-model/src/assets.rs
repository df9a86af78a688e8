//! Where `scripts/fetch-assets` puts the real assets, so the CLI, tests and benches agree.

use std::path::PathBuf;

/// `$S2LC_HOME`, default `~/.cache/s2lc`.
pub fn home() -> PathBuf {
    std::env::var_os("S2LC_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/s2lc")
        })
}

/// The SmolLM2-135M-Instruct GGUF (the default model) under [`home`].
pub fn smollm2() -> PathBuf {
    home().join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// all-MiniLM-L6-v2 (the Context Router's sentence encoder, Hugging Face layout) under [`home`].
pub fn minilm() -> PathBuf {
    home().join("models/all-MiniLM-L6-v2")
}

/// The real text domains of the adapter set: name and path under [`home`] (Canterbury texts and
/// the documentation corpora that `scripts/fetch-assets` builds).
pub const DOMAINS: [(&str, &str); 6] = [
    ("shakespeare", "text/canterbury/asyoulik.txt"),
    ("milton", "text/canterbury/plrabn12.txt"),
    ("carroll", "text/canterbury/alice29.txt"),
    ("techreport", "text/canterbury/lcet10.txt"),
    ("python", "text/domains/python.txt"),
    ("linux", "text/domains/linux.txt"),
];
