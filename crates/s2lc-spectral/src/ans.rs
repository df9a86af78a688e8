//! Static rANS entropy coding of small-alphabet symbols (the codes of block-quantized values).
//!
//! A fixed-width code stores every int3 value in 3 bits although the values cluster near zero
//! (on real adapter bases the int3 codes carry about 2.6 bits of information, ternary int2
//! codes about 1.5). An entropy coder with a frequency table fitted to the data stores them at
//! close to that entropy, losslessly; decoding is one table lookup and a multiply per symbol.
//!
//! The stream is byte-wise rANS (Duda's asymmetric numeral systems, in the byte-renormalizing
//! form of Giesen's `ryg_rans`), fully specified here so other readers can decode it:
//! - frequencies `f[s]` sum to `M = 2^14`; `c[s] = Σ_{t<s} f[t]`; states `x ∈ [L, 256·L)`,
//!   `L = 2^23`;
//! - two interleaved states, symbol `i` coded with state `i mod 2` (so a decoder works on two
//!   independent dependency chains); the stream starts with the encoder's final states 0 and 1,
//!   4 big-endian bytes each;
//! - decoding symbol `i` with its state `x`: `s` is the symbol with `c[s] ≤ x mod M < c[s] + f[s]`,
//!   then `x ← f[s]·⌊x / M⌋ + (x mod M) − c[s]`, then while `x < L`: `x ← 256·x + next byte`;
//! - after the last symbol both states are exactly `L` and every byte has been read (a check
//!   against corruption or a wrong symbol count).

use thiserror::Error;

/// Bits of the frequency total `M`.
const PROB_BITS: u32 = 14;
/// Frequency total: every table's frequencies sum to this.
pub const ANS_TOTAL: u32 = 1 << PROB_BITS;
/// Lower bound of the normalized state.
const STATE_LOW: u32 = 1 << 23;

/// A stream or table that cannot be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AnsError {
    /// The frequencies do not sum to [`ANS_TOTAL`], or the alphabet is empty or too large.
    #[error("frequency table of {symbols} symbols sums to {sum}, not {ANS_TOTAL}")]
    Table {
        /// Symbols in the table.
        symbols: usize,
        /// Sum of their frequencies.
        sum: u64,
    },
    /// The stream ended early, has bytes left over, or does not end in the initial state.
    #[error("entropy-coded stream is corrupt: {0}")]
    Stream(&'static str),
}

/// The frequency table of one alphabet `0..len` (symbols never seen have frequency 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnsTable {
    freqs: Vec<u16>,
    cum: Vec<u32>,
}

impl AnsTable {
    /// The table fitted to `symbols` over the alphabet `0..alphabet`: frequencies proportional
    /// to the counts, every symbol seen at least 1.
    ///
    /// # Panics
    /// If a symbol is `>= alphabet`, or `alphabet` is 0 or larger than 256.
    pub fn fit(symbols: &[u8], alphabet: usize) -> Self {
        assert!((1..=256).contains(&alphabet), "alphabet of {alphabet}");
        let mut counts = vec![0u64; alphabet];
        for &s in symbols {
            counts[s as usize] += 1;
        }
        let n: u64 = counts.iter().sum();
        if n == 0 {
            // Nothing to code: any valid table will do.
            let mut freqs = vec![0u16; alphabet];
            freqs[0] = ANS_TOTAL as u16;
            return AnsTable::from_freqs(freqs).expect("valid by construction");
        }
        let mut freqs: Vec<u32> = counts
            .iter()
            .map(|&c| match c {
                0 => 0,
                c => ((c as f64 * ANS_TOTAL as f64 / n as f64).round() as u32).max(1),
            })
            .collect();
        // Rounding leaves the sum a little off M: take from (or give to) the most frequent
        // symbols, where a unit costs the least, never taking a symbol below 1.
        let mut sum: u32 = freqs.iter().sum();
        while sum != ANS_TOTAL {
            let (i, _) = freqs
                .iter()
                .enumerate()
                .filter(|&(_, &f)| sum < ANS_TOTAL || f > 1)
                .max_by_key(|&(_, &f)| f)
                .expect("a symbol above 1 exists while the sum exceeds M");
            if sum > ANS_TOTAL {
                freqs[i] -= 1;
                sum -= 1;
            } else {
                freqs[i] += 1;
                sum += 1;
            }
        }
        AnsTable::from_freqs(freqs.into_iter().map(|f| f as u16).collect())
            .expect("valid by construction")
    }

