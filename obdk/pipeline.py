"""``obdk.compress``: calibrate → decompose → allocate → correct → pack, as one orchestration.

The work is split so that any ratio comes from one decomposition: :func:`prepare` calibrates
once (:mod:`obdk.calibrate`) and computes every targeted matrix's full spectrum
(:mod:`obdk.decompose`), giving a :class:`~obdk.plan.Plan`; :meth:`~obdk.plan.Plan.apply` allocates ranks for a
``keep`` (:mod:`obdk.allocate`), truncates, corrects (:mod:`obdk.correct`) and swaps in
``LowRankLinear`` modules. :func:`compress` is ``prepare`` + ``apply`` on the same model;
:func:`compress_many` applies several ratios or allocations to copies. Streamed (``stream=True``), each decoder
layer is decomposed as soon as the calibration's sweep is done with it (:class:`_DecomposeEachLayer`, a consumer
of :func:`~obdk.calibrate.stream.calibrate_streamed`).
"""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn

from .arguments import as_config, check_calibration, check_device, check_ints, check_model, check_path
from .calibrate.layer_statistics import LayerStatistics
from .config import LowRankConfig
from .decompose import schedule
from .decompose.spectrum_store import SpectrumStore
from .decompose.whitened import spectrum_as_svd  # noqa: F401  (importable here, as before)
from .errors import ConfigError, NotCollectedError, WrongTypeError
from .models import check_context, coverage, select_targets
from .plan import Plan
from .registry import ALLOCATORS, load, streaming_refusal
from .report import CompressionReport, Stage, StageTimer, count_params
from .stream import distributed as dist
from .stream.budget import HostBudget
from .stream.options import Streaming

