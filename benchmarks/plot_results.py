"""Plots from the benchmark CSVs in ``benchmarks/results/`` (PNG files written next to them).

* ``quality_*.csv`` (bench_quality.py) → ``quality_*.png``: perplexity (log scale) against keep,
  one line per method, one panel per (calibration set, evaluation set); dense as a dashed line;
  the calibration-free ``svd`` is drawn in every panel. Full-length rows are left out.
* ``allocation_*.csv`` (bench_allocation.py) → ``allocation_*_keep<K>.png``, one per keep: grouped
  bars (group = allocation, bar = whitening ± a correction), one panel per (calibration, evaluation).
* ``decompose_latency*.csv`` (bench_decompose_latency.py) → ``decompose_latency*.png``, the last
  run in the file: stacked bars of the stage times per pipeline at the first keep (total and
  perplexity on top), and the marginal cost of each extra keep (% of the first total).
  bench_decompose_latency.py draws the same figure through :func:`plot_latency` after each run.

Missing or empty inputs are skipped with a message. When a CSV holds several runs of the same
cell (re-runs), the last row wins.

    python -m benchmarks.plot_results                      # every CSV found in benchmarks/results/
    python -m benchmarks.plot_results --only quality allocation --results-dir /tmp/res
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional

from .core.env import RESULTS
from .core.rows import last_rows, read_rows, to_float

#: one colour per method in every panel and figure
METHOD_COLORS = {"svd": "tab:green", "svd-llm": "tab:orange", "asvd": "tab:purple", "obd-uniform": "tab:blue",
                 "obd": "tab:red", "zs-svd": "tab:brown", "bsi": "tab:pink"}

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _f(v, default=float("nan")) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def _alloc_label(r: dict) -> str:
    """An allocation row's x-axis label: the allocation, and for BSI its curvature, order and Taylor terms
    (one bar each; blank cells are the BSI paper's choices: hutchinson, importance order, first+second terms)."""
    if r.get("alloc") != "bsi":
        return r["alloc"]
    curv = r.get("bsi_curvature") or "hutchinson"
    order = {"importance": "imp", "spectral": "spec"}[r.get("bsi_order") or "importance"]
    return f"bsi {curv[:6]} {order}" + (" 2nd" if r.get("bsi_terms") == "second" else "")


def _grid(plt, n: int, w: float = 4.6, h: float = 3.6):
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _models(rows):
    return list(dict.fromkeys(r.get("model", "") for r in rows))


def _out(path: Path, model: str, nmodels: int, suffix: str = "") -> Path:
    tag = f"_{model.replace('/', '_')}" if nmodels > 1 else ""
    return path.with_name(f"{path.stem}{tag}{suffix}.png")


# --------------------------------------------------------------------------- quality


def plot_quality(path: Path) -> list[Path]:
    rows = [r for r in read_rows(path) if not str(r.get("windows_req", "")).startswith("all")]
    rows = last_rows(rows, ("model", "calib", "eval", "method", "keep", "windows_req", "seqlen", "nsamples", "seed"))
    if not rows:
        print(f"[skip] {path}: no first-N-window rows")
        return []
    plt = _plt()
    written = []
    models = _models(rows)
    for model in models:
        mr = [r for r in rows if r.get("model") == model]
        calibs = [c for c in dict.fromkeys(r["calib"] for r in mr) if c != "none"] or ["none"]
        evals = list(dict.fromkeys(r["eval"] for r in mr))
        panels = [(c, e) for c in calibs for e in evals]
        fig, axes = _grid(plt, len(panels))
        for ax, (calib, ev) in zip(axes, panels):
            sel = [r for r in mr if r["eval"] == ev and r["calib"] in (calib, "none")]
            for method in dict.fromkeys(r["method"] for r in sel):
                pts = sorted((_f(r["keep"]), _f(r["ppl"])) for r in sel if r["method"] == method)
                if method == "dense":
                    ax.axhline(pts[0][1], color="k", ls="--", lw=1, label=f"dense ({pts[0][1]:.2f})")
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method,
                        color=METHOD_COLORS.get(method))
            ax.set_yscale("log")
            ax.set_xlabel("keep (fraction of targeted Linear parameters)")
            ax.set_ylabel("perplexity")
            win = sel[0].get("windows", "") if sel else ""
            ax.set_title(f"calib {calib} → eval {ev}\n({win} windows × {sel[0].get('seqlen', '')} tokens)"
                         if sel else f"{calib} → {ev}", fontsize=9)
            ax.invert_xaxis()
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{model}: perplexity against keep", fontsize=11)
        fig.tight_layout()
        out = _out(path, model, len(models))
        fig.savefig(out, dpi=120)
        plt.close(fig)
        written.append(out)
    return written


