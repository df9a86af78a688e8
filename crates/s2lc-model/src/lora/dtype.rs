//! The form a LoRA adapter's factors are held in memory. A server holding many adapters is
//! bound by their resident bytes: f16 halves f32 at no measurable cost, and int8 (ggml Q8_0
//! blocks, run by the same block kernels as the base weights) roughly halves f16 again, and int4
//! (Q4_0 blocks) halves int8.

use std::fmt;
use std::str::FromStr;

use super::{Expand, LoraAdapter, LoraDelta};
use crate::error::ModelError;
use crate::kernels::{WeightFormat, WeightMatrix};

/// How an adapter's factors are stored while resident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdapterDtype {
    /// IEEE f32, as decoded (4 bytes per value).
    F32,
    /// IEEE f16 (2 bytes per value): the default, rounding each factor once.
    #[default]
    F16,
    /// ggml Q8_0 blocks of 32 values with an f16 scale (8.5 bits per value) for every factor
    /// whose rows are a multiple of 32 long: `A` along the input, `s·B` transposed along the
    /// output. A factor whose rows are not (an odd-sized model) stays f16. The block kernels
    /// quantize activations to int8 too, so the product carries that rounding as well.
    Int8,
    /// ggml Q4_0 blocks of 32 values with an f16 scale (4.5 bits per value), laid out as
    /// [`AdapterDtype::Int8`].
    Int4,
}

impl AdapterDtype {
    /// Every dtype, for help texts and sweeps.
    pub const ALL: [AdapterDtype; 4] = [
        AdapterDtype::F32,
        AdapterDtype::F16,
        AdapterDtype::Int8,
        AdapterDtype::Int4,
    ];

    /// The name used on the command line: `f32`, `f16`, `int8`, `int4`.
    pub fn name(self) -> &'static str {
        match self {
            AdapterDtype::F32 => "f32",
            AdapterDtype::F16 => "f16",
            AdapterDtype::Int8 => "int8",
            AdapterDtype::Int4 => "int4",
        }
    }
}

impl fmt::Display for AdapterDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for AdapterDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AdapterDtype::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| format!("unknown adapter dtype '{s}' (f32, f16, int8 or int4)"))
    }
}

impl LoraDelta {
    /// The same delta held as `dtype` (from its current values: converting a converted delta
    /// rounds again).
    pub fn to_dtype(&self, dtype: AdapterDtype) -> Result<LoraDelta, ModelError> {
        let (a, b) = self.factors();
        let (r, inp, out) = (self.rank(), self.in_dim(), self.out_dim());
        Ok(match dtype {
            AdapterDtype::F32 => LoraDelta {
                a: WeightMatrix::from_f32(a.into_owned(), r, inp),
                b: Expand::Rows(WeightMatrix::from_f32(b.into_owned(), out, r)),
            },
            AdapterDtype::F16 => LoraDelta {
                a: WeightMatrix::quantize_or_f16(&a, r, inp, WeightFormat::F16)?,
                b: Expand::Rows(WeightMatrix::quantize_or_f16(
                    &b,
                    out,
                    r,
                    WeightFormat::F16,
                )?),
            },
            AdapterDtype::Int8 | AdapterDtype::Int4 => {
                let format = if dtype == AdapterDtype::Int8 {
                    WeightFormat::Q8_0
                } else {
                    WeightFormat::Q4_0
                };
                let a = WeightMatrix::quantize_or_f16(&a, r, inp, format)?;
                let b = if out % format.block_size() == 0 {
                    let bt: Vec<f32> = (0..r * out).map(|i| b[(i % out) * r + i / out]).collect();
                    Expand::Transposed(WeightMatrix::quantize_or_f16(&bt, r, out, format)?)
                } else {
                    Expand::Rows(WeightMatrix::quantize_or_f16(
                        &b,
                        out,
                        r,
                        WeightFormat::F16,
                    )?)
                };
                LoraDelta { a, b }
            }
        })
    }

    /// Bytes its factors occupy in memory.
    pub fn resident_bytes(&self) -> usize {
        self.a.bytes()
            + match &self.b {
                Expand::Rows(b) | Expand::Transposed(b) => b.bytes(),
            }
    }
}

