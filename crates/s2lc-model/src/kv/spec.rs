//! The `--kv` cache specification: parsing `dense` / `spectral|q8|q4[:key=value,…]`, checking it
//! against a model's attention shape and building the cache it names.

use super::coding::GROUP;
use super::compressed::CompressedKvCache;
use super::{AttnShape, KvCache};
use crate::error::ModelError;

/// How a segment of keys or values is stored once it leaves the dense window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Coding {
    /// Rank-`r` factors per KV head (see [`super::coding`]): `r` is the smallest rank keeping
    /// `energy` of the squared Frobenius norm, at most `max_rank`.
    Spectral {
        /// Share of the block's energy kept, in (0, 1].
        energy: f32,
        /// Upper bound of the rank (≤ head_dim).
        max_rank: usize,
    },
    /// int8 per group of 32 along the head dimension with an f16 scale (34 bytes per group, as
    /// llama.cpp's `q8_0`).
    Q8,
    /// Symmetric 4-bit per group of 32 (values −7..7) with an f16 scale (18 bytes per group, as
    /// llama.cpp's `q4_0`).
    Q4,
}

impl Coding {
    fn name(&self) -> String {
        match self {
            Coding::Spectral { energy, max_rank } if *max_rank == usize::MAX => {
                format!("spectral(energy={energy})")
            }
            Coding::Spectral { energy, max_rank } => {
                format!("spectral(energy={energy},rank≤{max_rank})")
            }
            Coding::Q8 => "q8".into(),
            Coding::Q4 => "q4".into(),
        }
    }
}

/// A cache configuration as given on the command line: `dense`, or
/// `spectral|q8|q4[:key=value,…]` with keys `energy`, `rank`, `block`, `window`, `keys`,
/// `values` (the last two override the coding of one side: `spectral`, `q8` or `q4`).
#[derive(Debug, Clone, PartialEq)]
pub enum KvSpec {
    /// The dense f32 cache.
    Dense,
    /// A [`CompressedKvCache`].
    Compressed(CompressedConfig),
}

/// Parameters of a [`CompressedKvCache`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompressedConfig {
    /// Coding of key segments.
    pub keys: Coding,
    /// Coding of value segments.
    pub values: Coding,
    /// Tokens per compressed segment (a multiple of 32).
    pub block: usize,
    /// Recent tokens always kept dense.
    pub window: usize,
    /// First tokens of the sequence kept exact (f32) forever: attention sinks, whose keys are
    /// outliers that would take most of their block's spectral energy.
    pub sink: usize,
}

impl CompressedConfig {
    /// Default segment length of the spectral coding.
    pub const DEFAULT_BLOCK: usize = 512;
    /// Default dense window of the spectral coding.
    pub const DEFAULT_WINDOW: usize = 256;
    /// Default attention sinks kept exact by the spectral coding.
    pub const DEFAULT_SINK: usize = 4;
    /// Default kept energy of the spectral coding.
    pub const DEFAULT_ENERGY: f32 = 0.99;
}

