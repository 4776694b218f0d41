"""Rank allocation grid: {svd-llm, obd} whitening × {uniform, global, zero-sum, bsi} (± a correction).

Issue #5 item 2. SmolLM2-135M at ``--keeps`` (0.8, 0.6), calibrated on ``--nsamples`` ×
``--seqlen`` tokens (32 × 512) of each ``--calib`` set, perplexity on the first ``--windows``
(64) windows of each ``--eval`` set (calibrating on one and evaluating on the other gives the
crossed cells), plus the compression time of every combination.

Sharing (one calibration per calibration set): the statistics ``cx``, ``cg``, ``grad`` are
collected ONCE per calibration set (one forward + backward pass over the windows) and passed
with ``stats=`` to one ``prepare`` per whitening (decomposition only). Every row is
``plan.apply(copy, keep=..., alloc=..., correct=...)`` of that plan; the plan computes the
scores an allocation needs the first time a row asks for them and keeps them for the other keeps:

* ``zero-sum`` deltas come from ``stats.grad`` (no extra pass);
* ``bsi`` scores, one set per ``--bsi-curvatures`` estimator (shared by the keeps and the
  ``--bsi-orders``): ``hutchinson`` costs 2·``--bsi-probes`` forward+backward passes (the
  gradient comes from ``stats.grad``), ``blocked`` that per matrix, ``kfac`` none (``C_x``,
  ``C_g``), ``fisher`` one. They are scored on the first ``--bsi-windows`` windows; when that is
  fewer than the calibration's, the ``bsi`` rows run on a second plan of that whitening prepared
  on those windows (same statistics, so the same spectra; its decomposition is that row's
  ``decompose_s``), and a correction of a ``bsi`` row also runs on those windows;
* ``+zs`` / ``+kfac`` (``correct``: ZS-SVD's Euclidean step or the K-FAC natural-gradient
  step) costs one more forward+backward pass over the plan's calibration windows per
  (combination, keep), inside ``Plan.apply``; ``+zs-guarded`` (ZS-SVD's step with its size
  chosen on the last 8 calibration windows, which its gradient does not use) that pass plus a
  re-truncation and a forward over the 8 windows per step size; its row records the chosen
  ``guard_t`` and the held-out loss at each size (``guard_losses``).

Columns: ``calib_s`` (the shared calibration of cx+cg+grad), ``decompose_s`` (the whitening's
plan, shared by its allocations and keeps), ``scores_s`` (zero-sum deltas or BSI scores, shared
by the keeps), ``apply_s`` (allocation + truncation + correction + packing of this row; the
correction alone in ``correct_s``), ``compress_s`` = the sum, ``eval_s``.

Grids (``--grid``; any of ``--calib/--eval/--keeps/--whitenings/--allocs/--correct`` overrides):

* ``quick`` (default): calibration ``wikitext2:validation``; eval ``wikitext2`` and ``c4``;
  keep {0.8, 0.6} × whitening {svd-llm, obd} × alloc {uniform, global, zero-sum, bsi}, plus the
  corrections zs, kfac and zs+kfac for ``obd:global`` only;
* ``full``: calibration ``wikitext2:validation`` and ``c4`` (each evaluated on both: crossed),
  the three corrections for every whitening:alloc.

C4 calibration windows are drawn after the evaluated C4 tokens (``benchmarks.core.data``,
``--no-holdout``). Rows are appended and flushed after every evaluation; ``--resume`` skips
rows (and calibrations/plans/scores) already done. At the end a markdown table
(whitening/alloc → ppl per eval × keep; best per column in bold, best row starred) is printed.

    python -m benchmarks.bench_allocation --resume                        # quick grid (hours on CPU)
    python -m benchmarks.bench_allocation --grid full --resume
    python -m benchmarks.bench_allocation --model tiny --windows 2 --nsamples 2 --seqlen 128 \\
        --keeps 0.8 --bsi-windows 1 --out /tmp/a.csv                      # seconds: smoke test
    python -m benchmarks.bench_allocation --allocs bsi --correct none --bsi-windows 32 \\
        --bsi-curvatures kfac fisher --bsi-orders importance spectral --resume   # issue #20's BSI grid
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

import obdk

from .core.data import EvalSets, calibration_data, data_dir_of
from .core.env import RESULTS, set_threads
from .core.models import load, model_label, n_params
from .core.rows import ResultLog, read_rows
from .core.sweep import keep_sweep, plan_seconds
from .core.timing import free

DEFAULT_OUT = RESULTS / "allocation_smollm2.csv"
WHITENINGS = ("svd-llm", "obd")
ALLOCS = ("uniform", "global", "zero-sum", "bsi")
GRIDS = {
    "quick": {"calib": ["wikitext2:validation"], "eval": ["wikitext2", "c4"], "keeps": [0.8, 0.6],
              "whitenings": list(WHITENINGS), "allocs": list(ALLOCS), "correct": ["obd:global:zs,kfac,zs+kfac"]},
    "full": {"calib": ["wikitext2:validation", "c4"], "eval": ["wikitext2", "c4"], "keeps": [0.8, 0.6],
             "whitenings": list(WHITENINGS), "allocs": list(ALLOCS), "correct": ["all:zs,kfac,zs+kfac"]},
}
KEY_COLS = ("model", "calib", "eval", "whitening", "alloc", "correct", "keep", "windows_req", "seqlen",
            "nsamples", "seed", "bsi_windows", "bsi_probes", "bsi_order", "bsi_curvature", "bsi_terms")
STATS = ("cx", "cg", "grad")
CORRECT_KINDS = ("zs", "kfac", "zs+kfac", "zs-guarded")


def label(whitening: str, alloc: str, correct: str) -> str:
    if whitening == "dense":
        return "dense"
    return f"{whitening} / {alloc}" + (f" + {correct}" if correct else "")


def _corrections(spec: str) -> tuple[str, tuple[str, ...]]:
    """``WHITENING:ALLOC[:KINDS]`` or ``all[:KINDS]`` → (``w:a`` or ``all``, kinds).

    KINDS: comma-separated corrections (``zs``, ``kfac``, ``zs+kfac``), default ``zs``.
    """
    parts = spec.split(":")
    kinds = parts[-1].split(",") if len(parts) > 1 else []
    if kinds and all(k in CORRECT_KINDS for k in kinds):
        parts.pop()
        return ":".join(parts), tuple(kinds)
    return spec, ("zs",)


def combos(args) -> list[tuple[str, str, str]]:
    """(whitening, alloc, correct) in run order."""
    wanted: dict[str, list[str]] = {}
    for spec in args.correct:
        key, kinds = _corrections(spec)
        wanted.setdefault(key, []).extend(k for k in kinds if k not in wanted.get(key, []))
    out = []
    for w in args.whitenings:
        for a in args.allocs:
            out.append((w, a, ""))
            for k in dict.fromkeys(wanted.get("all", []) + wanted.get(f"{w}:{a}", [])):
                out.append((w, a, k))
    return out


def run(args) -> list[dict]:
    set_threads(args.threads)
    from obdk.calibrate.data import CalibrationData
    from obdk.calibrate.stats import calibrate

    mname = model_label(args.model)
    data_dir = data_dir_of(args.data_dir)
    out = ResultLog(args.out, KEY_COLS, args.resume)
    keeps = [float(k) for k in args.keeps]
    wreq = str(args.windows)
    grid = combos(args)

    def base(calib, ev, w, a, c, keep, order="importance", curv="hutchinson", terms="first+second") -> dict:
        bsi = a == "bsi"
        probed = curv in ("hutchinson", "blocked")
        return {"model": mname, "calib": calib, "eval": ev, "whitening": w, "alloc": a, "correct": c, "keep": keep,
                "windows_req": wreq, "seqlen": args.seqlen, "nsamples": args.nsamples if w != "dense" else "",
                "seed": args.seed, "bsi_windows": args.bsi_windows if bsi and curv != "kfac" else "",
                "bsi_probes": args.bsi_probes if bsi and probed else "",
                "bsi_order": order if bsi and order != "importance" else "",
                "bsi_curvature": curv if bsi and curv != "hutchinson" else "",
                "bsi_terms": terms if bsi and terms != "first+second" else ""}

    def variants(a: str) -> list[dict]:
        """The BSI options of one alloc's rows: every order × curvature for ``bsi``, none otherwise."""
        if a != "bsi":
            return [{}]
        return [{"order": o, "curv": cv, "terms": tm} for cv in args.bsi_curvatures for tm in args.bsi_terms
                for o in args.bsi_order]

    def todo(calib, w, a, c, keep) -> bool:
        return any(not out.has(**base(calib, ev, w, a, c, keep, **v)) for ev in args.eval for v in variants(a))

    t_load = time.perf_counter()
    model, tok = load(args.model)
    before = n_params(model)
    print(f"[model] {mname}: {before:,} params, loaded in {time.perf_counter() - t_load:.1f}s; "
          f"threads {torch.get_num_threads()}; {len(grid)} combinations × {len(keeps)} keeps × "
          f"{len(args.calib)} calibrations × {len(args.eval)} evals", flush=True)
    evals = EvalSets(tok, data_dir)

    def evaluate(m, b_kw: dict, extra: dict) -> None:
        for ev in args.eval:
            b = base(ev=ev, **b_kw)
            if out.has(**b):
                continue
            ppl = evals.perplexity(m, ev, args.seqlen, args.windows, progress=args.progress)
            row = {"model": mname, "calib": b["calib"], "calib_source": extra.get("calib_source", ""), "eval": ev,
                   "method": label(b["whitening"], b["alloc"], b["correct"])
                   + (f" [{b['bsi_curvature']}]" if b["bsi_curvature"] else "")
                   + (f" ({b['bsi_order']})" if b["bsi_order"] else "")
                   + (f" {{{b['bsi_terms']}}}" if b["bsi_terms"] else ""), "whitening": b["whitening"],
                   "alloc": b["alloc"], "correct": b["correct"], "keep": b["keep"],
                   "keep_actual": extra.get("keep_actual", 1.0), "ppl": ppl["ppl"], "nll": ppl["nll"],
                   "windows": ppl["windows"], "windows_req": wreq, "seqlen": args.seqlen, "tokens": ppl["tokens"],
                   "nsamples": b["nsamples"], "seed": args.seed, "bsi_windows": b["bsi_windows"],
                   "bsi_probes": b["bsi_probes"], "bsi_order": b["bsi_order"],
                   "bsi_curvature": b["bsi_curvature"], "bsi_terms": b["bsi_terms"], "bsi_passes": extra.get("bsi_passes", ""),
                   "predicted_loss": extra.get("predicted_loss", ""),
                   "calib_s": extra.get("calib_s", 0.0), "calib_stats": extra.get("calib_stats", ""),
                   "decompose_s": extra.get("decompose_s", 0.0), "scores_s": extra.get("scores_s", 0.0),
                   "apply_s": extra.get("apply_s", 0.0), "correct_s": extra.get("correct_s", 0.0),
                   "guard_t": extra.get("guard_t", ""), "guard_losses": extra.get("guard_losses", "")}
            row["compress_s"] = sum(float(row[k] or 0) for k in ("calib_s", "decompose_s", "scores_s", "apply_s"))
            row["eval_s"] = ppl["seconds"]
            row["model_params_after"] = extra.get("model_params_after", before)
            out.write(row)
            print(f"  {row['calib']:>22} → {ev:<10} {row['method']:<22} keep {float(row['keep']):.2f} "
                  f"(actual {float(row['keep_actual']):.3f})  ppl {row['ppl']:9.3f}  [calib {float(row['calib_s']):.0f}s, "
                  f"decomp {float(row['decompose_s']):.0f}s, scores {float(row['scores_s']):.0f}s, "
                  f"apply {float(row['apply_s']):.1f}s (corr {float(row['correct_s']):.1f}s), eval {row['eval_s']:.0f}s]",
                  flush=True)

    if not args.no_dense:
        evaluate(model, dict(calib="none", w="dense", a="", c="", keep=1.0), {})

    def prepare(w, data, stats, alloc, correct):
        """The plan of whitening ``w`` on ``data`` from the shared statistics, and its decomposition seconds.

        ``alloc``/``correct`` are the plan's defaults only (every row passes its own); they tell
        ``prepare`` which calibration windows the plan must keep (for BSI scores, for corrections).
        """
        cfg = obdk.LowRankConfig(method=w, alloc=alloc, probes=args.bsi_probes, bsi_order=args.bsi_order[0],
                                 bsi_curvature=args.bsi_curvatures[0], correct=correct)
        plan = obdk.prepare(model, cfg, data, stats=stats, seed=args.seed, progress=args.progress)
        return plan, plan_seconds(plan, *[s for s in plan.timer.stages if s not in ("calibration", "scores")])

    for calib in args.calib:
        if not any(todo(calib, w, a, c, k) for (w, a, c) in grid for k in keeps):
            print(f"[calib] {calib}: all rows done", flush=True)
            continue
        t0 = time.perf_counter()
        data, source = calibration_data(calib, tok, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                                        data_dir=data_dir, evals=list(args.eval),
                                        eval_tokens=args.windows * args.seqlen, holdout=args.holdout)
        print(f"[calib] {calib}: {len(data)}×{data.input_ids.shape[1]} tokens from {source} "
              f"({time.perf_counter() - t0:.1f}s to load/tokenise, not counted)", flush=True)
        t0 = time.perf_counter()
        stats = calibrate(model, data, stats=STATS, seed=args.seed, progress=args.progress, cache_dir=args.cache_dir)
        calib_s = time.perf_counter() - t0
        print(f"[calib] {'+'.join(STATS)} in {calib_s:.1f}s", flush=True)
        k_bsi = min(args.bsi_windows, len(data))
        subset = CalibrationData(input_ids=data.input_ids[:k_bsi],
                                 attention_mask=None if data.attention_mask is None else data.attention_mask[:k_bsi],
                                 fingerprint={**data.fingerprint, "nsamples": k_bsi, "bsi_subset_of": len(data)})
        for w in args.whitenings:
            mine = [(a, c) for (ww, a, c) in grid if ww == w and any(todo(calib, w, a, c, k) for k in keeps)]
            if not mine:
                continue
            corrects = [c for _, c in mine if c]
            plans = {"": prepare(w, data, stats, "uniform", corrects[0] if corrects else "none")}
            if any(a == "bsi" for a, _ in mine):
                # on all the calibration windows the BSI rows share the main plan (the scores are cached per estimator)
                plans["bsi"] = plans[""] if k_bsi == len(data) else prepare(w, subset, stats, "bsi", "none")
            print(f"[plan] {w}: decomposed in {plans[''][1]:.1f}s"
                  + (f" (and on the {k_bsi} BSI windows in {plans['bsi'][1]:.1f}s)"
                     if "bsi" in plans and plans["bsi"] is not plans[""] else ""),
                  flush=True)

            def plan_of(alloc: str):
                """``(plan, decompose_s)`` the rows of ``alloc`` run on."""
                return plans["bsi" if alloc == "bsi" else ""]

            def apply(m, **point):
                """``Plan.apply`` on the plan of this allocation; also the seconds of the scores it computed."""
                plan = plan_of(point["alloc"])[0]
                s0 = plan_seconds(plan, "scores")
                return plan.apply(m, **point), plan_seconds(plan, "scores") - s0

            # the seconds (and gradient passes) of each set of scores, shared by the rows that use it
            scored_s: dict[tuple, float] = {}
            points = [{"keep": keep, "alloc": a, "correct": c or "none",
                       **({"bsi_order": v["order"], "bsi_curvature": v["curv"], "bsi_terms": v["terms"]}
                          if v else {})}
                      for keep in keeps for a, c in mine for v in variants(a)]

            def point_base(calib, ev, p) -> dict:
                opts = ({"order": p["bsi_order"], "curv": p["bsi_curvature"], "terms": p["bsi_terms"]}
                        if p["alloc"] == "bsi" else {})
                return base(calib, ev, w, p["alloc"], _row_correct(p), p["keep"], **opts)

            skip = lambda p: all(out.has(**point_base(calib, ev, p)) for ev in args.eval)  # noqa: E731
            for res in keep_sweep(model, points, apply, skip=skip):
                rep, scored = res.report
                a = res.point["alloc"]
                skey = (a, res.point.get("bsi_curvature"))
                if a in ("zero-sum", "bsi") and skey not in scored_s:
                    # computed by this row, or (zero-sum, bsi by prepare) before the sweep: the plan's total so far
                    scored_s[skey] = scored if scored else plan_seconds(plan_of(a)[0], "scores")
                    print(f"[plan] {w}: {a} scores in {scored_s[skey]:.1f}s"
                          + (f" ({res.point['bsi_curvature']}, {k_bsi} windows)" if a == "bsi" else ""), flush=True)
                scores_s = scored_s.get(skey, 0.0)
                passes = ""
                if a == "bsi":
                    pl = plan_of(a)[0]
                    sc = pl.scores("bsi", None, pl.resolve(**{k: v for k, v in res.point.items() if k != "keep"}))
                    passes = next(iter(sc.values())).passes
                extra = {"calib_source": source, "calib_s": calib_s, "calib_stats": "+".join(STATS), "bsi_passes": passes,
                         "decompose_s": plan_of(a)[1], "scores_s": scores_s,
                         "apply_s": res.seconds - scored,
                         "correct_s": rep.stages.get("correction", {}).get("seconds", 0.0),
                         "keep_actual": rep.keep_actual, "predicted_loss": rep.predicted_loss,
                         "model_params_after": rep.model_params_after, **_guard(rep)}
                opts = ({"order": res.point["bsi_order"], "curv": res.point["bsi_curvature"],
                         "terms": res.point["bsi_terms"]} if a == "bsi" else {})
                evaluate(res.model, dict(calib=calib, w=w, a=a, c=_row_correct(res.point), keep=res.point["keep"],
                                         **opts), extra)
            plans = None  # (released; plan_of's closure reads the name)
            free()
        del stats, data, subset
        free()
    return out.rows


