//! Quantized shared bases with a bit width per column, and the allocation that picks the widths.
//!
//! A basis column `uⱼ` quantized with relative squared error `Dⱼ(b)` at `b` bits moves every delta
//! built on it by `‖δuⱼ‖²·‖(C·Vᵀ)ⱼ‖² = Dⱼ(b)·eⱼ`, where `eⱼ` is the members' energy along `uⱼ`.
//! With one width for all columns the weak columns get as many bits as the strong ones; rate
//! allocation (as in transform coding) instead spends each extra bit where it removes the most
//! weighted error, `eⱼ·(Dⱼ(b) − Dⱼ(b′))` per added bit, under the same total of bits.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use faer::{Mat, MatRef};
use rayon::prelude::*;

use s2lc_spectral::{AnsTable, BlockQuant, QuantBits};

use crate::qmat::QMat;

/// A basis (`rows × cols`) stored as column groups side by side, each block-quantized row-major at
/// its own width. A uniform basis is one group.
#[derive(Debug, Clone, PartialEq)]
pub struct QBasis {
    /// Rows.
    pub rows: usize,
    /// Columns: the sum of the groups'.
    pub cols: usize,
    /// The column groups, left to right.
    pub groups: Vec<QMat>,
}

impl QBasis {
    /// Quantizes `m` at `bits` throughout.
    pub fn uniform(m: MatRef<'_, f32>, block: usize, bits: QuantBits) -> Self {
        QBasis::with_widths(m, block, &vec![bits; m.ncols()])
    }

    /// Quantizes column `j` of `m` at `widths[j]`; each run of equal widths is one group.
    pub fn with_widths(m: MatRef<'_, f32>, block: usize, widths: &[QuantBits]) -> Self {
        assert_eq!(widths.len(), m.ncols(), "one width per column");
        let mut groups = Vec::new();
        let mut start = 0;
        while start < widths.len() {
            let end = start
                + widths[start..]
                    .iter()
                    .take_while(|&&w| w == widths[start])
                    .count();
            groups.push(QMat::new(
                m.subcols(start, end - start),
                block,
                widths[start],
                0.0,
            ));
            start = end;
        }
        if groups.is_empty() {
            // No columns: one empty group keeps the row count in the file.
            groups.push(QMat::new(m, block, QuantBits::Int8, 0.0));
        }
        QBasis {
            rows: m.nrows(),
            cols: m.ncols(),
            groups,
        }
    }

    /// Builds a basis from groups read back from a file, checking that their row counts agree,
    /// that each holds its `rows × cols` values, and that the whole fits in memory's arithmetic
    /// (a file's sizes are untrusted; the reader has checked them against its limits).
    pub fn from_groups(groups: Vec<QMat>) -> Result<Self, String> {
        let rows = groups.first().ok_or("a basis without groups")?.rows;
        if let Some(g) = groups.iter().find(|g| g.rows != rows) {
            return Err(format!(
                "basis groups of {rows} and {} rows side by side",
                g.rows
            ));
        }
        if let Some(g) = groups
            .iter()
            .find(|g| g.rows.checked_mul(g.cols) != Some(g.q.len))
        {
            return Err(format!(
                "a basis group of {}×{} holds {} values",
                g.rows, g.cols, g.q.len
            ));
        }
        let cols = groups
            .iter()
            .try_fold(0usize, |n, g| n.checked_add(g.cols))
            .filter(|&c| rows.checked_mul(c).is_some())
            .ok_or("a basis too large to address")?;
        Ok(QBasis { rows, cols, groups })
    }

    /// The width of every column, left to right.
    pub fn widths(&self) -> Vec<QuantBits> {
        self.groups
            .iter()
            .flat_map(|g| std::iter::repeat_n(g.q.bits, g.cols))
            .collect()
    }

    /// Bytes stored.
    pub fn bytes(&self) -> usize {
        self.groups.iter().map(QMat::bytes).sum()
    }

    /// The dequantized basis, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        if let [g] = &self.groups[..] {
            return g.q.dequantize();
        }
        let mut out = vec![0.0f32; self.rows * self.cols];
        let mut group = Vec::new();
        let mut at = 0;
        for g in &self.groups {
            group.resize(g.q.len, 0.0);
            g.q.dequantize_into(&mut group);
            // A group is a few columns: an element loop, not a `memcpy` call per row.
            for (dst, src) in out
                .chunks_exact_mut(self.cols.max(1))
                .zip(group.chunks_exact(g.cols.max(1)))
            {
                for (d, &s) in dst[at..at + g.cols].iter_mut().zip(src) {
                    *d = s;
                }
            }
            at += g.cols;
        }
        out
    }

    /// The dequantized basis.
    pub fn to_mat(&self) -> Mat<f32> {
        let data = self.dequantize();
        MatRef::from_row_major_slice(&data, self.rows, self.cols).to_owned()
    }
}

