"""The calibration-only autograd Function that collects statistics inside a frozen Linear.

While :func:`obdk.calibrate.calibrate` runs, the ``forward`` of every targeted
``nn.Linear`` is swapped (on the instance, never on the modelling class) for a call of
:class:`CalibrationLinear`:

* forward: ``y = F.linear(x, W, b)`` and, once per *shared input*, ``C_x += xᵀx`` through
  ``torch.ops.obdk.gram_acc_`` (``x``: [..., n] in the model's dtype, 16-bit allowed;
  ``C_x``: [n, n] in the statistics dtype). The first member of a :class:`GroupState`
  called accumulates; the others only check that they received the very same tensor
  (data pointer, shape, strides, dtype, version) and raise naming the modules if not.
* backward: ``grad_x = g W`` (only when ``x`` needs a gradient), ``C_g += gᵀg`` for that
  module through the same op (``g``: [..., m]; ``C_g``: [m, m]) and, only when the
  ``grad`` statistic is requested, ``G += gᵀx`` ([m, n]). No ``dW`` is ever formed and
  no ``.grad`` is written on the (frozen) weights.

Padding rows are dropped before every accumulation: :class:`CalibrationContext` holds the
flattened indices of the non-padding tokens of the current batch (``None`` when the batch
has no padding, so the unpadded path copies nothing).

bf16 activations on CPU: the Gram's fp32 GEMM runs with oneDNN's bf16 math
(``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``, set only around the call). That is
exact, not an approximation: every entry already is a bf16 value, products of two bf16 values
are exact in fp32 and oneDNN accumulates in fp32; on CPUs with AMX/AVX512-BF16 it runs several
times faster than the IEEE fp32 path. fp16 and fp32 inputs keep the IEEE path (fp16 values are
not all representable in bf16).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import (
    _ext,
    ops,  # noqa: F401  (declares torch.ops.obdk.gram_acc_)
)
from ..errors import DataError, SharedInputMismatch  # noqa: F401

__all__ = ["CalibrationContext", "GroupState", "ModuleSlot", "CalibrationLinear", "SharedInputMismatch", "gram_acc"]


@contextlib.contextmanager
def _exact_16bit_math(t: Tensor, acc: Tensor) -> Iterator[None]:
    """Let fp32 CPU GEMMs use bf16 math while ``t`` (bf16, CPU) feeds an fp32 ``acc`` (exact)."""
    mm = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if t.dtype != torch.bfloat16 or t.device.type != "cpu" or acc.dtype != torch.float32 or mm is None:
        yield
        return
    try:
        old = mm.fp32_precision
        mm.fp32_precision = "bf16"
    except (AttributeError, RuntimeError, ValueError):  # older torch: no such knob
        yield
        return
    try:
        yield
    finally:
        mm.fp32_precision = old


def gram_acc(acc: Tensor, t: Tensor, ctx: Optional["CalibrationContext"] = None) -> None:
    """``acc += tᵀt`` via ``torch.ops.obdk.gram_acc_`` (``acc`` [n, n] fp32/fp64, ``t`` [K, n]).

    With a ``ctx`` that defers symmetrisation (:meth:`CalibrationContext.defer_symmetry`) and the
    C++ CPU backend, only the lower triangle is updated now and ``ctx.symmetrize()`` mirrors it
    later, once for the whole pass instead of once per call.
    """
    if ctx is not None and ctx._deferred is not None and acc.device.type == "cpu":
        with _exact_16bit_math(t, acc):
            _ext._C.gram_acc_cpu(acc, t, 1.0, False)
        ctx._deferred[id(acc)] = acc
        return
    with _exact_16bit_math(t, acc):
        torch.ops.obdk.gram_acc_(acc, t, 1.0)


def _cpu_lower_only() -> bool:
    """True when CPU Grams run in obdk._C (not forced elsewhere) and it can defer the mirror."""
    from ..backends import select
    if not _ext.has("symmetrize_lower_cpu"):
        return False
    try:
        return select("gram_acc_", torch.device("cpu"), torch.float32).backend == "cpp"
    except Exception:  # noqa: BLE001 - no CPU backend at all: the op call reports it
        return False


# SharedInputMismatch lives in obdk.errors (one base, ObdkError); re-exported here.


class CalibrationContext:
    """Per-pass state shared by every patched Linear.

    ``rows``: LongTensor [K] of the flattened (``B*T``) indices of the non-padding tokens of
    the current batch, or ``None`` when every token counts. Set with :meth:`set_batch`.
    """

    def __init__(self) -> None:
        self._rows: Optional[Tensor] = None
        self._rows_on: dict[torch.device, Tensor] = {}
        self.batch_tokens = 0  # B*T of the current batch (checked against each input)
        self._deferred: Optional[dict[int, Tensor]] = None  # accumulators awaiting their mirror

    @contextlib.contextmanager
    def defer_symmetry(self) -> Iterator[None]:
        """Within this block CPU Grams update lower triangles only (when they run in obdk._C; decided
        once here, not per call); :meth:`symmetrize` (also run on exit, even on error) makes every
        touched accumulator exactly symmetric again."""
        self._deferred = {} if _cpu_lower_only() else None
        try:
            yield
        finally:
            self.symmetrize()
            self._deferred = None

    def symmetrize(self) -> None:
        """Mirror the lower triangle of every accumulator updated lower-only since the last call."""
        if self._deferred:
            for acc in self._deferred.values():
                _ext._C.symmetrize_lower_cpu(acc)
            self._deferred.clear()

    def set_batch(self, attention_mask: Optional[Tensor], batch_tokens: int) -> None:
        """Declare the next batch: ``attention_mask`` [B, T] (0 = padding) or None."""
        self.batch_tokens = int(batch_tokens)
        self._rows_on = {}
        if attention_mask is None or bool(attention_mask.bool().all()):
            self._rows = None
        else:
            self._rows = attention_mask.reshape(-1).bool().nonzero().squeeze(1)

    def select(self, t: Tensor) -> Tensor:
        """Flatten ``t`` [..., k] to [rows, k], keeping the non-padding tokens only."""
        t2 = t.reshape(-1, t.shape[-1])
        if self._rows is None:
            return t2
        if t2.shape[0] != self.batch_tokens:
            raise DataError(f"obdk calibration: a Linear received {t2.shape[0]} token rows but the batch has "
                               f"{self.batch_tokens} tokens; cannot drop padding rows (is the module called on a "
                               f"reshaped or packed input?)")
        rows = self._rows_on.get(t2.device)
        if rows is None:
            rows = self._rows_on[t2.device] = self._rows.to(t2.device)
        return t2.index_select(0, rows)


class GroupState:
    """The Linears of one decoder layer that read the same input, and their one ``C_x``.

    ``names``: module names of the group; ``key``: the group key (``LinearGroup.key``);
    ``cx``: [n, n] accumulator or None when ``cx`` is not collected.
    """

    def __init__(self, key: str, names: tuple[str, ...], cx: Optional[Tensor], ctx: CalibrationContext) -> None:
        self.key, self.names, self.cx, self.ctx = key, tuple(names), cx, ctx
        self._pending: set[str] = set()
        self._leader: Optional[str] = None
        self._sig: Optional[tuple] = None

    @staticmethod
    def _signature(x: Tensor) -> tuple:
        return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device, x._version)

    def on_input(self, name: str, x: Tensor) -> None:
        """Called by member ``name`` with its input ``x`` [..., n]; accumulates ``C_x`` once."""
        if self._pending:
            if name not in self._pending:
                raise SharedInputMismatch(
                    f"obdk calibration: {name} was called again before {sorted(self._pending)} read the input "
                    f"it shares with {self._leader} (group {self.key}); the shared-input map does not fit this model")
            if self._signature(x) != self._sig:
                raise SharedInputMismatch(
                    f"obdk calibration: {self._leader} and {name} are grouped as reading one input ({self.key}) "
                    f"but received different tensors (shapes {self._sig[1]} vs {tuple(x.shape)}); fix the "
                    f"shared-input groups for this architecture (obdk.models.ARCHITECTURES) or pass groups=")
            self._pending.discard(name)
            return
        self._leader, self._sig = name, self._signature(x)
        self._pending = set(self.names) - {name}
        if self.cx is not None:
            gram_acc(self.cx, self.ctx.select(x), self.ctx)

    def check_complete(self) -> None:
        """Raise if a member of the group was not called on the last shared input."""
        if self._pending:
            missing = sorted(self._pending)
            self._pending = set()
            raise SharedInputMismatch(f"obdk calibration: {missing} never read the input of {self._leader} "
                                      f"(group {self.key}) in this forward pass")


class ModuleSlot:
    """Per-module accumulators: ``cg`` [m, m] and ``grad`` [m, n] (each None when not collected)."""

    def __init__(self, name: str, group: GroupState, cg: Optional[Tensor], grad: Optional[Tensor]) -> None:
        self.name, self.group, self.cg, self.grad = name, group, cg, grad


class CalibrationLinear(torch.autograd.Function):
    """``y = F.linear(x, weight, bias)`` that accumulates calibration statistics.

    ``apply(x [..., n], weight [m, n], bias [m] | None, anchor, slot) -> y [..., m]``.
    ``anchor`` is a 0-element tensor that requires grad: it puts every call on the autograd
    tape even when neither ``x`` nor the (frozen) weights require grad, so the backward
    (and ``C_g``) runs without asking autograd for gradients of the input embeddings.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], anchor: Tensor, slot: ModuleSlot) -> Tensor:
        y = F.linear(x, weight, bias)
        slot.group.on_input(slot.name, x)
        ctx.slot = slot
        if slot.grad is not None:
            ctx.save_for_backward(weight, x)
        else:
            ctx.save_for_backward(weight)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy: Tensor):
        slot: ModuleSlot = ctx.slot
        saved = ctx.saved_tensors
        weight = saved[0]
        if slot.cg is not None or slot.grad is not None:
            cctx = slot.group.ctx
            sel = cctx.select
            g2 = sel(gy)
            if slot.cg is not None:
                gram_acc(slot.cg, g2, cctx)
            if slot.grad is not None:
                x2 = sel(saved[1])
                dt = slot.grad.dtype
                exact = _exact_16bit_math(x2, slot.grad) if g2.dtype == x2.dtype else contextlib.nullcontext()
                with exact:
                    slot.grad.addmm_(g2.T.to(dt), x2.to(dt))
        gx = torch.matmul(gy, weight) if ctx.needs_input_grad[0] else None
        return gx, None, None, None, None
