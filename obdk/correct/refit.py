"""Sequential refit: each target is fitted to the *dense* model's behaviour on the inputs that the
*already compressed* earlier layers produce (``LowRankConfig.correct="seq"``, ``--correct seq``).

One-shot compression decomposes every Linear against the dense model's input covariance ``C_x``.
Once earlier layers are truncated, a layer sees shifted inputs ``x'`` instead of ``x``. The K-FAC
loss of a replacement ``W'`` measured where it now matters is

    E_t ‖R_gᵀ (W x_t − W' x'_t)‖²,   R_g R_gᵀ = C_g (the dense model's output-gradient covariance).

With ``C' = E[x' x'ᵀ]`` and ``C_× = E[x x'ᵀ]``, expanding gives, up to a constant,
``‖R_gᵀ (W* − W') S'‖²_F`` with ``S' S'ᵀ = C'`` and the unconstrained optimum

    W* = W C_× C'⁻¹, computed damped as W (C_× + λI)(C' + λI)⁻¹ with λ = α·mean(diag C'):

a Cholesky solve, no inverse; the damping pulls ``W*`` toward the original ``W`` (a ridge toward
zero, ``W C_× (C' + λI)⁻¹``, shrinks the weights instead).

So the best rank-r ``W'`` is the OBD (or SVD-LLM, ``C_g = I``) truncation of ``W*`` whitened by
``C'`` — the same closed form as one-shot, applied to the refitted weight and the shifted inputs.
Layers are processed in forward order; within a decoder layer, shared-input groups in forward order
(q/k/v, then o, then gate/up, then down), so every group sees the inputs that the compressed
groups before it produce. Ranks come from the allocation of the one-shot plan (its predicted
losses), so ``keep`` is honoured exactly as without refit.

It stays available for comparison and for models where the input shift is larger; what it
measured is in ``benchmarks/README.md`` (refit).

Cost: per decoder layer and calibration window, two partial layer forwards per group (the dense
twin and the compressed layer, each stopped at the group's input) and one full forward of each to
move on — about ``2 × (groups + 1)`` forward passes of the decoder stack in all, no backward pass —
plus one Cholesky solve and one decomposition per target.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..decompose import factorize
from ..decompose.roots import cholesky_root
from ..errors import ConfigError, DataError, NonFiniteError
from ..models import decoder_layers

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by a capture hook to end a forward once the wanted input is seen."""


