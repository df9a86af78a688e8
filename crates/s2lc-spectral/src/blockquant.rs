//! Block-sparse quantization: a vector cut into fixed blocks, the blocks holding the least energy
//! dropped (a bitmap records which are kept), each kept block stored as int8, int6, int5, int4, int3
//! or int2 with one f16 scale — a layout a SIMD decoder reads in one pass (bitmap word, then the kept
//! blocks in order).
//!
//! Quantization is symmetric round-to-nearest, `q = clamp(round(x / d), −qmax, qmax)` (`qmax` =
//! 127, 31, 15, 7, 3, 1), with the scale `d` of each block chosen to minimise the block's squared error
//! among `max|x|/qmax · f` for `f` in `{1, 0.95, …, 0.5}`: clipping the few largest values of a
//! block buys a finer step for the rest, which pays most at few bits. `f = 1` (no clipping) is
//! among the candidates, so a block is never worse than plain absmax scaling. Dropping blocks in
//! order of increasing energy removes at most `drop_energy · ‖x‖²`.
//!
//! Codes are packed little-endian within each block: value `j` of a block occupies bits
//! `j·b … j·b + b − 1` of the block's bytes (for int4: low nibble first).

use half::f16;

/// Bits per stored value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum QuantBits {
    /// int8 in [-127, 127].
    Int8,
    /// int6 in [-31, 31], four per three bytes.
    Int6,
    /// int5 in [-15, 15], eight per five bytes.
    Int5,
    /// int4 in [-7, 7], two per byte (low nibble first).
    Int4,
    /// int3 in [-3, 3], eight per three bytes.
    Int3,
    /// int2 in [-1, 1] (ternary), four per byte.
    Int2,
}

impl QuantBits {
    /// Every width, widest first.
    pub const ALL: [QuantBits; 6] = [
        QuantBits::Int8,
        QuantBits::Int6,
        QuantBits::Int5,
        QuantBits::Int4,
        QuantBits::Int3,
        QuantBits::Int2,
    ];

    /// Bits of one stored value.
    pub fn bits(self) -> usize {
        match self {
            QuantBits::Int8 => 8,
            QuantBits::Int6 => 6,
            QuantBits::Int5 => 5,
            QuantBits::Int4 => 4,
            QuantBits::Int3 => 3,
            QuantBits::Int2 => 2,
        }
    }

    /// Largest magnitude of a quantized value.
    fn qmax(self) -> f32 {
        ((1i32 << (self.bits() - 1)) - 1) as f32
    }

    /// Bytes one block of `block` values takes.
    pub fn block_bytes(self, block: usize) -> usize {
        (block * self.bits()).div_ceil(8)
    }

    /// The name used in files and reports (`int8`, `int6`, `int5`, `int4`, `int3`, `int2`).
    pub fn name(self) -> &'static str {
        match self {
            QuantBits::Int8 => "int8",
            QuantBits::Int6 => "int6",
            QuantBits::Int5 => "int5",
            QuantBits::Int4 => "int4",
            QuantBits::Int3 => "int3",
            QuantBits::Int2 => "int2",
        }
    }

    /// Parses [`QuantBits::name`].
    pub fn parse(s: &str) -> Option<Self> {
        QuantBits::ALL.into_iter().find(|b| b.name() == s)
    }
}

/// How many clipping factors the scale search tries: 1, 0.95, …, 0.5.
const CLIP_STEPS: usize = 11;

/// The scale of one block: `max|x|/qmax · f` minimising the block's squared error.
fn block_scale(chunk: &[f32], qmax: f32) -> f16 {
    let amax = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let mut best = (f64::INFINITY, f16::from_f32(amax / qmax));
    for step in 0..CLIP_STEPS {
        let d = f16::from_f32(amax / qmax * (1.0 - 0.05 * step as f32));
        let df = d.to_f32();
        if df <= 0.0 {
            break;
        }
        let err: f64 = chunk
            .iter()
            .map(|&v| {
                let q = (v / df).round().clamp(-qmax, qmax);
                ((v - q * df) as f64).powi(2)
            })
            .sum();
        if err < best.0 {
            best = (err, d);
        }
    }
    best.1
}

/// A block-sparse quantized vector.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockQuant {
    /// Bits per value.
    pub bits: QuantBits,
    /// Values per block (the last block may be shorter).
    pub block: usize,
    /// Length of the original vector.
    pub len: usize,
    /// Bit `i` set when block `i` is kept (64 blocks per word).
    pub kept: Vec<u64>,
    /// One scale per kept block, in block order.
    pub scales: Vec<f16>,
    /// The kept blocks' values, in block order, each block padded to a whole block.
    pub data: Vec<u8>,
}

