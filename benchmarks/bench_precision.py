"""fp32 or fp64 for the decompositions? Measured on real statistics (issue #7, item 2).

SmolLM2-135M, one calibration (``C_x``, ``C_g``; 32 × 512 WikiText-2 validation tokens, cached on
disk), then every targeted Linear decomposed twice — ``compute_dtype`` fp64 and fp32, same
solver (``--solver``, default the exact eigen form), same damping — and both truncated to the
ranks of the fp64 plan's global allocation at each ``--keeps``. For every matrix the K-FAC loss
``½‖R_gᵀ (W − B A) S_x‖²`` of each truncation is evaluated in fp64 against the damped statistics,
so the fp32 cost is measured as *excess loss over the fp64 optimum*, not as a difference of
printed eigenvalues. Also: wall time of each decomposition pass (the same process, back to back)
and, with ``--eval-windows N``, the WikiText-2 perplexity of the two models.

    python -m benchmarks.bench_precision --keeps 0.8 0.6 --eval-windows 32
    python -m benchmarks.bench_precision --model tiny --nsamples 2 --seqlen 64 --keeps 0.8 --eval-windows 1 \
        --cache-dir '' --out /tmp/p.csv                                          # seconds: smoke test
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import obdk

from .core.data import EvalSets, data_dir_of
from .core.env import RESULTS, env_fields, set_threads
from .core.models import load
from .core.rows import write_csv
from .core.sweep import keep_sweep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), tiny, or any obdk.hub spec")
    ap.add_argument("--method", default="obd", choices=["obd", "svd-llm"])
    ap.add_argument("--solver", default="eig", choices=["eig", "cholesky"])
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.6])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=0, help="also evaluate both models on N windows (0: skip)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache-dir", default=os.environ.get("OBDK_CACHE_DIR", "/tmp/obdk-stats-cache"),
                    help="statistics cache ('' to disable)")
    ap.add_argument("--data-dir", default=None, help="default $OBDK_DATA_DIR, else ../shared/data")
    ap.add_argument("--out", default=str(RESULTS / "precision_smollm2.csv"))
    args = ap.parse_args(argv)
    set_threads(args.threads)

    from obdk.calibrate.data import get_calibration_windows
    from obdk.calibrate.stats import calibrate
    from obdk.decompose import damp_covariance, kfac_loss

    data_dir = data_dir_of(args.data_dir)
    model, tok = load(args.model)
    data = get_calibration_windows("wikitext2:validation", tok, nsamples=args.nsamples, seqlen=args.seqlen,
                                   seed=0, data_dir=data_dir)
    # the same statistics (and cache entry) as bench_default_search.py
    stats = calibrate(model, data, stats=("cx", "cg", "grad"), cache_dir=args.cache_dir or None, progress=False)
    plans, secs = {}, {}
    for cd in ("float64", "float32"):
        cfg = obdk.LowRankConfig(method=args.method, compute_dtype=cd, solver=args.solver, correct="none")
        t0 = time.perf_counter()
        plans[cd] = obdk.prepare(model, cfg, data, stats=stats, progress=False)
        secs[cd] = time.perf_counter() - t0
        print(f"decomposition {cd}: {secs[cd]:.1f}s", flush=True)
    p64, p32 = plans["float64"], plans["float32"]
    env = env_fields("cpu")
    evals = EvalSets(tok, data_dir)
    rows = []
    for keep in args.keeps:
        alloc = p64.allocate(keep)
        tot64 = tot32 = 0.0
        worst = (0.0, "")
        for t in p64.targets:
            r = alloc.ranks.get(t.name)
            if r is None:
                continue
            w = model.get_submodule(t.name).weight.detach().double()
            s64 = p64.spectra[t.name]
            d = s64.damping
            cx = damp_covariance(stats.cx_for(t.name).double(), d.get("cx", 0.0))
            cg = damp_covariance(stats.cg[t.name].double(), d.get("cg", 0.0)) if args.method == "obd" else None
            losses = []
            for plan in (p64, p32):
                f = plan.spectra[t.name].truncate(int(r), keep_dense_at_break_even=False)
                losses.append(kfac_loss(w - f.b.double() @ f.a.double(), cx, cg))
            tot64 += losses[0]
            tot32 += losses[1]
            rel = (losses[1] - losses[0]) / max(losses[0], 1e-300)
            if rel > worst[0]:
                worst = (rel, t.name)
        row = {"model": args.model, "method": args.method, "solver": args.solver, "keep": keep,
               "modules_truncated": len(alloc.ranks), "kfac_loss_fp64": tot64, "kfac_loss_fp32": tot32,
               "excess_rel_fp32": (tot32 - tot64) / tot64, "worst_module_excess_rel": worst[0],
               "worst_module": worst[1], "decompose_s_fp64": round(secs["float64"], 2),
               "decompose_s_fp32": round(secs["float32"], 2),
               "speedup_fp32": round(secs["float64"] / secs["float32"], 3),
               "damping_escalations_fp32": sum(1 for s in p32.spectra.values()
                                               if any(v > p32.config.damping for v in s.damping.values())),
               "damping_escalations_fp64": sum(1 for s in p64.spectra.values()
                                               if any(v > p64.config.damping for v in s.damping.values())),
               "nsamples": args.nsamples, "seqlen": args.seqlen}
        if args.eval_windows:
            for cd, plan in plans.items():
                for res in keep_sweep(model, [keep], plan.apply):
                    ev = evals.perplexity(res.model, "wikitext2", args.seqlen, args.eval_windows)
                    row[f"ppl_{cd}"] = round(ev["ppl"], 4)
            row["eval_windows"] = args.eval_windows
        row.update(env)
        rows.append(row)
        print({k: row[k] for k in ("keep", "kfac_loss_fp64", "kfac_loss_fp32", "excess_rel_fp32",
                                   "worst_module_excess_rel", "worst_module", "speedup_fp32")
               if k in row}, {k: v for k, v in row.items() if k.startswith("ppl_")}, flush=True)
    write_csv(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
