//! Batched randomized SVD ([`rsvd_batch`]) against the exact thin SVD ([`thin_svd`] of each matrix,
//! truncated to `k`), on stacks of 8 KV-sized matrices with a known spectrum: time per stack and
//! relative Frobenius error. `cargo bench -p s2lc-spectral --bench rsvd`.
//!
//! Test matrices (the recipe of `scripts/reference/bench_rsvd.py`, with another generator):
//! `A = U·diag(σ)·Vᵀ` (`512 × n`, n = 128 or 64) with `U` (`512 × n`) and `V` (`n × n`) the thin
//! `Q` of a QR of a Gaussian matrix, drawn in f64 from `GaussianRng::new(SEED + h)` for matrix
//! `h = 0..8` (U's Gaussian first, then V's, each filled column by column), and `A` rounded to f32.
//! Spectra, `i = 0..n`: "fast" `σᵢ = exp(−i/8)`, "slow" `σᵢ = 1/(1+i)^0.5` (the hard case for
//! sketching). Both spectra share the same `U` and `V`.
//!
//! Per configuration (stack, spectrum, k ∈ {16, 32}): median time of [`RUNS`] runs after
//! [`WARMUP`] untimed ones, for `rsvd_batch` over the stack (`RsvdParams::new(k)`: oversampling 8,
//! 2 power iterations; one scoped thread per core, each decomposition sequential) and for the
//! loop of exact thin SVDs plus truncation, twice: inside each SVD faer's global parallelism (by
//! default Rayon over all cores, as `thin_svd` uses it; slow for matrices this small), and one
//! sequential SVD per scoped thread, as `rsvd_batch` arranges its work (the fair baseline). Errors: the mean over the stack of
//! `‖A − U_k S_k V_kᵀ‖_F / ‖A‖_F` for both, the exact one being the Eckart–Young optimum
//! `sqrt(Σ_{i≥k} σᵢ²)/‖σ‖` (checked against that formula; a warning goes to stderr when they
//! differ), and the largest per-matrix ratio rSVD error / optimal error. Run it on an otherwise
//! idle machine: the load average before the run is printed.

use std::hint::black_box;
use std::time::Instant;

use faer::{Mat, MatRef};
use s2lc_spectral::rsvd::{rsvd_batch, GaussianRng, RsvdParams};
use s2lc_spectral::svd::{thin_svd, Svd, SvdError};

/// Matrices per stack.
const STACK: usize = 8;
/// Rows of every matrix.
const ROWS: usize = 512;
/// Untimed runs before timing.
const WARMUP: usize = 2;
/// Timed runs; the median is reported.
const RUNS: usize = 25;
/// Seed of matrix 0 of a stack; matrix `h` uses `SEED + h`.
const SEED: u64 = 2024;

/// The singular values of the test matrices.
#[derive(Debug, Clone, Copy)]
enum Spectrum {
    /// `σᵢ = exp(−i/8)`.
    Fast,
    /// `σᵢ = 1/(1+i)^0.5`.
    Slow,
}

impl Spectrum {
    fn name(self) -> &'static str {
        match self {
            Spectrum::Fast => "fast",
            Spectrum::Slow => "slow",
        }
    }

    fn values(self, n: usize) -> Vec<f64> {
        (0..n)
            .map(|i| match self {
                Spectrum::Fast => (-(i as f64) / 8.0).exp(),
                Spectrum::Slow => 1.0 / (1.0 + i as f64).sqrt(),
            })
            .collect()
    }
}

/// Orthonormal `rows × cols` (`rows ≥ cols`): the thin `Q` of a QR of a Gaussian matrix.
fn random_orthonormal(rng: &mut GaussianRng, rows: usize, cols: usize) -> Mat<f64> {
    let mut g = Mat::<f64>::zeros(rows, cols);
    for j in 0..cols {
        for i in 0..rows {
            g[(i, j)] = rng.next_gaussian();
        }
    }
    g.qr().compute_thin_Q()
}

/// `A = U·diag(σ)·Vᵀ` (`rows × σ.len()`) with random orthonormal `U`, `V` drawn from `seed`.
fn known_matrix(rows: usize, sigma: &[f64], seed: u64) -> Mat<f32> {
    let n = sigma.len();
    let mut rng = GaussianRng::new(seed);
    let u = random_orthonormal(&mut rng, rows, n);
    let v = random_orthonormal(&mut rng, n, n);
    let us = Mat::<f64>::from_fn(rows, n, |i, j| u[(i, j)] * sigma[j]);
    let a = &us * v.transpose();
    Mat::from_fn(rows, n, |i, j| a[(i, j)] as f32)
}

/// `‖A − U·diag(s)·Vᵀ‖_F / ‖A‖_F`, accumulated in f64.
fn rel_error(a: MatRef<'_, f32>, svd: &Svd) -> f64 {
    let us = Mat::<f32>::from_fn(svd.u.nrows(), svd.s.len(), |i, j| svd.u[(i, j)] * svd.s[j]);
    let rebuilt = &us * svd.v.transpose();
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for j in 0..a.ncols() {
        for i in 0..a.nrows() {
            let x = a[(i, j)] as f64;
            diff += (x - rebuilt[(i, j)] as f64).powi(2);
            norm += x * x;
        }
    }
    (diff / norm).sqrt()
}