impl BlockQuant {
    /// Quantizes `values` in blocks of `block` (> 0), dropping the lowest-energy blocks whose
    /// energy adds up to at most `drop_energy` (in `[0, 1)`) of the total.
    pub fn quantize(values: &[f32], block: usize, bits: QuantBits, drop_energy: f64) -> Self {
        assert!(block > 0, "block size must be positive");
        let n_blocks = values.len().div_ceil(block);
        let energy: Vec<f64> = values
            .chunks(block)
            .map(|c| c.iter().map(|&v| (v as f64).powi(2)).sum())
            .collect();
        let total: f64 = energy.iter().sum();
        let mut keep = vec![true; n_blocks];
        if drop_energy > 0.0 && total > 0.0 {
            let mut order: Vec<usize> = (0..n_blocks).collect();
            order.sort_by(|&a, &b| energy[a].total_cmp(&energy[b]));
            let budget = drop_energy * total;
            let mut dropped = 0.0;
            for i in order {
                if dropped + energy[i] > budget {
                    break;
                }
                dropped += energy[i];
                keep[i] = false;
            }
        }
        let mut kept = vec![0u64; n_blocks.div_ceil(64)];
        let mut scales = Vec::new();
        let mut codes = Vec::new();
        let qmax = bits.qmax();
        let mask = ((1u16 << bits.bits()) - 1) as u8;
        for (i, chunk) in values.chunks(block).enumerate() {
            if !keep[i] {
                continue;
            }
            kept[i / 64] |= 1 << (i % 64);
            let d = block_scale(chunk, qmax);
            scales.push(d);
            let df = d.to_f32();
            // Dividing (not multiplying by 1/d) rounds exactly as the scale search did.
            codes.extend(chunk.iter().map(|&v| {
                let q = if df > 0.0 {
                    (v / df).round().clamp(-qmax, qmax) as i8
                } else {
                    0
                };
                q as u8 & mask
            }));
            // The last block is padded to a whole block with zero codes.
            codes.resize(codes.len().next_multiple_of(block), 0);
        }
        let mut q = BlockQuant {
            bits,
            block,
            len: values.len(),
            kept,
            scales,
            data: Vec::new(),
        };
        q.set_codes(&codes);
        q
    }

