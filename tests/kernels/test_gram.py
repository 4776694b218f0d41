"""The symmetric Gram kernels: Triton (obdk.kernels.gram) on CPU under the Triton interpreter,
and, where a GPU is present, Triton compiled and the CUDA C++ kernel (obdk._C.gram_acc_cuda).

``TRITON_INTERPRET=1`` must be set before a ``@triton.jit`` function is defined. Rather than
setting it for the whole pytest process (which would turn every Triton kernel imported later,
e.g. GPU tests of other modules, into interpreted ones), the ``gram`` fixture sets it for this
module only, imports a fresh ``obdk.kernels.gram`` under it, and restores both the environment
and ``sys.modules`` afterwards. That also works when another module imported the kernels first.
The GPU tests use a private, compiled copy of the module (``gram_gpu``) for the same reason.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from tests.oracles import gram_reference

triton = pytest.importorskip("triton")

from tests.kernels.conftest import interpreted_kernel_module  # noqa: E402

MOD = "obdk.kernels.gram"


@pytest.fixture(scope="module")
def gram():
    with interpreted_kernel_module("gram") as mod:
        yield mod


def _sym(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g)
    return (a + a.T).contiguous()


def _x(T: int, n: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, n, generator=g) + 0.3).to(dtype)  # nonzero mean: large, cancellation-free Gram


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _check(acc: torch.Tensor, acc0: torch.Tensor, x: torch.Tensor, alpha: float) -> None:
    """Error ≤ 2× that of plain PyTorch (fp32 GEMM on the upcast input) + 1e-6, and exact symmetry."""
    want = acc0.double() + alpha * gram_reference(x)
    xf = x.float()
    base = acc0.to(acc.dtype) + alpha * (xf.T @ xf).to(acc.dtype)
    assert _rel(acc, want) <= 2 * _rel(base, want) + 1e-6
    assert torch.equal(acc, acc.T), "result is not exactly symmetric"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 7, 33, 70])
@pytest.mark.parametrize("T", [1, 5, 97])
def test_matches_reference(gram, dtype, n, T):
    x = _x(T, n, dtype)
    acc0 = _sym(n)
    acc = acc0.clone()
    gram.gram_acc_triton(acc, x, 0.5)
    _check(acc, acc0, x, 0.5)


@pytest.mark.parametrize("alpha", [1.0, -0.25, 3.0])
def test_alpha(gram, alpha):
    x = _x(40, 45, torch.float16)
    acc = torch.zeros(45, 45)
    gram.gram_acc_triton(acc, x, alpha)
    _check(acc, torch.zeros(45, 45), x, alpha)


def test_accumulates_over_many_calls(gram):
    n, chunks = 33, [_x(T, 33, torch.float16, seed=s) for s, T in enumerate([1, 17, 64, 5, 31, 97, 2, 40])]
    acc = torch.zeros(n, n)
    for c in chunks:
        gram.gram_acc_triton(acc, c, 1.0)
    _check(acc, torch.zeros(n, n), torch.cat(chunks), 1.0)


def test_fp64_acc(gram):
    x = _x(97, 70, torch.float32)
    acc0 = _sym(70).double()
    acc = acc0.clone()
    gram.gram_acc_triton(acc, x, 0.5)
    assert acc.dtype == torch.float64
    _check(acc, acc0, x, 0.5)


@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("split", [2, 3, 7])
def test_token_split(gram, acc_dtype, split):
    """The workspace path: per-split partial tiles reduced in order by a second kernel."""
    x = _x(97, 40, torch.float16)
    acc0 = _sym(40).to(acc_dtype)
    acc = acc0.clone()
    gram.gram_acc_triton(acc, x, 0.75, config=gram.GramConfig(16, 16, 1, 1, split))
    _check(acc, acc0, x, 0.75)


@pytest.mark.parametrize("config", [None, "split"])
def test_deterministic(gram, config):
    cfg = gram.GramConfig(16, 16, 1, 1, 4) if config else None
    x = _x(97, 70, torch.float16)
    a, b = _sym(70), _sym(70)
    gram.gram_acc_triton(a, x, 1.0, config=cfg)
    gram.gram_acc_triton(b, x, 1.0, config=cfg)
    assert torch.equal(a, b)


def test_many_tiles(gram):
    """153 upper tiles: exercises the triangular program-id → tile decoding."""
    x = _x(3, 257, torch.float32)
    acc = torch.zeros(257, 257)
    gram.gram_acc_triton(acc, x, 1.0, config=gram.GramConfig(16, 16, 1, 1, 1))
    _check(acc, torch.zeros(257, 257), x, 1.0)


@pytest.mark.parametrize("layout", ["cols_strided", "transposed", "rows_strided"])
def test_non_contiguous_x(gram, layout):
    base = _x(97, 140, torch.float16)
    x = {"cols_strided": base[:, ::2],            # stride (140, 2)
         "transposed": base[:70].T.contiguous().T,  # stride (1, 70)
         "rows_strided": base[::3, 5:75]}[layout]   # stride (420, 1)
    assert not x.is_contiguous()
    n = x.shape[1]
    acc = torch.zeros(n, n)
    gram.gram_acc_triton(acc, x, 1.0)
    _check(acc, torch.zeros(n, n), x, 1.0)


def test_non_contiguous_acc(gram):
    x = _x(20, 33, torch.float32)
    big = torch.zeros(33, 66)
    acc = big[:, ::2]
    gram.gram_acc_triton(acc, x, 1.0)
    _check(acc, torch.zeros(33, 33), x, 1.0)
    assert big[:, 1::2].abs().max() == 0


def test_empty_is_noop(gram):
    acc = _sym(7)
    before = acc.clone()
    gram.gram_acc_triton(acc, torch.zeros(0, 7, dtype=torch.float16), 1.0)
    assert torch.equal(acc, before)


def test_validation(gram):
    acc = torch.zeros(8, 8)
    with pytest.raises(ValueError, match="2-D"):
        gram.gram_acc_triton(acc, torch.zeros(2, 3, 8), 1.0)
    with pytest.raises(ValueError, match="acc must be"):
        gram.gram_acc_triton(torch.zeros(8, 9), torch.zeros(4, 8), 1.0)
    with pytest.raises(ValueError, match="float32 or float64"):
        gram.gram_acc_triton(acc.half(), torch.zeros(4, 8), 1.0)
    with pytest.raises(ValueError, match="x must be"):
        gram.gram_acc_triton(acc, torch.zeros(4, 8, dtype=torch.int32), 1.0)


def test_through_op(gram, monkeypatch):
    """``torch.ops.obdk.gram_acc_`` with OBDK_BACKEND=triton dispatches to this kernel."""
    from obdk.backends import select
    monkeypatch.setenv("OBDK_BACKEND", "triton")
    assert select("gram_acc_", "cpu", torch.float16).backend == "triton"
    x = _x(2 * 37, 70, torch.float16).view(2, 37, 70)  # [..., n]: the op flattens the tokens
    acc0 = _sym(70)
    acc = acc0.clone()
    torch.ops.obdk.gram_acc_(acc, x, 0.5)
    _check(acc, acc0, x.reshape(-1, 70), 0.5)
    acc64 = acc0.double()
    torch.ops.obdk.gram_acc_(acc64, x, 0.5)
    _check(acc64, acc0.double(), x.reshape(-1, 70), 0.5)


def test_import_obdk_does_not_import_triton():
    code = "import sys, obdk, obdk.ops, obdk.kernels; sys.exit(int('triton' in sys.modules))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode == 0


# --------------------------------------------------------------------------- GPU (skipped without CUDA)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def gram_gpu():
    """A compiled (non-interpreted) copy of obdk.kernels.gram, whatever TRITON_INTERPRET says."""
    import obdk.kernels as pkg
    mp = pytest.MonkeyPatch()
    mp.delenv("TRITON_INTERPRET", raising=False)
    try:
        spec = importlib.util.spec_from_file_location("_obdk_gram_compiled", os.path.join(pkg.__path__[0], "gram.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        mp.undo()
    assert not mod.interpreted()
    return mod


def _gpu_check(acc, acc0, x, alpha):
    """GPU rule: error ≤ 2× that of an fp32 cuBLAS GEMM on the upcast input + 1e-5, exact symmetry."""
    want = acc0.double() + alpha * gram_reference(x)
    xf = x.float()
    base = acc0.to(acc.dtype) + alpha * (xf.T @ xf).to(acc.dtype)
    assert _rel(acc, want) <= 2 * _rel(base, want) + 1e-5, (_rel(acc, want), _rel(base, want))
    assert torch.equal(acc, acc.T), "result is not exactly symmetric"


def _gpu_impls(gram_gpu):
    from obdk import _ext
    impls = {"triton": gram_gpu.gram_acc_triton}
    if _ext.has("gram_acc_cuda"):
        impls["cuda"] = _ext._C.gram_acc_cuda
    return impls


@needs_cuda
@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("n,T", [(1, 1), (70, 97), (70, 5000), (300, 1), (1000, 4099), (2100, 333)])
def test_gpu_matches_reference(gram_gpu, impl, dtype, n, T):
    fn = _gpu_impls(gram_gpu).get(impl)
    if fn is None:
        pytest.skip(f"{impl} implementation not built")
    x = _x(T, n, dtype).cuda()
    acc0 = _sym(n).cuda()
    acc = acc0.clone()
    fn(acc, x, 0.5)
    _gpu_check(acc, acc0, x, 0.5)


@needs_cuda
@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_gpu_deterministic_strided_fp64(gram_gpu, impl):
    fn = _gpu_impls(gram_gpu).get(impl)
    if fn is None:
        pytest.skip(f"{impl} implementation not built")
    base = _x(6000, 300, torch.bfloat16).cuda()
    for x in (base[:, 1:251], base[::2, ::2], base[:3000].T.contiguous().T[:, :200]):
        n = x.shape[1]
        a = _sym(n).cuda()
        b = a.clone()
        fn(a, x, 1.5)
        fn(b, x, 1.5)
        assert torch.equal(a, b)
        _gpu_check(a, _sym(n).cuda(), x, 1.5)
    acc0 = _sym(250).double().cuda()
    acc = acc0.clone()
    fn(acc, base[:, :250], -0.5)
    _gpu_check(acc, acc0, base[:, :250], -0.5)


@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_through_op(gram_gpu, backend, monkeypatch):
    from obdk import _ext
    if backend == "cuda" and not _ext.has("gram_acc_cuda"):
        pytest.skip("obdk._C built without CUDA")
    monkeypatch.setenv("OBDK_BACKEND", backend)
    monkeypatch.setitem(sys.modules, MOD, gram_gpu)  # the op imports obdk.kernels.gram lazily
    x = _x(2 * 500, 96, torch.float16).cuda().view(2, 500, 96)
    acc0 = _sym(96).cuda()
    acc = acc0.clone()
    torch.ops.obdk.gram_acc_(acc, x, 0.25)
    _gpu_check(acc, acc0, x.reshape(-1, 96), 0.25)
