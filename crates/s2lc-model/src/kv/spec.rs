//! The `--kv` cache specification: parsing `dense` / `spectral|q8|q4[:key=value,…]`,
//! checking it against a model's attention shape and building the cache it names.

use super::coding::block_cost;
use super::compressed::CompressedKvCache;
use super::quant::GROUP;
use super::recent::RecentDtype;
use super::{AttnShape, KvCache};
use crate::error::ModelError;

/// How a spectral side chooses the components it keeps (see [`super::coding`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RankSelect {
    /// The fewest components keeping this share of the block's energy `‖X‖²_F`, in (0, 1].
    Energy(f32),
    /// Keys: the fewest components whose dropped share of the attention-score energy on the
    /// recent queries is at most this, in (0, 1).
    Score(f32),
    /// A byte budget: `bits` per cached value on average over the blocks compressed at the same
    /// time (every layer and KV head), spent on the components with the largest gains.
    Bits {
        /// Bits per value.
        bits: f32,
        /// Gains by attention-score energy on the recent queries (keys) instead of energy.
        score: bool,
    },
}

/// A spectral side's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpectralCoding {
    /// How components are chosen.
    pub select: RankSelect,
    /// Upper bound of the rank (≤ head_dim once checked).
    pub max_rank: usize,
    /// Bits per coefficient: 8 or 4.
    pub coef_bits: u32,
    /// Bits per basis value: 16 (f16) or 8 (int8 with a scale per row).
    pub basis_bits: u32,
}

/// How a segment of keys or values is stored once it leaves the dense window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Coding {
    /// Spectral blocks per KV head (see [`super::coding`]).
    Spectral(SpectralCoding),
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
            Coding::Spectral(c) => {
                let mut s = match c.select {
                    RankSelect::Energy(e) => format!("spectral(energy={e}"),
                    RankSelect::Score(e) => format!("spectral(score error≤{e}"),
                    RankSelect::Bits { bits, score } => format!(
                        "spectral({bits} bits/value by {}",
                        if score { "score" } else { "energy" }
                    ),
                };
                if c.max_rank != usize::MAX {
                    s += &format!(",rank≤{}", c.max_rank);
                }
                if c.coef_bits != 8 {
                    s += &format!(",int{} coef", c.coef_bits);
                }
                if c.basis_bits != 16 {
                    s += ",int8 basis";
                }
                s + ")"
            }
            Coding::Q8 => "q8".into(),
            Coding::Q4 => "q4".into(),
        }
    }

    /// The coding of a side name: `spectral` (with `spectral`'s parameters), `q8`, `q4`.
    fn side(name: &str, spectral: Coding) -> Option<Coding> {
        match name {
            "spectral" => Some(spectral),
            "q8" => Some(Coding::Q8),
            "q4" => Some(Coding::Q4),
            _ => None,
        }
    }
}

/// Side codings a spec can name.
const SIDES: &str = "spectral, q8, q4";
/// Cache kinds a spec can name.
const KINDS: &str = "dense, spectral, q8, q4";
/// Options of a compressed spec.
const OPTIONS: &str =
    "energy, rank, kscore, kbits, by, vbits, coef, basis, block, window, recent, sink, keys, values";

/// A cache configuration as given on the command line: `dense`, or
/// `spectral|q8|q4[:key=value,…]`. Options: `energy`, `rank`, `kscore` (keys ranked by
/// attention-score error), `kbits` / `vbits` (a byte budget per side, in bits per value; keys by
/// attention-score gains unless `by=energy`), `coef`
/// (8 or 4 bits), `basis` (`f16` or `q8`), `block`, `window`, `recent` (the window's storage:
/// `f32`, `f16` or `q8`), `sink`, and `keys` / `values` overriding the coding of one side
/// (`spectral`, `q8`, `q4`).
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
    /// Recent tokens always kept uncompressed.
    pub window: usize,
    /// Storage of the window's committed rows.
    pub recent: RecentDtype,
    /// First tokens of the sequence kept exact (f32) forever: attention sinks, whose keys are
    /// outliers that would take most of their block's spectral energy.
    pub sink: usize,
}

