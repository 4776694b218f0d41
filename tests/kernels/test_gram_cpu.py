"""The C++ CPU Gram (obdk._C.gram_acc_cpu): MKL SYRK on one triangle, mirrored, or ATen GEMM.

Both paths must give the fp64 reference to fp32 rounding and an exactly symmetric result after
every call, for every input dtype, odd shapes, strided inputs and accumulation over many calls.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from obdk import _ext
from tests.oracles import gram_reference

pytestmark = pytest.mark.skipif(not _ext.has("gram_acc_cpu"), reason="obdk._C not built")


def _x(T: int, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, n, generator=g) + 0.3).to(dtype)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n,T", [(1, 1), (7, 3), (65, 130), (257, 123), (576, 1000)])
def test_matches_reference(dtype, n, T):
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = _x(T, n, dtype)
    acc = torch.zeros(n, n, dtype=acc_dtype)
    _ext._C.gram_acc_cpu(acc, x, 1.0)
    tol = 1e-12 if acc_dtype == torch.float64 else 2e-6
    assert _rel(acc, gram_reference(x)) <= tol
    assert torch.equal(acc, acc.T)


def test_accumulates_with_alpha_over_many_calls():
    n = 96
    acc = torch.zeros(n, n)
    want = torch.zeros(n, n, dtype=torch.float64)
    for i in range(25):
        x = _x(37 + i, n, torch.float16, seed=i)
        alpha = 1.0 / (i + 1)
        _ext._C.gram_acc_cpu(acc, x, alpha)
        want += alpha * gram_reference(x)
        assert torch.equal(acc, acc.T), f"not symmetric after call {i}"
    assert _rel(acc, want) <= 5e-6


def test_strided_input_and_nonzero_start():
    n = 50
    base = _x(200, 2 * n, torch.float32)
    x = base[::2, ::2]  # non-contiguous rows and columns
    acc0 = gram_reference(_x(9, n, torch.float32, seed=3)).float()
    acc = acc0.clone()
    _ext._C.gram_acc_cpu(acc, x, 2.0)
    assert _rel(acc, acc0.double() + 2.0 * gram_reference(x)) <= 2e-6
    assert torch.equal(acc, acc.T)


_SUB = r"""
import json, sys, torch
from obdk import _C
g = torch.Generator().manual_seed(0)
x = torch.randn(300, 129, generator=g)
acc = torch.zeros(129, 129)
_C.gram_acc_cpu(acc, x, 1.0)
print(json.dumps({"blas": _C.gram_cpu_blas(), "acc": acc.flatten().tolist()}))
"""


def _run(env_value, var="OBDK_CPU_SYRK", script=_SUB):
    """Run ``script`` in a fresh process with ``var`` unset (None) or set to ``env_value``."""
    env = dict(os.environ)
    env.pop(var, None)
    if env_value is not None:
        env[var] = env_value
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _assert_switch_agrees(run, key: str, fast: str) -> None:
    """``run(None)`` (default path) and ``run("0")`` (switched off: the GEMM) give the same Gram."""
    default, gemm = run(None), run("0")
    assert gemm[key] == "gemm"
    assert default[key] in (fast, "gemm")
    a, b = torch.tensor(default["acc"]), torch.tensor(gemm["acc"])
    assert ((a - b).abs().max() / b.abs().max()).item() <= 2e-6


def test_gemm_and_syrk_paths_agree():
    """OBDK_CPU_SYRK=0 forces the GEMM path; both give the same Gram to fp32 rounding."""
    _assert_switch_agrees(_run, "blas", "mkl-syrk")


def _torch_exports_mkl_syrk() -> bool:
    import ctypes
    lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        handle = ctypes.CDLL(lib)
    except OSError:
        return False
    return all(hasattr(handle, f) for f in ("mkl_blas_ssyrk", "mkl_blas_dsyrk"))


@pytest.mark.skipif(not _torch_exports_mkl_syrk(), reason="this torch does not export MKL's ?syrk")
def test_mkl_torch_uses_syrk():
    """Where torch's CPU library exports MKL's SYRK (the x86-64 pip wheels), the half-FLOP path is in use."""
    assert _run(None)["blas"] == "mkl-syrk"


def test_deferred_mirror_equals_per_call_mirror():
    """mirror=False over many calls + one symmetrize_lower_cpu == mirroring after every call."""
    n = 130
    a, b = torch.zeros(n, n), torch.zeros(n, n)
    for i in range(6):
        x = _x(50 + i, n, torch.float32, seed=i)
        _ext._C.gram_acc_cpu(a, x, 1.0)
        _ext._C.gram_acc_cpu(b, x, 1.0, False)
    _ext._C.symmetrize_lower_cpu(b)
    assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="symmetrize_lower_cpu"):
        _ext._C.symmetrize_lower_cpu(torch.zeros(3, 4))


def test_calibration_statistics_exactly_symmetric():
    """obdk.calibrate defers the CPU mirror to the end of the pass; every statistic leaves symmetric."""
    import obdk
    from tests.conftest import make_tiny_llama
    m = make_tiny_llama(hidden=96, inter=200)
    ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(0))
    st = obdk.calibrate(m, ids, stats=("cx", "cg"), progress=False)
    for d in (st.cx, st.cg):
        for k, v in d.items():
            assert torch.equal(v, v.T), k


# ----------------------------------------------------------------------------- bf16 on AMX (n >= 1024)

_SUB_BF16 = r"""
import json, torch
from obdk import _C
g = torch.Generator().manual_seed(1)
acc = torch.zeros(1040, 1040)
for T in (517, 64, 1):
    x = (torch.randn(T, 1040, generator=g) + 0.3).bfloat16()
    _C.gram_acc_cpu(acc, x, 1.0, False)
