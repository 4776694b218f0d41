"""What both healing modes share: trainable factors, the step schedule, Adam, the held-out early stop.

A step of healing is one group of ``heal_batch`` training windows (a seeded permutation of the training windows,
walked in order and drawn again each epoch); each rank of a process group runs the step's windows it holds and
the gradients are summed over the ranks (:func:`obdk.stream.distributed.all_reduce_sum_`) before the step, so
two ranks take the same steps as one process up to the order of the sums. The training loss is a sum over
tokens divided by the step's tokens on every rank; the held-out loss is the same over the held-out windows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, NonFiniteError
from ..stream import distributed as dist

__all__ = ["HealFactors", "Schedule", "heldout_split", "train"]


class HealFactors(nn.Module):
    """A low-rank Linear under training: ``y = b (a x) + bias`` with master factors ``a`` [r, n] and ``b`` [m, r] in
    ``master`` dtype (float32 for 16-bit models: the input is cast to it and the output back), ``bias`` [m] frozen.

    The constructor copies ``a`` and ``b``; :meth:`factors` gives them back in ``dtype``."""

    def __init__(self, a: Tensor, b: Tensor, bias: Optional[Tensor], master: torch.dtype) -> None:
        super().__init__()
        self.a = nn.Parameter(a.detach().to(master, copy=True))
        self.b = nn.Parameter(b.detach().to(device=a.device, dtype=master, copy=True))
        self.register_buffer("bias", None if bias is None else bias.detach().to(a.device), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(F.linear(x.to(self.a.dtype), self.a), self.b)
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def factors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(a [r, n], b [m, r])`` detached, in ``dtype``."""
        return self.a.detach().to(dtype, copy=True), self.b.detach().to(dtype, copy=True)


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """The training dtype of factors stored in ``dtype``: float32 for 16-bit, else ``dtype`` (float64 stays)."""
    return torch.promote_types(dtype, torch.float32)


def heldout_split(n: int, fraction: float) -> tuple[list[int], list[int]]:
    """``(train, held_out)`` window indices of ``n`` windows: the last ``max(1, round(fraction·n))`` are held out
    (none when ``n`` < 2 or ``fraction`` is 0; then there is no early stop)."""
    h = 0 if n < 2 or fraction <= 0 else min(n - 1, max(1, round(fraction * n)))
    return list(range(n - h)), list(range(n - h, n))


@dataclass(frozen=True)
class Schedule:
    """How long and how fast: ``steps`` (the most), ``batch`` windows a step, Adam's ``lr`` relative to each
    factor's RMS (each tensor's step size ``lr · rms(initial tensor)``: a default that does not depend on the
    model's scale), ``eval_every`` steps between held-out evaluations, ``patience`` evaluations without a new
    best before stopping, ``seed`` of the window order."""
    steps: int
    batch: int
    lr: float
    eval_every: int
    patience: int
    seed: int


def _groups(train_windows: Sequence[int], batch: int, steps: int, seed: int) -> list[list[int]]:
    """The windows of each step: seeded permutations of ``train_windows`` walked ``batch`` at a time."""
    g = torch.Generator().manual_seed(int(seed))
    out: list[list[int]] = []
    order: list[int] = []
    while len(out) < steps:
        if len(order) < batch:
            order += [train_windows[i] for i in torch.randperm(len(train_windows), generator=g).tolist()]
        out.append(order[:batch])
        order = order[batch:]
    return out


