//! Packing, adding and unpacking members (see the crate docs for the method).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use faer::linalg::matmul::matmul;
use faer::linalg::solvers::Solve;
use faer::{Accum, Mat, MatMut, MatRef, Par};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use s2lc_model::experts::FfnWeights;
use s2lc_model::llama::LinearInput;
use s2lc_model::lora::{module_name, LoraAdapter, LoraDelta, TARGETS};
use s2lc_spectral::{
    factored_svd, fit_shared_basis, rank_for_energy, row_major, sq_frobenius as sq_norm, thin_svd,
    BlockQuant, QuantBits, SharedBasis, Svd, SvdError, WhitenError, Whitening,
};

use crate::qbasis::{allocate_widths, Column, QBasis};

/// Why packing, unpacking or reading a pack failed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// A decomposition failed (non-finite values).
    #[error(transparent)]
    Svd(#[from] SvdError),
    /// Reading an adapter or expert failed.
    #[error(transparent)]
    Model(#[from] s2lc_model::ModelError),
    /// A calibration Gram matrix could not be factored.
    #[error("whitening layer {layer} {input:?}: {source}")]
    Whiten {
        /// The layer.
        layer: usize,
        /// Which input of the layer.
        input: LinearInput,
        /// What failed.
        source: WhitenError,
    },
    /// The members or parameters are inconsistent.
    #[error("{0}")]
    Invalid(String),
    /// A file could not be read or written.
    #[error("{path}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A pack file is malformed.
    #[error("{path}: {message}")]
    Format {
        /// The file involved.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// A target matrix: a layer and an index into [`TARGETS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ModuleKey {
    /// Layer index.
    pub layer: usize,
    /// Index into [`TARGETS`].
    pub target: usize,
}

impl ModuleKey {
    /// PEFT's module name, e.g. `model.layers.3.self_attn.q_proj`.
    pub fn name(&self) -> String {
        module_name(self.layer, self.target)
    }
}

/// One member's change to one target matrix (`rows × cols`).
#[derive(Debug, Clone)]
pub enum Delta {
    /// `b·a` with `b` (`rows × r`) and `a` (`r × cols`): a LoRA delta, scale folded into `b`.
    Factors {
        /// `rows × r`.
        b: Mat<f32>,
        /// `r × cols`.
        a: Mat<f32>,
    },
    /// A dense matrix (an expert residual).
    Dense(Mat<f32>),
    /// A precomputed thin SVD of either (so several packings of one member decompose it once),
    /// with the values the original form held.
    Svd {
        /// The decomposition.
        svd: Svd,
        /// [`Delta::stored_values`] of the original.
        stored: usize,
    },
}

impl Delta {
    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Delta::Factors { b, a } => (b.nrows(), a.ncols()),
            Delta::Dense(m) => (m.nrows(), m.ncols()),
            Delta::Svd { svd, .. } => (svd.u.nrows(), svd.v.nrows()),
        }
    }

    /// Thin SVD (through the factors when there are some).
    pub fn svd(&self) -> Result<Svd, SvdError> {
        match self {
            Delta::Factors { b, a } => factored_svd(b.as_ref(), a.as_ref()),
            Delta::Dense(m) => thin_svd(m.as_ref()),
            Delta::Svd { svd, .. } => Ok(svd.clone()),
        }
    }

    /// The dense matrix.
    pub fn dense(&self) -> Mat<f32> {
        match self {
            Delta::Factors { b, a } => b * a,
            Delta::Dense(m) => m.clone(),
            Delta::Svd { svd, .. } => scale_cols(svd.u.as_ref(), &svd.s) * svd.v.transpose(),
        }
    }

    /// `‖ΔW‖²_F` (for factors through the small Gram matrices: `Σ (BᵀB)∘(AAᵀ)`).
    pub fn energy(&self) -> f64 {
        match self {
            Delta::Factors { b, a } => {
                let (bb, aa) = (b.transpose() * b, a * a.transpose());
                (0..bb.nrows())
                    .flat_map(|i| (0..bb.ncols()).map(move |j| (i, j)))
                    .map(|(i, j)| bb[(i, j)] as f64 * aa[(i, j)] as f64)
                    .sum()
            }
            Delta::Dense(m) => sq_norm(m.as_ref()),
            Delta::Svd { svd, .. } => svd.s.iter().map(|&v| (v as f64).powi(2)).sum(),
        }
    }

    /// Values an f16 file of this delta holds (`r·(rows + cols)` for factors).
    pub fn stored_values(&self) -> usize {
        match self {
            Delta::Factors { b, a } => b.nrows() * b.ncols() + a.nrows() * a.ncols(),
            Delta::Dense(m) => m.nrows() * m.ncols(),
            Delta::Svd { stored, .. } => *stored,
        }
    }
}

/// A named set of deltas: one adapter or one expert residual.
#[derive(Debug, Clone)]
pub struct Member {
    /// Name (adapter or expert).
    pub name: String,
    /// Deltas by target matrix.
    pub deltas: BTreeMap<ModuleKey, Delta>,
    /// Loss weight of a unit of each matrix's delta energy ([`crate::loss::loss_weights`]): with
    /// member scope, directions are ranked by `w·σ²`, their estimated effect on the loss, and
    /// mixed-width bases weigh each column's error by it. Empty: every matrix weighs 1.
    pub weights: BTreeMap<ModuleKey, f64>,
}

/// A row-major `rows × cols` slice as a matrix.
fn mat(data: &[f32], rows: usize, cols: usize) -> Mat<f32> {
    MatRef::from_row_major_slice(data, rows, cols).to_owned()
}

impl Member {
    /// A LoRA adapter's deltas (`s·B·A`).
    pub fn from_lora(name: &str, adapter: &LoraAdapter) -> Self {
        let deltas = adapter
            .deltas()
            .map(|(layer, target, d)| {
                let (a, b) = d.factors();
                let delta = Delta::Factors {
                    b: mat(&b, d.out_dim(), d.rank()),
                    a: mat(&a, d.rank(), d.in_dim()),
                };
                (ModuleKey { layer, target }, delta)
            })
            .collect();
        Member {
            name: name.to_string(),
            deltas,
            weights: BTreeMap::new(),
        }
    }

    /// An expert's residual `expert − base` (FFN matrices as gate/up/down targets).
    pub fn from_residual(name: &str, residual: &FfnWeights) -> Self {
        let deltas = residual
            .matrices()
            .map(|(layer, module, t)| {
                let target = TARGETS
                    .iter()
                    .position(|m| *m == module)
                    .expect("FFN modules are LoRA targets");
                let delta = Delta::Dense(mat(&t.data, t.shape[0], t.shape[1]));
                (ModuleKey { layer, target }, delta)
            })
            .collect();
        Member {
            name: name.to_string(),
            deltas,
            weights: BTreeMap::new(),
        }
    }

    /// Checks the loss weights: none, or a positive finite weight for every delta.
    fn check_weights(&self) -> Result<(), PackError> {
        if self.weights.is_empty() {
            return Ok(());
        }
        for key in self.deltas.keys() {
            match self.weights.get(key) {
                Some(w) if w.is_finite() && *w > 0.0 => {}
                Some(w) => {
                    return Err(PackError::Invalid(format!(
                        "member '{}': loss weight {w} of {} is not a positive number",
                        self.name,
                        key.name()
                    )))
                }
                None => {
                    return Err(PackError::Invalid(format!(
                    "member '{}' has loss weights but none for {} (measured on another adapter?)",
                    self.name,
                    key.name()
                )))
                }
            }
        }
        Ok(())
    }

    /// The loss weight of `key`'s delta (1 without weights).
    pub fn weight(&self, key: ModuleKey) -> f64 {
        self.weights.get(&key).copied().unwrap_or(1.0)
    }

    /// The same member with every delta replaced by its thin SVD (computed in parallel), so
    /// packing it several times decomposes it once.
    pub fn with_svds(&self) -> Result<Member, SvdError> {
        let deltas = self
            .deltas
            .par_iter()
            .map(|(&key, d)| {
                let stored = d.stored_values();
                Ok((
                    key,
                    Delta::Svd {
                        svd: d.svd()?,
                        stored,
                    },
                ))
            })
            .collect::<Result<_, SvdError>>()?;
        Ok(Member {
            name: self.name.clone(),
            deltas,
            weights: self.weights.clone(),
        })
    }
}

/// Over what a member's truncation keeps its share of energy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnergyScope {
    /// Every delta keeps `energy` of its own energy (rank ≥ 1 each).
    #[default]
    Matrix,
    /// The member keeps `energy` of its total energy: its singular values across all its
    /// matrices are ranked together, so a matrix whose delta is small relative to the rest keeps
    /// fewer directions, or none.
    Member,
}

impl EnergyScope {
    /// Parses `matrix` or `member`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "matrix" => Some(EnergyScope::Matrix),
            "member" => Some(EnergyScope::Member),
            _ => None,
        }
    }

    /// `matrix` or `member`.
    pub fn name(self) -> &'static str {
        match self {
            EnergyScope::Matrix => "matrix",
            EnergyScope::Member => "member",
        }
    }
}

