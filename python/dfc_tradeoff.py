"""DFC's accuracy / fairness trade-off over gamma, against DEC (gamma = 0) and AE + k-means.

    python python/dfc_tradeoff.py                                  # digits-reverse, 3 seeds
    python python/dfc_tradeoff.py --data synthetic --gammas 0 1 10
    python python/dfc_tradeoff.py --set centroids_from=q --set lr=0.001   # a recipe variant
    python python/dfc_tradeoff.py --diagnose --seeds 0      # why: loss and gradient anatomy
    python python/dfc_tradeoff.py --summarise benchmarks/results/dfc_tradeoff.csv   # the tables

Per seed the SDAE is pretrained once (layer-wise + fine-tuning, written as a checkpoint) and
every method / gamma resumes from a copy of it, so the rows of one seed differ only in the
clustering phase (a paired comparison). `seconds` is the whole run: the shared pretraining plus
that row's clustering phase, measured in the worker that ran it (one torch thread per worker).
Public API only (fairkernels.data, fairkernels.metrics, fairkernels.train.make_trainer).
"""
from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time

import numpy as np


def load(name: str, seed: int):
    from fairkernels import data
    if name == "digits-reverse":
        return data.load("digits-reverse")
    # Tabular analogue of digits-reverse: the group changes where a row lies but not its class.
    # 4 planted clusters independent of the 2 groups (bias 0), then every row of group 1 moved
    # by a fixed offset 3x the cluster separation (so an unconstrained clusterer splits by group
    # first); standardised like tabular features.
    ds = data.load("synthetic", n=3000, dim=12, n_clusters=4, n_groups=2, bias=0.0, separation=4.0,
                   seed=100 + seed)
    offset = np.random.default_rng(seed).normal(size=ds.X.shape[1])
    X = ds.X + np.where(ds.groups[:, None] == 1, 12.0 * offset / np.linalg.norm(offset), 0.0)
    X = ((X - X.mean(0)) / X.std(0)).astype(np.float32)
    return data.from_arrays(X, ds.groups, ds.y, "synthetic, group 1 shifted")


def options(args, seed: int, checkpoint_dir: str, **extra) -> dict:
    opts = dict(n_clusters=args.clusters, width=args.width, seed=seed, progress=False, verbose=False,
                checkpoint_dir=checkpoint_dir, resume=True)
    opts.update(args.overrides)
    opts.update(extra)
    return opts


def pretrain(job):
    args, seed, root = job
    import torch
    torch.set_num_threads(1)
    from fairkernels.train import make_trainer
    ds = load(args.data, seed)
    started = time.perf_counter()
    make_trainer("dfc", **options(args, seed, os.path.join(root, f"seed{seed}"), epochs=0)).fit(ds.X, ds.groups)
    return seed, time.perf_counter() - started


def cluster(job):
    args, seed, root, method, gamma, pretrain_seconds = job
    import torch
    torch.set_num_threads(1)
    from fairkernels import metrics
    from fairkernels.train import make_trainer
    ds = load(args.data, seed)
    work = tempfile.mkdtemp(dir=root)
    shutil.copytree(os.path.join(root, f"seed{seed}"), work, dirs_exist_ok=True)
    started = time.perf_counter()
    trainer = make_trainer(method, **options(args, seed, work, gamma=gamma)).fit(ds.X, ds.groups)
    seconds = time.perf_counter() - started + pretrain_seconds
    shutil.rmtree(work)
    scores = metrics.evaluate(ds.y, trainer.labels_, ds.groups)
    fair = [r["fair"] for r in trainer.history if r["phase"] == "cluster" and "fair" in r]
    kl = [r["kl"] for r in trainer.history if r["phase"] == "cluster"]
    return dict(data=args.data, variant=args.variant, method=method, gamma=gamma, seed=seed,
                **{k: round(float(v), 5) for k, v in scores.items()},
                kl_last=round(kl[-1], 5) if kl else "", fair_last=round(fair[-1], 5) if fair else "",
                seconds=round(seconds, 1))


