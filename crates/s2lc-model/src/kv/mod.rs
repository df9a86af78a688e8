//! Key/value caches. The model is `&self`; a cache is passed in as `&mut dyn KvCache`, so one
//! model serves many sequences, and a cache decides how it stores keys and values (dense here,
//! spectral factors elsewhere) as long as it computes attention for the new queries.

use std::cell::RefCell;

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

use crate::kernels::pool::{self, split_range};
use crate::kernels::{ops, SyncPtr};

/// Head layout of an attention layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads; query head `h` reads key/value head `h / (n_heads / n_kv_heads)`.
    pub n_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
}

impl AttnShape {
    /// Width of the concatenated query heads.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of the concatenated key (or value) heads.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

pub mod attend;
pub mod coding;
pub mod compressed;
pub mod quant;
pub mod recent;
pub mod spec;
#[cfg(test)]
mod testutil;

pub use compressed::{CompressedConfig, CompressedKvCache, KvSpec};

/// Storage of past keys and values plus the attention computed over them.
pub trait KvCache: Send {
    /// Tokens already committed (the position of the next token).
    fn len(&self) -> usize;

    /// Whether no token is committed yet.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the keys/values of `n` new tokens (positions `len()..len()+n`) to `layer` and writes
    /// causal attention of their queries into `out`.
    ///
    /// `q` and `out` are `n × q_dim`, `k` and `v` are `n × kv_dim`, all row-major with RoPE already
    /// applied to `q` and `k`. Called once per layer; [`KvCache::commit`] follows after the last.
    fn attend(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32], n: usize, out: &mut [f32]);

    /// Marks the `n` tokens passed to every layer's `attend` as committed.
    fn commit(&mut self, n: usize);

    /// Forgets every token.
    fn clear(&mut self);

    /// Bytes held for keys and values.
    fn bytes(&self) -> usize;
}

/// Causal grouped-query attention of `n` queries at positions `p0..p0+n` over `t = p0 + n` keys.
///
/// `q`/`out`: `n × q_dim`; `k_all`/`v_all`: `t × kv_dim`, all row-major. Scores are
/// `q·kᵀ/√head_dim`, masked so query `i` sees keys `0..=p0+i`. A single query (decode) goes to
/// `attend_decode`; otherwise work is split into (head, block of up to 32 query rows) units
/// spread over the kernel pool, each two faer products.
///
/// # Panics
/// If a length differs from the above, or `n_kv_heads` does not divide `n_heads`.
pub fn attend_dense(
    shape: AttnShape,
    q: &[f32],
    k_all: &[f32],
    v_all: &[f32],
    n: usize,
    p0: usize,
    out: &mut [f32],
) {
    const ROWS: usize = 32;
    let (hd, q_dim, kv_dim) = (shape.head_dim, shape.q_dim(), shape.kv_dim());
    // Once per call: what both paths read and write.
    let kv_len = p0.checked_add(n).and_then(|t| t.checked_mul(kv_dim));
    let q_len = n.checked_mul(q_dim);
    assert!(
        q_len == Some(q.len())
            && q_len == Some(out.len())
            && kv_len == Some(k_all.len())
            && kv_len == Some(v_all.len())
            && shape.n_kv_heads > 0
            && shape.n_heads % shape.n_kv_heads == 0,
        "attend_dense: n = {n}, p0 = {p0}, {shape:?}: q has {} values, out {}, keys {}, values {}",
        q.len(),
        out.len(),
        k_all.len(),
        v_all.len()
    );
    if n == 1 {
        attend_decode(shape, q, k_all, v_all, p0 + 1, out);
        return;
    }
    let group = shape.n_heads / shape.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let chunks = n.div_ceil(ROWS);
    let units = shape.n_heads * chunks;
    let out_ptr = SyncPtr(out.as_mut_ptr());
    let job = |part: usize, parts: usize| {
        SCORES.with_borrow_mut(|scores| {
            for unit in split_range(units, part, parts, 1) {
                let (h, chunk) = (unit / chunks, unit % chunks);
                let (r0, r1) = (chunk * ROWS, ((chunk + 1) * ROWS).min(n));
                let g = h / group;
                // Keys visible to the last row of the block.
                let t = p0 + r1;
                let rows = r1 - r0;
                let qh = MatRef::from_row_major_slice_with_stride(
                    &q[r0 * q_dim + h * hd..],
                    rows,
                    hd,
                    q_dim,
                );
                let kh = MatRef::from_row_major_slice_with_stride(&k_all[g * hd..], t, hd, kv_dim);
                let vh = MatRef::from_row_major_slice_with_stride(&v_all[g * hd..], t, hd, kv_dim);
                scores.resize(rows * t, 0.0);
                {
                    let s = MatMut::from_row_major_slice_mut(scores, rows, t);
                    matmul(s, Accum::Replace, qh, kh.transpose(), scale, Par::Seq);
                }
                for (i, row) in scores.chunks_exact_mut(t).enumerate() {
                    softmax_prefix(row, p0 + r0 + i + 1);
                }
                let s = MatRef::from_row_major_slice(scores, rows, t);
                // SAFETY: `out` is n × q_dim (asserted above); this unit alone writes its rows
                // r0..r1 ⊆ 0..n, columns h·hd..(h+1)·hd ⊆ 0..q_dim; `out` outlives the job.
                let oh = unsafe {
                    MatMut::from_raw_parts_mut(
                        out_ptr.get().add(r0 * q_dim + h * hd),
                        rows,
                        hd,
                        q_dim as isize,
                        1,
                    )
                };
                matmul(oh, Accum::Replace, s, vh, 1.0f32, Par::Seq);
            }
        });
    };
    // The first few decode steps are cheaper on one thread than split (~1 µs hand-off).
    if n * (p0 + n) * shape.n_heads < 256 {
        job(0, 1);
    } else {
        pool::global().run(&job);
    }
}

