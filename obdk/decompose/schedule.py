"""Decompose every target of a model: same-shaped problems batched on GPU, side by side on CPU.

:func:`decompose_targets` is the factorisation stage of :func:`obdk.prepare`: it hands each
target's weight and statistics to :func:`obdk.decompose.spectrum` (or :func:`spectra` for a
batch of same-shaped targets, or :func:`~obdk.decompose.asvd.asvd_spectrum`), and times the
sub-stages (``roots``, ``products``, ``eigen``, ``solves``).
"""
from __future__ import annotations

import contextvars
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from ..errors import ConfigError, ObdkError
from .asvd import asvd_spectrum
from .closed_form import phase_clock, spectra, spectrum

__all__ = ["decompose_targets"]


def decompose_targets(model: nn.Module, targets: list, stats: Any, config: Any, *, device=None,
                      batch: Optional[int] = None, workers: Optional[int] = None,
                      progress: bool = True, finish: Optional[Callable[[str, Any], Any]] = None
                      ) -> tuple[dict[str, Any], dict[str, float]]:
    """Full spectra of every target: ``({name: Spectrum}, {phase: seconds summed over problems})``.

    ``targets``: :class:`obdk.models.Target` list; ``stats``: the
    :class:`~obdk.calibrate.statistics.Statistics` the whitening needs (None for ``svd``);
    ``config``: the :class:`~obdk.config.LowRankConfig`. ``device`` runs the decompositions
    elsewhere (e.g. ``"cuda"``). ``batch``: same-shaped targets per batched call (default 8 on
    CUDA, where it fills the GPU, and 1 on CPU, where LAPACK runs a batch as a loop anyway);
    results are identical. ``workers``: on CPU, how many decompositions run at once, each on one
    intra-op thread (default ``torch.get_num_threads()``, restored afterwards): LAPACK's
    eigen-solvers at these sizes use a second core poorly; the largest problems start first (a
    Llama-7B layer on 2 workers: makespan 6.9 instead of 8.2 units of its 13.6, the last
    ``down_proj`` no longer running alone). On CUDA it is 1. The result is in ``targets``'
    order. ``finish(name, spectrum)``: applied to each spectrum in its worker as soon as it is computed, its
    result kept instead (e.g. :meth:`~obdk.decompose.closed_form.Spectrum.compact`: a Llama-7B layer's seven
    full-rank fp64 spectra, 2.6 GB, are then never held together). An error names the module(s) at fault.
    """
    whitening = config.resolved_whitening
    sides = config.whitening_stats
    cdtype = config.torch_compute_dtype
    where = torch.device(device) if device is not None else model.get_submodule(targets[0].name).weight.device
    on_gpu = where.type == "cuda"
    size = int(batch) if batch is not None else (8 if on_gpu else 1)
    if size < 1:
        raise ConfigError(f"prepare: batch={batch} must be ≥ 1")
    nwork = 1 if on_gpu else (int(workers) if workers is not None else torch.get_num_threads())
    if nwork < 1:
        raise ConfigError(f"prepare: workers={workers} must be ≥ 1")

    def decompose(chunk: list) -> list[tuple[str, Any]]:
        ws = [model.get_submodule(t.name).weight.detach() for t in chunk]
        cxs = [stats.cx_for(t.name) for t in chunk] if "cx" in sides else None
        cgs = [stats.cg[t.name] for t in chunk] if "cg" in sides else None
        if whitening == "asvd":
            return [(chunk[0].name, asvd_spectrum(ws[0], cxs[0], alpha=config.asvd_alpha, compute_dtype=cdtype,
                                                  device=device))]
        kw = dict(method=whitening, solver=config.solver, compute_dtype=cdtype, damping=config.damping, device=device)
        if len(chunk) == 1:
            return [(chunk[0].name, spectrum(ws[0], cx=cxs[0] if cxs else None, cg=cgs[0] if cgs else None, **kw))]
        # same-shaped targets (e.g. every layer's q_proj): one batched call per linear-algebra step
        return [(t.name, sp) for t, sp in zip(chunk, spectra(ws, cxs=cxs, cgs=cgs, **kw))]

    def run(chunk: list) -> list[tuple[str, Any]]:
        try:
            done = decompose(chunk)
            return done if finish is None else [(name, finish(name, sp)) for name, sp in done]
        except (ObdkError, ValueError) as e:  # name the module(s) at fault, keep the class
            names = ", ".join(t.name for t in chunk)
            err = type(e)(f"{names}: {e}") if isinstance(e, ObdkError) else ConfigError(f"{names}: {e}")
            raise err from e

    from tqdm.auto import tqdm
    out: dict[str, Any] = {}
    with tqdm(total=len(targets), desc="obdk decompose", unit="matrix", disable=not progress, leave=False) as bar:
        chunks = _decomposition_batches(targets, size if whitening != "asvd" else 1)
        if nwork > 1:  # longest first, so that no worker is left alone with a large problem at the end
            chunks.sort(key=lambda c: -sum(_cost(t.m, t.n) for t in c))
        with phase_clock() as phases:
            for name, sp in _run_chunks(run, chunks, nwork, bar):
                out[name] = sp
    return {t.name: out[t.name] for t in targets}, dict(phases)


def _cost(m: int, n: int) -> int:
    """Multiply-adds of one full decomposition, roughly ``p³ + p·q²`` (p = min(m, n), q = max(m, n): the p-side root
    and eigen-solve, the Gram through the q-side covariance), as ``calibrate.distributed.decomposition_cost``."""
    p, q = min(m, n), max(m, n)
    return p ** 3 + p * q * q


def _run_chunks(run, chunks: list, workers: int, bar):
    """Yield ``run(chunk)``'s (name, spectrum) pairs; with ``workers > 1`` that many chunks run at once
    in threads (ATen releases the GIL), each on one intra-op thread. The first error is re-raised."""
    if workers == 1 or len(chunks) < 2:
        for chunk in chunks:
            yield from run(chunk)
            bar.update(len(chunk))
        return
    from concurrent.futures import ThreadPoolExecutor
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ex = ThreadPoolExecutor(max_workers=min(workers, len(chunks)), thread_name_prefix="obdk-decompose")
    try:
        # each task in a copy of this context, so a phase_clock() around the call sees its phases
        futures = [ex.submit(contextvars.copy_context().run, run, chunk) for chunk in chunks]
        for chunk, fut in zip(chunks, futures):
            yield from fut.result()
            bar.update(len(chunk))
    finally:
        ex.shutdown(wait=True, cancel_futures=True)  # on an error, queued problems are not started
        torch.set_num_threads(threads)


def _decomposition_batches(targets: list, size: int) -> list[list]:
    """Targets grouped by shape (m, n), in first-seen order, cut into chunks of ≤ ``size``."""
    by_shape: dict[tuple[int, int], list] = {}
    for t in targets:
        by_shape.setdefault((t.m, t.n), []).append(t)
    return [grp[i:i + size] for grp in by_shape.values() for i in range(0, len(grp), size)]
