//! A KV cache that keeps the most recent tokens dense and stores older blocks compressed: as
//! spectral factors (the S2LC spectral cache) or quantized per group of 32 (the simple
//! alternative it is measured against). Attention runs on the stored form directly.
//!
//! # Layout
//! Per layer, committed tokens are a list of compressed *segments* of `block` tokens each
//! (oldest first) followed by a dense f32 *window*. When the committed window reaches
//! `window + block` tokens (checked at each commit), its oldest `block` tokens are compressed
//! into a new segment, so at least `window` recent tokens always stay exact.
//!
//! # Spectral coding
//! A segment's keys (or values) of one KV head form a `T × d` matrix `X` (`T = block` tokens,
//! `d = head_dim`). Its SVD `X = U·Σ·Vᵀ` truncated to rank `r` is stored as coefficients `C = U_r`
//! (`T × r`, int8 with one f16 scale per token) and a basis `B = Σ_r·V_rᵀ` (`r × d`, f16), so
//! `X ≈ C·B`. Keeping the singular values in the basis leaves every coefficient column with unit
//! norm, so one scale per token quantizes all components to the same relative precision. `r` is
//! the smallest rank keeping the requested share of `‖X‖²_F`, capped by the maximum rank. The
//! heads of a layer are decomposed in one [`rsvd_batch`] call (exact SVD when the rank is close
//! to `d`).
//!
//! Attention on factors: for query `q`, the scores of the segment are `C·(B·q)` (`r·d + T·r`
//! multiply-adds instead of `T·d`), and its value contribution is `(pᵀ·C_v)·B_v`.
//!
//! # RoPE
//! Keys are compressed *after* RoPE (the cache receives rotated keys). Measured on SmolLM2
//! (`plrabn12.txt`, 2048 tokens, blocks of 512, all layers and KV heads), pre-RoPE keys are
//! lower-rank — mean rank 7 / 15 / 36 of 64 at 90 / 95 / 99 % energy against 20 / 31 / 50 after
//! RoPE — but the rotation differs per position, so scores on pre-RoPE factors need every key
//! rebuilt (`r·d` per key) and rotated before the dot product: attention could no longer run on
//! the factors and would cost more than on a dense cache. Post-RoPE factors keep the product
//! `C·(B·q)`; the rank price is paid in memory, and reported.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use half::f16;
use half::slice::HalfFloatSliceExt;
use s2lc_spectral::rsvd::{rsvd_batch, RsvdParams};

use super::{AttnShape, KvCache};
use crate::error::ModelError;
use crate::kernels::pool::{self, split_range};
use crate::kernels::{ops, SyncPtr};

/// Elements per quantization group along the head dimension (the int8/int4 codings).
pub const GROUP: usize = 32;

/// How a segment of keys or values is stored once it leaves the dense window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Coding {
    /// Rank-`r` factors per KV head (see the module docs): `r` is the smallest rank keeping
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

/// Rank-`r` factors of one KV head's `T × d` block: `X ≈ diag(scale)·coef·basis`.
#[derive(Debug, Clone)]
pub struct Factors {
    /// Rank kept.
    pub rank: usize,
    /// `T × rank` int8 coefficients (row-major).
    pub coef: Vec<i8>,
    /// Per-token scale of `coef`.
    pub scale: Vec<f16>,
    /// `rank × d` basis (`Σ_r·V_rᵀ`, row-major).
    pub basis: Vec<f16>,
}

/// One side (keys or values) of a compressed segment, all KV heads.
#[derive(Debug, Clone)]
pub enum Coded {
    /// The `T × kv_dim` rows unchanged (attention sinks).
    Exact(Vec<f32>),
    /// Factors per KV head.
    Spectral(Vec<Factors>),
    /// `T × kv_dim` quants (int8; or two 4-bit values per byte, low nibble first) with one f16
    /// scale per group of 32.
    Quant {
        /// Bits per value: 8 or 4.
        bits: u32,
        /// The quants.
        data: Vec<u8>,
        /// One scale per group.
        scale: Vec<f16>,
    },
}

impl Coded {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Coded::Spectral(heads) => heads
                .iter()
                .map(|f| f.coef.len() + 2 * (f.scale.len() + f.basis.len()))
                .sum(),
            Coded::Quant { data, scale, .. } => data.len() + 2 * scale.len(),
            Coded::Exact(rows) => 4 * rows.len(),
        }
    }
}

/// A compressed block of `tokens` tokens of one layer.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Tokens in the segment.
    pub tokens: usize,
    /// The keys (after RoPE).
    pub keys: Coded,
    /// The values.
    pub values: Coded,
}

/// Dense recent window plus compressed segments; see the module docs.
pub struct CompressedKvCache {
    shape: AttnShape,
    config: CompressedConfig,
    segments: Vec<Vec<Segment>>,
    window_k: Vec<Vec<f32>>,
    window_v: Vec<Vec<f32>>,
    len: usize,
    compress_time: Duration,
    ranks: RankStats,
}

/// Sum and count of the ranks chosen for spectral segments (keys, values).
#[derive(Debug, Clone, Copy, Default)]
pub struct RankStats {
    /// Summed key ranks and the number of key factor sets.
    pub keys: (usize, usize),
    /// Summed value ranks and the number of value factor sets.
    pub values: (usize, usize),
}

impl RankStats {
    /// Mean key rank and mean value rank (`None` for a side that is not spectral).
    pub fn means(&self) -> (Option<f64>, Option<f64>) {
        let mean = |(s, n): (usize, usize)| (n > 0).then(|| s as f64 / n as f64);
        (mean(self.keys), mean(self.values))
    }
}

