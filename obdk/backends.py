"""Backend registry: which implementation serves an op on a device and dtype.

Each op (declared once in :mod:`obdk.ops`) has candidate implementations, each
declaring the devices and dtypes it supports. Automatic selection takes the
first candidate that supports the call and is importable; ``OBDK_BACKEND``
forces one (``torch``, ``cpp``, ``triton`` or ``cuda``), and a forced backend
that cannot run raises instead of falling back.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import BackendUnavailable, ConfigError  # noqa: F401

BACKENDS = ("torch", "cpp", "triton", "cuda")
ENV = "OBDK_BACKEND"


# BackendUnavailable lives in obdk.errors (one base, ObdkError); re-exported here.


@dataclass
class Candidate:
    backend: str
    fn: Callable
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] | None = None  # None: any float dtype
    available: Callable[[str], str | None] = field(default=lambda device: None)  # reason it cannot run on device, or None
    auto: Callable[[str], bool] = field(default=lambda device: True)  # eligible for automatic choice

    def why_not(self, device: str, dtype: torch.dtype | None) -> str | None:
        if device not in self.devices:
            return f"supports devices {self.devices}, not {device!r}"
        if dtype is not None and self.dtypes is not None and dtype not in self.dtypes:
            return f"supports dtypes {[str(d) for d in self.dtypes]}, not {dtype}"
        return self.available(device)


_REGISTRY: dict[str, list[Candidate]] = {}


def register(op: str, cand: Candidate) -> None:
    """Add an implementation of ``op``; earlier registrations win automatic choice."""
    _REGISTRY.setdefault(op, []).append(cand)


#: a backend forced for the current context by :func:`use` (wins over ``OBDK_BACKEND``)
_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("obdk_backend", default=None)


@contextlib.contextmanager
def use(backend: str | None):
    """Force ``backend`` (``torch``, ``cpp``, ``triton``, ``cuda``) for the ops run inside the block.

    ``None`` or ``"auto"`` leaves the choice to ``OBDK_BACKEND`` and automatic selection. The
    environment is not touched; a forced backend that cannot run raises
    :class:`~obdk.errors.BackendUnavailable` at the op call.
    """
    val = None if backend in (None, "", "auto") else str(backend).strip().lower()
    if val is not None and val not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not a backend; choose one of {', '.join(BACKENDS)} or auto")
    token = _FORCED.set(val)
    try:
        yield
    finally:
        _FORCED.reset(token)


def forced_backend() -> str | None:
    """The backend forced by :func:`use`, else by ``OBDK_BACKEND`` (validated); None when unset or ``auto``."""
    if _FORCED.get() is not None:
        return _FORCED.get()
    val = os.environ.get(ENV, "").strip().lower()
    if val in ("", "auto"):
        return None
    if val not in BACKENDS:
        raise ConfigError(f"{ENV}={val!r} is not a backend; choose one of {', '.join(BACKENDS)} or auto")
    return val


def select(op: str, device: torch.device | str, dtype: torch.dtype | None = None,
           backend: str | None = None) -> Candidate:
    """Return the implementation of ``op`` for ``device``/``dtype``.

    ``backend`` (or ``OBDK_BACKEND``) forces a choice and raises
    :class:`BackendUnavailable` with the reason when it cannot run.
    """
    dev = torch.device(device).type
    want = backend or forced_backend()
    cands = _REGISTRY.get(op, [])
    if want is not None:
        for c in cands:
            if c.backend == want:
                why = c.why_not(dev, dtype)
                if why is not None:
                    raise BackendUnavailable(f"obdk op {op}: backend {want!r} forced ({ENV}) cannot run: {why}")
                return c
        raise BackendUnavailable(f"obdk op {op}: no {want!r} implementation (have {[c.backend for c in cands]})")
    for c in cands:
        if c.auto(dev) and c.why_not(dev, dtype) is None:
            return c
    raise BackendUnavailable(f"obdk op {op}: no implementation for device {dev!r} dtype {dtype}")


def report() -> dict[str, dict[str, str]]:
    """For ``obdk env``: per op, per device type, the backend automatic selection picks."""
    out: dict[str, dict[str, str]] = {}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for op in sorted(_REGISTRY):
        out[op] = {}
        for dev in devices:
            try:
                out[op][dev] = select(op, dev).backend
            except (BackendUnavailable, ValueError) as exc:
                out[op][dev] = f"none ({exc})"
    return out


def candidates(op: str) -> list[Candidate]:
    """All registered implementations of ``op`` (for tests and ``obdk env``)."""
    return list(_REGISTRY.get(op, []))
