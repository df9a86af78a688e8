//! A KV cache that keeps the most recent tokens dense and stores older blocks compressed: as
//! spectral factors (the S2LC spectral cache) or quantized per group of 32 (the simple
//! alternative it is measured against). Attention runs on the stored form directly.
//!
//! # Layout
//! Per layer, committed tokens are a list of compressed *segments* of `block` tokens each
//! (oldest first) followed by a dense f32 *window*. When the committed window reaches
//! `window + block` tokens (checked at each commit), its oldest `block` tokens are compressed
//! into a new segment, so at least `window` recent tokens always stay exact.
//!//!
//! The stored forms are in [`super::coding`], attention on them in [`super::attend`] and the
//! `--kv` specification in [`super::spec`]; their items are re-exported here.

use std::time::{Duration, Instant};

use super::{AttnShape, KvCache};

pub use super::attend::attend_compressed;
pub use super::coding::{
    code, quantize_groups, quantize_row_i8, reconstruct, Coded, Factors, Segment, GROUP,
};
pub use super::spec::{Coding, CompressedConfig, KvSpec};

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
}
