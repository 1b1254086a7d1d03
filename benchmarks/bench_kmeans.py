"""fairkernels.kmeans vs scikit-learn KMeans vs faiss.Kmeans on the same data and start.

Every method starts from the same k-means++ centers (computed once by fairkernels, timed as its
own row "fairkernels-seed") and runs at most --n-iter Lloyd iterations with the same tolerance
(default 0: all run the full cap unless the labels stop changing), so the seconds compare the
Lloyd loops and the inertia compares where they end. Inertia is re-evaluated for every method
with one float64 pass over the data against its final centers.

    python benchmarks/bench_kmeans.py                          # 10^6 x 32, K = 100
    python benchmarks/bench_kmeans.py --n 20000 --dim 8 --k 10 # quick check

Appends one row per method to benchmarks/results/kmeans.csv (columns: CSV_COLUMNS).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # lets `python benchmarks/bench_kmeans.py` run from a checkout
    sys.path.insert(0, REPO_ROOT)

from benchmarks.harness import environment  # noqa: E402
from fairkernels import _backend  # noqa: E402
from fairkernels.kmeans import kmeans  # noqa: E402

CSV_COLUMNS = ["date", "commit", "host", "device", "threads", "torch", "method", "n", "dim", "k", "seconds",
               "inertia"]


def make_data(n: int, dim: int, k: int, seed: int, device: torch.device) -> torch.Tensor:
    """k Gaussian blobs (unit noise, centers ~ N(0, 9 I)) as float32 rows."""
    gen = torch.Generator().manual_seed(seed)
    centers = 3.0 * torch.randn(k, dim, generator=gen)
    labels = torch.randint(k, (n,), generator=gen)
    return (centers[labels] + torch.randn(n, dim, generator=gen)).to(device)


def inertia_of(x: torch.Tensor, centers: torch.Tensor) -> float:
    """Sum of squared distances to the nearest center, float64, in row chunks."""
    c = centers.to(x.device, torch.float64)
    total = 0.0
    for start in range(0, x.shape[0], 1 << 16):
        rows = x[start:start + (1 << 16)].double()
        total += float(torch.cdist(rows, c).pow(2).min(1).values.sum())
    return total


def timed(fn):
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def run_fairkernels(x, start_centers, args, backend):
    result, seconds = timed(lambda: kmeans(x, args.k, init_centers=start_centers, n_iter=args.n_iter,
                                           tol=args.tol, backend=backend))
    return seconds, result.centers, result.n_iter


def run_sklearn(x, start_centers, args):
    from sklearn.cluster import KMeans
    x_np, init = x.cpu().numpy(), start_centers.cpu().numpy()
    model = KMeans(args.k, init=init, n_init=1, max_iter=args.n_iter, tol=args.tol, algorithm="lloyd")
    _, seconds = timed(lambda: model.fit(x_np))
    return seconds, torch.from_numpy(model.cluster_centers_), int(model.n_iter_)


def run_faiss(x, start_centers, args):
    import faiss
    x_np = np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32)
    model = faiss.Kmeans(x_np.shape[1], args.k, niter=args.n_iter, seed=args.seed,
                         max_points_per_centroid=max(1, x_np.shape[0] // args.k + 1))
    init = np.ascontiguousarray(start_centers.cpu().numpy(), dtype=np.float32)
    _, seconds = timed(lambda: model.train(x_np, init_centroids=init))
    return seconds, torch.from_numpy(model.centroids), args.n_iter


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--n-iter", type=int, default=20, help="Lloyd iteration cap for every method")
    p.add_argument("--tol", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", default="fairkernels,sklearn,faiss",
                   help="comma-separated subset of fairkernels, sklearn, faiss")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "benchmarks", "results", "kmeans.csv"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    x = make_data(args.n, args.dim, args.k, args.seed, device)
    env = {key: value for key, value in environment(device).items() if key in CSV_COLUMNS}
    rows = []

    def record(method, seconds, centers, n_iter):
        inertia = inertia_of(x, centers)
        rows.append(dict(env, method=method, n=args.n, dim=args.dim, k=args.k, seconds=round(seconds, 4),
                         inertia=f"{inertia:.6e}"))
        print(f"{method:28s} {seconds:9.3f} s  {n_iter:4d} iters  inertia {inertia:.6e}", flush=True)

    seeded, seconds = timed(lambda: kmeans(x, args.k, n_iter=0, seed=args.seed))
    start_centers = seeded.centers
    record("fairkernels-seed(k-means++)", seconds, start_centers, 0)
    if "fairkernels" in methods:
        backends = [b for b in ("cpu", "triton", "cuda", "reference")
                    if not (b == "triton" and device.type != "cuda")
                    and _backend.unavailable_reason(b, device, x.dtype, "kmeans_assign") is None]
        for backend in backends:
            record(f"fairkernels-{backend}", *run_fairkernels(x, start_centers, args, backend))
    if "sklearn" in methods:
        record("sklearn-lloyd", *run_sklearn(x, start_centers, args))
    if "faiss" in methods:
        try:
            import faiss  # noqa: F401
        except ImportError:
            print("faiss: not importable, skipped")
        else:
            record("faiss", *run_faiss(x, start_centers, args))

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    new_file = not os.path.exists(args.out)
    with open(args.out, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
    print(f"appended {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
