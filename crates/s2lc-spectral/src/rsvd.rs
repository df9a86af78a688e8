//! Randomized truncated SVD (Halko–Martinsson–Tropp, "Finding structure with randomness", 2011).
//!
//! For a `rows × cols` matrix `A` and target rank `k` with oversampling `p` and `q` power
//! iterations:
//!
//! 1. draw a Gaussian sketch `Ω` (`cols × (k+p)`) and form `Y = A·Ω`;
//! 2. `q` times: `Q = qr(Y).Q`, `Z = qr(Aᵀ·Q).Q`, `Y = A·Z` (each product re-orthonormalised by a
//!    thin QR so the small singular directions are not lost to rounding — HMT Algorithm 4.4);
//! 3. `Q = qr(Y).Q` (`rows × (k+p)`, orthonormal columns);
//! 4. `B = Qᵀ·A` (`(k+p) × cols`, small), thin SVD `B = Ũ·Σ·Vᵀ`;
//! 5. `U = Q·Ũ`, and keep the leading `k` triplets.
//!
//! When the sketch is no smaller than the matrix (`k + p ≥ min(rows, cols)`) nothing is gained by
//! sketching, so [`rsvd`] computes the exact [`thin_svd`](crate::svd::thin_svd) and truncates it instead.
//!
//! Rank by energy: this module takes a fixed `k`. To pick the rank by retained energy, run
//! [`rsvd`] with a generous `k` and apply [`crate::energy::rank_for_energy`] to the returned
//! singular values, then truncate the factors (the values are non-increasing, as there).
//!
//! The sketch comes from a small self-contained generator ([`GaussianRng`]: SplitMix64 feeding a
//! Box–Muller transform), so results are bit-reproducible for a given seed without a `rand`
//! dependency.

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::{Accum, Conj, Mat, MatRef, Par};

use crate::rng::SplitMix64;
use crate::svd::{Svd, SvdError};

/// Parameters of the randomized SVD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RsvdParams {
    /// Target rank `k`: how many singular triplets are returned (clamped to `min(rows, cols)`).
    pub rank: usize,
    /// Extra sketch columns `p` beyond `k` (default [`RsvdParams::DEFAULT_OVERSAMPLING`]).
    pub oversampling: usize,
    /// Power iterations `q` (default [`RsvdParams::DEFAULT_POWER_ITERS`]); each one sharpens the
    /// decay of the sketched spectrum from `σᵢ` to `σᵢ^(2q+1)`.
    pub power_iters: usize,
    /// Seed of the Gaussian sketch; the same seed gives bit-identical output.
    pub seed: u64,
}

impl RsvdParams {
    /// Default oversampling `p`.
    pub const DEFAULT_OVERSAMPLING: usize = 8;
    /// Default number of power iterations `q`.
    pub const DEFAULT_POWER_ITERS: usize = 2;
    /// Default sketch seed.
    pub const DEFAULT_SEED: u64 = 0x5EED_2C1C_0000_0001;

    /// Parameters for rank `rank` with the defaults: oversampling 8, 2 power iterations and
    /// [`RsvdParams::DEFAULT_SEED`].
    pub fn new(rank: usize) -> Self {
        Self {
            rank,
            oversampling: Self::DEFAULT_OVERSAMPLING,
            power_iters: Self::DEFAULT_POWER_ITERS,
            seed: Self::DEFAULT_SEED,
        }
    }

    /// The same parameters with another seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
}

/// A tiny seeded standard-normal generator: the workspace's [`SplitMix64`] for uniform
/// 64-bit words, turned into pairs of independent `N(0, 1)` samples by the Box–Muller transform.
///
/// Not cryptographic and not meant to be; it only needs to be reproducible and Gaussian enough for
/// a random sketch (the HMT analysis assumes Gaussian entries).
#[derive(Debug, Clone)]
pub struct GaussianRng {
    uniform: SplitMix64,
    spare: Option<f64>,
}

impl GaussianRng {
    /// A generator seeded with `seed` (any value, including 0, is fine for SplitMix64).
    pub fn new(seed: u64) -> Self {
        Self {
            uniform: SplitMix64::new(seed),
            spare: None,
        }
    }