impl CompressedConfig {
    /// Default segment length of the spectral coding.
    pub const DEFAULT_BLOCK: usize = 512;
    /// Default window of the spectral coding.
    pub const DEFAULT_WINDOW: usize = 256;
    /// Default attention sinks kept exact by the spectral coding.
    pub const DEFAULT_SINK: usize = 4;
    /// Default segment length of plain quantization (q8, q4).
    pub const QUANT_BLOCK: usize = 256;
    /// Default kept energy of the spectral coding.
    pub const DEFAULT_ENERGY: f32 = 0.99;

    /// Whether the key coding ranks components by attention-score error, so the cache must keep
    /// the recent queries' second moments.
    pub fn needs_query_moments(&self) -> bool {
        matches!(
            self.keys,
            Coding::Spectral(SpectralCoding {
                select: RankSelect::Score(_) | RankSelect::Bits { score: true, .. },
                ..
            })
        )
    }
}

/// Options of one spec as parsed, before defaults.
#[derive(Default)]
struct Options<'a> {
    energy: Option<f32>,
    rank: Option<usize>,
    kscore: Option<f32>,
    kbits: Option<f32>,
    vbits: Option<f32>,
    by: Option<&'a str>,
    coef: Option<u32>,
    basis: Option<u32>,
    block: Option<usize>,
    window: Option<usize>,
    recent: Option<RecentDtype>,
    sink: Option<usize>,
    keys: Option<&'a str>,
    values: Option<&'a str>,
}