_C.symmetrize_lower_cpu(acc)
print(json.dumps({"path": _C.gram_cpu_bf16(), "acc": acc.flatten().tolist()}))
"""


def _run_bf16(amx_env):
    return _run(amx_env, "OBDK_CPU_AMX", _SUB_BF16)


@pytest.mark.skipif(not _ext.has("gram_cpu_bf16"), reason="obdk._C without gram_cpu_bf16")
@pytest.mark.parametrize("n,T", [(1024, 2), (1040, 517), (1536, 301)])
@pytest.mark.parametrize("mirror", [True, False])
def test_bf16_wide_matches_reference(n, T, mirror):
    """n >= 1024 bf16 takes the AMX BRGEMM path where the CPU has AMX (odd token counts padded, a
    16-wide tail column block at n = 1040): the fp64 reference to fp32 rounding, accumulated twice."""
    g = torch.Generator().manual_seed(n + T)
    xs = [(torch.randn(T, n, generator=g) + 0.3).bfloat16() for _ in range(2)]
    acc = torch.full((n, n), 0.5)
    for x in xs:
        _ext._C.gram_acc_cpu(acc, x, 1.0, mirror)
    if not mirror:
        _ext._C.symmetrize_lower_cpu(acc)
    want = 0.5 + sum(gram_reference(x) for x in xs)
    assert _rel(acc, want) <= 2e-6
    assert torch.equal(acc, acc.T)


@pytest.mark.skipif(not _ext.has("gram_cpu_bf16"), reason="obdk._C without gram_cpu_bf16")
def test_bf16_amx_and_gemm_paths_agree():
    """OBDK_CPU_AMX=0 forces the GEMM for bf16; both give the same Gram to fp32 rounding."""
    _assert_switch_agrees(_run_bf16, "path", "amx-brgemm")


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not (_ext.has("gram_cpu_bf16") and _cpu_has_amx() and torch.backends.mkldnn.is_available()),
                    reason="no AMX on this CPU (or no oneDNN in this torch)")
def test_amx_cpu_uses_brgemm():
    """On a CPU with AMX (this project's machine) the bf16 Gram path is the BRGEMM one."""
    assert _run_bf16(None)["path"] == "amx-brgemm"