/// Keys per unit of a decode step in [`attend_decode`] (K and V of one KV head: 256 KB at width 64).
const DECODE_KEYS: usize = 512;

/// One query per head (a decode step) over all `t` keys, flash-decoding style.
///
/// Units are (KV head, chunk of up to [`DECODE_KEYS`] keys). A unit computes, for each query head
/// of its group, the chunk's largest score `m`, `l = Σ e^(s − m)` and the unnormalised
/// `o = Σ e^(s − m)·v`; the query heads sharing a KV head therefore read its keys and values while
/// they are in L2, and a long context spreads over every core. The chunks are merged afterwards:
/// `out = Σ_c e^(m_c − m*)·o_c / Σ_c e^(m_c − m*)·l_c`.
fn attend_decode(
    shape: AttnShape,
    q: &[f32],
    k_all: &[f32],
    v_all: &[f32],
    t: usize,
    out: &mut [f32],
) {
    let (hd, kv_dim) = (shape.head_dim, shape.kv_dim());
    debug_assert_eq!(k_all.len(), t * kv_dim);
    debug_assert_eq!(v_all.len(), t * kv_dim);
    let group = shape.n_heads / shape.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    // At least two units per thread so the KV heads spread evenly, at most DECODE_KEYS keys and
    // at least ~16 keys per unit.
    let threads = pool::global().threads();
    let chunks = t
        .div_ceil(DECODE_KEYS)
        .max((2 * threads).div_ceil(shape.n_kv_heads))
        .min(t.div_ceil(16))
        .max(1);
    let keys_per_chunk = t.div_ceil(chunks);
    let units = shape.n_kv_heads * chunks;
    // Per unit and query head of the group: [m, l, o (hd values)].
    let slot = hd + 2;
    PARTIALS.with_borrow_mut(|partials| {
        partials.resize(units * group * slot, 0.0);
        let parts_ptr = SyncPtr(partials.as_mut_ptr());
        let job = |part: usize, parts: usize| {
            SCORES.with_borrow_mut(|scores| {
                for unit in split_range(units, part, parts, 1) {
                    let (g, c) = (unit / chunks, unit % chunks);
                    let (j0, j1) = (c * keys_per_chunk, ((c + 1) * keys_per_chunk).min(t));
                    scores.resize(j1 - j0, 0.0);
                    let keys = &k_all[j0 * kv_dim + g * hd..];
                    let values = &v_all[j0 * kv_dim + g * hd..];
                    for hh in 0..group {
                        let h = g * group + hh;
                        ops::key_scores(&q[h * hd..][..hd], keys, kv_dim, scale, scores);
                        let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        let l = ops::exp_shifted(scores, m);
                        // SAFETY: `partials` holds units·group·slot values, unit < units and
                        // hh < group; slot (unit, hh) belongs to this unit alone and `partials`
                        // outlives the job.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(
                                parts_ptr.get().add((unit * group + hh) * slot),
                                slot,
                            )
                        };
                        dst[0] = m;
                        dst[1] = l;
                        ops::weighted_rows(scores, values, kv_dim, &mut dst[2..]);
                    }
                }
            });
        };
        // The first decode steps are cheaper on one thread than split (~1 µs hand-off).
        if t * shape.n_heads < 256 {
            job(0, 1);
        } else {
            pool::global().run(&job);
        }
        for h in 0..shape.n_heads {
            let (g, hh) = (h / group, h % group);
            let at = |c: usize| &partials[((g * chunks + c) * group + hh) * slot..][..slot];
            let m_max = (0..chunks)
                .map(|c| at(c)[0])
                .fold(f32::NEG_INFINITY, f32::max);
            let oh = &mut out[h * hd..][..hd];
            oh.fill(0.0);
            let mut l = 0.0f32;
            for c in 0..chunks {
                let p = at(c);
                let w = (p[0] - m_max).exp();
                l += w * p[1];
                ops::axpy(oh, w, &p[2..]);
            }
            let inv = 1.0 / l;
            oh.iter_mut().for_each(|v| *v *= inv);
        }
    });
}

