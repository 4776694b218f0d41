"""Loads the native extension ``obdk._C`` without ever failing ``import obdk``.

A missing or broken binary is logged once (a warning) and every op falls back
to its pure-PyTorch implementation; ``load_error`` keeps the reason for
``obdk env``.
"""
from __future__ import annotations

import logging

import torch  # noqa: F401  (loads libtorch before the extension)

log = logging.getLogger("obdk")

_C = None
load_error: str | None = None
try:  # pragma: no cover - depends on how obdk was installed
    from . import _C as _C  # type: ignore[no-redef]
except Exception as exc:  # ImportError, OSError (undefined symbol), ...
    load_error = f"{type(exc).__name__}: {exc}"
    log.warning("obdk._C could not be loaded (%s); using the pure-PyTorch fallback. "
                "Rebuild with `pip install --no-build-isolation -e .`.", load_error)


def loaded() -> bool:
    """True when the native extension imported."""
    return _C is not None


def has(name: str) -> bool:
    """True when the extension exports ``name`` (e.g. ``"gram_acc_cuda"``)."""
    return _C is not None and hasattr(_C, name)


def devices() -> list[str]:
    """Device types the loaded extension was built for (``[]`` if not loaded)."""
    if _C is None:
        return []
    return ["cpu"] + (["cuda"] if _C.with_cuda() else [])
