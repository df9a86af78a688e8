//! A KV cache that keeps the most recent tokens uncompressed and stores older blocks compressed:
//! as spectral blocks (the S2LC spectral cache) or quantized per group of 32 (the simple
//! alternatives it is measured against). Attention runs on the stored form directly.
//!
//! # Layout
//! Per layer, committed tokens are a list of compressed *segments* of `block` tokens each
//! (oldest first) followed by a *window* of recent rows (f32, f16 or int8, see
//! [`super::recent`]). When the committed window reaches `window + block` tokens (checked at each
//! commit), its oldest `block` tokens are compressed into a new segment, so at least `window`
//! recent tokens always stay uncompressed. Every layer reaches that point at the same commit, so
//! a byte budget ([`RankSelect::Bits`]) is shared by all layers and KV heads compressed together.
//!
//! When keys are ranked by attention-score error, the cache also keeps per layer and KV head the
//! second moment `M = Σ qqᵀ` of the queries seen since that layer's last compression (its upper
//! triangle in f32, `d(d+1)/2` values, counted in [`KvCache::bytes`]).
//!
//! The stored forms are in [`super::coding`], attention on them in [`super::attend`] and the
//! `--kv` specification in [`super::spec`]; their items are re-exported here.

use std::time::{Duration, Instant};

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

use super::recent::Recent;
use super::{AttnShape, KvCache};

pub use super::attend::attend_compressed;
pub use super::coding::{
    block_cost, choose, choose_budget, code, packed_len, quantize_groups, quantize_row_i8,
    reconstruct, spectra, spectral_side, Basis, Coded, HeadSpectrum, Segment, SpectralBlock, GROUP,
};
pub use super::recent::RecentDtype;
pub use super::spec::{Coding, CompressedConfig, KvSpec, RankSelect, SpectralCoding};

/// Recent window plus compressed segments; see the module docs.
pub struct CompressedKvCache {
    shape: AttnShape,
    config: CompressedConfig,
    segments: Vec<Vec<Segment>>,
    window_k: Vec<Recent>,
    window_v: Vec<Recent>,
    /// Per layer, the queries' second moments (`n_kv_heads` upper triangles), when keys need
    /// them.
    moments: Vec<Vec<f32>>,
    /// One full `d × d` moment, per `attend` call.
    moment: Vec<f32>,
    /// f32 rows of a quantized window, rebuilt per `attend` call.
    view_k: Vec<f32>,
    view_v: Vec<f32>,
    len: usize,
    compress_time: Duration,
    ranks: RankStats,
}

