"""The package imports, the extension loads, and the ops are declared once with a torch fallback."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import obdk
from obdk import _ext, backends, ops


def test_extension_loaded_with_cpu():
    assert _ext.loaded(), _ext.load_error
    assert "cpu" in _ext.devices()


REPO = Path(__file__).resolve().parents[1]

# Run in a subprocess from a given directory: the import of transformers (which imports Hugging
# Face's `kernels` since 5.25), where `kernels` comes from, and obdk's own kernel modules.
_IMPORTS = """
import importlib.util, json, os, sys
out = {}
spec = importlib.util.find_spec("kernels")
out["kernels_origin"] = None if spec is None else spec.origin
if os.environ.get("CHECK_TRANSFORMERS") == "1":
    import transformers.activations  # noqa: F401
    from transformers.utils.import_utils import is_kernels_available
    out["hf_kernels_available"] = bool(is_kernels_available())
import obdk.kernels, obdk.kernels.gram, obdk.kernels.lowrank
out["obdk_kernels"] = [os.path.realpath(m.__file__) for m in (obdk.kernels.gram, obdk.kernels.lowrank)]
out["triton"] = "triton" in sys.modules
print(json.dumps(out))
"""


def _imports_from(cwd: Path, extra_path: Path | None = None, transformers: bool = True) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)  # after the working directory on sys.path, as site-packages is
    env["CHECK_TRANSFORMERS"] = "1" if transformers else "0"
    r = subprocess.run([sys.executable, "-c", _IMPORTS], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"imports from {cwd} failed:\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def _assert_obdk_kernels_from_checkout(out: dict) -> None:
    assert out["obdk_kernels"] == [str((REPO / "kernels" / f).resolve()) for f in ("gram.py", "lowrank.py")]
    assert out["triton"] == (importlib.util.find_spec("triton") is not None)


def test_kernels_dir_is_no_regular_package():
    """The top-level kernels/ must stay a namespace portion: an __init__.py would make it shadow
    Hugging Face's `kernels` from the repository root again (transformers >= 5.25 imports it)."""
    assert not (REPO / "kernels" / "__init__.py").exists()
    assert (REPO / "obdk" / "kernels").resolve() == (REPO / "kernels").resolve()


@pytest.mark.parametrize("where", ["repo-root", "elsewhere"])
def test_hf_kernels_not_shadowed(where, tmp_path):
    """From the repository root (first on sys.path for `python -c`, `-m` and pytest) and from any
    other directory, `import transformers.activations` finds Hugging Face's `kernels`, and
    obdk.kernels with its Triton modules imports from the checkout."""
    if importlib.util.find_spec("kernels") is None or importlib.util.find_spec("kernels").origin is None:
        pytest.skip("Hugging Face's `kernels` is not installed (transformers < 5.25 does not require it); "
                    "test_regular_kernels_package_wins_over_checkout covers the import rule")
    out = _imports_from(REPO if where == "repo-root" else tmp_path)
    assert out["kernels_origin"] and not out["kernels_origin"].startswith(str(REPO / "kernels")), out
    assert "site-packages" in out["kernels_origin"] or "dist-packages" in out["kernels_origin"], out
    assert out["hf_kernels_available"], out  # transformers' own find_spec + metadata check agrees
    _assert_obdk_kernels_from_checkout(out)


def test_regular_kernels_package_wins_over_checkout(tmp_path):
    """The import rule itself, whatever is installed: a regular `kernels` package later on
    sys.path than the repository root wins over the checkout's kernels/ directory."""
    fake = tmp_path / "site"
    (fake / "kernels").mkdir(parents=True)
    (fake / "kernels" / "__init__.py").write_text("MARK = 'fake'\n")
    out = _imports_from(REPO, extra_path=fake, transformers=False)
    assert out["kernels_origin"] == str(fake / "kernels" / "__init__.py"), out
    _assert_obdk_kernels_from_checkout(out)


@pytest.mark.slow
def test_wheel_ships_kernels_as_obdk_kernels(tmp_path):
    """A regular (non-editable) wheel carries kernels/*.py as obdk/kernels/*.py, and a wheel
    install imports obdk.kernels.gram/lowrank from its own copy."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("obdk", "kernels"):
        shutil.copytree(REPO / name, src / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    env = dict(os.environ, OBDK_SKIP_EXT="1")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                        "-w", str(tmp_path / "dist"), str(src)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = (tmp_path / "dist").glob("obdk-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    assert {"obdk/kernels/gram.py", "obdk/kernels/lowrank.py"} <= names
    assert not any(n.startswith("kernels/") for n in names), "a top-level kernels package would shadow HF's"
    target = tmp_path / "installed"
    zipfile.ZipFile(whl).extractall(target)
    code = ("import obdk, obdk.kernels.gram, obdk.kernels.lowrank, os; "
            "print(os.path.dirname(obdk.__file__)); print(obdk.kernels.gram.__file__)")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    env["PYTHONPATH"] = str(target)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    pkg, gram = r.stdout.split()
    assert pkg == str(target / "obdk") and gram == str(target / "obdk" / "kernels" / "gram.py")


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