    /// The next standard-normal sample.
    pub fn next_gaussian(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        // Both in (0, 1]: never 0, so the logarithm is finite.
        let u1 = self.uniform.open_unit_f64();
        let u2 = self.uniform.open_unit_f64();
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some(r * theta.sin());
        r * theta.cos()
    }

    /// A `rows × cols` matrix of independent standard-normal entries (filled column by column).
    pub fn gaussian_matrix(&mut self, rows: usize, cols: usize) -> Mat<f32> {
        let mut m = Mat::<f32>::zeros(rows, cols);
        for j in 0..cols {
            for i in 0..rows {
                m[(i, j)] = self.next_gaussian() as f32;
            }
        }
        m
    }
}

/// Keeps the leading `k` triplets of `svd`.
fn truncate(svd: Svd, k: usize) -> Svd {
    let k = k.min(svd.s.len());
    Svd {
        u: svd.u.subcols(0, k).to_owned(),
        s: svd.s[..k].to_vec(),
        v: svd.v.subcols(0, k).to_owned(),
    }
}

/// Matrices with at least this many entries let faer use its global (rayon) parallelism inside
/// one decomposition; smaller ones run single-threaded, where thread hand-off costs more than the
/// arithmetic (measured on 512×128: 4.1 ms with the global pool vs 1.6 ms sequential).
const PAR_MIN_ENTRIES: usize = 1 << 20;

/// `lhs · rhs` into a new matrix.
fn matmul(lhs: MatRef<'_, f32>, rhs: MatRef<'_, f32>, par: Par) -> Mat<f32> {
    let mut out = Mat::<f32>::zeros(lhs.nrows(), rhs.ncols());
    faer::linalg::matmul::matmul(out.as_mut(), Accum::Replace, lhs, rhs, 1.0, par);
    out
}

/// Orthonormal basis of the column space of the tall matrix `y`: the thin `Q` of a blocked
/// Householder QR (always orthonormal, even when `y` is rank-deficient).
fn orthonormalize(y: MatRef<'_, f32>, par: Par) -> Mat<f32> {
    use faer::linalg::{householder, qr::no_pivoting::factor};
    let (m, n) = y.shape();
    let size = m.min(n);
    let mut qr = y.to_owned();
    let bs = factor::recommended_block_size::<f32>(m, n);
    let mut coeff = Mat::<f32>::zeros(bs, size);
    factor::qr_in_place(
        qr.as_mut(),
        coeff.as_mut(),
        par,
        MemStack::new(&mut MemBuffer::new(factor::qr_in_place_scratch::<f32>(
            m,
            n,
            bs,
            par,
            Default::default(),
        ))),
        Default::default(),
    );
    let mut q = Mat::<f32>::identity(m, size);
    householder::apply_block_householder_sequence_on_the_left_in_place_with_conj(
        qr.get(.., ..size),
        coeff.as_ref(),
        Conj::No,
        q.as_mut(),
        par,
        MemStack::new(&mut MemBuffer::new(
            householder::apply_block_householder_sequence_on_the_left_in_place_scratch::<f32>(
                m, bs, size,
            ),
        )),
    );
    q
}

/// Thin SVD with an explicit parallelism (same contract as [`thin_svd`](crate::svd::thin_svd)).
fn thin_svd_par(a: MatRef<'_, f32>, par: Par) -> Result<Svd, SvdError> {
    use faer::linalg::svd::{svd, svd_scratch, ComputeSvdVectors};
    let (m, n) = a.shape();
    let size = m.min(n);
    let mut u = Mat::<f32>::zeros(m, size);
    let mut v = Mat::<f32>::zeros(n, size);
    let mut s = faer::diag::Diag::<f32>::zeros(size);
    svd(
        a,
        s.as_mut(),
        Some(u.as_mut()),
        Some(v.as_mut()),
        par,
        MemStack::new(&mut MemBuffer::new(svd_scratch::<f32>(
            m,
            n,
            ComputeSvdVectors::Thin,
            ComputeSvdVectors::Thin,
            par,
            Default::default(),
        ))),
        Default::default(),
    )
    .map_err(|_| SvdError::NoConvergence { rows: m, cols: n })?;
    let s = (0..size).map(|i| s[i]).collect();
    Ok(Svd { u, s, v })
}

