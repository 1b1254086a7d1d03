"""fairkernels.kmeans vs scikit-learn KMeans vs faiss.Kmeans on the same data and start.

Every method starts from the same k-means++ centers (computed once by fairkernels, timed as its
own row "fairkernels-seed") and runs at most --n-iter Lloyd iterations with the same tolerance
(default 0: all run the full cap unless the labels stop changing), so the seconds compare the
Lloyd loops and the inertia compares where they end. Inertia is re-evaluated for every method
with one float64 pass over the data against its final centers (not timed).

fairkernels and scikit-learn both return the labels of the final centers (one more assignment
pass); faiss.Kmeans.train does not, so faiss is timed twice: "faiss" (train only) and
"faiss+labels" (train, then index.search for the labels: the same outputs as the others).
faiss is an optional comparison: skipped when it is not importable.

Each method runs --reps times per thread count (--threads, default 1 and 2); the best time is
reported. Timings on a shared machine are noisy: compare the ratios of one run.

    python benchmarks/bench_kmeans.py                          # 10^6 x 32, K = 100
    python benchmarks/bench_kmeans.py --n 20000 --dim 8 --k 10 # quick check

Appends one row per method and thread count to benchmarks/results/kmeans.csv (CSV_COLUMNS).
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
               "inertia", "n_iter", "reps"]


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


def best_of(reps: int, fn):
    """(output of the last run, best wall-clock seconds of `reps` runs of fn())."""
    best, out = float("inf"), None
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return out, best


def run_fairkernels(x, start_centers, args, backend):
    result, seconds = best_of(args.reps, lambda: kmeans(x, args.k, init_centers=start_centers, n_iter=args.n_iter,
                                                        tol=args.tol, backend=backend))
    return seconds, result.centers, result.n_iter


def run_sklearn(x, start_centers, args, threads):
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits
    x_np, init = x.cpu().numpy(), start_centers.cpu().numpy()
    model = KMeans(args.k, init=init, n_init=1, max_iter=args.n_iter, tol=args.tol, algorithm="lloyd")
    with threadpool_limits(limits=threads):
        _, seconds = best_of(args.reps, lambda: model.fit(x_np))
    return seconds, torch.from_numpy(model.cluster_centers_), int(model.n_iter_)


def run_faiss(x, start_centers, args, threads, with_labels):
    import faiss
    faiss.omp_set_num_threads(threads)
    x_np = np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32)
    init = np.ascontiguousarray(start_centers.cpu().numpy(), dtype=np.float32)

    def fit():
        # max_points_per_centroid above N/K: faiss would otherwise train on a subsample.
        model = faiss.Kmeans(x_np.shape[1], args.k, niter=args.n_iter, seed=args.seed,
                             max_points_per_centroid=x_np.shape[0] // args.k + 1)
        model.train(x_np, init_centroids=init)
        if with_labels:
            model.index.search(x_np, 1)
        return model

    model, seconds = best_of(args.reps, fit)
    return seconds, torch.from_numpy(model.centroids.copy()), args.n_iter


def fairkernels_backends(device, dtype, with_reference):
    """The fused backends to time here (never interpreted Triton), plus the reference if asked."""
    names = [b for b in ("cpu", "triton", "cuda")
             if not (b == "triton" and device.type != "cuda")
             and _backend.unavailable_reason(b, device, dtype, "kmeans_assign") is None]
    return names + (["reference"] if with_reference or not names else [])


def faiss_importable() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--n-iter", type=int, default=20, help="Lloyd iteration cap for every method")
    p.add_argument("--tol", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=3, help="timed runs per method; the best is reported")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", default="fairkernels,sklearn,faiss",
                   help="comma-separated subset of fairkernels, sklearn, faiss")
    p.add_argument("--with-reference", action="store_true",
                   help="also time fairkernels' pure-PyTorch reference backend (slow)")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "benchmarks", "results", "kmeans.csv"))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    thread_counts = [int(t) for t in args.threads.split(",") if t.strip()]
    x = make_data(args.n, args.dim, args.k, args.seed, device)
    rows = []
    seeded = kmeans(x, args.k, n_iter=0, seed=args.seed)
    start_centers = seeded.centers
    with_faiss = "faiss" in methods and faiss_importable()
    if "faiss" in methods and not with_faiss:
        print("faiss: not importable, skipped")

    previous_threads = torch.get_num_threads()
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            env = {key: value for key, value in environment(device).items() if key in CSV_COLUMNS}
            print(f"# {args.n} x {args.dim}, K = {args.k}, {args.n_iter} iterations, {threads} thread(s), "
                  f"best of {args.reps}")

            def record(method, seconds, centers, n_iter):
                inertia = inertia_of(x, centers)
                rows.append(dict(env, method=method, n=args.n, dim=args.dim, k=args.k, seconds=round(seconds, 4),
                                 inertia=f"{inertia:.6e}", n_iter=n_iter, reps=args.reps))
                print(f"{method:28s} {seconds:9.3f} s  {n_iter:4d} iters  inertia {inertia:.6e}", flush=True)

            _, seconds = best_of(args.reps, lambda: kmeans(x, args.k, n_iter=0, seed=args.seed))
            record("fairkernels-seed(k-means++)", seconds, start_centers, 0)
            if "fairkernels" in methods:
                for backend in fairkernels_backends(device, x.dtype, args.with_reference):
                    record(f"fairkernels-{backend}", *run_fairkernels(x, start_centers, args, backend))
            if "sklearn" in methods:
                record("sklearn-lloyd", *run_sklearn(x, start_centers, args, threads))
            if with_faiss:
                record("faiss", *run_faiss(x, start_centers, args, threads, with_labels=False))
                record("faiss+labels", *run_faiss(x, start_centers, args, threads, with_labels=True))
    finally:
        torch.set_num_threads(previous_threads)
    write_rows(args.out, rows)
    print(f"appended {len(rows)} rows to {args.out}")
    return rows


def write_rows(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new_file = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
