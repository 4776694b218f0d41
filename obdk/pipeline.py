"""``obdk.compress``: calibrate → decompose → allocate → correct → pack, as one orchestration.

The work is split so that any ratio comes from one decomposition: :func:`prepare` calibrates
once (:mod:`obdk.calibrate`) and computes every targeted matrix's full spectrum
(:mod:`obdk.decompose`), giving a :class:`Plan`; :meth:`Plan.apply` allocates ranks for a
``keep`` (:mod:`obdk.allocate`), truncates, corrects (:mod:`obdk.correct`) and swaps in
``LowRankLinear`` modules. :func:`compress` is ``prepare`` + ``apply`` on the same model;
:func:`compress_many` applies several ratios or allocations to copies.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .config import APPLY_FIELDS, DEFAULT_FLOOR, DEFAULT_RANK_MULTIPLE, LowRankConfig
from .calibrate.kept import HostBudget, LayerStatistics
from .decompose.kept import SpectrumStore
from .decompose.whitened import spectrum_as_svd
from .errors import ConfigError, NotCollectedError
from .models import Target, check_context, coverage, select_targets, set_module
from .nn import LowRankLinear
from .report import CompressionReport, ModuleReport, Stage, StageTimer, count_params

log = logging.getLogger(__name__)

__all__ = ["Plan", "prepare", "compress", "compress_many", "streaming_refusal"]

#: shard size of a streamed plan's :meth:`Plan.save`: the writer holds one shard's tensors on host memory until it is
#: written, outside ``max_host_memory`` (``save_pretrained``'s 4 GiB would be the largest single item of such a run)
STREAM_SHARD_BYTES = 1 << 30


@dataclass
class Plan:
    """Calibrated statistics and full spectra of every target: allocate any ``keep`` cheaply.

    * ``config``: the :class:`LowRankConfig` the plan was prepared with (fixes the whitening, the
      statistics and the decompositions); :meth:`apply` changes only :data:`~obdk.config.APPLY_FIELDS`.
    * ``targets``: the targeted Linears in forward order; ``spectra``: ``{name: Spectrum}`` (a dict for a
      resident plan; for a streamed one a :class:`~obdk.decompose.kept.SpectrumStore`, each layer's factors on
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
      layer by layer instead (``stats`` is a :class:`~obdk.calibrate.kept.LayerStatistics`).
    * ``stream``: None for a resident plan; for a streamed one the options of its streamed passes
      (``scratch_dir``, ``budget``: the plan's :class:`~obdk.calibrate.kept.HostBudget`, ``batch_size``, and
      ``device``/``source`` when given), which the corrections' gradient passes
      reuse, so that they stream too; prepared under ``torch.distributed``, also ``owners`` ({group key: rank}) and
      ``world``: each rank's ``stats`` hold only its own matrices, and the corrections run on every rank together.
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
    stream: Optional[dict] = None
    _scores: dict = field(default_factory=dict, repr=False)

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
            why = streaming_refusal(cfg)
            if why is None and cfg.resolved_alloc in ("zero-sum", "bsi") and \
                    _score_key(cfg.resolved_alloc, cfg) not in self._scores:
                why = (f"its per-component scores are computed layer by layer during a streamed prepare() asked for "
                       f"alloc={cfg.resolved_alloc!r}, and this plan was not")
            if why is None and cfg.resolved_correct is not None and not isinstance(self.stats, LayerStatistics):
                why = ("its step re-truncates in each layer's whitening (and kfac solves with C_x/C_g), statistics "
                       "a streamed prepare() keeps layer by layer only when asked for a correction; this plan "
                       "dropped them")
            if why is not None:
                raise ConfigError(f"Plan.apply: alloc={cfg.resolved_alloc!r} correct={cfg.resolved_correct!r} on a "
                                  f"streamed plan: {why}; prepare it with that alloc/correct, or without stream")
        if cfg.resolved_correct is not None and self.data is None:
            raise ConfigError(f"Plan.apply: correct={cfg.resolved_correct!r} runs the model on the calibration "
                              f"windows, and this plan has none (prepare it with calibration=...)")
        return cfg

    # ------------------------------------------------------------------ scores
    def scores(self, alloc: str, model: Optional[nn.Module] = None, config: Optional[LowRankConfig] = None
               ) -> dict[str, Any]:
        """Per-component scores the ``zero-sum`` or ``bsi`` allocation needs, computed once per estimator.

        ``zero-sum``: ``{name: δ [k]}`` from the calibration's summed weight gradients (the
        statistics must hold ``grad``). ``bsi``: ``{name: BSIScores}`` by ``config``'s (default the
        plan's) ``bsi_curvature``, ``probes``, ``eps``, ``probe_tol``, ``max_probes``
        (:func:`obdk.scores.bsi_scores`): ``kfac`` from the statistics' ``C_x``, ``C_g`` and
        gradients; the others from the loss of ``model`` (the dense model, or a dense copy) on the
        calibration windows. Cached per allocation and estimator settings.
        """
        from . import scores as S
        cfg = config or self.config
        key = _score_key(alloc, cfg)
        if key in self._scores:
            return self._scores[key]
        with self.timer("scores"):
            if alloc == "zero-sum":
                grads = getattr(self.stats, "grad", None) or {}
                missing = [t.name for t in self.targets if t.name not in grads]
                if missing:
                    raise NotCollectedError(f"alloc 'zero-sum' needs the weight gradient ('grad') of every target, "
                                            f"which this plan's calibration did not collect (e.g. {missing[0]}); "
                                            f"prepare with alloc='zero-sum' or method 'zs-svd'")
                out = S.zero_sum_deltas({t.name: self.spectra[t.name] for t in self.targets}, grads)
            elif alloc == "bsi":
                if cfg.bsi_curvature == "kfac":
                    have = set(getattr(self.stats, "stats", ()) or ())
                    if not {"cx", "cg"} <= have:
                        raise NotCollectedError(f"bsi_curvature 'kfac' reads C_x and C_g, and this plan's statistics "
                                                f"hold {sorted(have) or 'none'}; prepare with "
                                                f"bsi_curvature='kfac' (or whitening 'obd'), or choose another "
                                                f"bsi_curvature")
                if model is None or self.data is None:
                    raise ConfigError("alloc 'bsi' scores bases on the model's loss: it needs the dense model and "
                                      "the calibration windows (prepare with calibration=...)")
                decomps = {t.name: spectrum_as_svd(self.spectra[t.name]) for t in self.targets}
                out = S.bsi_scores(model, self.data.input_ids, decomps, curvature=cfg.bsi_curvature,
                                   probes=cfg.probes, eps=cfg.eps, probe_tol=cfg.probe_tol,
                                   max_probes=cfg.max_probes, stats=self.stats,
                                   attention_mask=self.data.attention_mask,
                                   generator=torch.Generator().manual_seed(0), progress=self.progress)
            else:
                raise ConfigError(f"Plan.scores: allocation {alloc!r} needs no scores")
        self._scores[key] = out
        return out

    # ------------------------------------------------------------------ allocation, truncation
    def allocate(self, keep: Optional[float] = None, alloc: Optional[str] = None, *,
                 model: Optional[nn.Module] = None, config: Optional[LowRankConfig] = None):
        """Ranks for ``keep`` (default the config's) → an :class:`obdk.allocate.Allocation`."""
        from . import allocate as A
        cfg = config or self.resolve(keep, alloc=alloc)
        alloc = cfg.resolved_alloc
        scores = self.scores(alloc, model, cfg) if alloc in ("zero-sum", "bsi") else None
        specs = []
        for t in self.targets:
            kw = {"costs": (self.eigenvalues(t.name) / 2).double().cpu()}
            if alloc == "zero-sum":
                kw["deltas"] = scores[t.name]
            if alloc == "bsi":
                # BSI removes bases only until the budget is met (its greedy never removes more);
                # a negative estimate (Hutchinson noise) must not make removing extra bases "profitable".
                # Clamp at 0 and break ties by the spectral cost, so equal scores drop the tail first.
                imp = scores[t.name].terms(cfg.bsi_terms).double().cpu().clamp_min(0)
                kw["importance"] = imp + 1e-12 * kw["costs"][: imp.numel()]
            specs.append(A.MatrixSpec(t.name, t.m, t.n, **kw))
        if alloc == "uniform":
            return A.allocate_uniform(specs, cfg.keep, multiple=cfg.rank_multiple)
        if alloc == "global":
            return A.allocate_global(specs, cfg.keep, floor=cfg.floor, multiple=cfg.rank_multiple)
        if alloc == "zero-sum":
            if cfg.floor != DEFAULT_FLOOR or cfg.rank_multiple != DEFAULT_RANK_MULTIPLE:
                log.warning("alloc 'zero-sum' removes components one at a time (ZS-SVD): floor=%s and "
                            "rank_multiple=%s do not apply to it", cfg.floor, cfg.rank_multiple)
            return A.allocate_zero_sum(specs, cfg.keep)
        return A.allocate_bsi(specs, cfg.keep, multiple=cfg.rank_multiple, floor=cfg.floor, order=cfg.bsi_order)

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
        (whose :class:`~obdk.decompose.kept.SpectrumStore` loads ``name``'s factors alone, from its layer's file
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
    def _truncate_and_correct(self, model: nn.Module, cfg: LowRankConfig, timer: StageTimer, *,
                              lazy: bool = False, home: bool = True):
        """Allocation, then every target's truncated (and, with ``cfg``'s correction, corrected) factors.

        Returns ``(allocation, kept_map, factors {name: (a [r, n], b [m, r], predicted)}, extra_damping)``.
        ``lazy`` (no correction only): no factors are made here (:meth:`save` truncates each target as it
        writes it, so that one target's factors are in memory at a time). ``home``: the factors on the device
        of the model's weight (else where the plan keeps them: CPU for a streamed plan)."""
        from .correct import correct
        with timer("allocation"):
            allocation = self.allocate(model=model, config=cfg)
        kept_map = (allocation.meta or {}).get("kept_indices", {}) if allocation.strategy == "bsi" else {}
        factors: dict[str, tuple] = {}
        extra_damping: dict = {}
        if lazy and not cfg.resolved_correct:
            return allocation, kept_map, factors, extra_damping
        # streamed in one process: the first step truncates each target as its layer comes up, and the steps keep
        # their results layer by layer (FactorStore): the compressed model is never held whole
        by_layer = bool(cfg.resolved_correct and cfg.resolved_correct != "seq" and self.stream is not None
                        and self.stream.get("owners") is None)
        if by_layer:
            from .correct import Truncations
            ranked = [t.name for t in self.targets if allocation.ranks.get(t.name) is not None]
            factors = Truncations(ranked, lambda n: self.factors(n, allocation.ranks[n], kept_map.get(n)))
        else:
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
        if factors and cfg.resolved_correct:
            with timer("correction"):
                factors, extra_damping = correct(model, self, cfg, factors, progress=self.progress)
            self._drop_cached()
        if not by_layer and any(f[0].is_meta for f in factors.values()):
            raise ConfigError("Plan.apply: this rank holds the shapes of the factors only (a streamed plan prepared "
                              "under torch.distributed gives them to rank 0, or to every rank through a correction "
                              "run on all ranks together); apply it on rank 0")
        return allocation, kept_map, factors, extra_damping

    def _module_report(self, t: Target, rank: Optional[int], pred: float, extra_damping: dict,
                       seconds: float) -> ModuleReport:
        damping = self.damping(t.name)
        damping.update(extra_damping.get(t.name, {}))
        if rank is None:
            return ModuleReport(t.name, t.m, t.n, None, t.m * t.n, t.m * t.n, 0.0, damping, seconds)
        return ModuleReport(t.name, t.m, t.n, int(rank), int(rank) * (t.m + t.n), t.m * t.n, pred, damping, seconds)

    def _report(self, cfg: LowRankConfig, mods: list, allocation, before: int, after: int,
                timer: StageTimer) -> tuple[CompressionReport, dict]:
        stages = dict(self.timer.to_dict())
        stages.update(timer.to_dict())
        record = cfg.to_dict()
        record["alloc"] = cfg.resolved_alloc  # record what was used, not "default"
        record["correct"] = cfg.resolved_correct or "none"
        report = CompressionReport(
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
            coverage=self.coverage,
        )
        return report, record

    def apply(self, model: nn.Module, keep: Optional[float] = None, *, model_params_before: Optional[int] = None,
              **overrides: Any) -> CompressionReport:
        """Swap each target of ``model`` for a ``LowRankLinear`` at the allocated rank (or keep it dense).

        ``model``: the model the plan was prepared on or a copy of it (dense). ``keep`` and
        ``overrides`` (``alloc``, ``floor``, ``rank_multiple``, ``correct``, ``probes``, ``eps``,
        ``bsi_order``) change this application only, validated once through the config
        (:meth:`resolve`). Returns the :class:`CompressionReport` (also ``model._obdk_report``).
        To write the compressed checkpoint without building the compressed model, see :meth:`save`.
        """
        if (self.stream or {}).get("source") is not None:
            raise ConfigError("Plan.apply: this plan's model is a skeleton whose decoder layers live in the "
                              "checkpoint's shards (prepare(source=...)); write the compressed model with "
                              "Plan.save(model, out_dir)")
        cfg = self.resolve(keep, **overrides)
        timer = StageTimer()
        before = model_params_before if model_params_before is not None else count_params(model)
        allocation, _, factors, extra_damping = self._truncate_and_correct(model, cfg, timer)
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
        _free(factors)
        report, record = self._report(cfg, mods, allocation, before, count_params(model), timer)
        model._obdk_report = report
        model._obdk_config = LowRankConfig.from_dict(record)
        return report

    def save(self, model: nn.Module, save_dir, keep: Optional[float] = None, *, tokenizer=None,
             overwrite: bool = False, source_dir=None, max_shard_bytes: Optional[int] = None,
             model_params_before: Optional[int] = None, release: bool = False, **overrides: Any) -> CompressionReport:
        """Write ``model`` compressed at ``keep`` to the checkpoint ``save_dir``, tensor by tensor, without
        building the compressed model: ``model`` stays as it is (dense).

        The same checkpoint as :meth:`apply` followed by :func:`obdk.save_pretrained` (the same tensors,
        ranks, ``config.json`` and report), written by :class:`obdk.io.CheckpointWriter` in the model's
        ``state_dict`` order: each shard goes to disk as it fills. Without a correction each target is
        truncated as it is written (one target's factors in memory at a time); with one, a streamed plan in
        one process reads them from the correction's :class:`~obdk.correct.kept.FactorStore` (layer by
        layer, under the plan's host budget), and a resident plan holds every target's corrected factors
        (the compressed model's size) until written. For a skeleton
        (``prepare(source=...)``) every decoder-layer tensor that is not a compressed target's (norms,
        kept-dense Linears, biases) is read from the checkpoint's shards as it is written. ``keep``,
        ``overrides``: as for :meth:`apply`; ``tokenizer``, ``overwrite``, ``source_dir``: as for
        :func:`obdk.save_pretrained` (``max_shard_bytes`` default its 4 GiB; for a streamed plan
        :data:`STREAM_SHARD_BYTES`, 1 GiB, the host memory the writer's pending shard takes). ``release`` (a streamed plan's last
        use): each decoder layer's kept factors are released as soon as its targets are written (their scratch
        file removed), so the scratch shrinks while the checkpoint grows (Llama-7B in fp32: 0.81 GB of factors
        per layer against 0.65 GB written); the plan can allocate and report afterwards but not cut ranks again.
        Returns the :class:`CompressionReport` (also in the checkpoint's ``obdk_report.json``).
        """
        from .io import SHARD_BYTES, CheckpointWriter, _sources_of, _tensors_for_save
        cfg = self.resolve(keep, **overrides)
        timer = StageTimer()
        before = model_params_before if model_params_before is not None else count_params(model)
        source = (self.stream or {}).get("source")
        allocation, kept_map, factors, extra_damping = self._truncate_and_correct(model, cfg, timer, lazy=True,
                                                                                   home=False)
        ranks = allocation.ranks
        by_name = {t.name: t for t in self.targets}
        mods: dict[str, ModuleReport] = {}
        sd = dict(_tensors_for_save(model))
        store = self.spectra if release and isinstance(self.spectra, SpectrumStore) else None
        pending: dict[int, int] = {}  # layer -> its targets still to write (release: each layer as it is done)
        if store is not None:
            for t in self.targets:
                pending.setdefault(store.layer_of(t.name), 0)
                pending[store.layer_of(t.name)] += ranks.get(t.name) is not None
            for i in [i for i, k in pending.items() if k == 0]:
                store.release_layer(i)

        def real(key: str, t: torch.Tensor) -> torch.Tensor:
            return source.tensor(key, "cpu", t.dtype, shape=tuple(t.shape)) if t.is_meta else t

        shard = max_shard_bytes or (STREAM_SHARD_BYTES if self.stream is not None else SHARD_BYTES)
        with timer("save"), CheckpointWriter(save_dir, max_shard_bytes=shard,
                                             overwrite=overwrite,
                                             source_dir=([source_dir] if source_dir is not None else [])
                                             + _sources_of(model)) as w:
            for key, t in sd.items():
                mod, _, leaf = key.rpartition(".")
                if mod in by_name and ranks.get(mod) is not None:
                    if leaf == "weight":  # the module's factors (+ its bias and tombstone) at its weight's place
                        t0 = time.perf_counter()
                        if mod not in factors:
                            a, b, pred = self.factors(mod, ranks[mod], kept_map.get(mod))
                        else:  # (a dict's entry is released as it is written)
                            a, b, pred = factors.pop(mod) if isinstance(factors, dict) else factors[mod]
                        bias = sd.get(f"{mod}.bias")
                        bias = None if bias is None else real(f"{mod}.bias", bias).to(t.dtype)
                        w.add_lowrank(mod, a.to(t.dtype), b.to(t.dtype), bias)
                        del a, b
                        mods[mod] = self._module_report(by_name[mod], ranks[mod], pred, extra_damping,
                                                        time.perf_counter() - t0)
                        if store is not None:
                            i = store.layer_of(mod)
                            pending[i] -= 1
                            if pending[i] == 0:
                                store.release_layer(i)
                    continue
                w.add(key, real(key, t))
            self._drop_cached()
            mods.update({t.name: self._module_report(t, None, 0.0, extra_damping, 0.0)
                         for t in self.targets if ranks.get(t.name) is None})
            mods_list = [mods[t.name] for t in self.targets]
            after = before - sum(m.dense_params - m.params for m in mods_list)
            report, record = self._report(cfg, mods_list, allocation, before, after, timer)
            w.finish(model_config=model.config, tokenizer=tokenizer, report=report,
                     config=LowRankConfig.from_dict(record),
                     generation_config=getattr(model, "generation_config", None))
        _free(factors)
        report.stages.update(timer.to_dict())
        return report

    def _drop_cached(self) -> None:
        if isinstance(self.spectra, SpectrumStore):  # the last layer read back from its file
            self.spectra.drop_cache()


def _free(factors) -> None:
    """Release a streamed correction's kept factors (a FactorStore's host bytes and scratch files)."""
    from .correct import FactorStore
    if isinstance(factors, FactorStore):
        factors.free()


def _on_cpu(v):
    """A score (a tensor, or a dataclass of tensors such as ``BSIScores``) with its tensors on the CPU, to send."""
    if isinstance(v, torch.Tensor):
        return v.detach().cpu()
    return dataclasses.replace(v, **{f.name: getattr(v, f.name).detach().cpu() for f in dataclasses.fields(v)
                                     if isinstance(getattr(v, f.name), torch.Tensor)})


def _score_key(alloc: str, cfg: LowRankConfig):
    """The cache key of :meth:`Plan.scores` for ``alloc`` under ``cfg`` (BSI: per estimator and its settings)."""
    if alloc != "bsi":
        return alloc
    return ("bsi", cfg.bsi_curvature) + (() if cfg.bsi_curvature in ("kfac", "fisher") else
                                         (cfg.probes, cfg.eps, cfg.probe_tol, cfg.max_probes))


def streaming_refusal(config: LowRankConfig) -> Optional[str]:
    """Why ``config`` cannot run layer-streamed (:func:`prepare` with ``stream=True``), or None if it can.

    Everything else streams: the calibration, the decompositions, zero-sum's and BSI's K-FAC scores
    (layer by layer, from each layer's statistics and gradients) and the ``zs``/``kfac`` corrections
    (their gradient passes stream, the K-FAC step reads one layer's statistics at a time).
    """
    if config.resolved_alloc == "bsi" and config.bsi_curvature != "kfac":
        return (f"alloc 'bsi' with bsi_curvature {config.bsi_curvature!r} runs the whole model at once (its "
                f"probes or Fisher pass), which does not stream; bsi_curvature 'kfac' does")
    if config.resolved_alloc == "bsi" and config.fisher != "empirical":
        return ("alloc 'bsi' with fisher 'true' takes the loss gradient in σ in a whole-model pass, which does not "
                "stream; fisher 'empirical' does")
    if config.resolved_correct == "seq":
        return "correct 'seq' refits on the compressed model's inputs in a whole-model pass, which does not stream"
    if config.resolved_correct == "zs-guarded":
        return ("correct 'zs-guarded' runs the whole model on its held-out windows at each step size, which does not "
                "stream; 'zs' does")
    return None


def _calibration_windows(calibration, tokenizer, nsamples, seqlen, seed, data_dir, config):
    from .calibrate.data import get_calibration_windows
    if calibration is None:
        why = ""
        if config.resolved_correct is not None:
            why = (f" (method {config.method!r} with correct={config.resolved_correct!r} runs the model on the "
                   f"calibration windows after truncation, even with precomputed stats=; pass calibration=..., "
                   f"or correct='none')")
        raise ConfigError(f"compress: this method needs calibration data (calibration=...){why}")
    if hasattr(calibration, "input_ids"):
        return calibration
    if isinstance(calibration, torch.Tensor) and calibration.dim() == 2:
        nsamples, seqlen = calibration.shape  # already windows: take them as they are
    return get_calibration_windows(calibration, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                   data_dir=data_dir)


def prepare(model: nn.Module, config: Optional[LowRankConfig] = None, calibration: Any = None, *,
            tokenizer=None, nsamples: int = 32, seqlen: int = 512, seed: int = 0, data_dir=None,
            stats=None, device=None, progress: bool = True, timer: Optional[StageTimer] = None,
            batch: Optional[int] = None, workers: Optional[int] = None, calib_batch_size: int = 1,
            stream: bool = False, scratch_dir=None, max_host_memory: Optional[int] = None,
            source=None) -> Plan:
    """Calibrate ``model`` once and decompose every target fully (see :class:`Plan`).

    ``calibration``: a ``CalibrationData``, a dataset name (``wikitext2:validation``),
    a file path, a ``list[str]`` or a LongTensor [N, T] of token ids; ``nsamples`` windows of
    ``seqlen`` tokens are drawn from it (seeded by ``seed``) when it is not already windows.
    ``stats`` may pass precomputed :class:`obdk.calibrate.statistics.Statistics`. ``device``,
    ``batch``, ``workers``: where and how the decompositions run
    (:func:`obdk.decompose.schedule.decompose_targets`). ``calib_batch_size``: calibration
    windows per forward (and backward) pass; more run faster where memory allows and give the
    same statistics up to rounding. ``stream``: calibrate one decoder layer at a time
    (:func:`obdk.calibrate.stream.calibrate_streamed`: the same statistics, one layer's statistics
    resident; boundary activations on host memory up to ``max_host_memory`` bytes, beyond that
    memory-mapped in ``scratch_dir``), each layer decomposed as its sweep ends and its spectra kept in
    a :class:`~obdk.decompose.kept.SpectrumStore` (eigenvalues on host; ordered factors on host memory,
    beyond the budget one safetensors file per layer in ``scratch_dir``); with a correction each
    layer's statistics are kept in a :class:`~obdk.calibrate.kept.LayerStatistics` too and the
    corrections' gradient passes stream. The kept spectra and statistics draw on one
    :class:`~obdk.calibrate.kept.HostBudget` of ``max_host_memory`` bytes with every streamed pass's boundary
    buffers (the calibration's and the corrections'): it bounds their sum. :meth:`Plan.close` (or dropping the
    plan) removes the scratch files.

    Streamed, ``device`` is also the compute device of every streamed pass: a model in host memory stays
    there and one decoder layer at a time is copied onto ``device`` (:class:`~obdk.calibrate.placement.
    LayerPlacement`). ``source``: the :class:`~obdk.calibrate.placement.ShardedWeights` of a skeleton
    ``model`` (:func:`~obdk.calibrate.placement.load_skeleton`: decoder layers on the meta device), whose
    layers every streamed pass (calibration, corrections) reads from the checkpoint's shards one at a time;
    such a plan is written with :meth:`Plan.save` (it cannot :meth:`Plan.apply` to a model that has no weights).
    """
    from .decompose.schedule import decompose_targets
    config = config or LowRankConfig()
    why = streaming_refusal(config) if stream else None
    if why is not None:
        raise ConfigError(f"prepare(stream=True): method {config.method!r}: {why}; use the "
                          f"resident pass (stream=False, obdk compress without --stream)")
    if source is not None and not stream:
        raise ConfigError("prepare: source= (a skeleton's weights read from its checkpoint) needs stream=True: only "
                          "the streamed passes read one decoder layer at a time")
    timer = timer or StageTimer()
    targets = select_targets(model, config)
    need = config.needed_stats
    data = None
    # the windows are kept whenever calibration data is given: corrections and BSI scores asked for at
    # apply() time need them even when this config does not
    if calibration is not None or (need and stats is None) or config.resolved_alloc == "bsi" \
            or config.resolved_correct is not None:
        check_context(model, calibration.shape[1] if isinstance(calibration, torch.Tensor) and calibration.dim() == 2
                      else seqlen, "seqlen")
        data = _calibration_windows(calibration, tokenizer, nsamples, seqlen, seed, data_dir, config)
    spectra: Optional[Mapping] = None
    phases: dict[str, float] = {}
    kept = True
    layer_scores: Optional[dict] = None  # zero-sum's δ or BSI's scores, computed layer by layer in a streamed sweep
    # the options of every streamed pass of this plan: the calibration's and the corrections' gradient passes
    # one HostBudget of max_host_memory bytes for everything the plan holds on host: the kept spectra and statistics
    # and each pass's boundary buffers (what does not fit goes to scratch_dir)
    budget = HostBudget(max_host_memory, owner="prepare(stream=True)") if stream else None
    stream_opts = {"scratch_dir": scratch_dir, "budget": budget, "batch_size": calib_batch_size} if stream else None
    if stream and device is not None:
        stream_opts["device"] = device
    if stream and source is not None:
        stream_opts["source"] = source
    if need and stats is None:
        with timer("calibration"):
            if stream:
                from .calibrate.stream import calibrate_streamed
                # each layer is decomposed as soon as its sweep is done (zero-sum's scores computed from its
                # gradients) and its statistics dropped, so one layer's statistics are resident at a time; its
                # spectra go to a SpectrumStore (eigenvalues on host; factors on host memory, then scratch_dir);
                # for the corrections, which solve with C_x/C_g one layer at a time in their own streamed
                # gradient pass (zs too: it re-truncates in the same whitening), each layer's statistics go to a
                # LayerStatistics (the same). Both draw on one HostBudget: max_host_memory bounds their sum
                layered = config.resolved_correct is not None  # (seq is refused above)
                kept = False
                by_name = {t.name: t for t in targets}
                layer_scores, score_s, sinfo = {}, 0.0, {}
                done = SpectrumStore(scratch_dir=scratch_dir, budget=budget, order=[t.name for t in targets])
                store = LayerStatistics(scratch_dir=scratch_dir, budget=budget) if layered else None
                # under torch.distributed each layer's statistics go to their owner ranks alone, which decompose them
                # (obdk.calibrate.distributed.share_spectra then gives every rank the eigenvalues and rank 0 the
                # factors) and compute zero-sum's δ scores (all-gathered: k floats per matrix, so that the
                # allocation runs identically everywhere); each rank's LayerStatistics keeps only the matrices it
                # owns, and the corrections reuse the owner map (obdk.correct.steps.gradient_correct)
                from .calibrate import distributed as dist
                owned = config.resolved_alloc in ("uniform", "global", "zero-sum", "bsi")
                weights = {t.name: model.get_submodule(t.name).weight for t in targets}
                if source is not None and dist.world()[1] > 1:
                    raise ConfigError("prepare(stream=True, source=...): a skeleton read from its checkpoint under "
                                      "torch.distributed is not supported; load the model on every rank")
                # a layer fetched onto another device, or read from the shards, is released after its sweep: its
                # spectra must refer to the model's own (host or meta) weight, never to the fetched copy
                rehome = source is not None or device is not None
                # the kept factors are cut to the largest rank that saves parameters (a rank at or above break-even
                # stays dense) in the weight's dtype (truncations are cast to it): Llama-7B in fp32, 0.81 GB per
                # layer instead of 2.6 GB. BSI keeps bases by importance, any index: its spectra stay whole
                compact = config.resolved_alloc != "bsi"
                from .allocate.budget import max_factored_rank

                def cut(n, v):  # a Spectrum cut to the largest factored rank, in the weight's dtype
                    return v.compact(max_factored_rank(*v.shape), dtype=weights[n].dtype)
                # as each decomposition finishes (zero-sum's scores read the whole spectra first): a layer's
                # full-rank fp64 spectra are never held together (Llama-7B: 2.6 GB, on top of the solver's work)
                early = compact and config.resolved_alloc != "zero-sum"

                def decompose_layer(i, part):
                    nonlocal score_s
                    sub = [by_name[n] for n in part.modules if n in by_name]
                    mine: dict = {}
                    sp: dict = {}
                    if sub:
                        sp, ph = decompose_targets(model, sub, part, config, device=device, batch=batch,
                                                   workers=workers, progress=False, finish=cut if early else None)
                        for k, v in ph.items():
                            phases[k] = phases.get(k, 0.0) + v
                        if rehome:
                            sp = {n: dataclasses.replace(v, weight=weights[n]) for n, v in sp.items()}
                        t0 = time.perf_counter()
                        if config.resolved_alloc == "zero-sum":
                            from .scores import zero_sum_deltas
                            mine = zero_sum_deltas(sp, part.grad)
                        elif config.resolved_alloc == "bsi":  # K-FAC curvature: the layer's statistics, no pass
                            from .scores import bsi_scores
                            mine = bsi_scores(model, data.input_ids, {n: spectrum_as_svd(v) for n, v in sp.items()},
                                              curvature="kfac", stats=part, attention_mask=data.attention_mask)
                        score_s += time.perf_counter() - t0
                        if compact and not early:  # kept until the allocation: ranks below break-even
                            sp = {n: cut(n, v) for n, v in sp.items()}
                    if owned:  # collectives: every rank calls them, whether it owns any of this layer's targets or not
                        sp = dist.share_spectra({t.name: sp[t.name] for t in sub}, weights)
                        if config.resolved_alloc in ("zero-sum", "bsi") and dist.world()[1] > 1:
                            for got in dist.all_gather_objects({n: _on_cpu(d) for n, d in mine.items()}):
                                layer_scores.update(got)
                            mine = {}
                    layer_scores.update(mine)
                    done.put_layer(i, sp)  # (the layer's factors leave the compute device here)
                    del sp
                    if store is not None:
                        part.grad.clear()  # (the corrections take their own gradients at the truncation)
                        store.put(i, part)
                stats = calibrate_streamed(model, data, stats=need, fisher=config.fisher, seed=seed, progress=progress,
                                           on_layer=decompose_layer, reduce="owner" if owned else "all",
                                           info=sinfo, **stream_opts)
                spectra = done
                if store is not None:
                    stats = store
                    if "distributed" in sinfo:  # the corrections' gradient passes reduce to the same owners
                        stream_opts = {**stream_opts, "owners": dict(sinfo["distributed"]["owners"]),
                                       "world": int(sinfo["distributed"]["world"])}
            else:
                from .calibrate.stats import calibrate
                stats = calibrate(model, data, stats=need, fisher=config.fisher, seed=seed, progress=progress,
                                  batch_size=calib_batch_size)
    if spectra is None:
        with timer("factorisation"):
            spectra, phases = decompose_targets(model, targets, stats, config, device=device, batch=batch,
                                                workers=workers, progress=progress)
    else:  # decomposed inside the streamed sweep: the stage's time is part of the calibration's
        missing = [t.name for t in targets if t.name not in spectra]
        if missing:
            raise NotCollectedError(f"prepare(stream=True): the streamed sweep decomposed no {missing[0]} (and "
                                    f"{len(missing) - 1} more targets)")
        for ph, sec in sinfo.get("seconds", {}).items():  # the streamed schedule's phases, as sub-stages
            if ph != "total":
                timer.stages[f"calibration/{ph}"] = Stage(seconds=sec,
                                                          peak_rss_mib=timer.stages["calibration"].peak_rss_mib)
        timer.stages["factorisation"] = Stage(seconds=sum(phases.values()),
                                              peak_rss_mib=timer.stages["calibration"].peak_rss_mib)
    for ph, sec in phases.items():  # summed over problems (workers overlap): not added to the total
        timer.stages[f"factorisation/{ph}"] = Stage(seconds=sec, peak_rss_mib=timer.stages["factorisation"].peak_rss_mib)
    plan = Plan(config, targets, spectra, stats, getattr(stats, "fingerprint", None), timer, data=data,
                coverage=coverage(model, targets), progress=progress, stats_kept=kept,
                stream=stream_opts)
    if layer_scores is not None and config.resolved_alloc in ("zero-sum", "bsi"):  # computed in the sweep
        plan._scores[_score_key(config.resolved_alloc, config)] = {t.name: layer_scores[t.name] for t in targets}
        timer.stages["scores"] = Stage(seconds=score_s, peak_rss_mib=timer.stages["calibration"].peak_rss_mib)
    if config.resolved_alloc in ("zero-sum", "bsi"):
        plan.scores(config.resolved_alloc, model)
    return plan


def compress(model: nn.Module, config: Optional[LowRankConfig] = None, calibration: Any = None, *,
             tokenizer=None, nsamples: int = 32, seqlen: int = 512, seed: int = 0, data_dir=None,
             stats=None, device=None, progress: bool = True, calib_batch_size: int = 1, stream: bool = False,
             scratch_dir=None, max_host_memory: Optional[int] = None) -> CompressionReport:
    """Compress ``model`` in place; return a :class:`CompressionReport`.

    Each targeted Linear (default: every ``nn.Linear`` in the decoder layers) becomes a
    ``LowRankLinear`` (bias kept) at the rank the allocation gives, or stays dense
    when that rank reaches break-even ``mn/(m+n)``. See :func:`prepare` for the arguments.
    """
    config = config or LowRankConfig()
    before = count_params(model)
    plan = prepare(model, config, calibration, tokenizer=tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed,
                   data_dir=data_dir, stats=stats, device=device, progress=progress,
                   calib_batch_size=calib_batch_size, stream=stream, scratch_dir=scratch_dir,
                   max_host_memory=max_host_memory)
    return plan.apply(model, model_params_before=before)


Variant = Union[float, dict]


def compress_many(model: nn.Module, config: LowRankConfig, keeps: Sequence[Variant], calibration: Any = None, *,
                  on_result: Optional[Callable[[nn.Module, CompressionReport, dict], Any]] = None,
                  plan: Optional[Plan] = None, **kw) -> list:
    """One calibration and one decomposition, then one compressed copy of ``model`` per variant.

    ``keeps``: floats (``keep``) or dicts of :meth:`Plan.apply` options (``{"keep": 0.8,
    "alloc": "uniform", "correct": "none"}``). ``on_result(model_copy, report, options)`` is
    called as each copy is made (save, evaluate, write a row); the list holds what it returns
    (default ``(model_copy, report)``), in the order of ``keeps``, so a callback that returns
    ``None`` keeps no copy alive. ``plan``: an already prepared plan of ``model`` (then no
    calibration runs). ``model`` is not modified. Every variant is validated before any work.
    """
    variants = [dict(v) if isinstance(v, dict) else {"keep": v} for v in keeps]
    plan = plan or prepare(model, config, calibration, **kw)
    for v in variants:
        plan.resolve(**v)
    before = count_params(model)
    out = []
    for v in variants:
        m = copy.deepcopy(model)
        report = plan.apply(m, model_params_before=before, **v)
        out.append(on_result(m, report, v) if on_result is not None else (m, report))
        del m
    return out
