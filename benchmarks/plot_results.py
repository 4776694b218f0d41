"""Plots from the benchmark CSVs in ``benchmarks/results/`` (PNG files written next to them).

* ``quality_*.csv`` (bench_quality.py) → ``quality_*.png``: perplexity (log scale) against keep,
  one line per method, one panel per (calibration set, evaluation set); dense as a dashed line;
  the calibration-free ``svd`` is drawn in every panel. Full-length rows are left out.
* ``allocation_*.csv`` (bench_allocation.py) → ``allocation_*_keep<K>.png``, one per keep: grouped
  bars (group = allocation, bar = whitening ± a correction), one panel per (calibration, evaluation).
* ``decompose_latency*.csv`` (bench_decompose_latency.py) → ``decompose_latency*.png``: stacked
  bars of the stage times per configuration (long format with a ``stage`` column and a seconds
  column, or wide format with ``*_s`` / ``*_ms`` stage columns).

Missing or empty inputs are skipped with a message. When a CSV holds several runs of the same
cell (re-runs), the last row wins.

    python benchmarks/plot_results.py                      # every CSV found in benchmarks/results/
    python benchmarks/plot_results.py --only quality allocation --results-dir /tmp/res
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PROVENANCE = {"device_name", "torch", "triton", "obdk", "transformers", "cuda", "git_sha", "timestamp",
              "loadavg_1m", "python"}



#: one colour per method in every panel and figure
METHOD_COLORS = {"svd": "tab:green", "svd-llm": "tab:orange", "asvd": "tab:purple", "obd-uniform": "tab:blue",
                 "obd": "tab:red", "zs-svd": "tab:brown", "bsi": "tab:pink"}

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def read(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _f(v, default=float("nan")) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def _last(rows: list[dict], key_cols: tuple[str, ...]) -> list[dict]:
    out: dict[tuple, dict] = {}
    for r in rows:
        out[tuple(str(r.get(c, "")) for c in key_cols)] = r
    return list(out.values())


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
    rows = [r for r in read(path) if not str(r.get("windows_req", "")).startswith("all")]
    rows = _last(rows, ("model", "calib", "eval", "method", "keep", "windows_req", "seqlen", "nsamples", "seed"))
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
    rows = _last(read(path), ("model", "calib", "eval", "whitening", "alloc", "correct", "keep", "windows_req",
                              "seqlen", "nsamples", "seed", "bsi_windows", "bsi_probes"))
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
            allocs = list(dict.fromkeys(r["alloc"] for r in kr))
            series = list(dict.fromkeys((r["whitening"], r.get("correct", "")) for r in kr))
            fig, axes = _grid(plt, len(panels), w=5.2, h=4.0)
            width = 0.8 / max(1, len(series))
            colours = {w: f"C{i}" for i, w in enumerate(dict.fromkeys(w for w, _ in series))}
            for ax, (calib, ev) in zip(axes, panels):
                x = np.arange(len(allocs))
                seen: list[float] = [dense[ev]] if ev in dense else []
                for i, (w, c) in enumerate(series):
                    vals = []
                    for a in allocs:
                        hit = [r for r in kr if (r["calib"], r["eval"], r["whitening"], r.get("correct", ""), r["alloc"])
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
                ax.set_xticks(x, allocs)
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

_SECONDS_COLS = ("seconds", "time_s", "median_s", "wall_s", "s")
_MS_COLS = ("ms", "median_ms", "time_ms")
_TOTAL_WORDS = ("total", "sum", "all", "wall", "speedup", "ratio")


def _numeric(rows, col) -> bool:
    vals = [r.get(col, "") for r in rows if r.get(col, "") != ""]
    return bool(vals) and all(math.isfinite(_f(v)) for v in vals)


def plot_latency(path: Path) -> list[Path]:
    rows = read(path)
    if not rows:
        print(f"[skip] {path}: empty")
        return []
    cols = list(rows[0].keys())
    if {"run_id", "run", "kind", "stage", "seconds", "pipeline"} <= set(cols):
        # bench_decompose_latency.py's own format: redraw its figure of the last run (same PNG it writes)
        try:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            import bench_decompose_latency as bdl
            return [bdl.plot(bdl.read_run(path), path.with_suffix(".png"))]
        except Exception as e:  # fall back to the generic stacked bars below
            print(f"[note] {path}: bench_decompose_latency.plot failed ({type(e).__name__}: {e}); generic plot")
        last = rows[-1]["run_id"]
        rows = [r for r in rows if r.get("run_id") == last and r.get("kind") == "stage" and r.get("run") == "first"]
        if not rows:
            print(f"[skip] {path}: no first-run stage rows")
            return []
    stage_col = next((c for c in ("stage", "phase", "step") if c in cols), None)
    if stage_col:  # long format
        val = next((c for c in _SECONDS_COLS + _MS_COLS if c in cols and _numeric(rows, c)), None)
        if val is None:
            print(f"[skip] {path}: a '{stage_col}' column but no seconds column ({', '.join(_SECONDS_COLS + _MS_COLS)})")
            return []
        scale = 1e-3 if val in _MS_COLS else 1.0
        if "kind" in cols:  # stage rows only (no totals / evaluations stacked on top)
            rows = [r for r in rows if r.get("kind") in ("stage", "")] or rows
        idc = [c for c in cols if c not in PROVENANCE and c not in (stage_col, val, "run_id") and not _numeric(rows, c)
               and len({r.get(c) for r in rows}) > 1]
        data: dict[str, dict[str, float]] = {}
        for r in rows:
            lab = " ".join(str(r.get(c, "")) for c in idc) or "run"
            data.setdefault(lab, {})[r[stage_col]] = _f(r[val]) * scale
        stages = list(dict.fromkeys(s for d in data.values() for s in d))
    else:  # wide format: *_s / *_ms stage columns
        st = [c for c in cols if (c.endswith("_s") or c.endswith("_ms")) and _numeric(rows, c)
              and not any(w in c.lower() for w in _TOTAL_WORDS)]
        if not st:
            print(f"[skip] {path}: no stage columns (*_s / *_ms) found")
            return []
        idc = [c for c in cols if c not in PROVENANCE and c not in st and not _numeric(rows, c)
               and len({r.get(c) for r in rows}) > 1]
        idc += [c for c in cols if c not in PROVENANCE and c not in st and c not in idc and _numeric(rows, c)
                and len({r.get(c) for r in rows}) > 1 and not any(w in c.lower() for w in _TOTAL_WORDS)
                and not (c.endswith("_s") or c.endswith("_ms") or c.endswith("_mib") or c.endswith("_gb"))][:3]
        data = {}
        for i, r in enumerate(rows):
            lab = " ".join(f"{c}={r.get(c)}" if _numeric(rows, c) else str(r.get(c, "")) for c in idc) or f"row {i}"
            data[lab] = {c.rsplit("_", 1)[0]: _f(r[c]) * (1e-3 if c.endswith("_ms") else 1.0) for c in st}
        stages = [c.rsplit("_", 1)[0] for c in st]
    plt = _plt()
    labels = list(data)
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(labels) + 3), 4.5))
    bottom = [0.0] * len(labels)
    for s in stages:
        vals = [data[l].get(s, 0.0) if math.isfinite(data[l].get(s, 0.0)) else 0.0 for l in labels]
        ax.bar(range(len(labels)), vals, bottom=bottom, label=s)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("seconds")
    ax.set_title(f"{path.stem}: time per stage", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return [out]


KINDS = {"quality": ("quality_*.csv", plot_quality), "allocation": ("allocation_*.csv", plot_allocation),
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
            kind = next((k for k, (pat, _) in KINDS.items() if f.name.startswith(pat.split("*")[0])), None)
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
