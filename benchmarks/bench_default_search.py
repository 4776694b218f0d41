"""Which allocation settings should ``obdk compress --method obd`` default to? Measured.

One calibration (C_x, C_g and the summed weight gradient, 32 × 512 tokens of WikiText-2
validation, cached on disk under ``--cache-dir``) and one OBD decomposition of SmolLM2-135M;
then, for each candidate (allocation × floor × rank multiple × correction) and keep,
``plan.apply(copy, keep=..., alloc=..., floor=..., rank_multiple=..., correct=...)`` and
WikiText-2 test perplexity on the first ``--windows`` windows of 512. Rows are appended to the
CSV as they are measured (``--resume`` skips the (candidate, keep) pairs already there).

    python -m benchmarks.bench_default_search --keeps 0.8 0.6 --windows 64
    python -m benchmarks.bench_default_search --model tiny --nsamples 2 --seqlen 64 --windows 2 --keeps 0.8 \\
        --candidates global-f0.2-m8 zero-sum --cache-dir '' --out /tmp/ds.csv      # seconds: smoke test
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import obdk

from .core.data import EvalSets, data_dir_of
from .core.env import RESULTS
from .core.models import load
from .core.rows import ResultLog
from .core.sweep import keep_sweep

CANDIDATES = {
    # name: (alloc, floor, rank_multiple[, correct])
    "global-f0.2-m8-seq": ("global", 0.2, 8, "seq"),
    "global-f0.2-m8-zs": ("global", 0.2, 8, "zs"),
    "uniform-m8-seq": ("uniform", 0.5, 8, "seq"),
    "global-f0.5-m8": ("global", 0.5, 8),
    "global-f0.5-m1": ("global", 0.5, 1),
    "global-f0.3-m8": ("global", 0.3, 8),
    "global-f0.7-m8": ("global", 0.7, 8),
    "global-f0.2-m8": ("global", 0.2, 8),
    "global-f0.1-m8": ("global", 0.1, 8),
    "global-f0.0-m8": ("global", 0.0, 8),
    "zero-sum": ("zero-sum", 0.5, 1),
    "uniform-m8": ("uniform", 0.5, 8),
}
KEY_COLS = ("candidate", "keep")


def overrides(name: str) -> dict:
    """The ``Plan.apply`` overrides of candidate ``name`` (no correction unless it names one)."""
    alloc, floor, mult, *rest = CANDIDATES[name]
    return {"alloc": alloc, "floor": floor, "rank_multiple": mult, "correct": rest[0] if rest else "none"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), tiny, or any obdk.hub spec")
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.6])
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--cache-dir", default=os.environ.get("OBDK_CACHE_DIR", "/tmp/obdk-stats-cache"),
                    help="statistics cache ('' to disable)")
    ap.add_argument("--data-dir", default=None, help="default $OBDK_DATA_DIR, else ../shared/data")
    ap.add_argument("--out", default=str(RESULTS / "default_search_smollm2.csv"))
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)

    from obdk.calibrate.data import get_calibration_windows
    from obdk.calibrate.stats import calibrate

    data_dir = data_dir_of(args.data_dir)
    out = ResultLog(args.out, KEY_COLS, args.resume, device="cpu")
    model, tok = load(args.model)
    data = get_calibration_windows("wikitext2:validation", tok, nsamples=args.nsamples, seqlen=args.seqlen,
                                   seed=0, data_dir=data_dir)
    t0 = time.perf_counter()
    stats = calibrate(model, data, stats=("cx", "cg", "grad"), cache_dir=args.cache_dir or None, progress=True)
    calib_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    # the candidates choose their own allocation and correction; the plan keeps the windows for the corrections
    plan = obdk.prepare(model, obdk.LowRankConfig(method="obd"), data, stats=stats, progress=True)
    decomp_s = time.perf_counter() - t0
    print(f"calibration {calib_s:.0f}s (cache: {args.cache_dir}), decomposition {decomp_s:.0f}s", flush=True)
    evals = EvalSets(tok, data_dir)
    for name in args.candidates:
        ov = overrides(name)
        points = [{"keep": keep, **ov} for keep in args.keeps]
        for res in keep_sweep(model, points, plan.apply, skip=lambda p: out.has(candidate=name, keep=p["keep"])):
            rep, keep = res.report, res.point["keep"]
            ev = evals.perplexity(res.model, "wikitext2", args.seqlen, args.windows)
            out.write({"model": args.model, "whitening": "obd", "candidate": name, "alloc": ov["alloc"],
                       "floor": ov["floor"], "rank_multiple": ov["rank_multiple"],
                       "correct": "" if ov["correct"] == "none" else ov["correct"], "keep": keep,
                       "keep_actual": round(rep.keep_actual, 5), "ppl": round(ev["ppl"], 4),
                       "nll": round(ev["nll"], 5), "windows": ev["windows"], "seqlen": args.seqlen,
                       "predicted_loss": round(rep.predicted_loss, 5),
                       "dense_modules": sum(x.rank is None for x in rep.modules), "calib_s": round(calib_s, 1),
                       "decompose_s": round(decomp_s, 1), "apply_s": round(res.seconds, 2),
                       "eval_s": round(ev["seconds"], 1), "nsamples": args.nsamples})
            print(f"{name:16s} keep {keep:.2f} (actual {rep.keep_actual:.3f})  ppl {ev['ppl']:8.3f}  "
                  f"predicted {rep.predicted_loss:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