    /// A table read back from a file; its frequencies must sum to [`ANS_TOTAL`].
    pub fn from_freqs(freqs: Vec<u16>) -> Result<Self, AnsError> {
        let sum: u64 = freqs.iter().map(|&f| f as u64).sum();
        if freqs.is_empty() || freqs.len() > 256 || sum != ANS_TOTAL as u64 {
            return Err(AnsError::Table {
                symbols: freqs.len(),
                sum,
            });
        }
        let mut cum = Vec::with_capacity(freqs.len());
        let mut c = 0u32;
        for &f in &freqs {
            cum.push(c);
            c += f as u32;
        }
        Ok(AnsTable { freqs, cum })
    }

    /// The frequencies, one per symbol of the alphabet (what a file stores).
    pub fn freqs(&self) -> &[u16] {
        &self.freqs
    }

    /// Bits `symbols` take under this table (the ideal code length, without the 8 bytes of states).
    pub fn cost_bits(&self, symbols: &[u8]) -> f64 {
        symbols
            .iter()
            .map(|&s| PROB_BITS as f64 - (self.freqs[s as usize] as f64).log2())
            .sum()
    }

    /// Encodes `symbols`.
    ///
    /// # Panics
    /// If a symbol is outside the alphabet or has frequency 0.
    pub fn encode(&self, symbols: &[u8]) -> Vec<u8> {
        // rANS is last-in first-out: encode backwards into a reversed buffer, then flip it.
        let mut out = Vec::with_capacity(symbols.len() / 2 + 8);
        let mut states = [STATE_LOW; 2];
        for (i, &s) in symbols.iter().enumerate().rev() {
            let x = &mut states[i % 2];
            let f = self.freqs[s as usize] as u32;
            assert!(f > 0, "symbol {s} has frequency 0");
            let x_max = ((STATE_LOW >> PROB_BITS) << 8) * f;
            while *x >= x_max {
                out.push(*x as u8);
                *x >>= 8;
            }
            *x = ((*x / f) << PROB_BITS) + *x % f + self.cum[s as usize];
        }
        out.extend_from_slice(&states[1].to_le_bytes());
        out.extend_from_slice(&states[0].to_le_bytes());
        out.reverse();
        out
    }

