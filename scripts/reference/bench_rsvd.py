#!/usr/bin/env python3
"""Randomized SVD in scikit-learn and PyTorch against numpy's exact SVD, on the stacks of the Rust
benchmark `cargo bench -p s2lc-spectral --bench rsvd` (crates/s2lc-spectral/benches/rsvd.rs).

    $S2LC_REF_VENV/bin/python scripts/reference/bench_rsvd.py [--blas-threads N]

Needs numpy, torch and scikit-learn (scripts/reference/setup-venv installs them).

Test matrices (the same recipe as the Rust benchmark, with another generator): stacks of 8 matrices
A = U·diag(σ)·Vᵀ (512 × n, n = 128 or 64) with U (512 × n) and V (n × n) the reduced Q of
np.linalg.qr of a Gaussian matrix drawn in float64 from np.random.default_rng(SEED + h) for matrix
h = 0..8 (U's Gaussian first, then V's), and A rounded to float32. Spectra, i = 0..n: "fast"
σ_i = exp(−i/8), "slow" σ_i = 1/(1+i)^0.5 (the hard case for sketching); both share U and V.

Per configuration (stack, spectrum, k ∈ {16, 32}) and engine, the median wall time of RUNS calls
after WARMUP untimed ones, per stack of 8, for
  sklearn: sklearn.utils.extmath.randomized_svd(A, n_components=k, n_oversamples=8, n_iter=2,
           random_state=0) in a loop over the 8 matrices (its default power_iteration_normalizer
           'auto' means *no* re-orthonormalisation between power iterations when n_iter <= 2);
  torch:   torch.svd_lowrank(A, q=k+8, niter=2) on the batched 8 × 512 × n tensor in one call (it
           accepts batches; one Gaussian sketch is shared by the batch), then the leading k
           triplets;
  exact:   np.linalg.svd(A, full_matrices=False) in a loop over the 8 matrices, truncated to k.
Inputs are float32 (all three compute in float32). torch.set_num_threads(2); numpy and scikit-learn
use the BLAS default thread count (printed), or N with --blas-threads N (threadpoolctl limits every
BLAS library loaded: numpy's and scipy's OpenBLAS are two libraries with a thread pool each and
scikit-learn calls both, so on few cores their spinning threads contend).
Errors, in float64: the mean over the stack of ‖A − U_k S_k V_kᵀ‖_F / ‖A‖_F for the engine and for
the exact truncation (the Eckart–Young optimum sqrt(Σ_{i≥k} σ_i²)/‖σ‖, checked against that
formula), and the largest per-matrix ratio engine error / optimal error. Run it on an otherwise idle
machine (the load average before the run is printed).
"""

import argparse
import contextlib
import os
import statistics
import sys
import time

import numpy as np
import sklearn
import threadpoolctl
import torch
from sklearn.utils.extmath import randomized_svd

STACK = 8
ROWS = 512
WARMUP = 2
RUNS = 25
SEED = 2024
OVERSAMPLING = 8
POWER_ITERS = 2
TORCH_THREADS = 2


def spectrum(name, n):
    i = np.arange(n, dtype=np.float64)
    if name == "fast":
        return np.exp(-i / 8.0)
    return 1.0 / np.sqrt(1.0 + i)


def known_matrix(rows, sigma, seed):
    """A = U·diag(σ)·Vᵀ (rows × len(σ)), random orthonormal U and V drawn from `seed`; float32."""
    n = len(sigma)
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((rows, n)))[0]
    v = np.linalg.qr(rng.standard_normal((n, n)))[0]
    return ((u * sigma) @ v.T).astype(np.float32)


def rel_error(a, u, s, vt):
    """‖A − U·diag(s)·Vᵀ‖_F / ‖A‖_F in float64."""
    a = a.astype(np.float64)
    rebuilt = (u.astype(np.float64) * s.astype(np.float64)) @ vt.astype(np.float64)
    return np.linalg.norm(a - rebuilt) / np.linalg.norm(a)


def owner(path):
    """The package a shared library comes with (`torch` for .../site-packages/torch/lib/x.so)."""
    parts = path.split(os.sep)
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1].split(".")[0]
    return os.path.basename(path)


