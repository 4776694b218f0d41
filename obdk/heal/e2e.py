"""End-to-end healing: every target's factors trained together on the KL divergence of the compressed model's
next-token distribution from the dense model's, the teacher run alongside, mixed with the data's next-token
cross-entropy by ``heal_ce`` (``LowRankConfig``): ``(1 − ce)·KL + ce·CE`` per label position.

The model passed in is the dense model and stays it: for each window the dense targets give the teacher's log
probabilities (no graph), then the targets are swapped for :class:`~obdk.heal.train.HealFactors` (fp32 masters of
the truncated, corrected factors) for the student's forward and backward, and swapped back. So the teacher costs
one forward per window and no memory beyond one window's logits; keeping the teacher's logits instead would cost
``N · T · V`` floats (SmolLM2-135M, 32 × 512 windows: 3.2 GB in fp32). Beyond the model: every target's factors
four times in fp32 (masters, Adam's two moments, the best point) and one window's activations with their graph.
For models that fit on one device; a streamed plan heals layer-wise (:mod:`obdk.heal.layerwise`).
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..models import set_module
from .train import HealFactors, Schedule, master_dtype, train

__all__ = ["heal_e2e"]


def _loss(student: Tensor, teacher_logp: Optional[Tensor], ids: Tensor, mask: Optional[Tensor], ce: float
          ) -> tuple[Tensor, int]:
    """One window's summed loss over its label positions (a real token followed by a real token) and their count:
    ``(1 − ce)·KL(teacher ‖ student) + ce·CE(next token)``; ``teacher_logp`` None when ``ce`` is 1."""
    s = F.log_softmax(student[:, :-1].float(), dim=-1)  # [1, T-1, V]
    per = torch.zeros(s.shape[:2], dtype=s.dtype, device=s.device)
    if ce < 1:
        t = teacher_logp[:, :-1]
        per = per + (1 - ce) * (t.exp() * (t - s)).sum(-1)
    if ce > 0:
        per = per - ce * s.gather(-1, ids[:, 1:, None])[..., 0]
    if mask is not None:
        keep = mask[:, 1:].bool() & mask[:, :-1].bool()
        return per[keep].sum(), int(keep.sum())
    return per.sum(), int(per.numel())


def heal_e2e(model: nn.Module, factors: Mapping[str, tuple], ids: Tensor, mask: Optional[Tensor], *, windows,
             train_windows, held_out, schedule: Schedule, ce: float = 0.0, progress: bool = True) -> tuple[dict, dict]:
    """Heal ``factors`` (``{name: (a [r, n], b [m, r], predicted)}``) end to end on the windows ``ids`` [N, T]
    (``mask`` [N, T] or None) this rank holds (``windows``: global indices; the gradients are summed over the
    ranks), on ``(1 − ce)·KL(dense ‖ compressed) + ce·CE`` per label position (``ce`` = 1: the data's next-token
    cross-entropy alone, no teacher run). ``model`` is left as it was. Returns ``(healed factors on the CPU,
    train()'s record)``."""
    from tqdm.auto import tqdm
    dense = {n: model.get_submodule(n) for n in factors}
    dev = next(iter(dense.values())).weight.device
    student = {n: HealFactors(f[0].to(dev), f[1].to(dev), dense[n].bias, master_dtype(dense[n].weight.dtype))
               for n, f in factors.items()}
    params = [p for m in student.values() for p in (m.a, m.b)]
    frozen = [p for p in model.parameters() if p.requires_grad]

    def install(mods: Mapping[str, nn.Module]) -> None:
        for n, m in mods.items():
            set_module(model, n, m)

    def run(w: int, grad: bool) -> tuple[Tensor, int]:
        x = ids[w:w + 1].to(dev)
        m = mask[w:w + 1].to(dev) if mask is not None else None
        teacher = None
        if ce < 1:
            with torch.no_grad():
                teacher = F.log_softmax(model(input_ids=x, attention_mask=m, use_cache=False).logits.float(), dim=-1)
        install(student)
        try:
            with torch.set_grad_enabled(grad):
                return _loss(model(input_ids=x, attention_mask=m, use_cache=False).logits, teacher, x, m, ce)
        finally:
            install(dense)

    was_training = model.training
    model.eval()
    for p in frozen:
        p.requires_grad_(False)
    try:
        with tqdm(total=schedule.steps, desc="obdk heal [end-to-end]", unit="step", disable=not progress,
                  leave=False) as bar:
            record = train(params, lambda w: run(w, True), mine=windows, train_windows=train_windows,
                           held_out=held_out, schedule=schedule, evaluate=lambda w: run(w, False),
                           what="heal end-to-end", bar=bar)
    finally:
        install(dense)
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    healed = {n: (*student[n].factors(factors[n][0].dtype), factors[n][2]) for n in factors}
    return {n: (a.cpu(), b.cpu(), p) for n, (a, b, p) in healed.items()}, record
