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
from typing import Mapping, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..calibrate.head import summed_weight_grads
from ..stream.layer_files import LayerStatistics
from ..decompose import damp_covariance, factorize, kfac_loss
from ..decompose.roots import cholesky_root
from ..decompose.whitened import whitened_svd
from ..errors import ConfigError, DataError, NonFiniteError, NotCollectedError

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


def check_world(stream: Mapping) -> None:
    """Refuse an owner-reduced streamed plan (``stream["owners"]``: its statistics spread over ``stream["world"]``
    ranks, each holding its own matrices') outside a process group of that size: :class:`ConfigError`."""
    from ..stream import distributed as dist
    want, have = int(stream.get("world", 1)), dist.world()[1]
    if have != want:
        raise ConfigError(f"correct: this streamed plan was prepared by {want} ranks, each keeping the statistics of "
                          f"the matrices it owns; apply its correction on all {want} ranks together (this process "
                          f"sees {have}{', inside dist.alone()' if have == 1 else ''}), or prepare it again here")


def gradient_correct(model: nn.Module, factors: Mapping[str, tuple], kind: str, *, data, stats, spectra,
                     config, progress: bool = False, stream: Optional[dict] = None,
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
    (:func:`~obdk.calibrate.head.summed_weight_grads`), or the keyword arguments of
    :func:`~obdk.calibrate.stream.calibrate_streamed` (``scratch_dir``, ``budget`` or ``max_host_memory``,
    ``batch_size``, ``device``, ``source``: a streamed plan's ``Plan.stream``) for a layer-streamed one: the same gradients, each layer's step taken as soon as
    its gradients are final, with that layer's statistics only. A ``stream`` with ``owners`` (``{group key:
    rank}``) and ``world`` (an owner-reduced streamed plan under ``torch.distributed``, where each rank's
    ``stats`` hold only the matrices it owns) runs on every rank together: the pass shards the windows, each
    ``∂L/∂W`` is reduced to its owner, which takes the step, and the results (factors, predicted loss, damping)
    are broadcast to every rank (:func:`~obdk.stream.distributed.broadcast_factors`); ``factors`` must then be
    the same on every rank. Streamed in one process, the result is a :class:`~obdk.correct.factor_store.FactorStore`
    (each layer's results kept as its step ends, under ``stream["budget"]``, spilled to ``scratch_dir``), so the
    compressed model is never held in memory. Returns ``({name: (a, b, predicted)},
    {name: {"cx": α, "cg": α}})``: for ``obd`` the predicted loss is measured against the original
    ``W``; the second dict is the damping the ``kfac`` solves needed. ``scales`` (resident only; the guarded
    step's line search, :mod:`obdk.correct.guarded`): the step is taken at ``W_r + t·c·P`` for each ``t`` and
    re-truncated, and each name maps to a list of ``(a, b, predicted)``, one per ``t`` (``t = 0``: the input
    factors themselves).
    """
    if kind not in STEPS:
        raise ConfigError(f"correct: unknown step {kind!r}; choose one of {', '.join(STEPS)}")
    names = list(factors)
    # a skeleton's decoder layers (obdk.calibrate.placement.load_skeleton) live in the checkpoint's shards: each
    # original W is read from them when its step runs, and W_r = b a is installed as each layer is fetched
    source = (stream or {}).get("source")
    # one process, streamed: W_r = b a is installed in each fetched layer's private copy (the model never changes,
    # so no copy of its weights is kept) and each layer's results go to a FactorStore under the plan's budget
    per_fetch = stream is not None and stream.get("owners") is None
    wdtype = {n: model.get_submodule(n).weight.dtype for n in names}
    if source is not None:
        if not per_fetch:
            raise ConfigError(f"correct={kind!r}: weights read from the checkpoint (a skeleton) under "
                              f"torch.distributed are not supported; load the model on every rank")
        originals = _ReadOnStep(source, {n: model.get_submodule(n).weight for n in names})
    elif per_fetch:
        originals = {n: model.get_submodule(n).weight.detach() for n in names}
    else:
        originals = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    out, used = {}, {}
    kept_out = None
    if per_fetch:
        from .factor_store import FactorStore
        kept_out = FactorStore(scratch_dir=stream.get("scratch_dir"), budget=stream.get("budget"))
    whitening = config.resolved_whitening
    sides = config.whitening_stats
    cdtype = config.torch_compute_dtype

    def chol(c: Tensor, alpha: float, what: str) -> tuple[Tensor, float]:
        # the step c·P does not depend on the scale of either covariance, only on the relative damping
        return cholesky_root(c.to(cdtype), alpha, name=what, damping_max=1e3, fn="correct='kfac'")

    def step(batch: Sequence[str], grads: Mapping[str, Tensor], st) -> None:
        """The steps of the matrices ``batch``, reading ``grads`` and the statistics ``st``."""
        chol_x: dict[str, tuple[Tensor, float]] = {}  # one factor per unique input
        for n in batch:
            a, b, _ = factors[n]
            g = grads[n].to(cdtype)
            dev = g.device  # the pass's compute device: the step runs there, its factors come back home
            w = originals[n].to(dev, cdtype)
            wr = b.to(dev, cdtype) @ a.to(dev, cdtype)
            cx = st.cx_for(n).to(dev) if "cx" in sides and whitening != "asvd" else None
            cg = st.cg[n].to(dev) if "cg" in sides else None
            d = spectra.meta(n)["damping"] if hasattr(spectra, "meta") else spectra[n].damping  # no factor read
            lg = lx = None
            if kind == "kfac":
                used[n] = {}
                if cg is not None:
                    lg, used[n]["cg"] = chol(cg, d.get("cg", config.damping), f"{n} C_g")
                if cx is not None:
                    key = st.input_key.get(n, n)
                    if key not in chol_x:
                        chol_x[key] = chol(cx, d.get("cx", config.damping), f"{n} C_x")
                    lx, used[n]["cx"] = chol_x[key]
            wc, _ = gradient_step(w, wr, g, chol_x=lx, chol_g=lg)
            if not bool(torch.isfinite(wc).all()):
                raise NonFiniteError(f"correct={kind!r}: {n}: the corrected weight is not finite "
                                     f"(gradient or covariance with NaN/inf?)")
            res = []
            for t in (1.0,) if scales is None else scales:
                if t == 0:
                    res.append(factors[n])
                    continue
                wt = wc if t == 1 else wr + t * (wc - wr)
                fac = factorize(wt.to(wdtype[n]), a.shape[0], method=whitening if whitening != "asvd" else "svd",
                                cx=cx, cg=cg, solver=config.solver, compute_dtype=cdtype,
                                damping=config.damping, keep_dense_at_break_even=False)
                pred = float(fac.predicted_loss)
                if whitening == "obd":  # predicted loss of the corrected truncation against the original W
                    delta = w - fac.b.to(cdtype) @ fac.a.to(cdtype)
                    pred = kfac_loss(delta, damp_covariance(cx.to(cdtype), d.get("cx", 0.0)),
                                     damp_covariance(cg.to(cdtype), d.get("cg", 0.0)))
                res.append((fac.a.to(a.device), fac.b.to(b.device), pred))
            out[n] = res[0] if scales is None else res

    if scales is not None and stream is not None:
        raise ConfigError(f"correct={kind!r}: steps at several scales (the guarded step's line search) need the "
                          f"resident pass; this plan streams")
    layered = isinstance(stats, LayerStatistics)
    if layered and stream is None:
        raise ConfigError("correct: these statistics were kept layer by layer (a streamed plan); the correction's "
                          "gradient pass must stream too (stream={...})")
    try:
        def install(ns) -> None:  # every target in ns at its truncation W_r = b a
            with torch.no_grad():
                for n in ns:
                    a, b, _ = factors[n]
                    w = model.get_submodule(n).weight
                    w.copy_((b.to(w.device).double() @ a.to(w.device).double()).to(w.dtype))

        if not per_fetch:
            install(names)
        if stream is None:
            grads = summed_weight_grads(model, data.input_ids, names, attention_mask=data.attention_mask,
                                        progress=progress, desc=f"correct [{kind}] gradient pass")
            step(names, grads, stats)
        else:
            from ..stream import distributed as dist
            from ..calibrate.stream import calibrate_streamed
            wanted = set(names)
            opts = dict(stream)
            owners, _ = opts.pop("owners", None), opts.pop("world", None)
            src: dict[str, int] = {}
            if owners is not None:  # each ∂L/∂W reduced to the rank that kept the matrix's statistics, which steps
                check_world(stream)
                from ..models import linear_groups
                key_of = {n: g.key for g in linear_groups(model) for n in g.names}
                for n in names:
                    if key_of.get(n) not in owners:
                        raise DataError(f"correct={kind!r}: {n} has no owner rank in this plan's owner map")
                    src[n] = int(owners[key_of[n]])
                opts.update(reduce="owner", owners=owners)
                wanted = {n for n in names if src[n] == dist.world()[0]}

            def on_layer(i: int, part) -> None:  # layer i's gradients are final: its steps, then drop them
                batch = [n for n in part.grad if n in wanted]
                if batch:
                    step(batch, part.grad, stats.layer(i) if layered else stats)
                    if kept_out is not None:
                        kept_out.put_layer(i, {n: out.pop(n) for n in batch})
                part.grad.clear()

            if per_fetch:  # each fetched layer (a private copy, or read from the shards) gets its truncations
                from ..models import decoder_layers
                prefix = decoder_layers(model)[0] + "."
                per_layer: dict[int, list] = {}
                for n in names:
                    per_layer.setdefault(int(n[len(prefix):].split(".", 1)[0]), []).append(n)
                opts["on_fetch"] = lambda i, layer: install(per_layer.get(i, ()))
            dtype = torch.promote_types(next(iter(wdtype.values())), torch.float32)
            calibrate_streamed(model, data, stats=("grad",), fisher="empirical", dtype=dtype, progress=progress,
                               on_layer=on_layer, keep=False, fingerprint=False, **opts)
            missing = [n for n in names if n in wanted and n not in out and (kept_out is None or n not in kept_out)]
            if missing:
                raise NotCollectedError(f"correct={kind!r}: the streamed gradient pass gave no gradient of "
                                        f"{missing[0]} (and {len(missing) - 1} more)")
            if owners is not None:  # the owners' results on every rank: the next step's pass runs at them
                got = dist.broadcast_factors({n: (*out[n], used.get(n)) for n in out}, src, originals)
                out = {n: g[:3] for n, g in got.items()}
                used = {n: g[3] for n, g in got.items() if g[3] is not None}
    finally:
        if not per_fetch:
            with torch.no_grad():
                for n in names:
                    model.get_submodule(n).weight.copy_(originals[n])
    if kept_out is not None:
        return kept_out, used
    return {n: out[n] for n in names}, used


class _ReadOnStep:
    """``{name: W [m, n]}`` of a skeleton's targets, each read from the checkpoint's shards when asked for
    (CPU, the model's dtype), so that one matrix's original weight is in memory at a time."""

    def __init__(self, source, params: Mapping[str, Tensor]) -> None:
        self.source, self.params = source, params

    def __getitem__(self, name: str) -> Tensor:
        p = self.params[name]
        return self.source.tensor(f"{name}.weight", "cpu", p.dtype, shape=tuple(p.shape))
