"""The loss along ZS-SVD's one-step correction: why it helps at keep 0.8 and overshoots at 0.6.

Issue #20 item 3. ZS-SVD's step (``correct="zs"``) moves each truncation ``W_r`` to ``W_r + c·G``
(``G = ∂L/∂W`` at the truncated model on the calibration windows, ``c = ⟨G, W − W_r⟩/⟨G, G⟩``)
and re-truncates to the same rank. Here the step is taken at the sizes ``--ts`` (``W_r + t·c·G``,
each re-truncated; ``t = 1`` is exactly the ``zs`` row of the allocation grid, ``t = 0`` no
correction), from one gradient on all ``--nsamples`` calibration windows, and at each ``t`` we measure:

* ``loss_fit``: the mean next-token loss on the gradient's own calibration windows (in sample:
  a rise there is the step overshooting, not over-fitting to its windows);
* ``loss_heldout``: the same on ``--holdout-windows`` windows of the calibration source drawn with
  ``--holdout-seed`` (never an evaluation split; windows at random offsets may share tokens with
  the calibration ones);
* ``ppl_<eval>``: perplexity on the first ``--windows`` windows of each ``--eval`` set (diagnosis only:
  ``correct="zs-guarded"`` chooses ``t`` on held-out calibration windows, never on these).

Statistics come from ``--cache-dir`` (the allocation benchmark's, same calibration) when there.

    python -m benchmarks.bench_zs_step --cache-dir /work/cache/alloc --threads 2 --resume
    python -m benchmarks.bench_zs_step --model tiny --nsamples 4 --seqlen 64 --windows 2 --holdout-windows 2 \\
        --out /tmp/z.csv                                                     # seconds: smoke test
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

import obdk

from .core.data import EvalSets, calibration_data, data_dir_of
from .core.env import RESULTS, set_threads
from .core.models import load, model_label
from .core.rows import ResultLog

DEFAULT_OUT = RESULTS / "zs_step_smollm2.csv"
KEY_COLS = ("model", "calib", "nsamples", "seqlen", "seed", "holdout_seed", "holdout_windows", "whitening", "alloc",
            "keep", "t", "windows_req")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="wikitext2:validation")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--holdout-seed", type=int, default=1, help="seed of the held-out calibration windows")
    ap.add_argument("--holdout-windows", type=int, default=8)
    ap.add_argument("--whitening", default="svd-llm", choices=["svd-llm", "obd"])
    ap.add_argument("--alloc", default="zero-sum", choices=["uniform", "global", "zero-sum"])
    ap.add_argument("--keeps", nargs="+", type=float, default=[0.6, 0.8])
    ap.add_argument("--ts", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--eval", nargs="*", default=["wikitext2", "c4"], help="evaluation sets (none: calibration losses only)")
    ap.add_argument("--windows", type=int, default=64, help="first N evaluation windows of --seqlen tokens")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--resume", action="store_true", help="skip (keep, t) rows already in --out")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    set_threads(args.threads)
    from obdk.calibrate.stats import calibrate
    from obdk.correct.guarded import heldout_loss
    from obdk.correct.steps import gradient_correct

    mname = model_label(args.model)
    data_dir = data_dir_of(args.data_dir)
    out = ResultLog(args.out, KEY_COLS, args.resume)
    ts = sorted(set(args.ts) | {0.0})
    model, tok = load(args.model)
    kw = dict(data_dir=data_dir, evals=list(args.eval), eval_tokens=args.windows * args.seqlen)
    data, source = calibration_data(args.calib, tok, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, **kw)
    held, _ = calibration_data(args.calib, tok, nsamples=args.holdout_windows, seqlen=args.seqlen,
                               seed=args.holdout_seed, **kw)
    same = sum(bool((held.input_ids[i] == data.input_ids).all(1).any()) for i in range(len(held)))
    evals = EvalSets(tok, data_dir)

    def key(keep, t) -> dict:
        return {"model": mname, "calib": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen,
                "seed": args.seed, "holdout_seed": args.holdout_seed, "holdout_windows": args.holdout_windows,
                "whitening": args.whitening, "alloc": args.alloc, "keep": keep, "t": t, "windows_req": args.windows}

    keeps = [k for k in args.keeps if not all(out.has(**key(k, t)) for t in ts)]
    if not keeps:
        print("[done] every row is in", args.out)
        return 0
    t0 = time.perf_counter()
    stats = calibrate(model, data, stats=("cx", "cg", "grad"), seed=args.seed, progress=args.progress,
                      cache_dir=args.cache_dir)
    plan = obdk.prepare(model, obdk.LowRankConfig(method=args.whitening, alloc=args.alloc, correct="none"), data,
                        stats=stats, seed=args.seed, progress=args.progress)
    print(f"[plan] {args.whitening}: statistics + decomposition {time.perf_counter() - t0:.0f}s; held-out windows "
          f"{len(held)} (seed {args.holdout_seed}; {same} equal to a calibration window)", flush=True)
    for keep in keeps:
        cfg = plan.resolve(keep, alloc=args.alloc, correct="zs")
        alloc = plan.allocate(model=model, config=cfg)
        factors = {n: plan.factors(n, r) for n, r in alloc.ranks.items() if r is not None}
        t1 = time.perf_counter()
        per_t, _ = gradient_correct(model, factors, "zs", data=plan.data, stats=plan.stats, spectra=plan.spectra,
                                    config=cfg, progress=args.progress, scales=ts)
        step_s = time.perf_counter() - t1
        print(f"[step] keep {keep}: gradient + {len(ts) - 1} re-truncations in {step_s:.0f}s", flush=True)
        for j, t in enumerate(ts):
            if out.has(**key(keep, t)):
                continue
            m = copy.deepcopy(model)
            with torch.no_grad():
                for n in factors:
                    a, b, _ = per_t[n][j]
                    w = m.get_submodule(n).weight
                    w.copy_((b.double() @ a.double()).to(w.dtype))
            t2 = time.perf_counter()
            row = {**key(keep, t), "calib_source": source,
                   "loss_fit": heldout_loss(m, plan.data.input_ids, plan.data.attention_mask),
                   "loss_heldout": heldout_loss(m, held.input_ids, held.attention_mask),
                   "heldout_equal_windows": same, "step_s": step_s}
            for ev in args.eval:
                ppl = evals.perplexity(m, ev, args.seqlen, args.windows, progress=args.progress)
                row[f"ppl_{ev}"], row[f"nll_{ev}"] = ppl["ppl"], ppl["nll"]
            row["measure_s"] = time.perf_counter() - t2
            out.write(row)
            print(f"  keep {keep:.2f} t {t:<5g} loss fit {row['loss_fit']:.4f} held-out {row['loss_heldout']:.4f}  "
                  + "  ".join(f"{ev} {row[f'ppl_{ev}']:.2f}" for ev in args.eval), flush=True)
            del m
    return 0


if __name__ == "__main__":
    sys.exit(main())
