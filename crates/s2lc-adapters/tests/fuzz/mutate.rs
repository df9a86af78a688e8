//! Mutation: byte-, integer- and JSON-aware edits of one file of an input.

use s2lc_spectral::rng::SplitMix64;

use super::input::Input;

/// The mutation stream: the workspace's generator.
pub type Rng = SplitMix64;

/// True once in `one_in` draws.
pub(super) fn chance(rng: &mut Rng, one_in: usize) -> bool {
    rng.below(one_in) == 0
}

const INTERESTING: [u64; 16] = [
    0,
    1,
    2,
    3,
    7,
    8,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    u64::MAX,
];

const JSON_NUMBERS: [&str; 12] = [
    "0",
    "-1",
    "0.5",
    "1",
    "2",
    "65536",
    "4294967296",
    "18446744073709551615",
    "1e30",
    "99999999",
    "-0",
    "NaN",
];

/// Edits one file of `input` (1–4 stacked mutations); `others` supplies splices.
pub(super) fn mutate(input: &mut Input, others: &[Input], dict: &[Vec<u8>], rng: &mut Rng) {
    if input.is_empty() {
        input.push(Vec::new());
    }
    let f = rng.below(input.len());
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        let v = &mut input[f];
        let len = v.len();
        match rng.below(15) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = match rng.below(3) {
                    0 => INTERESTING[rng.below(9)] as u8,
                    _ => rng.next_u64() as u8,
                };
            }
            2 if len > 0 => {
                // An interesting integer, little-endian, of 2, 4 or 8 bytes.
                let width = [2usize, 4, 8][rng.below(3)];
                let i = rng.below(len);
                let value = match rng.below(4) {
                    0 => rng.next_u64(),
                    1 => (len as u64 + rng.below(16) as u64).wrapping_sub(8),
                    _ => INTERESTING[rng.below(INTERESTING.len())],
                };
                let bytes = value.to_le_bytes();
                let n = width.min(len - i);
                v[i..i + n].copy_from_slice(&bytes[..n]);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let d = 1 + rng.below(16) as u8;
                v[i] = if chance(rng, 2) {
                    v[i].wrapping_add(d)
                } else {
                    v[i].wrapping_sub(d)
                };
            }
            4 if len > 0 => v.truncate(rng.below(len)),
            5 if len > 1 => {
                let a = rng.below(len);
                let n = 1 + rng.below((len - a).min(256));
                v.drain(a..a + n);
            }
            6 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(32);
                let fill: Vec<u8> = if chance(rng, 2) {
                    vec![rng.next_u64() as u8; n]
                } else {
                    (0..n).map(|_| rng.next_u64() as u8).collect()
                };
                v.splice(at..at, fill);
            }
            7 if len > 1 => {
                let a = rng.below(len);
                let n = 1 + rng.below((len - a).min(512));
                let chunk = v[a..a + n].to_vec();
                let at = rng.below(len + 1);
                v.splice(at..at, chunk);
            }
            8 if !others.is_empty() => {
                // A splice: a range of the same file of another input.
                let o = &others[rng.below(others.len())];
                if let Some(src) = o.get(f).filter(|s| !s.is_empty()) {
                    let a = rng.below(src.len());
                    let n = 1 + rng.below((src.len() - a).min(4096));
                    let at = rng.below(len + 1);
                    let end = (at + n).min(len);
                    v.splice(at..end, src[a..a + n].iter().copied());
                }
            }
            9 | 10 if !dict.is_empty() => {
                let token = &dict[rng.below(dict.len())];
                let at = rng.below(len + 1);
                if chance(rng, 2) {
                    v.splice(at..at, token.iter().copied());
                } else {
                    let end = (at + token.len()).min(len);
                    v.splice(at..end, token.iter().copied());
                }
            }
            11 | 12 => json_number(v, rng),
            13 | 14 => json_string(v, dict, rng),
            _ => {
                if len > 0 {
                    let i = rng.below(len);
                    v[i] = rng.next_u64() as u8;
                }
            }
        }
    }
}

/// Replaces a run of digits (a JSON number, say) with an interesting number.
fn json_number(v: &mut Vec<u8>, rng: &mut Rng) {
    let starts: Vec<usize> = (0..v.len())
        .filter(|&i| v[i].is_ascii_digit() && (i == 0 || !v[i - 1].is_ascii_digit()))
        .collect();
    if starts.is_empty() {
        return;
    }
    let a = starts[rng.below(starts.len())];
    let mut b = a;
    while b < v.len() && (v[b].is_ascii_digit() || v[b] == b'.') {
        b += 1;
    }
    let n = JSON_NUMBERS[rng.below(JSON_NUMBERS.len())];
    v.splice(a..b, n.bytes());
}

/// Replaces the contents of a quoted string with a dictionary token.
fn json_string(v: &mut Vec<u8>, dict: &[Vec<u8>], rng: &mut Rng) {
    let quotes: Vec<usize> = (0..v.len()).filter(|&i| v[i] == b'"').collect();
    if quotes.len() < 2 || dict.is_empty() {
        return;
    }
    let k = rng.below(quotes.len() - 1);
    let (a, b) = (quotes[k] + 1, quotes[k + 1]);
    let token = &dict[rng.below(dict.len())];
    v.splice(a..b, token.iter().copied());
}