def train(params: Sequence[nn.Parameter], loss: Callable[[int], tuple[Tensor, int]], *, mine: Iterable[int],
          train_windows: Sequence[int], held_out: Sequence[int], schedule: Schedule,
          evaluate: Callable[[int], tuple[float, int]], what: str, bar=None) -> dict:
    """Train ``params`` in place; they end at the best held-out loss seen (the initial one included).

    ``loss(window) -> (summed loss with its graph, tokens)`` for one of this rank's windows (``mine``);
    ``evaluate(window) -> (summed loss, tokens)`` without a graph. ``train_windows``/``held_out``: global window
    indices. Returns ``{"steps", "heldout_before", "heldout_after", "train_loss", "stopped"}`` (the held-out
    losses per token; None without held-out windows). ``bar``: a tqdm bar updated per step with the loss.
    """
    mine = set(int(w) for w in mine)
    if schedule.steps < 0:
        raise ConfigError(f"{what}: heal_steps={schedule.steps} must be ≥ 0")
    if not train_windows:
        raise ConfigError(f"{what}: no healing window is left for training after the held-out slice")
    scales = [float(p.detach().float().pow(2).mean().sqrt()) or 1.0 for p in params]
    opt = torch.optim.Adam([{"params": [p], "lr": schedule.lr * sc} for p, sc in zip(params, scales)],
                           betas=(0.9, 0.99), eps=1e-12)
    before = best = _heldout(held_out, mine, evaluate, params)
    best_state = [p.detach().clone() for p in params] if best is not None else None
    bad, steps_done, last, stopped = 0, 0, float("nan"), "steps"
    for s, group in enumerate(_groups(list(train_windows), schedule.batch, schedule.steps, schedule.seed)):
        for p in params:
            p.grad = torch.zeros_like(p)
        total, tokens = torch.zeros((), dtype=torch.float64, device=params[0].device), 0
        for w in group:
            if w in mine:
                lsum, n = loss(w)
                lsum.backward()
                total += lsum.detach().double()
                tokens += n
        got = _reduce([p.grad for p in params], total, tokens)
        if got == 0:
            raise ConfigError(f"{what}: step {s + 1}'s windows have no token to train on")
        last = float(total) / got
        if not math.isfinite(last) or not all(bool(torch.isfinite(p.grad).all()) for p in params):
            raise NonFiniteError(f"{what}: the healing loss or its gradient is not finite at step {s + 1} "
                                 f"(loss {last}); lower heal_lr")
        for p in params:
            p.grad.div_(got)
        opt.step()
        steps_done = s + 1
        if best is not None and (steps_done % schedule.eval_every == 0 or steps_done == schedule.steps):
            now = _heldout(held_out, mine, evaluate, params)
            if now < best:
                best, bad = now, 0
                best_state = [p.detach().clone() for p in params]
            else:
                bad += 1
        if bar is not None:
            bar.set_postfix_str(f"loss {last:.4g}" + ("" if best is None else f" held-out {best:.4g}"))
            bar.update(1)
        if best is not None and bad >= schedule.patience:
            stopped = "early"
            break
    if best_state is not None:  # the best held-out point (the start if no step improved it)
        with torch.no_grad():
            for p, b in zip(params, best_state):
                p.copy_(b)
    opt.state.clear()
    return {"steps": steps_done, "heldout_before": before, "heldout_after": best, "train_loss": last,
            "stopped": stopped}


def _reduce(grads: list[Tensor], total: Tensor, tokens: int) -> int:
    """Sum the gradients and the loss over the ranks (in place); the step's tokens over all ranks."""
    if dist.world()[1] > 1:
        dist.all_reduce_sum_(grads + [total])
        tokens = dist.all_reduce_counts([tokens], like=total)[0]
    return int(tokens)


@torch.no_grad()
def _heldout(held_out: Sequence[int], mine: set, evaluate: Callable[[int], tuple[float, int]],
             params: Sequence[nn.Parameter]) -> Optional[float]:
    """The held-out loss per token over every rank's held-out windows (None without any)."""
    if not held_out:
        return None
    total = torch.zeros((), dtype=torch.float64, device=params[0].device)
    tokens = 0
    for w in held_out:
        if w in mine:
            lsum, n = evaluate(w)
            total += float(lsum)
            tokens += n
    got = _reduce([], total, tokens)
    return float(total) / max(got, 1)