thread_local! {
    /// Per-thread attention scores of [`attend_dense`], reused across calls.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Per-chunk partial results of [`attend_decode`] (on the calling thread), reused.
    static PARTIALS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

pub use crate::kernels::ops::softmax_prefix;

/// A dense f32 cache: per layer, keys and values as `tokens × kv_dim` row-major buffers.
#[derive(Debug, Clone)]
pub struct DenseKvCache {
    shape: AttnShape,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
    limit: usize,
}

impl DenseKvCache {
    /// An empty cache for `n_layers` layers holding at most `limit` tokens.
    ///
    /// The buffers are reserved for `limit` tokens up front (address space only until written),
    /// so a decode step never reallocates and copies the cache.
    pub fn new(n_layers: usize, shape: AttnShape, limit: usize) -> Self {
        let reserve = || (0..n_layers).map(|_| Vec::with_capacity(limit * shape.kv_dim()));
        DenseKvCache {
            shape,
            keys: reserve().collect(),
            values: reserve().collect(),
            len: 0,
            limit,
        }
    }

    /// Most tokens the cache accepts.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The committed keys and values of `layer` (`len() × kv_dim` each, keys with RoPE applied).
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        let n = self.len * self.shape.kv_dim();
        (&self.keys[layer][..n], &self.values[layer][..n])
    }
}

impl KvCache for DenseKvCache {
    fn len(&self) -> usize {
        self.len
    }

