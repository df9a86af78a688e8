//! Members and calibrations shared by the tests of packing and of the pack format.

use std::collections::BTreeMap;

use faer::Mat;

use s2lc_model::llama::LinearInput;

use super::linalg::{hcat, scale_cols};
use super::member::{Delta, Member, ModuleKey};
use super::params::InputWhitening;
use crate::test_matrix as matrix;

/// `n` LoRA-like members on two layers × two targets whose column spaces share `common`
/// directions (plus `r − common` of their own).
pub(crate) fn members(
    n: usize,
    rows: usize,
    cols: usize,
    r: usize,
    common: usize,
    seed: u64,
) -> Vec<Member> {
    let shared_b = matrix(rows, common, seed);
    (0..n)
        .map(|i| {
            let deltas = [(0, 0), (0, 2), (1, 0), (1, 2)]
                .into_iter()
                .map(|(layer, target)| {
                    let s = seed ^ ((i * 16 + layer * 4 + target) as u64 + 1);
                    let own = matrix(rows, r - common, s);
                    let b = hcat(&[shared_b.as_ref(), own.as_ref()]);
                    let a = matrix(r, cols, s ^ 0xabc);
                    (ModuleKey { layer, target }, Delta::Factors { b, a })
                })
                .collect();
            Member {
                name: format!("m{i}"),
                deltas,
                weights: BTreeMap::new(),
            }
        })
        .collect()
}

/// Two members with steep spectra (each direction half the one before) on three matrices of
/// 64 × 64: a few basis vectors carry most of the energy.
pub(crate) fn steep_members() -> Vec<Member> {
    let decay: Vec<f32> = (0..6).map(|k| 0.5f32.powi(k)).collect();
    (0..2)
        .map(|i| Member {
            name: format!("s{i}"),
            deltas: [(0usize, 0usize), (0, 2), (1, 4)]
                .into_iter()
                .map(|(layer, target)| {
                    let s = 7 + (i * 8 + layer * 3 + target) as u64;
                    let b = scale_cols(matrix(64, 6, s).as_ref(), &decay);
                    let a = matrix(6, 64, s ^ 0x55);
                    (ModuleKey { layer, target }, Delta::Factors { b, a })
                })
                .collect(),
            weights: BTreeMap::new(),
        })
        .collect()
}

/// Inputs whose features `0..cols/2` are 100x larger than the rest, and their whitening
/// for the q/v matrices of layers 0 and 1 (what the test members adapt).
pub(crate) fn skewed_inputs(cols: usize) -> (Mat<f32>, InputWhitening) {
    let x = Mat::from_fn(4 * cols, cols, |i, j| {
        let scale = if j < cols / 2 { 1.0 } else { 0.01 };
        matrix(4 * cols, cols, 77)[(i, j)] * scale
    });
    let g = x.transpose() * &x;
    let grams = (0..2)
        .map(|layer| ((layer, LinearInput::Attention), g.clone()))
        .collect();
    (x, InputWhitening::from_grams(&grams).unwrap())
}
