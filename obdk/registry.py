"""The algorithms obdk runs, as tables: methods (presets), allocators and corrections.

Each entry says, in named fields, what it needs (calibration statistics, per-component scores), whether it
streams (and why not), which :class:`~obdk.config.LowRankConfig` options it honours, and where its code is.
:class:`~obdk.config.LowRankConfig` validates names against these tables; :class:`obdk.plan.Plan`
(``allocate``, ``scores``, ``resolve``) and :func:`obdk.pipeline.prepare` read the fields instead of
branching on names, and :func:`obdk.correct.correct` runs a correction by its entry.

Code is named as ``"module:function"`` and imported on first use, so this module (and ``LowRankConfig``)
imports nothing heavy. Adding an allocator is one file (copy ``obdk/allocate/uniform.py``: the algorithm
and its ``from_config(specs, config)``) and one entry in :data:`ALLOCATORS`; adding a correction is one
file (a ``run(model, plan, config, factors, progress=...) -> (factors, damping)``, see
``obdk/correct/refit.py::run``) and one entry in :data:`CORRECTIONS`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional

__all__ = ["Method", "Allocator", "Correction", "Healing", "METHODS", "ALLOCATORS", "CORRECTIONS", "HEALINGS",
           "load", "streaming_refusal"]


def load(target: str) -> Callable:
    """The function ``"package.module:function"`` names (imported now)."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _nothing(config: Any) -> Any:
    return None


def _no_stats(config: Any) -> tuple[str, ...]:
    return ()


# =========================================================================== methods


@dataclass(frozen=True)
class Method:
    """A preset of ``LowRankConfig.method``: the whitening its decompositions use, its default allocation and
    correction, and the calibration statistics it needs."""
    name: str
    whitening: str
    alloc: str
    stats: tuple[str, ...]
    correct: Optional[str] = None


#: ``obd``'s default (global allocation + the ZS step and the K-FAC step) is the best combination measured on
#: SmolLM2-135M (benchmarks/results/allocation_smollm2.csv).
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("svd", whitening="svd", alloc="uniform", stats=()),
    Method("svd-llm", whitening="svd-llm", alloc="uniform", stats=("cx",)),
    Method("asvd", whitening="asvd", alloc="uniform", stats=("cx",)),
    Method("obd", whitening="obd", alloc="global", stats=("cx", "cg"), correct="zs+kfac"),
    Method("zs-svd", whitening="svd-llm", alloc="zero-sum", stats=("cx", "grad")),
    Method("bsi", whitening="svd-llm", alloc="bsi", stats=("cx", "grad")),
)}


# =========================================================================== allocators


@dataclass(frozen=True)
class Allocator:
    """A rank allocation (``LowRankConfig.alloc``).

    * ``run``: ``"module:function"`` of ``(specs: list[MatrixSpec], config) -> Allocation``;
    * ``honours``: the config options it reads besides ``keep``; ``refuses``: options it has no use for, refused
      when a user sets them (the CLI) or warned about (the Python API), and ``refuses_why`` says why;
    * ``stats(config)``: the calibration statistics it needs beyond the method's;
    * ``scores``: ``"module:function"`` of ``(plan, model, config) -> {name: scores}``, the per-component scores it
      allocates from (None: the spectra's eigenvalues are enough), cached per ``score_key(config)``;
      ``layer_scores``: ``"module:function"`` of ``(model, data, spectra, stats) -> {name: scores}``, the same scores
      of one decoder layer during a streamed sweep; ``spec``: ``"module:function"`` of ``(scores of one target,
      config, costs) -> {MatrixSpec field: value}``;
    * ``windows``: its scores run the model on the calibration windows (``prepare`` keeps them);
    * ``stream_refusal(config)``: why it cannot run layer-streamed with ``config``, or None;
    * ``any_component``: it may keep any subset of a spectrum's components (BSI), not a leading rank: a streamed
      plan then keeps its spectra whole instead of cut to break-even (:meth:`~obdk.decompose.closed_form.Spectrum.compact`).
    """
    name: str
    run: str
    honours: tuple[str, ...] = ()
    refuses: tuple[str, ...] = ()
    refuses_why: str = ""
    stats: Callable[[Any], tuple[str, ...]] = _no_stats
    scores: Optional[str] = None
    layer_scores: Optional[str] = None
    spec: Optional[str] = None
    score_key: Optional[Callable[[Any], Hashable]] = None
    windows: bool = False
    stream_refusal: Callable[[Any], Optional[str]] = _nothing
    any_component: bool = False

    def key(self, config: Any) -> Hashable:
        """The cache key of this allocation's scores under ``config``."""
        return self.name if self.score_key is None else self.score_key(config)


def _zero_sum_stats(config: Any) -> tuple[str, ...]:
    return ("cx", "grad")  # (the ZS correction takes its own gradient at the truncation)


def _bsi_stats(config: Any) -> tuple[str, ...]:
    return ("cx", "grad", "cg") if config.bsi_curvature == "kfac" else ("cx", "grad")


def _bsi_key(config: Any) -> Hashable:
    """BSI's scores depend on the estimator and, for the probed ones, its settings."""
    return ("bsi", config.bsi_curvature) + (() if config.bsi_curvature in ("kfac", "fisher") else
                                            (config.probes, config.eps, config.probe_tol, config.max_probes))


