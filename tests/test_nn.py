"""Serving modules: LowRankLinear, PackedLowRankLinear and pack_shared_inputs on tiny HF models."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from obdk import _ext
from obdk.backends import BackendUnavailable
from obdk.models import linear_groups
from obdk.nn import (
    LowRankLinear,
    PackedLowRankLinear,
    PackedSlice,
    lowrank_linear_grouped,
    pack_shared_inputs,
    shared_input_groups,
    unpack_shared_inputs,
)
from obdk.ops import lowrank_linear_reference

from .conftest import make_tiny_llama, make_tiny_qwen2


def _lowrank(in_f, out_f, rank, bias, seed=0, dtype=torch.float32):
    return LowRankLinear(in_f, out_f, rank, bias=bias).reset_parameters(torch.Generator().manual_seed(seed)).to(dtype)


def _ref(mod: LowRankLinear, x):
    return lowrank_linear_reference(x, mod.weight_a, mod.weight_b, mod.bias)


@pytest.mark.parametrize("backend", [None, "torch", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lowrank_linear_matches_reference(backend, dtype, monkeypatch):
    if backend == "cpp" and not _ext.has("lowrank_linear_cpu"):
        pytest.skip("obdk._C not built")
    if backend is not None:
        monkeypatch.setenv("OBDK_BACKEND", backend)
    mod = _lowrank(48, 40, 7, True, dtype=dtype)
    x = torch.randn(2, 5, 48).to(dtype)
    y = mod(x)
    assert y.shape == (2, 5, 40) and y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.float(), _ref(mod, x), rtol=tol, atol=tol)
    dense = nn.Linear(48, 40).to(dtype)
    with torch.no_grad():
        dense.weight.copy_(mod.weight)
        dense.bias.copy_(mod.bias)
    torch.testing.assert_close(y.float(), dense(x).float(), rtol=5 * tol, atol=5 * tol)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_forced_backend_that_cannot_run_raises(backend, monkeypatch):
    monkeypatch.setenv("OBDK_BACKEND", backend)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    mod = _lowrank(16, 8, 4, True)
    with pytest.raises(BackendUnavailable, match=backend):
        mod(torch.randn(3, 16))
    packed = PackedLowRankLinear.from_modules([mod, _lowrank(16, 12, 3, False, seed=1)])
    with pytest.raises(BackendUnavailable, match=backend):
        packed(torch.randn(3, 16))


def test_invalid_backend_name(monkeypatch):
    monkeypatch.setenv("OBDK_BACKEND", "fast")
    with pytest.raises(ValueError, match="OBDK_BACKEND"):
        _lowrank(16, 8, 4, False)(torch.randn(2, 16))


def test_lowrank_linear_backward():
    mod = _lowrank(12, 10, 3, True)
    x = torch.randn(4, 12, requires_grad=True)
    mod(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    a, b, bi = (p.detach().clone().requires_grad_() for p in (mod.weight_a, mod.weight_b, mod.bias))
    (((x2 @ a.T) @ b.T + bi).square().sum()).backward()
    for got, want in [(x.grad, x2.grad), (mod.weight_a.grad, a.grad), (mod.weight_b.grad, b.grad), (mod.bias.grad, bi.grad)]:
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", [None, "torch"])
def test_packed_matches_members(backend, monkeypatch):
    if backend is not None:
        monkeypatch.setenv("OBDK_BACKEND", backend)
    members = [_lowrank(40, 64, 9, True, 0), _lowrank(40, 24, 5, False, 1), _lowrank(40, 33, 11, True, 2)]
    packed = PackedLowRankLinear.from_modules(members)
    assert packed.weight_a.shape == (25, 40) and packed.weight_b.numel() == 64 * 9 + 24 * 5 + 33 * 11
    x = torch.randn(3, 7, 40)
    outs = packed(x)
    assert len(outs) == 3
    for y, mod in zip(outs, members):
        assert y.shape == (3, 7, mod.out_features)
        torch.testing.assert_close(y, mod(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y, _ref(mod, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.forward_cat(x), torch.cat([m(x) for m in members], -1), rtol=1e-5, atol=1e-5)
    for i, mod in enumerate(members):
        back = packed.member(i)
        for p, q in zip(back.parameters(), mod.parameters()):
            assert torch.equal(p, q)


def test_grouped_op_opcheck():
    members = [_lowrank(20, 16, 4, True, 0), _lowrank(20, 8, 3, False, 1)]
    p = PackedLowRankLinear.from_modules(members)
    for x in (torch.randn(5, 20), torch.randn(2, 3, 20)):
        torch.library.opcheck(lowrank_linear_grouped, (x, p.weight_a.detach(), p.weight_b.detach(), p.meta,
                                                       list(p.ranks), list(p.out_features), p.bias.detach()),
                              test_utils=("test_schema", "test_faketensor"))


def test_packed_rejects_mismatched_members():
    with pytest.raises(ValueError, match="in_features"):
        PackedLowRankLinear.from_modules([_lowrank(16, 8, 4, True), _lowrank(12, 8, 4, True)])
    with pytest.raises(TypeError):
        PackedLowRankLinear.from_modules([_lowrank(16, 8, 4, True), nn.Linear(16, 8)])


def _compress_randomly(model, keep_dense=(), seed=0):
    """Replace every decoder Linear by a random LowRankLinear (except names ending in keep_dense)."""
    g = torch.Generator().manual_seed(seed)
    for grp in linear_groups(model):
        for name in grp.names:
            if any(name.endswith(k) for k in keep_dense):
                continue
            lin = model.get_submodule(name)
            rank = max(2, min(lin.in_features, lin.out_features) // 4 + len(grp.names))
            new = LowRankLinear(lin.in_features, lin.out_features, rank, bias=lin.bias is not None).reset_parameters(g)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, new)
    return model


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_qwen2], ids=["llama", "qwen2"])
def test_pack_shared_inputs_same_logits(make, dtype):
    # One shrink GEMM over the stacked factors sums each output in the same order only where the
    # BLAS picks the same blocking for both shapes (so on some CPUs the logits are bitwise equal,
    # on others, e.g. AMD EPYC with torch 2.13, 4e-7 apart in fp32): equal to rounding, in fp64 to 1e-12.
    model = _compress_randomly(make(), keep_dense=("layers.1.self_attn.k_proj",)).to(dtype)
    ids = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        n_params = sum(p.numel() for p in model.parameters())
        packed = pack_shared_inputs(model)
        # layers 0 and 1 each: q/k/v (layer 1: q/v, k kept dense) and gate/up
        assert len(packed) == 4
        assert isinstance(model.get_submodule("model.layers.1.self_attn.k_proj"), nn.Linear)
        assert isinstance(model.get_submodule("model.layers.1.self_attn.v_proj"), PackedSlice)
        assert isinstance(model.get_submodule("model.layers.0.self_attn.o_proj"), LowRankLinear)
        assert sum(p.numel() for p in model.parameters()) == n_params  # each packed module counted once
        got = model(ids).logits
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        assert all(p._cache is None for p in packed)  # no activation outlives the forward
        assert unpack_shared_inputs(model) == 9
        assert not any(isinstance(m, PackedSlice) for m in model.modules())
        assert torch.equal(model(ids).logits, want)


def test_pack_shared_inputs_generate_and_groups_from_linear_groups():
    model = make_tiny_llama()
    groups = linear_groups(model)               # taken before compression, as calibration sees them
    _compress_randomly(model)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, **kw)
        assert len(pack_shared_inputs(model, groups)) == 4
        assert torch.equal(model.generate(ids, **kw), want)


def test_shared_output_cache_is_keyed_on_input_identity():
    members = [_lowrank(16, 8, 4, True, 0), _lowrank(16, 6, 3, True, 1)]
    p = PackedLowRankLinear.from_modules(members)
    x1, x2 = torch.randn(2, 16), torch.randn(2, 16)
    y0 = p.shared_output(x1, 0)
    y1 = p.shared_output(x2, 1)                  # a different input: recomputed, not x1's slice
    torch.testing.assert_close(y0, members[0](x1))
    torch.testing.assert_close(y1, members[1](x2))
    x1.mul_(2)                                   # in-place change: the version bumps, recomputed
    p.shared_output(x1, 0)
    torch.testing.assert_close(p.shared_output(x1, 1), members[1](x1))
    assert p._cache is None


def test_group_without_two_lowrank_members_is_left_alone():
    model = _compress_randomly(make_tiny_llama(), keep_dense=("gate_proj", "k_proj", "v_proj"))
    assert pack_shared_inputs(model) == []
    assert {type(m).__name__ for m in model.modules()} >= {"LowRankLinear", "Linear"}
    assert len(shared_input_groups(model)) == 8