impl KvSpec {
    /// Parses a spec such as `spectral:energy=0.95,block=512,window=256` (see [`KvSpec`]).
    /// Values that depend on the model (rank vs head size, budgets) are checked by
    /// [`KvSpec::check`]. Errors name the bad part and list what is valid.
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
        if !matches!(kind, "spectral" | "q8" | "q4") {
            return Err(bad(format!("unknown cache '{kind}' (expected {KINDS})")));
        }
        let mut o = Options::default();
        for opt in opts.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let (key, value) = opt
                .split_once('=')
                .ok_or_else(|| bad(format!("option '{opt}' is not key=value")))?;
            let number = |what: &str| -> Result<usize, ModelError> {
                value
                    .parse()
                    .map_err(|_| bad(format!("{what} '{value}' is not a whole number")))
            };
            let real = |lo: f32, hi: f32, closed: bool| -> Result<f32, ModelError> {
                let e: f32 = value
                    .parse()
                    .map_err(|_| bad(format!("{key} '{value}' is not a number")))?;
                let inside = e > lo && (e < hi || (closed && e == hi));
                let close = if closed { ']' } else { ')' };
                inside
                    .then_some(e)
                    .ok_or_else(|| bad(format!("{key} {value} is outside ({lo}, {hi}{close}")))
            };
            match key {
                "energy" => o.energy = Some(real(0.0, 1.0, true)?),
                "kscore" => o.kscore = Some(real(0.0, 1.0, false)?),
                "kbits" => o.kbits = Some(real(0.0, 32.0, false)?),
                "vbits" => o.vbits = Some(real(0.0, 32.0, false)?),
                "rank" => o.rank = Some(number("rank")?),
                "by" => {
                    if !matches!(value, "energy" | "score") {
                        return Err(bad(format!("by={value}: expected energy or score")));
                    }
                    o.by = Some(value);
                }
                "block" => o.block = Some(number("block")?),
                "sink" => o.sink = Some(number("sink")?),
                "window" => o.window = Some(number("window")?),
                "coef" => {
                    o.coef = Some(match value {
                        "8" => 8,
                        "4" => 4,
                        _ => return Err(bad(format!("coef={value}: expected 8 or 4"))),
                    })
                }
                "basis" => {
                    o.basis = Some(match value {
                        "f16" => 16,
                        "q8" => 8,
                        _ => return Err(bad(format!("basis={value}: expected f16 or q8"))),
                    })
                }
                "recent" => {
                    o.recent = Some(match value {
                        "f32" => RecentDtype::F32,
                        "f16" => RecentDtype::F16,
                        "q8" => RecentDtype::Q8,
                        _ => return Err(bad(format!("recent={value}: expected f32, f16 or q8"))),
                    })
                }
                "keys" | "values" => {
                    if Coding::side(value, Coding::Q8).is_none() {
                        return Err(bad(format!("{key}={value}: expected one of {SIDES}")));
                    }
                    if key == "keys" {
                        o.keys = Some(value);
                    } else {
                        o.values = Some(value);
                    }
                }
                _ => return Err(bad(format!("unknown option '{key}' (expected {OPTIONS})"))),
            }
        }
        let config = Self::build(kind, &o).map_err(bad)?;
        Ok(KvSpec::Compressed(config))
    }

    /// The configuration of `kind` with options `o` (errors without the spec prefix).
    fn build(kind: &str, o: &Options<'_>) -> Result<CompressedConfig, String> {
        if o.rank == Some(0) {
            return Err("rank must be at least 1".into());
        }
        if o.kscore.is_some() && o.kbits.is_some() {
            return Err("kscore and kbits both choose the key ranks: give one".into());
        }
        let base = SpectralCoding {
            // A fixed rank alone means exactly that rank; otherwise 99 % energy by default.
            select: RankSelect::Energy(o.energy.unwrap_or(if o.rank.is_some() {
                1.0
            } else {
                CompressedConfig::DEFAULT_ENERGY
            })),
            max_rank: o.rank.unwrap_or(usize::MAX),
            coef_bits: o.coef.unwrap_or(8),
            basis_bits: o.basis.unwrap_or(16),
        };
        let (key_default, value_default) = (kind, kind);
        let side = |name: &str, select: Option<RankSelect>| {
            let mut c = base;
            if let Some(s) = select {
                c.select = s;
            }
            Coding::side(name, Coding::Spectral(c)).expect("side names are checked when parsed")
        };
        let keys = side(
            o.keys.unwrap_or(key_default),
            o.kscore
                .map(RankSelect::Score)
                .or(o.kbits.map(|bits| RankSelect::Bits {
                    bits,
                    score: o.by != Some("energy"),
                })),
        );
        let values = side(
            o.values.unwrap_or(value_default),
            o.vbits.map(|bits| RankSelect::Bits { bits, score: false }),
        );
        let spectral = |c: &Coding| matches!(c, Coding::Spectral(_));
        for (given, what, side_ok) in [
            (o.kscore.is_some(), "kscore", spectral(&keys)),
            (o.kbits.is_some(), "kbits", spectral(&keys)),
            (o.by.is_some(), "by (of kbits)", o.kbits.is_some()),
            (o.vbits.is_some(), "vbits", spectral(&values)),
            (
                o.coef.is_some(),
                "coef",
                spectral(&keys) || spectral(&values),
            ),
            (
                o.basis.is_some(),
                "basis",
                spectral(&keys) || spectral(&values),
            ),
        ] {
            if given && !side_ok {
                return Err(format!("{what} applies to a spectral side, and none is"));
            }
        }
        let spectral_kind = kind == "spectral";
        let (default_block, default_window) = if spectral_kind {
            (
                CompressedConfig::DEFAULT_BLOCK,
                CompressedConfig::DEFAULT_WINDOW,
            )
        } else {
            // Plain quantization needs no window. Its segments are cut every 256 tokens: with the
            // filling block held at int8 the length costs no bytes, and at 4096 tokens of context
            // decode ran 1.4x (q8) and 1.6x (q4) faster than with segments of 32 (fewer attention
            // units and partial softmaxes to merge, longer contiguous reads).
            (CompressedConfig::QUANT_BLOCK, 0)
        };
        let config = CompressedConfig {
            keys,
            values,
            block: o.block.unwrap_or(default_block),
            window: o.window.unwrap_or(default_window),
            // Plain quantization holds the block it is filling at int8 too (the same groups and
            // scales its coding uses, so committing it re-quantizes to the same bytes); without
            // that, an f32 block of 32 tokens halves the saving of short sequences.
            recent: o.recent.unwrap_or(if spectral_kind {
                RecentDtype::F32
            } else {
                RecentDtype::Q8
            }),
            // Spectral keys without the sinks lost 1.5 % perplexity on SmolLM2 (docs/results.md).
            sink: o.sink.unwrap_or(if spectral_kind {
                CompressedConfig::DEFAULT_SINK
            } else {
                0
            }),
        };
        if config.block == 0 || config.block % GROUP != 0 {
            return Err(format!(
                "block {} is not a positive multiple of {GROUP}",
                config.block
            ));
        }
        let spectral_side = spectral(&config.keys) || spectral(&config.values);
        if let Some(rank) = o.rank.filter(|r| spectral_side && *r > config.block) {
            return Err(format!(
                "rank {rank} is larger than the block of {} tokens",
                config.block
            ));
        }
        Ok(config)
    }

    /// The spec in words (`dense`, or the codings, block and window).
    pub fn name(&self) -> String {
        match self {
            KvSpec::Dense => "dense f32".into(),
            KvSpec::Compressed(c) => c.to_string(),
        }
    }

    /// Checks the spec against a model's attention shape (head size vs rank and groups, budgets
    /// that one component per head already exceeds) and returns the cache configuration with
    /// the rank bound resolved.
    pub fn check(&self, shape: AttnShape) -> Result<Option<CompressedConfig>, ModelError> {
        let KvSpec::Compressed(mut config) = *self else {
            return Ok(None);
        };
        let bad = |msg: String| Err(ModelError::InvalidConfig(format!("--kv: {msg}")));
        let hd = shape.head_dim;
        let block = config.block;
        let grouped = |c: &Coding| !matches!(c, Coding::Spectral(_));
        if (grouped(&config.keys) || grouped(&config.values) || config.recent == RecentDtype::Q8)
            && hd % GROUP != 0
        {
            return bad(format!(
                "head size {hd} is not a multiple of the quantization group {GROUP}"
            ));
        }
        for (side, name) in [(&mut config.keys, "kbits"), (&mut config.values, "vbits")] {
            let Coding::Spectral(c) = side else {
                continue;
            };
            if c.max_rank == usize::MAX {
                c.max_rank = hd;
            } else if c.max_rank > hd {
                return bad(format!(
                    "rank {} is larger than the head size {hd}",
                    c.max_rank
                ));
            }
            if let RankSelect::Bits { bits, .. } = c.select {
                let (fixed, per) = block_cost(c, block, hd);
                let least = 8.0 * (fixed + per) as f64 / (block * hd) as f64;
                if (bits as f64) < least {
                    return bad(format!(
                        "{name}={bits} cannot be met: one component per KV head of a \
                         {block}-token block already takes {least:.3} bits per value"
                    ));
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
        if self.recent != RecentDtype::F32 {
            write!(f, ", recent rows at {}", self.recent.name())?;
        }
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

    fn spectral(select: RankSelect, max_rank: usize) -> Coding {
        Coding::Spectral(SpectralCoding {
            select,
            max_rank,
            coef_bits: 8,
            basis_bits: 16,
        })
    }

    #[test]
    fn specs_parse_and_bad_ones_name_the_problem() {
        assert_eq!(KvSpec::parse("dense").unwrap(), KvSpec::Dense);
        let c = spec("spectral");
        assert_eq!(c.keys, spectral(RankSelect::Energy(0.99), 64));
        assert_eq!((c.block, c.window, c.recent), (512, 256, RecentDtype::F32));
        let c = spec("spectral:energy=0.9,rank=16,block=256,window=64,values=q4");
        assert_eq!(c.keys, spectral(RankSelect::Energy(0.9), 16));
        assert_eq!((c.values, c.block, c.window), (Coding::Q4, 256, 64));
        let c = spec("q8");
        assert_eq!(
            (c.keys, c.values, c.block, c.window),
            (Coding::Q8, Coding::Q8, 256, 0)
        );
        let c = spec("spectral:kbits=1.5,coef=4,basis=q8,recent=q8,values=q4");
        assert_eq!(
            c.keys,
            Coding::Spectral(SpectralCoding {
                select: RankSelect::Bits {
                    bits: 1.5,
                    score: true,
                },
                max_rank: 64,
                coef_bits: 4,
                basis_bits: 8,
            })
        );
        assert_eq!((c.values, c.recent), (Coding::Q4, RecentDtype::Q8));
        assert!(c.needs_query_moments());
        let c = spec("spectral:kscore=0.02,energy=0.9");
        assert_eq!(c.keys, spectral(RankSelect::Score(0.02), 64));
        assert_eq!(c.values, spectral(RankSelect::Energy(0.9), 64));
        assert!(!spec("spectral:vbits=3").needs_query_moments());
        assert!(!spec("spectral:kbits=2,by=energy").needs_query_moments());
        for (bad, needle) in [
            ("spectral:energy=0", "outside (0, 1]"),
            ("spectral:energy=1.5", "outside (0, 1]"),
            ("spectral:kscore=1", "outside (0, 1)"),
            ("spectral:kbits=0", "outside (0, 32)"),
            ("spectral:block=100", "multiple of 32"),
            ("spectral:block=0", "multiple of 32"),
            ("spectral:rank=600,block=512", "larger than the block"),
            ("spectral:rank=0", "at least 1"),
            (
                "spectral:foo=1",
                "unknown option 'foo' (expected energy, rank, kscore",
            ),
            ("spectral:energy", "not key=value"),
            (
                "svd",
                "unknown cache 'svd' (expected dense, spectral, q8, q4)",
            ),
            ("dense:block=32", "no options"),
            (
                "spectral:values=f32",
                "values=f32: expected one of spectral, q8, q4",
            ),
            ("spectral:coef=2", "coef=2: expected 8 or 4"),
            ("spectral:basis=q4", "basis=q4: expected f16 or q8"),
            ("spectral:recent=q4", "recent=q4: expected f32, f16 or q8"),
            ("spectral:kscore=0.1,kbits=2", "give one"),
            (
                "spectral:by=energy",
                "by (of kbits) applies to a spectral side",
            ),
            (
                "spectral:kbits=2,by=rank",
                "by=rank: expected energy or score",
            ),
            ("q4:kbits=2", "kbits applies to a spectral side"),
            (
                "spectral:keys=q8,kscore=0.1",
                "kscore applies to a spectral side",
            ),
            ("q8:coef=4", "coef applies to a spectral side"),
        ] {
            let err = KvSpec::parse(bad).unwrap_err().to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
        let check = |s: &str| {
            KvSpec::parse(s)
                .unwrap()
                .check(SHAPE)
                .unwrap_err()
                .to_string()
        };
        let err = check("spectral:rank=65");
        assert!(err.contains("larger than the head size 64"), "{err}");
        // One int4 component per head of a 512-token block: 2 bytes of scale per token, 256
        // bytes of coefficients and 128 of f16 basis: (1024 + 384)·8 / (512·64) = 0.344 bits.
        let err = check("spectral:kbits=0.3,coef=4");
        assert!(
            err.contains("kbits=0.3 cannot be met") && err.contains("0.344 bits per value"),
            "{err}"
        );
        assert!(KvSpec::parse("spectral:kbits=0.35,coef=4")
            .unwrap()
            .check(SHAPE)
            .is_ok());
    }
}
