"""Summed weight gradients of the next-token loss, for ZS-SVD, its correction and BSI."""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = ["summed_weight_grads", "next_token_loss"]


def _label_positions(attention_mask: Optional[Tensor]) -> Optional[Tensor]:
    """[B, T-1] bool: positions whose input and next token are both real (None: every position)."""
    if attention_mask is None:
        return None
    return attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()


def next_token_loss(logits: Tensor, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """Sum-reduced next-token cross entropy.

    ``logits``: [B, T, V]; ``input_ids``: [B, T]; ``attention_mask``: [B, T] (1 = real
    token) or ``None``. Position ``t`` predicts token ``t+1``; a pair counts only when
    both tokens are real. Returns a 0-d fp32 tensor (not divided by the token count).
    """
    labels = input_ids[:, 1:]
    valid = _label_positions(attention_mask)
    if valid is not None:
        labels = labels.masked_fill(~valid, -100)
    lg = logits[:, :-1].float()
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")


def summed_weight_grads(model: nn.Module, input_ids: Tensor, names: Sequence[str],
                        attention_mask: Optional[Tensor] = None, batch_size: int = 1) -> dict[str, Tensor]:
    """``∂L/∂W`` of the sum-reduced next-token loss over all windows, for the named modules' weights.

    ``input_ids``: LongTensor [N, T] of calibration windows; ``attention_mask``: [N, T]
    or ``None``; ``names``: module names (``model.layers.0.mlp.down_proj``) whose
    ``.weight`` [m, n] is differentiated. Windows run ``batch_size`` at a time.
    Only those weights get ``requires_grad`` during the call; every parameter's
    flag is restored afterwards (also on error). The model's train/eval mode is
    left as it is (call it on an eval-mode model). Returns ``{name: G [m, n]}``
    accumulated in fp32 (fp64 for fp64 weights), on the weights' device.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"summed_weight_grads: input_ids must be [N, T], got {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"summed_weight_grads: attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"summed_weight_grads: batch_size must be >= 1, got {batch_size}")
    modules = dict(model.named_modules())
    weights: list[Tensor] = []
    for nm in names:
        mod = modules.get(nm)
        w = getattr(mod, "weight", None) if mod is not None else None
        if not isinstance(w, Tensor) or w.dim() != 2:
            raise ValueError(f"summed_weight_grads: {nm!r} is not a module with a 2-D weight")
        weights.append(w)
    # the loss one window at a time from the head's weight where the logits are lm_head(trunk(...))
    # (obdk.calibrate.stats.plain_head): never the batch's [B, T, vocab] logits, their fp32 copy and gradient
    from ..calibrate import stats as cstats
    head = cstats.plain_head(model, {nm: modules[nm] for nm in names})
    runner = model.base_model if head is not None else model
    flags = [(p, p.requires_grad) for p in model.parameters()]
    device = weights[0].device
    acc = [torch.zeros(w.shape, dtype=torch.promote_types(w.dtype, torch.float32), device=w.device) for w in weights]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            for s in range(0, input_ids.shape[0], batch_size):
                ids = input_ids[s:s + batch_size].to(device)
                am = None if attention_mask is None else attention_mask[s:s + batch_size].to(device)
                out = runner(input_ids=ids, attention_mask=am, use_cache=False)
                if head is None:
                    loss = next_token_loss(out.logits, ids, am)
                    grads = torch.autograd.grad(loss, weights, allow_unused=True)
                else:
                    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
                    with torch.no_grad():
                        dh = cstats.head_backward(hidden.detach(), head, ids=ids, lab=_label_positions(am),
                                                  windows=range(ids.shape[0]), fisher="empirical", seed=0)
                    grads = torch.autograd.grad(hidden, weights, grad_outputs=dh, allow_unused=True)
                del out
                for a, g in zip(acc, grads):
                    if g is not None:
                        a.add_(g.to(a.dtype))
    finally:
        for p, f in flags:
            p.requires_grad_(f)
    log.debug("summed_weight_grads: %d windows, %d weights", input_ids.shape[0], len(weights))
    return dict(zip(names, acc))