    /// Whether block `i` is kept.
    pub fn is_kept(&self, i: usize) -> bool {
        self.kept
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Kept blocks.
    pub fn kept_blocks(&self) -> usize {
        self.kept.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Bytes stored: values, scales and bitmap.
    pub fn bytes(&self) -> usize {
        self.data.len() + 2 * self.scales.len() + 8 * self.kept.len()
    }

    /// Checks that the parts agree (lengths of bitmap, scales and data); for data read from disk.
    pub fn validate(&self) -> Result<(), String> {
        if self.block == 0 {
            return Err("block size 0".into());
        }
        let n_blocks = self.len.div_ceil(self.block);
        if self.kept.len() != n_blocks.div_ceil(64) {
            return Err(format!(
                "bitmap of {} words for {n_blocks} blocks",
                self.kept.len()
            ));
        }
        if (n_blocks..self.kept.len() * 64).any(|i| self.is_kept(i)) {
            return Err("bitmap marks blocks past the end".into());
        }
        let kept = self.kept_blocks();
        if self.scales.len() != kept || self.data.len() != kept * self.bits.block_bytes(self.block)
        {
            return Err(format!(
                "{kept} kept blocks but {} scales and {} data bytes",
                self.scales.len(),
                self.data.len()
            ));
        }
        Ok(())
    }

    /// Values the kept blocks hold, padding included (`kept_blocks · block`): the number of
    /// codes [`BlockQuant::codes`] returns.
    pub fn code_count(&self) -> usize {
        self.kept_blocks() * self.block
    }

    /// Every stored code as one symbol in `0 .. 2^bits` (the two's-complement bit field), block
    /// by block: what an entropy coder codes instead of the packed bytes.
    pub fn codes(&self) -> Vec<u8> {
        let b = self.bits.bits();
        if b == 8 {
            return self.data.clone();
        }
        let mask = (1u64 << b) - 1;
        let mut out = vec![0u8; self.code_count()];
        let bytes = self.bits.block_bytes(self.block);
        for (src, dst) in self
            .data
            .chunks_exact(bytes)
            .zip(out.chunks_exact_mut(self.block))
        {
            for_each_octet(src, dst.len(), b, |j, word, n| {
                for (k, d) in dst[j..j + n].iter_mut().enumerate() {
                    *d = (word >> (k * b) & mask) as u8;
                }
            });
        }
        out
    }

    /// Replaces the packed bytes by `codes` (as [`BlockQuant::codes`] returns them), packing
    /// each block's codes little-endian again.
    ///
    /// # Panics
    /// If `codes.len() != self.code_count()`.
    pub fn set_codes(&mut self, codes: &[u8]) {
        assert_eq!(codes.len(), self.code_count(), "one code per kept value");
        let b = self.bits.bits();
        if b == 8 {
            self.data = codes.to_vec();
            return;
        }
        let bytes = self.bits.block_bytes(self.block);
        self.data = vec![0u8; self.kept_blocks() * bytes];
        let mask = (1u64 << b) - 1;
        for (dst, block) in self
            .data
            .chunks_exact_mut(bytes)
            .zip(codes.chunks_exact(self.block))
        {
            // Eight codes of b bits are exactly b bytes; the block's last octet may be partial.
            for (j, octet) in block.chunks(8).enumerate() {
                let word = (octet.iter().enumerate())
                    .fold(0u64, |w, (k, &c)| w | (c as u64 & mask) << (k * b));
                let at = j * b;
                let n = (octet.len() * b).div_ceil(8);
                dst[at..at + n].copy_from_slice(&word.to_le_bytes()[..n]);
            }
        }
    }

    /// Writes the dequantized vector into `out` (`len` values; dropped blocks are zero).
    ///
    /// # Panics
    /// If `out.len() != self.len` or the parts disagree (see [`BlockQuant::validate`]).
    pub fn dequantize_into(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.len, "output length");
        let bytes = self.bits.block_bytes(self.block);
        let mut k = 0;
        for (i, chunk) in out.chunks_mut(self.block).enumerate() {
            if !self.is_kept(i) {
                chunk.fill(0.0);
                continue;
            }
            let d = self.scales[k].to_f32();
            let src = &self.data[k * bytes..(k + 1) * bytes];
            match self.bits {
                QuantBits::Int8 => {
                    for (o, &q) in chunk.iter_mut().zip(src) {
                        *o = d * (q as i8) as f32;
                    }
                }
                QuantBits::Int4 => {
                    // Sign-extend each nibble: shift it to the top of an i8, then back.
                    for (j, o) in chunk.iter_mut().enumerate() {
                        let b = src[j / 2];
                        let nib = if j % 2 == 0 { b << 4 } else { b & 0xf0 };
                        *o = d * ((nib as i8) >> 4) as f32;
                    }
                }
                _ => {
                    let b = self.bits.bits();
                    for_each_octet(src, chunk.len(), b, |j, word, n| {
                        for (k, o) in chunk[j..j + n].iter_mut().enumerate() {
                            // The code's top bit to bit 63, then an arithmetic shift back.
                            let code = ((word << (64 - b - k * b)) as i64) >> (64 - b);
                            *o = d * code as f32;
                        }
                    });
                }
            }
            k += 1;
        }
    }

    /// The dequantized vector.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len];
        self.dequantize_into(&mut out);
        out
    }
}

