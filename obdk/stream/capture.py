"""The capture of a streamed pass: one trunk call with every decoder layer's ``forward`` replaced by a recorder.

The recorder returns its input (no layer arithmetic). That gives the hidden state entering layer 0 (after the
embeddings and whatever scaling the model applies) and each layer's other call arguments (attention mask,
per-layer sliding-window masks, position ids, rotary position embeddings, cache off) exactly as the modelling
code builds them; :func:`call_layer` replays them later without touching the modelling class. The capture also
checks the structure the schedule relies on: layer ``i+1`` receives what layer ``i`` returned, the final norm
receives what the last layer returned and the trunk returns the norm's output. A model that does anything else
is reported (:func:`capture` returns the problem), never run approximately.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import StreamingUnsupportedError

__all__ = ["capture", "call_layer"]


def _hidden_arg(args: tuple, kwargs: dict) -> Tensor:
    h = args[0] if args else kwargs.get("hidden_states")
    if not torch.is_tensor(h):
        raise StreamingUnsupportedError("calibrate_streamed: a decoder layer was called without a hidden-state "
                                        "tensor as its first argument or hidden_states=")
    return h


def call_layer(layer: nn.Module, call: tuple[tuple, dict], hidden: Tensor) -> Tensor:
    """Replay ``layer`` on ``hidden`` [B, T, d] with its captured other arguments; its output hidden state."""
    args, kwargs = call
    res = layer(hidden, *args[1:], **kwargs) if args else layer(**{**kwargs, "hidden_states": hidden})
    out = res[0] if isinstance(res, (tuple, list)) else res
    if not torch.is_tensor(out) or out.shape != hidden.shape:
        raise StreamingUnsupportedError(f"calibrate_streamed: {type(layer).__name__} returned "
                                        f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))} for an input "
                                        f"{tuple(hidden.shape)}; the streamed pass needs a layer that maps hidden "
                                        f"states to hidden states of the same shape")
    return out


def capture(runner: nn.Module, layers: nn.ModuleList, norm: Optional[nn.Module], kwargs: dict,
             wrap_tuple: bool) -> tuple[Optional[Tensor], list[tuple[tuple, dict]], Optional[str]]:
    """One trunk call with recording stubs for the layers: ``(hidden0 [B, T, d], calls, problem)``.

    ``calls[i] = (args, kwargs)`` of layer ``i`` with the hidden state left out (``args[0]`` None).
    ``problem`` is None when the chain layer→layer→norm→trunk output held, else what broke it.
    """
    n = len(layers)
    calls: list[Optional[tuple[tuple, dict]]] = [None] * n
    received: list[Optional[Tensor]] = [None] * n
    returned: list[Optional[Tensor]] = [None] * n
    counts = [0] * n
    seen_norm: list[tuple[Any, Any]] = []

    def make(i):
        def stub(*args, **kw):
            h = _hidden_arg(args, kw)
            counts[i] += 1
            received[i] = h
            kwd = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in kw.items() if k != "hidden_states"}
            calls[i] = (((None,) + tuple(args[1:])) if args else (), kwd)
            out = h.view(h.shape)  # a fresh tensor object: identity tells us where it goes next
            returned[i] = out
            return (out,) if wrap_tuple else out
        return stub

    saved = []
    for i, layer in enumerate(layers):
        saved.append(("forward" in layer.__dict__, layer.__dict__.get("forward")))
        layer.forward = make(i)
    hook = None
    if norm is not None:
        hook = norm.register_forward_hook(lambda m, a, kw, o: seen_norm.append((_hidden_arg(a, kw), o)),
                                          with_kwargs=True)
    try:
        with torch.no_grad():
            res = runner(**kwargs)
    except StreamingUnsupportedError as e:
        return None, [], str(e).replace("calibrate_streamed: ", "")
    finally:
        for layer, (had, old) in zip(layers, saved):
            if had:
                layer.forward = old
            else:
                layer.__dict__.pop("forward", None)
        if hook is not None:
            hook.remove()
    if counts != [1] * n:
        return None, [], f"decoder layers were called {counts} times in one forward (expected once each)"
    for i in range(1, n):
        if received[i] is not returned[i - 1]:
            return None, [], (f"layer {i} did not receive the output of layer {i - 1} (the trunk transforms the "
                              f"hidden states between layers, or returns {'tuples' if wrap_tuple else 'tensors'})")
    if norm is not None:
        out = res.last_hidden_state if hasattr(res, "last_hidden_state") else res[0]
        if len(seen_norm) != 1 or seen_norm[0][0] is not returned[-1] or seen_norm[0][1] is not out:
            return None, [], ("the trunk's output is not its final norm applied to the last layer's output "
                              f"(norm called {len(seen_norm)} times)")
    return received[0], calls, None  # type: ignore[return-value]


# =========================================================================== the pass
