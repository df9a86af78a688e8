//! Rotary position embedding: the cos/sin tables of positions and their application to query
//! and key heads.

/// Rotary position embedding in the Hugging Face "rotate half" layout: within each head of width
/// `hd`, element `i < hd/2` pairs with `i + hd/2` and the pair rotates by `pos · base^(-2i/hd)`.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f64>,
    head_dim: usize,
}

impl Rope {
    /// Frequencies for heads of width `head_dim` (even) and base `theta`.
    pub fn new(head_dim: usize, theta: f32) -> Self {
        let half = head_dim / 2;
        let inv_freq = (0..half)
            .map(|i| 1.0 / (theta as f64).powf(2.0 * i as f64 / head_dim as f64))
            .collect();
        Rope { inv_freq, head_dim }
    }

    /// Fills `cos`/`sin` (`n × hd/2`) for positions `p0..p0+n`.
    pub fn tables(&self, p0: usize, n: usize, cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
        self.tables_at(p0..p0 + n, cos, sin);
    }

    /// Fills `cos`/`sin` (one row of `hd/2` per position) for arbitrary positions (one per
    /// sequence of a batch).
    pub fn tables_at(
        &self,
        positions: impl ExactSizeIterator<Item = usize>,
        cos: &mut Vec<f32>,
        sin: &mut Vec<f32>,
    ) {
        let half = self.head_dim / 2;
        let n = positions.len();
        cos.resize(n * half, 0.0);
        sin.resize(n * half, 0.0);
        for (t, pos) in positions.enumerate() {
            let pos = pos as f64;
            for (i, f) in self.inv_freq.iter().enumerate() {
                let (s, c) = (pos * f).sin_cos();
                cos[t * half + i] = c as f32;
                sin[t * half + i] = s as f32;
            }
        }
    }

    /// Rotates every head of the `n × width` row-major `x` (width a multiple of `hd`) in place.
    pub fn apply(&self, x: &mut [f32], width: usize, cos: &[f32], sin: &[f32]) {
        let hd = self.head_dim;
        let half = hd / 2;
        for (t, row) in x.chunks_exact_mut(width).enumerate() {
            let (c, s) = (&cos[t * half..][..half], &sin[t * half..][..half]);
            for head in row.chunks_exact_mut(hd) {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x0, x1) = (a[i], b[i]);
                    a[i] = x0 * c[i] - x1 * s[i];
                    b[i] = x1 * c[i] + x0 * s[i];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_rotates_pairs_and_preserves_norm() {
        let rope = Rope::new(4, 10_000.0);
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        rope.tables(1, 1, &mut cos, &mut sin);
        // pair 0 rotates by 1 rad, pair 1 by 1/100 rad.
        assert!((cos[0] - 1f32.cos()).abs() < 1e-7 && (sin[1] - 0.01f32.sin()).abs() < 1e-7);
        let mut x = [1.0, 0.0, 0.0, 1.0];
        rope.apply(&mut x, 4, &cos, &sin);
        let want = [
            1f32.cos(),
            0.01f32.cos() * 0.0 - 0.01f32.sin(),
            1f32.sin(),
            0.01f32.cos(),
        ];
        for (a, b) in x.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{x:?} vs {want:?}");
        }
        // Position 0 is the identity; relative positions give equal dot products.
        rope.tables(0, 1, &mut cos, &mut sin);
        let mut y = [0.3, -0.2, 0.5, 0.7];
        let y0 = y;
        rope.apply(&mut y, 4, &cos, &sin);
        assert_eq!(y, y0);
        let dot_at = |pq: usize, pk: usize| {
            let (mut c, mut s) = (Vec::new(), Vec::new());
            let mut q = [0.3, -0.2, 0.5, 0.7];
            let mut k = [0.1, 0.9, -0.4, 0.2];
            rope.tables(pq, 1, &mut c, &mut s);
            rope.apply(&mut q, 4, &c, &s);
            rope.tables(pk, 1, &mut c, &mut s);
            rope.apply(&mut k, 4, &c, &s);
            q.iter().zip(&k).map(|(a, b)| a * b).sum::<f32>()
        };
        assert!((dot_at(5, 2) - dot_at(13, 10)).abs() < 1e-5);
    }
}
