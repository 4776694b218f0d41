"""ObdkLinearMethod on vLLM's own Linear layers, without an engine (fp64, CPU).

Each test builds a vLLM Linear (QKV, merged column, column, row-parallel, replicated) as rank t of T
tensor-parallel ranks (vLLM's TP rank/size getters patched, as vLLM's own layer tests do), feeds it the
checkpoint tensors of its members as vLLM's loader does (fused layers through their ``load_weights``
with ``loaded_weight.shard_id``; the others through ``param.weight_loader(param, tensor)``), and checks
``apply`` against the dense product of the stored tensors: this rank's rows of every segment for
column-parallel layers (k/v replicated when there are more ranks than KV heads), and for row-parallel
layers partial sums over the ranks that add up to the whole product (vLLM's all-reduce).
"""
from __future__ import annotations

import pytest
import torch
import vllm.model_executor.layers.linear as vlin
import vllm.model_executor.parameter as vparam
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)

from obdk import backends
from obdk.errors import CheckpointError, UnsupportedModelError
from obdk.vllm_plugin.method import ObdkLinearMethod, ObdkVllmConfig

DT = torch.float64
HIDDEN, HEAD, HEADS = 64, 16, 4
LLAMA_MAP = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
PHI3_MAP = {"qkv_proj": ["qkv_proj"], "gate_up_proj": ["gate_up_proj"]}


@pytest.fixture
def tp(monkeypatch):
    """``tp(rank, size)`` makes the next vLLM Linear rank ``rank`` of ``size`` tensor-parallel ranks."""
    def set_(rank: int, size: int):
        for mod in (vlin, vparam):
            monkeypatch.setattr(mod, "get_tensor_model_parallel_rank", lambda: rank)
            monkeypatch.setattr(mod, "get_tensor_model_parallel_world_size", lambda: size)
    set_(0, 1)
    return set_


def _config(ranks: dict, mapping=LLAMA_MAP) -> ObdkVllmConfig:
    cfg = ObdkVllmConfig.from_config({"quant_method": "obdk", "format_version": 1, "ranks": ranks})
    cfg.packed_modules_mapping = dict(mapping)
    return cfg


def _member_tensors(name: str, rank, out: int, inp: int, gen: torch.Generator) -> tuple[dict, torch.Tensor]:
    """Stored tensors of one checkpoint module (factors + empty tombstone, or dense) and its dense product."""
    if rank is None:
        w = torch.randn(out, inp, generator=gen, dtype=DT)
        return {f"{name}.weight": w}, w
    a = torch.randn(rank, inp, generator=gen, dtype=DT)
    b = torch.randn(out, rank, generator=gen, dtype=DT)
    return {f"{name}.weight_a": a, f"{name}.weight_b": b, f"{name}.weight": torch.empty(0, dtype=DT)}, b @ a


def _load_fused(layer, tensors: dict, shard_of: dict) -> None:
    """As vLLM's AutoWeightsLoader does for a fused Linear: its ``load_weights`` with ``.shard_id`` set."""
    items = []
    for key, t in tensors.items():
        module, _, param = key.rpartition(".")
        t = t.clone()
        sid = shard_of[module]
        if sid is not None:
            t.shard_id = sid
        items.append((param, t))
    assert sorted(layer.load_weights(iter(items))) == sorted(p for p, _ in items)


def _load_plain(layer, tensors: dict) -> None:
    for key, t in tensors.items():
        p = getattr(layer, key.rpartition(".")[2])
        p.weight_loader(p, t.clone())


def _qkv(cfg, kv_heads, bias=False, prefix="model.layers.0.self_attn.qkv_proj"):
    return QKVParallelLinear(HIDDEN, HEAD, HEADS, kv_heads, bias=bias, params_dtype=DT, quant_config=cfg, prefix=prefix)