/// Widths a column may get, narrowest first.
const LADDER: [QuantBits; 6] = [
    QuantBits::Int2,
    QuantBits::Int3,
    QuantBits::Int4,
    QuantBits::Int5,
    QuantBits::Int6,
    QuantBits::Int8,
];

/// One basis column to allocate bits to.
pub struct Column {
    /// The members' energy along the column (the weight of its error).
    pub weight: f64,
    /// Its values.
    pub values: Vec<f32>,
}

/// A candidate step: widening column `col` by one rung, removing `gain` weighted error per bit.
struct Step {
    gain: f64,
    col: usize,
}

impl PartialEq for Step {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Step {}
impl PartialOrd for Step {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Step {
    fn cmp(&self, other: &Self) -> Ordering {
        self.gain
            .total_cmp(&other.gain)
            .then(other.col.cmp(&self.col))
    }
}

/// Chooses a width per column so that the columns average at most `average` bits per value and
/// the weighted error `Σ weightⱼ·Dⱼ(widthⱼ)` is small: every column starts at int2, and each step
/// widens the column where one more rung removes the most weighted error per added bit, while the
/// bits allow (greedy rate allocation). `Dⱼ` is measured by quantizing column `j` alone in blocks
/// of `block`, relative to its squared norm.
///
/// With `entropy` the codes will be entropy-coded, so a rung costs what its codes will take under
/// a table fitted per width to every column's codes at that width (int2 codes take about 1.5 bits,
/// not 2), and `average` is in those bits.
pub fn allocate_widths(
    columns: &[&Column],
    block: usize,
    average: f64,
    entropy: bool,
) -> Vec<QuantBits> {
    // Per column and rung: the relative squared error and the codes.
    let quantized: Vec<Vec<(f64, Vec<u8>)>> = columns
        .par_iter()
        .map(|c| {
            let norm: f64 = c.values.iter().map(|&v| (v as f64).powi(2)).sum();
            LADDER
                .iter()
                .map(|&bits| {
                    if norm == 0.0 {
                        return (0.0, Vec::new());
                    }
                    let q = BlockQuant::quantize(&c.values, block, bits, 0.0);
                    let err: f64 = c
                        .values
                        .iter()
                        .zip(&q.dequantize())
                        .map(|(&a, &b)| ((a - b) as f64).powi(2))
                        .sum();
                    (err / norm, if entropy { q.codes() } else { Vec::new() })
                })
                .collect()
        })
        .collect();
    // cost[j][r]: bits of column j's values at rung r.
    let cost: Vec<Vec<f64>> = if entropy {
        let tables: Vec<AnsTable> = (0..LADDER.len())
            .map(|r| {
                let pooled: Vec<u8> = quantized
                    .iter()
                    .flat_map(|q| q[r].1.iter().copied())
                    .collect();
                AnsTable::fit(&pooled, 1 << LADDER[r].bits())
            })
            .collect();
        quantized
            .iter()
            .zip(columns)
            .map(|(q, c)| {
                (0..LADDER.len())
                    .map(|r| match q[r].1.is_empty() {
                        // A zero column: its codes are all zero at every rung.
                        true => c.values.len() as f64,
                        false => tables[r].cost_bits(&q[r].1),
                    })
                    .collect()
            })
            .collect()
    } else {
        columns
            .iter()
            .map(|c| LADDER.map(|b| (c.values.len() * b.bits()) as f64).to_vec())
            .collect()
    };
    let mut rung = vec![0usize; columns.len()];
    // A rung never costs less than the one below it, and a step at least a thousandth of a bit
    // per value, so that gains per bit stay finite.
    let step_cost = |j: usize, r: usize| {
        (cost[j][r + 1] - cost[j][r]).max(1e-3 * columns[j].values.len() as f64)
    };
    let step = |j: usize, r: usize| Step {
        gain: columns[j].weight * (quantized[j][r].0 - quantized[j][r + 1].0) / step_cost(j, r),
        col: j,
    };
    let total: usize = columns.iter().map(|c| c.values.len()).sum();
    // Bits left to spend once every column holds the narrowest rung.
    let mut left = total as f64 * average - cost.iter().map(|c| c[0]).sum::<f64>();
    let mut heap: BinaryHeap<Step> = (0..columns.len()).map(|j| step(j, 0)).collect();
    while let Some(Step { gain, col }) = heap.pop() {
        if gain <= 0.0 {
            break;
        }
        let c = step_cost(col, rung[col]);
        if c > left {
            continue;
        }
        left -= c;
        rung[col] += 1;
        if rung[col] + 1 < LADDER.len() {
            heap.push(step(col, rung[col]));
        }
    }
    rung.into_iter().map(|r| LADDER[r]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(n: usize, seed: u64) -> Vec<f32> {
        crate::test_matrix(n, 1, seed)
            .col(0)
            .iter()
            .copied()
            .collect()
    }

    #[test]
    fn bits_go_to_the_heavy_columns_within_the_budget() {
        let weights = [100.0, 10.0, 1.0, 0.1, 0.0];
        let columns: Vec<Column> = weights
            .iter()
            .enumerate()
            .map(|(j, &w)| Column {
                weight: w,
                values: column(256, j as u64 + 1),
            })
            .collect();
        let refs: Vec<&Column> = columns.iter().collect();
        let widths = allocate_widths(&refs, 32, 4.0, false);
        let bits: Vec<usize> = widths.iter().map(|w| w.bits()).collect();
        assert!(bits.iter().sum::<usize>() <= 4 * columns.len(), "{bits:?}");
        assert!(bits.windows(2).all(|w| w[0] >= w[1]), "{bits:?}");
        assert!(bits[0] > 4 && bits[4] == 2, "{bits:?}");
        // Less weighted error than int4 throughout, at no more bits.
        let weighted = |widths: &[QuantBits]| -> f64 {
            columns
                .iter()
                .zip(widths)
                .map(|(c, &b)| {
                    let q = BlockQuant::quantize(&c.values, 32, b, 0.0).dequantize();
                    c.weight
                        * c.values
                            .iter()
                            .zip(&q)
                            .map(|(&a, &b)| ((a - b) as f64).powi(2))
                            .sum::<f64>()
                })
                .sum()
        };
        let uniform = weighted(&[QuantBits::Int4; 5]);
        assert!(weighted(&widths) < 0.5 * uniform, "{widths:?}");
        // Entropy-coded, the same average buys more: the coded columns fit the budget and
        // carry less weighted error than the fixed-width allocation.
        let coded = allocate_widths(&refs, 32, 4.0, true);
        let mut streams = 0usize;
        for bits in LADDER {
            let symbols: Vec<u8> = columns
                .iter()
                .zip(&coded)
                .filter(|(_, &w)| w == bits)
                .flat_map(|(c, _)| BlockQuant::quantize(&c.values, 32, bits, 0.0).codes())
                .collect();
            if !symbols.is_empty() {
                // The stream without its 16 bytes of rANS states (the allocation counts codes).
                streams += AnsTable::fit(&symbols, 1 << bits.bits())
                    .encode(&symbols)
                    .len()
                    - 16;
            }
        }
        // Within 2 % (the final tables are fitted to fewer columns than the pooled estimate's).
        assert!(
            streams as f64 <= 1.02 * 4.0 * 256.0 * 5.0 / 8.0,
            "{streams} B: {coded:?}"
        );
        assert!(
            weighted(&coded) < weighted(&widths),
            "{coded:?} vs {widths:?}"
        );
        // At the narrowest average there is nothing to give.
        assert!(allocate_widths(&refs, 32, 2.0, false)
            .iter()
            .all(|&w| w == QuantBits::Int2));
    }

    #[test]
    fn groups_rebuild_the_basis() {
        let data = column(64 * 5, 9);
        let m = MatRef::from_row_major_slice(&data, 64, 5);
        let widths = [
            QuantBits::Int8,
            QuantBits::Int8,
            QuantBits::Int4,
            QuantBits::Int2,
            QuantBits::Int2,
        ];
        let b = QBasis::with_widths(m, 32, &widths);
        assert_eq!(b.groups.len(), 3);
        assert_eq!(b.widths(), widths);
        let back = b.to_mat();
        for j in 0..5 {
            let err = (0..64)
                .map(|i| (back[(i, j)] - m[(i, j)]).abs())
                .fold(0.0f32, f32::max);
            // Half a step of the column's width (values in [-0.5, 0.5]).
            let step = 0.5 / ((1 << (widths[j].bits() - 1)) - 1) as f32;
            assert!(err <= 0.5 * step + 1e-3, "column {j}: {err}");
        }
        let regrouped = QBasis::from_groups(b.groups.clone()).expect("same rows");
        assert_eq!(regrouped, b);
        let mut bad = b.groups.clone();
        bad[1] = QMat::new(m.subrows(0, 32), 32, QuantBits::Int4, 0.0);
        assert!(QBasis::from_groups(bad).is_err());
        // A group whose shape is not its values (a file's header lying about them).
        let mut bad = b.groups.clone();
        bad[1].cols += 1;
        assert!(QBasis::from_groups(bad).unwrap_err().contains("holds"));
    }
}
