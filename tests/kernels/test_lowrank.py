"""The Triton low-rank linear kernels (obdk.kernels.lowrank) and the ``obdk::lowrank_linear`` op.

On CPU the kernels run under the Triton interpreter. ``TRITON_INTERPRET=1`` must be set
before a ``@triton.jit`` function is defined; the ``lowrank`` fixture sets it for this
module only (as tests/kernels/test_gram.py does), imports a fresh ``obdk.kernels.lowrank``
under it — the module ``obdk.ops`` dispatches to — and restores the environment and
``sys.modules`` afterwards. On a CUDA machine the same checks also run on the compiled
kernels (Triton and, when built, the CUDA C++ extension).

Accuracy rule (flash-attention's): against the fp32 reference (``lowrank_linear_reference``;
fp64 for fp32 inputs, where the fp32 reference is PyTorch's own computation), the kernel's max
error is at most 2× that of plain PyTorch two-matmul in the same dtype, plus a tiny floor.
"""
from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch

import obdk
from obdk import _ext
from obdk.backends import BackendUnavailable
from obdk.nn import _grouped_meta
from obdk.ops import lowrank_linear_reference

triton = pytest.importorskip("triton")

from tests.kernels.conftest import interpreted_kernel_module  # noqa: E402

MOD = "obdk.kernels.lowrank"
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def lowrank():
    with interpreted_kernel_module("lowrank") as mod:
        yield mod


@pytest.fixture(scope="module")
def lowrank_gpu():
    """A compiled (not interpreted) instance of the kernel module, loaded under a private name."""
    if not CUDA:
        pytest.skip("no CUDA device")
    mp = pytest.MonkeyPatch()
    mp.delenv("TRITON_INTERPRET", raising=False)
    try:
        spec = importlib.util.find_spec(MOD)
        mod = importlib.util.module_from_spec(importlib.util.spec_from_file_location("_obdk_lowrank_gpu", spec.origin))
        spec.loader.exec_module(mod)
        assert not mod.interpreted()
        yield mod
    finally:
        mp.undo()


def _data(M, n, m, r, dtype, bias, seed=0, device="cpu", lead=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, M, n, generator=g)
    a = torch.randn(r, n, generator=g) / n ** 0.5
    b = torch.randn(m, r, generator=g) / r ** 0.5
    bi = torch.randn(m, generator=g) if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(a), cast(b), cast(bi)


def _torch_two_mm(x, a, b, bias):
    t = x @ a.T
    y = t @ b.T
    return y if bias is None else y + bias


_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def _oracle(x, a, b, bias):
    """The fp32 reference; for fp32 inputs (where it *is* PyTorch's computation) an fp64 one."""
    if x.dtype != torch.float32:
        return lowrank_linear_reference(x, a, b, bias)
    y = (x.double() @ a.double().T) @ b.double().T
    return y if bias is None else y + bias.double()


def _assert_close_rule(y, x, a, b, bias, factor=2.0):
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], b.shape[0])
    ref = _oracle(x, a, b, bias)
    err = (y.float() - ref).abs().max().item()
    err_torch = (_torch_two_mm(x, a, b, bias).float() - ref).abs().max().item()
    floor = _FLOOR[x.dtype] * ref.abs().max().item()
    assert err <= factor * err_torch + floor, f"kernel error {err:.3g} vs PyTorch {err_torch:.3g} (floor {floor:.3g})"


# (M, n, m, r): decode (M ≤ 16; n > 128 → several n-splits under the interpreter's config),
# just above the threshold, prefill; odd n/m/r everywhere, large M with small n/m/r.
SHAPES = [(1, 257, 123, 40), (3, 123, 257, 40), (16, 300, 96, 33), (17, 257, 123, 40),
          (97, 123, 257, 40), (1024, 64, 40, 17)]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"M{s[0]}-n{s[1]}-m{s[2]}-r{s[3]}" for s in SHAPES])
def test_triton_matches_reference(lowrank, shape, dtype, bias):
    x, a, b, bi = _data(*shape, dtype, bias)
    _assert_close_rule(lowrank.lowrank_linear_triton(x, a, b, bi), x, a, b, bi)


@pytest.mark.parametrize("M", [2, 40])
def test_triton_bf16(lowrank, M):
    # The interpreter rounds fp32 → bf16 by truncation (2× round-to-nearest's error, on both
    # the t and y stores at prefill), so the interpreted bound is 4×; on GPU it is 2×.
    x, a, b, bi = _data(M, 257, 123, 40, torch.bfloat16, True)
    _assert_close_rule(lowrank.lowrank_linear_triton(x, a, b, bi), x, a, b, bi, factor=4.0)


@pytest.mark.parametrize("M", [4, 33])
def test_triton_leading_dims_and_strides(lowrank, M):
    x, a, b, bi = _data(M, 96, 70, 24, torch.float32, True, lead=(2,))
    y = lowrank.lowrank_linear_triton(x, a, b, bi)
    assert y.shape == (2, M, 70)
    _assert_close_rule(y, x, a, b, bi)
    wide = torch.randn(2, M, 130)[..., 7:103]                    # row stride 130, not 96
    at = torch.randn(96, 24).T                                   # a given transposed (not row-major)
    _assert_close_rule(lowrank.lowrank_linear_triton(wide, at, b, None), wide, at, b, None)


