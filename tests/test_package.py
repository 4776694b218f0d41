"""The package imports, the extension loads, and the ops are declared once with a torch fallback."""
import subprocess
import sys

import torch

import obdk
from obdk import _ext, backends, ops


def test_extension_loaded_with_cpu():
    assert _ext.loaded(), _ext.load_error
    assert "cpu" in _ext.devices()


def test_kernels_importable_as_obdk_kernels():
    import obdk.kernels  # noqa: F401
    import importlib.util
    # no top-level `kernels` package is installed by obdk
    spec = importlib.util.find_spec("kernels")
    assert spec is None or "obdk" not in (spec.origin or "")


def test_import_survives_broken_extension(tmp_path):
    # Shadow obdk._C with a module that raises: import obdk must still work and fall back.
    code = (
        "import sys, types, importlib.abc\n"
        "class F(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'obdk._C': raise ImportError('simulated broken binary')\n"
        "sys.meta_path.insert(0, F())\n"
        "import obdk, torch\n"
        "from obdk import _ext, backends\n"
        "assert not _ext.loaded() and 'simulated' in _ext.load_error\n"
        "assert backends.select('lowrank_linear', 'cpu').backend == 'torch'\n"
        "x = torch.randn(3, 4); a = torch.randn(2, 4); b = torch.randn(5, 2)\n"
        "torch.testing.assert_close(obdk.ops.lowrank_linear(x, a, b), (x @ a.T) @ b.T)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_forced_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv("OBDK_BACKEND", "cuda")
    x = torch.randn(3, 4)
    try:
        ops.lowrank_linear(x, torch.randn(2, 4), torch.randn(5, 2))
    except backends.BackendUnavailable as exc:
        assert "cuda" in str(exc)
    else:
        raise AssertionError("forced cuda backend on CPU tensors should raise")
    monkeypatch.setenv("OBDK_BACKEND", "bogus")
    try:
        backends.forced_backend()
    except ValueError as exc:
        assert "OBDK_BACKEND" in str(exc)
    else:
        raise AssertionError


def test_version():
    assert obdk.__version__