/// The exact thin SVD of each matrix, truncated to its leading `k` triplets.
fn exact_truncated(mats: &[MatRef<'_, f32>], k: usize) -> Result<Vec<Svd>, SvdError> {
    mats.iter()
        .map(|&a| {
            let svd = thin_svd(a)?;
            Ok(Svd {
                u: svd.u.subcols(0, k).to_owned(),
                s: svd.s[..k].to_vec(),
                v: svd.v.subcols(0, k).to_owned(),
            })
        })
        .collect()
}

/// [`exact_truncated`] with the stack split over `threads` scoped threads, each SVD sequential
/// (faer's global parallelism set to `Par::Seq` by the caller): the fair exact baseline, arranged
/// as `rsvd_batch` arranges its work.
fn exact_per_thread(
    mats: &[MatRef<'_, f32>],
    k: usize,
    threads: usize,
) -> Result<Vec<Svd>, SvdError> {
    let chunk = mats.len().div_ceil(threads.max(1));
    std::thread::scope(|scope| {
        let handles: Vec<_> = mats
            .chunks(chunk)
            .map(|part| scope.spawn(move || exact_truncated(part, k)))
            .collect();
        let mut out = Vec::with_capacity(mats.len());
        for h in handles {
            out.extend(h.join().expect("exact SVD thread panicked")?);
        }
        Ok(out)
    })
}

/// Median wall time of `f` in milliseconds, over [`RUNS`] calls after [`WARMUP`] untimed ones.
fn median_ms<T>(mut f: impl FnMut() -> T) -> f64 {
    for _ in 0..WARMUP {
        black_box(f());
    }
    let mut times: Vec<f64> = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            black_box(f());
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[RUNS / 2]
}

fn main() -> Result<(), SvdError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("threads: {threads} (std::thread::available_parallelism)");
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        println!("load average before the run: {}", load.trim());
    }
    println!();
    println!(
        "| stack | spectrum | k | rSVD ms | exact ms (faer threads) | exact ms (one SVD per thread) \
         | best exact/rSVD | rSVD rel. error | optimal rel. error | worst rSVD/optimal |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for n in [128usize, 64] {
        for spectrum in [Spectrum::Fast, Spectrum::Slow] {
            let sigma = spectrum.values(n);
            let mats: Vec<Mat<f32>> = (0..STACK as u64)
                .map(|h| known_matrix(ROWS, &sigma, SEED + h))
                .collect();
            let refs: Vec<MatRef<'_, f32>> = mats.iter().map(|m| m.as_ref()).collect();
            let total: f64 = sigma.iter().map(|s| s * s).sum();
            for k in [16usize, 32] {
                let p = RsvdParams::new(k);
                let approx = rsvd_batch(&refs, &p)?;
                let exact = exact_truncated(&refs, k)?;
                let t_rsvd = median_ms(|| rsvd_batch(&refs, &p));
                let t_exact = median_ms(|| exact_truncated(&refs, k));
                let par = faer::get_global_parallelism();
                faer::set_global_parallelism(faer::Par::Seq);
                let t_exact_seq = median_ms(|| exact_per_thread(&refs, k, threads));
                faer::set_global_parallelism(par);

                let err_rsvd: Vec<f64> = refs
                    .iter()
                    .zip(&approx)
                    .map(|(&a, svd)| rel_error(a, svd))
                    .collect();
                let err_opt: Vec<f64> = refs
                    .iter()
                    .zip(&exact)
                    .map(|(&a, svd)| rel_error(a, svd))
                    .collect();
                let formula = (sigma[k..].iter().map(|s| s * s).sum::<f64>() / total).sqrt();
                for (h, &e) in err_opt.iter().enumerate() {
                    if (e - formula).abs() > 1e-3 * formula {
                        eprintln!(
                            "warning: {ROWS}×{n} {} k={k} matrix {h}: exact truncation error \
                             {e:.6} differs from the Eckart–Young optimum {formula:.6}",
                            spectrum.name()
                        );
                    }
                }
                let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
                let worst = err_rsvd
                    .iter()
                    .zip(&err_opt)
                    .map(|(r, o)| r / o)
                    .fold(f64::NEG_INFINITY, f64::max);
                println!(
                    "| {STACK}×{ROWS}×{n} | {} | {k} | {t_rsvd:.2} | {t_exact:.2} | {t_exact_seq:.2} \
                     | {:.2}x | {:.4} | {:.4} | {worst:.4} |",
                    spectrum.name(),
                    t_exact.min(t_exact_seq) / t_rsvd,
                    mean(&err_rsvd),
                    mean(&err_opt),
                );
            }
        }
    }
    Ok(())
}
