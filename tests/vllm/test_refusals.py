"""Checkpoints obdk's vLLM plugin cannot serve fail at load, in ``vllm.LLM``, with one line naming the
module and the reason (the layer-level refusals are in test_layers.py).

* a corrupt rank (``quantization_config.ranks`` disagrees with the stored factors): refused while
  vLLM builds its config, before any engine process or model exists;
* an unknown architecture mapping (a low-rank module that no Linear of vLLM's model serves):
  refused while vLLM builds the model, before any weight loads.
"""
from __future__ import annotations

import gc
import json
import os
import shutil

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")

from vllm import LLM  # noqa: E402
from vllm.distributed import cleanup_dist_env_and_memory  # noqa: E402

from obdk.errors import CheckpointError, UnsupportedModelError  # noqa: E402


def _copy(src, dst):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    return cfg


def _one_line(err) -> str:
    """The error's own message (pydantic wraps config errors in a ValidationError carrying it)."""
    text = str(err.value)
    return next(line for line in text.splitlines() if "obdk" in line or "quantization_config" in line)


def _llm(path):
    return LLM(model=str(path), dtype="float32", enforce_eager=True, skip_tokenizer_init=True, max_model_len=128)


def test_corrupt_rank_fails_before_the_engine(checkpoints, tmp_path):
    bad = tmp_path / "corrupt"
    cfg = _copy(checkpoints["qwen2"], bad)
    name, r = sorted(cfg["quantization_config"]["ranks"].items())[0]
    cfg["quantization_config"]["ranks"][name] = r + 4
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises((CheckpointError, ValueError)) as err:
        _llm(bad)
    line = _one_line(err)
    assert f"{name}: quantization_config.ranks says rank {r + 4} but the stored factors are weight_a [{r}, " in line
    assert "corrupt rank" in line
    assert "Engine core" not in str(err.value)


def test_unknown_architecture_mapping_fails_at_load(checkpoints, tmp_path):
    """Factors stored for a module the architecture's vLLM model has no Linear for."""
    import torch
    from safetensors.torch import load_file, save_file
    bad = tmp_path / "unmapped"
    cfg = _copy(checkpoints["qwen2"], bad)
    files = sorted(bad.glob("*.safetensors"))
    assert len(files) == 1, files  # the tiny checkpoint is one shard
    tensors = load_file(files[0])
    lost = "model.layers.0.mlp.fc_extra"
    tensors[f"{lost}.weight_a"] = torch.zeros(4, cfg["hidden_size"])
    tensors[f"{lost}.weight_b"] = torch.zeros(cfg["hidden_size"], 4)
    save_file(tensors, files[0], metadata={"format": "pt"})
    cfg["quantization_config"]["ranks"][lost] = 4
    (bad / "config.json").write_text(json.dumps(cfg))
    try:
        with pytest.raises((UnsupportedModelError, RuntimeError)) as err:
            _llm(bad)
    finally:
        gc.collect()
        cleanup_dist_env_and_memory()
    line = _one_line(err)
    assert f"quantization_config.ranks names {lost}" in line and "no Linear of vLLM's model serves" in line, line
    assert "architecture mapping is unknown" in line
