"""SVD-LLM as published, re-implemented as the baseline obdk's ``svd-llm`` is measured against.

The research code (AIoT-MLSys-Lab/SVD-LLM, ``SVDLLM.py``), re-written here (not copied): each
function's docstring lists the steps it mirrors, so that a speed comparison runs the published
arithmetic and memory schedule, not obdk's. ``tests/test_bench_reference.py`` checks it against
obdk: its Grams equal obdk's ``C_x`` times the token count, its ranks are obdk's uniform ranks
(:func:`rank` with ``match``), its factors give obdk ``svd-llm``'s truncated weights at the same
rank and damping, and its eigenvalue-shift fallback gives finite factors on a singular Gram.

Pipeline: :func:`collect` (forward hooks: one raw Gram per Linear) → :func:`cholesky` (fp64,
with the eigenvalue-shift retry) → :func:`whitening` at a keep (explicit inverse, full SVD,
two ``nn.Linear`` per matrix); :func:`compress` runs all three. Every stage is timed into an
:class:`obdk.pipeline.StageTimer` under obdk's stage names (``calibration``, ``factorisation``,
``packing``), with ``factorisation/cholesky|inv|svd`` as a breakdown.
"""
from __future__ import annotations

import logging
import math
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn as nn

from obdk.models import decoder_layers, set_module
from obdk.report import StageTimer

log = logging.getLogger(__name__)


def targets(model: nn.Module) -> list[tuple[int, str, nn.Linear]]:
    """``(layer index, full name, module)`` of every ``nn.Linear`` inside the decoder layers.

    Mirrors the reference's ``find_layers(layers[i])`` over ``model.model.layers``.
    """
    path, layers = decoder_layers(model)
    out = []
    for i, layer in enumerate(layers):
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear):
                out.append((i, f"{path}.{i}.{name}", mod))
    return out


@torch.no_grad()
def collect(model: nn.Module, input_ids: torch.Tensor, *, timer: Optional[StageTimer] = None,
            batch_size: int = 1, offload: bool = True) -> dict[str, torch.Tensor]:
    """Raw input Grams ``Σ_t x_t x_tᵀ`` (fp32, not normalised) of every targeted Linear.

    As ``profle_svdllm`` in SVD-LLM's ``SVDLLM.py``: ``register_forward_hook`` on every Linear;
    the hook upcasts ``input[0]`` to fp32 (``.detach().float()``), forms the batched
    ``inp.transpose(1, 2) @ inp`` and sums it over the batch into that module's own
    accumulator (q/k/v and gate/up each keep a copy: no sharing); whole-model forward passes
    over the windows; hooks cleared afterwards; with ``offload`` the Grams then go to the CPU
    (``raw_scaling_diag_matrix.cpu()``) as the reference moves them before its Cholesky loop.
    (The reference hooks every ``nn.Linear`` of the
    model, ``lm_head`` included, whose Gram is never used; here only the decoder Linears.
    Its published ``main`` step 1 calls the layer-by-layer ``profle_svdllm_low_resource``,
    which has the same hook and arithmetic and only changes the memory schedule.)
    ``use_cache=False`` for both this and obdk. Timed as stage ``calibration``.
    """
    timer = timer or StageTimer()
    linears = targets(model)
    grams: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name):
        def hook(module, inputs, output):
            inp = inputs[0].detach().float()
            if inp.dim() == 2:
                inp = inp.unsqueeze(0)
            adds = torch.matmul(inp.transpose(1, 2), inp)
            adds_sum = torch.sum(adds, dim=0)
            if name in grams:
                grams[name] += adds_sum
            else:
                grams[name] = adds_sum
            del inp, adds, adds_sum
        return hook

    emb = model.get_input_embeddings()
    dev = emb.weight.device
    was_training = model.training
    model.eval()
    with timer("calibration"):
        for _, name, mod in linears:
            handles.append(mod.register_forward_hook(make_hook(name)))
        try:
            for b0 in range(0, input_ids.shape[0], batch_size):
                model(input_ids=input_ids[b0:b0 + batch_size].to(dev), use_cache=False)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        if offload:
            for name in grams:
                grams[name] = grams[name].cpu()
    return grams