/// How members are packed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PackParams {
    /// Share of energy kept at each spectral step: each delta's truncation, the shared bases, and
    /// (with an orthogonal residual when needed) each member's projection.
    pub energy: f64,
    /// Share of the members' (truncated) pooled energy the shared bases of each matrix keep;
    /// `None`: `energy`. A member packed alone keeps every direction its truncation kept with
    /// `Some(1.0)` (otherwise the bases truncate it a second time, per matrix).
    #[serde(default)]
    pub basis_energy: Option<f64>,
    /// Loss-aware member scope with an absolute budget: each member drops its least important
    /// directions while their estimated KL (`Σ w·σ²`, nats per token, from the members' loss
    /// weights) stays within this. Replaces `energy` for the truncation (the bases still keep
    /// [`PackParams::basis_energy`]), so every member is cut to the same estimated loss rather
    /// than the same share.
    #[serde(default)]
    pub loss_budget: Option<f64>,
    /// Whether the truncation's `energy` is per matrix or over the whole member.
    #[serde(default)]
    pub scope: EnergyScope,
    /// Bits of the cores and residual factors.
    pub bits: QuantBits,
    /// Bits of the shared bases: of every value, or with `mixed_bases` their average.
    pub basis_bits: QuantBits,
    /// Mixed-width bases: each basis column gets int2 … int8 by the members' energy along it
    /// (greedy rate allocation over the whole pack, [`crate::qbasis::allocate_widths`]), the
    /// columns averaging at most `basis_bits` (with [`PackParams::entropy`], entropy-coded bits).
    #[serde(default)]
    pub mixed_bases: bool,
    /// Values per quantization block.
    pub block: usize,
    /// Share of each core's energy its dropped blocks may hold.
    pub drop_energy: f64,
    /// Activation-aware: energies, bases and cores were measured on `ΔW·L` (`L·Lᵀ` the Gram
    /// matrix of the matrix's calibration inputs), so what is kept is what moves the outputs
    /// most; the stored bases are mapped back and unpack is unchanged ([`pack_with`]).
    #[serde(default)]
    pub whitened: bool,
    /// Entropy-coded codes: each file stores its codes per width as one rANS stream under a
    /// frequency table fitted to them (lossless; [`s2lc_spectral::ans`]), instead of packed
    /// fixed-width bytes.
    #[serde(default)]
    pub entropy: bool,
    /// With [`PackParams::entropy`] and mixed-width bases: the average entropy-coded bits per
    /// basis value to allocate (a fraction, between int2's ~1.5 and int8's), instead of
    /// `basis_bits`.
    #[serde(default)]
    pub basis_rate: Option<f64>,
}

impl Default for PackParams {
    fn default() -> Self {
        PackParams {
            energy: 0.95,
            basis_energy: None,
            loss_budget: None,
            scope: EnergyScope::Matrix,
            bits: QuantBits::Int8,
            basis_bits: QuantBits::Int8,
            mixed_bases: false,
            block: 32,
            drop_energy: 0.0,
            whitened: false,
            entropy: false,
            basis_rate: None,
        }
    }
}

/// Per (layer, input kind), the whitening of a base model's calibration inputs: what
/// [`pack_with`] measures deltas by (`‖ΔW·L‖` is the output change `‖X·ΔWᵀ‖` on those
/// inputs).
#[derive(Debug, Clone, Default)]
pub struct InputWhitening(HashMap<(usize, LinearInput), Arc<Whitening>>);

impl InputWhitening {
    /// Factors every Gram matrix `XᵀX` (as `s2lc_model::compress::input_grams` collects them).
    pub fn from_grams(grams: &HashMap<(usize, LinearInput), Mat<f32>>) -> Result<Self, PackError> {
        grams
            .par_iter()
            .map(|(&(layer, input), g)| {
                let g64 = Mat::from_fn(g.nrows(), g.ncols(), |i, j| g[(i, j)] as f64);
                Whitening::from_gram(g64.as_ref())
                    .map(|w| ((layer, input), Arc::new(w)))
                    .map_err(|source| PackError::Whiten {
                        layer,
                        input,
                        source,
                    })
            })
            .collect::<Result<_, _>>()
            .map(InputWhitening)
    }

    /// The whitening of the input of `key`'s matrix.
    fn of(&self, key: ModuleKey) -> Result<&Whitening, PackError> {
        LinearInput::of(TARGETS[key.target])
            .and_then(|input| self.0.get(&(key.layer, input)))
            .map(Arc::as_ref)
            .ok_or_else(|| {
                PackError::Invalid(format!(
                    "{}: no calibration inputs for this matrix",
                    key.name()
                ))
            })
    }

    /// `member` with every delta replaced by the thin SVD of `ΔW·L`, checked against `L`'s width.
    fn whiten(&self, member: &Member) -> Result<Member, PackError> {
        let deltas = member
            .deltas
            .par_iter()
            .map(|(&key, d)| {
                let w = self.of(key)?;
                let (rows, cols) = d.shape();
                if cols != w.dim() {
                    return Err(PackError::Invalid(format!(
                        "{}: member '{}' has {cols} inputs but the calibration has {}",
                        key.name(),
                        member.name,
                        w.dim()
                    )));
                }
                let svd = match d {
                    Delta::Factors { b, a } => {
                        factored_svd(b.as_ref(), w.whiten(a.as_ref()).as_ref())?
                    }
                    Delta::Dense(m) => thin_svd(w.whiten(m.as_ref()).as_ref())?,
                    Delta::Svd { svd, .. } => factored_svd(
                        scale_cols(svd.u.as_ref(), &svd.s).as_ref(),
                        w.whiten(svd.v.transpose()).as_ref(),
                    )?,
                };
                debug_assert_eq!(svd.u.nrows(), rows);
                let stored = d.stored_values();
                Ok((key, Delta::Svd { svd, stored }))
            })
            .collect::<Result<BTreeMap<_, _>, PackError>>()?;
        // A loss weight is per unit of energy, and the energy is now measured on the outputs:
        // `w·‖ΔW‖² = w'·‖ΔW·L‖²` keeps each matrix's estimated loss.
        let weights = member
            .weights
            .iter()
            .map(|(&key, &w)| {
                let plain = member.deltas.get(&key).map_or(0.0, Delta::energy);
                let measured = deltas.get(&key).map_or(0.0, Delta::energy);
                let w = if measured > 0.0 {
                    w * plain / measured
                } else {
                    w
                };
                (key, w)
            })
            .collect();
        Ok(Member {
            name: member.name.clone(),
            deltas,
            weights,
        })
    }
}

impl PackParams {
    /// The share of pooled energy the shared bases keep ([`PackParams::basis_energy`]).
    pub fn basis_energy(&self) -> f64 {
        self.basis_energy.unwrap_or(self.energy)
    }

    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), PackError> {
        if !(self.energy > 0.0 && self.energy <= 1.0) {
            return Err(PackError::Invalid(format!(
                "energy {} is outside (0, 1]",
                self.energy
            )));
        }
        if let Some(e) = self.basis_energy.filter(|e| !(*e > 0.0 && *e <= 1.0)) {
            return Err(PackError::Invalid(format!(
                "basis energy {e} is outside (0, 1]"
            )));
        }
        if let Some(b) = self.loss_budget {
            if !(b.is_finite() && b > 0.0) {
                return Err(PackError::Invalid(format!(
                    "loss budget {b} is not a positive number of nats"
                )));
            }
            if self.scope != EnergyScope::Member {
                return Err(PackError::Invalid(
                    "a loss budget needs --scope member (it ranks a member's directions together)"
                        .into(),
                ));
            }
        }
        if let Some(r) = self.basis_rate {
            if !(self.entropy && self.mixed_bases) {
                return Err(PackError::Invalid(
                    "a basis rate needs --entropy and --mixed-bases (it is an average of coded bits over mixed widths)"
                        .into(),
                ));
            }
            if !(r.is_finite() && (1.0..=8.0).contains(&r)) {
                return Err(PackError::Invalid(format!(
                    "basis rate {r} is outside [1, 8] bits per value"
                )));
            }
        }
        if !(0.0..1.0).contains(&self.drop_energy) {
            return Err(PackError::Invalid(format!(
                "drop energy {} is outside [0, 1)",
                self.drop_energy
            )));
        }
        if self.block == 0 || self.block % 2 != 0 {
            return Err(PackError::Invalid(format!(
                "block {} must be a positive even number",
                self.block
            )));
        }
        Ok(())
    }
}

/// A block-quantized row-major matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct QMat {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// The values, row-major.
    pub q: BlockQuant,
}

impl QMat {
    /// Quantizes `m` row-major.
    pub fn new(m: MatRef<'_, f32>, block: usize, bits: QuantBits, drop_energy: f64) -> Self {
        QMat {
            rows: m.nrows(),
            cols: m.ncols(),
            q: BlockQuant::quantize(&row_major(m), block, bits, drop_energy),
        }
    }

    /// The dequantized matrix.
    pub fn to_mat(&self) -> Mat<f32> {
        mat(&self.q.dequantize(), self.rows, self.cols)
    }

    /// Bytes stored.
    pub fn bytes(&self) -> usize {
        self.q.bytes()
    }
}

/// The shared bases of one target matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedModule {
    /// `rows × p`.
    pub u: QBasis,
    /// `cols × q`.
    pub v: QBasis,
}

/// One member's part of one target matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedCore {
    /// The core `Cᵢ = Uᵀ·ΔWᵢ·V` (`p × q`, rank ≤ the member's truncated rank `k`) kept as its
    /// SVD factors: `core_b = X·Σ` (`p × k`) and `core_a = Yᵀ` (`k × q`), so unpacking needs no
    /// decomposition and `k·(p + q)` values are stored instead of `p·q`.
    pub core_b: QMat,
    /// `Yᵀ`, `k × q`.
    pub core_a: QMat,
    /// `(b, a)`: an orthogonal residual `b·a` (`rows × r`, `r × cols`) kept when the projection
    /// onto the shared bases lost more than the energy budget.
    pub extra: Option<(QMat, QMat)>,
}

impl PackedCore {
    /// Bytes stored.
    pub fn bytes(&self) -> usize {
        self.core_b.bytes()
            + self.core_a.bytes()
            + self
                .extra
                .as_ref()
                .map_or(0, |(b, a)| b.bytes() + a.bytes())
    }
}

/// One member of a pack.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedMember {
    /// Name.
    pub name: String,
    /// Cores by target matrix.
    pub cores: BTreeMap<ModuleKey, PackedCore>,
}

impl PackedMember {
    /// Bytes of the cores' and residuals' codes, scales and bitmaps, as fixed-width values: the
    /// payload without any file around it ([`PackedSet::member_bytes`] is the file).
    pub fn bytes(&self) -> usize {
        self.cores.values().map(PackedCore::bytes).sum()
    }
}

/// Members packed over shared bases.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedSet {
    /// How it was packed.
    pub params: PackParams,
    /// Shared bases by target matrix.
    pub modules: BTreeMap<ModuleKey, PackedModule>,
    /// The members, in the order they were packed or added.
    pub members: Vec<PackedMember>,
}