    fn attend(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32], n: usize, out: &mut [f32]) {
        debug_assert!(
            self.len + n <= self.limit,
            "cache of {} tokens overflows",
            self.limit
        );
        let kv_dim = self.shape.kv_dim();
        let (keys, values) = (&mut self.keys[layer], &mut self.values[layer]);
        // Drop anything a previous, uncommitted pass appended.
        keys.truncate(self.len * kv_dim);
        values.truncate(self.len * kv_dim);
        keys.extend_from_slice(k);
        values.extend_from_slice(v);
        attend_dense(self.shape, q, keys, values, n, self.len, out);
    }

    fn commit(&mut self, n: usize) {
        self.len += n;
    }

    fn clear(&mut self) {
        self.len = 0;
        self.keys.iter_mut().for_each(Vec::clear);
        self.values.iter_mut().for_each(Vec::clear);
    }

    fn bytes(&self) -> usize {
        2 * self.keys.len() * self.len * self.shape.kv_dim() * std::mem::size_of::<f32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward attention with an explicit causal mask, for comparison.
    fn naive(shape: AttnShape, q: &[f32], k: &[f32], v: &[f32], n: usize, p0: usize) -> Vec<f32> {
        let (hd, qd, kd) = (shape.head_dim, shape.q_dim(), shape.kv_dim());
        let t = p0 + n;
        let mut out = vec![0.0; n * qd];
        for h in 0..shape.n_heads {
            let g = h / (shape.n_heads / shape.n_kv_heads);
            for i in 0..n {
                let mut s: Vec<f32> = (0..t)
                    .map(|j| {
                        let dot: f32 = (0..hd)
                            .map(|d| q[i * qd + h * hd + d] * k[j * kd + g * hd + d])
                            .sum();
                        if j <= p0 + i {
                            dot / (hd as f32).sqrt()
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                    .collect();
                let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let z: f32 = s
                    .iter_mut()
                    .map(|x| {
                        *x = (*x - m).exp();
                        *x
                    })
                    .sum();
                for d in 0..hd {
                    out[i * qd + h * hd + d] =
                        (0..t).map(|j| s[j] / z * v[j * kd + g * hd + d]).sum();
                }
            }
        }
        out
    }

    fn data(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 31 + seed * 17) % 23) as f32 - 11.0) / 9.0)
            .collect()
    }

    #[test]
    fn masked_attention_matches_naive() {
        let shape = AttnShape {
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 4,
        };
        // Decode steps, one block, and several blocks of 32 rows split across the pool.
        for &(n, p0) in &[
            (1, 0),
            (5, 0),
            (1, 7),
            (4, 3),
            (1, 900),
            (1, 1535),
            (70, 0),
            (33, 40),
        ] {
            let t = p0 + n;
            let q = data(n * shape.q_dim(), 1);
            let k = data(t * shape.kv_dim(), 2);
            let v = data(t * shape.kv_dim(), 3);
            let mut out = vec![0.0; n * shape.q_dim()];
            attend_dense(shape, &q, &k, &v, n, p0, &mut out);
            let want = naive(shape, &q, &k, &v, n, p0);
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "n={n} p0={p0}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn future_keys_do_not_leak() {
        // Changing the last key must not change the first query's output.
        let shape = AttnShape {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 4,
        };
        let n = 3;
        let q = data(n * 8, 4);
        let mut k = data(n * 4, 5);
        let v = data(n * 4, 6);
        let mut a = vec![0.0; n * 8];
        attend_dense(shape, &q, &k, &v, n, 0, &mut a);
        k[8..].iter_mut().for_each(|x| *x += 100.0);
        let mut b = vec![0.0; n * 8];
        attend_dense(shape, &q, &k, &v, n, 0, &mut b);
        assert_eq!(a[..16], b[..16]);
        assert_ne!(a[16..], b[16..]);
    }

    // A wrong length is refused by the release assert (its message), not read or written past.

    #[test]
    #[should_panic(expected = "attend_dense: n = 3, p0 = 0")]
    fn prefill_attention_refuses_a_short_output() {
        let shape = AttnShape {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 4,
        };
        let n = 3;
        let (q, k, v) = (data(n * 8, 1), data(n * 4, 2), data(n * 4, 3));
        // The last value of the last head's output is missing.
        let mut out = vec![0.0; n * 8 - 1];
        attend_dense(shape, &q, &k, &v, n, 0, &mut out);
    }

    #[test]
    #[should_panic(expected = "attend_dense: n = 1, p0 = 2")]
    fn dense_cache_refuses_a_step_without_its_key() {
        let shape = AttnShape {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 8,
        };
        let mut cache = DenseKvCache::new(1, shape, 16);
        let mut out = vec![0.0; 16];
        for i in 0..2 {
            cache.attend(0, &data(16, i), &data(8, i), &data(8, i + 1), 1, &mut out);
            cache.commit(1);
        }
        // A decode step whose key is missing would score key 2, which the cache does not hold
        // (only its reserved, unwritten capacity).
        cache.attend(0, &data(16, 5), &[], &data(8, 6), 1, &mut out);
    }

    #[test]
    fn incremental_decode_equals_prefill() {
        let shape = AttnShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
        };
        let n = 6;
        let q = data(n * shape.q_dim(), 7);
        let k = data(n * shape.kv_dim(), 8);
        let v = data(n * shape.kv_dim(), 9);
        let mut full = DenseKvCache::new(1, shape, 64);
        let mut want = vec![0.0; n * shape.q_dim()];
        full.attend(0, &q, &k, &v, n, &mut want);
        full.commit(n);
        let mut step = DenseKvCache::new(1, shape, 64);
        let (qd, kd) = (shape.q_dim(), shape.kv_dim());
        for i in 0..n {
            let mut o = vec![0.0; qd];
            step.attend(
                0,
                &q[i * qd..][..qd],
                &k[i * kd..][..kd],
                &v[i * kd..][..kd],
                1,
                &mut o,
            );
            step.commit(1);
            for (a, b) in o.iter().zip(&want[i * qd..][..qd]) {
                assert!((a - b).abs() < 1e-5);
            }
        }
        assert_eq!(step.len(), n);
        assert_eq!(step.bytes(), 2 * n * kd * 4);
    }
}