/// Calls `f(j, word, n)` for each run of up to eight codes of `b` bits (`b < 8`) in the packed
/// block `src` holding `len` codes: `word` holds codes `j .. j + n` little-endian, `b` bits each.
/// Eight codes are exactly `b` bytes, so one little-endian load replaces eight unaligned ones.
#[inline(always)]
fn for_each_octet(src: &[u8], len: usize, b: usize, mut f: impl FnMut(usize, u64, usize)) {
    let mut j = 0;
    while j < len {
        let n = (len - j).min(8);
        let at = j / 8 * b;
        let bytes = &src[at..(at + b).min(src.len())];
        let mut word = [0u8; 8];
        word[..bytes.len()].copy_from_slice(bytes);
        f(j, u64::from_le_bytes(word), n);
        j += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::SplitMix64::new(seed);
        (0..n)
            .map(|i| {
                // Blocks of very different magnitude, so dropping has something to choose.
                let scale = 1.0 + (i / 7 % 5) as f32 * 3.0;
                scale * rng.centered_f32()
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Every kept value is within half a step of the original, dropped blocks are zero, and
        /// the dropped energy stays within the budget.
        #[test]
        fn round_trip_error_is_bounded(n in 1usize..300, block in 1usize..70, seed in any::<u64>(),
                                       width in 0usize..6, drop in 0.0f64..0.5) {
            let bits = QuantBits::ALL[width];
            let x = values(n, seed);
            let q = BlockQuant::quantize(&x, block, bits, drop);
            prop_assert!(q.validate().is_ok());
            // The codes as symbols round-trip through the packed bytes.
            let codes = q.codes();
            prop_assert_eq!(codes.len(), q.code_count());
            prop_assert!(codes.iter().all(|&c| (c as usize) < 1 << bits.bits()));
            let mut repacked = q.clone();
            repacked.set_codes(&codes);
            prop_assert_eq!(&repacked, &q);
            let y = q.dequantize();
            // Against a bit-by-bit reading of the layout: value j of kept block k is the
            // two's-complement field at bits j·b … j·b + b − 1 of the block's bytes, times its scale.
            let b = bits.bits();
            let block_bytes = bits.block_bytes(block);
            let kept_ids: Vec<usize> = (0..n.div_ceil(block)).filter(|&i| q.is_kept(i)).collect();
            for (k, &i) in kept_ids.iter().enumerate() {
                let src = &q.data[k * block_bytes..(k + 1) * block_bytes];
                for j in 0..block.min(n - i * block) {
                    let field = (0..b).fold(0i32, |f, t| {
                        let bit = j * b + t;
                        f | (((src[bit / 8] >> (bit % 8)) & 1) as i32) << t
                    });
                    let code = if field >> (b - 1) == 1 { field - (1 << b) } else { field };
                    prop_assert_eq!(codes[k * block + j] as i32, field);
                    prop_assert_eq!(y[i * block + j], q.scales[k].to_f32() * code as f32);
                }
            }
            let total: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum();
            let mut dropped = 0.0;
            let mut k = 0;
            for (i, (xc, yc)) in x.chunks(block).zip(y.chunks(block)).enumerate() {
                if !q.is_kept(i) {
                    prop_assert!(yc.iter().all(|&v| v == 0.0));
                    dropped += xc.iter().map(|&v| (v as f64).powi(2)).sum::<f64>();
                    continue;
                }
                let d = q.scales[k].to_f32();
                k += 1;
                let amax = xc.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let top = d * bits.qmax();
                for (a, b) in xc.iter().zip(yc) {
                    // Half a step inside the grid, the clipped excess outside it, plus the f16
                    // rounding of the scale times the largest code.
                    let tol = 0.5 * d + (a.abs() - top).max(0.0) + amax * 1e-3 + 1e-7;
                    prop_assert!((a - b).abs() <= tol, "{} vs {} (d {})", a, b, d);
                }
                // The searched scale is never worse than absmax scaling.
                let sq = |y: &mut dyn Iterator<Item = f32>| -> f64 {
                    xc.iter().zip(y).map(|(a, b)| ((a - b) as f64).powi(2)).sum()
                };
                let plain = f16::from_f32(amax / bits.qmax()).to_f32();
                let err_plain = sq(&mut xc.iter().map(|&v| {
                    if plain > 0.0 { (v / plain).round().clamp(-bits.qmax(), bits.qmax()) * plain } else { 0.0 }
                }));
                let err = sq(&mut yc.iter().copied());
                prop_assert!(err <= err_plain * (1.0 + 1e-6) + 1e-12, "{} > {}", err, err_plain);
            }
            prop_assert!(dropped <= drop * total + 1e-9 * total.max(1.0));
        }
    }

    #[test]
    fn layout_and_sizes() {
        let x = values(100, 3);
        let q = BlockQuant::quantize(&x, 32, QuantBits::Int4, 0.0);
        assert_eq!(q.kept_blocks(), 4);
        assert_eq!(q.data.len(), 4 * 16);
        assert_eq!(q.bytes(), 64 + 8 + 8);
        let q8 = BlockQuant::quantize(&x, 32, QuantBits::Int8, 0.0);
        assert_eq!(q8.data.len(), 4 * 32);
        // int8 is close to exact.
        let err: f32 = x
            .iter()
            .zip(q8.dequantize())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 0.05, "{err}");
        // Dropping half of the energy drops the weakest blocks first.
        let half = BlockQuant::quantize(&x, 10, QuantBits::Int8, 0.5);
        assert!(half.kept_blocks() < 10 && half.kept_blocks() > 0);
        let mut corrupt = half.clone();
        corrupt.scales.pop();
        assert!(corrupt.validate().is_err());
        assert_eq!(QuantBits::parse("int4"), Some(QuantBits::Int4));
        assert_eq!(QuantBits::parse("int5"), Some(QuantBits::Int5));
        assert_eq!(QuantBits::parse("int7"), None);
        // 32 values take 24 bytes at int6, 20 at int5, 12 at int3 and 8 at int2. Every code
        // round-trips through the packing.
        for (bits, bytes) in [
            (QuantBits::Int6, 24),
            (QuantBits::Int5, 20),
            (QuantBits::Int3, 12),
            (QuantBits::Int2, 8),
        ] {
            let q = BlockQuant::quantize(&x, 32, bits, 0.0);
            assert_eq!(q.data.len(), 4 * bytes, "{bits:?}");
            let qmax = bits.qmax() as i32;
            let grid: Vec<f32> = (0..32)
                .map(|j| (j % (2 * qmax + 1) - qmax) as f32)
                .collect();
            let g = BlockQuant::quantize(&grid, 32, bits, 0.0);
            assert_eq!(g.dequantize(), grid, "{bits:?}");
        }
    }
}