impl CompressedKvCache {
    /// An empty cache; `config` should come from [`KvSpec::check`] (rank bound resolved).
    pub fn new(n_layers: usize, shape: AttnShape, config: CompressedConfig) -> Self {
        let window = (config.window + config.block) * shape.kv_dim();
        CompressedKvCache {
            shape,
            config,
            segments: vec![Vec::new(); n_layers],
            window_k: (0..n_layers).map(|_| Vec::with_capacity(window)).collect(),
            window_v: (0..n_layers).map(|_| Vec::with_capacity(window)).collect(),
            len: 0,
            compress_time: Duration::ZERO,
            ranks: RankStats::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &CompressedConfig {
        &self.config
    }

    /// Wall time spent compressing segments so far.
    pub fn compress_time(&self) -> Duration {
        self.compress_time
    }

    /// Ranks chosen so far by spectral codings.
    pub fn ranks(&self) -> RankStats {
        self.ranks
    }

    /// The compressed segments of `layer`, oldest first.
    pub fn segments(&self, layer: usize) -> &[Segment] {
        &self.segments[layer]
    }

    /// Committed tokens of `layer` still in its dense window (layers compress one after another
    /// within a forward pass, so this is per layer).
    pub fn window_tokens(&self, layer: usize) -> usize {
        self.len - self.segments[layer].iter().map(|s| s.tokens).sum::<usize>()
    }

    /// Compresses the oldest `block` tokens of `layer`'s window into a new segment.
    fn compress_oldest(&mut self, layer: usize) {
        let t0 = Instant::now();
        let (block, kv_dim) = (self.config.block, self.shape.kv_dim());
        if self.segments[layer].is_empty() && self.config.sink > 0 {
            // The sinks leave the window first, as an exact segment.
            let n = self.config.sink * kv_dim;
            let keys = Coded::Exact(self.window_k[layer].drain(..n).collect());
            let values = Coded::Exact(self.window_v[layer].drain(..n).collect());
            self.segments[layer].push(Segment {
                tokens: self.config.sink,
                keys,
                values,
            });
        }
        let n = block * kv_dim;
        let keys = code(
            self.config.keys,
            &self.window_k[layer][..n],
            block,
            self.shape,
            &mut self.ranks.keys,
        );
        let values = code(
            self.config.values,
            &self.window_v[layer][..n],
            block,
            self.shape,
            &mut self.ranks.values,
        );
        self.window_k[layer].drain(..n);
        self.window_v[layer].drain(..n);
        self.segments[layer].push(Segment {
            tokens: block,
            keys,
            values,
        });
        self.compress_time += t0.elapsed();
    }
}

/// Codes the `tokens × kv_dim` rows `x`; spectral ranks are added to `ranks` (sum, count).
pub fn code(
    coding: Coding,
    x: &[f32],
    tokens: usize,
    shape: AttnShape,
    ranks: &mut (usize, usize),
) -> Coded {
    let (hd, kv_dim) = (shape.head_dim, shape.kv_dim());
    match coding {
        Coding::Spectral { energy, max_rank } => {
            let views: Vec<MatRef<'_, f32>> = (0..shape.n_kv_heads)
                .map(|g| MatRef::from_row_major_slice_with_stride(&x[g * hd..], tokens, hd, kv_dim))
                .collect();
            let max_rank = max_rank.min(hd).min(tokens);
            let heads = match rsvd_batch(&views, &RsvdParams::new(max_rank)) {
                Ok(svds) => svds
                    .iter()
                    .zip(&views)
                    .map(|(svd, view)| {
                        let total: f64 = (0..tokens)
                            .map(|i| (0..hd).map(|j| (view[(i, j)] as f64).powi(2)).sum::<f64>())
                            .sum();
                        let r = energy_rank(&svd.s, total, energy as f64).max(1);
                        ranks.0 += r;
                        ranks.1 += 1;
                        factors(svd, r, tokens, hd)
                    })
                    .collect(),
                // Non-finite activations cannot be factored: keep them exactly (full rank).
                Err(_) => views
                    .iter()
                    .map(|v| {
                        ranks.0 += hd;
                        ranks.1 += 1;
                        identity_factors(*v)
                    })
                    .collect(),
            };
            Coded::Spectral(heads)
        }
        Coding::Q8 | Coding::Q4 => {
            let bits = if coding == Coding::Q8 { 8 } else { 4 };
            let (data, scale) = quantize_groups(x, bits);
            Coded::Quant { bits, data, scale }
        }
    }
}

/// Smallest `r ≤ s.len()` with `Σ_{i<r} sᵢ² ≥ energy·total` (`s.len()` when never reached).
fn energy_rank(s: &[f32], total: f64, energy: f64) -> usize {
    let goal = energy * total * (1.0 - 1e-6);
    let mut acc = 0.0;
    for (i, v) in s.iter().enumerate() {
        acc += (*v as f64).powi(2);
        if acc >= goal {
            return i + 1;
        }
    }
    s.len()
}

/// Coefficients `U_r` (int8 per token) and basis `Σ_r·V_rᵀ` from an SVD.
fn factors(svd: &s2lc_spectral::svd::Svd, r: usize, tokens: usize, hd: usize) -> Factors {
    let (coef, scale) = int8_rows(tokens, r, |t, j| svd.u[(t, j)]);
    let mut basis = vec![f16::ZERO; r * hd];
    for j in 0..r {
        for c in 0..hd {
            basis[j * hd + c] = f16::from_f32(svd.s[j] * svd.v[(c, j)]);
        }
    }
    Factors {
        rank: r,
        coef,
        scale,
        basis,
    }
}

/// Full-rank "factors" of `x` itself (identity basis), for blocks an SVD cannot handle.
fn identity_factors(x: MatRef<'_, f32>) -> Factors {
    let (tokens, hd) = (x.nrows(), x.ncols());
    let (coef, scale) = int8_rows(tokens, hd, |t, j| {
        let e = x[(t, j)];
        if e.is_finite() {
            e
        } else {
            0.0
        }
    });
    let basis = (0..hd * hd)
        .map(|i| {
            if i / hd == i % hd {
                f16::ONE
            } else {
                f16::ZERO
            }
        })
        .collect();
    Factors {
        rank: hd,
        coef,
        scale,
        basis,
    }
}

/// `rows × width` values `value(t, j)` quantized per row to int8 with an f16 scale.
fn int8_rows(
    rows: usize,
    width: usize,
    value: impl Fn(usize, usize) -> f32,
) -> (Vec<i8>, Vec<f16>) {
    let mut coef = vec![0i8; rows * width];
    let mut scale = vec![f16::ZERO; rows];
    let mut row = vec![0.0f32; width];
    for (t, (c, s)) in coef.chunks_exact_mut(width).zip(&mut scale).enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = value(t, j);
        }
        *s = quantize_row_i8(&row, c);
    }
    (coef, scale)
}

