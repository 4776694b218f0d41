"""The loss engine: next-token loss and its backward, used by calibration, weight gradients and BSI.

Every gradient obdk takes is of the *sum*-reduced next-token cross entropy (each token's
gradient is not divided by the token count). :func:`loss_backward` runs one forward and that
backward; where the model's logits are exactly ``lm_head(trunk(...))`` (:func:`plain_head`) the
loss gradient at the hidden states is formed one window at a time from the head's weight
(:func:`head_backward`): only ``[T-1, vocab]`` logits and their fp32 softmax exist at once, never a
batch's ``[B, T, vocab]`` logits with their fp32 copy and gradient. :func:`summed_weight_grads`
sums ``∂L/∂W`` over calibration windows (ZS-SVD's scores, the corrections, BSI).
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, DataError
from ..models import ARCHITECTURES, accepts_position_ids, architecture, forward_kwargs, trunk  # noqa: F401

log = logging.getLogger(__name__)

__all__ = ["plain_head", "trunk", "head_backward", "loss_backward", "forward_kwargs", "label_positions",
           "next_token_loss", "window_nll", "summed_weight_grads", "window_generator", "accepts_position_ids"]


#: model types whose head is plain (:attr:`obdk.models.Architecture.plain_head`)
PLAIN_HEAD_TYPES = frozenset(k for k, a in ARCHITECTURES.items() if a.plain_head)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "logit_softcapping")


def window_generator(seed: int, window: int, device: torch.device) -> torch.Generator:
    """The generator that draws window ``window``'s true-Fisher labels: seeded by ``(seed, window)``."""
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + int(window)) % (1 << 63))
    return g


def plain_head(model: nn.Module, linears: dict[str, nn.Linear]) -> Optional[nn.Linear]:
    """The LM head when ``model``'s logits are exactly ``head(trunk(...)[0])``, else None.

    ``linears``: {name: module} of the modules whose gradients are wanted (they must all sit in the
    trunk, ``model.base_model``). Then a backward pass runs the trunk and forms the logits, the loss gradient and the
    head's input gradient one window at a time (:func:`head_backward`) instead of holding
    ``[B, T, vocab]`` logits, their fp32 copy and their gradient at once. Only for the model
    types whose :class:`~obdk.models.Architecture` says ``plain_head``, with no logit transform in their config, a plain ``nn.Linear``
    head outside the targeted Linears, and a trunk that :func:`trunk` accepts.
    """
    cfg = getattr(model, "config", None)
    arch = architecture(model)
    if cfg is None or arch is None or not arch.plain_head:
        return None
    if any(getattr(cfg, a, None) not in (None, 1, 1.0) for a in _LOGIT_TRANSFORMS):
        return None
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not nn.Linear or any(head is m for m in linears.values()):
        return None
    base = trunk(model, linears)
    if base is model or any(head is m for m in base.modules()):
        return None
    return head


def head_backward(hidden: Tensor, head: nn.Linear, *, ids: Tensor, lab: Optional[Tensor],
                   windows: Sequence[int], fisher: str, seed: int) -> Tensor:
    """``∂L/∂hidden`` [B, T, d] of the sum-reduced next-token loss of ``head(hidden)``.

    ``hidden`` [B, T, d] (detached trunk output), ``ids`` [B, T], ``lab`` [B, T-1] (positions with
    a label) or None (all). One window at a time: logits [T-1, V] in the head's dtype, their
    softmax in fp32 or better, ``p - onehot(label)`` (zero on unlabelled positions), times the
    head's weight. Equal to autograd through ``F.cross_entropy(logits, reduction="sum")``; with
    ``fisher="true"`` the labels are drawn exactly as the full-logits path draws them (one
    ``torch.multinomial`` per window on the same probabilities, the same generator).
    """
    B, T, _ = hidden.shape
    grad = torch.zeros_like(hidden)
    w = head.weight
    rows = torch.arange(T - 1, device=hidden.device)
    for b, win in enumerate(windows):
        logits = F.linear(hidden[b, :-1], w, head.bias)  # [T-1, V]
        ldt = torch.promote_types(logits.dtype, torch.float32)
        p = torch.softmax(logits.to(ldt), dim=-1)
        del logits
        if fisher == "empirical":
            labels = ids[b, 1:].to(p.device)
        else:
            labels = torch.multinomial(p, 1, generator=window_generator(seed, win, p.device)).squeeze(1)
        p[rows, labels] -= 1
        if lab is not None:
            p.mul_(lab[b].to(device=p.device, dtype=p.dtype)[:, None])
        grad[b, :-1] = p.to(w.dtype) @ w
        del p
    return grad