    /// Decodes `out.len()` symbols from `bytes`, checking that the stream is consumed exactly.
    pub fn decode_into(&self, bytes: &[u8], out: &mut [u8]) -> Result<(), AnsError> {
        let state = |at: usize| -> Result<u32, AnsError> {
            let x = bytes
                .get(at..at + 4)
                .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
                .ok_or(AnsError::Stream("shorter than its two 4-byte states"))?;
            // The encoder keeps a state in [L, 256·L); decoding keeps it there too (and so
            // never overflows) once it starts there.
            match (STATE_LOW..STATE_LOW << 8).contains(&x) {
                true => Ok(x),
                false => Err(AnsError::Stream("state outside its range")),
            }
        };
        let mut states = [state(0)?, state(4)?];
        // Slot → symbol: one lookup per decoded symbol.
        let mut slot_symbol = vec![0u8; ANS_TOTAL as usize];
        for (s, (&c, &f)) in self.cum.iter().zip(&self.freqs).enumerate() {
            slot_symbol[c as usize..(c + f as u32) as usize].fill(s as u8);
        }
        // Two zero bytes past the end let renormalization read without a branch; reading into
        // them is caught by the byte count at the end.
        let mut padded = Vec::with_capacity(bytes.len() + 2);
        padded.extend_from_slice(bytes);
        padded.extend_from_slice(&[0, 0]);
        let mut at = 8;
        let mask = ANS_TOTAL - 1;
        for (i, o) in out.iter_mut().enumerate() {
            let x = &mut states[i % 2];
            let slot = *x & mask;
            let s = slot_symbol[slot as usize];
            let (f, c) = (self.freqs[s as usize] as u32, self.cum[s as usize]);
            *x = f * (*x >> PROB_BITS) + slot - c;
            // x ≥ 2^9 here; it takes one byte below L = 2^23 and two below 2^15.
            let n = (*x < STATE_LOW) as u32 + (*x < STATE_LOW >> 8) as u32;
            let next = padded
                .get(at..at + 2)
                .map(|b| (b[0] as u32) << 8 | b[1] as u32)
                .ok_or(AnsError::Stream("ends early"))?;
            *x = (*x << (8 * n)) | next >> (8 * (2 - n));
            at += n as usize;
            *o = s;
        }
        if at > bytes.len() {
            return Err(AnsError::Stream("ends early"));
        }
        if states != [STATE_LOW; 2] {
            return Err(AnsError::Stream("does not end in the initial state"));
        }
        if at != bytes.len() {
            return Err(AnsError::Stream("has bytes after its last symbol"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Symbols clustered near the middle of the alphabet, like quantized Gaussian values.
    fn peaked(n: usize, alphabet: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let a = (state >> 40) % alphabet as u64;
                let b = (state >> 20) % alphabet as u64;
                ((a + b) / 2) as u8
            })
            .collect()
    }

    fn entropy_bits(symbols: &[u8]) -> f64 {
        let mut counts = [0usize; 256];
        for &s in symbols {
            counts[s as usize] += 1;
        }
        let n = symbols.len() as f64;
        counts
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| -(c as f64) * (c as f64 / n).log2())
            .sum()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Decoding returns exactly what was encoded, for any alphabet and length.
        #[test]
        fn round_trip(n in 0usize..3000, alphabet in 1usize..=256, seed in any::<u64>()) {
            let symbols = peaked(n, alphabet, seed);
            let table = AnsTable::fit(&symbols, alphabet);
            prop_assert_eq!(table.freqs().iter().map(|&f| f as u32).sum::<u32>(), ANS_TOTAL);
            let bytes = table.encode(&symbols);
            let mut back = vec![0u8; n];
            table.decode_into(&bytes, &mut back).unwrap();
            prop_assert_eq!(&back, &symbols);
        }
    }

    #[test]
    fn size_is_close_to_the_entropy() {
        for alphabet in [3, 8, 16, 256] {
            let symbols = peaked(100_000, alphabet, 7);
            let table = AnsTable::fit(&symbols, alphabet);
            let bytes = table.encode(&symbols).len() as f64;
            let h = entropy_bits(&symbols) / 8.0;
            // Within 0.5 % (plus the states) of the empirical entropy, and the cost estimate
            // matches the stream.
            assert!(bytes <= h * 1.005 + 12.0, "{alphabet}: {bytes} vs {h}");
            assert!((table.cost_bits(&symbols) / 8.0 - bytes).abs() < 0.002 * bytes + 12.0);
        }
    }

    #[test]
    fn corruption_and_bad_tables_are_errors() {
        let symbols = peaked(5000, 16, 3);
        let table = AnsTable::fit(&symbols, 16);
        let bytes = table.encode(&symbols);
        let mut out = vec![0u8; symbols.len()];
        // Truncated, padded, a symbol too many or too few, a flipped byte.
        assert!(table
            .decode_into(&bytes[..bytes.len() - 1], &mut out)
            .is_err());
        let mut padded = bytes.clone();
        padded.push(0);
        assert!(table.decode_into(&padded, &mut out).is_err());
        assert!(table.decode_into(&bytes, &mut out[1..]).is_err());
        let mut more = vec![0u8; symbols.len() + 1];
        assert!(table.decode_into(&bytes, &mut more).is_err());
        let mut flipped = bytes.clone();
        flipped[bytes.len() / 2] ^= 0x10;
        let wrong = table.decode_into(&flipped, &mut out);
        assert!(wrong.is_err() || out != symbols);
        assert!(table.decode_into(&[1, 2], &mut out).is_err());
        assert!(matches!(
            AnsTable::from_freqs(vec![1, 2, 3]),
            Err(AnsError::Table { symbols: 3, sum: 6 })
        ));
        assert!(AnsTable::from_freqs(vec![]).is_err());
    }
}
