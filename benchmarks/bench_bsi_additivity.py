"""Predicted against measured loss of BSI's and zero-sum's truncations: where the additive model fails.

Issue #20 item 2. BSI (spectral order, second-order term) spends the budget by the sum of per-matrix
predicted losses; ZS-SVD's zero-sum rule does not. For each keep and allocation, on the same
``svd-llm`` plan (no correction), one row with:

* ``predicted``: the BSI second-order (K-FAC, ``--curvature``) loss of the dropped set, summed over
  matrices, in nats per calibration token (``Σ ½h_iiσ_i² / N``), and ``first_order`` the part the
  BSI paper's gradient term would add (``Σ −g_iσ_i / N``);
* ``measured``: the mean next-token loss of the truncated model on the calibration windows the
  scores came from, minus the dense model's (``dense_loss``): in sample, so a measured loss above
  a lower-predicted set's is the additive model failing, not over-fitting;
* ``dense_matrices``: matrices left dense; ``mlp_rank_l<a>_<b>``: the kept rank of each MLP
  projection summed over layers ``a..b`` as a fraction of its full rank (``gate``/``up``/``down``).

Statistics come from ``--cache-dir`` (the allocation benchmark's, same calibration) when there.

    python -m benchmarks.bench_bsi_additivity --cache-dir /work/cache/alloc --threads 2
    python -m benchmarks.bench_bsi_additivity --model tiny --nsamples 4 --seqlen 64 --out /tmp/a.csv  # smoke test
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import obdk

from .core.data import add_calibration_args, calibrated_model
from .core.env import RESULTS, set_threads
from .core.models import model_label
from .core.rows import ResultLog

DEFAULT_OUT = RESULTS / "bsi_additivity_smollm2.csv"
KEY_COLS = ("model", "calib", "nsamples", "seqlen", "seed", "whitening", "curvature", "keep", "alloc")
ALLOCS = {"zero-sum": dict(alloc="zero-sum"),
          "bsi": dict(alloc="bsi", bsi_order="spectral", bsi_terms="second")}


def _layer(name: str) -> int:
    """The decoder-layer index in a module name (``model.layers.7.mlp.up_proj`` → 7), else -1."""
    parts = name.split(".")
    return next((int(p) for p in parts if p.isdigit()), -1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_calibration_args(ap)
    ap.add_argument("--curvature", default="kfac", choices=["kfac", "fisher"])
    ap.add_argument("--keeps", nargs="+", type=float, default=[0.8, 0.6])
    ap.add_argument("--thirds", type=int, default=3, help="layer groups of the MLP rank columns")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    set_threads(args.threads)
    from obdk.correct.guarded import heldout_loss
    mname = model_label(args.model)
    model, _, data, source, stats = calibrated_model(args)
    t0 = time.perf_counter()
    plan = obdk.prepare(model, obdk.LowRankConfig(method="svd-llm", alloc="bsi", bsi_curvature=args.curvature,
                                                  correct="none"), data, stats=stats, seed=args.seed, progress=False)
    scores = plan.scores("bsi", model, plan.resolve(bsi_curvature=args.curvature))
    n_tok = plan.stats.loss_tokens
    dense = heldout_loss(model, data.input_ids, data.attention_mask)
    print(f"[plan] svd-llm + {args.curvature} scores in {time.perf_counter() - t0:.0f}s; dense calibration loss "
          f"{dense:.4f}", flush=True)
    layers = 1 + max(_layer(t.name) for t in plan.targets)
    groups = [(g * layers // args.thirds, (g + 1) * layers // args.thirds - 1) for g in range(args.thirds)]
    log = ResultLog(args.out, KEY_COLS, resume=False)
    for keep in args.keeps:
        for aname, kw in ALLOCS.items():
            cfg = plan.resolve(keep, bsi_curvature=args.curvature, correct="none", **kw)
            alloc = plan.allocate(config=cfg, model=model)
            pred = first = 0.0
            kept: dict[tuple, list[int]] = {}
            for t in plan.targets:
                sc, r = scores[t.name], alloc.ranks[t.name]
                k = sc.second_order.numel()
                rr = k if r is None else r
                pred += float(sc.second_order[rr:].sum())
                first += float((sc.importance - sc.second_order)[rr:].sum())
                proj = t.name.rsplit(".", 1)[-1]
                if proj in ("gate_proj", "up_proj", "down_proj"):
                    g = next(i for i, (a, b) in enumerate(groups) if a <= _layer(t.name) <= b)
                    acc = kept.setdefault((g, proj), [0, 0])
                    acc[0] += rr
                    acc[1] += min(t.m, t.n)
            m = copy.deepcopy(model)
            rep = plan.apply(m, keep, bsi_curvature=args.curvature, correct="none", **kw)
            measured = heldout_loss(m, data.input_ids, data.attention_mask) - dense
            del m
            row = {"model": mname, "calib": source, "nsamples": args.nsamples, "seqlen": args.seqlen,
                   "seed": args.seed, "whitening": "svd-llm", "curvature": args.curvature, "keep": keep,
                   "alloc": aname, "keep_actual": rep.keep_actual, "dense_loss": dense,
                   "predicted": pred / n_tok, "first_order": first / n_tok, "measured": measured,
                   "dense_matrices": sum(alloc.ranks[t.name] is None for t in plan.targets)}
            for (g, proj), (kr, full) in sorted(kept.items()):
                a, b = groups[g]
                row[f"mlp_rank_l{a}_{b}_{proj.split('_')[0]}"] = kr / full
            log.write(row)
            print(f"  keep {keep:.2f} {aname:<9} predicted {row['predicted']:.4f} (first-order "
                  f"{row['first_order']:+.4f})  measured {measured:+.4f} nats/token  dense {row['dense_matrices']}  "
                  + " ".join(f"{k[9:]}={v:.2f}" for k, v in row.items() if k.startswith("mlp_rank_")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
