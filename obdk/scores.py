"""Per-component scores from the model's loss, the inputs of the ``zero-sum`` and ``bsi`` allocations.

Every whitening's spectrum is viewed as ``W = Σ σ_i u_i x_iᵀ``
(:func:`obdk.decompose.whitened.spectrum_as_svd`), so both scores are defined for SVD,
SVD-LLM and OBD alike:

* ZS-SVD (arXiv 2602.02848): ``δ_i = −σ_i ∂L/∂σ_i``, the first-order loss change of removing
  component ``i``, from the summed weight gradient ``G = ∂L/∂W`` (``g_i = u_iᵀ G x_i``).
* BSI (arXiv 2605.01627): ``−g_i σ_i + ½ h_ii σ_i²`` with ``h_ii`` the Hessian diagonal in σ,
  estimated (``curvature``) by Hutchinson with symmetric differences,
  ``diag(H) ≈ E_z[z ⊙ (∇L(σ+εz) − ∇L(σ−εz))/(2ε)]``, ``z`` Rademacher, all targeted matrices
  perturbed at once (the BSI paper's) or one matrix at a time (``blocked``); by K-FAC from the
  calibration's ``C_x``, ``C_g`` (``kfac``, no pass); or the exact empirical-Fisher diagonal
  collected in one pass (``fisher``).

This module runs the model (through :func:`obdk.calibrate.head.summed_weight_grads`);
:mod:`obdk.allocate` turns the scores into ranks without touching a model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from .calibrate.head import summed_weight_grads
from .decompose.whitened import WhitenedSVD, spectrum_as_svd, whitened_svd
from .errors import ConfigError, DataError, NotCollectedError

log = logging.getLogger(__name__)

__all__ = ["ZSScores", "zero_sum_scores", "zero_sum_grads", "zero_sum_deltas", "hutchinson_diag", "kfac_diag",
           "fisher_diag", "bsi_importance", "BSIScores", "bsi_scores", "plan_zero_sum", "plan_bsi", "layer_zero_sum",
           "layer_bsi"]

Sigma = Union[Tensor, Mapping[str, Tensor]]


@dataclass
class ZSScores(WhitenedSVD):
    """A :class:`~obdk.decompose.whitened.WhitenedSVD` plus ZS-SVD's scores.

    ``grad_sigma`` [k]: ``g_i = u_iᵀ H v_i`` (the loss gradient in σ);
    ``delta`` [k]: ``δ_i = −σ_i g_i``, the first-order loss change of removing component ``i``.
    Truncate with :meth:`factors` (``b = U_r Σ_r``, ``a = V_rᵀ S⁻¹``).
    """
    grad_sigma: Optional[Tensor] = None
    delta: Optional[Tensor] = None


def zero_sum_scores(weight: Tensor, grad: Tensor, cx: Optional[Tensor], *, damping: float = 0.01,
                    compute_dtype: torch.dtype = torch.float64) -> ZSScores:
    """ZS-SVD component scores of one Linear.

    ``weight``: [m, n]; ``grad``: ``∂L/∂W`` [m, n] (e.g. from
    :func:`~obdk.calibrate.head.summed_weight_grads`); ``cx``: [n, n] input Gram or
    ``None`` (plain SVD). ``S`` is the lower Cholesky factor of ``C_x + α·mean(diag)·I``
    (α from ``damping``, escalated ×10 until it exists). ``H = G S⁻ᵀ`` is a triangular
    solve. Returns :class:`ZSScores` with ``k = min(m, n)`` components in ``compute_dtype``.
    """
    if tuple(grad.shape) != tuple(weight.shape):
        raise DataError(f"zero_sum_scores: grad shape {tuple(grad.shape)} != weight shape {tuple(weight.shape)}")
    dec = whitened_svd(weight, cx, damping=damping, compute_dtype=compute_dtype)
    g = dec.grad_sigma(grad.detach().to(dec.u.device))  # u_iᵀ G S⁻ᵀ v_i = u_iᵀ H v_i
    return ZSScores(u=dec.u, sigma=dec.sigma, v=dec.v, chol=dec.chol, damping=dec.damping,
                    grad_sigma=g, delta=-dec.sigma * g)


def zero_sum_grads(decomps: Mapping[str, WhitenedSVD], grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``∂L/∂σ_i = u_iᵀ G x_i`` [k] per matrix, from its decomposition and summed weight gradient ``G`` [m, n]."""
    return {name: ws.grad_sigma(grads[name].to(ws.u.device)) for name, ws in decomps.items()}


