"""Load an obdk checkpoint, with every check.

:func:`load_pretrained` and the transformers quantizer (:mod:`obdk.hf_integration`) run
the same checks and raise :class:`~obdk.errors.CheckpointError` naming the file and
tensor: ``quantization_config`` (method, format version, every rank a positive
integer naming an ``nn.Linear``), the shard index and files (present, readable, not
truncated), tensor names (none missing, none unexpected), shapes, the dtype of every
factor (it must be the ``torch_dtype`` of ``config.json``; no silent cast), and the
finiteness of every tensor loaded (one reduction each, after any requested cast).
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from ..arguments import check_path
from ..errors import CheckpointError
from ..models import set_module
from ..nn import LowRankLinear
from .atomic import recover
from .format import (
    REPORT_FILE,
    TensorInfo,
    _dtype_name,
    _read_config_json,
    check_finite,
    check_quantization_config,
    factor_dtype,
    is_tombstone,
    tensor_index,
)


def install_lowrank(model: nn.Module, ranks: dict[str, int], where: str, **kw) -> nn.Module:
    """Replace each module named in ``ranks`` (an ``nn.Linear``) by a ``LowRankLinear`` of that rank."""
    modules = dict(model.named_modules())
    for name, rank in ranks.items():
        old = modules.get(name)
        if not isinstance(old, nn.Linear):
            what = "absent" if old is None else f"a {type(old).__name__}"
            raise CheckpointError(f"{where}: quantization_config.ranks names module {name!r}, which is {what}, "
                                  f"not an nn.Linear of {type(model).__name__}")
        new = LowRankLinear(old.in_features, old.out_features, rank, bias=old.bias is not None, **kw)
        set_module(model, name, new)
    return model


def check_tensors(path: Path, cfg: dict, q: dict, index: dict[str, TensorInfo],
                  expected: dict[str, torch.Tensor], tied: set[str]) -> None:
    """Names, shapes and factor dtypes of checkpoint ``path`` against the model's ``expected`` state dict
    (after :func:`install_lowrank`); headers only, nothing is read. Raises :class:`CheckpointError`."""
    ranks = q["ranks"]
    want = factor_dtype(cfg)
    cfg_file = path / "config.json"
    for name, rank in ranks.items():
        a_key = f"{name}.weight_a"
        if a_key not in index:
            raise CheckpointError(f"{path}: tensor {a_key!r} missing for low-rank module {name} (rank {rank})")
    for k, ref in expected.items():
        info = index.get(k)
        if info is None:
            if k in tied:
                continue
            raise CheckpointError(f"{path}: tensor {k!r} missing from the checkpoint")
        if tuple(info.shape) != tuple(ref.shape):
            hint = ""
            if k.endswith((".weight_a", ".weight_b")):
                hint = f" (config.json says rank {ranks.get(k.rsplit('.', 1)[0])})"
            raise CheckpointError(f"{info.file}: tensor {k!r} has shape {tuple(info.shape)}, expected "
                                  f"{tuple(ref.shape)}{hint}")
        module = k.rsplit(".", 1)[0]
        if module in ranks:
            got = info.dtype
            if not isinstance(got, torch.dtype) or not got.is_floating_point:
                raise CheckpointError(f"{info.file}: tensor {k!r} of low-rank module {module} is stored as {got}, "
                                      "not a floating dtype")
            if want is None:
                want = got  # no dtype recorded: every factor must share the first one's
            if got != want:
                raise CheckpointError(f"{info.file}: tensor {k!r} is stored as {_dtype_name(got)}, but {cfg_file} "
                                      f"records the factors as {_dtype_name(want)} (torch_dtype); the checkpoint "
                                      "was edited or mixed from two saves; re-save it (obdk does not cast "
                                      "factors silently)")
    unexpected = sorted(k for k, info in index.items() if k not in expected and not is_tombstone(k, info, ranks))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors {unexpected[:5]} (not in the model with the saved ranks)")


def load_pretrained(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                    dtype: Optional[torch.dtype] = None, pack: Optional[bool] = None) -> nn.Module:
    """Load an obdk checkpoint written by :func:`save_pretrained`.

    First :func:`recover` rolls back or cleans up an interrupted save of ``path``. The model
    is built from ``config.json`` with its parameters on the meta device (buffers such as
    rotary frequencies are real), each module listed in ``quantization_config.ranks``
    becomes a ``LowRankLinear`` of that rank, every check of the module docstring runs on the
    file headers (:func:`check_tensors`), and each tensor is read, checked finite, cast
    when ``dtype`` is given (floating tensors; checked finite again) and assigned.
    ``device`` places the model. Returns the model in eval mode. ``pack`` packs the factors of
    modules that read one input (q/k/v, gate/up) so the input is read once
    (:func:`obdk.nn.pack_shared_inputs`); default: on CUDA only, where it saves launches and
    reads (on CPU it does not pay). Raises :class:`CheckpointError` naming the file and
    tensor at fault.
    """
    check_path("load_pretrained", "path", path)
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    recover(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    cfg_dict = _read_config_json(path)
    q = check_quantization_config(cfg_dict.get("quantization_config"), str(path / "config.json"))
    cfg_dict = dict(cfg_dict)
    cfg_dict.pop("quantization_config", None)
    try:
        config = AutoConfig.for_model(**cfg_dict) if "model_type" in cfg_dict else AutoConfig.from_pretrained(str(path))
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise CheckpointError(f"{path / 'config.json'}: not a model config transformers can build ({exc})") from exc
    index = tensor_index(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    with torch.device("meta"):
        install_lowrank(model, q["ranks"], str(path / "config.json"))
    expected = model.state_dict()
    tied = _tied_names(model)
    check_tensors(path, cfg_dict, q, index, expected, tied)
    handles: dict[Path, Any] = {}
    sd: dict[str, torch.Tensor] = {}
    for k in expected:
        info = index.get(k)
        if info is None:
            continue  # tied (check_tensors let it through)
        try:
            h = handles.get(info.file)
            if h is None:
                h = handles[info.file] = safe_open(str(info.file), framework="pt", device="cpu")
            t = h.get_tensor(k)
        except Exception as exc:
            raise CheckpointError(f"{info.file}: tensor {k!r} unreadable ({exc})") from exc
        check_finite(k, t, info.file)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
            check_finite(k, t, info.file, cast=dtype)
        sd[k] = t
    model.load_state_dict(sd, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise CheckpointError(f"{path}: parameters {still_meta[:5]} were not found in the checkpoint")
    model.config.quantization_config = q
    model.config._name_or_path = str(path.resolve())
    model._obdk_quantization_config = q
    model = model.to(device).eval()
    if pack is None:
        pack = torch.device(device).type == "cuda"
    if pack:
        from ..nn import pack_shared_inputs
        pack_shared_inputs(model)
    return model


def has_obdk_tensors(path: str | os.PathLike) -> bool:
    """True when the safetensors of ``path`` hold obdk factors (``*.weight_a``/``*.weight_b``), whatever
    ``config.json`` says (e.g. an obdk checkpoint whose ``quantization_config`` was deleted)."""
    try:
        names = tensor_index(path)
    except CheckpointError:
        return False
    return any(k.endswith(".weight_a") for k in names) and any(k.endswith(".weight_b") for k in names)


def _tied_names(model: nn.Module) -> set[str]:
    """Parameter names that are tied to an earlier parameter (e.g. ``lm_head.weight``)."""
    names: set[str] = set()
    tie = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tie and hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        for n, m in model.named_modules():
            if m is model.get_output_embeddings():
                names.add(f"{n}.weight")
    return names


def update_report(path: str | os.PathLike, report: Any) -> None:
    """Rewrite ``obdk_report.json`` of a saved checkpoint (e.g. after an evaluation), atomically."""
    f = Path(path) / REPORT_FILE
    rep = report.to_dict() if hasattr(report, "to_dict") else report
    tmp = f.with_name(f".{f.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(rep, indent=2, default=str))
    os.replace(tmp, f)


def load_report(path: str | os.PathLike) -> Optional[dict]:
    """The ``obdk_report.json`` of a checkpoint directory, or None."""
    f = Path(path) / REPORT_FILE
    return json.loads(f.read_text()) if f.is_file() else None