# --------------------------------------------------------------------------- allocation


HATCH = {"zs": "//", "kfac": "..", "zs+kfac": "xx"}  # a correction's bars


def plot_allocation(path: Path) -> list[Path]:
    rows = last_rows(read_rows(path), ("model", "calib", "eval", "whitening", "alloc", "correct", "keep", "windows_req",
                              "seqlen", "nsamples", "seed", "bsi_windows", "bsi_probes", "bsi_order", "bsi_curvature", "bsi_terms"))
    if not rows:
        print(f"[skip] {path}: empty")
        return []
    plt = _plt()
    import numpy as np
    written = []
    models = _models(rows)
    for model in models:
        mr = [r for r in rows if r.get("model") == model]
        dense = {r["eval"]: _f(r["ppl"]) for r in mr if r.get("whitening") == "dense"}
        comp = [r for r in mr if r.get("whitening") != "dense"]
        for keep in sorted({_f(r["keep"]) for r in comp}, reverse=True):
            kr = [r for r in comp if _f(r["keep"]) == keep]
            panels = list(dict.fromkeys((r["calib"], r["eval"]) for r in kr))
            allocs = list(dict.fromkeys(_alloc_label(r) for r in kr))
            series = list(dict.fromkeys((r["whitening"], r.get("correct", "")) for r in kr))
            fig, axes = _grid(plt, len(panels), w=max(5.2, 0.55 * len(allocs) + 1.5), h=4.4)
            width = 0.8 / max(1, len(series))
            colours = {w: f"C{i}" for i, w in enumerate(dict.fromkeys(w for w, _ in series))}
            for ax, (calib, ev) in zip(axes, panels):
                x = np.arange(len(allocs))
                seen: list[float] = [dense[ev]] if ev in dense else []
                for i, (w, c) in enumerate(series):
                    vals = []
                    for a in allocs:
                        hit = [r for r in kr if (r["calib"], r["eval"], r["whitening"], r.get("correct", ""), _alloc_label(r))
                               == (calib, ev, w, c, a)]
                        vals.append(_f(hit[-1]["ppl"]) if hit else float("nan"))
                    seen += [v for v in vals if math.isfinite(v)]
                    bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, color=colours[w],
                                  alpha=0.55 if c else 1.0, edgecolor="k", linewidth=0.4,
                                  label=w + (f" + {c}" if c else ""), hatch=HATCH.get(c))
                    for b, v in zip(bars, vals):
                        if math.isfinite(v):
                            ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom",
                                        fontsize=6, rotation=90)
                if ev in dense:
                    ax.axhline(dense[ev], color="k", ls="--", lw=1, label=f"dense ({dense[ev]:.2f})")
                logy = bool(seen) and max(seen) > 10 * min(seen)  # collapsed rows: a log axis keeps the rest legible
                if logy:
                    ax.set_yscale("log")
                    ax.set_ylim(min(seen) / 1.5, max(seen) * 6)
                elif seen:  # bars start near the best value: the differences are what matters
                    lo, hi = min(seen), max(seen)
                    ax.set_ylim(lo - 0.15 * (hi - lo) - 0.02 * lo, hi + 0.25 * (hi - lo) + 0.02 * hi)
                ax.set_xticks(x, allocs, rotation=40, ha="right", fontsize=7)
                ax.set_ylabel("perplexity (log axis)" if logy else "perplexity (axis does not start at 0)")
                ax.set_title(f"calib {calib} → eval {ev}", fontsize=9)
                ax.grid(True, axis="y", alpha=0.3)
                ax.legend(fontsize=7)
            fig.suptitle(f"{model}: allocation at keep {keep:g}", fontsize=11)
            fig.tight_layout()
            out = _out(path, model, len(models), f"_keep{keep:g}")
            fig.savefig(out, dpi=120)
            plt.close(fig)
            written.append(out)
    return written


# --------------------------------------------------------------------------- decomposition latency

#: obdk's stage names in pipeline order (the stacking order of the bars)
STAGE_ORDER = ("calibration", "factorisation", "scores", "allocation", "truncation", "correction", "packing")