/// `q = round(x/d)` with `d = max|x|/127` (as f16, the stored scale); returns the scale.
pub fn quantize_row_i8(x: &[f32], q: &mut [i8]) -> f16 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = f16::from_f32(amax / 127.0);
    let df = d.to_f32();
    let inv = if df > 0.0 { 1.0 / df } else { 0.0 };
    for (o, v) in q.iter_mut().zip(x) {
        *o = (v * inv).round().clamp(-127.0, 127.0) as i8;
    }
    d
}

/// Quantizes `x` (length a multiple of 32) per group of 32 to `bits` (8 or 4) with f16 scales.
pub fn quantize_groups(x: &[f32], bits: u32) -> (Vec<u8>, Vec<f16>) {
    let groups = x.len() / GROUP;
    let mut scale = Vec::with_capacity(groups);
    let mut data = Vec::with_capacity(if bits == 8 { x.len() } else { x.len() / 2 });
    let qmax = if bits == 8 { 127.0 } else { 7.0 };
    for g in x.chunks_exact(GROUP) {
        let amax = g.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = f16::from_f32(amax / qmax);
        let df = d.to_f32();
        let inv = if df > 0.0 { 1.0 / df } else { 0.0 };
        let q = |v: f32| (v * inv).round().clamp(-qmax, qmax) as i8;
        if bits == 8 {
            data.extend(g.iter().map(|&v| q(v) as u8));
        } else {
            data.extend(
                g.chunks_exact(2)
                    .map(|p| ((q(p[0]) + 8) as u8) | (((q(p[1]) + 8) as u8) << 4)),
            );
        }
        scale.push(d);
    }
    (data, scale)
}

/// Dequantizes the `out.len()` values starting at element `at` of a group-quantized buffer
/// (`at` and the length multiples of 32) into `out`.
fn dequantize_groups(bits: u32, data: &[u8], scale: &[f16], at: usize, out: &mut [f32]) {
    let mut buf = [0i8; GROUP];
    for (gi, o) in out.chunks_exact_mut(GROUP).enumerate() {
        let g = at + gi * GROUP;
        o.fill(0.0);
        ops::axpy_i8(
            o,
            scale[g / GROUP].to_f32(),
            group_quants(bits, data, g, &mut buf),
        );
    }
}

/// Writes KV head `g` of a coded side into `out` in a form attention can multiply:
/// spectral → the `T × r` coefficients as f32 and the `r × d` basis as f32 in `basis`
/// (returns `Some(r)`); quantized → the `T × d` rows (returns `None`).
fn unpack(
    coded: &Coded,
    g: usize,
    tokens: usize,
    shape: AttnShape,
    out: &mut Vec<f32>,
    basis: &mut Vec<f32>,
) -> Option<usize> {
    let (hd, kv_dim) = (shape.head_dim, shape.kv_dim());
    match coded {
        Coded::Spectral(heads) => {
            let f = &heads[g];
            // The per-token scales go through `basis` first (converted as one slice).
            basis.resize(tokens, 0.0);
            f.scale.convert_to_f32_slice(basis);
            out.resize(tokens * f.rank, 0.0);
            for ((o, q), &s) in out
                .chunks_exact_mut(f.rank)
                .zip(f.coef.chunks_exact(f.rank))
                .zip(basis.iter())
            {
                o.fill(0.0);
                ops::axpy_i8(o, s, q);
            }
            basis.resize(f.basis.len(), 0.0);
            f.basis.convert_to_f32_slice(basis);
            Some(f.rank)
        }
        Coded::Exact(rows) => {
            out.clear();
            for r in rows.chunks_exact(kv_dim) {
                out.extend_from_slice(&r[g * hd..(g + 1) * hd]);
            }
            None
        }
        Coded::Quant { bits, data, scale } => {
            out.resize(tokens * hd, 0.0);
            for (t, o) in out.chunks_exact_mut(hd).enumerate() {
                dequantize_groups(*bits, data, scale, t * kv_dim + g * hd, o);
            }
            None
        }
    }
}

