"""Helpers shared by obdk's benchmark scripts: provenance, timing, CSV rows, tables.

* ``device_name(device)``, ``versions()``, ``git_sha()``, ``timestamp()`` and ``env_fields(device)``
  (all of them as one dict) — stamped on every CSV row, so rows from different machines
  and commits can live in one file.
* ``bench(fn, device)`` — median and quantiles in µs: ``triton.testing.do_bench`` on CUDA
  (L2 flushed between reps), a ``perf_counter`` loop on CPU.
* ``write_csv(rows, path)`` — appends rows (creates the file with a header; a file whose
  header differs is rewritten with the union of columns), ``print_table(rows, cols)``.

Scripts import it as ``from _common import ...`` (they run as ``python benchmarks/x.py``,
which puts ``benchmarks/`` on ``sys.path``) or ``from benchmarks import _common``.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]

#: Peak numbers per GPU (dense, no sparsity): HBM bytes/s and 16-bit tensor-core FLOP/s.
PEAKS = {
    "H100": {"bw": 3.35e12, "flops_16": 989e12},
    "H200": {"bw": 4.8e12, "flops_16": 989e12},
    "A100": {"bw": 2.0e12, "flops_16": 312e12},
}


def device_name(device: torch.device | str | None = None) -> str:
    """GPU name, or the CPU model with the thread count torch uses."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def peaks(device: torch.device | str | None = None) -> Optional[dict]:
    """Peak bandwidth / FLOP rate of the device if known (``PEAKS``), else None (e.g. CPUs)."""
    name = device_name(device)
    for key, val in PEAKS.items():
        if key in name:
            return val
    return None


def versions() -> dict:
    out = {"torch": torch.__version__}
    for mod in ("triton", "transformers", "obdk"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = ""
    out["cuda"] = torch.version.cuda or ""
    return out


def git_sha() -> str:
    """Short SHA of the checkout, ``+dirty`` when it has uncommitted changes ('' outside git)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if sha and dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def env_fields(device: torch.device | str | None = None) -> dict:
    """The provenance columns of a CSV row."""
    v = versions()
    try:
        load = f"{os.getloadavg()[0]:.2f}"  # CPU contention from other processes when the run started
    except OSError:
        load = ""
    return {"device_name": device_name(device), "torch": v["torch"], "triton": v["triton"], "obdk": v["obdk"],
            "transformers": v["transformers"], "cuda": v["cuda"], "git_sha": git_sha(), "timestamp": timestamp(),
            "loadavg_1m": load}


# --------------------------------------------------------------------------- timing


def bench(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 3, reps: int = 20,
          max_seconds: float = 2.0, quantiles: Sequence[float] = (0.5, 0.2, 0.8)) -> tuple[float, ...]:
    """Time ``fn``; return the ``quantiles`` of its runtime in µs (median first by default).

    CUDA: ``triton.testing.do_bench`` (ms → µs), warm-up and rep budgets in ms derived
    from ``max_seconds``. CPU: ``warmup`` calls, then up to ``reps`` timed calls or
    ``max_seconds``, whichever comes first (at least 3).
    """
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing
        res = triton.testing.do_bench(fn, warmup=25, rep=max(50, int(max_seconds * 100)), quantiles=list(quantiles))
        return tuple(float(r) * 1e3 for r in res)
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps and (len(times) < 3 or time.perf_counter() - start < max_seconds):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return tuple(_quantile(times, q) for q in quantiles)


def bench_interleaved(fns: dict, device: torch.device | str, *, rounds: int = 5, reps: int = 3,
                      max_seconds: float = 2.0, quantiles: Sequence[float] = (0.5, 0.2, 0.8)) -> dict:
    """Time several alternatives fairly: name → quantiles in µs.

    CUDA: :func:`bench` per function. CPU: ``rounds`` rounds, each calling every function
    ``reps`` times in rotating order, so slow drifts in machine load (other processes on a
    shared box) hit all alternatives alike; stops early after ``max_seconds`` per function.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return {k: bench(f, device, max_seconds=max_seconds, quantiles=quantiles) for k, f in fns.items()}
    names = list(fns)
    for k in names:
        fns[k]()  # warm-up
    samples: dict = {k: [] for k in names}
    spent = {k: 0.0 for k in names}
    for rnd in range(rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for k in order:
            if spent[k] > max_seconds and len(samples[k]) >= 3:
                continue
            for _ in range(reps):
                t0 = time.perf_counter()
                fns[k]()
                dt = time.perf_counter() - t0
                samples[k].append(dt * 1e6)
                spent[k] += dt
    return {k: tuple(_quantile(v, q) for q in quantiles) for k, v in samples.items()}


def _quantile(xs: Sequence[float], q: float) -> float:
    if len(xs) == 1:
        return xs[0]
    if q == 0.5:
        return statistics.median(xs)
    return statistics.quantiles(xs, n=100, method="inclusive")[max(0, min(98, round(q * 100) - 1))]


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- output


def write_csv(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Append ``rows`` to the CSV at ``path`` (header = union of keys, in first-seen order)."""
    rows = list(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old: list[dict] = []
    cols: list[str] = []
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            cols = list(reader.fieldnames or [])
            old = list(reader)
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        w.writerows(old)
        w.writerows(rows)
    return path


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_table(rows: Sequence[dict], cols: Sequence[str]) -> None:
    """A plain aligned table of ``cols`` (missing values blank)."""
    cells = [[c for c in cols]] + [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for row in cells:
        print("  ".join(s.rjust(w) for s, w in zip(row, widths)), flush=True)