def diagnose(args, seed: int, batches: int = 10) -> None:
    """Loss and gradient anatomy of the fairoid term on the pretrained SDAE's embeddings: the
    size of L_fr and of its gradient on z against KL(P||Q)'s, and the share of that gradient
    that is one translation per (cluster, group) cell (moving a group-pure cluster rigidly
    cannot mix it), for eq. 12 centroids fitted to P and to Q; and whether the group is linearly
    separable in the embedding."""
    import torch
    import fairkernels as fk
    from fairkernels.train import make_trainer
    from sklearn.linear_model import LogisticRegression
    torch.set_num_threads(1)
    ds = load(args.data, seed)
    trainer = make_trainer("ae-km", **options(args, seed, None, resume=False)).fit(ds.X, ds.groups)
    z_all = torch.as_tensor(trainer.transform(ds.X))
    groups = torch.as_tensor(ds.groups)
    centers = torch.as_tensor(trainer.cluster_centers_)
    separable = LogisticRegression(max_iter=3000).fit(z_all.numpy(), ds.groups).score(z_all.numpy(), ds.groups)
    print(f"seed {seed}: group predicted from the SDAE embedding by a linear classifier: accuracy {separable:.3f}")
    target_all = fk.dec_target(fk.student_t_assign(z_all, centers))
    generator = torch.Generator().manual_seed(seed)
    num_groups, k = int(groups.max()) + 1, centers.shape[0]
    for source in ("target", "q"):
        stats = []
        for _ in range(batches):
            rows = torch.randperm(z_all.shape[0], generator=generator)[:256]
            z = z_all[rows].clone().requires_grad_()
            q = fk.student_t_assign(z, centers)
            l_cl = fk.kl_div(target_all[rows], q)
            m = fk.batch_centroids(target_all[rows] if source == "target" else q, z)
            pi, present = fk.fairoids(z, groups[rows], num_groups)
            phi = fk.fairness_matrix(m, pi, present=present)
            l_fr = fk.fairoid_loss(fk.fairoid_target(phi, present=present), phi)
            grad_cl, = torch.autograd.grad(l_cl, z, retain_graph=True)
            grad_fr, = torch.autograd.grad(l_fr, z)
            cell = q.argmax(1) * num_groups + groups[rows]
            counts = torch.bincount(cell, minlength=k * num_groups).clamp_min(1)[:, None]
            means = torch.zeros(k * num_groups, z.shape[1]).index_add(0, cell, grad_fr) / counts
            stats.append([l_cl.item(), l_fr.item(), grad_cl.norm().item(), grad_fr.norm().item(),
                          (means[cell].square().sum() / grad_fr.square().sum()).item(),
                          phi.max(1).values.mean().item()])
        mean = np.mean(stats, 0)
        print(f"  M from {source:<6}: L_cl {mean[0]:.4f}  L_fr {mean[1]:.4f}  |dL_cl/dz| {mean[2]:.4f}  "
              f"|dL_fr/dz| {mean[3]:.4f}  share of dL_fr/dz that is a per-(cluster, group) translation "
              f"{mean[4]:.3f}  mean_k max_t phi_kt {mean[5]:.3f} (1/T = {1 / num_groups:.3f})")


def parse_overrides(pairs):
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        out[key] = value
    return out


def summarise(rows):
    keys = ("acc", "nmi", "bal", "mnce", "f_beta", "fwd_mean", "seconds")
    groups = {}
    for row in rows:
        groups.setdefault((row["variant"], row["method"], row["gamma"]), []).append(row)
    print(f"{'variant':<18} {'method':<6} {'gamma':>6} " + " ".join(f"{k:>15}" for k in keys))
    for (variant, method, gamma), items in groups.items():
        cells = []
        for key in keys:
            values = np.array([float(item[key]) for item in items])
            cells.append(f"{values.mean():7.3f}+-{values.std():<6.3f}")
        print(f"{variant:<18} {method:<6} {gamma:>6} " + " ".join(f"{c:>15}" for c in cells))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits-reverse", choices=("digits-reverse", "synthetic"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.1, 0.3, 1, 3, 10, 30])
    parser.add_argument("--clusters", type=int, default=None, help="default: 10 (digits), 4 (synthetic)")
    parser.add_argument("--width", type=float, default=None, help="SDAE width (default: the config's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a DFCConfig override for every run")
    parser.add_argument("--variant", default="default", help="a name for this recipe in the table")
    parser.add_argument("--no-baselines", action="store_true", help="skip DEC and AE + k-means")
    parser.add_argument("--diagnose", action="store_true", help="print the loss / gradient anatomy and exit")
    parser.add_argument("--summarise", metavar="CSV", help="print the mean +- std tables of a results file and exit")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/dfc_tradeoff.csv", help="appended to")
    args = parser.parse_args(argv)
    args.overrides = parse_overrides(args.overrides)
    if args.summarise:
        with open(args.summarise, newline="") as handle:
            rows = list(csv.DictReader(handle))
        for name in dict.fromkeys(row["data"] for row in rows):
            print(name)
            summarise([row for row in rows if row["data"] == name])
        return
    if args.clusters is None:
        args.clusters = 10 if args.data == "digits-reverse" else 4
    if args.width is None:
        from fairkernels.train import DFCConfig
        args.width = DFCConfig().width
    if args.diagnose:
        for seed in args.seeds:
            diagnose(args, seed)
        return
    root = tempfile.mkdtemp(prefix="dfc_tradeoff_")
    ctx = mp.get_context("spawn")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    rows = []
    try:
        with ctx.Pool(args.jobs) as pool:
            pretrained = dict(pool.map(pretrain, [(args, seed, root) for seed in args.seeds]))
            jobs = [] if args.no_baselines else [(args, s, root, m, 0.0, pretrained[s])
                                                 for m in ("ae-km", "dec") for s in args.seeds]
            jobs += [(args, s, root, "dfc", g, pretrained[s]) for g in args.gammas for s in args.seeds]
            for row in pool.imap(cluster, jobs):      # each row is on disk as soon as it exists
                fresh = not os.path.exists(args.out)
                with open(args.out, "a", newline="") as handle:
                    writer = csv.DictWriter(handle, fieldnames=list(row))
                    if fresh:
                        writer.writeheader()
                    writer.writerow(row)
                rows.append(row)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summarise(rows)
    print(f"wrote {len(rows)} rows to {args.out}; settings {args.overrides} width {args.width}", file=sys.stderr)


if __name__ == "__main__":
    main()
