"""obdk's vLLM plugin from obdk's main environment (no vLLM here): packaging and the pure layout.

The plugin itself is tested with vLLM in tests/vllm (its own venv, `make test-vllm`); here: the
entry point vLLM finds it by, that ``import obdk`` never imports vLLM, the row/column arithmetic
of obdk.vllm_plugin.layout, and the header check that refuses a corrupt rank.
"""
from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch

import obdk
from obdk.errors import CheckpointError
from obdk.vllm_plugin.layout import LinearLayout, check_factor_headers, column_segments, full_segments, members_for


def test_entry_point_and_no_vllm_on_import():
    eps = [e for e in entry_points(group="vllm.general_plugins") if e.name == "obdk"]
    assert [e.value for e in eps] == ["obdk.vllm_plugin:register"]
    code = "import sys, obdk, obdk.vllm_plugin, obdk.vllm_plugin.layout; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_qkv_segments_with_replicated_kv():
    # 4 q heads and 1 KV head of 16 over 2 ranks: q split, k/v replicated (both ranks keep all 16 rows)
    for rank in (0, 1):
        segs = column_segments([64, 16, 16], rank, 2, [1, 2, 2])
        assert [(s.start, s.size) for s in segs] == [(32 * rank, 32), (0, 16), (0, 16)]
    # 2 KV heads over 2 ranks: split
    assert [(s.start, s.size) for s in column_segments([64, 32, 32], 1, 2, [1, 1, 1])] == [(32, 32), (16, 16), (16, 16)]
    with pytest.raises(CheckpointError, match="does not split"):
        column_segments([30], 0, 4)


def test_layout_offsets_of_a_mixed_group():
    segs = column_segments([64, 32, 32], 1, 2)
    ranks = {"l.q_proj": 12, "l.v_proj": 8}
    lay = LinearLayout("l.qkv_proj", members_for("l.qkv_proj", ["l.q_proj", "l.k_proj", "l.v_proj"], 3, ranks), segs,
                       in_global=64, in_local=64)
    assert lay.lowrank == (0, 2) and lay.dense == (1,)
    assert lay.ranks == [12, 8] and lay.outs == [32, 16] and lay.a_rows == 20 and lay.b_numel == 12 * 32 + 8 * 16
    assert lay.dense_rows == 16 and not lay.in_order
    assert lay.pieces == (("lowrank", 0, 32), ("dense", 0, 16), ("lowrank", 32, 16))
    assert lay.a_offset(2) == 12 and lay.b_offset(2) == 12 * 32 and lay.dense_offset(1) == 0
    assert lay.row_slices(1) == [(16, 16)] and lay.member_for((2,)) == 2
    # one module fused on disk (Phi-3): its stored rows are q, k, v one after another
    fused = LinearLayout("l.qkv_proj", members_for("l.qkv_proj", ["l.qkv_proj"], 3, {"l.qkv_proj": 20}), segs,
                         in_global=64, in_local=64)
    assert fused.row_slices(0) == [(32, 32), (64 + 16, 16), (64 + 32 + 16, 16)] and fused.member_for(None) == 0
    with pytest.raises(CheckpointError, match="segments \\[0, 1\\]"):
        fused.member_for((0, 1))
    with pytest.raises(CheckpointError, match="unknown architecture mapping"):
        members_for("l.qkv_proj", ["l.q_proj", "l.kv_proj"], 3, ranks)
    row = LinearLayout("l.down_proj", members_for("l.down_proj", ["l.down_proj"], 1, {"l.down_proj": 4}),
                       full_segments([64]), in_global=96, in_local=48, in_start=48)
    assert row.in_order and row.a_rows == 4 and row.outs == [64]


def test_header_check_refuses_a_corrupt_rank(tmp_path):
    from obdk.io import tensor_index
    from obdk.testing import make_tiny_llama
    m = make_tiny_llama()
    obdk.compress(m, obdk.LowRankConfig(method="svd", keep=0.5, rank_multiple=4, targets=["*mlp.down_proj"]),
                  torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0)), progress=False)
    obdk.save_pretrained(m, tmp_path / "ck")
    import json
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    ranks = cfg["quantization_config"]["ranks"]
    check_factor_headers(str(tmp_path / "ck"), ranks, tensor_index(tmp_path / "ck"))
    name = sorted(ranks)[0]
    bad = dict(ranks, **{name: ranks[name] + 1})
    with pytest.raises(CheckpointError, match=f"{name}: quantization_config.ranks says rank {ranks[name] + 1}"):
        check_factor_headers(str(tmp_path / "ck"), bad, tensor_index(tmp_path / "ck"))
    with pytest.raises(CheckpointError, match="weight_a' is missing"):
        check_factor_headers(str(tmp_path / "ck"), {"model.layers.0.mlp.up_proj": 4}, tensor_index(tmp_path / "ck"))


def test_saved_config_names_the_causal_lm_class(tmp_path):
    """A model built from a config (or read from GGUF) has no ``architectures``; vLLM picks the model
    class by it and would serve the bare backbone, so obdk's writer records ``<X>ForCausalLM``."""
    import json

    from obdk.testing import make_tiny_qwen2
    m = make_tiny_qwen2()
    assert not m.config.architectures
    obdk.save_pretrained(m, tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    m.config.architectures = ["MyQwen2ForCausalLM"]  # a name the config gives is kept
    obdk.save_pretrained(m, tmp_path / "ck2")
    assert json.loads((tmp_path / "ck2" / "config.json").read_text())["architectures"] == ["MyQwen2ForCausalLM"]
