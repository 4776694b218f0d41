"""The one-step corrections after truncation: ZS-SVD's projected gradient and obdk's K-FAC step.

With every target at its truncation ``W_r = b a`` (dense, temporarily), one loss gradient
``G = ∂L/∂W`` at ``W_r`` over the calibration windows (one forward + backward pass) sees what the
truncation of *every* matrix did to the loss, which no per-matrix model does. Per matrix, with
``Δ = W − W_r``, a direction ``P`` and the projection of ``Δ`` on it (:func:`gradient_step`):

* ``zs`` (ZS-SVD): ``P = G``, ``c = ⟨G,Δ⟩/⟨G,G⟩`` (Euclidean projection);
* ``kfac``: the K-FAC natural gradient ``P = C_g⁻¹ G C_x⁻¹`` (damped covariances as the
  decomposition used them; identity for a side the whitening lacks), ``c = ⟨G,Δ⟩/⟨G,P⟩``: the
  projection of ``Δ`` on ``P`` in the metric ``C_x ⊗ C_g`` the truncation minimises. Solves use
  Cholesky factors, no inverse. For plain SVD both covariances are ``I`` and it equals ``zs``.

``W ← W_r + c·P``, re-truncated to the same rank in the same whitening.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..calibrate.head import summed_weight_grads
from ..calibrate.layer_statistics import LayerStatistics
from ..decompose import damp_covariance, factorize, kfac_loss
from ..decompose.roots import cholesky_root
from ..decompose.whitened import whitened_svd
from ..errors import ConfigError, DataError, NonFiniteError, NotCollectedError
from ..models import decoder_layers
from ..stream.options import Streaming

log = logging.getLogger(__name__)

__all__ = ["ZSCorrection", "gradient_step", "zs_correct", "gradient_correct", "check_world", "STEPS"]

#: the gradient steps ``LowRankConfig.correct`` can chain (``zs+kfac``: one after the other)
STEPS = ("zs", "kfac")


class ZSCorrection(NamedTuple):
    """Corrected factors ``a`` [r, n], ``b`` [m, r] and the step ``coef = ⟨g,Δ⟩/⟨g,g⟩``."""
    a: Tensor
    b: Tensor
    coef: float


def gradient_step(weight: Tensor, wr: Tensor, grad: Tensor, *, chol_x: Optional[Tensor] = None,
                  chol_g: Optional[Tensor] = None) -> tuple[Tensor, float]:
    """The dense step of a one-step correction: ``W' = W_r + c·P``, returns ``(W', c)``.

    ``weight`` ``W`` [m, n], ``wr`` the truncation ``W_r`` [m, n], ``grad`` ``G = ∂L/∂W`` at
    ``W_r`` [m, n], all in the compute dtype. ``chol_x`` [n, n] / ``chol_g`` [m, m]: lower
    Cholesky factors of the damped ``C_x`` / ``C_g`` (None = identity). The direction is
    ``P = C_g⁻¹ G C_x⁻¹`` (two triangular solves each, no inverse; ``P = G`` without factors,
    ZS-SVD's step) and ``c = ⟨G, Δ⟩ / ⟨G, P⟩`` with ``Δ = W − W_r``: the ``c`` minimising
    ``‖W_r + cP − W‖²`` in the metric ``H = C_x ⊗ C_g`` (``HP = G``), i.e. the projection of
    what the truncation removed on the preconditioned gradient, in the geometry the
    truncation itself minimises. Where the loss is that quadratic (``G ∝ C_g(W_r − W)C_x``) the
    step lands on ``W`` exactly. A zero ``⟨G, P⟩`` gives ``c = 0``.
    """
    p = grad
    if chol_g is not None:
        p = torch.cholesky_solve(p, chol_g)
    if chol_x is not None:
        p = torch.cholesky_solve(p.T, chol_x).T
    gp = float((grad * p).sum())
    coef = float((grad * (weight - wr)).sum()) / gp if gp > 0 else 0.0
    return wr + coef * p, coef


def zs_correct(weight: Tensor, a: Tensor, b: Tensor, grad: Tensor, *, chol: Optional[Tensor] = None,
               compute_dtype: torch.dtype = torch.float64) -> ZSCorrection:
    """ZS-SVD's one-step correction of a truncation ``W_r = b a``, re-truncated to the same rank.

    ``weight``: dense ``W`` [m, n]; ``a`` [r, n], ``b`` [m, r]: the truncated factors;
    ``grad``: the loss gradient ``g = ∂L/∂W`` evaluated *at* ``W_r`` [m, n];
    ``chol``: the lower whitening factor ``S`` [n, n] the truncation was made in
    (``None`` = plain SVD). With ``Δ = W − W_r``, the step projects ``Δ`` on the
    gradient direction: ``W' = W_r + (⟨g,Δ⟩/⟨g,g⟩)·g`` (to first order it recovers
    the loss change ``⟨g, Δ⟩`` that moving back to ``W`` would give). ``W'`` is then
    truncated to rank ``r`` in the same whitened coordinates (SVD of ``W' S``).
    Returns :class:`ZSCorrection` with factors in ``a.dtype``; a zero gradient
    returns the input factors and ``coef = 0``.
    """
    m, n = weight.shape
    r = a.shape[0]
    if tuple(a.shape) != (r, n) or tuple(b.shape) != (m, r) or tuple(grad.shape) != (m, n):
        raise DataError(f"zs_correct: need weight [m, n], a [r, n], b [m, r], grad [m, n]; got "
                         f"{tuple(weight.shape)}, {tuple(a.shape)}, {tuple(b.shape)}, {tuple(grad.shape)}")
    w = weight.detach().to(compute_dtype)
    wr = b.detach().to(compute_dtype) @ a.detach().to(compute_dtype)
    g = grad.detach().to(w.device, compute_dtype)
    if float((g * g).sum()) == 0.0:
        return ZSCorrection(a.detach().clone(), b.detach().clone(), 0.0)
    wc, coef = gradient_step(w, wr, g)
    dec = whitened_svd(wc, chol=chol, compute_dtype=compute_dtype)
    a2, b2 = dec.factors(rank=r)
    log.debug("zs_correct: rank %d, coef %.4g", r, coef)
    return ZSCorrection(a2.to(a.dtype), b2.to(b.dtype), coef)


def check_world(stream) -> None:
    """Refuse an owner-reduced streamed plan (:class:`~obdk.stream.options.Streaming` with ``owners``: its statistics
    spread over ``stream.world`` ranks, each holding its own matrices') outside a process group of that size:
    :class:`ConfigError`."""
    from ..stream import distributed as dist
    want, have = int(stream.world), dist.world()[1]
    if have != want:
        raise ConfigError(f"correct: this streamed plan was prepared by {want} ranks, each keeping the statistics of "
                          f"the matrices it owns; apply its correction on all {want} ranks together (this process "
                          f"sees {have}{', inside dist.alone()' if have == 1 else ''}), or prepare it again here")


def gradient_correct(model: nn.Module, factors: Mapping[str, tuple], kind: str, *, data, stats, spectra,
                     config, progress: bool = False, stream: Optional[Streaming] = None,
                     scales: Optional[Sequence[float]] = None) -> tuple[dict[str, tuple], dict[str, dict]]:
    """One correction step (``kind`` ``zs`` or ``kfac``, see the module docstring) of every truncation.

    ``model``: the dense model (its targets are set to ``W_r = b a`` for the gradient pass and
    restored afterwards, also on error; streamed in one process, ``W_r`` goes to each fetched layer's private
    copy instead and the model is never written); ``factors``: ``{name: (a [r, n], b [m, r], predicted)}``
    (any mapping: streamed, each is read when its layer is fetched and stepped, e.g. a
    :class:`~obdk.correct.factor_store.FactorStore` or :class:`~obdk.correct.factor_store.Truncations`);
    ``data``: the calibration windows (``input_ids`` [N, T], ``attention_mask``); ``stats``: the
    :class:`~obdk.calibrate.statistics.Statistics` the spectra came from, or the
    :class:`~obdk.stream.layer_files.LayerStatistics` of a streamed plan; ``spectra``: ``{name:
    Spectrum}`` (for the damping each decomposition used); ``config``: the resolved
    :class:`~obdk.config.LowRankConfig`. ``stream``: None for one whole-model gradient pass
    (:func:`~obdk.calibrate.head.summed_weight_grads`), or a streamed plan's :class:`~obdk.stream.options.Streaming`
    (``Plan.stream``) for a layer-streamed one (:func:`~obdk.calibrate.stream.calibrate_streamed` with its options;
    a named consumer, :class:`_StreamedSteps`): the same gradients, each layer's step taken as soon as its
    gradients are final, with that layer's statistics only. A ``stream`` with ``owners`` (an owner-reduced streamed
    plan under ``torch.distributed``, where each rank's ``stats`` hold only the matrices it owns) runs on every rank
    together: the pass shards the windows, each ``∂L/∂W`` is reduced to its owner, which takes the step, and the
    results (factors, predicted loss, damping) are broadcast to every rank
    (:func:`~obdk.stream.distributed.broadcast_factors`); ``factors`` must then be the same on every rank. Streamed
    in one process, the result is a :class:`~obdk.correct.factor_store.FactorStore` (each layer's results kept as its
    step ends, under ``stream.budget``, spilled to ``stream.scratch_dir``), so the compressed model is never held in
    memory. Returns ``({name: (a, b, predicted)},
    {name: {"cx": α, "cg": α}})``: for ``obd`` the predicted loss is measured against the original
    ``W``; the second dict is the damping the ``kfac`` solves needed. ``scales`` (resident only; the guarded
    step's line search, :mod:`obdk.correct.guarded`): the step is taken at ``W_r + t·c·P`` for each ``t`` and
    re-truncated, and each name maps to a list of ``(a, b, predicted)``, one per ``t`` (``t = 0``: the input
    factors themselves).
    """
    if kind not in STEPS:
        raise ConfigError(f"correct: unknown step {kind!r}; choose one of {', '.join(STEPS)}")
    if scales is not None and stream is not None:
        raise ConfigError(f"correct={kind!r}: steps at several scales (the guarded step's line search) need the "
                          f"resident pass; this plan streams")
    layered = isinstance(stats, LayerStatistics)
    if layered and stream is None:
        raise ConfigError("correct: these statistics were kept layer by layer (a streamed plan); the correction's "
                          "gradient pass must stream too (stream=Streaming(...))")
    names = list(factors)
    # one process, streamed: W_r = b a is installed in each fetched layer's private copy (the model never changes,
    # so no copy of its weights is kept) and each layer's results go to a FactorStore under the plan's budget
    per_fetch = stream is not None and not stream.owner_reduced
    stepper = _Stepper(kind, factors, _originals(model, names, stream, per_fetch, kind), spectra, config,
                       {n: model.get_submodule(n).weight.dtype for n in names}, scales)
    try:
        if not per_fetch:
            _install(model, factors, names)
        if stream is None:
            grads = summed_weight_grads(model, data.input_ids, names, attention_mask=data.attention_mask,
                                        progress=progress, desc=f"correct [{kind}] gradient pass")
            stepper(names, grads, stats)
        else:
            return _streamed_steps(model, data, stream, stepper, names, stats, kind, progress)
    finally:
        if not per_fetch:
            with torch.no_grad():
                for n in names:
                    model.get_submodule(n).weight.copy_(stepper.originals[n])
    return {n: stepper.out[n] for n in names}, stepper.used


def _originals(model: nn.Module, names: list[str], stream, per_fetch: bool, kind: str) -> Mapping[str, Tensor]:
    """``{name: W [m, n]}`` of the targets before truncation: a skeleton's read from its checkpoint's shards when a
    step needs it (:class:`_ReadOnStep`); streamed in one process the model's own tensors (never written); else
    copies (the model's targets are overwritten with ``W_r`` for the pass)."""
    if stream is not None and stream.source is not None:
        if not per_fetch:
            raise ConfigError(f"correct={kind!r}: weights read from the checkpoint (a skeleton) under "
                              f"torch.distributed are not supported; load the model on every rank")
        return _ReadOnStep(stream.source, {n: model.get_submodule(n).weight for n in names})
    if per_fetch:
        return {n: model.get_submodule(n).weight.detach() for n in names}
    return {n: model.get_submodule(n).weight.detach().clone() for n in names}


def _install(model: nn.Module, factors: Mapping[str, tuple], names) -> None:
    """Every target in ``names`` at its truncation ``W_r = b a`` (in the weight's dtype, formed in fp64)."""
    with torch.no_grad():
        for n in names:
            a, b, _ = factors[n]
            w = model.get_submodule(n).weight
            w.copy_((b.to(w.device).double() @ a.to(w.device).double()).to(w.dtype))


class _Stepper:
    """The step of each matrix (module docstring): ``W' = W_r + c·P`` re-truncated to its rank in its whitening.

    ``stepper(batch, grads, st)`` steps the matrices ``batch`` from their gradients ``grads`` and statistics ``st``
    (one ``C_x`` Cholesky factor per unique input); ``out[name]`` is ``(a, b, predicted)`` (a list of them, one per
    scale, with ``scales``) and ``used[name]`` the damping the ``kfac`` solves needed."""

    def __init__(self, kind: str, factors: Mapping[str, tuple], originals: Mapping[str, Tensor], spectra, config,
                 wdtype: dict, scales: Optional[Sequence[float]]) -> None:
        self.kind, self.factors, self.originals, self.spectra, self.config = kind, factors, originals, spectra, config
        self.wdtype, self.scales = wdtype, scales
        self.whitening, self.sides, self.cdtype = config.resolved_whitening, config.whitening_stats, \
            config.torch_compute_dtype
        self.out: dict[str, Any] = {}
        self.used: dict[str, dict] = {}

    def _chol(self, c: Tensor, alpha: float, what: str) -> tuple[Tensor, float]:
        # the step c·P does not depend on the scale of either covariance, only on the relative damping
        return cholesky_root(c.to(self.cdtype), alpha, name=what, damping_max=1e3, fn="correct='kfac'")

    def __call__(self, batch: Sequence[str], grads: Mapping[str, Tensor], st) -> None:
        chol_x: dict[str, tuple[Tensor, float]] = {}  # one factor per unique input
        for n in batch:
            self._step(n, grads[n], st, chol_x)

    def _step(self, n: str, grad: Tensor, st, chol_x: dict) -> None:
        a, b, _ = self.factors[n]
        g = grad.to(self.cdtype)
        dev = g.device  # the pass's compute device: the step runs there, its factors come back home
        w = self.originals[n].to(dev, self.cdtype)
        wr = b.to(dev, self.cdtype) @ a.to(dev, self.cdtype)
        cx = st.cx_for(n).to(dev) if "cx" in self.sides and self.whitening != "asvd" else None
        cg = st.cg[n].to(dev) if "cg" in self.sides else None
        d = self.spectra.meta(n)["damping"] if hasattr(self.spectra, "meta") else self.spectra[n].damping  # no read
        lg = lx = None
        if self.kind == "kfac":
            self.used[n] = {}
            if cg is not None:
                lg, self.used[n]["cg"] = self._chol(cg, d.get("cg", self.config.damping), f"{n} C_g")
            if cx is not None:
                key = st.input_key.get(n, n)
                if key not in chol_x:
                    chol_x[key] = self._chol(cx, d.get("cx", self.config.damping), f"{n} C_x")
                lx, self.used[n]["cx"] = chol_x[key]
        wc, _ = gradient_step(w, wr, g, chol_x=lx, chol_g=lg)
        if not bool(torch.isfinite(wc).all()):
            raise NonFiniteError(f"correct={self.kind!r}: {n}: the corrected weight is not finite "
                                 f"(gradient or covariance with NaN/inf?)")
        res = [self.factors[n] if t == 0 else self._truncate(n, w, wr, wc, t, cx, cg, d, a, b)
               for t in ((1.0,) if self.scales is None else self.scales)]
        self.out[n] = res[0] if self.scales is None else res

    def _truncate(self, n: str, w: Tensor, wr: Tensor, wc: Tensor, t: float, cx, cg, d: dict, a: Tensor,
                  b: Tensor) -> tuple:
        """``W_r + t·(W' − W_r)`` truncated to the rank of ``a`` in the whitening; its predicted loss (for ``obd``
        against the original ``W``)."""
        wt = wc if t == 1 else wr + t * (wc - wr)
        fac = factorize(wt.to(self.wdtype[n]), a.shape[0],
                        method=self.whitening if self.whitening != "asvd" else "svd", cx=cx, cg=cg,
                        solver=self.config.solver, compute_dtype=self.cdtype, damping=self.config.damping,
                        keep_dense_at_break_even=False)
        pred = float(fac.predicted_loss)
        if self.whitening == "obd":  # predicted loss of the corrected truncation against the original W
            delta = w - fac.b.to(self.cdtype) @ fac.a.to(self.cdtype)
            pred = kfac_loss(delta, damp_covariance(cx.to(self.cdtype), d.get("cx", 0.0)),
                             damp_covariance(cg.to(self.cdtype), d.get("cg", 0.0)))
        return fac.a.to(a.device), fac.b.to(b.device), pred


class _StreamedSteps:
    """The consumer of a correction's streamed gradient pass (:func:`~obdk.calibrate.stream.calibrate_streamed`):
    ``fetch`` installs the truncations of a fetched layer (its private copy; one process), ``on_layer`` steps the
    layer's matrices this rank steps as soon as its gradients are final, and keeps the results layer by layer
    (``kept``: a :class:`~obdk.correct.factor_store.FactorStore`, one process) or in ``stepper.out``."""

    def __init__(self, model: nn.Module, stepper: _Stepper, names: list[str], stats, wanted: set, kept) -> None:
        self.stepper, self.stats, self.wanted, self.kept = stepper, stats, wanted, kept
        self.model, self.layered = model, isinstance(stats, LayerStatistics)
        prefix = decoder_layers(model)[0] + "."
        self.per_layer: dict[int, list] = {}
        for n in names:
            self.per_layer.setdefault(int(n[len(prefix):].split(".", 1)[0]), []).append(n)

    def fetch(self, i: int, layer: nn.Module) -> None:
        _install(self.model, self.stepper.factors, self.per_layer.get(i, ()))

    def on_layer(self, i: int, part) -> None:  # layer i's gradients are final: its steps, then drop them
        batch = [n for n in part.grad if n in self.wanted]
        if batch:
            self.stepper(batch, part.grad, self.stats.layer(i) if self.layered else self.stats)
            if self.kept is not None:
                self.kept.put_layer(i, {n: self.stepper.out.pop(n) for n in batch})
        part.grad.clear()


def _streamed_steps(model: nn.Module, data, stream, stepper: _Stepper, names: list[str], stats, kind: str,
                    progress: bool):
    """The steps from a layer-streamed gradient pass (see :func:`gradient_correct`); ``(results, damping)``."""
    from ..calibrate.stream import calibrate_streamed
    from ..stream import distributed as dist
    opts, src = stream.pass_options(), {}
    wanted = set(names)
    if stream.owner_reduced:  # each ∂L/∂W reduced to the rank that kept the matrix's statistics, which steps it
        check_world(stream)
        from ..models import linear_groups
        key_of = {n: g.key for g in linear_groups(model) for n in g.names}
        for n in names:
            if key_of.get(n) not in stream.owners:
                raise DataError(f"correct={kind!r}: {n} has no owner rank in this plan's owner map")
            src[n] = int(stream.owners[key_of[n]])
        opts.update(reduce="owner", owners=dict(stream.owners))
        wanted = {n for n in names if src[n] == dist.world()[0]}
    kept = None
    if not stream.owner_reduced:
        from .factor_store import FactorStore
        kept = FactorStore(scratch_dir=stream.scratch_dir, budget=stream.budget)
    steps = _StreamedSteps(model, stepper, names, stats, wanted, kept)
    if kept is not None:  # each fetched layer (a private copy, or read from the shards) gets its truncations
        opts["on_fetch"] = steps.fetch
    dtype = torch.promote_types(next(iter(stepper.wdtype.values())), torch.float32)
    calibrate_streamed(model, data, stats=("grad",), fisher="empirical", dtype=dtype, progress=progress,
                       on_layer=steps.on_layer, keep=False, fingerprint=False, **opts)
    missing = [n for n in names if n in wanted and n not in stepper.out and (kept is None or n not in kept)]
    if missing:
        raise NotCollectedError(f"correct={kind!r}: the streamed gradient pass gave no gradient of "
                                f"{missing[0]} (and {len(missing) - 1} more)")
    if kept is not None:
        return kept, stepper.used
    # the owners' results on every rank: the next step's pass runs at them
    got = dist.broadcast_factors({n: (*stepper.out[n], stepper.used.get(n)) for n in stepper.out}, src,
                                 stepper.originals)
    return {n: g[:3] for n, g in got.items()}, {n: g[3] for n, g in got.items() if g[3] is not None}


class _ReadOnStep:
    """``{name: W [m, n]}`` of a skeleton's targets, each read from the checkpoint's shards when asked for
    (CPU, the model's dtype), so that one matrix's original weight is in memory at a time."""

    def __init__(self, source, params: Mapping[str, Tensor]) -> None:
        self.source, self.params = source, params

    def __getitem__(self, name: str) -> Tensor:
        p = self.params[name]
        return self.source.tensor(f"{name}.weight", "cpu", p.dtype, shape=tuple(p.shape))


def run(model: nn.Module, plan: Any, config, factors: Mapping[str, tuple], *,
        progress: bool = False) -> tuple[Mapping[str, tuple], dict[str, dict]]:
    """``correct='zs'``, ``'kfac'`` or ``'zs+kfac'`` (their entries in :data:`obdk.registry.CORRECTIONS`): one
    :func:`gradient_correct` per step, each at the previous step's result, on the plan's windows, statistics and
    spectra (streamed when the plan is). The damping of the ``kfac`` solves as ``kfac_cx``/``kfac_cg``.

    On an owner-reduced streamed plan under ``torch.distributed`` rank 0 alone holds the truncated factors; every
    rank needs them (``W_r = b a`` for the gradient passes), ``r`` columns each: they are broadcast first
    (:func:`obdk.stream.distributed.broadcast_factors`)."""
    from .factor_store import FactorStore
    stream = plan.stream
    if stream is not None and stream.owner_reduced:
        from ..stream import distributed as dist
        check_world(stream)
        rank = dist.world()[0]
        factors = dist.broadcast_factors(factors if rank == 0 else {}, {n: 0 for n in factors},
                                         {n: model.get_submodule(n).weight for n in factors})
    extra: dict[str, dict] = {}
    for step in config.resolved_correct.split("+"):  # e.g. zs+kfac: one gradient pass per step
        prev = factors
        factors, used = gradient_correct(model, factors, step, data=plan.data, stats=plan.stats,
                                         spectra=plan.spectra, config=config, progress=progress, stream=stream)
        if isinstance(prev, FactorStore):  # a streamed step's results, read by this step: done with
            prev.free()
        for n, d in used.items():
            extra.setdefault(n, {}).update({f"kfac_{k}": v for k, v in d.items()})
    return factors, extra