impl KvSpec {
    /// Parses a spec such as `spectral:energy=0.95,block=512,window=256` (see [`KvSpec`]).
    /// Values that depend on the model (rank vs head size) are checked by [`KvSpec::check`].
    pub fn parse(spec: &str) -> Result<Self, ModelError> {
        let bad = |msg: String| ModelError::InvalidConfig(format!("--kv {spec}: {msg}"));
        let (kind, opts) = spec.split_once(':').unwrap_or((spec, ""));
        let kind = kind.trim();
        if kind == "dense" {
            if !opts.is_empty() {
                return Err(bad("the dense cache takes no options".into()));
            }
            return Ok(KvSpec::Dense);
        }
        let (mut energy, mut rank): (Option<f32>, Option<usize>) = (None, None);
        let (mut keys, mut values) = (None, None);
        let (mut block, mut window, mut sink) = (None, None, None);
        for opt in opts.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let (key, value) = opt
                .split_once('=')
                .ok_or_else(|| bad(format!("option '{opt}' is not key=value")))?;
            let number = |what: &str| -> Result<usize, ModelError> {
                value
                    .parse()
                    .map_err(|_| bad(format!("{what} '{value}' is not a whole number")))
            };
            match key {
                "energy" => {
                    let e: f32 = value
                        .parse()
                        .map_err(|_| bad(format!("energy '{value}' is not a number")))?;
                    if !(e > 0.0 && e <= 1.0) {
                        return Err(bad(format!("energy {value} is outside (0, 1]")));
                    }
                    energy = Some(e);
                }
                "rank" => rank = Some(number("rank")?),
                "block" => block = Some(number("block")?),
                "sink" => sink = Some(number("sink")?),
                "window" => window = Some(number("window")?),
                "keys" | "values" => {
                    let side = match value {
                        "spectral" | "q8" | "q4" => value,
                        _ => {
                            return Err(bad(format!("{key}={value}: expected spectral, q8 or q4")))
                        }
                    };
                    if key == "keys" {
                        keys = Some(side);
                    } else {
                        values = Some(side);
                    }
                }
                _ => {
                    return Err(bad(format!(
                    "unknown option '{key}' (expected energy, rank, block, window, sink, keys, values)"
                )))
                }
            }
        }
        if !matches!(kind, "spectral" | "q8" | "q4") {
            return Err(bad(format!(
                "unknown cache '{kind}' (expected dense, spectral, q8 or q4)"
            )));
        }
        if rank == Some(0) {
            return Err(bad("rank must be at least 1".into()));
        }
        let spectral = Coding::Spectral {
            // A fixed rank alone means exactly that rank; otherwise 99 % energy by default.
            energy: energy.unwrap_or(if rank.is_some() {
                1.0
            } else {
                CompressedConfig::DEFAULT_ENERGY
            }),
            max_rank: rank.unwrap_or(usize::MAX),
        };
        let coding = |name: &str| match name {
            "spectral" => spectral,
            "q8" => Coding::Q8,
            _ => Coding::Q4,
        };
        let (default_block, default_window) = if kind == "spectral" {
            (
                CompressedConfig::DEFAULT_BLOCK,
                CompressedConfig::DEFAULT_WINDOW,
            )
        } else {
            // Plain quantization gains nothing from long segments or a window.
            (GROUP, 0)
        };
        let config = CompressedConfig {
            keys: coding(keys.unwrap_or(kind)),
            values: coding(values.unwrap_or(kind)),
            block: block.unwrap_or(default_block),
            window: window.unwrap_or(default_window),
            // Spectral keys without the sinks lost 1.5 % perplexity on SmolLM2 (docs/results.md).
            sink: sink.unwrap_or(if kind == "spectral" {
                CompressedConfig::DEFAULT_SINK
            } else {
                0
            }),
        };
        if config.block == 0 || config.block % GROUP != 0 {
            return Err(bad(format!(
                "block {} is not a positive multiple of {GROUP}",
                config.block
            )));
        }
        let spectral_side = [config.keys, config.values]
            .iter()
            .any(|c| matches!(c, Coding::Spectral { .. }));
        if let Some(rank) = rank.filter(|r| spectral_side && *r > config.block) {
            return Err(bad(format!(
                "rank {rank} is larger than the block of {} tokens",
                config.block
            )));
        }
        Ok(KvSpec::Compressed(config))
    }

    /// The spec in words (`dense`, or the codings, block and window).
    pub fn name(&self) -> String {
        match self {
            KvSpec::Dense => "dense f32".into(),
            KvSpec::Compressed(c) => c.to_string(),
        }
    }

    /// Checks the spec against a model's attention shape (head size vs rank and groups) and
    /// returns the cache configuration with the rank bound resolved.
    pub fn check(&self, shape: AttnShape) -> Result<Option<CompressedConfig>, ModelError> {
        let KvSpec::Compressed(mut config) = *self else {
            return Ok(None);
        };
        let hd = shape.head_dim;
        for side in [&mut config.keys, &mut config.values] {
            match side {
                Coding::Spectral { max_rank, .. } => {
                    if *max_rank == usize::MAX {
                        *max_rank = hd;
                    } else if *max_rank > hd {
                        return Err(ModelError::InvalidConfig(format!(
                            "--kv: rank {max_rank} is larger than the head size {hd}"
                        )));
                    }
                }
                Coding::Q8 | Coding::Q4 => {
                    if hd % GROUP != 0 {
                        return Err(ModelError::InvalidConfig(format!(
                            "--kv: head size {hd} is not a multiple of the quantization group {GROUP}"
                        )));
                    }
                }
            }
        }
        Ok(Some(config))
    }

    /// A cache for `n_layers` layers of `shape` holding at most `limit` tokens.
    pub fn cache(
        &self,
        n_layers: usize,
        shape: AttnShape,
        limit: usize,
    ) -> Result<Box<dyn KvCache>, ModelError> {
        Ok(match self.check(shape)? {
            None => Box::new(super::DenseKvCache::new(n_layers, shape, limit)),
            Some(config) => Box::new(CompressedKvCache::new(n_layers, shape, config)),
        })
    }
}

impl std::fmt::Display for CompressedConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "keys {}, values {}, block {}, window {}",
            self.keys.name(),
            self.values.name(),
            self.block,
            self.window
        )?;
        if self.sink > 0 {
            write!(f, ", sink {}", self.sink)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::testutil::{spec, SHAPE};

    #[test]
    fn specs_parse_and_bad_ones_name_the_problem() {
        assert_eq!(KvSpec::parse("dense").unwrap(), KvSpec::Dense);
        let c = spec("spectral");
        assert_eq!(
            c.keys,
            Coding::Spectral {
                energy: 0.99,
                max_rank: 64
            }
        );
        assert_eq!((c.block, c.window), (512, 256));
        let c = spec("spectral:energy=0.9,rank=16,block=256,window=64,values=q4");
        assert_eq!(
            c.keys,
            Coding::Spectral {
                energy: 0.9,
                max_rank: 16
            }
        );
        assert_eq!((c.values, c.block, c.window), (Coding::Q4, 256, 64));
        let c = spec("q8");
        assert_eq!(
            (c.keys, c.values, c.block, c.window),
            (Coding::Q8, Coding::Q8, 32, 0)
        );
        for (bad, needle) in [
            ("spectral:energy=0", "outside (0, 1]"),
            ("spectral:energy=1.5", "outside (0, 1]"),
            ("spectral:block=100", "multiple of 32"),
            ("spectral:block=0", "multiple of 32"),
            ("spectral:rank=600,block=512", "larger than the block"),
            ("spectral:rank=0", "at least 1"),
            ("spectral:foo=1", "unknown option 'foo'"),
            ("spectral:energy", "not key=value"),
            ("svd", "unknown cache 'svd'"),
            ("dense:block=32", "no options"),
            ("spectral:values=f32", "expected spectral, q8 or q4"),
        ] {
            let err = KvSpec::parse(bad).unwrap_err().to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
        let err = KvSpec::parse("spectral:rank=65")
            .unwrap()
            .check(SHAPE)
            .unwrap_err()
            .to_string();
        assert!(err.contains("larger than the head size 64"), "{err}");
    }
}
