"""Which allocation settings should ``obdk compress --method obd`` default to? Measured.

One calibration (C_x, C_g and the summed weight gradient, 32 × 512 tokens of WikiText-2
validation, cached on disk) and one OBD decomposition of SmolLM2-135M; then, for each
candidate (allocation × floor × rank multiple × correction) and keep, ``Plan.apply`` on a fresh copy
and WikiText-2 test perplexity on the first ``--windows`` windows of 512. Rows are
appended to the CSV as they are measured (``--resume`` skips those already there).

    python benchmarks/bench_default_search.py --keeps 0.8 0.6 --windows 64
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from _common import env_fields, write_csv  # noqa: E402

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.6])
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES))
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--cache-dir", default=os.environ.get("OBDK_CACHE_DIR", "/tmp/obdk-stats-cache"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="benchmarks/results/default_search_smollm2.csv")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)

    import obdk
    from obdk.calibrate.data import get_calibration_windows
    from obdk.calibrate.stats import calibrate
    from obdk.eval import perplexity
    from obdk.hub import load_model
    from obdk.pipeline import _prepare_gradient_scores, prepare

    done = set()
    if args.resume and Path(args.out).exists():
        with open(args.out) as f:
            done = {(r["candidate"], float(r["keep"])) for r in csv.DictReader(f)}
    model, tok = load_model(args.model)
    data = get_calibration_windows("wikitext2:validation", tok, nsamples=args.nsamples, seqlen=args.seqlen,
                                   seed=0, data_dir=args.data_dir)
    t0 = time.perf_counter()
    stats = calibrate(model, data, stats=("cx", "cg", "grad"), cache_dir=args.cache_dir, progress=True)
    calib_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    base_cfg = obdk.LowRankConfig(method="obd")
    plan = prepare(model, base_cfg, data, stats=stats, progress=True)
    plan.extra["data"] = data  # the calibration windows, for the corrections (zs, seq)
    decomp_s = time.perf_counter() - t0
    print(f"calibration {calib_s:.0f}s (cache: {args.cache_dir}), decomposition {decomp_s:.0f}s", flush=True)
    env = env_fields("cpu")
    for name in args.candidates:
        alloc, floor, mult, *rest = CANDIDATES[name]
        correct = rest[0] if rest else "none"
        plan.config = dataclasses.replace(base_cfg, alloc=alloc, floor=floor, rank_multiple=mult, correct=correct)
        if alloc == "zero-sum" and "deltas" not in plan.extra:
            _prepare_gradient_scores(plan, model, data, progress=False)
        for keep in args.keeps:
            if (name, keep) in done:
                continue
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            rep = plan.apply(m, keep=keep)
            apply_s = time.perf_counter() - t0
            with torch.inference_mode():
                ev = perplexity(m, tok, "wikitext2", seqlen=args.seqlen, windows=args.windows,
                                data_dir=args.data_dir, progress=False)
            row = {"model": args.model, "whitening": "obd", "candidate": name, "alloc": alloc, "floor": floor,
                   "rank_multiple": mult, "correct": "" if correct == "none" else correct, "keep": keep, "keep_actual": round(rep.keep_actual, 5),
                   "ppl": round(ev["ppl"], 4), "nll": round(ev["nll"], 5), "windows": ev["windows"],
                   "seqlen": args.seqlen, "predicted_loss": round(rep.predicted_loss, 5),
                   "dense_modules": sum(x.rank is None for x in rep.modules), "calib_s": round(calib_s, 1),
                   "decompose_s": round(decomp_s, 1), "apply_s": round(apply_s, 2), "eval_s": round(ev["seconds"], 1),
                   "nsamples": args.nsamples, **env}
            write_csv([row], args.out)
            print(f"{name:16s} keep {keep:.2f} (actual {rep.keep_actual:.3f})  ppl {ev['ppl']:8.3f}  "
                  f"predicted {rep.predicted_loss:.3f}", flush=True)
            del m
    return 0


if __name__ == "__main__":
    sys.exit(main())