def plot_latency(path: Path, png: Optional[Path] = None) -> list[Path]:
    """The last run of a bench_decompose_latency CSV: stages per pipeline at the first keep, and each extra keep."""
    rows = read_rows(path)
    if not rows:
        print(f"[skip] {path}: empty")
        return []
    rows = [r for r in rows if r.get("run_id") == rows[-1]["run_id"]]
    png = Path(png) if png else Path(path).with_suffix(".png")
    plt = _plt()
    first = [r for r in rows if r["run"] == "first" and r["kind"] == "stage"]
    pipes = list(dict.fromkeys(r["pipeline"] for r in first))  # the order they ran in (--pipelines)
    stages = [s for s in STAGE_ORDER if any(r["stage"] == s for r in first)]
    stages += sorted({r["stage"] for r in first} - set(stages))
    secs = {(r["pipeline"], r["stage"]): float(r["seconds"]) for r in first}
    ppl = {r["pipeline"]: to_float(r["ppl"]) for r in first}
    keep0 = first[0]["keep"] if first else ""
    extra = [r for r in rows if r["run"] == "extra" and r["kind"] == "total"]
    ekeeps = sorted({r["keep"] for r in extra}, key=float)
    fig, axes = plt.subplots(1, 2 if extra else 1, figsize=(13 if extra else 7.5, 5), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]} if extra else None)
    ax = axes[0][0]
    colors = plt.get_cmap("tab10")
    bottom = [0.0] * len(pipes)
    for i, s in enumerate(stages):
        h = [secs.get((p, s), 0.0) for p in pipes]
        ax.bar(range(len(pipes)), h, bottom=bottom, label=s, color=colors(i % 10))
        bottom = [b + x for b, x in zip(bottom, h)]
    for j, p in enumerate(pipes):
        tot = [float(r["seconds"]) for r in rows if r["pipeline"] == p and r["run"] == "first" and r["kind"] == "total"]
        txt = f"{tot[0]:.3g} s" if tot else ""
        if ppl.get(p) is not None:
            txt += f"\nppl {ppl[p]:.3g}"
        ax.text(j, bottom[j], txt, ha="center", va="bottom", fontsize=8)
    dense = [to_float(r["ppl"]) for r in rows if r["kind"] == "eval"]
    meta = rows[0]
    ax.set_xticks(range(len(pipes)), [p.replace(" ", "\n", 1) for p in pipes], fontsize=9)
    ax.set_ylabel("seconds")
    ax.set_ylim(0, max(bottom + [1e-9]) * 1.35)
    ax.set_title(f"end to end at keep {keep0}" + (f" (dense ppl {dense[0]:.3g})" if dense and dense[0] else ""),
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper center", ncol=min(4, max(1, len(stages))))
    if extra:
        ax2 = axes[0][1]
        epipes = list(dict.fromkeys(r["pipeline"] for r in extra))
        w = 0.8 / max(1, len(ekeeps))
        for i, k in enumerate(ekeeps):
            h = [next((float(r["seconds"]) for r in extra if r["pipeline"] == p and r["keep"] == k), 0.0) for p in epipes]
            fr = [next((to_float(r.get("marginal_frac")) for r in extra if r["pipeline"] == p and r["keep"] == k), None)
                  for p in epipes]
            xs = [j + (i - (len(ekeeps) - 1) / 2) * w for j in range(len(epipes))]
            ax2.bar(xs, h, width=w, label=f"keep {k}", color=colors((i + 5) % 10))
            for x, y, f in zip(xs, h, fr):
                if f is not None:
                    ax2.text(x, y, f"{100 * f:.1f}%", ha="center", va="bottom", fontsize=7)
        ax2.set_xticks(range(len(epipes)), [p.replace(" ", "\n", 1) for p in epipes], fontsize=9)
        ax2.set_ylabel("seconds")
        ax2.set_title("each extra ratio (% of the first total)", fontsize=10)
        ax2.set_ylim(0, max([float(r["seconds"]) for r in extra] + [1e-9]) * 1.3)
        ax2.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"{meta.get('model', '')} ({meta.get('model_dtype') or 'float32'}): {meta.get('nsamples', '')}×"
                 f"{meta.get('seqlen', '')} calibration tokens, {meta.get('device_name', '')}, {meta.get('git_sha', '')}",
                 fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return [png]


# --------------------------------------------------------------------------- healing


def plot_heal(path: Path) -> list[Path]:
    """Perplexity per keep of each method and healing mode (one panel per evaluation set; dense as a line)."""
    rows = [r for r in read_rows(path) if r.get("method")]
    rows = last_rows(rows, ("model", "method", "keep", "heal", "heal_data", "heal_steps_arg", "heal_lr_arg", "windows"))
    evals = [c[len("ppl_"):] for c in (rows[0] if rows else {}) if c.startswith("ppl_")]
    if not rows or not evals:
        print(f"[skip] {path}: no rows")
        return []
    plt = _plt()
    fig, axes = _grid(plt, len(evals))
    series = [(m, h, d) for m, h, d in dict.fromkeys((r["method"], r["heal"], r["heal_data"]) for r in rows)
              if m != "dense"]
    keeps = sorted({_f(r["keep"]) for r in rows if r["method"] != "dense"})
    width = 0.8 / max(len(series), 1)
    for ax, ev in zip(axes, evals):
        for j, (m, h, d) in enumerate(series):
            ys = [next((_f(r[f"ppl_{ev}"]) for r in rows if (r["method"], r["heal"], r["heal_data"]) == (m, h, d)
                        and _f(r["keep"]) == k), float("nan")) for k in keeps]
            xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(keeps))]
            label = f"{m} {h}" + ("" if d in ("-", "calib") else f" ({d})")
            text = d.split(":")[0]  # the healing text: c4:32 -> c4
            bars = ax.bar(xs, ys, width, label=label, color=METHOD_COLORS.get(m, "gray"),
                          alpha={"none": 0.3, "layer": 0.55, "e2e-kl": 0.7, "e2e-ce": 0.85}.get(h, 1.0),
                          hatch="//" if h == "layer" else {"c4": "..", "wt2": "xx"}.get(text),
                          edgecolor="white" if text in ("c4", "wt2") else None)
            for b_, y in zip(bars, ys):
                if not math.isnan(y):
                    ax.text(b_.get_x() + b_.get_width() / 2, y, f"{y:.0f}", ha="center", va="bottom", fontsize=7)
        dense = next((_f(r[f"ppl_{ev}"]) for r in rows if r["method"] == "dense"), None)
        if dense is not None:
            ax.axhline(dense, color="black", lw=1, ls="--", label=f"dense {dense:.1f}")
        ax.set_xticks(range(len(keeps)), [f"keep {k:g}" for k in keeps])
        ax.set_yscale("log")
        ax.set_ylim(top=ax.get_ylim()[1] * 12)  # room for the legend above the bars
        ax.set_ylabel(f"{ev} perplexity (log)")
        ax.set_title(f"{ev}, first {rows[0].get('windows')} windows of {rows[0].get('seqlen')}", fontsize=10)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"healing, {rows[0].get('model')}: calibrated on {rows[0].get('nsamples')}x{rows[0].get('seqlen')} "
                 "WikiText-2 validation tokens; healed on them unless labelled "
                 "(c4:N, wt2:N)", fontsize=9)
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return [png]


