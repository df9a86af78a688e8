//! Key/value caches. The model is `&self`; a cache is passed in as `&mut dyn KvCache`, so one
//! model serves many sequences, and a cache decides how it stores keys and values (dense here,
//! spectral factors elsewhere) as long as it computes attention for the new queries.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

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
/// `q`/`out`: `n × q_dim`; `k_all`/`v_all`: `t × kv_dim`, all row-major. `scores` is scratch reused
/// across calls. Scores are `q·kᵀ/√head_dim`, masked so query `i` sees keys `0..=p0+i`.
#[allow(clippy::too_many_arguments)]
pub fn attend_dense(
    shape: AttnShape,
    q: &[f32],
    k_all: &[f32],
    v_all: &[f32],
    n: usize,
    p0: usize,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    let (hd, q_dim, kv_dim) = (shape.head_dim, shape.q_dim(), shape.kv_dim());
    let t = p0 + n;
    debug_assert_eq!(k_all.len(), t * kv_dim);
    debug_assert_eq!(q.len(), n * q_dim);
    let group = shape.n_heads / shape.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    // Small products run faster without thread hand-off.
    let par = if n * t * hd >= 1 << 18 {
        Par::rayon(0)
    } else {
        Par::Seq
    };
    scores.resize(n * t, 0.0);
    for h in 0..shape.n_heads {
        let g = h / group;
        let qh = MatRef::from_row_major_slice_with_stride(&q[h * hd..], n, hd, q_dim);
        let kh = MatRef::from_row_major_slice_with_stride(&k_all[g * hd..], t, hd, kv_dim);
        let vh = MatRef::from_row_major_slice_with_stride(&v_all[g * hd..], t, hd, kv_dim);
        {
            let s = MatMut::from_row_major_slice_mut(scores, n, t);
            matmul(s, Accum::Replace, qh, kh.transpose(), scale, par);
        }
        for (i, row) in scores.chunks_exact_mut(t).enumerate() {
            softmax_prefix(row, p0 + i + 1);
        }
        let s = MatRef::from_row_major_slice(scores, n, t);
        let oh = row_major_strided_mut(&mut out[h * hd..], n, hd, q_dim);
        matmul(oh, Accum::Replace, s, vh, 1.0f32, par);
    }
}

/// A mutable `rows × cols` row-major view whose rows start `row_stride` elements apart.
///
/// faer 0.24.4's `MatMut::from_row_major_slice_with_stride_mut` swaps the strides (it builds a
/// column-major view and writes out of bounds); the transposed column-major view is correct.
fn row_major_strided_mut(
    slice: &mut [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
) -> MatMut<'_, f32> {
    MatMut::from_column_major_slice_with_stride_mut(slice, cols, rows, row_stride).transpose_mut()
}

/// Softmax over `row[..valid]`, zeroing `row[valid..]` (the causal mask).
pub fn softmax_prefix(row: &mut [f32], valid: usize) {
    let (live, masked) = row.split_at_mut(valid);
    let max = live.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for x in live.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    live.iter_mut().for_each(|x| *x *= inv);
    masked.iter_mut().for_each(|x| *x = 0.0);
}

/// A dense f32 cache: per layer, keys and values as `tokens × kv_dim` row-major buffers.
pub struct DenseKvCache {
    shape: AttnShape,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
    limit: usize,
    scores: Vec<f32>,
}

impl DenseKvCache {
    /// An empty cache for `n_layers` layers holding at most `limit` tokens.
    pub fn new(n_layers: usize, shape: AttnShape, limit: usize) -> Self {
        DenseKvCache {
            shape,
            keys: vec![Vec::new(); n_layers],
            values: vec![Vec::new(); n_layers],
            len: 0,
            limit,
            scores: Vec::new(),
        }
    }

    /// Most tokens the cache accepts.
    pub fn limit(&self) -> usize {
        self.limit
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
        attend_dense(
            self.shape,
            q,
            keys,
            values,
            n,
            self.len,
            out,
            &mut self.scores,
        );
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
        for &(n, p0) in &[(1, 0), (5, 0), (1, 7), (4, 3)] {
            let t = p0 + n;
            let q = data(n * shape.q_dim(), 1);
            let k = data(t * shape.kv_dim(), 2);
            let v = data(t * shape.kv_dim(), 3);
            let mut out = vec![0.0; n * shape.q_dim()];
            attend_dense(shape, &q, &k, &v, n, p0, &mut out, &mut Vec::new());
            let want = naive(shape, &q, &k, &v, n, p0);
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "n={n} p0={p0}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn strided_view_writes_only_its_rows() {
        let mut buf = [0.0f32; 3 * 8];
        let mut v = row_major_strided_mut(&mut buf[4..], 3, 4, 8);
        v[(2, 3)] = 1.0;
        v[(1, 0)] = 2.0;
        assert_eq!(buf[4 + 2 * 8 + 3], 1.0);
        assert_eq!(buf[4 + 8], 2.0);
        assert_eq!(buf.iter().filter(|&&x| x != 0.0).count(), 2);
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
        attend_dense(shape, &q, &k, &v, n, 0, &mut a, &mut Vec::new());
        k[8..].iter_mut().for_each(|x| *x += 100.0);
        let mut b = vec![0.0; n * 8];
        attend_dense(shape, &q, &k, &v, n, 0, &mut b, &mut Vec::new());
        assert_eq!(a[..16], b[..16]);
        assert_ne!(a[16..], b[16..]);
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