/// The `T × d` rows of KV head `g` rebuilt from a coded side (for checks and analysis; attention
/// never rebuilds them).
pub fn reconstruct(coded: &Coded, g: usize, tokens: usize, shape: AttnShape) -> Vec<f32> {
    let hd = shape.head_dim;
    let (mut rows, mut basis) = (Vec::new(), Vec::new());
    match unpack(coded, g, tokens, shape, &mut rows, &mut basis) {
        None => rows,
        Some(r) => {
            let mut out = vec![0.0f32; tokens * hd];
            for (o, c) in out.chunks_exact_mut(hd).zip(rows.chunks_exact(r)) {
                for (cj, b) in c.iter().zip(basis.chunks_exact(hd)) {
                    ops::axpy(o, *cj, b);
                }
            }
            out
        }
    }
}

/// Reusable per-thread buffers of the attention units.
#[derive(Default)]
struct UnitScratch {
    keys: Vec<f32>,
    values: Vec<f32>,
    key_basis: Vec<f32>,
    value_basis: Vec<f32>,
    key_scale: Vec<f32>,
    value_scale: Vec<f32>,
    scores: Vec<f32>,
    small: Vec<f32>,
}

thread_local! {
    static UNIT: RefCell<UnitScratch> = RefCell::new(UnitScratch::default());
    static PARTIALS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// What one attention unit reads: a compressed segment or the dense window.
#[derive(Clone, Copy)]
enum Part<'a> {
    Segment(&'a Segment),
    /// `t` dense rows (`t × kv_dim`); query row `i` sees the first `p0 + i + 1`.
    Dense {
        k: &'a [f32],
        v: &'a [f32],
        t: usize,
        p0: usize,
    },
}

/// Causal attention of `n` queries over `segments` then the dense `window_k/v` rows, of which the
/// first `p0` are older than the queries. Units (KV head, part) run on the kernel pool, each
/// leaving per query head and row the partial softmax `(max, Σexp, Σexp·v)`; the partials are
/// merged by log-sum-exp as in flash-decoding.
#[allow(clippy::too_many_arguments)]
pub fn attend_compressed(
    shape: AttnShape,
    q: &[f32],
    segments: &[Segment],
    window_k: &[f32],
    window_v: &[f32],
    n: usize,
    p0: usize,
    out: &mut [f32],
) {
    let (hd, q_dim, kv_dim) = (shape.head_dim, shape.q_dim(), shape.kv_dim());
    let group = shape.n_heads / shape.n_kv_heads;
    let t_dense = window_k.len() / kv_dim;
    debug_assert_eq!(t_dense, p0 + n);
    let mut parts: Vec<Part<'_>> = segments.iter().map(Part::Segment).collect();
    parts.push(Part::Dense {
        k: window_k,
        v: window_v,
        t: t_dense,
        p0,
    });
    let units = shape.n_kv_heads * parts.len();
    let slot = hd + 2;
    let per_unit = group * n * slot;
    let scale = 1.0 / (hd as f32).sqrt();
    PARTIALS.with_borrow_mut(|partials| {
        partials.resize(units * per_unit, 0.0);
        let ptr = SyncPtr(partials.as_mut_ptr());
        let parts = &parts;
        let job = |part: usize, of: usize| {
            UNIT.with_borrow_mut(|s| {
                for unit in split_range(units, part, of, 1) {
                    let (g, pi) = (unit / parts.len(), unit % parts.len());
                    // SAFETY: `partials` holds units·per_unit values and unit < units; unit
                    // `unit` alone writes its `per_unit` slots; `partials` outlives the job.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(ptr.get().add(unit * per_unit), per_unit)
                    };
                    attend_unit(shape, q, n, g, parts[pi], scale, s, dst);
                }
            });
        };
        let keys_total = segments.iter().map(|s| s.tokens).sum::<usize>() + t_dense;
        if n * keys_total * shape.n_heads < 4096 {
            job(0, 1);
        } else {
            pool::global().run(&job);
        }
        let n_parts = parts.len();
        for i in 0..n {
            for h in 0..shape.n_heads {
                let (g, hh) = (h / group, h % group);
                let at = |pi: usize| {
                    &partials[(g * n_parts + pi) * per_unit + (hh * n + i) * slot..][..slot]
                };
                let m = (0..n_parts)
                    .map(|pi| at(pi)[0])
                    .fold(f32::NEG_INFINITY, f32::max);
                let o = &mut out[i * q_dim + h * hd..][..hd];
                o.fill(0.0);
                let mut l = 0.0f32;
                for pi in 0..n_parts {
                    let p = at(pi);
                    if p[0] == f32::NEG_INFINITY {
                        continue;
                    }
                    let w = (p[0] - m).exp();
                    l += w * p[1];
                    ops::axpy(o, w, &p[2..]);
                }
                let inv = 1.0 / l;
                o.iter_mut().for_each(|v| *v *= inv);
            }
        }
    });
}

/// The 32 quants of the group starting at element `at`, as int8 (4-bit ones unpacked into `buf`).
#[inline]
fn group_quants<'a>(bits: u32, data: &'a [u8], at: usize, buf: &'a mut [i8; GROUP]) -> &'a [i8] {
    if bits == 8 {
        let bytes = &data[at..at + GROUP];
        // SAFETY: `bytes` is GROUP initialised bytes (bounds-checked above), and u8 and i8 have
        // the same size, alignment and validity; the view borrows `data` for `'a`.
        return unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<i8>(), GROUP) };
    }
    for (pair, &b) in buf
        .chunks_exact_mut(2)
        .zip(&data[at / 2..at / 2 + GROUP / 2])
    {
        pair[0] = (b & 0x0F) as i8 - 8;
        pair[1] = (b >> 4) as i8 - 8;
    }
    buf
}

