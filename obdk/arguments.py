"""The public API's boundary: each entry point checks what it is given before any work, in one or two calls.

``obdk.compress("some/dir", cfg)``, ``nsamples="4"``, ``seqlen=64.0`` or a model whose weights are on the meta
device used to fail deep inside with an ``AttributeError``/``TypeError``/``RuntimeError`` naming nothing. The
checks here raise an :class:`~obdk.errors.ObdkError` naming the function, the argument (or the module) and
what was given:

* :func:`check_model`: an ``nn.Module`` (a path or hub id is refused with the loader to use), and no parameter
  or buffer on the meta device unless the caller reads weights elsewhere (``meta_ok``); the first such tensor
  is named (``model.layers.0.mlp.up_proj.weight``);
* :func:`as_config`: a :class:`~obdk.config.LowRankConfig`, None (the default config) or a dict of its fields
  (accepted: ``{"keep": 0.8}`` is ``LowRankConfig(keep=0.8)``; unknown keys are named);
* :func:`check_ints`: integers (a bool, a float such as ``64.0`` or a string such as ``"4"`` are refused) at
  least ``lo``;
* :func:`check_type`, :func:`check_path`, :func:`check_device`, :func:`check_calibration`: the type (and for a
  device, the spelling) of the other arguments.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

from .errors import ConfigError, DataError, WrongTypeError

__all__ = ["check_model", "as_config", "check_ints", "check_type", "check_path", "check_device", "check_calibration"]


def check_model(where: str, model: Any, *, meta_ok: bool = False, name: str = "model") -> Any:
    """``model`` itself when it is an ``nn.Module`` with no meta-device tensor (unless ``meta_ok``).

    ``where``: the function (``compress``), named in the error with ``name``. A meta tensor raises a
    :class:`DataError` naming it (the first in ``named_parameters`` then ``named_buffers`` order)."""
    import torch.nn as nn
    if not isinstance(model, nn.Module):
        hint = (f"; load it first (obdk.load_model({os.fspath(model)!r}) or obdk.load_pretrained)"
                if isinstance(model, (str, os.PathLike)) else "")
        raise WrongTypeError(f"{where}: {name} must be a torch.nn.Module, got {type(model).__name__}{hint}")
    if not meta_ok:
        for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
            for n, t in items:
                if t.is_meta:
                    raise DataError(f"{where}: {name}'s {kind} {n} is on the meta device (it holds no values); load "
                                    f"the weights first (from_pretrained, obdk.load_model), or stream a checkpoint "
                                    f"from disk with prepare(stream=True, source=...)")
    return model


def as_config(where: str, config: Any):
    """A :class:`~obdk.config.LowRankConfig` from ``config``: itself, None (the defaults), or a dict of its fields
    (``{"keep": 0.8}``; an unknown key is a :class:`ConfigError` naming it). Anything else: :class:`WrongTypeError`."""
    from .config import LowRankConfig
    if config is None:
        return LowRankConfig()
    if isinstance(config, LowRankConfig):
        return config
    if isinstance(config, Mapping):
        bad = [k for k in config if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"{where}: config dict key {bad[0]!r} is not a LowRankConfig field name")
        return LowRankConfig.from_dict(dict(config))
    raise WrongTypeError(f"{where}: config must be an obdk.LowRankConfig (or a dict of its fields, or None), got "
                         f"{type(config).__name__} {config!r:.60}")


def check_ints(where: str, *, lo: Optional[int] = 1, none_ok: tuple = (), **values: Any) -> None:
    """Each ``values`` item an ``int`` (not a bool, float or string) ≥ ``lo`` (``lo`` None: any); the names in
    ``none_ok`` may also be None. Raises :class:`WrongTypeError` / :class:`ConfigError` naming the argument."""
    import numbers
    for name, v in values.items():
        if v is None and name in none_ok:
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise WrongTypeError(f"{where}: {name} must be an int, got {type(v).__name__} {v!r:.40}")
        if lo is not None and v < lo:
            raise ConfigError(f"{where}: {name} must be >= {lo}, got {v}")


def check_type(where: str, name: str, value: Any, types: tuple, what: str, *, none_ok: bool = False) -> Any:
    """``value`` when it is one of ``types`` (or None with ``none_ok``); else :class:`WrongTypeError` naming ``name``
    and saying ``what`` it must be."""
    if (value is None and none_ok) or (isinstance(value, types) and not isinstance(value, bool)):
        return value
    raise WrongTypeError(f"{where}: {name} must be {what}{' or None' if none_ok else ''}, got "
                         f"{type(value).__name__} {value!r:.40}")


def check_path(where: str, name: str, value: Any, *, none_ok: bool = False) -> Any:
    """``value`` when it is a ``str`` or ``os.PathLike`` (a directory or file argument); else :class:`WrongTypeError`."""
    return check_type(where, name, value, (str, os.PathLike), "a path (str or os.PathLike)", none_ok=none_ok)


def check_device(where: str, device: Any) -> Any:
    """``device`` (None, a ``torch.device`` or a string torch parses: ``cpu``, ``cuda:1``); else an error naming it."""
    import torch
    if device is None or isinstance(device, torch.device):
        return device
    check_type(where, "device", device, (str, int), "a device (str, int or torch.device)")
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{where}: device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    return device


def check_calibration(where: str, calibration: Any, tokenizer: Any) -> None:
    """``calibration``: None, windows (an object with ``input_ids``, a dict with them, a tensor), documents (a list
    or tuple of str), a dataset name or a file path; ``tokenizer``: None or callable (a HF tokenizer)."""
    import torch
    if calibration is not None and not (hasattr(calibration, "input_ids") or isinstance(calibration, torch.Tensor)):
        check_type(where, "calibration", calibration, (str, os.PathLike, list, tuple, dict),
                   "calibration data (a dataset name, a file path, a list of documents, token ids [N, T] or "
                   "CalibrationData)")
    if tokenizer is not None and not callable(tokenizer):
        raise WrongTypeError(f"{where}: tokenizer must be a tokenizer (callable, e.g. AutoTokenizer), got "
                             f"{type(tokenizer).__name__} {tokenizer!r:.40}")
