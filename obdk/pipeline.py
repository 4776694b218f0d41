"""``obdk.compress``: calibrate → decompose → allocate → swap in low-rank modules.

The work is split so that any ratio comes from one decomposition:
:func:`prepare` calibrates once and computes every targeted matrix's full
spectrum (a :class:`Plan`); :meth:`Plan.apply` allocates ranks for a ``keep`` and
swaps modules, costing only truncation and packing. :func:`compress` is
``prepare`` + ``apply`` on the same model.
"""
from __future__ import annotations

import contextvars
import copy
import fnmatch
import logging
import resource
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn

from .config import LowRankConfig
from .models import linear_groups, set_module
from .nn import LowRankLinear

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- stage timing


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class Stage:
    """Wall time and peak memory of one pipeline stage."""
    seconds: float = 0.0
    peak_rss_mib: float = 0.0
    peak_cuda_mib: Optional[float] = None


class StageTimer:
    """Accumulates :class:`Stage` records by name (``with timer("calibration"): ...``)."""

    def __init__(self) -> None:
        self.stages: dict[str, Stage] = {}

    @contextmanager
    def __call__(self, name: str):
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize()
            st = self.stages.setdefault(name, Stage())
            st.seconds += time.perf_counter() - t0
            st.peak_rss_mib = max(st.peak_rss_mib, _peak_rss_mib())
            if cuda:
                st.peak_cuda_mib = max(st.peak_cuda_mib or 0.0, torch.cuda.max_memory_allocated() / 2**20)

    def to_dict(self) -> dict[str, dict]:
        return {k: asdict(v) for k, v in self.stages.items()}


# --------------------------------------------------------------------------- report


@dataclass
class ModuleReport:
    """One targeted Linear: its shape, chosen rank (None = kept dense) and costs."""
    name: str
    out_features: int
    in_features: int
    rank: Optional[int]
    params: int
    dense_params: int
    predicted_loss: float
    damping: dict
    seconds: float


@dataclass
class CompressionReport:
    """What :func:`compress` did: per module and totals, stage timings, provenance."""
    config: dict
    modules: list[ModuleReport]
    targeted_params_before: int
    targeted_params_after: int
    model_params_before: int
    model_params_after: int
    predicted_loss: float
    stages: dict[str, dict]
    calibration: Optional[dict] = None
    allocation: dict = field(default_factory=dict)
    measured: dict = field(default_factory=dict)

    def record_measurement(self, dense: dict, compressed: dict) -> None:
        """Store a measured loss increase (two :func:`obdk.eval.perplexity` results on the same windows)."""
        self.measured = {
            "dataset": compressed.get("dataset"), "seqlen": compressed.get("seqlen"),
            "windows": compressed.get("windows"), "dense_ppl": dense["ppl"], "ppl": compressed["ppl"],
            "loss_increase": compressed["nll"] - dense["nll"], "predicted_loss_increase": self.predicted_loss,
        }

    @property
    def keep_actual(self) -> float:
        """Kept fraction of the targeted Linear parameters."""
        return self.targeted_params_after / max(1, self.targeted_params_before)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["keep_actual"] = self.keep_actual
        return d

    def summary(self) -> str:
        """A short human-readable summary (totals and stage times)."""
        c = self.config
        lines = [
            f"method={c['method']} alloc={c.get('alloc')} keep={c['keep']} → kept {self.keep_actual:.4f} of targeted Linear params",
            f"targeted params {self.targeted_params_before:,} → {self.targeted_params_after:,}; "
            f"model params {self.model_params_before:,} → {self.model_params_after:,}",
            f"modules: {sum(m.rank is not None for m in self.modules)} low-rank, {sum(m.rank is None for m in self.modules)} dense; "
            f"predicted loss increase {self.predicted_loss:.4f} nats",
            "stages: " + ", ".join(self._stage_text(k) for k in self.stages if "/" not in k),
        ]
        return "\n".join(lines)

    def _stage_text(self, name: str) -> str:
        """``factorisation 7.7s (roots 1.1s, …)``: a stage with its sub-stages (``name/sub``) in brackets."""
        subs = [(k.split("/", 1)[1], v["seconds"]) for k, v in self.stages.items() if k.startswith(name + "/")]
        text = f"{name} {self.stages[name]['seconds']:.1f}s"
        return text + (" (" + ", ".join(f"{k} {v:.1f}s" for k, v in subs) + ")" if subs else "")