def _capture_layer_calls(model: nn.Module, layers: nn.ModuleList, input_ids: Tensor,
                         attention_mask: Optional[Tensor]) -> tuple[list[Tensor], list[list[tuple[tuple, dict]]]]:
    """The first layer's hidden states per window, and every layer's other call arguments.

    Returns ``(hidden0, calls)`` with ``hidden0[j]`` the input of ``layers[0]`` for window ``j`` and
    ``calls[i][j] = (args, kwargs)`` of ``layers[i]`` with the hidden states left out (``args[0]``
    is None, or ``kwargs`` has no ``hidden_states``). Each layer keeps its own kwargs: some
    architectures pass per-layer masks (sliding-window layers). Tensors shared between layers
    (position embeddings, a common mask) are stored once, by reference.
    """
    hidden0: list[Tensor] = []
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in layers]

    def make(i):
        def pre(_mod, args, kwargs):
            kw = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in kwargs.items() if k != "hidden_states"}
            if i == 0:
                hidden0.append((args[0] if args else kwargs["hidden_states"]).detach().clone())
            calls[i].append(((None,) + tuple(args[1:]) if args else (), kw))
        return pre

    hooks = [layer.register_forward_pre_hook(make(i), with_kwargs=True) for i, layer in enumerate(layers)]
    dev = next(model.parameters()).device
    try:
        with torch.no_grad():
            for j in range(input_ids.shape[0]):
                mask = attention_mask[j:j + 1].to(dev) if attention_mask is not None else None
                model(input_ids=input_ids[j:j + 1].to(dev), attention_mask=mask, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    if any(len(c) != input_ids.shape[0] for c in calls):
        raise DataError("sequential refit: not every decoder layer was called once per window")
    return hidden0, calls


def _call(layer: nn.Module, args: tuple, kwargs: dict, hidden: Tensor):
    if args:
        return layer(hidden, *args[1:], **kwargs)
    return layer(**{**kwargs, "hidden_states": hidden})


def _out(res) -> Tensor:
    return res[0] if isinstance(res, (tuple, list)) else res


def _input_of(layer: nn.Module, module: nn.Module, args: tuple, kwargs: dict, hidden: Tensor) -> Tensor:
    """Input of ``module`` (inside ``layer``) when ``layer`` runs on ``hidden``; the forward stops there."""
    got: list[Tensor] = []

    def pre(_mod, a):
        got.append(a[0].detach())
        raise _Stop

    h = module.register_forward_pre_hook(pre)
    try:
        _call(layer, args, kwargs, hidden)
    except _Stop:
        pass
    finally:
        h.remove()
    if not got:
        raise DataError(f"sequential refit: {type(module).__name__} was not called by its decoder layer")
    return got[0]


def shifted_cholesky(c: Tensor, damping: float, what: str) -> tuple[Tensor, float]:
    """Cholesky factor of the shifted input covariance ``c + α·mean(diag c)·I``, α escalating ×10 from ``damping``."""
    scale = float(c.diagonal().mean())
    if not scale > 0:
        raise DataError(f"sequential refit: {what}: the shifted input covariance is zero or not finite")
    return cholesky_root(c, max(damping, 1e-10), name=what, damping_max=1e3, fn="sequential refit")


def sequential_refit(model: nn.Module, plan: Any, ranks: dict[str, int], data: Any, *,
                     progress: bool = False) -> tuple[dict[str, tuple[Tensor, Tensor, float]], dict[str, dict]]:
    """Factors of every ranked target, refitted layer by layer on the compressed model's inputs.

    ``model``: the dense model the plan was prepared on (its weights are used and left unchanged:
    targets are overwritten with their truncation ``b a`` during the pass and restored at the end).
    ``plan``: an :class:`obdk.pipeline.Plan` whose whitening is ``svd-llm`` or ``obd`` (its ``stats``
    give ``C_g``). ``ranks``: target name → rank (targets not in it stay dense and are not refitted).
    ``data``: the calibration windows (``input_ids`` [N, T], optional ``attention_mask``).

    Returns ``(factors, damping)``: ``factors[name] = (a [r, n], b [m, r], predicted_loss)`` where
    ``predicted_loss`` is ``½Σλ`` of what the truncation of ``W*`` discarded under ``C'`` (and
    ``C_g``); ``damping[name] = {"cx_shifted_solve": α, **the decomposition's damping}``.
    """
    whitening = plan.config.resolved_whitening
    if whitening not in ("svd-llm", "obd"):
        raise ConfigError(f"correct='seq' needs input whitening (method svd-llm or obd), not {whitening!r}")
    path, layers = decoder_layers(model)
    cdtype = torch.float64 if plan.config.compute_dtype == "float64" else torch.float32
    damping = float(plan.config.damping)

    # targets with a rank, grouped by layer index, then by shared input in forward order
    by_layer: dict[int, dict[str, list]] = {}
    for t in plan.targets:
        if t.name not in ranks:
            continue
        rest = t.name[len(path) + 1:] if t.name.startswith(path + ".") else None
        if rest is None or not rest.split(".", 1)[0].isdigit():
            raise ConfigError(f"sequential refit: target {t.name} is not inside the decoder layers {path}")
        i = int(rest.split(".", 1)[0])
        by_layer.setdefault(i, {}).setdefault(t.input_key, []).append(t)

    ids, mask = data.input_ids, getattr(data, "attention_mask", None)
    dense_h, all_calls = _capture_layer_calls(model, layers, ids, mask)
    comp_h = [h.clone() for h in dense_h]
    keep_rows = [None if mask is None else mask[j].reshape(-1).bool() for j in range(len(dense_h))]

    out: dict[str, tuple[Tensor, Tensor, float]] = {}
    originals: dict[str, Tensor] = {}
    refit_damping: dict[str, dict] = {}
    last = max(by_layer) if by_layer else -1
    from tqdm.auto import tqdm
    try:
        for i in tqdm(range(last + 1), desc="refit", disable=not progress):
            layer, calls = layers[i], all_calls[i]
            groups = by_layer.get(i, {})
            twin = copy.deepcopy(layer) if groups else None
            prefix = f"{path}.{i}."
            with torch.no_grad():
                for key, members in groups.items():
                    rel = key[:-len(":in")][len(prefix):]
                    mod_c, mod_d = layer.get_submodule(rel), twin.get_submodule(rel)
                    n = members[0].n
                    cpp = torch.zeros(n, n, dtype=torch.float64)
                    cxp = torch.zeros(n, n, dtype=torch.float64)
                    tokens = 0
                    for j, (a, k) in enumerate(calls):
                        x = _input_of(twin, mod_d, a, k, dense_h[j]).reshape(-1, n)
                        xp = _input_of(layer, mod_c, a, k, comp_h[j]).reshape(-1, n)
                        if keep_rows[j] is not None:
                            x, xp = x[keep_rows[j]], xp[keep_rows[j]]
                        x, xp = x.to(torch.float64).cpu(), xp.to(torch.float64).cpu()
                        cpp.addmm_(xp.T, xp)
                        cxp.addmm_(x.T, xp)
                        tokens += x.shape[0]
                    cpp /= tokens
                    cxp /= tokens
                    cpp = (cpp + cpp.T) / 2
                    chol, alpha = shifted_cholesky(cpp, damping, key)
                    # damping regularises toward the original weight, not toward zero
                    cx_d = cxp + alpha * float(cpp.diagonal().mean()) * torch.eye(n, dtype=cxp.dtype)
                    for t in members:
                        lin = layer.get_submodule(t.name[len(prefix):])
                        w = lin.weight.detach()
                        originals[t.name] = w.clone()
                        # W* = W (C_× + λI)(C' + λI)⁻¹ ⇔ W*ᵀ = (C' + λI)⁻¹ (C_× + λI)ᵀ Wᵀ (Cholesky solve)
                        wstar = torch.cholesky_solve(cx_d.T @ w.to(torch.float64).cpu().T, chol).T
                        cg = plan.stats.cg[t.name] if whitening == "obd" else None
                        fac = factorize(wstar if w.dtype == torch.float64 else wstar.float(),
                                        int(ranks[t.name]), method=whitening, cx=cpp.float(), cg=cg,
                                        solver=plan.config.solver, compute_dtype=cdtype, damping=damping,
                                        keep_dense_at_break_even=False)
                        a_f, b_f = fac.a.to(w.dtype), fac.b.to(w.dtype)
                        out[t.name] = (a_f, b_f, float(fac.predicted_loss))
                        refit_damping[t.name] = {"cx_shifted_solve": alpha, **dict(fac.damping)}
                        lin.weight.copy_((b_f.double() @ a_f.double()).to(w.dtype).to(w.device))
                # move both streams past this layer
                for j, (a, k) in enumerate(calls):
                    if twin is not None:
                        dense_h[j] = _out(_call(twin, a, k, dense_h[j])).detach()
                    else:
                        dense_h[j] = _out(_call(layer, a, k, dense_h[j])).detach()
                    comp_h[j] = _out(_call(layer, a, k, comp_h[j])).detach()
            for h in dense_h + comp_h:
                if not torch.isfinite(h).all():
                    raise NonFiniteError(f"sequential refit: non-finite hidden states after layer {i} ({prefix[:-1]})")
            del twin
    finally:
        with torch.no_grad():
            for name, w in originals.items():
                model.get_submodule(name).weight.copy_(w)
    return out, refit_damping


def run(model: nn.Module, plan: Any, config, factors: dict[str, tuple], *,
        progress: bool = False) -> tuple[dict[str, tuple], dict[str, dict]]:
    """``correct='seq'`` (its entry in :data:`obdk.registry.CORRECTIONS`): :func:`sequential_refit` of every target
    of ``factors`` (``{name: (a [r, n], b [m, r], predicted)}``) at its rank; the damping of each refit's solves
    as ``refit_<key>``."""
    factors, used = sequential_refit(model, plan, {n: f[0].shape[0] for n, f in factors.items()}, plan.data,
                                     progress=progress)
    return factors, {n: {f"refit_{k}": v for k, v in d.items()} for n, d in used.items()}