KINDS = {"heal": ("heal_smollm2.csv", plot_heal), "quality": ("quality_*.csv", plot_quality), "allocation": ("allocation_*.csv", plot_allocation),
         "latency": ("decompose_latency*.csv", plot_latency)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results-dir", default=str(RESULTS))
    ap.add_argument("--only", nargs="+", choices=sorted(KINDS), default=sorted(KINDS))
    ap.add_argument("--files", nargs="*", default=None,
                    help="explicit CSVs (kind from the file name prefix: quality_, allocation_, decompose_latency)")
    args = ap.parse_args(argv)
    jobs = []
    if args.files:
        for f in map(Path, args.files):
            kind = next((k for k, (pat, _) in KINDS.items() if f.name.startswith(pat.split("*")[0].split(".")[0])),
                        None)
            if kind is None:
                print(f"[skip] {f}: unknown kind (name must start with quality_, allocation_ or decompose_latency)")
                continue
            jobs.append((f, KINDS[kind][1]))
    else:
        d = Path(args.results_dir)
        for kind in args.only:
            pat, fn = KINDS[kind]
            found = sorted(d.glob(pat))
            if not found:
                print(f"[skip] {kind}: no {d / pat}")
            jobs += [(f, fn) for f in found]
    for f, fn in jobs:
        if not f.exists() or f.stat().st_size == 0:
            print(f"[skip] {f}: missing or empty")
            continue
        try:
            for out in fn(f):
                print(f"[plot] {out}")
        except Exception as e:  # one bad file must not stop the others
            print(f"[skip] {f}: {type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