/// One matrix unpacked, `ΔW ≈ b·a`, both row-major (the runtime's layout, so they become a
/// [`LoraDelta`] without a copy).
#[derive(Debug, Clone, PartialEq)]
pub struct Factors {
    /// Rows of `ΔW`.
    pub rows: usize,
    /// Rank (columns of `b`, rows of `a`).
    pub rank: usize,
    /// Columns of `ΔW`.
    pub cols: usize,
    /// `rows × rank`, row-major.
    pub b: Vec<f32>,
    /// `rank × cols`, row-major.
    pub a: Vec<f32>,
}

impl Factors {
    /// `b` as a matrix view.
    pub fn b(&self) -> MatRef<'_, f32> {
        MatRef::from_row_major_slice(&self.b, self.rows, self.rank)
    }

    /// `a` as a matrix view.
    pub fn a(&self) -> MatRef<'_, f32> {
        MatRef::from_row_major_slice(&self.a, self.rank, self.cols)
    }

    /// `b·a`.
    pub fn dense(&self) -> Mat<f32> {
        self.b() * self.a()
    }
}

/// A member unpacked: its factors per target matrix.
pub type Unpacked = BTreeMap<ModuleKey, Factors>;

/// What packing did to one member.
#[derive(Debug, Clone, Serialize)]
pub struct MemberReport {
    /// Member name.
    pub name: String,
    /// Values of the member as stored before packing (`r·(rows+cols)` per LoRA delta).
    pub input_values: usize,
    /// Bytes of its cores and residuals.
    pub core_bytes: usize,
    /// Target matrices that needed an orthogonal residual.
    pub residuals: usize,
    /// `‖ΔW − unpacked‖_F / ‖ΔW‖_F` over all its matrices, quantization included.
    pub rel_error: f64,
}

/// How a delta is truncated: to `energy` of its own, or to the singular values at least
/// `floor` (a member-wide cut, see [`EnergyScope::Member`]).
#[derive(Debug, Clone, Copy)]
enum Cut {
    Energy(f64),
    Floor(f32),
}

/// The cut of one member under `params`. For [`EnergyScope::Member`]: the smallest (weighted)
/// singular value that, with all the larger ones across the member's matrices, keeps `energy`
/// of its total (weighted) energy, or with a loss budget drops at most that much estimated KL.
fn cut_of(member: &Member, params: &PackParams) -> Result<Cut, PackError> {
    if params.scope == EnergyScope::Matrix {
        return Ok(Cut::Energy(params.energy));
    }
    let mut s: Vec<f32> = Vec::new();
    for (&key, d) in &member.deltas {
        let w = member.weight(key).sqrt() as f32;
        s.extend(d.svd()?.s.iter().map(|&v| v * w));
    }
    s.sort_by(|a, b| b.total_cmp(a));
    let k = match params.loss_budget {
        Some(budget) => {
            if member.weights.is_empty() {
                return Err(PackError::Invalid(format!(
                    "a loss budget needs loss weights, and member '{}' has none",
                    member.name
                )));
            }
            // With absolute weights, `Σ w·σ²` over the dropped directions is their estimated KL.
            let mut dropped: f64 = s.iter().map(|&v| (v as f64).powi(2)).sum();
            let mut k = 0;
            while k < s.len() && dropped > budget {
                dropped -= (s[k] as f64).powi(2);
                k += 1;
            }
            k
        }
        None => rank_for_energy(&s, params.energy),
    }
    .max(1);
    Ok(Cut::Floor(s.get(k - 1).copied().unwrap_or(0.0)))
}

/// The truncated SVD of a delta (rank ≥ 1 under [`Cut::Energy`] unless the delta is zero; under
/// [`Cut::Floor`] the rank may be 0), whose loss weight is `weight` (the floor is on `√w·σ`).
fn truncated(delta: &Delta, cut: Cut, weight: f64) -> Result<Svd, SvdError> {
    let svd = delta.svd()?;
    let w = weight.sqrt() as f32;
    let k = match cut {
        _ if !svd.s.first().is_some_and(|&s| s > 0.0) => 0,
        Cut::Energy(energy) => rank_for_energy(&svd.s, energy).max(1),
        Cut::Floor(floor) => svd
            .s
            .iter()
            .take_while(|&&s| s * w >= floor && s > 0.0)
            .count(),
    };
    Ok(Svd {
        u: svd.u.subcols(0, k).to_owned(),
        s: svd.s[..k].to_vec(),
        v: svd.v.subcols(0, k).to_owned(),
    })
}

/// `svd` of `√w·ΔW`: the delta as a loss weight `w` weighs it.
fn weighted(svd: &Svd, w: f64) -> Svd {
    let w = w.sqrt() as f32;
    Svd {
        u: svd.u.clone(),
        s: svd.s.iter().map(|&v| v * w).collect(),
        v: svd.v.clone(),
    }
}