/// Sum and count of the ranks chosen for spectral segments (keys, values).
#[derive(Debug, Clone, Copy, Default)]
pub struct RankStats {
    /// Summed key ranks and the number of key blocks.
    pub keys: (usize, usize),
    /// Summed value ranks and the number of value blocks.
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
        let (kv_dim, hd) = (shape.kv_dim(), shape.head_dim);
        let rows = config.window + config.block + config.sink;
        let window = || {
            (0..n_layers)
                .map(|_| Recent::new(config.recent, kv_dim, rows))
                .collect()
        };
        let moments = if config.needs_query_moments() {
            vec![vec![0.0; shape.n_kv_heads * packed_len(hd)]; n_layers]
        } else {
            vec![Vec::new(); n_layers]
        };
        CompressedKvCache {
            shape,
            config,
            segments: vec![Vec::new(); n_layers],
            window_k: window(),
            window_v: window(),
            moments,
            moment: vec![0.0; hd * hd],
            view_k: Vec::new(),
            view_v: Vec::new(),
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

    /// Committed tokens of `layer` still in its window.
    pub fn window_tokens(&self, layer: usize) -> usize {
        self.window_k[layer].tokens()
    }

    /// Adds the `n` query rows `q` to `layer`'s second moments (per KV head, over its group).
    fn add_moments(&mut self, layer: usize, q: &[f32], n: usize) {
        let (hd, q_dim) = (self.shape.head_dim, self.shape.q_dim());
        let group = self.shape.n_heads / self.shape.n_kv_heads;
        let full = &mut self.moment;
        for (g, packed) in self.moments[layer]
            .chunks_exact_mut(packed_len(hd))
            .enumerate()
        {
            full.fill(0.0);
            for h in g * group..(g + 1) * group {
                let qh = MatRef::from_row_major_slice_with_stride(&q[h * hd..], n, hd, q_dim);
                matmul(
                    MatMut::from_row_major_slice_mut(full, hd, hd),
                    Accum::Add,
                    qh.transpose(),
                    qh,
                    1.0f32,
                    Par::Seq,
                );
            }
            let upper = (0..hd).flat_map(|i| full[i * hd + i..(i + 1) * hd].iter());
            packed.iter_mut().zip(upper).for_each(|(p, v)| *p += v);
        }
    }

    /// Compresses the oldest `block` tokens of the windows of `layers` into new segments.
    fn compress_oldest(&mut self, layers: &[usize]) {
        let t0 = Instant::now();
        let (block, kv_dim, shape) = (self.config.block, self.shape.kv_dim(), self.shape);
        let mut rows_k = Vec::with_capacity(layers.len());
        let mut rows_v = Vec::with_capacity(layers.len());
        for &layer in layers {
            if self.segments[layer].is_empty() && self.config.sink > 0 {
                // The sinks leave the window first, as an exact segment.
                let sink = self.config.sink;
                let keys = Coded::Exact(self.window_k[layer].take_front(sink));
                let values = Coded::Exact(self.window_v[layer].take_front(sink));
                self.segments[layer].push(Segment {
                    tokens: sink,
                    keys,
                    values,
                });
            }
            rows_k.push(self.window_k[layer].take_front(block));
            rows_v.push(self.window_v[layer].take_front(block));
        }
        let moments = &self.moments;
        let keys = code_layers(
            self.config.keys,
            &rows_k,
            layers,
            |l| Some(&moments[l][..]).filter(|m| !m.is_empty()),
            block,
            shape,
            &mut self.ranks.keys,
        );
        let values = code_layers(
            self.config.values,
            &rows_v,
            layers,
            |_| None,
            block,
            shape,
            &mut self.ranks.values,
        );
        for ((&layer, keys), values) in layers.iter().zip(keys).zip(values) {
            self.segments[layer].push(Segment {
                tokens: block,
                keys,
                values,
            });
            self.moments[layer].fill(0.0);
        }
        debug_assert!(rows_k.iter().all(|r| r.len() == block * kv_dim));
        self.compress_time += t0.elapsed();
    }
}

/// Codes one side of a block per layer in `layers` (`rows[i]` is layer `layers[i]`'s
/// `block × kv_dim` rows); a byte budget is shared by all of them.
fn code_layers<'m>(
    coding: Coding,
    rows: &[Vec<f32>],
    layers: &[usize],
    moments: impl Fn(usize) -> Option<&'m [f32]>,
    block: usize,
    shape: AttnShape,
    ranks: &mut (usize, usize),
) -> Vec<Coded> {
    let c = match coding {
        Coding::Spectral(
            c @ SpectralCoding {
                select: RankSelect::Bits { bits, .. },
                ..
            },
        ) => (c, bits),
        _ => {
            return rows
                .iter()
                .zip(layers)
                .map(|(x, &l)| code(coding, x, block, shape, moments(l), ranks))
                .collect()
        }
    };
    let (c, bits) = c;
    let (hd, heads_per_layer) = (shape.head_dim, shape.n_kv_heads);
    let spectra_all: Vec<HeadSpectrum> = rows
        .iter()
        .zip(layers)
        .flat_map(|(x, &l)| spectra(x, block, shape, moments(l), c.max_rank))
        .collect();
    let values = spectra_all.len() * block * hd;
    let budget = (bits as f64 * values as f64 / 8.0).floor() as usize;
    let cost = block_cost(&c, block, hd);
    // `KvSpec::check` refuses budgets below one component per head, so this always fits.
    let comps = choose_budget(&spectra_all, cost, budget, c.max_rank)
        .unwrap_or_else(|| spectra_all.iter().map(|h| vec![h.order[0]]).collect());
    rows.iter()
        .enumerate()
        .map(|(i, x)| {
            let at = i * heads_per_layer..(i + 1) * heads_per_layer;
            spectral_side(
                &spectra_all[at.clone()],
                &comps[at],
                x,
                block,
                shape,
                &c,
                ranks,
            )
        })
        .collect()
}