/// [`attend_unit`] for one query row (a decode step), straight from the stored form: int8
/// coefficients and quants are read by int8 kernels instead of being expanded to f32 first.
#[allow(clippy::too_many_arguments)]
fn attend_one(
    shape: AttnShape,
    q: &[f32],
    g: usize,
    part: Part<'_>,
    scale: f32,
    s: &mut UnitScratch,
    dst: &mut [f32],
) {
    let (hd, kv_dim) = (shape.head_dim, shape.kv_dim());
    let group = shape.n_heads / shape.n_kv_heads;
    let slot = hd + 2;
    let t = match part {
        Part::Segment(seg) => seg.tokens,
        Part::Dense { t, .. } => t,
    };
    // Once per unit, shared by the group's query heads: f16 bases and token scales to f32,
    // group-quantized rows to f32 (`hd`-wide rows in `s.keys` / `s.values`).
    if let Part::Segment(seg) = part {
        for (coded, basis, scales, rows) in [
            (&seg.keys, &mut s.key_basis, &mut s.key_scale, &mut s.keys),
            (
                &seg.values,
                &mut s.value_basis,
                &mut s.value_scale,
                &mut s.values,
            ),
        ] {
            match coded {
                Coded::Spectral(heads) => {
                    let f = &heads[g];
                    basis.resize(f.basis.len(), 0.0);
                    f.basis.convert_to_f32_slice(basis);
                    scales.resize(t, 0.0);
                    f.scale.convert_to_f32_slice(scales);
                }
                Coded::Quant { .. } => {
                    unpack(coded, g, t, shape, rows, basis);
                }
                Coded::Exact(_) => {}
            }
        }
    }
    s.scores.resize(t, 0.0);
    for hh in 0..group {
        let h = g * group + hh;
        let qh = &q[h * hd..][..hd];
        let scores = &mut s.scores[..t];
        match part {
            Part::Dense { k, .. } => ops::key_scores(qh, &k[g * hd..], kv_dim, scale, scores),
            Part::Segment(seg) => match &seg.keys {
                Coded::Exact(rows) => ops::key_scores(qh, &rows[g * hd..], kv_dim, scale, scores),
                Coded::Spectral(heads) => {
                    let f = &heads[g];
                    let r = f.rank;
                    s.small.resize(r, 0.0);
                    for (qb, b) in s.small.iter_mut().zip(s.key_basis.chunks_exact(hd)) {
                        *qb = scale * ops::dot(qh, b);
                    }
                    for ((sc, c), ts) in scores
                        .iter_mut()
                        .zip(f.coef.chunks_exact(r))
                        .zip(&s.key_scale)
                    {
                        *sc = ts * ops::dot_i8(c, &s.small);
                    }
                }
                Coded::Quant { .. } => ops::key_scores(qh, &s.keys, hd, scale, scores),
            },
        }
        let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let l = ops::exp_shifted(scores, m);
        let d = &mut dst[hh * slot..][..slot];
        d[0] = m;
        d[1] = l;
        let o = &mut d[2..];
        let p = &s.scores[..t];
        match part {
            Part::Dense { v, .. } => ops::weighted_rows(p, &v[g * hd..], kv_dim, o),
            Part::Segment(seg) => match &seg.values {
                Coded::Exact(rows) => ops::weighted_rows(p, &rows[g * hd..], kv_dim, o),
                Coded::Spectral(heads) => {
                    let f = &heads[g];
                    let r = f.rank;
                    s.small.clear();
                    s.small.resize(r, 0.0);
                    for ((pt, c), ts) in p.iter().zip(f.coef.chunks_exact(r)).zip(&s.value_scale) {
                        ops::axpy_i8(&mut s.small, pt * ts, c);
                    }
                    o.fill(0.0);
                    for (w, b) in s.small.iter().zip(s.value_basis.chunks_exact(hd)) {
                        ops::axpy(o, *w, b);
                    }
                }
                Coded::Quant { .. } => ops::weighted_rows(p, &s.values, hd, o),
            },
        }
    }
}