/// `[x₁ | x₂ | …]`: blocks side by side (equal row counts).
fn hcat(blocks: &[MatRef<'_, f32>]) -> Mat<f32> {
    let rows = blocks.first().map_or(0, |b| b.nrows());
    let mut out = Mat::zeros(rows, blocks.iter().map(|b| b.ncols()).sum());
    let mut at = 0;
    for b in blocks {
        out.as_mut().subcols_mut(at, b.ncols()).copy_from(b);
        at += b.ncols();
    }
    out
}

/// `[x₁; x₂; …]`: blocks stacked (equal column counts).
fn vcat(blocks: &[MatRef<'_, f32>]) -> Mat<f32> {
    let t: Vec<MatRef<'_, f32>> = blocks.iter().map(|b| b.transpose()).collect();
    hcat(&t).transpose().to_owned()
}

/// `u·diag(s)`.
fn scale_cols(u: MatRef<'_, f32>, s: &[f32]) -> Mat<f32> {
    Mat::from_fn(u.nrows(), s.len(), |i, j| u[(i, j)] * s[j])
}

/// `(bᵀb)⁻¹·bᵀ·x`: the least-squares coefficients of `x`'s columns on the columns of `b`.
///
/// Quantized bases are no longer orthonormal. With plain `bᵀ·x`, the reconstruction `b·bᵀ·x`
/// carries a second error term, `u·δuⱼᵀ·x`: the error of every column, however weak, picks up
/// the strong directions of `x`. The least-squares fit makes `b·coefficients` the projection
/// onto the span of `b`, leaving only the span's own error. Falls back to `bᵀ·x` when `bᵀb` is
/// singular.
fn coefficients(b: MatRef<'_, f32>, x: MatRef<'_, f32>) -> Mat<f32> {
    let proj = b.transpose() * x;
    match (b.transpose() * b).llt(faer::Side::Lower) {
        Ok(llt) => llt.solve(&proj),
        Err(_) => proj,
    }
}

/// Projects a member's truncated delta onto dequantized bases `(u, v)`: its core, plus (with
/// `allow_extra`, for members added after the bases were fitted) an orthogonal residual when the
/// projection keeps less than `energy` of the truncated delta.
///
/// With `whitening`, `svd` and `v` are in whitened input coordinates (`ΔW·L`, `Lᵀ·V`), and the
/// residual's input factor is mapped back (`·L⁻¹`) before it is stored.
fn project(
    u: MatRef<'_, f32>,
    v: MatRef<'_, f32>,
    svd: &Svd,
    params: &PackParams,
    allow_extra: bool,
    whitening: Option<&Whitening>,
) -> Result<PackedCore, SvdError> {
    let p_fac = scale_cols(svd.u.as_ref(), &svd.s); // rows × k
    let core = coefficients(u, p_fac.as_ref()) * coefficients(v, svd.v.as_ref()).transpose(); // p × q
    let (core_b, core_a) = if core.nrows() == 0 || core.ncols() == 0 {
        (Mat::zeros(core.nrows(), 0), Mat::zeros(0, core.ncols()))
    } else {
        let c = thin_svd(core.as_ref())?;
        let k = svd.s.len().min(c.s.len());
        let b = scale_cols(c.u.subcols(0, k), &c.s[..k]);
        (b, c.v.subcols(0, k).transpose().to_owned())
    };
    let q = |m: MatRef<'_, f32>| QMat::new(m, params.block, params.bits, params.drop_energy);
    let (core_b, core_a) = (q(core_b.as_ref()), q(core_a.as_ref()));
    if !allow_extra {
        return Ok(PackedCore {
            core_b,
            core_a,
            extra: None,
        });
    }
    // Residual of the stored core Ĉ = b̂·â: [P | −u·b̂] · [V_i | v·âᵀ]ᵀ, through its factors.
    let (cb, ca) = (core_b.to_mat(), core_a.to_mat());
    let b = hcat(&[p_fac.as_ref(), (-(u * &cb)).as_ref()]);
    let a = vcat(&[svd.v.transpose(), (ca * v.transpose()).as_ref()]);
    let residual = factored_svd(b.as_ref(), a.as_ref())?;
    let total: f64 = svd.s.iter().map(|&s| (s as f64).powi(2)).sum();
    let lost: f64 = residual.s.iter().map(|&s| (s as f64).powi(2)).sum();
    let budget = (1.0 - params.energy) * total;
    let extra = if lost > budget && total > 0.0 {
        // Smallest rank whose remaining residual energy fits the budget.
        let mut rest = lost;
        let mut r = 0;
        while r < residual.s.len() && rest > budget {
            rest -= (residual.s[r] as f64).powi(2);
            r += 1;
        }
        let eb = scale_cols(residual.u.subcols(0, r), &residual.s[..r]);
        let ev = residual.v.subcols(0, r);
        let ea = match whitening {
            Some(w) => w.unwhiten_basis(ev).transpose().to_owned(),
            None => ev.transpose().to_owned(),
        };
        let q = |m: MatRef<'_, f32>| QMat::new(m, params.block, params.bits, 0.0);
        Some((q(eb.as_ref()), q(ea.as_ref())))
    } else {
        None
    };
    Ok(PackedCore {
        core_b,
        core_a,
        extra,
    })
}

/// A dequantized matrix, row-major.
#[derive(Debug, Clone)]
struct RowMajor {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl RowMajor {
    fn decode(m: &QMat) -> Self {
        RowMajor {
            rows: m.rows,
            cols: m.cols,
            data: m.q.dequantize(),
        }
    }

    fn decode_basis(b: &QBasis) -> Self {
        RowMajor {
            rows: b.rows,
            cols: b.cols,
            data: b.dequantize(),
        }
    }

    fn view(&self) -> MatRef<'_, f32> {
        MatRef::from_row_major_slice(&self.data, self.rows, self.cols)
    }
}

/// Dequantized shared bases `(U, V)` by target matrix.
#[derive(Debug, Clone)]
pub struct DecodedBases(BTreeMap<ModuleKey, (RowMajor, RowMajor)>);

impl DecodedBases {
    /// Bytes held (f32).
    pub fn bytes(&self) -> usize {
        self.0
            .values()
            .map(|(u, v)| 4 * (u.data.len() + v.data.len()))
            .sum()
    }
}

/// `b = [U·core_b | extra_b]`, `a = [core_a·Vᵀ ; extra_a]`, written straight into row-major
/// buffers. Sequential: the caller runs matrices in parallel.
fn unpack_core(u: MatRef<'_, f32>, v: MatRef<'_, f32>, core: &PackedCore) -> Factors {
    let (rows, cols) = (u.nrows(), v.nrows());
    let k = core.core_b.cols;
    let extra = core
        .extra
        .as_ref()
        .map(|(eb, ea)| (eb.q.dequantize(), ea.q.dequantize()));
    let r = core.extra.as_ref().map_or(0, |(eb, _)| eb.cols);
    let rank = k + r;
    let (cb, ca) = (
        RowMajor::decode(&core.core_b),
        RowMajor::decode(&core.core_a),
    );
    let mut b = vec![0.0f32; rows * rank];
    let mut a = vec![0.0f32; rank * cols];
    matmul(
        MatMut::from_row_major_slice_mut(&mut b, rows, rank).subcols_mut(0, k),
        Accum::Replace,
        u,
        cb.view(),
        1.0,
        Par::Seq,
    );
    matmul(
        MatMut::from_row_major_slice_mut(&mut a, rank, cols).subrows_mut(0, k),
        Accum::Replace,
        ca.view(),
        v.transpose(),
        1.0,
        Par::Seq,
    );
    if let Some((eb, ea)) = extra {
        // The residual's columns go after the core's in each row of b; its rows after the
        // core's in a (contiguous there).
        for (dst, src) in b.chunks_exact_mut(rank).zip(eb.chunks_exact(r)) {
            dst[k..].copy_from_slice(src);
        }
        a[k * cols..].copy_from_slice(&ea);
    }
    Factors {
        rows,
        rank,
        cols,
        b,
        a,
    }
}

/// Unpacked factors as a LoRA adapter named `name` (scale 1).
fn to_lora(name: &str, factors: Unpacked) -> LoraAdapter {
    let n_layers = factors.keys().map(|k| k.layer + 1).max().unwrap_or(0);
    let mut layers: Vec<[Option<LoraDelta>; 7]> = vec![Default::default(); n_layers];
    let mut rank = 1;
    for (key, f) in factors {
        if f.rank == 0 {
            continue;
        }
        rank = rank.max(f.rank);
        layers[key.layer][key.target] = Some(LoraDelta::new(f.a, f.b, f.rank, f.cols, f.rows, 1.0));
    }
    LoraAdapter {
        path: PathBuf::from(name),
        rank,
        alpha: rank as f32,
        scale: 1.0,
        base_model: None,
        layers,
    }
}

/// Checks that every member's delta at `key` has one shape; returns it.
fn common_shape(members: &[&Member], key: ModuleKey) -> Result<(usize, usize), PackError> {
    let mut shape = None;
    for m in members {
        let Some(d) = m.deltas.get(&key) else {
            continue;
        };
        match shape {
            None => shape = Some(d.shape()),
            Some(s) if s != d.shape() => {
                return Err(PackError::Invalid(format!(
                    "{}: member '{}' is {:?} but others are {:?} (adapters for different bases?)",
                    key.name(),
                    m.name,
                    d.shape(),
                    s
                )))
            }
            Some(_) => {}
        }
    }
    shape.ok_or_else(|| PackError::Invalid(format!("{}: no member adapts it", key.name())))
}

/// Packs `members` over bases fitted on all of them ([`pack_separately`] gives each its own).
/// Names must be unique.
pub fn pack(members: &[Member], params: PackParams) -> Result<PackedSet, PackError> {
    pack_with(members, params, None)
}

/// [`pack`], activation-aware with `whitening`: every step (truncation, member-wide cut, shared
/// bases, cores) measures a delta by `‖ΔW·L‖`, the change it makes to its matrix's outputs on the
/// calibration inputs, instead of `‖ΔW‖`. Directions the inputs barely excite are dropped first.
/// The stored input bases are `L⁻ᵀ·V`, so unpacking (and the runtime) needs no calibration.
/// Without `whitening` this is [`pack`].
pub fn pack_with(
    members: &[Member],
    mut params: PackParams,
    whitening: Option<&InputWhitening>,
) -> Result<PackedSet, PackError> {
    params.validate()?;
    params.whitened = whitening.is_some();
    let mut names = BTreeSet::new();
    for m in members {
        m.check_weights()?;
        if !names.insert(m.name.as_str()) {
            return Err(PackError::Invalid(format!(
                "member '{}' appears twice",
                m.name
            )));
        }
    }
    if members.is_empty() {
        return Err(PackError::Invalid("nothing to pack".into()));
    }
    let keys: BTreeSet<ModuleKey> = members
        .iter()
        .flat_map(|m| m.deltas.keys().copied())
        .collect();
    let refs: Vec<&Member> = members.iter().collect();
    for &key in &keys {
        common_shape(&refs, key)?;
    }
    let whitened: Vec<Member>;
    let members = match whitening {
        Some(w) => {
            whitened = members
                .iter()
                .map(|m| w.whiten(m))
                .collect::<Result<_, _>>()?;
            &whitened[..]
        }
        None => members,
    };
    let cuts: Vec<Cut> = members
        .par_iter()
        .map(|m| cut_of(m, &params))
        .collect::<Result<_, _>>()?;
    // Pass 1: per matrix, the members' truncated deltas and the shared bases they span.
    let fitted: Vec<Fitted> = keys
        .par_iter()
        .map(|&key| -> Result<Option<Fitted>, PackError> {
            // A delta truncated to rank 0 (member scope) is left out of this matrix.
            let svds: Vec<Option<Svd>> = members
                .iter()
                .zip(&cuts)
                .map(|(m, &cut)| {
                    m.deltas
                        .get(&key)
                        .map(|d| truncated(d, cut, m.weight(key)))
                        .transpose()
                        .map(|s| s.filter(|s| !s.s.is_empty()))
                })
                .collect::<Result<_, _>>()?;
            // The bases are fitted to the deltas as the loss weighs them (`√w·ΔW`).
            let present: Vec<Svd> = members
                .iter()
                .zip(&svds)
                .filter_map(|(m, s)| s.as_ref().map(|s| weighted(s, m.weight(key))))
                .collect();
            if present.is_empty() {
                return Ok(None);
            }
            let mut basis = fit_shared_basis(&present, params.basis_energy(), None)?;
            if let Some(w) = whitening {
                // Stored in the input's own coordinates (measured in whitened ones).
                let stored = w.of(key)?.unwhiten_basis(basis.v.as_ref());
                basis.v = stored;
            }
            Ok(Some((key, svds, basis)))
        })
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect();
    let widths = basis_widths(&fitted, members, &params, whitening)?;
    // Pass 2: quantize the bases, then fit each member's core to the stored (dequantized) bases,
    // in the coordinates its delta was measured in.
    type ModuleOut = (ModuleKey, PackedModule, Vec<Option<PackedCore>>);
    let per_module: Vec<ModuleOut> = fitted
        .into_par_iter()
        .zip(widths)
        .map(
            |((key, svds, basis), (wu, wv))| -> Result<ModuleOut, PackError> {
                let module = PackedModule {
                    u: quantize_basis(basis.u.as_ref(), params.block, &wu),
                    v: quantize_basis(basis.v.as_ref(), params.block, &wv),
                };
                let wh = whitening.map(|w| w.of(key)).transpose()?;
                let (u, v) = (module.u.to_mat(), module.v.to_mat());
                let v = match wh {
                    Some(w) => w.whiten_basis(v.as_ref()),
                    None => v,
                };
                let cores = svds
                    .iter()
                    .map(|s| {
                        s.as_ref()
                            .map(|s| project(u.as_ref(), v.as_ref(), s, &params, false, wh))
                            .transpose()
                    })
                    .collect::<Result<_, _>>()?;
                Ok((key, module, cores))
            },
        )
        .collect::<Result<_, _>>()?;
    let mut set = PackedSet {
        params,
        modules: BTreeMap::new(),
        members: members
            .iter()
            .map(|m| PackedMember {
                name: m.name.clone(),
                cores: BTreeMap::new(),
            })
            .collect(),
    };
    for (key, module, cores) in per_module {
        set.modules.insert(key, module);
        for (member, core) in set.members.iter_mut().zip(cores) {
            if let Some(core) = core {
                member.cores.insert(key, core);
            }
        }
    }
    Ok(set)
}

/// One matrix between the passes of [`pack_with`]: its key, each member's truncated delta (in
/// measured coordinates) and the fitted bases (`V` as stored).
type Fitted = (ModuleKey, Vec<Option<Svd>>, SharedBasis);

/// The widths of a matrix's basis columns: of `U`'s, and of `V`'s.
type Widths = (Vec<QuantBits>, Vec<QuantBits>);

/// Per fitted matrix, the widths of the columns of `U` and of `V`: `basis_bits` throughout, or
/// with `mixed_bases` allocated over the whole pack by the members' loss-weighted energy along
/// each column (`Σᵢ wᵢ·‖uⱼᵀ·Uᵢ·Σᵢ‖²`, and for `V` in the coordinates the deltas were measured in).
fn basis_widths(
    fitted: &[Fitted],
    members: &[Member],
    params: &PackParams,
    whitening: Option<&InputWhitening>,
) -> Result<Vec<Widths>, PackError> {
    if !params.mixed_bases {
        let all = |n: usize| vec![params.basis_bits; n];
        return Ok(fitted
            .iter()
            .map(|(_, _, b)| (all(b.u.ncols()), all(b.v.ncols())))
            .collect());
    }
    let columns: Vec<(Vec<Column>, Vec<Column>)> = fitted
        .par_iter()
        .map(|(key, svds, basis)| -> Result<_, PackError> {
            let v_measured = match whitening {
                Some(w) => w.of(*key)?.whiten_basis(basis.v.as_ref()),
                None => basis.v.clone(),
            };
            let side = |stored: MatRef<'_, f32>, measured: MatRef<'_, f32>, left: bool| {
                let mut weight = vec![0.0f64; stored.ncols()];
                for (member, svd) in members.iter().zip(svds) {
                    let Some(svd) = svd else { continue };
                    let f = if left { svd.u.as_ref() } else { svd.v.as_ref() };
                    let m = measured.transpose() * scale_cols(f, &svd.s);
                    let loss = member.weight(*key);
                    for (j, w) in weight.iter_mut().enumerate() {
                        *w += loss
                            * (0..m.ncols())
                                .map(|c| (m[(j, c)] as f64).powi(2))
                                .sum::<f64>();
                    }
                }
                weight
                    .into_iter()
                    .enumerate()
                    .map(|(j, weight)| Column {
                        weight,
                        values: stored.col(j).iter().copied().collect(),
                    })
                    .collect::<Vec<_>>()
            };
            Ok((
                side(basis.u.as_ref(), basis.u.as_ref(), true),
                side(basis.v.as_ref(), v_measured.as_ref(), false),
            ))
        })
        .collect::<Result<_, _>>()?;
    let flat: Vec<&Column> = columns
        .iter()
        .flat_map(|(u, v)| u.iter().chain(v))
        .collect();
    let mut widths = allocate_widths(
        &flat,
        params.block,
        params.basis_rate.unwrap_or(params.basis_bits.bits() as f64),
        params.entropy,
    )
    .into_iter();
    Ok(columns
        .iter()
        .map(|(u, v)| {
            let u: Vec<QuantBits> = widths.by_ref().take(u.len()).collect();
            (u, widths.by_ref().take(v.len()).collect())
        })
        .collect())
}

/// Quantizes a basis at per-column `widths`, its columns reordered widest first so that each
/// width is one group (the cores are fitted to the stored order afterwards).
fn quantize_basis(m: MatRef<'_, f32>, block: usize, widths: &[QuantBits]) -> QBasis {
    let mut order: Vec<usize> = (0..widths.len()).collect();
    order.sort_by_key(|&j| std::cmp::Reverse(widths[j].bits()));
    let sorted = Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, order[j])]);
    let widths: Vec<QuantBits> = order.iter().map(|&j| widths[j]).collect();
    QBasis::with_widths(sorted.as_ref(), block, &widths)
}