def test_decode_split_reduction_is_deterministic(lowrank):
    x, a, b, bi = _data(5, 1100, 64, 48, torch.float32, True)    # 9 n-splits
    y1 = lowrank.lowrank_linear_triton(x, a, b, bi)
    y2 = lowrank.lowrank_linear_triton(x, a, b, bi)
    assert torch.equal(y1, y2)
    _assert_close_rule(y1, x, a, b, bi)
    for buf in lowrank._COUNTERS.values():                       # the last program resets its counter
        assert int(buf.abs().sum()) == 0


def test_empty_and_dtype_errors(lowrank):
    x, a, b, bi = _data(1, 32, 16, 8, torch.float32, True)
    y = lowrank.lowrank_linear_triton(x[:0], a, b, bi)
    assert y.shape == (0, 16)
    with pytest.raises(TypeError, match="dtype"):
        lowrank.lowrank_linear_triton(x, a.half(), b, bi)


def _grouped_case(M, dtype, bias, ranks=(40, 17, 23), outs=(64, 33, 48), n=130, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, n, generator=g).to(dtype)
    As = [(torch.randn(r, n, generator=g) / n ** 0.5).to(dtype) for r in ranks]
    Bs = [(torch.randn(m, r, generator=g) / r ** 0.5).to(dtype) for m, r in zip(outs, ranks)]
    bs = [(torch.randn(m, generator=g).to(dtype) if bias else None) for m in outs]
    return x, As, Bs, bs


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("M", [1, 16, 70])
def test_triton_grouped_matches_members(lowrank, M, bias):
    dtype = torch.float16
    x, As, Bs, bs = _grouped_case(M, dtype, bias)
    outs = [b.shape[0] for b in Bs]
    bias_cat = torch.cat(bs) if bias else None
    y = lowrank.lowrank_grouped_triton(x, torch.cat(As), torch.cat([b.reshape(-1) for b in Bs]),
                                       _grouped_meta([a.shape[0] for a in As], outs), outs, bias_cat)
    assert y.shape == (M, sum(outs)) and y.dtype == dtype
    for ys, a, b, bi in zip(y.split(outs, -1), As, Bs, bs):
        _assert_close_rule(ys, x, a, b, bi)


# --------------------------------------------------------------------------- the op


def test_op_dispatches_to_interpreted_triton(lowrank, monkeypatch):
    monkeypatch.setenv("OBDK_BACKEND", "triton")
    x, a, b, bi = _data(3, 123, 64, 40, torch.float16, True)
    _assert_close_rule(obdk.ops.lowrank_linear(x, a, b, bi), x, a, b, bi)
    x, a, b, bi = _data(40, 123, 64, 40, torch.float32, False, lead=(2,))
    _assert_close_rule(obdk.ops.lowrank_linear(x, a, b, bi), x, a, b, bi)