def _guard(rep) -> dict:
    """The step size ``zs-guarded`` chose (``guard_t``) and its held-out loss per size (``guard_losses``,
    ``t:nll;…``), from the report's module damping; {} for another correction."""
    d = next((m.damping for m in rep.modules if "guard_t" in (m.damping or {})), None)
    if d is None:
        return {}
    losses = ";".join(f"{k.split('@')[1]}:{v:.5f}" for k, v in d.items() if k.startswith("guard_loss@"))
    return {"guard_t": d["guard_t"], "guard_losses": losses}


def _row_correct(point: dict) -> str:
    """The ``correct`` column of a point: its correction, blank for none."""
    return "" if point["correct"] == "none" else point["correct"]


def markdown_table(rows: list[dict], model: str) -> str:
    """Per calibration set: whitening/alloc(+zs) × (eval, keep) → ppl; best per column bold, best row ★."""
    rows = [r for r in rows if r.get("model") == model]
    dense = {r["eval"]: float(r["ppl"]) for r in rows if r.get("whitening") == "dense"}
    out = []
    for calib in dict.fromkeys(r["calib"] for r in rows if r["calib"] != "none"):
        sel = [r for r in rows if r["calib"] == calib]
        cols = sorted({(r["eval"], float(r["keep"])) for r in sel}, key=lambda t: (t[0] != "wikitext2", t[0], -t[1]))
        labels = list(dict.fromkeys(r["method"] for r in sel))
        cell = {(r["method"], r["eval"], float(r["keep"])): r for r in sel}
        best_col = {c: min((float(cell[(l, *c)]["ppl"]) for l in labels if (l, *c) in cell), default=None) for c in cols}
        # best row: lowest mean NLL over the columns it has all of
        full = [l for l in labels if all((l, *c) in cell for c in cols)]
        best_row = min(full, key=lambda l: sum(float(cell[(l, *c)]["nll"]) for c in cols), default=None)
        src = sel[0].get("calib_source", calib)
        cs = sel[0].get("calib_s", "")
        out.append(f"\nCalibrated on {src} ({sel[0].get('nsamples')}×{sel[0].get('seqlen')} tokens; "
                   f"cx+cg+grad in {float(cs or 0):.0f}s, shared); perplexity on the first "
                   f"{sel[0].get('windows')} windows of {sel[0].get('seqlen')} tokens:\n")
        out.append("| whitening / allocation | " + " | ".join(f"{e} @ {k:g}" for e, k in cols)
                   + " | scores + apply (s) |")
        out.append("|---|" + "---:|" * (len(cols) + 1))
        if dense:
            out.append("| dense | " + " | ".join(f"{dense[e]:.2f}" if e in dense else "" for e, _ in cols) + " | |")
        for l in labels:
            cells = []
            for c in cols:
                r = cell.get((l, *c))
                if r is None:
                    cells.append("")
                    continue
                v = float(r["ppl"])
                cells.append(f"**{v:.2f}**" if v == best_col[c] else f"{v:.2f}")
            extra = [float(cell[(l, *c)]["scores_s"] or 0) + float(cell[(l, *c)]["apply_s"] or 0)
                     for c in cols if (l, *c) in cell]
            secs = f"{sum(extra) / len(extra):.0f}" if extra else ""
            out.append(f"| {l}{' ★' if l == best_row else ''} | " + " | ".join(cells) + f" | {secs} |")
        out.append("\n★ lowest mean log-perplexity over the columns; **bold**: best in the column. "
                   "scores + apply: zero-sum/BSI scoring + allocation/truncation/correction/packing, "
                   "mean over the keeps (calibration and decomposition are shared and not included).")
    return "\n".join(out)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", choices=sorted(GRIDS), default="quick")
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), tiny, or any obdk.hub spec")
    ap.add_argument("--calib", nargs="+", default=None, help="calibration sets (grid default)")
    ap.add_argument("--eval", nargs="+", default=None, help="evaluation sets (grid default: wikitext2 c4)")
    ap.add_argument("--keeps", nargs="+", type=float, default=None, help="(grid default: 0.8 0.6)")
    ap.add_argument("--whitenings", nargs="+", default=None, choices=WHITENINGS)
    ap.add_argument("--allocs", nargs="+", default=None, choices=ALLOCS)
    ap.add_argument("--correct", nargs="+", default=None,
                    help="WHITENING:ALLOC[:KINDS] combinations also run with corrections (KINDS: comma-separated "
                         "zs, kfac, zs+kfac, zs-guarded; default zs), or 'all[:KINDS]' or 'none' (quick: obd:global:zs,kfac,zs+kfac; "
                         "full: all:zs,kfac,zs+kfac)")
    ap.add_argument("--windows", type=int, default=64, help="first N evaluation windows of --seqlen tokens")
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    ap.add_argument("--seqlen", type=int, default=512, help="tokens per calibration and evaluation window")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bsi-probes", type=int, default=2, help="Hutchinson probes (cost 2·probes passes, per matrix "
                                                              "for blocked)")
    ap.add_argument("--bsi-order", "--bsi-orders", nargs="+", default=["importance"], choices=["importance", "spectral"],
                    help="bsi allocation: BSI's any-order selection, or ranks only (spectral); several: one row each")
    ap.add_argument("--bsi-curvatures", nargs="+", default=["hutchinson"],
                    choices=["hutchinson", "blocked", "kfac", "fisher"],
                    help="bsi allocation: the Hessian-diagonal estimators (obdk --bsi-curvature), one row each")
    ap.add_argument("--bsi-terms", nargs="+", default=["first+second"], choices=["first+second", "second"],
                    help="bsi allocation: the importance's Taylor terms (obdk --bsi-terms), one row each")
    ap.add_argument("--cache-dir", default=None, help="reuse/write the calibration statistics here (obdk.calibrate.cache)")
    ap.add_argument("--bsi-windows", type=int, default=8, help="first K calibration windows for the BSI scores")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense reference rows")
    ap.add_argument("--no-holdout", dest="holdout", action="store_false",
                    help="let calibration windows of an evaluated corpus/split overlap the evaluated tokens")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--resume", action="store_true", help="skip rows already in --out")
    ap.add_argument("--data-dir", default=None, help="default $OBDK_DATA_DIR, else ../shared/data")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--progress", action="store_true", help="tqdm bars")
    ap.add_argument("--table-only", action="store_true", help="print the markdown table from --out and exit")
    args = ap.parse_args(argv)
    for k, v in GRIDS[args.grid].items():
        if getattr(args, k) is None:
            setattr(args, k, list(v))
    if args.correct == ["none"]:
        args.correct = []
    bad = []
    for c in args.correct:
        key = _corrections(c)[0]
        if key != "all" and (key.count(":") != 1 or key.split(":")[0] not in WHITENINGS
                             or key.split(":")[1] not in ALLOCS):
            bad.append(c)
    if bad:
        ap.error(f"--correct: {bad} are not WHITENING:ALLOC[:KINDS] (e.g. obd:global:zs,kfac; KINDS from "
                 f"{', '.join(CORRECT_KINDS)}, default zs), 'all[:KINDS]' or 'none'")
    return args


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
