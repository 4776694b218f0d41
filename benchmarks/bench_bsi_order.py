"""Why BSI's importance order loses to spectral order: which components it drops and what they cost.

Issue #20 item 2. No evaluation, only allocations: for each whitening, BSI curvature and keep,
BSI's allocation in ``importance`` order (each matrix keeps its most important bases) is compared
with ``spectral`` order (each matrix keeps its top components) on the same scores. Per row:

* ``dropped_top``: components importance order drops although spectral order at the same
  per-matrix rank would keep them (index < the number kept), summed over matrices; ``mats_top0``:
  matrices whose top component (index 0) is dropped;
* ``spectral_cost``: ``½ Σ λ_i`` of the dropped components, the whitening's own predicted loss
  (K-FAC for ``obd``, the input-whitened reconstruction for ``svd-llm``);
  ``spectral_cost_top``: the part of it from the ``dropped_top`` components;
* ``bsi_loss`` = ``first_order`` + ``second_order``: BSI's predicted loss of the dropped set,
  ``Σ (−g_i σ_i)`` and ``Σ ½ h_ii σ_i²`` over it (summed-loss units).

Statistics come from ``--cache-dir`` (the allocation benchmark's, same calibration) when there.

    python -m benchmarks.bench_bsi_order --cache-dir /tmp/cache --curvatures kfac
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import obdk

from .core.data import add_calibration_args, calibrated_model
from .core.env import RESULTS, set_threads
from .core.models import model_label
from .core.rows import ResultLog

DEFAULT_OUT = RESULTS / "bsi_order_smollm2.csv"
KEY_COLS = ("model", "calib", "nsamples", "seqlen", "seed", "whitening", "curvature", "keep", "order")


def order_rows(plan, model, curvature: str, keep: float) -> list[dict]:
    """One row per order (``importance``, ``spectral``) of BSI's allocation at ``keep`` (see the module docstring)."""
    out = []
    for order in ("importance", "spectral"):
        cfg = plan.resolve(keep, alloc="bsi", bsi_curvature=curvature, bsi_order=order, correct="none")
        scores = plan.scores("bsi", model, cfg)
        alloc = plan.allocate(config=cfg, model=model)
        kept = alloc.meta["kept_indices"]
        row = {"dropped": 0, "dropped_top": 0, "mats_top0": 0, "spectral_cost": 0.0, "spectral_cost_top": 0.0,
               "first_order": 0.0, "second_order": 0.0}
        for t in plan.targets:
            sc, lam = scores[t.name], plan.spectra[t.name].eigenvalues.double().cpu()
            k = sc.importance.numel()
            mask = torch.ones(k, dtype=torch.bool)
            mask[kept[t.name][kept[t.name] < k]] = False  # dropped components
            r = k - int(mask.sum())
            top = mask.clone()
            top[r:] = False  # dropped although spectral order at rank r keeps them
            second = sc.second_order  # ½ h σ²
            first = sc.importance - second  # importance = −g σ + ½ h σ²
            row["dropped"] += int(mask.sum())
            row["dropped_top"] += int(top.sum())
            row["mats_top0"] += int(bool(mask[0]))
            row["spectral_cost"] += 0.5 * float(lam[:k][mask].sum())
            row["spectral_cost_top"] += 0.5 * float(lam[:k][top].sum())
            row["first_order"] += float(first[mask].sum())
            row["second_order"] += float(second[mask].sum())
        row["bsi_loss"] = row["first_order"] + row["second_order"]
        row.update(order=order, params=alloc.params, budget=alloc.budget, passes=next(iter(scores.values())).passes)
        out.append(row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_calibration_args(ap)
    ap.add_argument("--whitenings", nargs="+", default=["obd", "svd-llm"], choices=["obd", "svd-llm"])
    ap.add_argument("--curvatures", nargs="+", default=["kfac"], choices=["hutchinson", "blocked", "kfac", "fisher"])
    ap.add_argument("--probes", type=int, default=2, help="Hutchinson probes (hutchinson/blocked)")
    ap.add_argument("--keeps", nargs="+", type=float, default=[0.8, 0.6])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    set_threads(args.threads)
    mname = model_label(args.model)
    model, _, data, source, stats = calibrated_model(args)
    log = ResultLog(args.out, KEY_COLS, resume=False)
    for w in args.whitenings:
        t0 = time.perf_counter()
        plan = obdk.prepare(model, obdk.LowRankConfig(method=w, alloc="uniform", correct="none", probes=args.probes),
                            data, stats=stats, seed=args.seed, progress=False)
        print(f"[plan] {w}: {time.perf_counter() - t0:.0f}s", flush=True)
        for curv in args.curvatures:
            for keep in args.keeps:
                for row in order_rows(plan, model, curv, keep):
                    row = {"model": mname, "calib": source, "nsamples": args.nsamples, "seqlen": args.seqlen,
                           "seed": args.seed, "whitening": w, "curvature": curv, "keep": keep, **row}
                    log.write(row)
                    print(f"  {w:<8} {curv:<10} keep {keep:.2f} {row['order']:<10} dropped {row['dropped']:6d} "
                          f"(in spectral top-r {row['dropped_top']:5d}, top-0 of {row['mats_top0']:3d} matrices)  "
                          f"½Σλ {row['spectral_cost']:.4g} (top-r part {row['spectral_cost_top']:.4g})  "
                          f"BSI {row['bsi_loss']:.4g} = {row['first_order']:.4g} + {row['second_order']:.4g}",
                          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