@torch.no_grad()
def cholesky(grams: dict[str, torch.Tensor], *, timer: Optional[StageTimer] = None,
             detail: Optional[StageTimer] = None, damping: float = 0.0,
             shifted: Optional[list] = None, device=None) -> dict[str, torch.Tensor]:
    """fp64 lower Cholesky factor ``S`` of each raw Gram (``S Sᵀ = Σ x xᵀ``), kept on the CPU.

    As the second half of ``profle_svdllm``: ``raw.double().to(device)`` (default: where the
    Gram is),
    ``torch.linalg.cholesky``; on failure ``eigvalsh`` and a shift ``(−λ_min + 1e-6)·I``, then
    Cholesky again; the factor goes to the CPU (``profiling_mat``) and the Gram is freed
    (``grams`` is emptied as it goes). No damping in the reference: ``damping`` > 0 adds
    ``damping·mean(diag)·I`` first (obdk's relative damping), only so that the tests can
    compare both at the same damping. Names whose Gram needed the shift are appended to
    ``shifted``. Timed as ``factorisation`` (detail ``factorisation/cholesky``).
    """
    timer = timer or StageTimer()
    detail = detail or StageTimer()
    out: dict[str, torch.Tensor] = {}
    for name in list(grams):
        with timer("factorisation"), detail("factorisation/cholesky"):
            raw = grams.pop(name).double()
            if device is not None:
                raw = raw.to(device)
            if damping > 0:
                raw += damping * torch.diagonal(raw).mean() * torch.eye(raw.shape[0], dtype=raw.dtype,
                                                                         device=raw.device)
            try:
                chol = torch.linalg.cholesky(raw)
            except Exception:  # torch.linalg.LinAlgError: not positive definite
                log.info("reference: %s: Gram is not positive definite; eigenvalue shift", name)
                eigenvalues = torch.linalg.eigvalsh(raw)
                raw += (-eigenvalues[0] + 1e-6) * torch.eye(raw.shape[0], dtype=raw.dtype, device=raw.device)
                chol = torch.linalg.cholesky(raw)
                if shifted is not None:
                    shifted.append(name)
            out[name] = chol.cpu()
            del raw, chol
    return out


def rank(m: int, n: int, keep: float, mode: str = "match") -> Optional[int]:
    """Rank of an ``m×n`` matrix at ``keep`` (None: kept dense).

    ``match``: obdk's uniform rank, ``round(keep·mn/(m+n))`` (halves up, at least 1), dense
    when ``r(m+n) ≥ mn`` (``obdk.allocate.allocate_uniform`` with ``multiple=1``), so the
    baseline keeps exactly the parameters obdk keeps. ``floor``: the reference's
    ``int(m·n·ratio/(m+n))`` with ``ratio = keep``, never dense.
    """
    be = m * n / (m + n)
    if mode == "floor":
        return max(1, int(m * n * keep / (m + n)))
    if mode != "match":
        raise ValueError(f"rank: mode must be 'match' or 'floor', got {mode!r}")
    if keep >= 1.0:
        return None
    r = max(1, math.floor(keep * be + 0.5))
    return None if r * (m + n) >= m * n else r


