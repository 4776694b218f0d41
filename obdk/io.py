"""Checkpoints: standard HF safetensors with plain tensors, never pickles.

A compressed module ``<name>`` is stored as ``<name>.weight_a`` [r, in] and
``<name>.weight_b`` [out, r] (plus ``<name>.bias``); ``config.json`` carries
``quantization_config`` with ``quant_method: "obdk"``, the format version, the
obdk version, the rank of every compressed module, the compression config and the
calibration fingerprint. Writes go to a temporary sibling directory that is
renamed into place only when complete, so a crash never leaves a directory that
loads. Loading rebuilds the model skeleton with parameters on the meta device,
swaps in ``LowRankLinear`` modules of the saved ranks, and assigns the tensors,
checking every name, shape and file on the way.
"""
from __future__ import annotations

from .errors import CheckpointError  # noqa: F401
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from . import __version__
from .config import FORMAT_VERSION
from .models import set_module
from .nn import LowRankLinear

log = logging.getLogger(__name__)

QUANT_METHOD = "obdk"
SHARD_BYTES = 4 << 30
REPORT_FILE = "obdk_report.json"


# CheckpointError lives in obdk.errors (one base, ObdkError); re-exported here.


# --------------------------------------------------------------------------- helpers




def lowrank_modules(model: nn.Module) -> dict[str, LowRankLinear]:
    """All ``LowRankLinear`` modules of ``model`` by full name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def _state_dict_for_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied duplicates dropped (first name wins) and tensors made contiguous."""
    sd = model.state_dict()
    seen: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    for k, t in sd.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.device.type != "meta" else None
        if key is not None and key in seen:
            continue  # tied weight (e.g. lm_head.weight ↔ embed_tokens.weight)
        if key is not None:
            seen[key] = k
        out[k] = t.detach().contiguous().cpu()
    return out