/// One unit: every query head of KV group `g`, every query row, over one part. `dst` holds per
/// (query head, row) `[max, Σexp, o (hd)]`.
#[allow(clippy::too_many_arguments)]
fn attend_unit(
    shape: AttnShape,
    q: &[f32],
    n: usize,
    g: usize,
    part: Part<'_>,
    scale: f32,
    s: &mut UnitScratch,
    dst: &mut [f32],
) {
    if n == 1 {
        attend_one(shape, q, g, part, scale, s, dst);
        return;
    }
    let (hd, q_dim, kv_dim) = (shape.head_dim, shape.q_dim(), shape.kv_dim());
    let group = shape.n_heads / shape.n_kv_heads;
    let slot = hd + 2;
    // Once per unit: the raw `o` views below stay inside `dst`.
    assert!(dst.len() >= group * n * slot, "attend_unit: dst too short");
    // Keys/values as (matrix, optional basis): dense rows are used in place.
    let (t, visible) = match part {
        Part::Segment(seg) => (seg.tokens, None),
        Part::Dense { t, p0, .. } => (t, Some(p0)),
    };
    let (kb, vb) = match part {
        Part::Segment(seg) => (
            unpack(&seg.keys, g, t, shape, &mut s.keys, &mut s.key_basis),
            unpack(&seg.values, g, t, shape, &mut s.values, &mut s.value_basis),
        ),
        Part::Dense { .. } => (None, None),
    };
    for hh in 0..group {
        let h = g * group + hh;
        let qh = MatRef::from_row_major_slice_with_stride(&q[h * hd..], n, hd, q_dim);
        s.scores.resize(n * t, 0.0);
        // Scores: q·kᵀ, or (q·Bᵀ)·Cᵀ on factors.
        {
            let sm = MatMut::from_row_major_slice_mut(&mut s.scores, n, t);
            match (part, kb) {
                (Part::Dense { k, .. }, _) => {
                    let km = MatRef::from_row_major_slice_with_stride(&k[g * hd..], t, hd, kv_dim);
                    matmul(sm, Accum::Replace, qh, km.transpose(), scale, Par::Seq);
                }
                (Part::Segment(_), Some(r)) => {
                    s.small.resize(n * r, 0.0);
                    let b = MatRef::from_row_major_slice(&s.key_basis, r, hd);
                    matmul(
                        MatMut::from_row_major_slice_mut(&mut s.small, n, r),
                        Accum::Replace,
                        qh,
                        b.transpose(),
                        scale,
                        Par::Seq,
                    );
                    let c = MatRef::from_row_major_slice(&s.keys[..t * r], t, r);
                    let qb = MatRef::from_row_major_slice(&s.small, n, r);
                    matmul(sm, Accum::Replace, qb, c.transpose(), 1.0f32, Par::Seq);
                }
                (Part::Segment(_), None) => {
                    let km = MatRef::from_row_major_slice(&s.keys[..t * hd], t, hd);
                    matmul(sm, Accum::Replace, qh, km.transpose(), scale, Par::Seq);
                }
            }
        }
        // Partial softmax per row (masked to the visible prefix of the dense part).
        for (i, row) in s.scores.chunks_exact_mut(t).enumerate() {
            let vis = visible.map_or(t, |p0| (p0 + i + 1).min(t));
            let (seen, hidden) = row.split_at_mut(vis);
            hidden.fill(0.0);
            let m = seen.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let l = ops::exp_shifted(seen, m);
            let d = &mut dst[(hh * n + i) * slot..][..2];
            d[0] = m;
            d[1] = l;
        }
        // Values: p·V, or (p·C_v)·B_v on factors, into the `o` slots (row stride `slot`).
        let p = MatRef::from_row_major_slice(&s.scores, n, t);
        // SAFETY: rows `hh·n..hh·n+n` of `dst` (stride `slot`), columns 2..2+hd, lie inside
        // `dst` (group·n·slot values, checked above), which this unit owns exclusively.
        let o = unsafe {
            MatMut::from_raw_parts_mut(
                dst.as_mut_ptr().add(hh * n * slot + 2),
                n,
                hd,
                slot as isize,
                1,
            )
        };
        match (part, vb) {
            (Part::Dense { v, .. }, _) => {
                let vm = MatRef::from_row_major_slice_with_stride(&v[g * hd..], t, hd, kv_dim);
                matmul(o, Accum::Replace, p, vm, 1.0f32, Par::Seq);
            }
            (Part::Segment(_), Some(r)) => {
                s.small.resize(n * r, 0.0);
                let c = MatRef::from_row_major_slice(&s.values[..t * r], t, r);
                let pc = MatMut::from_row_major_slice_mut(&mut s.small, n, r);
                matmul(pc, Accum::Replace, p, c, 1.0f32, Par::Seq);
                let b = MatRef::from_row_major_slice(&s.value_basis, r, hd);
                let pc = MatRef::from_row_major_slice(&s.small, n, r);
                matmul(o, Accum::Replace, pc, b, 1.0f32, Par::Seq);
            }
            (Part::Segment(_), None) => {
                let vm = MatRef::from_row_major_slice(&s.values[..t * hd], t, hd);
                matmul(o, Accum::Replace, p, vm, 1.0f32, Par::Seq);
            }
        }
    }
}

impl KvCache for CompressedKvCache {
    fn len(&self) -> usize {
        self.len
    }