def _nparams(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    """A targeted Linear: full name, shape, and the key of its (shared) input."""
    name: str
    m: int
    n: int
    input_key: str
    has_bias: bool


def select_targets(model: nn.Module, config: LowRankConfig) -> list[Target]:
    """Targeted Linears of ``model`` in forward order, after ``targets``/``ignore`` patterns."""
    out = []
    for grp in linear_groups(model):
        for name in grp.names:
            if config.targets is not None and not any(fnmatch.fnmatchcase(name, p) for p in config.targets):
                continue
            if any(fnmatch.fnmatchcase(name, p) for p in config.ignore):
                continue
            lin = model.get_submodule(name)
            if not isinstance(lin, nn.Linear):
                continue
            out.append(Target(name, lin.out_features, lin.in_features, grp.key, lin.bias is not None))
    if not out:
        raise ValueError(f"no Linear matched: targets={config.targets} ignore={config.ignore}")
    return out




# --------------------------------------------------------------------------- plan


@dataclass
class Plan:
    """Calibrated statistics and full spectra of every target: allocate any ``keep`` cheaply."""
    config: LowRankConfig
    targets: list[Target]
    spectra: dict[str, Any]
    stats: Any
    calibration: Optional[dict]
    timer: StageTimer
    extra: dict = field(default_factory=dict)

    def allocate(self, keep: Optional[float] = None, alloc: Optional[str] = None):
        """Ranks for ``keep`` (default the config's) → an :class:`obdk.allocate.Allocation`."""
        from . import allocate as A
        keep = self.config.keep if keep is None else keep
        alloc = alloc or self.config.resolved_alloc
        mult = self.config.rank_multiple
        specs = []
        for t in self.targets:
            spec = self.spectra[t.name]
            kw = {"costs": (spec.eigenvalues / 2).double().cpu()}
            if alloc == "zero-sum":
                kw["deltas"] = self.extra["deltas"][t.name]
            if alloc == "bsi":
                # BSI removes bases only until the budget is met (its greedy never removes more);
                # a negative estimate (Hutchinson noise) must not make removing extra bases "profitable".
                # Clamp at 0 and break ties by the spectral cost, so equal scores drop the tail first.
                imp = self.extra["bsi"][t.name].importance.double().cpu().clamp_min(0)
                kw["importance"] = imp + 1e-12 * kw["costs"][: imp.numel()]
            specs.append(A.MatrixSpec(t.name, t.m, t.n, **kw))
        if alloc == "uniform":
            return A.allocate_uniform(specs, keep, multiple=mult)
        if alloc == "global":
            return A.allocate_global(specs, keep, floor=self.config.floor, multiple=mult)
        if alloc == "zero-sum":
            return A.allocate_zero_sum(specs, keep)
        if alloc == "bsi":
            return A.allocate_bsi(specs, keep, multiple=mult, floor=self.config.floor, order=self.config.bsi_order)
        raise ValueError(f"unknown allocation {alloc!r}")

    def factors(self, name: str, rank: int, kept_indices=None):
        """``(a [r, n], b [m, r], predicted_loss)`` of target ``name`` at ``rank`` (or exactly ``kept_indices``)."""
        spec = self.spectra[name]
        if kept_indices is not None:
            a, b = spectrum_as_svd(spec).factors(indices=kept_indices)
            dropped = torch.ones(spec.eigenvalues.numel(), dtype=torch.bool)
            dropped[torch.as_tensor(kept_indices, dtype=torch.long)] = False
            return a, b, 0.5 * float(spec.eigenvalues[dropped].sum())
        fac = spec.truncate(int(rank), keep_dense_at_break_even=False)
        return fac.a, fac.b, float(fac.predicted_loss)

    def _gradient_correct(self, model: nn.Module, factors: dict[str, tuple],
                          kind: str) -> tuple[dict[str, tuple], dict[str, dict]]:
        """One-step gradient correction of every truncation, then re-truncation in the same whitening.

        With every target at its truncation ``W_r = b a`` (dense, temporarily), one loss gradient
        ``G = ∂L/∂W`` at ``W_r`` over the calibration windows (one forward + backward pass: it
        sees what the truncation of *every* matrix did to the loss, which no per-matrix model
        does). Per matrix, with ``Δ = W − W_r``, a direction ``P`` and the projection of ``Δ``
        on it:

        * ``kind="zs"`` (ZS-SVD): ``P = G``, step ``c = ⟨G,Δ⟩/⟨G,G⟩`` (Euclidean projection);
        * ``kind="kfac"``: the K-FAC natural gradient ``P = C_g⁻¹ G C_x⁻¹`` (damped covariances as
          the decomposition used them; identity for a side the whitening lacks), step
          ``c = ⟨G,Δ⟩/⟨G,P⟩``: the projection of ``Δ`` on ``P`` in the metric ``C_x ⊗ C_g``
          the truncation minimises (``⟨P, HΔ⟩_F / ⟨P, HP⟩_F`` with ``HP = G``). Solves use
          Cholesky factors, no inverse. For plain SVD both covariances are ``I`` and it equals ``zs``.

        ``W ← W_r + c·P``, truncated to the same rank. Returns ``{name: (a, b, predicted)}``
        (for ``obd`` the predicted loss is measured against the original ``W``) and the
        damping the ``kfac`` solves used per target (``{name: {"cx": α, "cg": α}}``).
        """
        from .allocate import gradient_step, summed_weight_grads
        from .decompose import damp_covariance, factorize, kfac_loss
        from .decompose.roots import damped_cholesky, normalize_cov
        data = self.extra["data"]
        names = list(factors)
        originals = {n: model.get_submodule(n).weight.detach().clone() for n in names}
        try:
            with torch.no_grad():
                for n in names:
                    a, b, _ = factors[n]
                    w = model.get_submodule(n).weight
                    w.copy_((b.double() @ a.double()).to(w.dtype))
            grads = summed_weight_grads(model, data.input_ids, names, attention_mask=data.attention_mask)
        finally:
            with torch.no_grad():
                for n in names:
                    model.get_submodule(n).weight.copy_(originals[n])
        out, used = {}, {}
        whitening = self.config.resolved_whitening
        cdtype = torch.float64 if self.config.compute_dtype == "float64" else torch.float32
        chol_x: dict[str, tuple[torch.Tensor, float]] = {}  # one factor per unique input

        def chol(c: torch.Tensor, alpha: float, what: str) -> tuple[torch.Tensor, float]:
            # of C/mean(diag C) + α·I: the step c·P does not depend on the scale of either factor
            cn, _ = normalize_cov(c.to(cdtype).unsqueeze(0))
            L, al = damped_cholesky(cn, [alpha], name=what, damping_max=1e3, growth=10.0, fn="correct='kfac'")
            return L[0], al[0]

        for n in names:
            a, b, _ = factors[n]
            w = originals[n].to(cdtype)
            wr = b.to(cdtype) @ a.to(cdtype)
            g = grads[n].to(cdtype)
            cx = self.stats.cx_for(n) if whitening in ("svd-llm", "obd") else None
            cg = self.stats.cg[n] if whitening == "obd" else None
            d = self.spectra[n].damping
            lg = lx = None
            if kind == "kfac":
                used[n] = {}
                if cg is not None:
                    lg, used[n]["cg"] = chol(cg, d.get("cg", self.config.damping), f"{n} C_g")
                if cx is not None:
                    key = self.stats.input_key.get(n, n)
                    if key not in chol_x:
                        chol_x[key] = chol(cx, d.get("cx", self.config.damping), f"{n} C_x")
                    lx, used[n]["cx"] = chol_x[key]
            wc, _ = gradient_step(w, wr, g, chol_x=lx, chol_g=lg)
            if not bool(torch.isfinite(wc).all()):
                raise FloatingPointError(f"correct={kind!r}: {n}: the corrected weight is not finite "
                                         f"(gradient or covariance with NaN/inf?)")
            fac = factorize(wc.to(originals[n].dtype), a.shape[0], method=whitening if whitening != "asvd" else "svd",
                            cx=cx, cg=cg, solver=self.config.solver, compute_dtype=cdtype,
                            damping=self.config.damping, keep_dense_at_break_even=False)
            pred = float(fac.predicted_loss)
            if whitening == "obd":  # predicted loss of the corrected truncation against the original W
                delta = w - fac.b.to(cdtype) @ fac.a.to(cdtype)
                pred = kfac_loss(delta, damp_covariance(cx.to(cdtype), d.get("cx", 0.0)),
                                 damp_covariance(cg.to(cdtype), d.get("cg", 0.0)))
            out[n] = (fac.a, fac.b, pred)
        return out, used

    def apply(self, model: nn.Module, keep: Optional[float] = None, alloc: Optional[str] = None,
              model_params_before: Optional[int] = None) -> CompressionReport:
        """Swap each target of ``model`` for a ``LowRankLinear`` at the allocated rank (or keep it dense)."""
        timer = StageTimer()
        keep = self.config.keep if keep is None else keep
        before = model_params_before if model_params_before is not None else _nparams(model)
        with timer("allocation"):
            allocation = self.allocate(keep, alloc)
        mods: list[ModuleReport] = []
        kept_map = (allocation.meta or {}).get("kept_indices", {}) if allocation.strategy == "bsi" else {}
        factors: dict[str, tuple] = {}
        extra_damping: dict[str, dict] = {}  # per target, from a correction's solves ("kfac_cx", "refit_…")
        with timer("truncation"):
            for t in self.targets:
                rank = allocation.ranks.get(t.name)
                if rank is not None:
                    factors[t.name] = self.factors(t.name, rank, kept_map.get(t.name))
        steps = (self.config.resolved_correct or "").split("+")
        if factors and steps[0] in ("zs", "kfac"):
            with timer("correction"):
                for kind in steps:  # e.g. zs+kfac: one gradient pass per step, each at the previous result
                    factors, used = self._gradient_correct(model, factors, kind)
                    for n, d in used.items():
                        extra_damping.setdefault(n, {}).update({f"kfac_{k}": v for k, v in d.items()})
        if self.config.resolved_correct == "seq" and factors:
            from .refit import sequential_refit
            with timer("correction"):
                factors, used = sequential_refit(model, self, {n: factors[n][0].shape[0] for n in factors},
                                                 self.extra["data"], progress=self.extra.get("progress", False))
                extra_damping = {n: {f"refit_{k}": v for k, v in d.items()} for n, d in used.items()}
        mods: list[ModuleReport] = []
        with timer("packing"):
            for t in self.targets:
                t0 = time.perf_counter()
                rank = allocation.ranks.get(t.name)
                spec = self.spectra[t.name]
                lin = model.get_submodule(t.name)
                if rank is None:
                    mods.append(ModuleReport(t.name, t.m, t.n, None, t.m * t.n, t.m * t.n, 0.0,
                                             dict(spec.damping), time.perf_counter() - t0))
                    continue
                a, b, pred = factors[t.name]
                damping = dict(spec.damping)
                damping.update(extra_damping.get(t.name, {}))
                bias = lin.bias.detach() if lin.bias is not None else None
                new = LowRankLinear.from_factors(a.to(lin.weight.dtype), b.to(lin.weight.dtype), bias)
                new.to(lin.weight.device)
                set_module(model, t.name, new)
                mods.append(ModuleReport(t.name, t.m, t.n, int(rank), int(rank) * (t.m + t.n), t.m * t.n,
                                         pred, damping, time.perf_counter() - t0))
        stages = dict(self.timer.to_dict())
        stages.update(timer.to_dict())
        cfg = self.config.to_dict()
        cfg["keep"] = keep
        cfg["alloc"] = alloc or self.config.resolved_alloc  # record what was used, not "default"
        cfg["correct"] = self.config.resolved_correct or "none"
        report = CompressionReport(
            config=cfg, modules=mods,
            targeted_params_before=sum(m.dense_params for m in mods),
            targeted_params_after=sum(m.params for m in mods),
            model_params_before=before, model_params_after=_nparams(model),
            predicted_loss=sum(m.predicted_loss for m in mods),
            stages=stages, calibration=self.calibration,
            allocation={"strategy": allocation.strategy, "budget": allocation.budget,
                        "params": allocation.params, "predicted_loss": allocation.predicted_loss,
                        **{k: v for k, v in (allocation.meta or {}).items()
                           if isinstance(v, (int, float, str, bool)) or v is None}},
        )
        model._obdk_report = report
        model._obdk_config = LowRankConfig.from_dict(cfg)
        return report


def _calibration_windows(calibration, tokenizer, nsamples, seqlen, seed, data_dir, config=None):
    from .calibrate.data import get_calibration_windows
    if calibration is None:
        why = ""
        if config is not None and config.resolved_correct is not None:
            why = (f" (method {config.method!r} with correct={config.resolved_correct!r} runs the model on the "
                   f"calibration windows after truncation, even with precomputed stats=; pass calibration=..., "
                   f"or correct='none')")
        raise ValueError(f"compress: this method needs calibration data (calibration=...){why}")
    if hasattr(calibration, "input_ids"):
        return calibration
    if isinstance(calibration, torch.Tensor) and calibration.dim() == 2:
        nsamples, seqlen = calibration.shape  # already windows: take them as they are
    return get_calibration_windows(calibration, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                   data_dir=data_dir)


def prepare(model: nn.Module, config: Optional[LowRankConfig] = None, calibration: Any = None, *,
            tokenizer=None, nsamples: int = 32, seqlen: int = 512, seed: int = 0, data_dir=None,
            stats=None, device=None, progress: bool = True, timer: Optional[StageTimer] = None,
            batch: Optional[int] = None, workers: Optional[int] = None, calib_batch_size: int = 1) -> Plan:
    """Calibrate ``model`` once and decompose every target fully (see :class:`Plan`).

    ``calibration``: a ``CalibrationData``, a dataset name (``wikitext2:validation``),
    a file path, a ``list[str]`` or a LongTensor [N, T] of token ids. ``stats`` may
    pass precomputed :class:`obdk.calibrate.stats.Statistics`. ``device`` runs the
    decompositions elsewhere (e.g. ``"cuda"``). ``batch``: how many same-shaped targets share one
    batched decomposition call (:func:`obdk.decompose.spectra`; default 8 on CUDA, where it fills
    the GPU, and 1 on CPU, where LAPACK runs a batch as a loop anyway); results are identical.
    ``workers``: on CPU, how many decompositions run at once, each on one intra-op thread
    (default: ``torch.get_num_threads()``; the thread count is restored afterwards). LAPACK's
    eigen-solvers at these sizes use a second core poorly, so independent problems side by side
    fill the cores better than one problem on all of them; each result is the same
    single-problem computation. On CUDA it is 1 (the GPU is filled by ``batch``).
    ``calib_batch_size``: calibration windows per forward (and backward) pass; more run faster
    where memory allows (SmolLM2-135M on 2 CPU cores, ``C_x``+``C_g``: 4 windows of 512 tokens
    ≈ 9 % faster than 1) and give the same statistics up to rounding.
    """
    from .decompose import spectra as decompose_spectra
    from .decompose import spectrum as decompose_spectrum
    from .decompose.closed_form import phase_clock
    config = config or LowRankConfig()
    timer = timer or StageTimer()
    targets = select_targets(model, config)
    need = config.needed_stats
    fingerprint = None
    data = None
    if (need and stats is None) or config.resolved_alloc == "bsi" or config.resolved_correct is not None:
        data = _calibration_windows(calibration, tokenizer, nsamples, seqlen, seed, data_dir, config)
    if need and stats is None:
        with timer("calibration"):
            from .calibrate.stats import calibrate
            stats = calibrate(model, data, stats=need, fisher=config.fisher, seed=seed, progress=progress,
                              batch_size=calib_batch_size)
    if stats is not None:
        fingerprint = getattr(stats, "fingerprint", None)
    whitening = config.resolved_whitening
    cdtype = torch.float64 if config.compute_dtype == "float64" else torch.float32
    spectra: dict[str, Any] = {}
    with timer("factorisation"):
        from tqdm.auto import tqdm
        bar = tqdm(total=len(targets), desc="decompose", disable=not progress)
        where = torch.device(device) if device is not None else model.get_submodule(targets[0].name).weight.device
        on_gpu = where.type == "cuda"
        size = int(batch) if batch is not None else (8 if on_gpu else 1)
        if size < 1:
            raise ValueError(f"prepare: batch={batch} must be ≥ 1")
        nwork = 1 if on_gpu else (int(workers) if workers is not None else torch.get_num_threads())
        if nwork < 1:
            raise ValueError(f"prepare: workers={workers} must be ≥ 1")

        def run(chunk: list[Target]) -> list[tuple[str, Any]]:
            try:
                return decompose(chunk)
            except ValueError as e:  # name the module(s) at fault
                raise ValueError(f"{', '.join(t.name for t in chunk)}: {e}") from e

        def decompose(chunk: list[Target]) -> list[tuple[str, Any]]:
            ws = [model.get_submodule(t.name).weight.detach() for t in chunk]
            cxs = [stats.cx_for(t.name) for t in chunk] if "cx" in need and whitening != "svd" else None
            cgs = [stats.cg[t.name] for t in chunk] if whitening == "obd" else None
            if whitening == "asvd":
                return [(chunk[0].name, _asvd_spectrum(ws[0], cxs[0] if cxs else None, config, cdtype, device))]
            if len(chunk) == 1:
                return [(chunk[0].name, decompose_spectrum(
                    ws[0], method=whitening, cx=cxs[0] if cxs else None, cg=cgs[0] if cgs else None,
                    solver=config.solver, compute_dtype=cdtype, damping=config.damping, device=device))]
            # same-shaped targets (e.g. every layer's q_proj): one batched call per linear-algebra step
            out = decompose_spectra(ws, method=whitening, cxs=cxs, cgs=cgs, solver=config.solver,
                                    compute_dtype=cdtype, damping=config.damping, device=device)
            return [(t.name, sp) for t, sp in zip(chunk, out)]

        chunks = _decomposition_batches(targets, size if whitening != "asvd" else 1)
        with phase_clock() as phases:
            for name, sp in _run_chunks(run, chunks, nwork, bar):
                spectra[name] = sp
        bar.close()
    for ph, sec in phases.items():  # summed over problems (workers overlap): not added to the total
        timer.stages[f"factorisation/{ph}"] = Stage(seconds=sec, peak_rss_mib=timer.stages["factorisation"].peak_rss_mib)
    plan = Plan(config, targets, spectra, stats, fingerprint, timer)
    if data is not None:
        plan.extra["data"] = data
    plan.extra["progress"] = progress
    if config.resolved_alloc in ("zero-sum", "bsi"):
        _prepare_gradient_scores(plan, model, data, progress)
    return plan


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


def _decomposition_batches(targets: list[Target], size: int) -> list[list[Target]]:
    """Targets grouped by shape (m, n), in first-seen order, cut into chunks of ≤ ``size``."""
    by_shape: dict[tuple[int, int], list[Target]] = {}
    for t in targets:
        by_shape.setdefault((t.m, t.n), []).append(t)
    return [grp[i:i + size] for grp in by_shape.values() for i in range(0, len(grp), size)]


def _asvd_spectrum(w, cx, config, cdtype, device):
    """ASVD: plain SVD of ``W·D`` with ``D = diag(rms activation)^α`` (from diag C_x), factors unscaled.

    The returned spectrum's ``factor_a`` is divided by ``D`` so truncations approximate ``W``
    itself; its eigenvalues are those of ``W·D`` (not loss units: use uniform allocation).
    """
    from .decompose import spectrum as decompose_spectrum
    from .decompose.roots import all_finite
    diag = torch.diagonal(cx)
    if not all_finite(diag):
        raise ValueError("asvd: cx (the input covariance) has non-finite diagonal entries")
    d = diag.to(cdtype).clamp_min(0).sqrt().pow(config.asvd_alpha)
    pos = d > 0
    d = torch.where(pos, d, d[pos].min() if pos.any() else torch.ones_like(d))
    spec = decompose_spectrum(w.to(cdtype) * d.to(w.device), method="svd", compute_dtype=cdtype, device=device)
    spec.factor_a = spec.factor_a / d.to(spec.factor_a.device, spec.factor_a.dtype)
    spec.weight = w
    spec.method = "asvd"
    return spec


def spectrum_as_svd(spec):
    """View a :class:`obdk.decompose.Spectrum` as an :class:`obdk.allocate.WhitenedSVD`.

    Component i of any whitening is ``b_i a_iᵀ``; with ``σ_i = ‖b_i‖‖a_i‖`` and unit
    ``u_i = b_i/‖b_i‖``, ``x_i = a_i/‖a_i‖`` the weight is ``Σ σ_i u_i x_iᵀ``, so ZS-SVD's
    ``δ_i = −σ_i ∂L/∂σ_i`` and BSI's importance are defined for SVD, SVD-LLM and OBD alike
    (for SVD-LLM this is exactly ZS-SVD's whitened-coordinate score).
    """
    from .allocate import WhitenedSVD
    cached = getattr(spec, "_obdk_svd", None)
    if cached is not None:
        return cached
    b, a = spec.factor_b.double(), spec.factor_a.double()
    nb, na = b.norm(dim=0), a.norm(dim=1)
    tiny = torch.finfo(torch.float64).tiny
    u = b / nb.clamp_min(tiny)
    x = a / na.clamp_min(tiny)[:, None]
    ws = WhitenedSVD(u=u, sigma=nb * na, v=x.T.contiguous(), chol=None)
    spec._obdk_svd = ws
    return ws


def _prepare_gradient_scores(plan: Plan, model, data, progress) -> None:
    """Per-component scores for ``zero-sum`` (δ from calibration weight gradients) and ``bsi``."""
    from .allocate import bsi_scores
    plan.extra["data"] = data
    alloc = plan.config.resolved_alloc
    if alloc == "zero-sum":
        with plan.timer("scores"):
            deltas = {}
            for t in plan.targets:
                ws = spectrum_as_svd(plan.spectra[t.name])
                g = plan.stats.grad[t.name].to(ws.u.device)
                deltas[t.name] = (-ws.sigma * ws.grad_sigma(g)).cpu()
            plan.extra["deltas"] = deltas
    if alloc == "bsi":
        with plan.timer("scores"):
            decomps = {t.name: spectrum_as_svd(plan.spectra[t.name]) for t in plan.targets}
            gen = torch.Generator().manual_seed(0)
            plan.extra["bsi"] = bsi_scores(model, data.input_ids, decomps, probes=plan.config.probes,
                                           eps=plan.config.eps, attention_mask=data.attention_mask, generator=gen)


def compress(model: nn.Module, config: Optional[LowRankConfig] = None, calibration: Any = None, *,
             tokenizer=None, nsamples: int = 32, seqlen: int = 512, seed: int = 0, data_dir=None,
             stats=None, device=None, progress: bool = True, calib_batch_size: int = 1) -> CompressionReport:
    """Compress ``model`` in place; return a :class:`CompressionReport`.

    Each targeted Linear (default: every ``nn.Linear`` in the decoder layers) becomes a
    ``LowRankLinear`` (bias kept) at the rank the allocation gives, or stays dense
    when that rank reaches break-even ``mn/(m+n)``. See :func:`prepare` for
    ``calibration``; ``nsamples``×``seqlen`` tokens, seeded by ``seed``, are drawn
    from it when it is not already windows; ``calib_batch_size`` windows run per pass.
    """
    config = config or LowRankConfig()
    before = _nparams(model)
    plan = prepare(model, config, calibration, tokenizer=tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed,
                   data_dir=data_dir, stats=stats, device=device, progress=progress,
                   calib_batch_size=calib_batch_size)
    return plan.apply(model, model_params_before=before)


def compress_many(model: nn.Module, config: LowRankConfig, keeps: list[float], calibration: Any = None,
                  **kw) -> list[tuple[nn.Module, CompressionReport]]:
    """One calibration and one decomposition, then one compressed copy of ``model`` per ``keep``.

    Returns ``[(model_copy, report), ...]`` in the order of ``keeps``; ``model`` is not modified.
    """
    before = _nparams(model)
    plan = prepare(model, config, calibration, **kw)
    out = []
    for k in keeps:
        m = copy.deepcopy(model)
        out.append((m, plan.apply(m, keep=k, model_params_before=before)))
    return out