/// Randomized rank-`k` SVD of the `rows × cols` matrix `a` (see the module docs for the
/// algorithm): `u` is `rows × k`, `s` has `k` non-increasing values, `v` is `cols × k`, with
/// `k = min(p.rank, rows, cols)` and orthonormal columns in `u` and `v`.
///
/// Falls back to the exact [`thin_svd`](crate::svd::thin_svd) (truncated to `k`) when `k + oversampling ≥
/// min(rows, cols)`. Non-finite input is rejected with [`SvdError::NoConvergence`], as the
/// exact SVD does.
pub fn rsvd(a: MatRef<'_, f32>, p: &RsvdParams) -> Result<Svd, SvdError> {
    let par = if a.nrows() * a.ncols() >= PAR_MIN_ENTRIES {
        faer::get_global_parallelism()
    } else {
        Par::Seq
    };
    rsvd_with_par(a, p, par)
}

/// [`rsvd`] with an explicit parallelism for the products, QRs and the small SVD.
fn rsvd_with_par(a: MatRef<'_, f32>, p: &RsvdParams, par: Par) -> Result<Svd, SvdError> {
    let (rows, cols) = (a.nrows(), a.ncols());
    let full = rows.min(cols);
    let k = p.rank.min(full);
    if k == 0 {
        return Ok(Svd {
            u: Mat::zeros(rows, 0),
            s: Vec::new(),
            v: Mat::zeros(cols, 0),
        });
    }
    let l = k.saturating_add(p.oversampling);
    if l >= full {
        // With the caller's parallelism: faer's default pool is slower than one thread on
        // matrices this size (`cargo bench -p s2lc-spectral --bench rsvd`).
        return thin_svd_par(a, par).map(|svd| truncate(svd, k));
    }
    let finite = (0..cols).all(|j| (0..rows).all(|i| a[(i, j)].is_finite()));
    if !finite {
        return Err(SvdError::NoConvergence { rows, cols });
    }

    let omega = GaussianRng::new(p.seed).gaussian_matrix(cols, l);
    let mut y = matmul(a, omega.as_ref(), par);
    for _ in 0..p.power_iters {
        let q = orthonormalize(y.as_ref(), par);
        let z = matmul(a.transpose(), q.as_ref(), par);
        let qz = orthonormalize(z.as_ref(), par);
        y = matmul(a, qz.as_ref(), par);
    }
    let q = orthonormalize(y.as_ref(), par);
    let b = matmul(q.transpose(), a, par);
    let small =
        thin_svd_par(b.as_ref(), par).map_err(|_| SvdError::NoConvergence { rows, cols })?;
    let u = matmul(q.as_ref(), small.u.as_ref(), par);
    Ok(truncate(
        Svd {
            u,
            s: small.s,
            v: small.v,
        },
        k,
    ))
}