    fn attend(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32], n: usize, out: &mut [f32]) {
        let kv_dim = self.shape.kv_dim();
        let committed = self.window_tokens(layer);
        // Drop anything a previous, uncommitted pass appended.
        self.window_k[layer].truncate(committed * kv_dim);
        self.window_v[layer].truncate(committed * kv_dim);
        let p0 = self.window_k[layer].len() / kv_dim;
        self.window_k[layer].extend_from_slice(k);
        self.window_v[layer].extend_from_slice(v);
        attend_compressed(
            self.shape,
            q,
            &self.segments[layer],
            &self.window_k[layer],
            &self.window_v[layer],
            n,
            p0,
            out,
        );
    }

    fn commit(&mut self, n: usize) {
        self.len += n;
        // Compress as soon as a block is committed past the window, so `bytes()` is the steady
        // state and the next step attends to the compressed form.
        for layer in 0..self.segments.len() {
            loop {
                // The first compression also cuts the sinks.
                let sink = if self.segments[layer].is_empty() {
                    self.config.sink
                } else {
                    0
                };
                if self.window_tokens(layer) < self.config.window + self.config.block + sink {
                    break;
                }
                self.compress_oldest(layer);
            }
        }
    }

    fn clear(&mut self) {
        self.len = 0;
        self.segments.iter_mut().for_each(Vec::clear);
        self.window_k.iter_mut().for_each(Vec::clear);
        self.window_v.iter_mut().for_each(Vec::clear);
    }

    fn bytes(&self) -> usize {
        let segments: usize = self
            .segments
            .iter()
            .flatten()
            .map(|s| s.keys.bytes() + s.values.bytes())
            .sum();
        // Committed window rows of keys and values, f32.
        let window: usize = (0..self.segments.len())
            .map(|l| 2 * 4 * self.window_tokens(l) * self.shape.kv_dim())
            .sum();
        segments + window
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{attend_dense, DenseKvCache};

    const SHAPE: AttnShape = AttnShape {
        n_heads: 6,
        n_kv_heads: 2,
        head_dim: 64,
    };

    fn data(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((((i + seed) * 2654435761) % 1009) as f32 / 1009.0) - 0.5)
            .collect()
    }

    /// `tokens × kv_dim` rows of rank `r` per head (plus nothing else).
    fn low_rank(tokens: usize, r: usize, seed: usize) -> Vec<f32> {
        let (hd, kv) = (SHAPE.head_dim, SHAPE.kv_dim());
        let a = data(tokens * r * SHAPE.n_kv_heads, seed);
        let b = data(r * kv, seed + 7);
        let mut x = vec![0.0; tokens * kv];
        for t in 0..tokens {
            for g in 0..SHAPE.n_kv_heads {
                for j in 0..r {
                    let c = a[(t * SHAPE.n_kv_heads + g) * r + j];
                    for d in 0..hd {
                        x[t * kv + g * hd + d] += c * b[j * kv + g * hd + d];
                    }
                }
            }
        }
        x
    }

    fn spec(s: &str) -> CompressedConfig {
        KvSpec::parse(s).unwrap().check(SHAPE).unwrap().unwrap()
    }

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

    #[test]
    fn group_quantization_round_trips_within_half_a_step() {
        let x = data(4 * GROUP, 3);
        for bits in [8, 4] {
            let (q, d) = quantize_groups(&x, bits);
            assert_eq!(q.len(), if bits == 8 { x.len() } else { x.len() / 2 });
            let mut y = vec![0.0; x.len()];
            dequantize_groups(bits, &q, &d, 0, &mut y);
            for (g, (xg, yg)) in x.chunks(GROUP).zip(y.chunks(GROUP)).enumerate() {
                let step = d[g].to_f32();
                let amax = xg.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                assert!(step > 0.0 && step <= amax / if bits == 8 { 126.0 } else { 6.9 });
                for (a, b) in xg.iter().zip(yg) {
                    assert!(
                        (a - b).abs() <= 0.5 * step * 1.01 + 1e-7,
                        "{bits} bits: {a} vs {b}"
                    );
                }
            }
        }
        let mut q = [0i8; 5];
        let d = quantize_row_i8(&[0.5, -1.0, 0.25, 0.0, 1.0], &mut q);
        assert_eq!(q, [64, -127, 32, 0, 127]);
        assert!((d.to_f32() - 1.0 / 127.0).abs() < 1e-5);
    }

    #[test]
    fn exact_low_rank_blocks_are_recovered_at_their_rank() {
        let (block, r) = (64, 5);
        let x = low_rank(block, r, 1);
        let mut ranks = (0, 0);
        let coded = code(
            Coding::Spectral {
                energy: 0.9999,
                max_rank: 64,
            },
            &x,
            block,
            SHAPE,
            &mut ranks,
        );
        assert_eq!(ranks, (2 * r, 2), "rank of each head");
        for g in 0..SHAPE.n_kv_heads {
            let y = reconstruct(&coded, g, block, SHAPE);
            let (mut err, mut norm) = (0.0f64, 0.0f64);
            for t in 0..block {
                for d in 0..SHAPE.head_dim {
                    let a = x[t * SHAPE.kv_dim() + g * SHAPE.head_dim + d] as f64;
                    err += (a - y[t * SHAPE.head_dim + d] as f64).powi(2);
                    norm += a * a;
                }
            }
            // Only the int8 coefficients and f16 scales are lossy here (~0.4 % per entry).
            assert!(
                (err / norm).sqrt() < 0.01,
                "head {g}: {}",
                (err / norm).sqrt()
            );
        }
    }

    /// Feeds `tokens` through `cache` and a dense cache in chunks of `chunk`, returning the
    /// largest relative difference of the attention outputs of the last chunk.
    fn max_rel_diff(
        cache: &mut dyn KvCache,
        k: &[f32],
        v: &[f32],
        tokens: usize,
        chunk: usize,
    ) -> f32 {
        let (qd, kv) = (SHAPE.q_dim(), SHAPE.kv_dim());
        let q = data(tokens * qd, 11);
        let mut dense = DenseKvCache::new(1, SHAPE, tokens);
        let (mut a, mut b) = (vec![0.0; chunk * qd], vec![0.0; chunk * qd]);
        let mut worst = 0.0f32;
        let mut p = 0;
        while p < tokens {
            let n = chunk.min(tokens - p);
            let (qs, ks, vs) = (
                &q[p * qd..(p + n) * qd],
                &k[p * kv..(p + n) * kv],
                &v[p * kv..(p + n) * kv],
            );
            cache.attend(0, qs, ks, vs, n, &mut a[..n * qd]);
            dense.attend(0, qs, ks, vs, n, &mut b[..n * qd]);
            cache.commit(n);
            dense.commit(n);
            for (x, y) in a[..n * qd]
                .chunks(SHAPE.head_dim)
                .zip(b[..n * qd].chunks(SHAPE.head_dim))
            {
                let num: f32 = x.iter().zip(y).map(|(x, y)| (x - y) * (x - y)).sum();
                let den: f32 = y.iter().map(|y| y * y).sum();
                worst = worst.max((num / den).sqrt());
            }
            p += n;
        }
        worst
    }

    #[test]
    fn factor_attention_matches_dense_attention() {
        let tokens = 300;
        // Rank-6 keys/values: the spectral cache keeps them up to int8 rounding.
        let (k, v) = (low_rank(tokens, 6, 2), low_rank(tokens, 6, 5));
        for (s, chunk, bound) in [
            ("spectral:block=64,window=32,energy=0.9999", 1, 0.02),
            ("spectral:block=64,window=32,energy=0.9999", 37, 0.02),
            ("spectral:block=64,window=0,rank=64", 16, 0.02),
            ("q8", 5, 0.02),
            ("q4", 5, 0.25),
            ("spectral:block=64,window=32,keys=q8,values=q4", 7, 0.25),
        ] {
            let mut cache = CompressedKvCache::new(1, SHAPE, spec(s));
            let worst = max_rel_diff(&mut cache, &k, &v, tokens, chunk);
            assert!(worst < bound, "{s}, chunks of {chunk}: {worst}");
            assert!(
                cache.segments(0).len() >= 3,
                "{s}: segments were compressed"
            );
        }
        // Truncating a full-rank block to rank 2 must show up in the output.
        let (k, v) = (
            data(tokens * SHAPE.kv_dim(), 3),
            data(tokens * SHAPE.kv_dim(), 4),
        );
        let mut cache =
            CompressedKvCache::new(1, SHAPE, spec("spectral:block=64,window=32,rank=2"));
        assert!(max_rel_diff(&mut cache, &k, &v, tokens, 8) > 0.05);
    }

    #[test]
    fn memory_is_accounted_exactly() {
        let tokens = 200;
        let (k, v) = (
            data(tokens * SHAPE.kv_dim(), 1),
            data(tokens * SHAPE.kv_dim(), 2),
        );
        let (layers, kv, hd) = (2, SHAPE.kv_dim(), SHAPE.head_dim);
        let q = data(tokens * SHAPE.q_dim(), 3);
        let mut out = vec![0.0; tokens * SHAPE.q_dim()];
        // Per segment, side and KV head: 64×8 int8 coefficients, 64 f16 scales, 8×64 f16 basis.
        let per_factors = 64 * 8 + 2 * 64 + 2 * 8 * hd;
        // (sink, segments, window tokens after 200): blocks of 64 are cut once the committed
        // window reaches 32 + 64 (+ the sinks, which leave with the first block).
        for (sink, n_segments, window_tokens) in [(0, 2, 72), (4, 3, 68)] {
            let s = format!("spectral:block=64,window=32,rank=8,sink={sink}");
            let mut cache = CompressedKvCache::new(layers, SHAPE, spec(&s));
            for p in 0..tokens {
                for l in 0..layers {
                    let r = p * kv..(p + 1) * kv;
                    cache.attend(
                        l,
                        &q[p * SHAPE.q_dim()..(p + 1) * SHAPE.q_dim()],
                        &k[r.clone()],
                        &v[r],
                        1,
                        &mut out[..SHAPE.q_dim()],
                    );
                }
                cache.commit(1);
            }
            assert_eq!(cache.segments(0).len(), n_segments, "{s}");
            assert_eq!(cache.window_tokens(1), window_tokens, "{s}");
            let segments = layers * 2 * 2 * SHAPE.n_kv_heads * per_factors;
            let sinks = layers * 2 * sink * kv * 4;
            let window = layers * 2 * window_tokens * kv * 4;
            assert_eq!(cache.bytes(), segments + sinks + window, "{s}");
        }
        // The q8 cache holds 34 bytes per 32 values, as llama.cpp's q8_0.
        let mut q8 = CompressedKvCache::new(1, SHAPE, spec("q8"));
        for p in 0..tokens {
            let r = p * kv..(p + 1) * kv;
            q8.attend(
                0,
                &q[..SHAPE.q_dim()],
                &k[r.clone()],
                &v[r],
                1,
                &mut out[..SHAPE.q_dim()],
            );
            q8.commit(1);
        }
        let quantized = 192; // six full segments of 32; the 8 newest tokens stay dense
        assert_eq!(q8.bytes(), 2 * quantized * kv / 32 * 34 + 2 * 8 * kv * 4);
    }

    #[test]
    fn a_single_query_over_segments_matches_the_dense_kernel() {
        // The merge across parts must equal one softmax over all keys.
        let tokens = 160;
        let (k, v) = (low_rank(tokens, 4, 8), low_rank(tokens, 4, 9));
        let q = data(SHAPE.q_dim(), 10);
        let mut ranks = (0, 0);
        let c = Coding::Spectral {
            energy: 1.0,
            max_rank: 64,
        };
        let mut seg = |i: usize| Segment {
            tokens: 64,
            keys: code(
                c,
                &k[i * 64 * SHAPE.kv_dim()..(i + 1) * 64 * SHAPE.kv_dim()],
                64,
                SHAPE,
                &mut ranks,
            ),
            values: code(
                c,
                &v[i * 64 * SHAPE.kv_dim()..(i + 1) * 64 * SHAPE.kv_dim()],
                64,
                SHAPE,
                &mut ranks,
            ),
        };
        let segments = [seg(0), seg(1)];
        let tail = 128 * SHAPE.kv_dim();
        let mut a = vec![0.0; SHAPE.q_dim()];
        attend_compressed(SHAPE, &q, &segments, &k[tail..], &v[tail..], 1, 31, &mut a);
        let mut b = vec![0.0; SHAPE.q_dim()];
        attend_dense(SHAPE, &q, &k, &v, 1, tokens - 1, &mut b);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 0.01 * y.abs().max(0.05), "{x} vs {y}");
        }
    }
}
