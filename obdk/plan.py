"""``Plan``: a model's calibrated statistics and full spectra, from which any ratio is allocated, truncated,
corrected, packed (:meth:`Plan.apply`) or written (:meth:`Plan.save`) without recalibrating.

:func:`obdk.pipeline.prepare` makes one. What an allocation needs (its scores, its ``MatrixSpec`` fields, its
function) and what a correction needs come from the tables of :mod:`obdk.registry`; the plan never names an
algorithm.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn as nn

from .arguments import check_model
from .calibrate.layer_statistics import LayerStatistics
from .config import APPLY_FIELDS, DEFAULT_FLOOR, DEFAULT_RANK_MULTIPLE, LowRankConfig
from .decompose.spectrum_store import SpectrumStore
from .decompose.whitened import spectrum_as_svd
from .errors import ConfigError
from .models import Target, set_module
from .nn import LowRankLinear
from .registry import ALLOCATORS, load, streaming_refusal
from .report import CompressionReport, ModuleReport, StageTimer, count_params
from .stream import distributed as dist
from .stream.options import Streaming

log = logging.getLogger(__name__)

__all__ = ["Plan", "STREAM_SHARD_BYTES"]

#: shard size of a streamed plan's :meth:`Plan.save`: the writer holds one shard's tensors on host memory until it is
#: written, outside ``max_host_memory`` (``save_pretrained``'s 4 GiB would be the largest single item of such a run)
STREAM_SHARD_BYTES = 1 << 30

#: the defaults of the options an allocation may refuse (``Allocator.refuses``)
_DEFAULTS = {"floor": DEFAULT_FLOOR, "rank_multiple": DEFAULT_RANK_MULTIPLE}


@dataclass
class Plan:
    """Calibrated statistics and full spectra of every target: allocate any ``keep`` cheaply.

    * ``config``: the :class:`LowRankConfig` the plan was prepared with (fixes the whitening, the
      statistics and the decompositions); :meth:`apply` changes only :data:`~obdk.config.APPLY_FIELDS`.
    * ``targets``: the targeted Linears in forward order; ``spectra``: ``{name: Spectrum}`` (a dict for a
      resident plan; for a streamed one a :class:`~obdk.decompose.spectrum_store.SpectrumStore`, each layer's factors on
      host memory or in a scratch file, the eigenvalues and metadata on host: the allocation reads no file, a
      truncation one layer file at a time; :meth:`close` removes its files).
    * ``stats``: the :class:`~obdk.calibrate.statistics.Statistics` (None for plain SVD).
    * ``calibration``: the calibration fingerprint (dataset, samples, seqlen, seed, hashes).
    * ``data``: the calibration windows (``input_ids`` [N, T], ``attention_mask``), kept for the
      corrections and the gradient scores; None when the plan needs none.
    * ``timer``: the stages of :func:`prepare`; ``coverage``: :func:`obdk.models.coverage`.
    * ``stats_kept``: False when a streamed :func:`prepare` decomposed each layer during its sweep
      and dropped its statistics (then corrections that read ``C_x``/``C_g`` and zero-sum cannot be
      applied from this plan). A streamed plan prepared for a ``kfac``-type correction keeps them
      layer by layer instead (``stats`` is a :class:`~obdk.calibrate.layer_statistics.LayerStatistics`).
    * ``stream``: None for a resident plan; for a streamed one the :class:`~obdk.stream.options.Streaming` of its
      passes (its :class:`~obdk.stream.budget.HostBudget`, scratch directory, batch size, device, source), which the
      corrections' gradient passes reuse, so that they stream too; prepared under ``torch.distributed`` with a
      correction, also its ``owners`` ({group key: rank}) and ``world``: each rank's ``stats`` hold only its own
      matrices, and the corrections run on every rank together.
    """
    config: LowRankConfig
    targets: list[Target]
    spectra: Mapping[str, Any]
    stats: Any
    calibration: Optional[dict]
    timer: StageTimer
    data: Any = None
    coverage: dict = field(default_factory=dict)
    progress: bool = True
    stats_kept: bool = True
    stream: Optional[Streaming] = None
    _scores: dict = field(default_factory=dict, repr=False)
    _healing: dict = field(default_factory=dict, repr=False)  # the last application's healing record, for its report

    # ------------------------------------------------------------------ configuration
    def resolve(self, keep: Optional[float] = None, **overrides: Any) -> LowRankConfig:
        """The plan's config with ``keep`` and ``overrides`` (fields of :data:`~obdk.config.APPLY_FIELDS`), validated.

        A field that the decompositions depend on (``method``, ``whitening``, ``damping``, …)
        cannot change here: :class:`~obdk.errors.ConfigError` naming it.
        """
        changes = {k: v for k, v in overrides.items() if v is not None}
        if keep is not None:
            changes["keep"] = keep
        fixed = sorted(set(changes) - set(APPLY_FIELDS))
        names = {f.name for f in dataclasses.fields(LowRankConfig)}
        unknown = [k for k in fixed if k not in names]
        if unknown:
            raise ConfigError(f"Plan.apply: unknown option(s) {unknown}; it takes {', '.join(APPLY_FIELDS)}")
        fixed = [k for k in fixed if changes[k] != getattr(self.config, k)]
        if fixed:
            raise ConfigError(f"Plan.apply: {', '.join(fixed)} fixed by prepare() (the statistics and spectra depend "
                              f"on it); call obdk.prepare again with it")
        cfg = self.config.replace(**changes) if changes else self.config
        if self.stream is not None:
            why = self._streamed_refusal(cfg)
            if why is not None:
                raise ConfigError(f"Plan.apply: alloc={cfg.resolved_alloc!r} correct={cfg.resolved_correct!r} on a "
                                  f"streamed plan: {why}; prepare it with that alloc/correct, or without stream")
        if cfg.resolved_correct is not None and self.data is None:
            raise ConfigError(f"Plan.apply: correct={cfg.resolved_correct!r} runs the model on the calibration "
                              f"windows, and this plan has none (prepare it with calibration=...)")
        return cfg

    def _streamed_refusal(self, cfg: LowRankConfig) -> Optional[str]:
        """Why this streamed plan cannot apply ``cfg`` (:mod:`obdk.registry`'s fields), or None."""
        why = streaming_refusal(cfg)
        alloc = ALLOCATORS[cfg.resolved_alloc]
        if why is None and alloc.scores is not None and alloc.key(cfg) not in self._scores:
            why = (f"its per-component scores are computed layer by layer during a streamed prepare() asked for "
                   f"alloc={cfg.resolved_alloc!r}, and this plan was not")
        if why is None and cfg.resolved_correct is not None and not isinstance(self.stats, LayerStatistics):
            why = ("its step re-truncates in each layer's whitening (and kfac solves with C_x/C_g), statistics "
                   "a streamed prepare() keeps layer by layer only when asked for a correction; this plan "
                   "dropped them")
        return why

    # ------------------------------------------------------------------ scores
    def scores(self, alloc: str, model: Optional[nn.Module] = None, config: Optional[LowRankConfig] = None
               ) -> dict[str, Any]:
        """Per-component scores the allocation ``alloc`` needs (``zero-sum``, ``bsi``), computed once per estimator.

        What each allocation scores with is its :data:`obdk.registry.ALLOCATORS` entry's ``scores``: ``zero-sum``
        ``{name: δ [k]}`` from the calibration's summed weight gradients (:func:`obdk.scores.plan_zero_sum`); ``bsi``
        ``{name: BSIScores}`` by ``config``'s (default the plan's) ``bsi_curvature``, ``probes``, ``eps``,
        ``probe_tol``, ``max_probes`` (:func:`obdk.scores.plan_bsi`; all but ``kfac`` run ``model``, the dense model
        or a dense copy, on the calibration windows). Cached per allocation and estimator settings.
        """
        cfg = config or self.config
        entry = ALLOCATORS.get(alloc)
        if entry is None or entry.scores is None:
            raise ConfigError(f"Plan.scores: allocation {alloc!r} needs no scores")
        key = entry.key(cfg)
        if key not in self._scores:
            with self.timer("scores"):
                self._scores[key] = load(entry.scores)(self, model, cfg)
        return self._scores[key]

    # ------------------------------------------------------------------ allocation, truncation
    def allocate(self, keep: Optional[float] = None, alloc: Optional[str] = None, *,
                 model: Optional[nn.Module] = None, config: Optional[LowRankConfig] = None):
        """Ranks for ``keep`` (default the config's) → an :class:`obdk.allocate.Allocation`, by the allocation's
        :data:`obdk.registry.ALLOCATORS` entry (its scores, its ``MatrixSpec`` fields, its function)."""
        from . import allocate as A
        cfg = config or self.resolve(keep, alloc=alloc)
        entry = ALLOCATORS[cfg.resolved_alloc]
        scores = self.scores(entry.name, model, cfg) if entry.scores is not None else None
        specs = []
        for t in self.targets:
            kw = {"costs": (self.eigenvalues(t.name) / 2).double().cpu()}
            if scores is not None:
                kw.update(load(entry.spec)(scores[t.name], cfg, kw["costs"]))
            specs.append(A.MatrixSpec(t.name, t.m, t.n, **kw))
        ignored = [f for f in entry.refuses if getattr(cfg, f) != _DEFAULTS[f]]
        if ignored:
            log.warning("alloc %r %s: %s do not apply to it", entry.name, entry.refuses_why,
                        " and ".join(f"{f}={getattr(cfg, f)}" for f in ignored))
        return load(entry.run)(specs, cfg)

    def eigenvalues(self, name: str) -> torch.Tensor:
        """Target ``name``'s eigenvalues [k] (descending, loss units), without loading its factors."""
        if isinstance(self.spectra, SpectrumStore):
            return self.spectra.eigenvalues(name)
        return self.spectra[name].eigenvalues

    def damping(self, name: str) -> dict:
        """The relative damping ``{"cx": α, "cg": α}`` target ``name``'s decomposition used (no factors loaded)."""
        if isinstance(self.spectra, SpectrumStore):
            return self.spectra.meta(name)["damping"]
        return dict(self.spectra[name].damping)

    def factors(self, name: str, rank: int, kept_indices=None):
        """``(a [r, n], b [m, r], predicted_loss)`` of target ``name`` at ``rank`` (or exactly ``kept_indices``).

        On the device of the plan's factors: the weight's for a resident plan, the CPU for a streamed one
        (whose :class:`~obdk.decompose.spectrum_store.SpectrumStore` loads ``name``'s factors alone, from its layer's file
        when spilled); :meth:`apply` moves them to the model's weight."""
        spec = self.spectra[name]
        if kept_indices is not None:
            a, b = spectrum_as_svd(spec).factors(indices=kept_indices)
            dropped = torch.ones(spec.eigenvalues.numel(), dtype=torch.bool)
            dropped[torch.as_tensor(kept_indices, dtype=torch.long)] = False
            pred = 0.5 * float(spec.eigenvalues[dropped].sum())
        else:
            fac = spec.truncate(int(rank), keep_dense_at_break_even=False)
            a, b, pred = fac.a, fac.b, float(fac.predicted_loss)
        return a, b, pred

    def close(self) -> None:
        """Release what a streamed plan keeps: its spectra's and its kept statistics' host memory and scratch
        files (also done when the plan is garbage-collected). A resident plan has nothing to release."""
        if isinstance(self.spectra, SpectrumStore):
            self.spectra.close()
        if isinstance(self.stats, LayerStatistics):
            self.stats.free()

    # ------------------------------------------------------------------ apply
    def _truncate_and_correct(self, model: nn.Module, cfg: LowRankConfig, timer: StageTimer, allocation, *,
                              lazy: bool = False, home: bool = True, heal_data: Any = None):
        """Every target's truncated (and, with ``cfg``'s correction, corrected; with its healing, healed) factors at
        ``allocation``'s ranks.

        Returns ``(kept_map, factors {name: (a [r, n], b [m, r], predicted)}, extra_damping)``.
        ``lazy`` (no correction or healing only): no factors are made here (:meth:`save` truncates each target as it
        writes it, so that one target's factors are in memory at a time). ``home``: the factors on the device
        of the model's weight (else where the plan keeps them: CPU for a streamed plan). ``heal_data``: the healing
        windows (None: the calibration windows)."""
        from .correct import correct
        kept_map = (allocation.meta or {}).get("kept_indices", {})  # (an allocation that keeps index sets: BSI's)
        factors: Mapping[str, tuple] = {}
        extra_damping: dict = {}
        self._healing = {}
        if lazy and not cfg.resolved_correct and not cfg.resolved_heal:
            return kept_map, factors, extra_damping
        if cfg.resolved_heal and heal_data is None and self.data is None:
            raise ConfigError(f"Plan.apply: heal={cfg.resolved_heal!r} trains on windows, and this plan kept no "
                              f"calibration windows; pass heal_data=... or prepare it with calibration=...")
        # streamed in one process: the first step truncates each target as its layer comes up, and the steps keep
        # their results layer by layer (FactorStore): the compressed model is never held whole
        if ((cfg.resolved_correct or cfg.resolved_heal) and self.stream is not None
                and not self.stream.owner_reduced):
            from .correct import Truncations
            ranked = [t.name for t in self.targets if allocation.ranks.get(t.name) is not None]
            factors = Truncations(ranked, lambda n: self.factors(n, allocation.ranks[n], kept_map.get(n)))
        else:
            factors = self._truncations(model, allocation, kept_map, timer, home)
        if factors and cfg.resolved_correct:
            with timer("correction"):
                factors, extra_damping = correct(model, self, cfg, factors, progress=self.progress)
            self._drop_cached()
        if cfg.resolved_heal:
            from .heal import heal
            with timer("healing"):
                healed, self._healing = heal(model, self, cfg, factors,
                                             data=heal_data if heal_data is not None else self.data,
                                             progress=self.progress)
            if healed is not factors:
                _free(factors)
            factors = healed
            self._drop_cached()
        if isinstance(factors, dict) and any(f[0].is_meta for f in factors.values()):
            raise ConfigError("Plan.apply: this rank holds the shapes of the factors only (a streamed plan prepared "
                              "under torch.distributed gives them to rank 0, or to every rank through a correction "
                              "run on all ranks together); apply it on rank 0")
        return kept_map, factors, extra_damping

    def _truncations(self, model: nn.Module, allocation, kept_map: dict, timer: StageTimer, home: bool) -> dict:
        """``{name: (a, b, predicted)}`` of every ranked target (on its weight's device with ``home``)."""
        factors: dict[str, tuple] = {}
        with timer("truncation"):
            for t in self.targets:
                rank = allocation.ranks.get(t.name)
                if rank is not None:
                    a, b, pred = self.factors(t.name, rank, kept_map.get(t.name))
                    if home and not a.is_meta:  # (meta: a rank that holds their shapes only, refused below)
                        dev = model.get_submodule(t.name).weight.device
                        a, b = a.to(dev), b.to(dev)
                    factors[t.name] = (a, b, pred)
        self._drop_cached()
        return factors

    def _module_report(self, t: Target, rank: Optional[int], pred: float, extra_damping: dict,
                       seconds: float) -> ModuleReport:
        damping = self.damping(t.name)
        damping.update(extra_damping.get(t.name, {}))
        if rank is None:
            return ModuleReport(t.name, t.m, t.n, None, t.m * t.n, t.m * t.n, 0.0, damping, seconds)
        return ModuleReport(t.name, t.m, t.n, int(rank), int(rank) * (t.m + t.n), t.m * t.n, pred, damping, seconds)

    def _report(self, cfg: LowRankConfig, mods: list, allocation, before: int, after: int,
                timer: StageTimer) -> CompressionReport:
        stages = dict(self.timer.to_dict())
        stages.update(timer.to_dict())
        record = cfg.to_dict()
        record["alloc"] = cfg.resolved_alloc  # record what was used, not "default"
        record["correct"] = cfg.resolved_correct or "none"
        record["heal"] = cfg.resolved_heal or "none"
        return CompressionReport(
            config=record, modules=mods,
            targeted_params_before=sum(m.dense_params for m in mods),
            targeted_params_after=sum(m.params for m in mods),
            model_params_before=before, model_params_after=after,
            predicted_loss=sum(m.predicted_loss for m in mods),
            stages=stages, calibration=self.calibration,
            allocation={"strategy": allocation.strategy, "budget": allocation.budget,
                        "params": allocation.params, "predicted_loss": allocation.predicted_loss,
                        **{k: v for k, v in (allocation.meta or {}).items()
                           if isinstance(v, (int, float, str, bool)) or v is None}},
            coverage=self.coverage, healing=dict(self._healing),
        )

    # ------------------------------------------------------------------ under torch.distributed
    def _agreed_allocation(self, cfg: LowRankConfig, model: nn.Module, timer: StageTimer):
        """``cfg``'s allocation. Under a process group (a plan prepared on every rank) every rank computes it and the
        ranks must agree (a collective; :class:`~obdk.errors.DataError` naming the first rank that differs)."""
        with timer("allocation"):
            allocation = self.allocate(model=model, config=cfg)
        if dist.world()[1] > 1:
            dist.same_on_every_rank(allocation.ranks, f"the allocation at keep {cfg.keep:g}")
        return allocation

    def _together(self, cfg: LowRankConfig) -> bool:
        """The correction runs on every rank together: an owner-reduced streamed plan, each rank holding the
        statistics of the matrices it owns (each owner steps its own)."""
        return bool(cfg.resolved_correct and self.stream is not None and self.stream.owner_reduced)

    def _everywhere(self, model: nn.Module, cfg: LowRankConfig, timer: StageTimer, allocation, heal_data=None):
        """Under a process group, every rank's truncated (and corrected) factors: the correction on every rank
        together (:meth:`_together`), else rank 0's, made as in one process and broadcast from it."""
        if self._together(cfg):
            return self._truncate_and_correct(model, cfg, timer, allocation, heal_data=heal_data)[1:]
        made = _on_rank0(lambda: self._truncate_and_correct(model, cfg, timer, allocation, heal_data=heal_data)[1:])
        local = {n: (*f, made[1].get(n)) for n, f in made[0].items()} if made is not None else {}
        ranked = [t.name for t in self.targets if allocation.ranks.get(t.name) is not None]
        got = dist.broadcast_factors(local, {n: 0 for n in ranked},
                                     {n: model.get_submodule(n).weight for n in ranked})
        return {n: g[:3] for n, g in got.items()}, {n: g[3] for n, g in got.items() if g[3] is not None}

    # ------------------------------------------------------------------ apply, save
    def apply(self, model: nn.Module, keep: Optional[float] = None, *, model_params_before: Optional[int] = None,
              heal_data: Any = None, **overrides: Any) -> CompressionReport:
        """Swap each target of ``model`` for a ``LowRankLinear`` at the allocated rank (or keep it dense).

        ``model``: the model the plan was prepared on or a copy of it (dense). ``keep`` and
        ``overrides`` (``alloc``, ``floor``, ``rank_multiple``, ``correct``, ``probes``, ``eps``,
        ``bsi_order``) change this application only, validated once through the config
        (:meth:`resolve`). ``heal`` (an override too) trains the factors after the correction (:mod:`obdk.heal`) on
        ``heal_data`` (windows: a ``CalibrationData``, or token ids [N, T]; None: the calibration windows).
        Returns the :class:`CompressionReport`; pass it to :func:`obdk.save_pretrained`
        (``report=``) to write it with the checkpoint.
        To write the compressed checkpoint without building the compressed model, see :meth:`save`.

        Under ``torch.distributed`` (a plan prepared on every rank, e.g. the same script under ``torchrun``) every
        rank calls it and every rank gets the same compressed model: the ranks allocate and must agree; a correction
        of an owner-reduced streamed plan runs on every rank together; otherwise rank 0 truncates (and corrects) as
        one process and its factors are broadcast.
        """
        if self.stream is not None and self.stream.source is not None:
            raise ConfigError("Plan.apply: this plan's model is a skeleton whose decoder layers live in the "
                              "checkpoint's shards (prepare(source=...)); write the compressed model with "
                              "Plan.save(model, out_dir)")
        check_model("Plan.apply", model)
        cfg = self.resolve(keep, **overrides)
        timer = StageTimer()
        before = model_params_before if model_params_before is not None else count_params(model)
        allocation = self._agreed_allocation(cfg, model, timer)
        if dist.world()[1] > 1:
            factors, extra_damping = self._everywhere(model, cfg, timer, allocation, heal_data)
        else:
            _, factors, extra_damping = self._truncate_and_correct(model, cfg, timer, allocation, heal_data=heal_data)
        mods = self._pack(model, allocation, factors, extra_damping, timer)
        _free(factors)
        return self._report(cfg, mods, allocation, before, count_params(model), timer)

    def _pack(self, model: nn.Module, allocation, factors: Mapping[str, tuple], extra_damping: dict,
              timer: StageTimer) -> list[ModuleReport]:
        """Every ranked target of ``model`` replaced by a ``LowRankLinear`` of its factors; the module reports."""
        mods: list[ModuleReport] = []
        with timer("packing"):
            for t in self.targets:
                t0 = time.perf_counter()
                rank = allocation.ranks.get(t.name)
                if rank is None:
                    mods.append(self._module_report(t, None, 0.0, extra_damping, time.perf_counter() - t0))
                    continue
                lin = model.get_submodule(t.name)
                a, b, pred = factors[t.name]
                bias = lin.bias.detach() if lin.bias is not None else None
                new = LowRankLinear.from_factors(a.to(lin.weight.dtype), b.to(lin.weight.dtype), bias)
                new.to(lin.weight.device)
                set_module(model, t.name, new)
                mods.append(self._module_report(t, rank, pred, extra_damping, time.perf_counter() - t0))
        return mods

    def save(self, model: nn.Module, save_dir, keep: Optional[float] = None, *, tokenizer=None,
             overwrite: bool = False, source_dir=None, max_shard_bytes: Optional[int] = None,
             model_params_before: Optional[int] = None, release: bool = False, heal_data: Any = None,
             **overrides: Any) -> CompressionReport:
        """Write ``model`` compressed at ``keep`` to the checkpoint ``save_dir``, tensor by tensor, without
        building the compressed model: ``model`` stays as it is (dense).

        The same checkpoint as :meth:`apply` followed by :func:`obdk.save_pretrained` (the same tensors,
        ranks, ``config.json`` and report), written by :func:`obdk.io.writer.write_model` in the model's
        ``state_dict`` order: each shard goes to disk as it fills. Without a correction each target is
        truncated as it is written (one target's factors in memory at a time); with one, a streamed plan in
        one process reads them from the correction's :class:`~obdk.correct.factor_store.FactorStore` (layer by
        layer, under the plan's host budget), and a resident plan holds every target's corrected factors
        (the compressed model's size) until written. For a skeleton
        (``prepare(source=...)``) every decoder-layer tensor that is not a compressed target's (norms,
        kept-dense Linears, biases) is read from the checkpoint's shards as it is written. ``keep``,
        ``overrides``: as for :meth:`apply`; ``tokenizer``, ``overwrite``, ``source_dir``: as for
        :func:`obdk.save_pretrained` (``max_shard_bytes`` default its 4 GiB; for a streamed plan
        :data:`STREAM_SHARD_BYTES`, 1 GiB, the host memory the writer's pending shard takes). ``release`` (a
        streamed plan's last use): each decoder layer's kept factors are released as soon as its targets are
        written (their scratch file removed), so the scratch shrinks while the checkpoint grows (Llama-7B in fp32:
        0.81 GB of factors per layer against 0.65 GB written); the plan can allocate and report afterwards but not
        cut ranks again. ``heal_data``: the healing windows of ``heal`` (see :meth:`apply`). Returns the
        :class:`CompressionReport` (also in the checkpoint's ``obdk_report.json``).

        Under ``torch.distributed`` (the same script on every rank, e.g. under ``torchrun``) every rank calls it and
        one checkpoint is written, by rank 0: the ranks allocate and must agree; a correction of an owner-reduced
        streamed plan runs on every rank together; everything else runs on rank 0 as in one process. Every rank
        returns rank 0's report; an error on rank 0 is raised on every rank.
        """
        check_model("Plan.save", model, meta_ok=True)  # (a skeleton's meta tensors are read from its source)
        cfg = self.resolve(keep, **overrides)
        timer = StageTimer()
        before = model_params_before if model_params_before is not None else count_params(model)
        allocation = self._agreed_allocation(cfg, model, timer)
        made = None
        if self._together(cfg) and dist.world()[1] > 1:  # every rank steps its own matrices; rank 0 writes
            made = self._truncate_and_correct(model, cfg, timer, allocation, lazy=True, home=False,
                                              heal_data=heal_data)

        def write() -> CompressionReport:
            got = made or self._truncate_and_correct(model, cfg, timer, allocation, lazy=True, home=False,
                                                     heal_data=heal_data)
            return self._write(model, save_dir, cfg, allocation, got, timer, before, tokenizer=tokenizer,
                               overwrite=overwrite, source_dir=source_dir, max_shard_bytes=max_shard_bytes,
                               release=release)

        if dist.world()[1] == 1:
            return write()
        report = _on_rank0(write, share=True)
        if made is not None:
            _free(made[1])
        return report

    def _write(self, model: nn.Module, save_dir, cfg: LowRankConfig, allocation, made: tuple, timer: StageTimer,
               before: int, *, tokenizer, overwrite: bool, source_dir, max_shard_bytes: Optional[int],
               release: bool = False) -> CompressionReport:
        """:meth:`save`'s checkpoint, from ``made`` = ``(kept_map, factors, extra_damping)``."""
        from .io.format import SHARD_BYTES
        from .io.writer import write_model
        kept_map, factors, extra_damping = made
        source = self.stream.source if self.stream is not None else None
        ranks = allocation.ranks
        by_name = {t.name: t for t in self.targets}
        mods: dict[str, ModuleReport] = {}
        done_with = self._releaser(ranks) if release else (lambda mod: None)

        def real(key: str, t: torch.Tensor) -> torch.Tensor:
            return source.tensor(key, "cpu", t.dtype, shape=tuple(t.shape)) if t.is_meta else t

        def lowrank(mod: str):
            def write(entries: dict) -> tuple:  # the module's factors (+ its bias) at its weight's place
                t0 = time.perf_counter()
                if mod not in factors:
                    a, b, pred = self.factors(mod, ranks[mod], kept_map.get(mod))
                else:  # (a dict's entry is released as it is written)
                    a, b, pred = factors.pop(mod) if isinstance(factors, dict) else factors[mod]
                w, bias = entries["weight"], entries.get("bias")
                bias = None if bias is None else real(f"{mod}.bias", bias).to(w.dtype)
                mods[mod] = self._module_report(by_name[mod], ranks[mod], pred, extra_damping,
                                                time.perf_counter() - t0)
                done_with(mod)
                return a.to(w.dtype), b.to(w.dtype), bias
            return write

        done: list[CompressionReport] = []

        def report() -> CompressionReport:  # once every tensor is written (before the checkpoint is swapped in)
            self._drop_cached()
            mods.update({t.name: self._module_report(t, None, 0.0, extra_damping, 0.0)
                         for t in self.targets if ranks.get(t.name) is None})
            mods_list = [mods[t.name] for t in self.targets]
            after = before - sum(m.dense_params - m.params for m in mods_list)
            done.append(self._report(cfg, mods_list, allocation, before, after, timer))
            return done[0]

        with timer("save"):
            write_model(model, save_dir, factors={t.name: lowrank(t.name) for t in self.targets
                                                  if ranks.get(t.name) is not None},
                        tensor=real, tokenizer=tokenizer, report=report,
                        max_shard_bytes=max_shard_bytes or (STREAM_SHARD_BYTES if self.stream is not None
                                                            else SHARD_BYTES), overwrite=overwrite,
                        source_dir=source_dir)
        _free(factors)
        done[0].stages.update(timer.to_dict())
        return done[0]

    def _releaser(self, ranks: dict) -> Callable[[str], None]:
        """``done_with(module)`` for :meth:`save` with ``release``: a streamed plan's decoder layer's kept factors
        are released once its last low-rank target is written (layers with none at once); nothing for a resident
        plan."""
        store = self.spectra if isinstance(self.spectra, SpectrumStore) else None
        if store is None:
            return lambda mod: None
        pending: dict[int, int] = {}  # layer -> its low-rank targets still to write
        for t in self.targets:
            i = store.layer_of(t.name)
            pending[i] = pending.get(i, 0) + (ranks.get(t.name) is not None)
        for i in [i for i, k in pending.items() if k == 0]:
            store.release_layer(i)

        def done_with(mod: str) -> None:
            i = store.layer_of(mod)
            pending[i] -= 1
            if pending[i] == 0:
                store.release_layer(i)
        return done_with

    def _drop_cached(self) -> None:
        if isinstance(self.spectra, SpectrumStore):  # the last layer read back from its file
            self.spectra.drop_cache()


def _free(factors) -> None:
    """Release a streamed correction's kept factors (a FactorStore's host bytes and scratch files)."""
    from .correct import FactorStore
    if isinstance(factors, FactorStore):
        factors.free()


def _on_rank0(fn: Callable[[], Any], *, share: bool = False) -> Any:
    """``fn()`` on rank 0 alone, as in one process (:func:`obdk.stream.distributed.alone`); then every rank learns
    whether it raised (a collective): rank 0 re-raises its error, the others raise
    :class:`~obdk.stream.distributed.CollectiveError` naming it, so that no rank waits for a rank 0 that failed.
    Returns ``fn()``'s result on rank 0 and, with ``share``, on every rank (pickled: a report, not tensors); else
    None elsewhere."""
    rank = dist.world()[0]
    out, err = None, None
    if rank == 0:
        try:
            with dist.alone():
                out = fn()
        except Exception as e:  # (an interrupt is not caught: torchrun ends the others)
            err = e
    sent = (out if share else None, None if err is None else f"{type(err).__name__}: {err}") if rank == 0 else None
    got, why = dist.all_gather_objects(sent)[0]
    if err is not None:
        raise err
    if why is not None:
        raise dist.CollectiveError(f"rank 0 failed ({why}); rank {rank} stops too")
    return out if rank == 0 else got