def _bsi_refusal(config: Any) -> Optional[str]:
    if config.bsi_curvature != "kfac":
        return (f"alloc 'bsi' with bsi_curvature {config.bsi_curvature!r} runs the whole model at once (its "
                f"probes or Fisher pass), which does not stream; bsi_curvature 'kfac' does")
    if config.fisher != "empirical":
        return ("alloc 'bsi' with fisher 'true' takes the loss gradient in σ in a whole-model pass, which does not "
                "stream; fisher 'empirical' does")
    return None


ALLOCATORS: dict[str, Allocator] = {a.name: a for a in (
    Allocator("uniform", run="obdk.allocate.uniform:from_config", honours=("rank_multiple",)),
    Allocator("global", run="obdk.allocate.knapsack:from_config", honours=("floor", "rank_multiple")),
    Allocator("zero-sum", run="obdk.allocate.zerosum:from_config", refuses=("floor", "rank_multiple"),
              refuses_why="removes components one at a time (ZS-SVD)", stats=_zero_sum_stats,
              scores="obdk.scores:plan_zero_sum", layer_scores="obdk.scores:layer_zero_sum",
              spec="obdk.allocate.zerosum:spec_fields"),
    Allocator("bsi", run="obdk.allocate.bsi:from_config",
              honours=("floor", "rank_multiple", "bsi_order", "bsi_terms", "bsi_curvature", "probes", "eps",
                       "probe_tol", "max_probes"),
              stats=_bsi_stats, scores="obdk.scores:plan_bsi", layer_scores="obdk.scores:layer_bsi",
              spec="obdk.allocate.bsi:spec_fields", score_key=_bsi_key, windows=True, stream_refusal=_bsi_refusal,
              any_component=True),
)}


# =========================================================================== corrections


@dataclass(frozen=True)
class Correction:
    """A correction after truncation (``LowRankConfig.correct``).

    * ``run``: ``"module:function"`` of ``(model, plan, config, factors, *, progress) -> (factors, damping)``;
    * ``stream_refusal``: why it cannot run on a layer-streamed plan (None: it streams, reading each layer's
      statistics kept by the streamed ``prepare``, which keeps them when a correction that streams is asked for);
    * ``whitenings``: the whitenings it works under (None: any), and ``whitening_why`` says why.
    """
    name: str
    run: str
    stream_refusal: Optional[str] = None
    whitenings: Optional[tuple[str, ...]] = None
    whitening_why: str = ""


CORRECTIONS: dict[str, Correction] = {c.name: c for c in (
    Correction("zs", run="obdk.correct.steps:run"),
    Correction("kfac", run="obdk.correct.steps:run"),
    Correction("zs+kfac", run="obdk.correct.steps:run"),
    Correction("zs-guarded", run="obdk.correct.guarded:run",
               stream_refusal="correct 'zs-guarded' runs the whole model on its held-out windows at each step size, "
                              "which does not stream; 'zs' does"),
    Correction("seq", run="obdk.correct.refit:run",
               stream_refusal="correct 'seq' refits on the compressed model's inputs in a whole-model pass, which "
                              "does not stream",
               whitenings=("svd-llm", "obd"), whitening_why="refits under input whitening"),
)}


# =========================================================================== healings


@dataclass(frozen=True)
class Healing:
    """A healing after the correction (``LowRankConfig.heal``; :mod:`obdk.heal`).

    * ``run``: ``"module:function"`` of ``(model, plan, config, factors, ids, mask, *, windows, train_windows, held_out, schedule,
      progress) -> (healed factors, record, per-layer records or None)``; ``stream_refusal``: why it cannot run on a layer-streamed plan
      (None: it streams);
    * ``steps``, ``lr``: the defaults of ``heal_steps`` (per decoder layer for ``layer``, in all for ``e2e``) and
      ``heal_lr`` (Adam's step relative to each factor's RMS); ``eval_every`` steps between held-out evaluations,
      ``patience`` evaluations without a new best before it stops. The defaults were chosen by measurement on
      SmolLM2-135M (benchmarks/RESULTS.md, "Healing").
    """
    name: str
    run: str
    steps: int
    lr: float
    eval_every: int
    patience: int
    stream_refusal: Optional[str] = None


HEALINGS: dict[str, Healing] = {h.name: h for h in (
    Healing("layer", run="obdk.heal:run_layerwise", steps=16, lr=1e-2, eval_every=8, patience=2),
    Healing("e2e", run="obdk.heal:run_e2e", steps=32, lr=1e-3, eval_every=8, patience=2,
            stream_refusal="end-to-end healing trains every decoder layer at once, which does not stream; "
                           "heal='layer' does"),
)}


def streaming_refusal(config: Any) -> Optional[str]:
    """Why ``config`` cannot run layer-streamed (``prepare(stream=True)``), or None if it can.

    Everything else streams: the calibration, the decompositions, zero-sum's and BSI's K-FAC scores
    (layer by layer, from each layer's statistics and gradients) and the ``zs``/``kfac`` corrections
    (their gradient passes stream, the K-FAC step reads one layer's statistics at a time).
    """
    why = ALLOCATORS[config.resolved_alloc].stream_refusal(config)
    if why is None and config.resolved_correct is not None:
        why = CORRECTIONS[config.resolved_correct].stream_refusal
    if why is None and config.resolved_heal is not None:
        why = HEALINGS[config.resolved_heal].stream_refusal
    return why
