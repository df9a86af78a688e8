//! Shared test data of the compressed cache's modules: a small attention shape, deterministic
//! pseudo-random values, exact low-rank blocks and parsed specs.

use super::{AttnShape, CompressedConfig, KvSpec};

/// Six query heads over two KV heads of width 64.
pub(crate) const SHAPE: AttnShape = AttnShape {
    n_heads: 6,
    n_kv_heads: 2,
    head_dim: 64,
};

/// `len` deterministic values in [−0.5, 0.5) depending on `seed`.
pub(crate) fn data(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((((i + seed) * 2654435761) % 1009) as f32 / 1009.0) - 0.5)
        .collect()
}

/// `tokens × kv_dim` rows of rank `r` per head (plus nothing else).
pub(crate) fn low_rank(tokens: usize, r: usize, seed: usize) -> Vec<f32> {
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

/// The checked configuration of spec `s` for [`SHAPE`] (a compressed one).
pub(crate) fn spec(s: &str) -> CompressedConfig {
    KvSpec::parse(s).unwrap().check(SHAPE).unwrap().unwrap()
}