def _qkv_expected(x, parts: list[torch.Tensor], kv_heads: int, rank: int, size: int, bias=None):
    """This rank's q rows, k rows, v rows (k/v replicated over size // kv_heads ranks when size > kv_heads)."""
    rep = max(1, size // kv_heads)
    out = []
    for s, w in enumerate(parts):
        shards = size if s == 0 else size // rep
        n = w.shape[0] // shards
        start = (rank if s == 0 else rank // rep) * n
        y = x @ w.T + (0 if bias is None else bias[s])
        out.append(y[..., start:start + n])
    return torch.cat(out, -1)


# ------------------------------------------------------------------ q/k/v


QKV_MIXES = {
    "all-lowrank-unequal": {"q": 24, "k": 16, "v": 20},
    "q-v-lowrank-k-dense": {"q": 12, "k": None, "v": 8},
    "k-lowrank-only": {"q": None, "k": 6, "v": None},
}


@pytest.mark.parametrize("rank,size", [(0, 1), (0, 2), (1, 2)])
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["kv2", "kv1"])
@pytest.mark.parametrize("mix", sorted(QKV_MIXES))
def test_qkv_members(tp, mix, kv_heads, rank, size):
    tp(rank, size)
    spec = QKV_MIXES[mix]
    pre = "model.layers.0.self_attn"
    ranks = {f"{pre}.{s}_proj": r for s, r in spec.items() if r is not None}
    layer = _qkv(_config(ranks), kv_heads)
    assert isinstance(layer.quant_method, ObdkLinearMethod)
    gen = torch.Generator().manual_seed(1)
    tensors, parts, shard_of = {}, [], {}
    for s, r in spec.items():
        out = (HEADS if s == "q" else kv_heads) * HEAD
        t, w = _member_tensors(f"{pre}.{s}_proj", r, out, HIDDEN, gen)
        tensors.update(t)
        parts.append(w)
        shard_of[f"{pre}.{s}_proj"] = s
    _load_fused(layer, tensors, shard_of)
    layer.quant_method.process_weights_after_loading(layer)
    # the factors are stored as they are: Σ ranks of the low-rank members, no dense product anywhere
    assert layer.weight_a.shape == (sum(r for r in spec.values() if r), HIDDEN)
    local = {"q": HEADS * HEAD // size, "k": max(1, kv_heads // size) * HEAD, "v": max(1, kv_heads // size) * HEAD}
    assert layer.weight.shape == (sum(local[s] for s, r in spec.items() if r is None), HIDDEN)
    x = torch.randn(5, HIDDEN, generator=gen, dtype=DT)
    got = layer.quant_method.apply(layer, x) if size > 1 else layer(x)[0]
    torch.testing.assert_close(got, _qkv_expected(x, parts, kv_heads, rank, size), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rank,size", [(0, 1), (1, 2)])
def test_qkv_bias_mixed_group(tp, rank, size):
    """Qwen2's q/k/v biases load through vLLM's own loader and are added once, after the mixed group."""
    tp(rank, size)
    pre = "model.layers.1.self_attn"
    layer = _qkv(_config({f"{pre}.q_proj": 10, f"{pre}.v_proj": 7}), 2, bias=True, prefix=f"{pre}.qkv_proj")
    gen = torch.Generator().manual_seed(2)
    tensors, parts, biases, shard_of = {}, [], [], {}
    for s, r in (("q", 10), ("k", None), ("v", 7)):
        out = (HEADS if s == "q" else 2) * HEAD
        t, w = _member_tensors(f"{pre}.{s}_proj", r, out, HIDDEN, gen)
        tensors.update(t)
        tensors[f"{pre}.{s}_proj.bias"] = torch.randn(out, generator=gen, dtype=DT)
        parts.append(w)
        biases.append(tensors[f"{pre}.{s}_proj.bias"])
        shard_of[f"{pre}.{s}_proj"] = s
    _load_fused(layer, tensors, shard_of)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(3, 2, HIDDEN, generator=gen, dtype=DT)
    torch.testing.assert_close(layer.quant_method.apply(layer, x, layer.bias),
                               _qkv_expected(x, parts, 2, rank, size, biases), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rank,size", [(0, 1), (0, 2), (1, 2)])
@pytest.mark.parametrize("r", [20, None], ids=["lowrank", "dense"])
def test_qkv_fused_on_disk(tp, r, rank, size):
    """Phi-3's qkv_proj is one module on disk: weight_b's q, k and v rows are split per rank like a weight."""
    tp(rank, size)
    name = "model.layers.0.self_attn.qkv_proj"
    layer = _qkv(_config({name: r} if r else {}, PHI3_MAP), 2)
    if r is None:
        assert isinstance(layer.quant_method, UnquantizedLinearMethod)
        return
    gen = torch.Generator().manual_seed(3)
    tensors, w = _member_tensors(name, r, (HEADS + 4) * HEAD, HIDDEN, gen)
    _load_fused(layer, tensors, {name: None})
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.weight_a.shape == (r, HIDDEN)
    parts = list(w.split([HEADS * HEAD, 2 * HEAD, 2 * HEAD]))
    x = torch.randn(4, HIDDEN, generator=gen, dtype=DT)
    torch.testing.assert_close(layer.quant_method.apply(layer, x), _qkv_expected(x, parts, 2, rank, size),
                               rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ gate/up, column, replicated


@pytest.mark.parametrize("rank,size", [(0, 1), (0, 2), (1, 2)])
@pytest.mark.parametrize("mix", [(40, 48), (40, None), (None, 12)], ids=["unequal", "up-dense", "gate-dense"])
def test_merged_gate_up(tp, mix, rank, size):
    tp(rank, size)
    pre, inter = "model.layers.0.mlp", 96
    ranks = {f"{pre}.{n}": r for n, r in zip(("gate_proj", "up_proj"), mix) if r}
    layer = MergedColumnParallelLinear(HIDDEN, [inter, inter], bias=False, params_dtype=DT, quant_config=_config(ranks),
                                       prefix=f"{pre}.gate_up_proj")
    gen = torch.Generator().manual_seed(4)
    tensors, parts = {}, []
    for i, (n, r) in enumerate(zip(("gate_proj", "up_proj"), mix)):
        t, w = _member_tensors(f"{pre}.{n}", r, inter, HIDDEN, gen)
        tensors.update(t)
        parts.append(w)
    _load_fused(layer, tensors, {f"{pre}.gate_proj": 0, f"{pre}.up_proj": 1})
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(6, HIDDEN, generator=gen, dtype=DT)
    n = inter // size
    want = torch.cat([(x @ w.T)[:, rank * n:(rank + 1) * n] for w in parts], -1)
    torch.testing.assert_close(layer.quant_method.apply(layer, x), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rank,size", [(0, 1), (1, 2)])
def test_merged_fused_on_disk(tp, rank, size):
    tp(rank, size)
    name, inter = "model.layers.0.mlp.gate_up_proj", 96
    layer = MergedColumnParallelLinear(HIDDEN, [inter, inter], bias=False, params_dtype=DT,
                                       quant_config=_config({name: 36}, PHI3_MAP), prefix=name)
    gen = torch.Generator().manual_seed(5)
    tensors, w = _member_tensors(name, 36, 2 * inter, HIDDEN, gen)
    _load_fused(layer, tensors, {name: None})
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(2, HIDDEN, generator=gen, dtype=DT)
    n = inter // size
    want = torch.cat([(x @ p.T)[:, rank * n:(rank + 1) * n] for p in w.split(inter)], -1)
    torch.testing.assert_close(layer.quant_method.apply(layer, x), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [ColumnParallelLinear, ReplicatedLinear])
@pytest.mark.parametrize("rank,size", [(0, 1), (1, 2)])
def test_column_and_replicated(tp, cls, rank, size):
    tp(rank, size)
    name = "model.layers.0.mlp.fc1"
    layer = cls(HIDDEN, 96, bias=True, params_dtype=DT, quant_config=_config({name: 9}), prefix=name)
    gen = torch.Generator().manual_seed(6)
    tensors, w = _member_tensors(name, 9, 96, HIDDEN, gen)
    tensors[f"{name}.bias"] = torch.randn(96, generator=gen, dtype=DT)
    _load_plain(layer, tensors)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(3, HIDDEN, generator=gen, dtype=DT)
    full = x @ w.T + tensors[f"{name}.bias"]
    n = 96 // size if cls is ColumnParallelLinear else 96
    start = rank * n if cls is ColumnParallelLinear else 0
    torch.testing.assert_close(layer.quant_method.apply(layer, x, layer.bias), full[:, start:start + n],
                               rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ row-parallel


@pytest.mark.parametrize("size", [1, 2])
def test_row_parallel_partial_sums(tp, size):
    """Each rank keeps its input columns of weight_a and all of weight_b; the partial outputs sum to the
    whole product (vLLM all-reduces them), the bias added on rank 0 only (as vLLM's forward passes it)."""
    name, inp = "model.layers.0.mlp.down_proj", 96
    gen = torch.Generator().manual_seed(7)
    tensors, w = _member_tensors(name, 28, HIDDEN, inp, gen)
    bias = torch.randn(HIDDEN, generator=gen, dtype=DT)
    x = torch.randn(4, inp, generator=gen, dtype=DT)
    total = 0
    for rank in range(size):
        tp(rank, size)
        layer = RowParallelLinear(inp, HIDDEN, bias=True, params_dtype=DT, quant_config=_config({name: 28}), prefix=name)
        _load_plain(layer, {**tensors, f"{name}.bias": bias})
        layer.quant_method.process_weights_after_loading(layer)
        n = inp // size
        assert layer.weight_a.shape == (28, n) and layer.weight_b.numel() == HIDDEN * 28
        part = layer.quant_method.apply(layer, x[:, rank * n:(rank + 1) * n], layer.bias if rank == 0 else None)
        total = total + part
    torch.testing.assert_close(total, x @ w.T + bias, rtol=1e-12, atol=1e-12)


def test_dense_layers_get_vllms_method(tp):
    cfg = _config({"model.layers.0.mlp.down_proj": 8})
    layer = RowParallelLinear(96, HIDDEN, bias=False, params_dtype=DT, quant_config=cfg,
                              prefix="model.layers.0.self_attn.o_proj")
    assert isinstance(layer.quant_method, UnquantizedLinearMethod)
    assert "model.layers.0.self_attn.o_proj" in cfg.claimed


# ------------------------------------------------------------------ the op in vLLM's forward


def test_apply_traces_obdks_ops_without_graph_breaks(tp):
    """torch.compile (as vLLM compiles its forward) sees obdk::lowrank_linear(_grouped) as single nodes."""
    pre = "model.layers.0"
    qkv = _qkv(_config({f"{pre}.self_attn.q_proj": 8, f"{pre}.self_attn.k_proj": 4}), 2)
    gen = torch.Generator().manual_seed(8)
    tensors, shard_of = {}, {}
    for s, r, out in (("q", 8, HEADS * HEAD), ("k", 4, 2 * HEAD), ("v", None, 2 * HEAD)):
        tensors.update(_member_tensors(f"{pre}.self_attn.{s}_proj", r, out, HIDDEN, gen)[0])
        shard_of[f"{pre}.self_attn.{s}_proj"] = s
    _load_fused(qkv, tensors, shard_of)
    qkv.quant_method.process_weights_after_loading(qkv)
    row = RowParallelLinear(96, HIDDEN, bias=False, params_dtype=DT,
                            quant_config=_config({f"{pre}.mlp.down_proj": 5}), prefix=f"{pre}.mlp.down_proj")
    _load_plain(row, _member_tensors(f"{pre}.mlp.down_proj", 5, HIDDEN, 96, gen)[0])
    row.quant_method.process_weights_after_loading(row)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    def f(x, h):
        return qkv.quant_method.apply(qkv, x), row.quant_method.apply(row, h)

    x, h = torch.randn(3, HIDDEN, dtype=DT), torch.randn(3, 96, dtype=DT)
    want = f(x, h)
    got = torch.compile(f, backend=backend, fullgraph=True)(x, h)
    torch.testing.assert_close(got, want)
    assert {"obdk.lowrank_linear_grouped", "obdk.lowrank_linear"} <= {t.removesuffix(".default") for t in seen}, seen


def test_apply_with_the_triton_backend(tp):
    """The GPU path: the same apply under obdk's Triton kernels (the interpreter on CPU) equals the CPU backend."""
    pytest.importorskip("triton")
    from tests.kernels.conftest import interpreted_kernel_module
    pre = "model.layers.0.mlp"
    layer = MergedColumnParallelLinear(HIDDEN, [96, 96], bias=False, params_dtype=torch.float32,
                                       quant_config=_config({f"{pre}.gate_proj": 16, f"{pre}.up_proj": 24}),
                                       prefix=f"{pre}.gate_up_proj")
    gen = torch.Generator().manual_seed(9)
    tensors = {}
    for n, r in (("gate_proj", 16), ("up_proj", 24)):
        tensors.update({k: v.float() for k, v in _member_tensors(f"{pre}.{n}", r, 96, HIDDEN, gen)[0].items()})
    _load_fused(layer, tensors, {f"{pre}.gate_proj": 0, f"{pre}.up_proj": 1})
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(5, HIDDEN, generator=gen)
    want = layer.quant_method.apply(layer, x)
    with interpreted_kernel_module("lowrank"), backends.use("triton"):
        assert backends.select("lowrank_linear", "cpu", torch.float32).backend == "triton"
        got = layer.quant_method.apply(layer, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ refusals


def test_wrong_rank_names_module(tp):
    pre = "model.layers.0.self_attn"
    layer = _qkv(_config({f"{pre}.q_proj": 8}), 2)
    gen = torch.Generator().manual_seed(10)
    tensors = _member_tensors(f"{pre}.q_proj", 7, HEADS * HEAD, HIDDEN, gen)[0]
    with pytest.raises(CheckpointError, match=r"q_proj\.weight_a.*\[7, 64\].*\[8, 64\].*rank 8"):
        _load_fused(layer, tensors, {f"{pre}.q_proj": "q"})


def test_missing_factor_and_wrong_kind(tp):
    pre = "model.layers.0.self_attn"
    layer = _qkv(_config({f"{pre}.q_proj": 8}), 2)
    gen = torch.Generator().manual_seed(11)
    t = _member_tensors(f"{pre}.q_proj", 8, HEADS * HEAD, HIDDEN, gen)[0]
    _load_fused(layer, {f"{pre}.q_proj.weight_a": t[f"{pre}.q_proj.weight_a"]}, {f"{pre}.q_proj": "q"})
    with pytest.raises(CheckpointError, match=r"q_proj\.weight_b' is missing"):
        layer.quant_method.process_weights_after_loading(layer)
    with pytest.raises(CheckpointError, match=r"k_proj\.weight_a.*makes dense"):
        _load_fused(layer, {f"{pre}.k_proj.weight_a": torch.zeros(4, HIDDEN, dtype=DT)}, {f"{pre}.k_proj": "k"})
    with pytest.raises(CheckpointError, match=r"q_proj\.weight'.*low-rank \(rank 8\)"):
        _load_fused(layer, {f"{pre}.q_proj.weight": torch.zeros(HEADS * HEAD, HIDDEN, dtype=DT)}, {f"{pre}.q_proj": "q"})


def test_nonfinite_factor(tp):
    name = "model.layers.0.mlp.down_proj"
    layer = RowParallelLinear(96, HIDDEN, bias=False, params_dtype=DT, quant_config=_config({name: 4}), prefix=name)
    a = torch.zeros(4, 96, dtype=DT)
    a[1, 3] = float("nan")
    with pytest.raises(CheckpointError, match=r"down_proj\.weight_a.*NaN"):
        layer.weight_a.weight_loader(layer.weight_a, a)


def test_unknown_architecture_mappings(tp):
    pre = "model.layers.0.self_attn"
    with pytest.raises(CheckpointError, match="unknown architecture mapping"):
        _qkv(_config({f"{pre}.q_proj": 8}, {"qkv_proj": ["q_proj", "kv_proj"]}), 2)

    class OddLinear(ColumnParallelLinear):
        pass
    with pytest.raises(UnsupportedModelError, match="OddLinear"):
        OddLinear(HIDDEN, 96, params_dtype=DT, quant_config=_config({"model.layers.0.odd": 4}), prefix="model.layers.0.odd")
    # a low-rank module that no Linear of the model claims fails at the LM head, naming it
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
    cfg = _config({f"{pre}.q_proj": 8, "model.layers.0.mlp.fc_in": 4})
    _qkv(cfg, 2)
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.0\.mlp\.fc_in.*no Linear"):
        cfg.get_quant_method(ParallelLMHead.__new__(ParallelLMHead), "lm_head")  # as ParallelLMHead.__init__ asks


def test_config_refuses_bad_ranks():
    with pytest.raises(CheckpointError, match="ranks"):
        ObdkVllmConfig.from_config({"quant_method": "obdk", "format_version": 1, "ranks": {"model.layers.0.x": 0}})
    with pytest.raises(CheckpointError, match="format_version"):
        ObdkVllmConfig.from_config({"quant_method": "obdk", "format_version": 99, "ranks": {}})


def test_register_is_idempotent():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    from obdk.vllm_plugin import register
    register()
    register()
    assert QUANTIZATION_METHODS.count("obdk") == 1
    assert get_quantization_config("obdk") is ObdkVllmConfig