def zero_sum_deltas(spectra: Mapping[str, object], grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """ZS-SVD's ``δ_i = −σ_i ∂L/∂σ_i`` [k] per matrix, from its spectrum and summed gradient ``G`` [m, n] (CPU)."""
    decomps = {name: spectrum_as_svd(spec) for name, spec in spectra.items()}
    return {name: (-decomps[name].sigma * g).cpu() for name, g in zero_sum_grads(decomps, grads).items()}


def _flatten(x: Sigma, keys: Optional[list[str]]) -> Tensor:
    if keys is None:
        return x.reshape(-1)
    return torch.cat([x[k].reshape(-1) for k in keys])


def _unflatten(flat: Tensor, like: Sigma, keys: Optional[list[str]]) -> Sigma:
    if keys is None:
        return flat.reshape(like.shape)
    out, o = {}, 0
    for k in keys:
        n = like[k].numel()
        out[k] = flat[o:o + n].reshape(like[k].shape)
        o += n
    return out


def _rademacher(n: int, generator: Optional[torch.Generator], like: Tensor) -> Tensor:
    return (torch.randint(0, 2, (n,), generator=generator) * 2 - 1).to(like.device, like.dtype)


def _relative_se(mean: Tensor, var: Tensor) -> float:
    """Relative standard error of a diagonal's estimate: ``sqrt(Σ var_i) / ‖mean‖₂`` (``var``: of the mean)."""
    return float(var.clamp_min(0).sum().sqrt() / mean.norm().clamp_min(torch.finfo(mean.dtype).tiny))


def hutchinson_diag(grad_fn: Callable[[Sigma], Sigma], sigma: Sigma, *, probes: Union[int, str] = 8,
                    eps: float = 1e-3, generator: Optional[torch.Generator] = None,
                    blocks: Optional[list[list[str]]] = None, tol: float = 0.1, max_probes: int = 64,
                    on_probe: Optional[Callable[[int, int, int], None]] = None) -> tuple[Sigma, Sigma]:
    """Hutchinson estimate of the Hessian diagonal from gradient differences.

    ``grad_fn(σ) -> ∇L(σ)`` with the structure of ``sigma`` (a tensor, or a dict of
    tensors perturbed jointly as one vector). Per probe ``z`` (Rademacher, drawn
    on CPU from ``generator``) the estimate is ``z ⊙ (∇L(σ+εz) − ∇L(σ−εz))/(2ε)``,
    unbiased for ``diag(H)`` on a quadratic (and up to ``O(ε²)`` otherwise); coordinate
    ``i``'s variance per probe is ``Σ_{j≠i} H_ij²`` over the coordinates ``z`` perturbs.

    ``blocks`` (dict ``sigma`` only): lists of keys; each block is probed on its own (``z`` zero
    outside it, only its coordinates read), which removes every cross-block term from the
    variance and multiplies the cost by the number of blocks. None: one block of everything.
    ``probes``: probes per block, or ``"auto"``: per block, probe until the relative standard
    error of the running mean, ``sqrt(Σ_i var_i)/‖mean‖`` per matrix (key), is at most ``tol``
    for every matrix of the block (at least 3 probes, at most ``max_probes``).
    ``on_probe(block, n_blocks, probe)``: called before each probe (a progress bar).

    Returns ``(mean, var)`` in the structure of ``sigma``: the average over its block's probes
    and the per-coordinate variance *of that average* (sample variance / probes; NaN with one
    probe). Costs ``2·Σ_blocks probes`` calls of ``grad_fn``.
    """
    auto = probes == "auto"
    if not auto and not (isinstance(probes, int) and not isinstance(probes, bool) and probes >= 1):
        raise DataError(f"hutchinson_diag: probes must be an integer >= 1 or 'auto', got {probes!r}")
    if eps <= 0:
        raise DataError(f"hutchinson_diag: eps must be > 0, got {eps}")
    if auto and not (tol > 0 and max_probes >= 3):
        raise DataError(f"hutchinson_diag: probes='auto' needs tol > 0 and max_probes >= 3, got {tol}, {max_probes}")
    keys = list(sigma.keys()) if isinstance(sigma, Mapping) else None
    if blocks is not None and keys is None:
        raise DataError("hutchinson_diag: blocks need a dict sigma")
    x = _flatten(sigma, keys)
    # coordinate slices of each key, and the blocks as index tensors
    spans, o = {}, 0
    for k in keys or []:
        spans[k] = (o, o + sigma[k].numel())
        o += sigma[k].numel()
    blocks = [list(keys)] if blocks is None and keys is not None else blocks
    if blocks is not None:
        unknown = [k for b in blocks for k in b if k not in spans]
        if unknown:
            raise DataError(f"hutchinson_diag: blocks name keys not in sigma, e.g. {unknown[0]!r}")
    mean = torch.zeros_like(x)
    var = torch.full_like(x, float("nan"))
    cap = max_probes if auto else int(probes)
    for bi, block in enumerate(blocks if blocks is not None else [None]):
        idx = (torch.arange(x.numel(), device=x.device) if block is None else
               torch.cat([torch.arange(*spans[k], device=x.device) for k in block]))
        sub = [(k, slice(spans[k][0], spans[k][1])) for k in block] if block is not None else []
        m, m2 = torch.zeros(idx.numel(), dtype=x.dtype, device=x.device), torch.zeros(idx.numel(), dtype=x.dtype,
                                                                                      device=x.device)
        pos = torch.empty(x.numel(), dtype=torch.long, device=x.device)
        pos[idx] = torch.arange(idx.numel(), device=x.device)
        for p in range(cap):
            if on_probe is not None:
                on_probe(bi, len(blocks) if blocks is not None else 1, p)
            z = torch.zeros_like(x)
            z[idx] = _rademacher(idx.numel(), generator, x)
            gp = _flatten(grad_fn(_unflatten(x + eps * z, sigma, keys)), keys).to(x.dtype)
            gm = _flatten(grad_fn(_unflatten(x - eps * z, sigma, keys)), keys).to(x.dtype)
            est = (z * (gp - gm) / (2 * eps))[idx]
            d = est - m  # Welford
            m += d / (p + 1)
            m2 += d * (est - m)
            if auto and p >= 2:
                v = m2 / p / (p + 1)
                groups = [pos[sl] for _, sl in sub] or [slice(None)]
                if all(_relative_se(m[g], v[g]) <= tol for g in groups):
                    break
        n = p + 1
        mean[idx] = m
        if n > 1:
            var[idx] = m2 / (n - 1) / n
    return _unflatten(mean, sigma, keys), _unflatten(var, sigma, keys)


def kfac_diag(decomp: WhitenedSVD, cx: Tensor, cg: Tensor, tokens: int) -> Tensor:
    """K-FAC Hessian diagonal in σ of one matrix, ``h_i = N (u_iᵀ C_g u_i)(x_iᵀ C_x x_i)`` → [k].

    ``W = Σ σ_i u_i x_iᵀ`` (``decomp``: ``u`` [m, k], ``x_iᵀ`` the rows of ``decomp.right``
    [k, n]), so ``∂W/∂σ_i = B_i = u_i x_iᵀ`` and ``vec(B_i)ᵀ (N·C_x ⊗ C_g) vec(B_i) = N·tr(C_g B_i C_x
    B_iᵀ)``. ``cx`` [n, n], ``cg`` [m, m]: the calibration's per-token means
    (:class:`~obdk.calibrate.statistics.Statistics`); ``tokens``: ``N`` = its ``loss_tokens``, so
    ``N·C_x ⊗ C_g ≈ Σ_t x_t x_tᵀ ⊗ g_t g_tᵀ`` is the K-FAC Hessian of the *summed* loss the
    gradients are of. For OBD's bases ``½ h_i σ_i²`` is the spectral cost ``½ λ_i`` (undamped).
    """
    u, x = decomp.u, decomp.right
    cg = cg.to(u.device, u.dtype)
    cx = cx.to(x.device, x.dtype)
    return float(tokens) * ((u * (cg @ u)).sum(0) * ((x @ cx) * x).sum(1))


def fisher_diag(model: nn.Module, input_ids: Tensor, decomps: Mapping[str, WhitenedSVD], *,
                attention_mask: Optional[Tensor] = None, batch_size: int = 1, progress: bool = False,
                desc: str = "bsi [fisher] pass 1/1") -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Empirical-Fisher diagonal in σ and the gradient in σ, from one forward+backward pass.

    For each named Linear of ``model`` (weights ``W = Σ σ_i u_i x_iᵀ`` as in ``decomps``, the
    model's current weights), with its inputs ``a_t`` [n] and output gradients ``g_t = ∂L/∂y_t``
    [m] of the summed next-token loss at every position ``t`` of ``input_ids`` [N, T]:
    ``h_i = Σ_t (u_iᵀ g_t)² (x_iᵀ a_t)²`` and ``∂L/∂σ_i = Σ_t (u_iᵀ g_t)(x_iᵀ a_t)``. Forward
    hooks keep ``x_iᵀ a_t`` ([B·T, k] per Linear, fp32 or better) and a hook on each output
    gradient folds it in, so memory is one batch of ``batch_size`` windows. Returns
    ``(grad, h)``: ``{name: [k]}`` each, in the decompositions' dtype, on CPU.
    """
    modules = dict(model.named_modules())
    names = list(decomps)
    hooks, acc = [], {}
    try:
        for nm in names:
            mod, dec = modules[nm], decomps[nm]
            w = mod.weight
            dt = torch.promote_types(w.dtype, torch.float32)
            u, x = dec.u.to(w.device, dt), dec.right.to(w.device, dt)
            acc[nm] = [torch.zeros(u.shape[1], dtype=dt, device=w.device),
                       torch.zeros(u.shape[1], dtype=dt, device=w.device)]

            def fwd(module, inputs, output, u=u, x=x, a=acc[nm], dt=dt):
                if not output.requires_grad:
                    return
                p = inputs[0].detach().reshape(-1, x.shape[1]).to(dt) @ x.T  # [B·T, k]

                def bwd(gout, p=p):
                    q = (gout.detach().reshape(-1, u.shape[0]).to(dt) @ u) * p  # (u_iᵀ g_t)(x_iᵀ a_t)
                    a[0].add_(q.sum(0))
                    a[1].add_((q * q).sum(0))
                output.register_hook(bwd)
            hooks.append(mod.register_forward_hook(fwd))
        summed_weight_grads(model, input_ids, names, attention_mask=attention_mask, batch_size=batch_size,
                            progress=progress, desc=desc)
    finally:
        for h in hooks:
            h.remove()
    dtype = {nm: decomps[nm].sigma.dtype for nm in names}
    return ({nm: acc[nm][0].cpu().to(dtype[nm]) for nm in names},
            {nm: acc[nm][1].cpu().to(dtype[nm]) for nm in names})


def bsi_importance(sigma: Tensor, g: Tensor, h_diag: Tensor) -> Tensor:
    """Importance of each basis ``−g_i σ_i + ½ h_ii σ_i²`` (predicted loss increase of removing it).

    ``sigma``, ``g`` (∂L/∂σ), ``h_diag`` (∂²L/∂σ²): [k] → [k].
    """
    return -g * sigma + 0.5 * h_diag * sigma * sigma


@dataclass
class BSIScores:
    """Per-matrix BSI scores, all [k] fp64: ``importance`` and its variance ``importance_var``
    (from the Hutchinson variance, ``¼σ⁴·h_var``; 0 for the closed-form curvatures), ``grad``
    (∂L/∂σ), ``h_diag`` and ``h_var``; ``second_order``: the importance's second-order term
    ``½ h_ii σ_i²`` alone. ``curvature``: the estimator of ``h_diag``; ``probes``: Hutchinson probes
    this matrix's block used (0 otherwise); ``passes``: forward+backward passes over the calibration
    windows the whole scoring run took (shared by all matrices)."""
    importance: Tensor
    importance_var: Tensor
    grad: Tensor
    h_diag: Tensor
    h_var: Tensor
    curvature: str = "hutchinson"
    probes: int = 0
    passes: int = 0
    second_order: Optional[Tensor] = None

    def terms(self, which: str = "first+second") -> Tensor:
        """The predicted loss increase of removing each basis [k] from the Taylor terms ``which``:
        ``first+second`` (the BSI paper's ``−g_iσ_i + ½h_iiσ_i²``, :attr:`importance`) or ``second``
        (``½h_iiσ_i²``: the gradient term left out, see ``LowRankConfig.bsi_terms``)."""
        if which == "first+second":
            return self.importance
        if which == "second":
            if self.second_order is None:
                raise ConfigError("BSIScores.terms('second'): these scores carry no second_order term")
            return self.second_order
        raise ConfigError(f"BSIScores.terms: which must be 'first+second' or 'second', got {which!r}")


def _layer_of(name: str) -> str:
    """The decoder layer a module name sits in (the path up to its first numeric part), else the name."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return name


def bsi_scores(model: nn.Module, input_ids: Tensor, decomps: Mapping[str, WhitenedSVD], *,
               curvature: str = "hutchinson", probes: Union[int, str] = 8, eps: float = 1e-3,
               probe_tol: float = 0.1, max_probes: int = 64, stats=None,
               attention_mask: Optional[Tensor] = None, batch_size: int = 1,
               generator: Optional[torch.Generator] = None, progress: bool = False) -> dict[str, BSIScores]:
    """BSI importance of every basis of every targeted matrix, from the model's loss.

    ``input_ids`` [N, T] (+ ``attention_mask``): calibration windows; ``decomps``:
    ``{module name: WhitenedSVD}`` (e.g. :func:`~obdk.decompose.whitened.spectrum_as_svd`) of
    the modules' weights. ``g = ∇_σ L`` of the summed loss; ``h`` its Hessian diagonal by
    ``curvature``:

    * ``hutchinson`` (the BSI paper's): all matrices' σ perturbed at once by one Rademacher ``z``,
      ``2·probes`` passes at ``σ ± εz`` (weights set to ``W(σ') = U diag(σ') Vᵀ S⁻¹``);
    * ``blocked``: the same probes blocked per matrix (:func:`hutchinson_diag` ``blocks``), so
      no other matrix's Hessian entries add noise; ``2·probes`` passes *per matrix*;
    * ``kfac``: :func:`kfac_diag` from ``stats`` (``C_x``, ``C_g``, ``loss_tokens``): no pass;
    * ``fisher``: :func:`fisher_diag`, the exact empirical-Fisher diagonal: one pass, which also
      gives ``g``.

    ``g`` costs one more pass, except for ``fisher`` and where ``stats`` holds the summed weight
    gradients of empirical labels (``g_i = u_iᵀ G x_i``, no pass). ``probes``: an int, or
    ``"auto"``: probe until the relative standard error per matrix is at most ``probe_tol``
    (at most ``max_probes``). The original weights are restored afterwards (also on error).
    ``progress``: a bar over the passes named by phase. Returns ``{name: BSIScores}`` ([k] each).
    """
    from .config import BSI_CURVATURES
    if not decomps:
        raise ConfigError("bsi_scores: no decompositions given")
    if curvature not in BSI_CURVATURES:
        raise ConfigError(f"bsi_scores: curvature must be one of {', '.join(BSI_CURVATURES)}, got {curvature!r}")
    names = list(decomps)
    if curvature == "kfac" and (stats is None or not getattr(stats, "cg", None) or not getattr(stats, "cx", None)):
        raise ConfigError("bsi_curvature='kfac' reads C_x and C_g: calibrate with stats cx and cg (pass stats=)")
    modules = dict(model.named_modules())
    originals = {}
    for nm in names:
        w = getattr(modules.get(nm), "weight", None)
        if not isinstance(w, Tensor) or tuple(w.shape) != decomps[nm].shape:
            raise DataError(f"bsi_scores: {nm!r} has no weight of shape {decomps[nm].shape}")
        originals[nm] = w.detach().clone()
    passes = 0
    from tqdm.auto import tqdm
    bar = tqdm(total=None, desc=f"bsi [{curvature}]", unit="pass", disable=not progress, leave=False)

    def grad_fn(sig: Mapping[str, Tensor]) -> dict[str, Tensor]:
        nonlocal passes
        with torch.no_grad():
            for nm in names:
                w = modules[nm].weight
                w.copy_(decomps[nm].weight(sig[nm]).to(w.device, w.dtype))
        grads = summed_weight_grads(model, input_ids, names, attention_mask=attention_mask, batch_size=batch_size)
        passes += 1
        bar.update(1)
        return {nm: decomps[nm].grad_sigma(grads[nm].to(decomps[nm].u.device)) for nm in names}

    sigma = {nm: decomps[nm].sigma for nm in names}
    stat_grads = getattr(stats, "grad", None) or {}
    h_var: dict[str, Tensor] = {}
    used: dict[str, int] = {}
    try:
        if curvature == "fisher":
            bar.set_description("bsi [fisher] pass 1/1")
            g, h = fisher_diag(model, input_ids, decomps, attention_mask=attention_mask, batch_size=batch_size,
                               progress=progress, desc="bsi [fisher] pass 1/1: windows")
            passes += 1
            bar.update(1)
        else:
            if getattr(stats, "fisher", "empirical") == "empirical" and all(nm in stat_grads for nm in names):
                g = zero_sum_grads(decomps, stat_grads)
            else:
                bar.set_description(f"bsi [{curvature}] gradient")
                g = grad_fn(sigma)
            if curvature == "kfac":
                h = {nm: kfac_diag(decomps[nm], stats.cx_for(nm), stats.cg[nm], stats.loss_tokens) for nm in names}
            else:
                blocks = [[nm] for nm in names] if curvature == "blocked" else None
                counts: dict[int, int] = {}

                def on_probe(b: int, nb: int, p: int) -> None:
                    counts[b] = p + 1
                    total = "auto" if probes == "auto" else probes
                    bar.set_description(f"bsi [{curvature}] block {b + 1}/{nb} probe {p + 1}/{total}"
                                        if nb > 1 else f"bsi [{curvature}] probe {p + 1}/{total}")
                h, h_var = hutchinson_diag(grad_fn, sigma, probes=probes, eps=eps, generator=generator,
                                           blocks=blocks, tol=probe_tol, max_probes=max_probes, on_probe=on_probe)
                used = {nm: counts.get(names.index(nm) if blocks else 0, 0) for nm in names}
    finally:
        bar.close()
        with torch.no_grad():
            for nm in names:
                modules[nm].weight.copy_(originals[nm])
    out = {}
    for nm in names:
        s = decomps[nm].sigma
        hv = h_var.get(nm, torch.zeros_like(s))
        hd = h[nm].to(s.dtype)
        out[nm] = BSIScores(importance=bsi_importance(s, g[nm].to(s.dtype), hd),
                            importance_var=0.25 * s ** 4 * hv, grad=g[nm], h_diag=h[nm], h_var=hv,
                            curvature=curvature, probes=used.get(nm, 0), passes=passes,
                            second_order=bsi_importance(s, torch.zeros_like(s), hd))
    log.info("bsi_scores [%s]: %d matrices, %d gradient passes over %d windows%s", curvature, len(names), passes,
             input_ids.shape[0], f" ({sum(used.values())} probes, eps {eps:g})" if used else "")
    return out


# =========================================================================== a plan's scores (obdk.registry)


def plan_zero_sum(plan, model: Optional[nn.Module], config) -> dict[str, Tensor]:
    """``{name: δ [k]}`` of every target of ``plan`` (:class:`obdk.plan.Plan`) from its calibration's summed weight
    gradients (the statistics must hold ``grad``; :class:`~obdk.errors.NotCollectedError` naming a target)."""
    grads = getattr(plan.stats, "grad", None) or {}
    missing = [t.name for t in plan.targets if t.name not in grads]
    if missing:
        raise NotCollectedError(f"alloc 'zero-sum' needs the weight gradient ('grad') of every target, "
                                f"which this plan's calibration did not collect (e.g. {missing[0]}); "
                                f"prepare with alloc='zero-sum' or method 'zs-svd'")
    return zero_sum_deltas({t.name: plan.spectra[t.name] for t in plan.targets}, grads)


def plan_bsi(plan, model: Optional[nn.Module], config) -> dict[str, "BSIScores"]:
    """``{name: BSIScores}`` of every target of ``plan`` by ``config``'s ``bsi_curvature``, ``probes``, ``eps``,
    ``probe_tol``, ``max_probes`` (:func:`bsi_scores`): ``kfac`` from the statistics' ``C_x``, ``C_g`` and
    gradients; the others from the loss of ``model`` (the dense model, or a dense copy) on the calibration windows."""
    if config.bsi_curvature == "kfac":
        have = set(getattr(plan.stats, "stats", ()) or ())
        if not {"cx", "cg"} <= have:
            raise NotCollectedError(f"bsi_curvature 'kfac' reads C_x and C_g, and this plan's statistics "
                                    f"hold {sorted(have) or 'none'}; prepare with "
                                    f"bsi_curvature='kfac' (or whitening 'obd'), or choose another "
                                    f"bsi_curvature")
    if model is None or plan.data is None:
        raise ConfigError("alloc 'bsi' scores bases on the model's loss: it needs the dense model and "
                          "the calibration windows (prepare with calibration=...)")
    decomps = {t.name: spectrum_as_svd(plan.spectra[t.name]) for t in plan.targets}
    return bsi_scores(model, plan.data.input_ids, decomps, curvature=config.bsi_curvature,
                      probes=config.probes, eps=config.eps, probe_tol=config.probe_tol,
                      max_probes=config.max_probes, stats=plan.stats,
                      attention_mask=plan.data.attention_mask,
                      generator=torch.Generator().manual_seed(0), progress=plan.progress)


def layer_zero_sum(model: nn.Module, data, spectra: Mapping[str, object], stats) -> dict[str, Tensor]:
    """``{name: δ [k]}`` of one decoder layer's ``spectra`` from its streamed statistics ``stats`` (their ``grad``)."""
    return zero_sum_deltas(spectra, stats.grad)


def layer_bsi(model: nn.Module, data, spectra: Mapping[str, object], stats) -> dict[str, "BSIScores"]:
    """``{name: BSIScores}`` of one decoder layer's ``spectra`` by the K-FAC curvature of its streamed ``stats`` (no
    pass over the model)."""
    return bsi_scores(model, data.input_ids, {n: spectrum_as_svd(v) for n, v in spectra.items()},
                      curvature="kfac", stats=stats, attention_mask=data.attention_mask)