def test_forced_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("OBDK_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, a, b, bi = _data(2, 16, 8, 4, torch.float32, True)
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        obdk.ops.lowrank_linear(x, a, b, bi)


def _opcheck_samples():
    g = torch.Generator().manual_seed(3)
    out = []
    for lead, n, m, r, bias, grad in [((3,), 24, 20, 6, True, False), ((2, 5), 24, 20, 6, False, True),
                                      ((1,), 17, 9, 3, True, True)]:
        x = torch.randn(*lead, n, generator=g, requires_grad=grad)
        a = torch.randn(r, n, generator=g, requires_grad=grad)
        b = torch.randn(m, r, generator=g, requires_grad=grad)
        bi = torch.randn(m, generator=g, requires_grad=grad) if bias else None
        out.append((x, a, b, bi))
    return out


@pytest.mark.parametrize("backend", [None, "cpp", "torch", "triton"])
def test_opcheck(backend, monkeypatch, request):
    if backend == "cpp" and not _ext.has("lowrank_linear_cpu"):
        pytest.skip("obdk._C not built")
    if backend == "triton":
        request.getfixturevalue("lowrank")
    if backend is not None:
        monkeypatch.setenv("OBDK_BACKEND", backend)
    for args in _opcheck_samples():
        torch.library.opcheck(obdk.ops.lowrank_linear, args)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_op_under_torch_compile(compile_backend):
    torch._dynamo.reset()

    def f(x, a, b, bias):
        return torch.relu(obdk.ops.lowrank_linear(x, a, b, bias)) * 2

    cf = torch.compile(f, backend=compile_backend, fullgraph=True, dynamic=False)
    x, a, b, bi = _data(5, 48, 40, 12, torch.float32, True, lead=(2,))
    torch.testing.assert_close(cf(x, a, b, bi), f(x, a, b, bi))
    torch.testing.assert_close(cf(x, a, b, None), f(x, a, b, None))


# --------------------------------------------------------------------------- GPU (skipped on CPU)


GPU_SHAPES = [(1, 4096, 4096, 1664), (4, 4096, 11008, 2368), (16, 11008, 4096, 2368), (1, 257, 123, 40),
              (17, 4096, 4096, 1664), (300, 1000, 333, 72), (2048, 4096, 4096, 1664)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=[f"M{s[0]}-n{s[1]}-m{s[2]}-r{s[3]}" for s in GPU_SHAPES])
def test_gpu_triton(lowrank_gpu, shape, dtype):
    x, a, b, bi = _data(*shape, dtype, True, device="cuda")
    _assert_close_rule(lowrank_gpu.lowrank_linear_triton(x, a, b, bi), x, a, b, bi)
    if shape[0] <= 16:
        y1 = lowrank_gpu.lowrank_linear_triton(x, a, b, bi)
        assert torch.equal(y1, lowrank_gpu.lowrank_linear_triton(x, a, b, bi))


@pytest.mark.parametrize("M", [1, 16, 300])
def test_gpu_triton_grouped(lowrank_gpu, M):
    x, As, Bs, bs = _grouped_case(M, torch.bfloat16, True, ranks=(1664, 512, 512), outs=(4096, 1024, 1024), n=4096)
    x, As, Bs, bs = x.cuda(), [t.cuda() for t in As], [t.cuda() for t in Bs], [t.cuda() for t in bs]
    outs = [b.shape[0] for b in Bs]
    y = lowrank_gpu.lowrank_grouped_triton(x, torch.cat(As), torch.cat([b.reshape(-1) for b in Bs]),
                                           _grouped_meta([a.shape[0] for a in As], outs).cuda(), outs, torch.cat(bs))
    for ys, a, b, bi in zip(y.split(outs, -1), As, Bs, bs):
        _assert_close_rule(ys, x, a, b, bi)


@pytest.mark.skipif(not _ext.has("lowrank_linear_cuda"), reason="obdk._C built without CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=[f"M{s[0]}-n{s[1]}-m{s[2]}-r{s[3]}" for s in GPU_SHAPES])
def test_gpu_cuda_ext(shape, dtype):
    x, a, b, bi = _data(*shape, dtype, True, device="cuda")
    y = _ext._C.lowrank_linear_cuda(x, a, b, bi)
    _assert_close_rule(y, x, a, b, bi)
    if shape[0] <= 16:
        assert torch.equal(y, _ext._C.lowrank_linear_cuda(x, a, b, bi))
        xs = torch.randn(shape[0], shape[1] + 3, device="cuda", dtype=dtype)[:, 1:shape[1] + 1]  # unaligned rows
        _assert_close_rule(_ext._C.lowrank_linear_cuda(xs, a, b, None), xs, a, b, None)


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("backend", [None, "triton", "cuda"])
def test_gpu_opcheck(backend, monkeypatch):
    if backend == "cuda" and not _ext.has("lowrank_linear_cuda"):
        pytest.skip("obdk._C built without CUDA")
    if backend is not None:
        monkeypatch.setenv("OBDK_BACKEND", backend)
    for x, a, b, bi in _opcheck_samples():
        args = [t.detach().cuda().half().requires_grad_(t.requires_grad) if t is not None else None for t in (x, a, b, bi)]
        torch.library.opcheck(obdk.ops.lowrank_linear, tuple(args))


# --------------------------------------------------------------------------- modules on the Triton backend


@pytest.mark.parametrize("M", [3, 40])
def test_packed_module_through_interpreted_triton(lowrank, monkeypatch, M):
    from obdk.nn import LowRankLinear, PackedLowRankLinear
    monkeypatch.setenv("OBDK_BACKEND", "triton")
    g = torch.Generator().manual_seed(5)
    members = [LowRankLinear(72, m, r, bias=bias).reset_parameters(g).half()
               for m, r, bias in [(64, 20, True), (40, 9, False), (40, 9, True)]]
    packed = PackedLowRankLinear.from_modules(members)
    x = torch.randn(2, M, 72, generator=g).half()
    for y, mod in zip(packed(x), members):
        _assert_close_rule(y, x, mod.weight_a.detach(), mod.weight_b.detach(),
                           None if mod.bias is None else mod.bias.detach())


def test_pack_shared_inputs_on_interpreted_triton(lowrank, monkeypatch):
    from obdk.models import linear_groups
    from obdk.nn import LowRankLinear, pack_shared_inputs
    from tests.conftest import make_tiny_llama
    model = make_tiny_llama(layers=1)
    g = torch.Generator().manual_seed(0)
    for grp in linear_groups(model):
        for name in grp.names:
            lin = model.get_submodule(name)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr,
                    LowRankLinear(lin.in_features, lin.out_features, 12, bias=False).reset_parameters(g))
    ids = torch.randint(0, 128, (1, 5), generator=g)
    with torch.no_grad():
        want = model(ids).logits                      # default CPU backend
        monkeypatch.setenv("OBDK_BACKEND", "triton")
        assert len(pack_shared_inputs(model)) == 2
        got = model(ids).logits                       # decode-path kernels, packed q/k/v and gate/up
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
