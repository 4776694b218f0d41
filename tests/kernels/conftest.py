"""Fixture helper shared by the Triton kernel tests: a kernel module defined under the interpreter."""
import contextlib
import importlib
import sys

import pytest


@contextlib.contextmanager
def interpreted_kernel_module(name: str):
    """Import ``obdk.kernels.<name>`` afresh with ``TRITON_INTERPRET=1`` (CPU tensors), then undo.

    The environment variable and ``sys.modules`` are restored afterwards, so the rest of the
    test session sees neither the interpreter flag nor the interpreted kernels.
    """
    import obdk.kernels as pkg
    mod_name = f"obdk.kernels.{name}"
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    mp.delitem(sys.modules, mod_name, raising=False)
    mp.delattr(pkg, name, raising=False)
    try:
        mod = importlib.import_module(mod_name)
        assert mod.interpreted(), "kernels were not defined under TRITON_INTERPRET=1"
        yield mod
    finally:
        sys.modules.pop(mod_name, None)
        if hasattr(pkg, name):
            delattr(pkg, name)
        mp.undo()