def median_ms(f):
    for _ in range(WARMUP):
        f()
    times = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        f()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_sklearn(mats, k):
    """[(U, s, Vᵀ)] per matrix."""
    return [
        randomized_svd(a, n_components=k, n_oversamples=OVERSAMPLING, n_iter=POWER_ITERS,
                       random_state=0)
        for a in mats
    ]


def run_torch(batch, k):
    """(U, s, V) of the whole batch, truncated to k."""
    u, s, v = torch.svd_lowrank(batch, q=k + OVERSAMPLING, niter=POWER_ITERS)
    return u[..., :k], s[..., :k], v[..., :k]


def run_exact(mats, k):
    out = []
    for a in mats:
        u, s, vt = np.linalg.svd(a, full_matrices=False)
        out.append((u[:, :k], s[:k], vt[:k]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description="Randomized SVD (scikit-learn, PyTorch) vs numpy's exact SVD, 8-matrix stacks.")
    ap.add_argument("--blas-threads", type=int, default=None, metavar="N",
                    help="limit numpy's and scipy's BLAS to N threads (default: the BLAS default)")
    args = ap.parse_args()
    torch.set_num_threads(TORCH_THREADS)
    limit = (threadpoolctl.threadpool_limits(limits=args.blas_threads, user_api="blas")
             if args.blas_threads is not None else contextlib.nullcontext())
    with limit:
        return bench()


def bench() -> int:
    pools = ", ".join("%s's %s: %d" % (owner(p["filepath"]), p["internal_api"], p["num_threads"])
                      for p in threadpoolctl.threadpool_info())
    print("threads: os.cpu_count() = %d, torch.get_num_threads() = %d, thread pools: %s"
          % (os.cpu_count(), torch.get_num_threads(), pools))
    print("versions: numpy %s, scikit-learn %s, torch %s, Python %s"
          % (np.__version__, sklearn.__version__, torch.__version__, sys.version.split()[0]))
    print("load average before the run: %s" % " ".join("%.2f" % x for x in os.getloadavg()))
    print()
    print("| engine | stack | spectrum | k | rSVD ms | exact ms | exact/rSVD | rSVD rel. error "
          "| optimal rel. error | worst rSVD/optimal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in (128, 64):
        for name in ("fast", "slow"):
            sigma = spectrum(name, n)
            mats = [known_matrix(ROWS, sigma, SEED + h) for h in range(STACK)]
            batch = torch.from_numpy(np.stack(mats))
            for k in (16, 32):
                exact = run_exact(mats, k)
                t_exact = median_ms(lambda: run_exact(mats, k))
                err_opt = [rel_error(a, *f) for a, f in zip(mats, exact)]
                formula = np.sqrt(np.sum(sigma[k:] ** 2) / np.sum(sigma ** 2))
                for h, e in enumerate(err_opt):
                    if abs(e - formula) > 1e-3 * formula:
                        print("warning: %dx%d %s k=%d matrix %d: exact truncation error %.6f "
                              "differs from the Eckart-Young optimum %.6f"
                              % (ROWS, n, name, k, h, e, formula), file=sys.stderr)

                sk = run_sklearn(mats, k)
                t_sk = median_ms(lambda: run_sklearn(mats, k))
                err_sk = [rel_error(a, *f) for a, f in zip(mats, sk)]

                torch.manual_seed(0)
                with torch.no_grad():
                    u, s, v = run_torch(batch, k)
                    t_torch = median_ms(lambda: run_torch(batch, k))
                err_torch = [rel_error(a, u[h].numpy(), s[h].numpy(), v[h].numpy().T)
                             for h, a in enumerate(mats)]

                for engine, t, err in (("sklearn", t_sk, err_sk), ("torch", t_torch, err_torch)):
                    worst = max(e / o for e, o in zip(err, err_opt))
                    print("| %s | %d×%d×%d | %s | %d | %.2f | %.2f | %.2fx | %.4f | %.4f | %.4f |"
                          % (engine, STACK, ROWS, n, name, k, t, t_exact, t_exact / t,
                             np.mean(err), np.mean(err_opt), worst))
    return 0


if __name__ == "__main__":
    sys.exit(main())
