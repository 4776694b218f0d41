"""Zero-shot accuracy of SmolLM2-135M, dense and compressed, through lm-evaluation-harness (issue #18).

Models (``--methods``), each at ``--keeps`` (0.8 and 0.6):

* ``dense``       — the uncompressed model (one row set, ``keep=1``);
* ``svd-llm``     — SVD-LLM whitening (C_x), uniform ranks, no correction;
* ``obd-uniform`` — OBD whitening (C_x, C_g), uniform ranks, no correction
  (``alloc="uniform", correct="none"``);
* ``obd``         — obdk's default (``method="obd"``: global allocation and the ZS + K-FAC
  correction steps).

One calibration (``--nsamples`` × ``--seqlen`` = 32 × 512 tokens of WikiText-2 validation):
the OBD plan is prepared once (``cx`` + ``cg``) and serves every keep and both OBD variants
(``plan.apply(copy, keep=k, **overrides)``); its statistics are handed to the SVD-LLM plan
(``stats=``), which then only decomposes.

Tasks (``--tasks``): arc_easy, arc_challenge, piqa, hellaswag, winogrande, scored by
:func:`obdk.zeroshot.zeroshot` (the harness's own task definitions on the local validation splits
under ``$OBDK_DATA_DIR/zeroshot``; ARC is scored on *validation*, not the harness's default test).
``--limit N`` scores the first N documents of every task, ``--hellaswag-limit`` (2000) caps
HellaSwag (10,042 documents) separately. Each model also gets its WikiText-2 test perplexity on
the first ``--ppl-windows`` (16) windows of 512 tokens, to compare the two rankings.

One CSV row per (method, keep, task), plus ``task=average`` (the unweighted mean over the tasks
of ``acc``, and of ``acc_norm`` with winogrande's ``acc`` in its place, the papers' convention),
flushed as each evaluation ends; ``--resume`` skips rows already in ``--out``. Columns: acc,
acc_stderr, acc_norm, acc_norm_stderr, n, split, chance, eval_s (this task's wall time), ppl,
keep_actual, apply_s, and the provenance of ``benchmarks.core.env``. ``--plot`` draws
``zeroshot_smollm2.png`` (acc_norm per task and the average, one bar per model, chance dashed).

    python -m benchmarks.bench_zeroshot --resume --plot                              # the table (CPU: ~1 h)
    python -m benchmarks.bench_zeroshot --model tiny --limit 3 --nsamples 2 --seqlen 64 --keeps 0.6 \\
        --ppl-windows 1 --out /tmp/zs.csv                                            # seconds: smoke test
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

import obdk
from obdk.config import LowRankConfig
from obdk.zeroshot import CHANCE, LOCAL_TASKS, mean_accuracy, zeroshot

from .core.data import calibration_data, data_dir_of
from .core.env import RESULTS
from .core.models import load, model_label
from .core.rows import ResultLog, read_rows
from .core.sweep import keep_sweep

DEFAULT_OUT = RESULTS / "zeroshot_smollm2.csv"
KEY_COLS = ("model", "method", "keep", "task", "limit_req", "nsamples", "seqlen", "seed")
METHODS = ("dense", "svd-llm", "obd-uniform", "obd")
#: Plan.apply overrides of each compressed method (svd-llm has its own plan)
OVERRIDES = {"svd-llm": {}, "obd-uniform": {"alloc": "uniform", "correct": "none"}, "obd": {}}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--keeps", nargs="+", type=float, default=[0.8, 0.6])
    ap.add_argument("--tasks", default=",".join(LOCAL_TASKS))
    ap.add_argument("--limit", type=int, default=None, help="first N documents of every task (default all)")
    ap.add_argument("--hellaswag-limit", type=int, default=2000, help="first N HellaSwag documents (0: all)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--calib", default="wikitext2:validation")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ppl-windows", type=int, default=16, help="WikiText-2 test windows of 512 tokens (0: none)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--plot", action="store_true", help="draw <out>.png from the CSV (all rows of --model)")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    return ap.parse_args(argv)


def task_limit(task: str, args) -> int | None:
    lims = [x for x in (args.limit, args.hellaswag_limit if task == "hellaswag" else None) if x]
    return min(lims) if lims else None


def limit_req(args) -> str:
    """The limits asked, as one key cell: ``all``, ``200``, ``hellaswag=2000``, ``200,hellaswag=2000``."""
    parts = [str(args.limit)] if args.limit else []
    if args.hellaswag_limit and (not args.limit or args.hellaswag_limit < args.limit):
        parts.append(f"hellaswag={args.hellaswag_limit}")
    return ",".join(parts) or "all"


def evaluate(model, tok, method: str, keep: float, extra: dict, out: ResultLog, args, tasks: list[str]) -> list:
    """Perplexity, then each task (its own limit), one row each, then the average row."""
    label = model_label(args.model)
    base = {"model": label, "method": method, "keep": keep, "limit_req": limit_req(args),
            "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed, **extra}
    if all(out.has(**base, task=t) for t in tasks + ["average"]):
        print(f"[skip] {method} keep={keep:g}: all rows done", flush=True)
        return []
    ppl = None
    if args.ppl_windows:
        from obdk.eval import perplexity
        res = perplexity(model, tok, "wikitext2", seqlen=512, windows=args.ppl_windows, data_dir=args.data_dir,
                         progress=args.progress)
        ppl = res["ppl"]
        print(f"[ppl] {method} keep={keep:g}: wikitext2 {ppl:.2f} ({args.ppl_windows}×512, {res['seconds']:.0f}s)",
              flush=True)
    results = {}
    for t in tasks:
        r = zeroshot(model, tok, [t], limit=task_limit(t, args), batch_size=args.batch_size, data_dir=args.data_dir,
                     progress=args.progress)[t]
        results[t] = r
        out.write({**base, "task": t, "acc": r["acc"], "acc_stderr": r["acc_stderr"], "acc_norm": r["acc_norm"],
                         "acc_norm_stderr": r["acc_norm_stderr"], "n": r["n"], "available": r["available"],
                         "split": r["split"], "chance": CHANCE.get(t), "eval_s": round(r["seconds"], 2), "ppl": ppl,
                         "ppl_windows": args.ppl_windows})
        norm = "" if r["acc_norm"] is None else f" acc_norm {r['acc_norm']:.4f}"
        print(f"[eval] {method} keep={keep:g} {t}: acc {r['acc']:.4f}{norm} (n={r['n']}, {r['seconds']:.0f}s)",
              flush=True)
    # the mean's stderr: the tasks are independent samples, so sqrt(sum se^2) / k
    def se(key):
        ses = [r.get(key) if r.get(key) is not None else r.get("acc_stderr") for r in results.values()]
        return (sum(s * s for s in ses) ** 0.5) / len(ses) if all(s is not None for s in ses) else None
    out.write({**base, "task": "average", "acc": mean_accuracy(results, "acc"), "acc_stderr": se("acc_stderr"),
               "acc_norm": mean_accuracy(results, "acc_norm"), "acc_norm_stderr": se("acc_norm_stderr"),
               "n": sum(r["n"] for r in results.values()), "split": "validation",
               "chance": sum(CHANCE.get(t, 0) for t in results) / len(results),
               "eval_s": round(sum(r["seconds"] for r in results.values()), 2), "ppl": ppl,
               "ppl_windows": args.ppl_windows})
    return list(results)


def run(args) -> list[dict]:
    logging.basicConfig(level=logging.WARNING)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    out = ResultLog(args.out, KEY_COLS, args.resume)
    data_dir = data_dir_of(args.data_dir)
    args.data_dir = data_dir
    t0 = time.perf_counter()
    model, tok = load(args.model)
    print(f"[load] {args.model} in {time.perf_counter() - t0:.1f}s", flush=True)
    if "dense" in args.methods:
        evaluate(model, tok, "dense", 1.0, {"keep_actual": 1.0}, out, args, tasks)
    comp = [m for m in args.methods if m != "dense"]
    if not comp:
        return out.rows
    data, source = calibration_data(args.calib, tok, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                                    data_dir=data_dir)
    plans = {}
    t0 = time.perf_counter()
    if any(m.startswith("obd") for m in comp):
        plans["obd"] = obdk.prepare(model, LowRankConfig(method="obd"), data, tokenizer=tok, seed=args.seed,
                                    progress=args.progress)
    if "svd-llm" in comp:
        stats = plans["obd"].stats if "obd" in plans else None
        plans["svd-llm"] = obdk.prepare(model, LowRankConfig(method="svd-llm"), data, tokenizer=tok, stats=stats,
                                        seed=args.seed, progress=args.progress)
    print(f"[prepare] {', '.join(plans)} from {source} in {time.perf_counter() - t0:.0f}s", flush=True)
    for method in comp:
        plan = plans["svd-llm" if method == "svd-llm" else "obd"]
        points = [{"keep": k, **OVERRIDES[method]} for k in args.keeps]
        skip = lambda p, method=method: all(out.has(model=model_label(args.model), method=method, keep=p["keep"],  # noqa: E731
                                                    task=t, limit_req=limit_req(args), nsamples=args.nsamples,
                                                    seqlen=args.seqlen, seed=args.seed)
                                            for t in tasks + ["average"])
        for res in keep_sweep(model, points, plan.apply, skip=skip):
            rep = res.report
            print(f"[apply] {method} keep={res.point['keep']:g}: kept {rep.keep_actual:.4f} in {res.seconds:.0f}s",
                  flush=True)
            evaluate(res.model, tok, method, res.point["keep"],
                     {"keep_actual": round(rep.keep_actual, 4), "apply_s": round(res.seconds, 1),
                      "calib_source": source}, out, args, tasks)
    return out.rows


# --------------------------------------------------------------------------- table and plot


def _f(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def markdown_table(rows: list[dict], model: str) -> str:
    """Model × task → acc_norm (acc for winogrande) ± stderr in percent, the average, ppl, eval time."""
    rows = [r for r in rows if r.get("model") == model]
    tasks = [t for t in dict.fromkeys(r["task"] for r in rows) if t != "average"]
    models = list(dict.fromkeys((r["method"], _f(r["keep"])) for r in rows))
    n = {t: next((r["n"] for r in rows if r["task"] == t), "") for t in tasks}
    head = ["model"] + [f"{t} (n={n[t]})" for t in tasks] + ["average", "wikitext2 ppl", "eval time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, keep in models:
        sel = {r["task"]: r for r in rows if r["method"] == method and _f(r["keep"]) == keep}
        cells = [method if method == "dense" else f"{method} {keep:g}"]
        for t in tasks + ["average"]:
            r = sel.get(t, {})
            v = _f(r.get("acc_norm")) if _f(r.get("acc_norm")) is not None else _f(r.get("acc"))
            s = _f(r.get("acc_norm_stderr")) if _f(r.get("acc_norm")) is not None else _f(r.get("acc_stderr"))
            cells.append("–" if v is None else f"{100 * v:.1f} ± {100 * s:.1f}" if s is not None else f"{100 * v:.1f}")
        avg = sel.get("average", {})
        cells.append(f"{_f(avg.get('ppl')):.2f}" if _f(avg.get("ppl")) is not None else "–")
        cells.append(f"{_f(avg.get('eval_s')):.0f} s" if _f(avg.get("eval_s")) is not None else "–")
        lines.append("| " + " | ".join(cells) + " |")
    chance = ["chance"] + [f"{100 * CHANCE[t]:.0f}" if t in CHANCE else "–" for t in tasks]
    chance.append(f"{100 * sum(CHANCE.get(t, 0) for t in tasks) / max(1, len(tasks)):.1f}")
    lines.append("| " + " | ".join(chance + ["", ""]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], model: str, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if r.get("model") == model]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    models = list(dict.fromkeys((r["method"], _f(r["keep"])) for r in rows))
    fig, ax = plt.subplots(figsize=(11, 4.2))
    width = 0.8 / max(1, len(models))
    for i, (method, keep) in enumerate(models):
        sel = {r["task"]: r for r in rows if r["method"] == method and _f(r["keep"]) == keep}
        vals, errs = [], []
        for t in tasks:
            r = sel.get(t, {})
            norm = _f(r.get("acc_norm"))
            vals.append(100 * (norm if norm is not None else (_f(r.get("acc")) or 0)))
            e = _f(r.get("acc_norm_stderr")) if norm is not None else _f(r.get("acc_stderr"))
            errs.append(100 * (e or 0))
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(tasks))]
        ax.bar(xs, vals, width, yerr=errs, capsize=2, label=method if method == "dense" else f"{method} {keep:g}")
    for j, t in enumerate(tasks):
        c = CHANCE.get(t) if t != "average" else sum(CHANCE.get(x, 0) for x in tasks if x != "average") / max(
            1, len(tasks) - 1)
        if c:
            ax.hlines(100 * c, j - 0.45, j + 0.45, colors="k", linestyles="dashed", linewidth=1)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks)
    ax.set_ylabel("acc_norm % (winogrande: acc)")
    ax.set_title(f"{model}: zero-shot accuracy (lm-evaluation-harness, validation splits; dashed: chance)")
    ax.legend(ncol=4, fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    run(args)
    rows = read_rows(args.out)
    label = model_label(args.model)
    print(markdown_table(rows, label))
    if args.plot:
        from pathlib import Path
        plot(rows, label, Path(args.out).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
