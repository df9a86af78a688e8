//! The recent window of a compressed cache: committed rows held at f32, f16 or int8 per group of
//! 32, plus the rows of the pass in flight (f32 until committed). Attention reads the window as
//! f32 rows: the f32 form in place, the others dequantized into a scratch buffer per call.

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::quant::{dequantize_groups, quantize_groups, GROUP};

/// How committed window rows are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecentDtype {
    /// f32 (exact).
    F32,
    /// f16.
    F16,
    /// int8 per group of 32 with an f16 scale (as `q8_0`).
    Q8,
}

impl RecentDtype {
    /// The name used in specs (`f32`, `f16`, `q8`).
    pub fn name(self) -> &'static str {
        match self {
            RecentDtype::F32 => "f32",
            RecentDtype::F16 => "f16",
            RecentDtype::Q8 => "q8",
        }
    }
}

/// The rows of one side (keys or values) of one layer's window.
#[derive(Debug, Clone)]
pub struct Recent {
    dtype: RecentDtype,
    width: usize,
    /// F32: committed rows then the pending ones. Others: the pending rows only.
    rows: Vec<f32>,
    half: Vec<f16>,
    quants: Vec<u8>,
    scales: Vec<f16>,
    committed: usize,
}

impl Recent {
    /// An empty window of rows `width` wide (a multiple of 32 for [`RecentDtype::Q8`]) with room
    /// for `capacity` rows.
    pub fn new(dtype: RecentDtype, width: usize, capacity: usize) -> Self {
        let f32_rows = if dtype == RecentDtype::F32 {
            capacity * width
        } else {
            0
        };
        Recent {
            dtype,
            width,
            rows: Vec::with_capacity(f32_rows),
            half: Vec::new(),
            quants: Vec::new(),
            scales: Vec::new(),
            committed: 0,
        }
    }

    /// Committed rows.
    pub fn tokens(&self) -> usize {
        self.committed
    }

    /// Replaces the pending rows (those of an uncommitted pass) by `rows`.
    pub fn set_pending(&mut self, rows: &[f32]) {
        let keep = if self.dtype == RecentDtype::F32 {
            self.committed * self.width
        } else {
            0
        };
        self.rows.truncate(keep);
        self.rows.extend_from_slice(rows);
    }

    /// Commits the pending rows.
    pub fn commit(&mut self) {
        let pending = match self.dtype {
            RecentDtype::F32 => self.rows.len() / self.width - self.committed,
            RecentDtype::F16 => {
                let at = self.half.len();
                self.half.resize(at + self.rows.len(), f16::ZERO);
                self.half[at..].convert_from_f32_slice(&self.rows);
                self.rows.len() / self.width
            }
            RecentDtype::Q8 => {
                let (q, s) = quantize_groups(&self.rows, 8);
                self.quants.extend_from_slice(&q);
                self.scales.extend_from_slice(&s);
                self.rows.len() / self.width
            }
        };
        if self.dtype != RecentDtype::F32 {
            self.rows.clear();
        }
        self.committed += pending;
    }

    /// Committed then pending rows as f32: in place for f32, else dequantized into `scratch`.
    pub fn view<'a>(&'a self, scratch: &'a mut Vec<f32>) -> &'a [f32] {
        if self.dtype == RecentDtype::F32 {
            return &self.rows;
        }
        let n = self.committed * self.width;
        scratch.clear();
        scratch.resize(n, 0.0);
        self.read_committed(0, scratch);
        scratch.extend_from_slice(&self.rows);
        scratch
    }

    /// Committed values from element `at` into `out`.
    fn read_committed(&self, at: usize, out: &mut [f32]) {
        match self.dtype {
            RecentDtype::F32 => out.copy_from_slice(&self.rows[at..at + out.len()]),
            RecentDtype::F16 => self.half[at..at + out.len()].convert_to_f32_slice(out),
            RecentDtype::Q8 => dequantize_groups(8, &self.quants, &self.scales, at, out),
        }
    }

    /// Removes the oldest `tokens` committed rows and returns them as f32.
    pub fn take_front(&mut self, tokens: usize) -> Vec<f32> {
        let n = tokens * self.width;
        let mut out = vec![0.0; n];
        self.read_committed(0, &mut out);
        match self.dtype {
            RecentDtype::F32 => drop(self.rows.drain(..n)),
            RecentDtype::F16 => drop(self.half.drain(..n)),
            RecentDtype::Q8 => {
                self.quants.drain(..n);
                self.scales.drain(..n / GROUP);
            }
        }
        self.committed -= tokens;
        out
    }

    /// Bytes of the committed rows.
    pub fn bytes(&self) -> usize {
        let n = self.committed * self.width;
        match self.dtype {
            RecentDtype::F32 => 4 * n,
            RecentDtype::F16 => 2 * n,
            RecentDtype::Q8 => n + 2 * n / GROUP,
        }
    }

    /// Forgets every row.
    pub fn clear(&mut self) {
        self.rows.clear();
        self.half.clear();
        self.quants.clear();
        self.scales.clear();
        self.committed = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::testutil::data;

    #[test]
    fn windows_round_trip_and_count_their_bytes() {
        let width = 64;
        let x = data(10 * width, 1);
        for (dtype, bytes_per_row, tol) in [
            (RecentDtype::F32, 256, 0.0),
            (RecentDtype::F16, 128, 1e-3),
            (RecentDtype::Q8, 68, 5e-3),
        ] {
            let mut w = Recent::new(dtype, width, 16);
            w.set_pending(&x[..4 * width]);
            w.commit();
            // An uncommitted pass is replaced by the next one.
            w.set_pending(&x[..width]);
            w.set_pending(&x[4 * width..10 * width]);
            let mut scratch = Vec::new();
            let v = w.view(&mut scratch).to_vec();
            assert_eq!(v.len(), x.len());
            assert_eq!(
                v[4 * width..],
                x[4 * width..],
                "{dtype:?}: pending rows exact"
            );
            w.commit();
            assert_eq!(
                (w.tokens(), w.bytes()),
                (10, 10 * bytes_per_row),
                "{dtype:?}"
            );
            let front = w.take_front(3);
            for (a, b) in front.iter().zip(&x) {
                assert!((a - b).abs() <= tol, "{dtype:?}: {a} vs {b}");
            }
            let rest = w.view(&mut scratch).to_vec();
            for (a, b) in rest.iter().zip(&x[3 * width..]) {
                assert!((a - b).abs() <= tol, "{dtype:?}: {a} vs {b}");
            }
            assert_eq!((w.tokens(), w.bytes()), (7, 7 * bytes_per_row));
        }
    }
}
