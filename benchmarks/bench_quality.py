"""Quality table: perplexity of dense / SVD / SVD-LLM / OBD at several keeps (issue #4 item 5).

SmolLM2-135M (``--model smollm2-135m``, the GGUF alias of :func:`obdk.hub.load_model`),
calibrated on ``--nsamples`` × ``--seqlen`` tokens (32 × 512) of each ``--calib`` set
(WikiText-2 validation, and separately C4), evaluated on the first ``--windows`` (64) windows
of ``--seqlen`` tokens of each ``--eval`` set (WikiText-2 test, the local C4 validation sample).

Methods (``--methods``):

* ``dense``    — the uncompressed model (calibration-independent: ``calib=none``);
* ``svd``      — plain SVD, uniform ranks (calibration-independent: ``calib=none``);
* ``svd-llm``  — SVD-LLM whitening (C_x), uniform ranks;
* ``obd-uniform`` — OBD whitening (C_x, C_g), uniform ranks: comparable to the reference numbers;
* ``obd``      — OBD whitening, ``global`` (knapsack) allocation, no correction (``correct="none"``:
  the one-shot decomposition; ``bench_allocation.py`` measures the corrections).

One calibration per calibration set: the OBD plan is prepared once (``cx`` + ``cg``) and its
``plan.stats`` are passed to the SVD-LLM ``prepare`` (``stats=``), which then only decomposes.
Every keep is ``plan.apply(copy, keep=..., alloc=...)`` of the same plan (``benchmarks.core.sweep``). Time columns
say what is shared: ``calib_s`` is the one calibration pass of that calibration set (its
statistics in ``calib_stats``, the methods sharing it in ``calib_shared_by``; SVD-LLM alone
would need only a forward pass for ``cx``), ``decompose_s`` the plan's full decomposition
(shared by every keep of the plan, and by ``obd``/``obd-uniform``), ``apply_s`` this row's
allocation + truncation + packing, ``compress_s`` = their sum, ``eval_s`` the perplexity run.

When a calibration set is the corpus and split an evaluation reads (``c4``: the local sample's
validation split), calibration windows are drawn from the token stream *after* the evaluated
windows (``--no-holdout`` turns this off), so no calibration token is ever scored;
``calib_source`` records it.

``--full-eval``: also dense and ``obd`` at keep 0.8 (calibrated on the first ``--calib`` set)
on ALL windows of ``--full-seqlen`` (2048) tokens of each ``--full-eval-sets`` set (wikitext2).

Rows are appended to ``--out`` and flushed after every evaluation; ``--resume`` skips rows
already there (same model, calib, eval, method, keep, windows request, seqlen, nsamples, seed)
and the plans whose rows are all done.

    python -m benchmarks.bench_quality --full-eval --resume                  # the issue's table (hours on CPU)
    python -m benchmarks.bench_quality --model tiny --windows 2 --nsamples 2 --seqlen 128 --keeps 0.8 \\
        --out /tmp/q.csv                                                     # seconds: smoke test
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

import obdk

from .core.data import EvalSets, calibration_data, corpus, data_dir_of
from .core.env import RESULTS, set_threads
from .core.models import load, model_label, n_params
from .core.rows import ResultLog, read_rows
from .core.sweep import keep_sweep, plan_seconds
from .core.timing import free

DEFAULT_OUT = RESULTS / "quality_smollm2.csv"
ALL_METHODS = ("dense", "svd", "svd-llm", "obd-uniform", "obd")
#: method -> (LowRankConfig method preset, allocation passed to Plan.apply)
METHOD_PLAN = {"svd": ("svd", "uniform"), "svd-llm": ("svd-llm", "uniform"),
               "obd-uniform": ("obd", "uniform"), "obd": ("obd", "global")}

log = logging.getLogger("bench")


# =========================================================================== quality benchmark

KEY_COLS = ("model", "calib", "eval", "method", "keep", "windows_req", "seqlen", "nsamples", "seed")


def full_req(args) -> str:
    """``windows_req`` of the full-length evaluation rows: ``all`` (or ``all:N`` when capped)."""
    return "all" if args.full_windows is None else f"all:{args.full_windows}"


def _row_base(args, model_name, calib, ev, method, keep, windows_req, seqlen) -> dict:
    return {"model": model_name, "calib": calib, "eval": ev, "method": method, "keep": keep,
            "windows_req": windows_req, "seqlen": seqlen, "nsamples": args.nsamples, "seed": args.seed}


def _eval_row(log_: ResultLog, base: dict, ppl: dict, extra: dict) -> None:
    row = {**{k: base[k] for k in ("model", "calib")}, "calib_source": extra.pop("calib_source", ""),
           "eval": base["eval"], "method": base["method"], "whitening": extra.pop("whitening", ""),
           "alloc": extra.pop("alloc", ""), "keep": base["keep"], "keep_actual": extra.pop("keep_actual", 1.0),
           "ppl": ppl["ppl"], "nll": ppl["nll"], "windows": ppl["windows"], "windows_req": base["windows_req"],
           "seqlen": base["seqlen"], "tokens": ppl["tokens"], "nsamples": base["nsamples"],
           "calib_seqlen": extra.pop("calib_seqlen", ""), "seed": base["seed"],
           "predicted_loss": extra.pop("predicted_loss", ""), "calib_s": extra.pop("calib_s", 0.0),
           "calib_stats": extra.pop("calib_stats", ""), "calib_shared_by": extra.pop("calib_shared_by", ""),
           "decompose_s": extra.pop("decompose_s", 0.0), "apply_s": extra.pop("apply_s", 0.0)}
    row["compress_s"] = float(row["calib_s"] or 0) + float(row["decompose_s"] or 0) + float(row["apply_s"] or 0)
    row["eval_s"] = ppl["seconds"]
    row.update(extra)
    log_.write(row)
    print(f"  {row['calib']:>22} → {row['eval']:<10} {row['method']:<12} keep {float(row['keep']):.2f} "
          f"(actual {float(row['keep_actual']):.3f})  ppl {row['ppl']:9.3f}  "
          f"[calib {float(row['calib_s']):.0f}s, decomp {float(row['decompose_s']):.0f}s, "
          f"apply {float(row['apply_s']):.1f}s, eval {row['eval_s']:.0f}s]", flush=True)


def run(args) -> list[dict]:
    set_threads(args.threads)
    LowRankConfig = obdk.LowRankConfig

    methods = [m for m in args.methods]
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; choose from {ALL_METHODS}")
    mname = model_label(args.model)
    data_dir = data_dir_of(args.data_dir)
    out = ResultLog(args.out, KEY_COLS, args.resume)
    keeps = [float(k) for k in args.keeps]
    wreq = str(args.windows)
    full_sets = list(args.full_eval_sets) if args.full_eval else []
    FULL_KEEP = 0.8

    def todo(calib, method, keep, ev, windows_req, seqlen) -> bool:
        return not out.has(**_row_base(args, mname, calib, ev, method, keep, windows_req, seqlen))

    t_load = time.perf_counter()
    model, tok = load(args.model)
    model.eval()
    before = n_params(model)
    print(f"[model] {mname}: {before:,} params, loaded in {time.perf_counter() - t_load:.1f}s; "
          f"threads {torch.get_num_threads()}", flush=True)
    evals = EvalSets(tok, data_dir)

    def evaluate(m, calib, method, keep, extra, *, full=False):
        sets = full_sets if full else args.eval
        seqlen = args.full_seqlen if full else args.seqlen
        windows = args.full_windows if full else args.windows
        windows_req = full_req(args) if full else wreq
        for ev in sets:
            base = _row_base(args, mname, calib, ev, method, keep, windows_req, seqlen)
            if out.has(**base):
                continue
            ppl = evals.perplexity(m, ev, seqlen, windows, progress=args.progress)
            _eval_row(out, base, ppl, dict(extra))

    # ---------------------------------------------------------------- calibration-free rows
    if "dense" in methods:
        extra = {"whitening": "", "alloc": "", "keep_actual": 1.0, "calib_source": ""}
        evaluate(model, "none", "dense", 1.0, extra)
        if full_sets:
            evaluate(model, "none", "dense", 1.0, extra, full=True)
    if "svd" in methods and any(todo("none", "svd", k, ev, wreq, args.seqlen) for k in keeps for ev in args.eval):
        plan = obdk.prepare(model, LowRankConfig(method="svd"), None, progress=args.progress)
        shared = {"whitening": "svd", "alloc": "uniform", "calib_source": "", "calib_stats": "",
                  "decompose_s": plan_seconds(plan, "factorisation")}
        _apply_and_eval(plan, model, "svd", "uniform", keeps, "none", shared, evaluate, todo, args)
        del plan
        free()

    # ---------------------------------------------------------------- per calibration set
    eval_tokens = max([args.windows * args.seqlen] +
                      [(evals.stream(s).numel() if args.full_windows is None else args.full_windows * args.full_seqlen)
                       for s in full_sets if args.holdout and corpus(s, "eval") is not None
                       and any(corpus(c, "calib") == corpus(s, "eval") for c in args.calib)])
    for ci, calib in enumerate(args.calib):
        want_obd = [m for m in ("obd-uniform", "obd") if m in methods
                    and any(todo(calib, m, k, ev, wreq, args.seqlen) for k in keeps for ev in args.eval)]
        want_full = (ci == 0 and "obd" in methods and full_sets
                     and any(todo(calib, "obd", FULL_KEEP, ev, full_req(args), args.full_seqlen) for ev in full_sets))
        want_llm = "svd-llm" in methods and any(todo(calib, "svd-llm", k, ev, wreq, args.seqlen)
                                                for k in keeps for ev in args.eval)
        if not (want_obd or want_full or want_llm):
            print(f"[calib] {calib}: all rows done", flush=True)
            continue
        t0 = time.perf_counter()
        data, source = calibration_data(calib, tok, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                                        data_dir=data_dir, evals=list(args.eval) + full_sets,
                                        eval_tokens=eval_tokens, holdout=args.holdout)
        print(f"[calib] {calib}: {len(data)}×{data.input_ids.shape[1]} tokens from {source} "
              f"({time.perf_counter() - t0:.1f}s to load/tokenise, not counted)", flush=True)
        stats, calib_s, calib_stats = None, 0.0, ""
        if want_obd or want_full:
            # one-shot OBD (correct="none"): this table compares decompositions; bench_allocation.py
            # measures the corrections obd applies by default
            plan = obdk.prepare(model, LowRankConfig(method="obd", correct="none"), data, seed=args.seed,
                                progress=args.progress)
            stats, calib_s, calib_stats = plan.stats, plan_seconds(plan, "calibration"), "cx+cg"
            sharers = ",".join([m for m in ("obd-uniform", "obd") if m in methods] + (["svd-llm"] if want_llm else []))
            shared = {"whitening": "obd", "calib_source": source, "calib_stats": calib_stats, "calib_s": calib_s,
                      "calib_shared_by": sharers, "decompose_s": plan_seconds(plan, "factorisation"),
                      "calib_seqlen": args.seqlen}
            for m in want_obd:
                _apply_and_eval(plan, model, m, METHOD_PLAN[m][1], keeps, calib, shared, evaluate, todo, args)
            if want_full:
                _apply_and_eval(plan, model, "obd", "global", [FULL_KEEP], calib, shared, evaluate, todo,
                                args, full=True)
            del plan
            free()
        if want_llm:
            plan = obdk.prepare(model, LowRankConfig(method="svd-llm"), data, stats=stats, seed=args.seed,
                                progress=args.progress)
            if stats is None:
                calib_s, calib_stats, sharers = plan_seconds(plan, "calibration"), "cx", "svd-llm"
            shared = {"whitening": "svd-llm", "calib_source": source, "calib_stats": calib_stats, "calib_s": calib_s,
                      "calib_shared_by": sharers, "decompose_s": plan_seconds(plan, "factorisation"),
                      "calib_seqlen": args.seqlen}
            _apply_and_eval(plan, model, "svd-llm", "uniform", keeps, calib, shared, evaluate, todo, args)
            del plan
        del stats, data
        free()
    return out.rows


def _apply_and_eval(plan, model, method, alloc, keeps, calib, shared, evaluate, todo, args, full=False):
    """The keep sweep of one plan at one allocation: each keep not yet done is applied to a copy and evaluated."""
    seqlen = args.full_seqlen if full else args.seqlen
    sets = list(args.full_eval_sets) if full else list(args.eval)
    wr = full_req(args) if full else str(args.windows)
    points = [{"keep": k, "alloc": alloc} for k in keeps]
    skip = lambda p: not any(todo(calib, method, p["keep"], ev, wr, seqlen) for ev in sets)  # noqa: E731
    for res in keep_sweep(model, points, plan.apply, skip=skip):
        rep = res.report
        extra = {**shared, "alloc": alloc, "keep_actual": rep.keep_actual, "predicted_loss": rep.predicted_loss,
                 "apply_s": res.seconds, "model_params_after": rep.model_params_after}
        evaluate(res.model, calib, method, res.point["keep"], extra, full=full)


def markdown_table(rows: list[dict], model: str) -> str:
    """``method × keep → ppl`` per (calib, eval) of the first-N-windows rows, best (lowest) per column in bold."""
    allrows = rows
    rows = [r for r in rows if r.get("model") == model and not str(r.get("windows_req", "")).startswith("all")]
    out = []
    for ev in dict.fromkeys(r["eval"] for r in rows):
        for calib in dict.fromkeys(r["calib"] for r in rows if r["calib"] != "none"):
            sel = [r for r in rows if r["eval"] == ev and r["calib"] in (calib, "none")]
            keeps = sorted({float(r["keep"]) for r in sel if r["method"] != "dense"}, reverse=True)
            meths = [m for m in ALL_METHODS if any(r["method"] == m for r in sel)]
            cell = {(r["method"], float(r["keep"])): float(r["ppl"]) for r in sel}
            best = {k: min((cell[(m, k)] for m in meths if (m, k) in cell and m != "dense"), default=None) for k in keeps}
            out.append(f"\nCalibration {calib}, evaluation {ev} (perplexity):\n")
            out.append("| method | " + " | ".join(f"keep {k:g}" for k in keeps) + " |")
            out.append("|---|" + "---:|" * len(keeps))
            for m in meths:
                if m == "dense":
                    d = cell.get(("dense", 1.0))
                    out.append("| dense | " + " | ".join(f"{d:.2f}" if d else "" for _ in keeps) + " |")
                    continue
                cs = []
                for k in keeps:
                    v = cell.get((m, k))
                    cs.append("" if v is None else (f"**{v:.2f}**" if v == best[k] else f"{v:.2f}"))
                out.append(f"| {m} | " + " | ".join(cs) + " |")
    full = [r for r in allrows if r.get("model") == model and str(r.get("windows_req", "")).startswith("all")]
    if full:
        out.append("\nFull-length evaluation (all windows):\n")
        out.append("| eval | method | calib | keep | seqlen | windows | ppl |")
        out.append("|---|---|---|---:|---:|---:|---:|")
        for r in full:
            out.append(f"| {r['eval']} | {r['method']} | {r['calib']} | {float(r['keep']):g} | {r['seqlen']} | "
                       f"{r['windows']} | {float(r['ppl']):.2f} |")
    return "\n".join(out)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), tiny, or any obdk.hub spec")
    ap.add_argument("--calib", nargs="+", default=["wikitext2:validation", "c4"], help="calibration sets")
    ap.add_argument("--eval", nargs="+", default=["wikitext2", "c4"], help="evaluation sets (default splits)")
    ap.add_argument("--methods", nargs="+", default=list(ALL_METHODS), help=f"subset of {ALL_METHODS}")
    ap.add_argument("--keeps", nargs="+", type=float, default=[0.9, 0.8, 0.6])
    ap.add_argument("--windows", type=int, default=64, help="first N evaluation windows of --seqlen tokens")
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    ap.add_argument("--seqlen", type=int, default=512, help="tokens per calibration and evaluation window")
    ap.add_argument("--seed", type=int, default=0, help="calibration window sampling seed")
    ap.add_argument("--full-eval", action="store_true",
                    help="also dense and obd@0.8 (first --calib set) on all windows of --full-seqlen tokens")
    ap.add_argument("--full-seqlen", type=int, default=2048)
    ap.add_argument("--full-windows", type=int, default=None, help="cap the full evaluation (default: all windows)")
    ap.add_argument("--full-eval-sets", nargs="+", default=["wikitext2"])
    ap.add_argument("--no-holdout", dest="holdout", action="store_false",
                    help="let calibration windows of an evaluated corpus/split overlap the evaluated tokens")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--resume", action="store_true", help="skip rows already in --out")
    ap.add_argument("--data-dir", default=None, help="default $OBDK_DATA_DIR, else ../shared/data")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--progress", action="store_true", help="tqdm bars for calibration/decomposition/eval")
    ap.add_argument("--table-only", action="store_true", help="print the markdown table from --out and exit")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.table_only:
        t0 = time.perf_counter()
        run(args)
        print(f"[done] {time.perf_counter() - t0:.0f}s; rows in {args.out}", flush=True)
    print(markdown_table(read_rows(args.out), model_label(args.model)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