impl KvCache for CompressedKvCache {
    fn len(&self) -> usize {
        self.len
    }

    fn attend(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32], n: usize, out: &mut [f32]) {
        // Any rows a previous, uncommitted pass left are replaced.
        self.window_k[layer].set_pending(k);
        self.window_v[layer].set_pending(v);
        if !self.moments[layer].is_empty() {
            self.add_moments(layer, q, n);
        }
        let p0 = self.window_k[layer].tokens();
        let keys = self.window_k[layer].view(&mut self.view_k);
        let values = self.window_v[layer].view(&mut self.view_v);
        attend_compressed(
            self.shape,
            q,
            &self.segments[layer],
            keys,
            values,
            n,
            p0,
            out,
        );
    }

    fn commit(&mut self, n: usize) {
        self.len += n;
        for (k, v) in self.window_k.iter_mut().zip(&mut self.window_v) {
            k.commit();
            v.commit();
        }
        // Compress as soon as a block is committed past the window, so `bytes()` is the steady
        // state and the next step attends to the compressed form.
        loop {
            let due: Vec<usize> = (0..self.segments.len())
                .filter(|&layer| {
                    // The first compression also cuts the sinks.
                    let sink = if self.segments[layer].is_empty() {
                        self.config.sink
                    } else {
                        0
                    };
                    self.window_tokens(layer) >= self.config.window + self.config.block + sink
                })
                .collect();
            if due.is_empty() {
                break;
            }
            self.compress_oldest(&due);
        }
    }

    fn clear(&mut self) {
        self.len = 0;
        self.segments.iter_mut().for_each(Vec::clear);
        self.window_k.iter_mut().for_each(Recent::clear);
        self.window_v.iter_mut().for_each(Recent::clear);
        self.moments.iter_mut().for_each(|m| m.fill(0.0));
    }

    fn bytes(&self) -> usize {
        let segments: usize = self
            .segments
            .iter()
            .flatten()
            .map(|s| s.keys.bytes() + s.values.bytes())
            .sum();
        let window: usize = self
            .window_k
            .iter()
            .chain(&self.window_v)
            .map(Recent::bytes)
            .sum();
        let moments: usize = self.moments.iter().map(|m| 4 * m.len()).sum();
        segments + window + moments
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::testutil::{data, low_rank, spec, SHAPE};
    use crate::kv::DenseKvCache;

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
            ("q8:block=32", 5, 0.02),
            ("q4:block=32", 5, 0.25),
            ("spectral:block=64,window=32,keys=q8,values=q4", 7, 0.25),
            // Stored forms below int8: int4 coefficients, int8 basis, quantized windows.
            ("spectral:block=64,window=32,energy=0.9999,coef=4", 5, 0.25),
            (
                "spectral:block=64,window=32,energy=0.9999,basis=q8",
                1,
                0.02,
            ),
            (
                "spectral:block=64,window=32,energy=0.9999,recent=f16",
                9,
                0.02,
            ),
            (
                "spectral:block=64,window=32,energy=0.9999,recent=q8",
                1,
                0.03,
            ),
            // Ranks by attention-score error on the queries seen, or under a byte budget.
            (
                "spectral:block=64,window=32,kscore=0.0001,energy=0.9999",
                7,
                0.02,
            ),
            ("spectral:block=64,window=32,kbits=6,vbits=6", 7, 0.03),
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
        // The q8 cache holds 34 bytes per 32 values, as llama.cpp's q8_0. Segments and the
        // window are int8 alike by default; with `recent=f32` and segments of 32, six full
        // segments and 8 f32 rows in the window.
        let one_layer_bytes = |s: &str, out: &mut [f32]| {
            let mut cache = CompressedKvCache::new(1, SHAPE, spec(s));
            for p in 0..tokens {
                let r = p * kv..(p + 1) * kv;
                cache.attend(0, &q[..SHAPE.q_dim()], &k[r.clone()], &v[r], 1, out);
                cache.commit(1);
            }
            cache.bytes()
        };
        let out1 = &mut out[..SHAPE.q_dim()];
        assert_eq!(one_layer_bytes("q8", out1), 2 * tokens * kv / 32 * 34);
        assert_eq!(
            one_layer_bytes("q8:block=32,recent=f32", out1),
            2 * 192 * kv / 32 * 34 + 2 * 8 * kv * 4
        );
        // int4 coefficients, int8 basis, int8 window, and the query moments of `kscore`.
        let s = "spectral:block=64,window=32,rank=8,sink=0,coef=4,basis=q8,recent=q8";
        for (extra, moments) in [
            ("", 0),
            (",kscore=0.5", 4 * SHAPE.n_kv_heads * hd * (hd + 1) / 2),
        ] {
            let mut cache = CompressedKvCache::new(1, SHAPE, spec(&format!("{s}{extra}")));
            for p in 0..tokens {
                let r = p * kv..(p + 1) * kv;
                let q = &q[p * SHAPE.q_dim()..(p + 1) * SHAPE.q_dim()];
                cache.attend(0, q, &k[r.clone()], &v[r], 1, &mut out[..SHAPE.q_dim()]);
                cache.commit(1);
            }
            let per_head = |r: usize| 64 * r / 2 + 2 * 64 + r * hd + 2 * r;
            let side = |c: &Coded| -> usize {
                match c {
                    Coded::Spectral(h) => h.iter().map(|b| per_head(b.rank)).sum(),
                    _ => panic!("spectral"),
                }
            };
            let Coded::Spectral(heads) = &cache.segments(0)[0].keys else {
                panic!("spectral keys")
            };
            let key_ranks: Vec<usize> = heads.iter().map(|h| h.rank).collect();
            if extra.is_empty() {
                assert_eq!(key_ranks, [8, 8]);
            }
            let segments: usize = cache
                .segments(0)
                .iter()
                .map(|seg| side(&seg.keys) + side(&seg.values))
                .sum();
            let window = 2 * 72 * (kv + 2 * kv / 32);
            assert_eq!(cache.bytes(), segments + window + moments, "{s}{extra}");
            assert!(
                key_ranks.iter().all(|&r| (1..=8).contains(&r)),
                "{key_ranks:?}"
            );
        }
    }

    #[test]
    fn a_key_budget_holds_for_every_compression() {
        let tokens = 320;
        let layers = 3;
        let (k, v) = (
            data(tokens * SHAPE.kv_dim(), 5),
            data(tokens * SHAPE.kv_dim(), 6),
        );
        let (kv, qd, hd) = (SHAPE.kv_dim(), SHAPE.q_dim(), SHAPE.head_dim);
        let q = data(tokens * qd, 7);
        let config = spec("spectral:block=64,window=32,sink=0,kbits=1.5,coef=4,values=q8");
        let mut cache = CompressedKvCache::new(layers, SHAPE, config);
        let mut out = vec![0.0; 16 * qd];
        for p in (0..tokens).step_by(16) {
            for l in 0..layers {
                let (r, rq) = (p * kv..(p + 16) * kv, p * qd..(p + 16) * qd);
                cache.attend(l, &q[rq], &k[r.clone()], &v[r], 16, &mut out);
            }
            cache.commit(16);
        }
        let Coding::Spectral(c) = config.keys else {
            panic!("spectral keys")
        };
        let cost = block_cost(&c, 64, hd);
        let budget = 3 * 2 * 64 * 64 * 3 / 2 / 8; // 1.5 bits over layers × heads × 64 × 64
        let n = cache.segments(0).len();
        assert_eq!(n, 4);
        for i in 0..n {
            let spent: usize = (0..layers).map(|l| cache.segments(l)[i].keys.bytes()).sum();
            assert!(
                spent <= budget && spent + cost.1 > budget,
                "{spent} of {budget}"
            );
        }
    }
}