/// The no-sharing baseline: every member packed alone (its own bases), same parameters and
/// calibration ([`pack_with`]).
pub fn pack_separately(
    members: &[Member],
    params: PackParams,
    whitening: Option<&InputWhitening>,
) -> Result<Vec<PackedSet>, PackError> {
    members
        .iter()
        .map(|m| pack_with(std::slice::from_ref(m), params, whitening))
        .collect()
}

impl PackedSet {
    /// Bytes the shared bases' file stores (entropy-coded when [`PackParams::entropy`]).
    pub fn basis_bytes(&self) -> usize {
        crate::format::basis_bytes(self)
    }

    /// Bytes the file of `member` stores: its cores and residuals (entropy-coded when
    /// [`PackParams::entropy`]).
    pub fn member_bytes(&self, member: &PackedMember) -> usize {
        crate::format::member_bytes(self, member)
    }

    /// Bytes of everything: bases and every member.
    pub fn bytes(&self) -> usize {
        self.basis_bytes()
            + self
                .members
                .iter()
                .map(|m| self.member_bytes(m))
                .sum::<usize>()
    }

    /// The member called `name`.
    pub fn member(&self, name: &str) -> Result<&PackedMember, PackError> {
        self.members.iter().find(|m| m.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.members.iter().map(|m| m.name.as_str()).collect();
            PackError::Invalid(format!(
                "no member '{name}' in the pack (it holds {})",
                names.join(", ")
            ))
        })
    }

    /// Adds a member onto the existing bases (a core per matrix, plus an orthogonal residual where
    /// the projection loses more than the energy budget). A matrix the pack has no basis for, a
    /// shape mismatch or a taken name is an error, and the pack is then unchanged.
    pub fn add(&mut self, member: &Member) -> Result<(), PackError> {
        self.add_with(member, None)
    }

    /// [`PackedSet::add`] with the calibration's `whitening`: a pack made activation-aware
    /// ([`pack_with`]) needs the same calibration (another one would project onto the bases in
    /// other coordinates), and a plain pack takes none.
    pub fn add_with(
        &mut self,
        member: &Member,
        whitening: Option<&InputWhitening>,
    ) -> Result<(), PackError> {
        match (self.params.whitened, whitening.is_some()) {
            (true, false) => {
                return Err(PackError::Invalid(format!(
                "the pack is activation-aware (whitened): adding '{}' needs its calibration inputs",
                member.name
            )))
            }
            (false, true) => {
                return Err(PackError::Invalid(format!(
                    "the pack is not activation-aware: add '{}' without calibration",
                    member.name
                )))
            }
            _ => {}
        }
        member.check_weights()?;
        if self.members.iter().any(|m| m.name == member.name) {
            return Err(PackError::Invalid(format!(
                "the pack already has a member '{}'",
                member.name
            )));
        }
        // Shapes are checked on the member as given, before whitening needs them to fit.
        for (&key, delta) in &member.deltas {
            if let Some(module) = self.modules.get(&key) {
                let shape = (module.u.rows, module.v.rows);
                if delta.shape() != shape {
                    return Err(PackError::Invalid(format!(
                        "{}: member '{}' is {:?} but the pack's basis is {:?}",
                        key.name(),
                        member.name,
                        delta.shape(),
                        shape
                    )));
                }
            }
        }
        let whitened;
        let member = match whitening {
            Some(w) => {
                whitened = w.whiten(member)?;
                &whitened
            }
            None => member,
        };
        let cut = cut_of(member, &self.params)?;
        let cores = member
            .deltas
            .par_iter()
            .map(
                |(&key, delta)| -> Result<Option<(ModuleKey, PackedCore)>, PackError> {
                    let svd = truncated(delta, cut, member.weight(key))?;
                    if svd.s.is_empty() {
                        return Ok(None);
                    }
                    let module = self.modules.get(&key).ok_or_else(|| {
                        PackError::Invalid(format!(
                            "{}: the pack has no basis for this matrix (re-pack to include it)",
                            key.name()
                        ))
                    })?;
                    let wh = whitening.map(|w| w.of(key)).transpose()?;
                    let (u, v) = (module.u.to_mat(), module.v.to_mat());
                    let v = match wh {
                        Some(w) => w.whiten_basis(v.as_ref()),
                        None => v,
                    };
                    Ok(Some((
                        key,
                        project(u.as_ref(), v.as_ref(), &svd, &self.params, true, wh)?,
                    )))
                },
            )
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .flatten()
            .collect();
        self.members.push(PackedMember {
            name: member.name.clone(),
            cores,
        });
        Ok(())
    }

    /// Rebuilds a member as factors `(b, a)` per matrix (`rows × k`, `k × cols`): the core's
    /// factors mapped through the bases (`b = U·X·Σ`, `a = Yᵀ·Vᵀ`), plus its residual if any. The
    /// bases it needs are dequantized on the way (a cold start; see [`PackedSet::unpack_with`]).
    pub fn unpack(&self, name: &str) -> Result<Unpacked, PackError> {
        self.unpack_from(name, None)
    }

    /// [`PackedSet::unpack`] with the bases already dequantized (as a server keeps them resident,
    /// shared by every member).
    pub fn unpack_with(&self, bases: &DecodedBases, name: &str) -> Result<Unpacked, PackError> {
        self.unpack_from(name, Some(bases))
    }

    /// Every basis, dequantized.
    pub fn decode_bases(&self) -> DecodedBases {
        DecodedBases(
            self.modules
                .par_iter()
                .map(|(&key, m)| {
                    (
                        key,
                        (RowMajor::decode_basis(&m.u), RowMajor::decode_basis(&m.v)),
                    )
                })
                .collect(),
        )
    }

    fn unpack_from(&self, name: &str, bases: Option<&DecodedBases>) -> Result<Unpacked, PackError> {
        let member = self.member(name)?;
        member
            .cores
            .par_iter()
            .map(|(&key, core)| {
                let missing =
                    || PackError::Invalid(format!("{}: no basis in the pack", key.name()));
                let decoded;
                let (u, v) = match bases {
                    Some(b) => {
                        let (u, v) = b.0.get(&key).ok_or_else(missing)?;
                        (u.view(), v.view())
                    }
                    None => {
                        let m = self.modules.get(&key).ok_or_else(missing)?;
                        decoded = (RowMajor::decode_basis(&m.u), RowMajor::decode_basis(&m.v));
                        (decoded.0.view(), decoded.1.view())
                    }
                };
                Ok((key, unpack_core(u, v, core)))
            })
            .collect()
    }

    /// A member unpacked as a LoRA adapter (scale 1, the rank of each matrix as unpacked).
    pub fn unpack_lora(&self, name: &str) -> Result<LoraAdapter, PackError> {
        Ok(to_lora(name, self.unpack(name)?))
    }

    /// [`PackedSet::unpack_lora`] with resident bases.
    pub fn unpack_lora_with(
        &self,
        bases: &DecodedBases,
        name: &str,
    ) -> Result<LoraAdapter, PackError> {
        Ok(to_lora(name, self.unpack_with(bases, name)?))
    }

    /// Expert Morphing: the weighted blend `Σ wᵢ·ΔWᵢ` of members, synthesized in the shared
    /// basis. Per matrix the members' cores are summed (`C = Σ wᵢ·Cᵢ`, `p × q`), re-decomposed,
    /// truncated so that the dropped energy is at most `1 − energy` of the weighted members'
    /// (`Σ wᵢ²‖Cᵢ‖²`), and mapped through the bases once: one adapter whose rank is bounded by the
    /// basis width however many members it blends, and near zero where they cancel. Orthogonal
    /// residuals (from [`PackedSet::add`]) are appended, weighted. Weights must be finite with a
    /// positive sum.
    pub fn morph(&self, weights: &[(&str, f32)]) -> Result<Unpacked, PackError> {
        let sum: f32 = weights.iter().map(|(_, w)| w).sum();
        if weights.is_empty() || weights.iter().any(|(_, w)| !w.is_finite()) || sum <= 0.0 {
            return Err(PackError::Invalid(format!(
                "morph weights must be finite and sum to a positive number (got {weights:?})"
            )));
        }
        let mut members = Vec::new();
        for (i, (name, w)) in weights.iter().enumerate() {
            if weights[..i].iter().any(|(n, _)| n == name) {
                return Err(PackError::Invalid(format!("'{name}' is weighted twice")));
            }
            members.push((*w, self.member(name)?));
        }
        let keys: BTreeSet<ModuleKey> = members
            .iter()
            .flat_map(|(_, m)| m.cores.keys().copied())
            .collect();
        keys.par_iter()
            .map(|&key| -> Result<(ModuleKey, Factors), PackError> {
                let module = self.modules.get(&key).ok_or_else(|| {
                    PackError::Invalid(format!("{}: no basis in the pack", key.name()))
                })?;
                let (u, v) = (module.u.to_mat(), module.v.to_mat());
                let cores: Vec<(f32, &PackedCore)> = members
                    .iter()
                    .filter_map(|(w, m)| m.cores.get(&key).map(|c| (*w, c)))
                    .collect();
                // C = [w₁·B₁ | w₂·B₂ | …]·[A₁; A₂; …], decomposed through its factors.
                let cbs: Vec<Mat<f32>> = cores
                    .iter()
                    .map(|(w, c)| c.core_b.to_mat() * faer::Scale(*w))
                    .collect();
                let cas: Vec<Mat<f32>> = cores.iter().map(|(_, c)| c.core_a.to_mat()).collect();
                let svd = factored_svd(
                    hcat(&cbs.iter().map(Mat::as_ref).collect::<Vec<_>>()).as_ref(),
                    vcat(&cas.iter().map(Mat::as_ref).collect::<Vec<_>>()).as_ref(),
                )?;
                // Drop at most what packing may drop from the blended members themselves,
                // `(1 − energy)·Σ wᵢ²‖Cᵢ‖²` (core_a has orthonormal rows, so ‖Cᵢ‖ = ‖core_bᵢ‖).
                // Relative to the members, not to the blend: members that cancel leave little
                // energy, and what is left is dropped instead of kept at full rank.
                let budget = (1.0 - self.params.energy)
                    * cbs.iter().map(|b| sq_norm(b.as_ref())).sum::<f64>();
                let mut tail: f64 = svd.s.iter().map(|&s| (s as f64).powi(2)).sum();
                let mut k = 0;
                while k < svd.s.len() && tail > budget {
                    tail -= (svd.s[k] as f64).powi(2);
                    k += 1;
                }
                // Then the weighted orthogonal residuals, appended as further factors.
                let mut b_blocks = vec![&u * scale_cols(svd.u.subcols(0, k), &svd.s[..k])];
                let mut a_blocks = vec![svd.v.subcols(0, k).transpose() * v.transpose()];
                for (w, c) in &cores {
                    if let Some((eb, ea)) = &c.extra {
                        b_blocks.push(eb.to_mat() * faer::Scale(*w));
                        a_blocks.push(ea.to_mat());
                    }
                }
                let b = hcat(&b_blocks.iter().map(Mat::as_ref).collect::<Vec<_>>());
                let a = vcat(&a_blocks.iter().map(Mat::as_ref).collect::<Vec<_>>());
                let (rows, rank, cols) = (b.nrows(), b.ncols(), a.ncols());
                Ok((
                    key,
                    Factors {
                        rows,
                        rank,
                        cols,
                        b: row_major(b.as_ref()),
                        a: row_major(a.as_ref()),
                    },
                ))
            })
            .collect()
    }

    /// [`PackedSet::morph`] as a LoRA adapter named `name` (scale 1).
    pub fn morph_lora(
        &self,
        name: &str,
        weights: &[(&str, f32)],
    ) -> Result<LoraAdapter, PackError> {
        Ok(to_lora(name, self.morph(weights)?))
    }

    /// Measures each of `members` (as given to [`pack`] or [`PackedSet::add`]) against its
    /// unpacked form.
    pub fn report(&self, members: &[Member]) -> Result<Vec<MemberReport>, PackError> {
        members
            .iter()
            .map(|m| {
                let packed = self.member(&m.name)?;
                let unpacked = self.unpack(&m.name)?;
                let (mut err, mut total) = (0.0, 0.0);
                for (key, delta) in &m.deltas {
                    let dense = delta.dense();
                    total += sq_norm(dense.as_ref());
                    err += match unpacked.get(key) {
                        Some(f) => sq_norm((dense - f.dense()).as_ref()),
                        None => sq_norm(dense.as_ref()),
                    };
                }
                Ok(MemberReport {
                    name: m.name.clone(),
                    input_values: m.deltas.values().map(Delta::stored_values).sum(),
                    core_bytes: self.member_bytes(packed),
                    residuals: packed.cores.values().filter(|c| c.extra.is_some()).count(),
                    rel_error: if total > 0.0 {
                        (err / total).sqrt()
                    } else {
                        0.0
                    },
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use crate::test_matrix as matrix;

    /// `n` LoRA-like members on two layers × two targets whose column spaces share `common`
    /// directions (plus `r − common` of their own).
    fn members(
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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        /// Pack → unpack error is bounded by the energy the spectral steps may drop plus a little
        /// quantization error. Truncation drops at most `1 − e` of a member; the pooled basis
        /// drops at most `1 − e` of the pooled unit-norm members, so at most `n·(1 − e)` of any one
        /// of `n` packed members; a member added later keeps an orthogonal residual that caps its
        /// projection loss at `1 − e`.
        #[test]
        fn unpack_error_is_bounded_by_the_dropped_energy(n in 1usize..4, rows in 8usize..40, cols in 8usize..40,
                                                         r in 2usize..6, seed in any::<u64>(), e in 0.8f64..1.0,
                                                         int4 in any::<bool>()) {
            let all = members(n + 1, rows, cols, r, 1, seed);
            let (first, later) = all.split_at(n);
            let params = PackParams {
                energy: e,
                bits: if int4 { QuantBits::Int4 } else { QuantBits::Int8 },
                ..PackParams::default()
            };
            let mut set = pack(first, params).unwrap();
            set.add(&later[0]).unwrap();
            // int8 bases and cores: ~1e-2 relative; int4 cores: up to ~0.15.
            let quant = if int4 { 0.2f64 } else { 0.03 };
            for (i, rep) in set.report(&all).unwrap().iter().enumerate() {
                let dropped = if i < n { (1 + n) as f64 } else { 2.0 } * (1.0 - e);
                let bound = dropped.sqrt() + quant;
                prop_assert!(rep.rel_error <= bound, "{}: {} > {}", rep.name, rep.rel_error, bound);
            }
        }
    }

    /// Member scope ranks a member's singular values together: a matrix whose delta is tiny
    /// next to the others gets no core (it stays in with matrix scope), and the member's error
    /// stays within its energy budget — packed or added later.
    #[test]
    fn member_scope_drops_matrices_that_hold_little_of_the_member() {
        let mut ms = members(3, 40, 36, 4, 1, 11);
        let tiny = ModuleKey {
            layer: 1,
            target: 2,
        };
        for m in &mut ms {
            if let Some(Delta::Factors { b, .. }) = m.deltas.get_mut(&tiny) {
                *b = &*b * faer::Scale(1e-3);
            }
        }
        let (first, later) = ms.split_at(2);
        for scope in [EnergyScope::Matrix, EnergyScope::Member] {
            let params = PackParams {
                energy: 0.9,
                scope,
                ..PackParams::default()
            };
            let mut set = pack(first, params).unwrap();
            set.add(&later[0]).unwrap();
            for m in &set.members {
                assert_eq!(
                    m.cores.contains_key(&tiny),
                    scope == EnergyScope::Matrix,
                    "{scope:?} {}",
                    m.name
                );
            }
            for rep in set.report(&ms).unwrap() {
                // Truncation, basis and projection may each drop 1 − e (n = 2 pooled members).
                let bound = (4.0f64 * 0.1).sqrt() + 0.03;
                assert!(
                    rep.rel_error <= bound,
                    "{scope:?} {}: {}",
                    rep.name,
                    rep.rel_error
                );
            }
        }
        // The command-line names.
        assert_eq!(EnergyScope::parse("member"), Some(EnergyScope::Member));
        assert_eq!(EnergyScope::parse("layer"), None);
    }

    #[test]
    fn loss_weights_decide_what_member_scope_keeps() {
        let mut ms = members(2, 40, 36, 4, 1, 13);
        let tiny = ModuleKey {
            layer: 1,
            target: 2,
        };
        for m in &mut ms {
            if let Some(Delta::Factors { b, .. }) = m.deltas.get_mut(&tiny) {
                *b = &*b * faer::Scale(1e-3);
            }
            // Energy through the factors is the dense matrix's.
            for d in m.deltas.values() {
                let dense = sq_norm(d.dense().as_ref());
                assert!((d.energy() - dense).abs() <= 1e-5 * dense, "{dense}");
            }
        }
        let params = PackParams {
            energy: 0.9,
            scope: EnergyScope::Member,
            ..PackParams::default()
        };
        // Unweighted, the tiny matrix is cut; weighted by the inverse of its shrinkage (so its
        // estimated loss equals the others'), it is kept, and packing alone or added agrees.
        let set = pack(&ms[..1], params).unwrap();
        assert!(!set.members[0].cores.contains_key(&tiny));
        for m in &mut ms {
            m.weights = m.deltas.keys().map(|&k| (k, 1.0)).collect();
            m.weights.insert(tiny, 1e6);
        }
        let mut set = pack(&ms[..1], params).unwrap();
        set.add(&ms[1]).unwrap();
        for m in &set.members {
            assert!(m.cores.contains_key(&tiny), "{}", m.name);
        }
        // A loss budget keeps directions until what is dropped estimates at most the budget:
        // with these weights the tiny matrix's estimated loss is the others', so a budget of
        // all but a sliver of the total keeps little, and a tiny one keeps everything.
        let total: f64 = ms[0]
            .deltas
            .iter()
            .map(|(&k, d)| ms[0].weight(k) * d.energy())
            .sum();
        let kept = |budget: f64| {
            let p = PackParams {
                loss_budget: Some(budget),
                ..params
            };
            let set = pack(&ms[..1], p).unwrap();
            set.members[0]
                .cores
                .values()
                .map(|c| c.core_b.cols)
                .sum::<usize>()
        };
        let (loose, tight) = (kept(0.9 * total), kept(1e-9 * total));
        assert!(loose < tight && tight == 4 * 4, "{loose} {tight}");
        let budget = PackParams {
            loss_budget: Some(0.1),
            ..params
        };
        let e = pack(&members(1, 40, 36, 4, 1, 13), budget)
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs loss weights"), "{e}");
        let matrix = PackParams {
            scope: EnergyScope::Matrix,
            ..budget
        };
        assert!(matrix
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--scope member"));

        // Weights are for every delta or none, and positive.
        let mut partial = ms[0].clone();
        partial.weights.remove(&tiny);
        let e = pack(&[partial], params).unwrap_err().to_string();
        assert!(
            e.contains("none for model.layers.1.self_attn.v_proj"),
            "{e}"
        );
        let mut negative = ms[0].clone();
        negative.weights.insert(tiny, -1.0);
        let e = set.add(&negative).unwrap_err().to_string();
        assert!(e.contains("not a positive number"), "{e}");
    }

    /// A morph is the weighted sum of the members' deltas (within the pack's error), one member
    /// at weight 1 is that member, and bad weights are named.
    #[test]
    fn morph_blends_members_in_the_shared_basis() {
        let ms = members(3, 40, 36, 4, 2, 5);
        let params = PackParams {
            energy: 0.999,
            ..PackParams::default()
        };
        let mut set = pack(&ms[..2], params).unwrap();
        set.add(&ms[2]).unwrap();
        let (wa, wb, wc) = (0.7f32, 0.2f32, 0.1f32);
        let morph = set.morph(&[("m0", wa), ("m1", wb), ("m2", wc)]).unwrap();
        let (mut err, mut total) = (0.0, 0.0);
        for (key, f) in &morph {
            let want = ms[0].deltas[key].dense() * faer::Scale(wa)
                + ms[1].deltas[key].dense() * faer::Scale(wb)
                + ms[2].deltas[key].dense() * faer::Scale(wc);
            total += sq_norm(want.as_ref());
            err += sq_norm((want - f.dense()).as_ref());
        }
        assert!((err / total).sqrt() < 0.05, "{}", (err / total).sqrt());
        // Rank is bounded by the basis width (plus m2's residual), not the sum of the members'.
        for (key, f) in &morph {
            let extra = set.members[2].cores[key]
                .extra
                .as_ref()
                .map_or(0, |(b, _)| b.cols);
            assert!(f.rank <= set.modules[key].u.cols + extra, "{}", key.name());
        }
        // One member at weight 1 is that member.
        let one = set.morph(&[("m1", 1.0)]).unwrap();
        let plain = set.unpack("m1").unwrap();
        for (key, f) in &one {
            let d = (f.dense() - plain[key].dense()).norm_l2() / plain[key].dense().norm_l2();
            assert!(d < 1e-4, "{}: {d}", key.name());
        }
        // Members that cancel blend to (almost) nothing, not to full-rank noise.
        let mut anti = ms[0].clone();
        anti.name = "anti".into();
        for d in anti.deltas.values_mut() {
            if let Delta::Factors { b, .. } = d {
                *b = &*b * faer::Scale(-1.0);
            }
        }
        let pair = pack(&[ms[0].clone(), anti], params).unwrap();
        let none = pair.morph(&[("m0", 0.5), ("anti", 0.5)]).unwrap();
        for (key, f) in &none {
            let alone = &pair.unpack("m0").unwrap()[key];
            assert!(
                f.rank == 0 || f.dense().norm_l2() < 1e-2 * alone.dense().norm_l2(),
                "{}: rank {} of {}",
                key.name(),
                f.rank,
                alone.rank
            );
        }
        for (w, needle) in [
            (vec![("m0", 0.5), ("m1", -0.5)], "sum to a positive number"),
            (vec![("m0", f32::NAN)], "finite"),
            (vec![("m0", 0.5), ("m0", 0.5)], "weighted twice"),
            (vec![("zz", 1.0)], "no member 'zz'"),
        ] {
            let e = set.morph(&w).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }

    /// Inputs whose features `0..cols/2` are 100x larger than the rest, and their whitening
    /// for the q/v matrices of layers 0 and 1 (what the test members adapt).
    fn skewed_inputs(cols: usize) -> (Mat<f32>, InputWhitening) {
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

    /// `‖X·(ΔW − unpacked)ᵀ‖ / ‖X·ΔWᵀ‖` over a member's matrices.
    fn output_error(x: MatRef<'_, f32>, member: &Member, set: &PackedSet) -> f64 {
        let unpacked = set.unpack(&member.name).unwrap();
        let (mut err, mut total) = (0.0, 0.0);
        for (key, delta) in &member.deltas {
            let dense = delta.dense();
            total += sq_norm((x * dense.transpose()).as_ref());
            let rest = match unpacked.get(key) {
                Some(f) => dense - f.dense(),
                None => dense,
            };
            err += sq_norm((x * rest.transpose()).as_ref());
        }
        (err / total).sqrt()
    }

    /// Activation-aware packing keeps what the inputs excite: a delta whose energy is split
    /// evenly between strong and (100x) weak input features loses its weak half, so it packs
    /// smaller, while its output error stays within the dropped share of output energy.
    #[test]
    fn whitened_packing_keeps_what_the_inputs_excite() {
        let (rows, cols) = (24, 32);
        let (x, whitening) = skewed_inputs(cols);
        // Rank 4 per matrix: two directions on the strong features, two on the weak ones, of
        // equal norm.
        let ms: Vec<Member> = (0..2)
            .map(|i| {
                let deltas = [(0, 0), (0, 2), (1, 0), (1, 2)]
                    .into_iter()
                    .map(|(layer, target)| {
                        let seed = (i * 16 + layer * 4 + target) as u64 + 1;
                        let b = matrix(rows, 4, seed);
                        let a = Mat::from_fn(4, cols, |k, j| {
                            let strong = j < cols / 2;
                            if (k < 2) == strong {
                                matrix(4, cols, seed ^ 0x55)[(k, j)]
                            } else {
                                0.0
                            }
                        });
                        (ModuleKey { layer, target }, Delta::Factors { b, a })
                    })
                    .collect();
                Member {
                    name: format!("w{i}"),
                    deltas,
                    weights: BTreeMap::new(),
                }
            })
            .collect();
        let params = PackParams {
            energy: 0.95,
            ..PackParams::default()
        };
        let plain = pack(&ms[..1], params).unwrap();
        let whitened = pack_with(&ms[..1], params, Some(&whitening)).unwrap();
        assert!(whitened.params.whitened && !plain.params.whitened);
        let ranks = |set: &PackedSet| -> Vec<usize> {
            set.members[0]
                .cores
                .values()
                .map(|c| c.core_b.cols)
                .collect()
        };
        assert!(
            ranks(&whitened).iter().all(|&r| r <= 2),
            "{:?}",
            ranks(&whitened)
        );
        assert!(ranks(&plain).iter().all(|&r| r >= 3), "{:?}", ranks(&plain));
        assert!(whitened.bytes() < plain.bytes());
        // Truncation, basis and quantization each drop a little of the output energy.
        let (ew, ep) = (
            output_error(x.as_ref(), &ms[0], &whitened),
            output_error(x.as_ref(), &ms[0], &plain),
        );
        assert!(
            ew <= (2.0f64 * 0.05).sqrt() + 0.03,
            "whitened output error {ew}"
        );
        assert!(ew <= ep + 0.03, "whitened {ew} vs plain {ep}");
        // Its Frobenius error is large: it dropped the weak half on purpose.
        let rep = whitened.report(&ms[..1]).unwrap();
        assert!(rep[0].rel_error > 0.5, "{}", rep[0].rel_error);

        // Adding needs the calibration, and only a whitened pack takes it.
        let mut set = whitened.clone();
        let err = set.add(&ms[1]).unwrap_err().to_string();
        assert!(err.contains("needs its calibration"), "{err}");
        set.add_with(&ms[1], Some(&whitening)).unwrap();
        let added = output_error(x.as_ref(), &ms[1], &set);
        assert!(
            added <= (2.0f64 * 0.05).sqrt() + 0.05,
            "added member: {added}"
        );
        let err = plain
            .clone()
            .add_with(&ms[1], Some(&whitening))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not activation-aware"), "{err}");
        // A calibration of another width is named.
        let (_, narrow) = skewed_inputs(cols / 2);
        let err = pack_with(&ms[..1], params, Some(&narrow))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("has 32 inputs but the calibration has 16"),
            "{err}"
        );
        // The flag survives a save and load.
        let dir = std::env::temp_dir().join(format!("s2lc-wpack-{}", std::process::id()));
        crate::format::save(&set, &dir).unwrap();
        assert_eq!(crate::format::load(&dir).unwrap(), set);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn sharing_shrinks_members_with_a_common_subspace() {
        let ms = members(4, 48, 40, 6, 5, 7);
        let params = PackParams {
            energy: 0.999,
            ..PackParams::default()
        };
        let shared = pack(&ms, params).unwrap();
        let alone: usize = pack_separately(&ms, params, None)
            .unwrap()
            .iter()
            .map(PackedSet::bytes)
            .sum();
        assert!(shared.bytes() < alone, "{} vs {alone}", shared.bytes());
        for rep in shared.report(&ms).unwrap() {
            assert!(rep.rel_error < 0.05, "{}: {}", rep.name, rep.rel_error);
        }
        // Resident bases give the same factors as a cold unpack.
        let bases = shared.decode_bases();
        assert_eq!(
            shared.unpack_with(&bases, "m1").unwrap(),
            shared.unpack("m1").unwrap()
        );
        // Unpacked as LoRA: the same deltas.
        let lora = shared.unpack_lora("m0").unwrap();
        assert_eq!(lora.n_deltas(), 4);
    }

    #[test]
    fn bad_members_are_refused_and_leave_the_pack_unchanged() {
        let ms = members(2, 16, 12, 3, 1, 3);
        assert!(pack(&[ms[0].clone(), ms[0].clone()], PackParams::default())
            .unwrap_err()
            .to_string()
            .contains("appears twice"));
        let mut set = pack(&ms, PackParams::default()).unwrap();
        let before = set.clone();
        let err = set.add(&ms[0]).unwrap_err().to_string();
        assert!(err.contains("already has a member 'm0'"), "{err}");
        let mut stranger = members(1, 16, 12, 3, 1, 9).remove(0);
        stranger.name = "new".into();
        stranger.deltas.insert(
            ModuleKey {
                layer: 5,
                target: 1,
            },
            Delta::Dense(matrix(16, 12, 1)),
        );
        let err = set.add(&stranger).unwrap_err().to_string();
        assert!(
            err.contains("layers.5.self_attn.k_proj") && err.contains("no basis"),
            "{err}"
        );
        let mut wrong_shape = members(1, 20, 12, 3, 1, 9).remove(0);
        wrong_shape.name = "other".into();
        let err = set.add(&wrong_shape).unwrap_err().to_string();
        assert!(
            err.contains("is (20, 12) but the pack's basis is (16, 12)"),
            "{err}"
        );
        assert_eq!(set, before);
        let bad = PackParams {
            energy: 1.5,
            ..PackParams::default()
        };
        assert!(pack(&ms, bad)
            .unwrap_err()
            .to_string()
            .contains("outside (0, 1]"));
        // A basis rate is an average of coded bits over mixed widths, within the ladder.
        let rate = |entropy, rate| PackParams {
            entropy,
            mixed_bases: true,
            basis_rate: Some(rate),
            ..PackParams::default()
        };
        for (params, message) in [
            (rate(false, 2.5), "needs --entropy and --mixed-bases"),
            (rate(true, 0.5), "outside [1, 8]"),
            (rate(true, f64::NAN), "outside [1, 8]"),
        ] {
            let err = pack(&ms, params).unwrap_err().to_string();
            assert!(err.contains(message), "{err}");
        }
        assert!(set
            .unpack("nope")
            .unwrap_err()
            .to_string()
            .contains("no member 'nope'"));
    }

    #[test]
    fn mixed_width_bases_spend_bits_where_the_energy_is() {
        // Members with steep spectra (each direction half the one before), as trained adapters
        // have: a few basis vectors carry most of the energy.
        let decay: Vec<f32> = (0..6).map(|k| 0.5f32.powi(k)).collect();
        let steep: Vec<Member> = (0..2)
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
            .collect();
        let params = |mixed_bases| PackParams {
            energy: 0.999,
            basis_bits: QuantBits::Int3,
            mixed_bases,
            ..PackParams::default()
        };
        let uniform = pack(&steep, params(false)).unwrap();
        let mixed = pack(&steep, params(true)).unwrap();
        let worst = |set: &PackedSet| {
            set.report(&steep)
                .unwrap()
                .iter()
                .map(|r| r.rel_error)
                .fold(0.0, f64::max)
        };
        let qbytes = |set: &PackedSet| -> usize {
            set.modules
                .values()
                .map(|m| m.u.bytes() + m.v.bytes())
                .sum()
        };
        let (bu, bm) = (qbytes(&uniform), qbytes(&mixed));
        // No more bits per value (64 rows: groups split no block); each extra group costs one
        // more bitmap word.
        let groups = |set: &PackedSet| -> usize {
            set.modules
                .values()
                .map(|m| m.u.groups.len() + m.v.groups.len())
                .sum()
        };
        let extra = 8 * (groups(&mixed) - groups(&uniform));
        assert!(
            bm <= bu + extra,
            "mixed {bm} B vs uniform {bu} B + {extra} B"
        );
        assert!(
            worst(&mixed) < 0.7 * worst(&uniform),
            "mixed {} vs uniform {}",
            worst(&mixed),
            worst(&uniform)
        );
        let widths: BTreeSet<usize> = mixed
            .modules
            .values()
            .flat_map(|m| m.u.widths().into_iter().chain(m.v.widths()))
            .map(QuantBits::bits)
            .collect();
        assert!(
            widths.len() > 1 && widths.iter().any(|&b| b > 3),
            "{widths:?}"
        );
        // The groups survive the files, under the format that names them.
        let dir = std::env::temp_dir().join(format!("s2lc-mixed-{}", std::process::id()));
        crate::format::save(&mixed, &dir).unwrap();
        let manifest = std::fs::read_to_string(dir.join("pack.json")).unwrap();
        assert!(manifest.contains(crate::format::FORMAT_MIXED), "{manifest}");
        assert_eq!(crate::format::load(&dir).unwrap(), mixed);
        std::fs::remove_dir_all(&dir).ok();
        // A member added later is projected onto the mixed bases like any other.
        let mut grown = mixed.clone();
        let mut late = steep[0].clone();
        late.name = "late".into();
        grown.add(&late).unwrap();
        let late_err = grown.report(std::slice::from_ref(&late)).unwrap()[0].rel_error;
        assert!(late_err < 1.5 * worst(&mixed), "{late_err}");
    }

    #[test]
    fn saved_packs_load_back_identically_and_corruption_is_named() {
        let ms = members(3, 24, 20, 4, 2, 11);
        let set = pack(
            &ms,
            PackParams {
                bits: QuantBits::Int4,
                drop_energy: 0.01,
                energy: 0.9,
                ..PackParams::default()
            },
        )
        .unwrap();
        let dir = std::env::temp_dir().join(format!("s2lc-pack-{}", std::process::id()));
        crate::format::save(&set, &dir).unwrap();
        let back = crate::format::load(&dir).unwrap();
        assert_eq!(back, set);
        // A truncated member file is reported with its path.
        let file = dir.join("members/m1.safetensors");
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
        let err = crate::format::load(&dir).unwrap_err().to_string();
        assert!(err.contains("m1.safetensors"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
        let mut bad = set.clone();
        bad.members[0].name = "../evil".into();
        assert!(crate::format::save(&bad, &dir).is_err());
    }

    #[test]
    fn entropy_coded_packs_are_smaller_load_back_identically_and_detect_corruption() {
        let ms = members(3, 576, 576, 8, 2, 21);
        let params = PackParams {
            energy: 0.99,
            bits: QuantBits::Int4,
            basis_bits: QuantBits::Int3,
            ..PackParams::default()
        };
        let raw = pack(&ms, params).unwrap();
        let coded = pack(
            &ms,
            PackParams {
                entropy: true,
                ..params
            },
        )
        .unwrap();
        // With one width, the same quantization, only stored differently.
        assert!(raw.modules == coded.modules && raw.members == coded.members);
        // Plain files hold the codes, scales and bitmaps plus a header naming three tensors per
        // matrix; coded files are smaller than those codes alone.
        let qbytes = |set: &PackedSet| {
            set.modules
                .values()
                .map(|m| m.u.bytes() + m.v.bytes())
                .sum::<usize>()
                + set.members.iter().map(PackedMember::bytes).sum::<usize>()
        };
        assert!(raw.bytes() > qbytes(&raw));
        assert!(
            coded.bytes() < qbytes(&raw),
            "{} vs {}",
            coded.bytes(),
            qbytes(&raw)
        );
        let dir = std::env::temp_dir().join(format!("s2lc-ans-{}", std::process::id()));
        // The sizes reported are the files' sizes.
        for set in [&raw, &coded] {
            crate::format::save(set, &dir).unwrap();
            let on_disk: u64 = [
                "basis.safetensors",
                "members/m0.safetensors",
                "members/m1.safetensors",
                "members/m2.safetensors",
            ]
            .iter()
            .map(|f| std::fs::metadata(dir.join(f)).unwrap().len())
            .sum();
            assert_eq!(on_disk as usize, set.bytes());
            std::fs::remove_dir_all(&dir).unwrap();
        }
        // Mixed widths: several code streams, and every column group comes back.
        let mixed = pack(
            &ms,
            PackParams {
                entropy: true,
                mixed_bases: true,
                ..params
            },
        )
        .unwrap();
        crate::format::save(&mixed, &dir).unwrap();
        let manifest = std::fs::read_to_string(dir.join("pack.json")).unwrap();
        assert!(manifest.contains(crate::format::FORMAT_CODED), "{manifest}");
        assert!(crate::format::load(&dir).unwrap() == mixed);
        let groups: usize = mixed
            .modules
            .values()
            .map(|m| m.u.groups.len() + m.v.groups.len())
            .sum();
        assert!(groups > 2 * mixed.modules.len(), "{groups} column groups");
        // A flipped byte inside a stream is caught by the decoder's end-state check.
        let file = dir.join("basis.safetensors");
        let mut bytes = std::fs::read(&file).unwrap();
        let (at, len) = {
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let stream = st.tensor("ans.int3.stream").unwrap().data();
            (
                stream.as_ptr() as usize - bytes.as_ptr() as usize,
                stream.len(),
            )
        };
        bytes[at + len / 2] ^= 0x5a;
        std::fs::write(&file, &bytes).unwrap();
        let err = crate::format::load(&dir).unwrap_err().to_string();
        assert!(
            err.contains("basis.safetensors") && err.contains("ans.int3.stream"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
