"""Timing: medians of repeated calls, device synchronisation, memory between runs."""
from __future__ import annotations

import gc
import resource
import statistics
import time
from typing import Callable, Sequence

import torch


def sync(device: torch.device | str) -> None:
    """Wait for queued CUDA work, so that a wall-clock time includes it (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def free() -> None:
    """Collect garbage and hand freed memory back (heap pages to the OS, cached CUDA blocks).

    Called between runs, so that one run's leftovers neither count in the next one's memory
    nor slow it down.
    """
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_rss_mib() -> float:
    """The process's resident-memory high-water mark (``ru_maxrss``; it never decreases)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 3, reps: int = 20,
          max_seconds: float = 2.0, quantiles: Sequence[float] = (0.5, 0.2, 0.8)) -> tuple[float, ...]:
    """Time ``fn``; return the ``quantiles`` of its runtime in µs (median first by default).

    CUDA: ``triton.testing.do_bench`` (ms → µs; L2 flushed between reps), warm-up and rep
    budgets in ms derived from ``max_seconds``. CPU: ``warmup`` calls, then up to ``reps``
    timed calls or ``max_seconds``, whichever comes first (at least 3).
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
    return tuple(quantile(times, q) for q in quantiles)


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
    return {k: tuple(quantile(v, q) for q in quantiles) for k, v in samples.items()}


def median_seconds(fn: Callable[[], object], device: torch.device | str, reps: int) -> float:
    """Median wall seconds of ``fn`` over ``reps`` runs, after one warm-up run (synchronised)."""
    fn()
    sync(device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def quantile(xs: Sequence[float], q: float) -> float:
    if len(xs) == 1:
        return xs[0]
    if q == 0.5:
        return statistics.median(xs)
    return statistics.quantiles(xs, n=100, method="inclusive")[max(0, min(98, round(q * 100) - 1))]