@torch.no_grad()
def whitening(model: nn.Module, chol: dict[str, torch.Tensor], keep: float, *,
              timer: Optional[StageTimer] = None, detail: Optional[StageTimer] = None,
              rank_mode: str = "match") -> dict[str, Optional[int]]:
    """Replace every targeted Linear by its SVD-LLM factors at ``keep``; returns the ranks.

    As ``whitening`` in SVD-LLM's ``SVDLLM.py``, per Linear: ``W = weight.float()``; the fp64
    Cholesky factor ``S`` moved to the device; explicit ``S⁻¹ = torch.linalg.inv(S)`` in fp64
    (on failure ``S += 1e-6·I`` and again); both cast to fp32; ``W_scale = W @ S``; full
    ``torch.linalg.svd(W_scale, full_matrices=False)`` in fp32; truncate to ``r``
    (:func:`rank`); ``truc_v = Vᵀ[:r] @ S⁻¹``; ``√Σ`` as a ``torch.diag`` matrix and
    matmuls: ``svd_u = U_r·√Σ``, ``svd_v = √Σ·truc_v``. Packing builds two fresh ``nn.Linear``
    (``v_proj: n→r``, ``u_proj: r→m``, default init, then the factors assigned) as the
    reference's ``SVD_LlamaAttention``/``SVD_LlamaMLP`` hold, in an ``nn.Sequential`` swapped in
    for the Linear (the reference swaps whole forked attention/MLP classes instead, which broke
    on GQA models; the arithmetic per matrix is the same). Factors are cast to the weight's
    dtype (the reference evaluates in fp32). Timed as ``factorisation`` (details
    ``factorisation/inv``, ``factorisation/svd``) and ``packing``.
    """
    timer = timer or StageTimer()
    detail = detail or StageTimer()
    ranks: dict[str, Optional[int]] = {}
    for _, name, lin in targets(model):
        m, n = lin.out_features, lin.in_features
        r = rank(m, n, keep, rank_mode)
        ranks[name] = r
        if r is None:
            continue
        dev, dt = lin.weight.device, lin.weight.dtype
        with timer("factorisation"):
            with detail("factorisation/inv"):
                W = lin.weight.data.float().to(dev)
                scaling_diag_matrix = chol[name].to(dev)
                try:
                    scaling_matrix_inv = torch.linalg.inv(scaling_diag_matrix)
                except Exception:
                    scaling_diag_matrix = scaling_diag_matrix + 1e-6 * torch.eye(n, dtype=scaling_diag_matrix.dtype,
                                                                                 device=dev)
                    scaling_matrix_inv = torch.linalg.inv(scaling_diag_matrix)
                scaling_diag_matrix = scaling_diag_matrix.float()
                scaling_matrix_inv = scaling_matrix_inv.float()
            with detail("factorisation/svd"):
                W_scale = torch.matmul(W, scaling_diag_matrix)
                U, S, VT = torch.linalg.svd(W_scale, full_matrices=False)
        with timer("packing"):
            truc_s = S[:r]
            truc_u = U[:, :r]
            truc_v = torch.matmul(VT[:r, :], scaling_matrix_inv)
            sqrt_sigma = torch.sqrt(torch.diag(truc_s))
            svd_u = torch.matmul(truc_u, sqrt_sigma).to(dt)
            svd_v = torch.matmul(sqrt_sigma, truc_v).to(dt)
            v_proj = nn.Linear(n, r, bias=False, device=dev, dtype=dt)
            u_proj = nn.Linear(r, m, bias=lin.bias is not None, device=dev, dtype=dt)
            v_proj.weight.data = svd_v
            u_proj.weight.data = svd_u
            if lin.bias is not None:
                u_proj.bias.data = lin.bias.data
            set_module(model, name, nn.Sequential(OrderedDict(v_proj=v_proj, u_proj=u_proj)))
            del W, W_scale, scaling_matrix_inv, scaling_diag_matrix, U, S, VT, truc_s, truc_u, truc_v, sqrt_sigma
    return ranks


def compress(model: nn.Module, windows: torch.Tensor, keep: float, *, timer: Optional[StageTimer] = None,
             detail: Optional[StageTimer] = None, rank_mode: str = "match", damping: float = 0.0,
             shifted: Optional[list] = None):
    """The whole reference pipeline on ``model`` (in place): collect, Cholesky, whitening at ``keep``.

    Returns ``(ranks, chol)``; ``chol`` (the reference's ``profiling_mat``, on the CPU) serves
    further ratios through :func:`whitening`. Names of Grams that needed the
    eigenvalue shift are appended to ``shifted``.
    """
    timer = timer or StageTimer()
    detail = detail or StageTimer()
    dev = model.get_input_embeddings().weight.device
    grams = collect(model, windows, timer=timer)
    shifted = [] if shifted is None else shifted
    chol = cholesky(grams, timer=timer, detail=detail, damping=damping, shifted=shifted, device=dev)
    if shifted:
        log.warning("reference: %d of %d Grams were not positive definite (eigenvalue shift applied)",
                    len(shifted), len(chol))
    ranks = whitening(model, chol, keep, timer=timer, detail=detail, rank_mode=rank_mode)
    return ranks, chol


def params_after(model: nn.Module) -> int:
    """Parameters of the targeted Linears (dense or factored) of ``model``."""
    path, layers = decoder_layers(model)
    total = 0
    for layer in layers:
        for mod in layer.modules():
            if isinstance(mod, nn.Linear):
                total += mod.weight.numel()
            elif hasattr(mod, "weight_a") and hasattr(mod, "weight_b"):
                total += mod.weight_a.numel() + mod.weight_b.numel()
    return total
