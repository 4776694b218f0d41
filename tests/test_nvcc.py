"""The CUDA kernel files compile with nvcc for sm_90a (.ci/nvcc_check.sh), GPU or not.

Skipped where no nvcc can be found; a broken ``csrc/cuda/*_kernels.cu`` fails here.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / ".ci" / "nvcc_check.sh"


def _find_nvcc() -> str | None:
    """The same search as the script: $NVCC, $CUDA_HOME/bin, PATH, /usr/local/cuda/bin."""
    if os.environ.get("NVCC"):
        return shutil.which(os.environ["NVCC"])
    cands = [Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"] if os.environ.get("CUDA_HOME") else []
    cands += [Path(p) for p in filter(None, [shutil.which("nvcc")])] + [Path("/usr/local/cuda/bin/nvcc")]
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


NVCC = _find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found ($NVCC, $CUDA_HOME/bin, PATH, /usr/local/cuda/bin)")
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash not found")


def _run(env_extra: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@needs_bash
@needs_nvcc
@pytest.mark.slow
def test_cuda_kernels_compile():
    assert list((REPO / "csrc" / "cuda").glob("*_kernels.cu")), "no csrc/cuda/*_kernels.cu to check"
    res = _run({})
    assert res.returncode == 0, f"nvcc_check failed:\n{res.stdout}\n{res.stderr}"


@needs_bash
@needs_nvcc
def test_broken_kernel_fails(tmp_path):
    (tmp_path / "ok_kernels.cu").write_text("__global__ void ok(float* p) { p[0] = 1.f; }\n")
    (tmp_path / "broken_kernels.cu").write_text("__global__ void broken() { int x = ; }\n")
    (tmp_path / "ignored.cu").write_text("this is not compiled: only *_kernels.cu are\n")
    res = _run({"OBDK_CUDA_SRC_DIR": str(tmp_path)})
    assert res.returncode != 0
    assert "FAIL" in res.stderr and "broken_kernels.cu" in res.stderr
    assert "ok_kernels.cu" in res.stdout and "ignored.cu" not in res.stdout + res.stderr


@needs_bash
def test_missing_nvcc_fails_unless_allowed(tmp_path):
    missing = {"NVCC": str(tmp_path / "no-such-nvcc")}
    res = _run({**missing, "OBDK_ALLOW_NO_NVCC": "0"})
    assert res.returncode != 0 and "no nvcc found" in res.stderr
    res = _run({**missing, "OBDK_ALLOW_NO_NVCC": "1"})
    assert res.returncode == 0 and "no nvcc found" in res.stdout