impl LoraAdapter {
    /// The same adapter with every delta held as `dtype`.
    pub fn to_dtype(&self, dtype: AdapterDtype) -> Result<LoraAdapter, ModelError> {
        let layers = self
            .layers
            .iter()
            .map(|slots| {
                let mut out: [Option<LoraDelta>; 7] = Default::default();
                for (o, d) in out.iter_mut().zip(slots) {
                    *o = d.as_ref().map(|d| d.to_dtype(dtype)).transpose()?;
                }
                Ok(out)
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(LoraAdapter {
            layers,
            ..self.clone_settings()
        })
    }

    /// Bytes its factors occupy in memory (what an adapter cache charges for it).
    pub fn resident_bytes(&self) -> usize {
        self.deltas().map(|(_, _, d)| d.resident_bytes()).sum()
    }

    /// Its settings without deltas.
    fn clone_settings(&self) -> LoraAdapter {
        LoraAdapter {
            path: self.path.clone(),
            rank: self.rank,
            alpha: self.alpha,
            scale: self.scale,
            base_model: self.base_model.clone(),
            layers: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::dot::QuantizedActs;
    use crate::lora::DeltaScratch;
    use s2lc_spectral::rng::SplitMix64;

    /// A delta of rank 8 from 64 inputs to 96 outputs, scale 0.5.
    fn delta() -> LoraDelta {
        let mut rng = SplitMix64::new(11);
        LoraDelta::new(
            rng.centered_vec(8 * 64),
            rng.centered_vec(96 * 8),
            8,
            64,
            96,
            0.5,
        )
    }

    fn applied(d: &LoraDelta, x: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0.25f32; n * d.out_dim()];
        d.apply(
            x,
            n,
            &mut out,
            &mut DeltaScratch::default(),
            &mut QuantizedActs::default(),
        );
        out
    }

    /// `‖got − want‖ / ‖want‖`.
    fn rel(got: &[f32], want: &[f32]) -> f64 {
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (g, w) in got.iter().zip(want) {
            num += ((g - w) as f64).powi(2);
            den += (*w as f64).powi(2);
        }
        (num / den).sqrt()
    }

    #[test]
    fn names_round_trip() {
        for d in AdapterDtype::ALL {
            assert_eq!(d.name().parse::<AdapterDtype>(), Ok(d));
        }
        assert!("int2"
            .parse::<AdapterDtype>()
            .unwrap_err()
            .contains("f32, f16, int8 or int4"));
    }

    /// Each form computes what its own decoded factors compute, as f32 and applied unmerged:
    /// to f32 rounding for f16; for int8 and int4 within the rounding of int8 activations (Q8_0
    /// keeps 1/127 of each block's largest value, about 1 % of an entry's size at worst).
    #[test]
    fn every_form_applies_its_decoded_factors() {
        let d = delta();
        let mut rng = SplitMix64::new(5);
        for n in [1, 3, 40] {
            let x = rng.centered_vec(n * 64);
            for (dtype, tol) in [
                (AdapterDtype::F32, 1e-6),
                (AdapterDtype::F16, 1e-5),
                (AdapterDtype::Int8, 2e-2),
                (AdapterDtype::Int4, 2e-2),
            ] {
                let held = d.to_dtype(dtype).unwrap();
                let (a, b) = held.factors();
                let decoded = LoraDelta::new(a.into_owned(), b.into_owned(), 8, 64, 96, 1.0);
                let e = rel(&applied(&held, &x, n), &applied(&decoded, &x, n));
                assert!(e < tol, "{dtype} n={n}: {e}");
            }
        }
    }

    /// The conversions themselves round as their formats promise, and the bytes shrink as
    /// claimed: f16 half of f32, int8 (8.5 bits) a little over half of f16, int4 (4.5 bits) a
    /// little over half of int8. Q4_0 keeps 1/8 of a block's largest value: on uniform entries
    /// that is about 6 % of their root mean square.
    #[test]
    fn conversion_error_and_resident_bytes() {
        let d = delta();
        let dense = d.dense();
        let f32_bytes = d.resident_bytes();
        assert_eq!(f32_bytes, 4 * 8 * (64 + 96));
        for (dtype, tol, bytes) in [
            (AdapterDtype::F16, 1e-3, f32_bytes / 2),
            (AdapterDtype::Int8, 1e-2, f32_bytes * 17 / 64),
            (AdapterDtype::Int4, 1e-1, f32_bytes * 9 / 64),
        ] {
            let held = d.to_dtype(dtype).unwrap();
            assert_eq!(held.resident_bytes(), bytes, "{dtype}");
            assert_eq!(
                (held.rank(), held.in_dim(), held.out_dim()),
                (8, 64, 96),
                "{dtype}"
            );
            let e = rel(&held.dense(), &dense);
            assert!(e < tol, "{dtype}: {e}");
        }
    }

    /// Rows that are not whole Q8_0 blocks stay f16 under int8.
    #[test]
    fn odd_shapes_fall_back_to_f16() {
        let mut rng = SplitMix64::new(2);
        let d = LoraDelta::new(
            rng.centered_vec(3 * 10),
            rng.centered_vec(7 * 3),
            3,
            10,
            7,
            1.0,
        );
        let held = d.to_dtype(AdapterDtype::Int8).unwrap();
        assert_eq!(held.resident_bytes(), 2 * 3 * (10 + 7));
        let x = rng.centered_vec(2 * 10);
        assert!(rel(&applied(&held, &x, 2), &applied(&d, &x, 2)) < 1e-3);
    }
}