/// [`rsvd`] of every matrix in `mats` (e.g. one block per KV head) with the same parameters and
/// seed; results are in input order and bit-identical to calling [`rsvd`] on each matrix. On
/// failure the error of the first failing matrix (in input order) is returned.
///
/// The matrices are spread over `std::thread::available_parallelism()` scoped threads (this crate
/// does not depend on `rayon`, so plain `std::thread::scope` is used); each decomposition runs
/// single-threaded inside its thread unless it is large enough for [`rsvd`] to use faer's pool.
pub fn rsvd_batch(mats: &[MatRef<'_, f32>], p: &RsvdParams) -> Result<Vec<Svd>, SvdError> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(mats.len());
    if threads <= 1 {
        return mats.iter().map(|&a| rsvd(a, p)).collect();
    }
    let chunk = mats.len().div_ceil(threads);
    let parts: Vec<Vec<Result<Svd, SvdError>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = mats
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(|&a| rsvd(a, p)).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    parts.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::svd::thin_svd;
    use crate::test_matrix;
    use crate::test_max_abs as max_abs;

    fn frob(m: MatRef<'_, f32>) -> f64 {
        crate::energy::sq_frobenius(m).sqrt()
    }

    /// `A = U₀·diag(s)·V₀ᵀ` with orthonormal `U₀`, `V₀` from thin SVDs of random matrices and
    /// `s_i = decay^i`; returns `A` and `s`.
    fn known_spectrum(rows: usize, cols: usize, decay: f32, seed: u64) -> (Mat<f32>, Vec<f32>) {
        let n = rows.min(cols);
        let u0 = thin_svd(test_matrix(rows, n, seed).as_ref()).unwrap().u;
        let v0 = thin_svd(test_matrix(cols, n, seed ^ 0xABCD).as_ref())
            .unwrap()
            .u;
        let s: Vec<f32> = (0..n).map(|i| decay.powi(i as i32)).collect();
        let d = Mat::from_fn(n, n, |i, j| if i == j { s[i] } else { 0.0 });
        (&u0 * &d * v0.transpose(), s)
    }

    fn rebuild(svd: &Svd) -> Mat<f32> {
        let k = svd.s.len();
        let d = Mat::from_fn(k, k, |i, j| if i == j { svd.s[i] } else { 0.0 });
        &svd.u * &d * svd.v.transpose()
    }

    /// Optimal rank-`k` Frobenius error (Eckart–Young): `sqrt(Σ_{i≥k} σᵢ²)`.
    fn tail(s: &[f32], k: usize) -> f64 {
        s[k..]
            .iter()
            .map(|&x| (x as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    }

    /// Checks values against the truth and the error against `(1 + slack)·optimal`.
    ///
    /// Bound asserted: `‖A − U_k S_k V_kᵀ‖_F ≤ 1.1 · sqrt(Σ_{i>k} σᵢ²)`, i.e. within 10 % of the
    /// Eckart–Young optimum. This is deliberately *stricter* than HMT's expected-error bound
    /// (Thm 10.5 with q = 0: `E‖A − QQᵀA‖_F ≤ (1 + k/(p−1))^{1/2} · tail`, a factor 1.8–2.4
    /// for p = 8 and k = 16/32; power iterations only improve it to roughly that factor raised to
    /// `1/(2q+1)` in the spectral norm). With q = 2 and a decaying spectrum the realised error is
    /// essentially optimal, so the loose bound would not catch a broken implementation.
    fn check_accuracy(a: &Mat<f32>, s_true: &[f32], svd: &Svd, k: usize, value_tol: f32) {
        assert_eq!(svd.s.len(), k);
        assert_eq!(svd.u.ncols(), k);
        assert_eq!(svd.v.ncols(), k);
        assert!(svd.s.windows(2).all(|w| w[0] >= w[1]), "values not sorted");
        for (i, (&got, &want)) in svd.s.iter().zip(s_true).enumerate() {
            let rel = (got - want).abs() / want;
            assert!(rel < value_tol, "σ_{i}: got {got} want {want} rel {rel}");
        }
        let err = frob((a - rebuild(svd)).as_ref());
        let opt = tail(s_true, k);
        assert!(
            err <= 1.1 * opt,
            "error {err} exceeds 1.1 × optimal {opt} (k = {k})"
        );
    }

    fn check_orthonormal(svd: &Svd) {
        let k = svd.s.len();
        let eye = Mat::<f32>::identity(k, k);
        let du = max_abs((svd.u.transpose() * &svd.u - &eye).as_ref());
        let dv = max_abs((svd.v.transpose() * &svd.v - &eye).as_ref());
        assert!(du < 1e-4, "UᵀU − I = {du}");
        assert!(dv < 1e-4, "VᵀV − I = {dv}");
    }

    #[test]
    fn matches_known_spectrum_kv_sizes() {
        for &(rows, cols, k) in &[(512, 128, 16), (512, 128, 32), (512, 64, 16), (512, 64, 32)] {
            let (a, s) = known_spectrum(rows, cols, 0.8, 7 + k as u64);
            let svd = rsvd(a.as_ref(), &RsvdParams::new(k)).unwrap();
            check_accuracy(&a, &s, &svd, k, 1e-3);
            check_orthonormal(&svd);
        }
    }

    #[test]
    fn slow_decay_still_near_optimal() {
        // σᵢ = 0.97^i: the tail carries most of the energy, the hard case for sketching. The
        // leading values still match to 1e-3 thanks to the two power iterations.
        for &(rows, cols, k) in &[(512, 128, 16), (512, 64, 32)] {
            let (a, s) = known_spectrum(rows, cols, 0.97, 99 + k as u64);
            let svd = rsvd(a.as_ref(), &RsvdParams::new(k)).unwrap();
            check_orthonormal(&svd);
            let err = frob((&a - rebuild(&svd)).as_ref());
            let opt = tail(&s, k);
            assert!(err <= 1.1 * opt, "error {err} vs optimal {opt}");
        }
    }

    #[test]
    fn orthonormal_on_random_matrices() {
        for &(rows, cols, k) in &[(512, 128, 16), (512, 64, 32), (64, 512, 16)] {
            let a = test_matrix(rows, cols, 3);
            let svd = rsvd(a.as_ref(), &RsvdParams::new(k)).unwrap();
            assert_eq!(svd.u.nrows(), rows);
            assert_eq!(svd.v.nrows(), cols);
            check_orthonormal(&svd);
            assert!(svd.s.windows(2).all(|w| w[0] >= w[1]));
        }
    }

    #[test]
    fn exact_fallback_equals_truncated_thin_svd() {
        let a = test_matrix(512, 64, 11);
        // k + p = 60 + 8 ≥ 64: exact path.
        for k in [56, 60, 64, 100] {
            let svd = rsvd(a.as_ref(), &RsvdParams::new(k)).unwrap();
            // A matrix this small is decomposed on the calling thread.
            let exact = truncate(thin_svd_par(a.as_ref(), Par::Seq).unwrap(), k);
            assert_eq!(svd.s, exact.s);
            assert_eq!(svd.u, exact.u);
            assert_eq!(svd.v, exact.v);
            assert_eq!(svd.s.len(), k.min(64));
            // The same values as the (differently parallelised) public exact SVD, to rounding.
            let public = thin_svd(a.as_ref()).unwrap();
            for (x, y) in svd.s.iter().zip(&public.s) {
                assert!((x - y).abs() <= 1e-5 * public.s[0], "{x} vs {y}");
            }
        }
    }

    #[test]
    fn rank_zero_is_empty() {
        let a = test_matrix(32, 16, 1);
        let svd = rsvd(a.as_ref(), &RsvdParams::new(0)).unwrap();
        assert!(svd.s.is_empty());
        assert_eq!((svd.u.nrows(), svd.u.ncols()), (32, 0));
        assert_eq!((svd.v.nrows(), svd.v.ncols()), (16, 0));
    }

    #[test]
    fn non_finite_input_is_an_error() {
        let mut a = test_matrix(512, 128, 1);
        a[(3, 5)] = f32::NAN;
        assert!(rsvd(a.as_ref(), &RsvdParams::new(16)).is_err());
    }

    #[test]
    fn batch_equals_per_matrix() {
        let mats: Vec<Mat<f32>> = (0..4).map(|h| test_matrix(512, 64, 100 + h)).collect();
        let refs: Vec<MatRef<'_, f32>> = mats.iter().map(|m| m.as_ref()).collect();
        let p = RsvdParams::new(16);
        let batch = rsvd_batch(&refs, &p).unwrap();
        assert_eq!(batch.len(), mats.len());
        for (m, b) in mats.iter().zip(&batch) {
            let one = rsvd(m.as_ref(), &p).unwrap();
            assert_eq!(one.s, b.s);
            assert_eq!(one.u, b.u);
            assert_eq!(one.v, b.v);
        }
    }

    #[test]
    fn seed_determinism_and_independence() {
        let (a, s) = known_spectrum(512, 128, 0.8, 5);
        let p = RsvdParams::new(16);
        let x = rsvd(a.as_ref(), &p).unwrap();
        let y = rsvd(a.as_ref(), &p).unwrap();
        assert_eq!(x.s, y.s);
        assert_eq!(x.u, y.u);
        assert_eq!(x.v, y.v);
        let z = rsvd(a.as_ref(), &p.with_seed(42)).unwrap();
        assert_ne!(x.u, z.u, "a different seed should give a different sketch");
        check_accuracy(&a, &s, &z, 16, 1e-3);
        check_orthonormal(&z);
    }

    #[test]
    fn gaussian_rng_moments() {
        let mut g = GaussianRng::new(1);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| g.next_gaussian()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
    }
}