__all__ = ["Plan", "prepare", "compress", "compress_many", "streaming_refusal"]


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
    a :class:`~obdk.decompose.spectrum_store.SpectrumStore` (eigenvalues on host; ordered factors on host memory,
    beyond the budget one safetensors file per layer in ``scratch_dir``); with a correction each
    layer's statistics are kept in a :class:`~obdk.calibrate.layer_statistics.LayerStatistics` too and the
    corrections' gradient passes stream. The kept spectra and statistics draw on one
    :class:`~obdk.stream.budget.HostBudget` of ``max_host_memory`` bytes with every streamed pass's boundary
    buffers (the calibration's and the corrections'): it bounds their sum. :meth:`Plan.close` (or dropping the
    plan) removes the scratch files.

    Streamed, ``device`` is also the compute device of every streamed pass: a model in host memory stays
    there and one decoder layer at a time is copied onto ``device`` (:class:`~obdk.stream.placement.LayerPlacement`). ``source``: the :class:`~obdk.stream.shards.ShardedWeights` of a skeleton
    ``model`` (:func:`~obdk.stream.shards.load_skeleton`: decoder layers on the meta device), whose
    layers every streamed pass (calibration, corrections) reads from the checkpoint's shards one at a time;
    such a plan is written with :meth:`Plan.save` (it cannot :meth:`Plan.apply` to a model that has no weights).
    """
    check_model("prepare", model, meta_ok=source is not None)  # (a skeleton's layers are meta: read from source)
    config = as_config("prepare", config)  # (a dict of LowRankConfig fields is accepted)
    check_ints("prepare", nsamples=nsamples, seqlen=seqlen, calib_batch_size=calib_batch_size)
    check_ints("prepare", lo=None, seed=seed)
    check_ints("prepare", lo=0, none_ok=("max_host_memory",), max_host_memory=max_host_memory)
    check_calibration("prepare", calibration, tokenizer)
    check_device("prepare", device)
    for name, value in (("data_dir", data_dir), ("scratch_dir", scratch_dir)):
        check_path("prepare", name, value, none_ok=True)
    _check_streaming(config, stream, source)
    timer = timer or StageTimer()
    targets = select_targets(model, config)
    need = config.needed_stats
    alloc = ALLOCATORS[config.resolved_alloc]
    data = None
    # the windows are kept whenever calibration data is given: corrections and BSI scores asked for at
    # apply() time need them even when this config does not
    if calibration is not None or (need and stats is None) or alloc.windows or config.resolved_correct is not None:
        check_context(model, calibration.shape[1] if isinstance(calibration, torch.Tensor) and calibration.dim() == 2
                      else seqlen, "seqlen")
        data = _calibration_windows(calibration, tokenizer, nsamples, seqlen, seed, data_dir, config)
    # the options of every streamed pass of this plan (the calibration's and the corrections' gradient passes), with
    # one HostBudget of max_host_memory bytes for everything the plan holds on host: the kept spectra and statistics
    # and each pass's boundary buffers (what does not fit goes to scratch_dir)
    streaming = Streaming(HostBudget(max_host_memory, owner="prepare(stream=True)"), scratch_dir=scratch_dir,
                          batch_size=calib_batch_size, device=device, source=source) if stream else None
    layers: Optional[_DecomposeEachLayer] = None
    if need and stats is None:
        with timer("calibration"):
            if stream:  # each layer decomposed as its sweep ends
                layers = _DecomposeEachLayer(model, targets, data, config, streaming, batch=batch, workers=workers)
                stats, streaming = layers.run(seed, progress)
            else:
                from .calibrate.stats import calibrate
                stats = calibrate(model, data, stats=need, fisher=config.fisher, seed=seed, progress=progress,
                                  batch_size=calib_batch_size)
    if layers is None:
        with timer("factorisation"):
            spectra, phases = schedule.decompose_targets(model, targets, stats, config, device=device, batch=batch,
                                                         workers=workers, progress=progress)
    else:  # decomposed inside the streamed sweep: the stage's time is part of the calibration's
        spectra, phases = layers.spectra, layers.phases
        layers.record(timer)
    for ph, sec in phases.items():  # summed over problems (workers overlap): not added to the total
        timer.stages[f"factorisation/{ph}"] = Stage(seconds=sec, peak_rss_mib=timer.stages["factorisation"].peak_rss_mib)
    plan = Plan(config, targets, spectra, stats, getattr(stats, "fingerprint", None), timer, data=data,
                coverage=coverage(model, targets), progress=progress, stats_kept=layers is None, stream=streaming)
    if layers is not None and alloc.scores is not None:  # computed in the sweep
        plan._scores[alloc.key(config)] = {t.name: layers.scores[t.name] for t in targets}
        timer.stages["scores"] = Stage(seconds=layers.score_seconds,
                                       peak_rss_mib=timer.stages["calibration"].peak_rss_mib)
    if alloc.scores is not None:
        plan.scores(alloc.name, model)
    return plan


def _check_streaming(config: LowRankConfig, stream: bool, source) -> None:
    """What ``prepare`` refuses before any work: a config that cannot stream, a skeleton without streaming or
    under ``torch.distributed``."""
    why = streaming_refusal(config) if stream else None
    if why is not None:
        raise ConfigError(f"prepare(stream=True): method {config.method!r}: {why}; use the "
                          f"resident pass (stream=False, obdk compress without --stream)")
    if source is not None and not stream:
        raise ConfigError("prepare: source= (a skeleton's weights read from its checkpoint) needs stream=True: only "
                          "the streamed passes read one decoder layer at a time")
    if source is not None and dist.world()[1] > 1:
        raise ConfigError("prepare(stream=True, source=...): a skeleton read from its checkpoint under "
                          "torch.distributed is not supported; load the model on every rank")


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


class _DecomposeEachLayer:
    """``prepare(stream=True)``'s consumer of the streamed calibration (``on_layer``): each decoder layer is
    decomposed as soon as its statistics are final, so that one layer's statistics are resident at a time.

    Its spectra go to a :class:`~obdk.decompose.spectrum_store.SpectrumStore` (eigenvalues on host; factors on host
    memory, then scratch), the allocation's per-layer scores (its ``layer_scores``, e.g. zero-sum's δ from the
    layer's gradients) to ``scores``; for a correction (which solves with ``C_x``/``C_g`` one layer at a time in its
    own streamed gradient pass; zs too: it re-truncates in the same whitening) the layer's statistics go to a
    :class:`~obdk.calibrate.layer_statistics.LayerStatistics`. Both draw on the plan's one budget. Under
    ``torch.distributed`` each layer's statistics reach their owner ranks alone, which decompose them;
    :func:`~obdk.stream.distributed.share_spectra` then gives every rank the eigenvalues and rank 0 the factors, and
    the scores are all-gathered (k floats per matrix), so that the allocation runs identically everywhere; each
    rank's statistics keep only the matrices it owns, and the corrections reuse the owner map.
    """

    def __init__(self, model: nn.Module, targets: list, data, config: LowRankConfig, streaming: Streaming, *,
                 batch: Optional[int], workers: Optional[int]) -> None:
        self.model, self.data, self.config, self.streaming = model, data, config, streaming
        self.batch, self.workers = batch, workers
        self.by_name = {t.name: t for t in targets}
        self.alloc = ALLOCATORS[config.resolved_alloc]
        self.spectra = SpectrumStore(scratch_dir=streaming.scratch_dir, budget=streaming.budget,
                                     order=[t.name for t in targets])
        self.kept = LayerStatistics(scratch_dir=streaming.scratch_dir, budget=streaming.budget) \
            if config.resolved_correct is not None else None  # (corrections that do not stream are refused)
        self.weights = {t.name: model.get_submodule(t.name).weight for t in targets}
        # a layer fetched onto another device, or read from the shards, is released after its sweep: its spectra
        # must refer to the model's own (host or meta) weight, never to the fetched copy
        self.rehome = streaming.source is not None or streaming.device is not None
        # the kept factors are cut to the largest rank that saves parameters (a rank at or above break-even stays
        # dense) in the weight's dtype (truncations are cast to it): Llama-7B in fp32, 0.81 GB per layer instead of
        # 2.6 GB; as each decomposition finishes unless the layer's scores read the whole spectra first (zero-sum),
        # so that a layer's full-rank fp64 spectra are never held together. An allocator that keeps any subset of
        # components (BSI) keeps them whole
        self.compact = not self.alloc.any_component
        self.early = self.compact and self.alloc.layer_scores is None
        self.phases: dict[str, float] = {}
        self.scores: dict = {}
        self.score_seconds = 0.0
        self.info: dict = {}

    def run(self, seed: int, progress: bool) -> tuple[Any, Streaming]:
        """The streamed calibration with this consumer: ``(the plan's statistics, its Streaming)``: the kept
        :class:`LayerStatistics` (else the sweep's empty result) and, owner-reduced, the owner map recorded."""
        from .calibrate import stream as S  # (looked up at call time)
        stats = S.calibrate_streamed(self.model, self.data, stats=self.config.needed_stats, fisher=self.config.fisher,
                                     seed=seed, progress=progress, on_layer=self, reduce="owner", info=self.info,
                                     **self.streaming.pass_options())
        if self.kept is None:
            return stats, self.streaming
        streaming = self.streaming
        if "distributed" in self.info:  # the corrections' gradient passes reduce to the same owners
            streaming = streaming.with_owners(self.info["distributed"]["owners"], self.info["distributed"]["world"])
        return self.kept, streaming

    def __call__(self, i: int, part) -> None:
        sub = [self.by_name[n] for n in part.modules if n in self.by_name]
        sp, mine = self._decompose(sub, part) if sub else ({}, {})
        # collectives: every rank calls them, whether it owns any of this layer's targets or not
        sp = dist.share_spectra({t.name: sp[t.name] for t in sub}, self.weights)
        if self.alloc.layer_scores is not None and dist.world()[1] > 1:
            for got in dist.all_gather_objects({n: _on_cpu(d) for n, d in mine.items()}):
                self.scores.update(got)
            mine = {}
        self.scores.update(mine)
        self.spectra.put_layer(i, sp)  # (the layer's factors leave the compute device here)
        del sp
        if self.kept is not None:
            part.grad.clear()  # (the corrections take their own gradients at the truncation)
            self.kept.put(i, part)

    def _decompose(self, sub: list, part) -> tuple[dict, dict]:
        """This rank's spectra of the targets ``sub`` of one layer, and their scores."""
        sp, ph = schedule.decompose_targets(self.model, sub, part, self.config, device=self.streaming.device,
                                            batch=self.batch, workers=self.workers, progress=False,
                                            finish=self._cut if self.early else None)
        for k, v in ph.items():
            self.phases[k] = self.phases.get(k, 0.0) + v
        if self.rehome:
            sp = {n: dataclasses.replace(v, weight=self.weights[n]) for n, v in sp.items()}
        mine: dict = {}
        t0 = time.perf_counter()
        if self.alloc.layer_scores is not None:  # e.g. BSI's K-FAC curvature: the layer's statistics, no pass
            mine = load(self.alloc.layer_scores)(self.model, self.data, sp, part)
        self.score_seconds += time.perf_counter() - t0
        if self.compact and not self.early:  # kept until the allocation: ranks below break-even
            sp = {n: self._cut(n, v) for n, v in sp.items()}
        return sp, mine

    def _cut(self, name: str, spectrum):
        """``spectrum`` cut to the largest rank that saves parameters, in its weight's dtype."""
        from .allocate.budget import max_factored_rank
        return spectrum.compact(max_factored_rank(*spectrum.shape), dtype=self.weights[name].dtype)

    def record(self, timer: StageTimer) -> None:
        """Check every target was decomposed; the streamed schedule's phases as sub-stages of the calibration."""
        missing = [n for n in self.by_name if n not in self.spectra]
        if missing:
            raise NotCollectedError(f"prepare(stream=True): the streamed sweep decomposed no {missing[0]} (and "
                                    f"{len(missing) - 1} more targets)")
        peak = timer.stages["calibration"].peak_rss_mib
        for ph, sec in self.info.get("seconds", {}).items():
            if ph != "total":
                timer.stages[f"calibration/{ph}"] = Stage(seconds=sec, peak_rss_mib=peak)
        timer.stages["factorisation"] = Stage(seconds=sum(self.phases.values()), peak_rss_mib=peak)


def _on_cpu(v):
    """A score (a tensor, or a dataclass of tensors such as ``BSIScores``) with its tensors on the CPU, to send."""
    if isinstance(v, torch.Tensor):
        return v.detach().cpu()
    return dataclasses.replace(v, **{f.name: getattr(v, f.name).detach().cpu() for f in dataclasses.fields(v)
                                     if isinstance(getattr(v, f.name), torch.Tensor)})


def compress(model: nn.Module, config: Optional[LowRankConfig] = None, calibration: Any = None, *,
             tokenizer=None, nsamples: int = 32, seqlen: int = 512, seed: int = 0, data_dir=None,
             stats=None, device=None, progress: bool = True, calib_batch_size: int = 1, stream: bool = False,
             scratch_dir=None, max_host_memory: Optional[int] = None) -> CompressionReport:
    """Compress ``model`` in place; return a :class:`CompressionReport`.

    Each targeted Linear (default: every ``nn.Linear`` in the decoder layers) becomes a
    ``LowRankLinear`` (bias kept) at the rank the allocation gives, or stays dense
    when that rank reaches break-even ``mn/(m+n)``. See :func:`prepare` for the arguments.
    """
    check_model("compress", model)
    config = as_config("compress", config)
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
    check_model("compress_many", model)
    config = as_config("compress_many", config)
    if isinstance(keeps, (str, bytes, dict)) or not isinstance(keeps, Sequence):
        raise WrongTypeError(f"compress_many: keeps must be a list of ratios or option dicts, got "
                             f"{type(keeps).__name__} {keeps!r:.40}")
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