def loss_backward(runner: nn.Module, head: Optional[nn.Linear], *, ids: Tensor, mask: Optional[Tensor],
                  windows: Sequence[int], fisher: str, seed: int, accepts_pos: bool,
                  wrt: Optional[Sequence[Tensor]] = None, after_forward: Optional[Callable[[], None]] = None):
    """One forward over ``ids`` [B, T] and the backward of its sum-reduced next-token loss.

    The one loss engine of calibration (``C_g``), weight gradients and BSI. ``head``: the plain LM
    head (:func:`plain_head`); then ``runner`` is the trunk and the loss gradient at the hidden
    states comes from :func:`head_backward`, one window at a time. None: ``runner`` is the whole
    model and returns logits, and the loss is ``F.cross_entropy(reduction="sum")`` in fp32 or
    better. ``mask`` [B, T] or None; a position carries a loss when it and its next token are real.
    ``fisher``: ``empirical`` (the data's next tokens) or ``true`` (labels drawn from the model's
    own distribution, one generator per window, :func:`window_generator`). ``after_forward``: called
    between the forward and the backward (calibration checks its shared inputs there).
    ``wrt``: tensors to differentiate; returns their gradients (``None`` for an unused one).
    Without ``wrt`` the gradients flow into whatever the graph holds (``.grad``, or the
    calibration Function's ``C_g`` accumulators) and None is returned.
    """
    kwargs = forward_kwargs(ids, mask, accepts_pos)
    lab = label_positions(mask)
    with torch.enable_grad():
        out = runner(**kwargs)
        if after_forward is not None:
            after_forward()
        if head is not None:
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            del out
            with torch.no_grad():
                grad = head_backward(hidden.detach(), head, ids=ids, lab=lab, windows=windows, fisher=fisher,
                                     seed=seed)
            roots, seeds = (hidden,), (grad,)
        else:
            logits = (out.logits if hasattr(out, "logits") else out[0])[:, :-1]
            del out
            if fisher == "empirical":
                labels = ids[:, 1:].to(logits.device)
            else:
                with torch.no_grad():
                    probs = torch.softmax(logits.detach().to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
                    labels = torch.stack([
                        torch.multinomial(probs[b], 1, generator=window_generator(seed, w, probs.device)).squeeze(1)
                        for b, w in enumerate(windows)])
                    del probs
            if lab is not None:
                labels = labels.masked_fill(~lab.to(labels.device), -100)
            ldt = torch.promote_types(logits.dtype, torch.float32)  # 16-bit logits: loss in fp32; fp64 stays fp64
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(ldt), labels.reshape(-1),
                                   reduction="sum", ignore_index=-100)
            del logits
            roots, seeds = (loss,), None
        if wrt is None:
            torch.autograd.backward(roots, seeds)
            return None
        return torch.autograd.grad(roots, list(wrt), grad_outputs=seeds, allow_unused=True)


def label_positions(attention_mask: Optional[Tensor]) -> Optional[Tensor]:
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
    valid = label_positions(attention_mask)
    if valid is not None:
        labels = labels.masked_fill(~valid, -100)
    lg = logits[:, :-1].float()
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")


def window_nll(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Mean next-token cross entropy of each window, as perplexity scores it.

    ``logits`` [B, T, V], ``input_ids`` [B, T] (unpadded windows) → [B] fp32: position ``t``
    predicts token ``t+1``; the loss is computed on fp32 logits.
    """
    B, T, V = logits.shape
    return F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), input_ids[:, 1:].reshape(-1),
                           reduction="none").view(B, T - 1).mean(dim=1)


def summed_weight_grads(model: nn.Module, input_ids: Tensor, names: Sequence[str],
                        attention_mask: Optional[Tensor] = None, batch_size: int = 1, *,
                        progress: bool = False, desc: str = "gradients") -> dict[str, Tensor]:
    """``∂L/∂W`` of the sum-reduced next-token loss over all windows, for the named modules' weights.

    ``input_ids``: LongTensor [N, T] of calibration windows; ``attention_mask``: [N, T]
    or ``None``; ``names``: module names (``model.layers.0.mlp.down_proj``) whose
    ``.weight`` [m, n] is differentiated. Windows run ``batch_size`` at a time.
    Only those weights get ``requires_grad`` during the call; every parameter's
    flag is restored afterwards (also on error). The model's train/eval mode is
    left as it is (call it on an eval-mode model). ``progress``: a bar named ``desc``. Returns ``{name: G [m, n]}``
    accumulated in fp32 (fp64 for fp64 weights), on the weights' device.
    """
    if input_ids.dim() != 2:
        raise DataError(f"summed_weight_grads: input_ids must be [N, T], got {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise DataError(f"summed_weight_grads: attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    if batch_size < 1:
        raise ConfigError(f"summed_weight_grads: batch_size must be >= 1, got {batch_size}")
    modules = dict(model.named_modules())
    weights: list[Tensor] = []
    for nm in names:
        mod = modules.get(nm)
        w = getattr(mod, "weight", None) if mod is not None else None
        if not isinstance(w, Tensor) or w.dim() != 2:
            raise DataError(f"summed_weight_grads: {nm!r} is not a module with a 2-D weight")
        weights.append(w)
    head = plain_head(model, {nm: modules[nm] for nm in names})
    runner = trunk(model, {nm: modules[nm] for nm in names}) if head is not None else model
    accepts_pos = accepts_position_ids(runner)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    device = weights[0].device
    acc = [torch.zeros(w.shape, dtype=torch.promote_types(w.dtype, torch.float32), device=w.device) for w in weights]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        from tqdm.auto import tqdm
        for s in tqdm(range(0, input_ids.shape[0], batch_size), desc=desc, unit="batch", disable=not progress,
                      leave=False):
            ids = input_ids[s:s + batch_size].to(device)
            am = None if attention_mask is None else attention_mask[s:s + batch_size].to(device)
            grads = loss_backward(runner, head, ids=ids, mask=am, windows=range(s, s + ids.shape[0]),
                                  fisher="empirical", seed=0, accepts_pos=accepts_pos, wrt=weights)
            for a, g in zip(acc, grads):
                if g is not None:
                    a.add_(g.to(a.dtype))
    finally:
        for p, f in flags:
            p.requires_grad_(f)
    log.debug("summed_weight_grads: %d windows, %d weights", input_ids.shape[0], len(weights))
    return dict(zip(names, acc))