def _shards(sd: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    return shards


# --------------------------------------------------------------------------- save


def save_pretrained(model: nn.Module, save_dir: str | os.PathLike, *, tokenizer=None,
                    report: Any = None, fingerprint: Optional[dict] = None, config: Any = None,
                    max_shard_bytes: int = SHARD_BYTES) -> Path:
    """Write a compressed (or dense) HF causal LM to ``save_dir`` atomically.

    Files: ``model.safetensors`` (or shards + ``model.safetensors.index.json``),
    ``config.json`` with ``quantization_config`` (quant_method ``obdk``, format and
    obdk versions, ``ranks`` {module: r}, ``config``, ``calibration``),
    ``generation_config.json`` when present, the tokenizer, and ``obdk_report.json``.
    ``report``/``config`` default to the ones :func:`obdk.compress` attached to the
    model. An existing ``save_dir`` is replaced only once the new one is complete.
    Returns the directory path.
    """
    from safetensors.torch import save_file

    save_dir = Path(save_dir)
    report = report if report is not None else getattr(model, "_obdk_report", None)
    config = config if config is not None else getattr(model, "_obdk_config", None)
    if fingerprint is None and report is not None:
        fingerprint = getattr(report, "calibration", None)
    from .nn import PackedSlice
    if any(isinstance(m, PackedSlice) for m in model.modules()):
        raise ValueError("save_pretrained: the model has packed shared-input factors; call "
                         "obdk.nn.unpack_shared_inputs(model) before saving")
    ranks = {n: m.rank for n, m in lowrank_modules(model).items()}
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = save_dir.parent / f".{save_dir.name}.obdk-tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        sd = _state_dict_for_save(model)
        shards = _shards(sd, max_shard_bytes)
        meta = {"format": "pt", "obdk_format_version": str(FORMAT_VERSION)}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata=meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata=meta)
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in sd.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["quantization_config"] = {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "obdk_version": __version__,
            "ranks": ranks,
            "config": config.to_dict() if hasattr(config, "to_dict") else config,
            "calibration": fingerprint,
        }
        cfg["torch_dtype"] = str(next(iter(sd.values())).dtype).replace("torch.", "") if sd else None
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(str(tmp))
            except Exception as exc:  # a malformed generation config must not lose the model
                log.warning("generation_config not saved: %s", exc)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if report is not None:
            rep = report.to_dict() if hasattr(report, "to_dict") else report
            (tmp / REPORT_FILE).write_text(json.dumps(rep, indent=2, default=str))
        # Atomic replace: move any old directory aside, rename the new one in, then delete the old.
        old = None
        if save_dir.exists():
            old = save_dir.parent / f".{save_dir.name}.obdk-old-{uuid.uuid4().hex[:8]}"
            os.replace(save_dir, old)
        os.replace(tmp, save_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %d low-rank modules to %s", len(ranks), save_dir)
    return save_dir


# --------------------------------------------------------------------------- load


def read_quantization_config(path: str | os.PathLike) -> dict:
    """The ``quantization_config`` of an obdk checkpoint dir; errors name the file and field."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing (not an obdk checkpoint directory)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({exc})") from exc
    q = cfg.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{cfg_file}: quantization_config.quant_method is not {QUANT_METHOD!r}")
    ver = q.get("format_version")
    if not isinstance(ver, int) or ver < 1 or ver > FORMAT_VERSION:
        raise CheckpointError(f"{cfg_file}: quantization_config.format_version={ver!r} is unknown; "
                              f"this obdk {__version__} reads format versions 1..{FORMAT_VERSION}")
    if not isinstance(q.get("ranks"), dict):
        raise CheckpointError(f"{cfg_file}: quantization_config.ranks missing or not a mapping")
    return q


def is_obdk_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory whose config.json says ``quant_method: obdk``."""
    try:
        read_quantization_config(path)
        return True
    except CheckpointError:
        return False


def _read_tensors(path: Path) -> dict[str, tuple[Path, Any]]:
    """Map tensor name → (file, open handle) over the single file or the shard index."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: malformed shard index ({exc})") from exc
        files = sorted(set(weight_map.values()))
    else:
        files = ["model.safetensors"]
        weight_map = None
    handles: dict[str, tuple[Path, Any]] = {}
    for fname in files:
        f = path / fname
        if not f.is_file():
            raise CheckpointError(f"{f}: missing shard" + (f" (listed in {index.name})" if weight_map else ""))
        try:
            h = safe_open(str(f), framework="pt", device="cpu")
            keys = list(h.keys())
        except Exception as exc:
            raise CheckpointError(f"{f}: unreadable or truncated safetensors file ({exc})") from exc
        expected_size = _safetensors_data_end(f)
        if expected_size is not None and f.stat().st_size < expected_size:
            raise CheckpointError(f"{f}: truncated ({f.stat().st_size} bytes, header says {expected_size})")
        for k in keys:
            handles[k] = (f, h)
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(handles))
        if missing:
            raise CheckpointError(f"{index}: tensors {missing[:5]} listed but not found in their shard files")
    return handles


def _safetensors_data_end(f: Path) -> Optional[int]:
    """Byte size a safetensors file must have according to its header, or None if unreadable."""
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        return 8 + n + (max(ends) if ends else 0)
    except Exception:
        return None


def load_pretrained(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                    dtype: Optional[torch.dtype] = None, pack: Optional[bool] = None) -> nn.Module:
    """Load an obdk checkpoint written by :func:`save_pretrained`.

    The model is built from ``config.json`` with its parameters on the meta
    device (buffers such as rotary frequencies are real), each module listed in
    ``quantization_config.ranks`` becomes a ``LowRankLinear`` of that rank, and the
    safetensors tensors are assigned after checking names and shapes. ``dtype``
    casts floating tensors; ``device`` places the model. Returns the model in eval
    mode. ``pack`` packs the factors of modules that read one input (q/k/v, gate/up) so
    the input is read once (:func:`obdk.nn.pack_shared_inputs`); default: on CUDA only,
    where it saves launches and reads (on CPU it does not pay). Raises
    :class:`CheckpointError` naming the file and tensor at fault.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    q = read_quantization_config(path)
    cfg_dict = json.loads((path / "config.json").read_text())
    cfg_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg_dict) if "model_type" in cfg_dict else AutoConfig.from_pretrained(str(path))
    handles = _read_tensors(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    modules = dict(model.named_modules())
    for name, rank in q["ranks"].items():
        old = modules.get(name)
        if not isinstance(old, nn.Linear):
            raise CheckpointError(f"{path / 'config.json'}: ranks names module {name!r}, which is not an nn.Linear of {type(model).__name__}")
        a_key = f"{name}.weight_a"
        if a_key not in handles:
            raise CheckpointError(f"{path}: tensor {a_key!r} missing for low-rank module {name} (rank {rank})")
        with torch.device("meta"):
            new = LowRankLinear(old.in_features, old.out_features, int(rank), bias=old.bias is not None)
        set_module(model, name, new)
    expected = model.state_dict()
    tied = _tied_names(model)
    sd: dict[str, torch.Tensor] = {}
    for k, ref in expected.items():
        if k not in handles:
            if k in tied:
                continue
            raise CheckpointError(f"{path}: tensor {k!r} missing from the checkpoint")
        f, h = handles[k]
        try:
            t = h.get_tensor(k)
        except Exception as exc:
            raise CheckpointError(f"{f}: tensor {k!r} unreadable ({exc})") from exc
        if tuple(t.shape) != tuple(ref.shape):
            hint = ""
            if k.endswith((".weight_a", ".weight_b")):
                hint = f" (config.json says rank {q['ranks'].get(k.rsplit('.', 1)[0])})"
            raise CheckpointError(f"{f}: tensor {k!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}{hint}")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        sd[k] = t
    unexpected = sorted(set(handles) - set(expected))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors {unexpected[:5]} (not in {type(model).__name__} with the saved ranks)")
    model.load_state_dict(sd, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise CheckpointError(f"{path}: parameters {still_meta[:5]} were not found in the checkpoint")
    model.config.quantization_config = q
    model._obdk_quantization_config = q
    model = model.to(device).eval()
    if pack is None:
        pack = torch.device(device).type == "cuda"
    if pack:
        from .nn import pack_shared_inputs
        pack_shared_inputs(model)
    return model


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

