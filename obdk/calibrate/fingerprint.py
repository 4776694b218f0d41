"""Stable identities of what statistics depend on: the model, its targets, the tokenizer and the data.

Calibration statistics must never be reused across weights, tokenizers or data
(SVD-LLM and ZS-SVD key their caches without the tokenizer); these fingerprints enter the
cache key (:func:`obdk.calibrate.cache.cache_key`) and the checkpoint's calibration record.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from ..errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["canonical_json", "tensor_digest", "config_hash", "tokenizer_hash", "model_fingerprint",
           "data_fingerprint"]

#: fixed text whose ids capture what the vocabulary alone does not (BOS/EOS insertion, normaliser, merges)
_PROBE = "Hello world!\n\n = Valkyria Chronicles III = \n 1,294,336 tokens @-@ obdk"


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:16]


def config_hash(config: Any) -> str:
    """16-hex-char hash of a model config, ignoring dtype, paths, versions and private (``_``) keys."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    drop = {"transformers_version", "dtype", "torch_dtype", "name_or_path"}
    d = {k: v for k, v in d.items() if k not in drop and not k.startswith("_")}
    return _sha(d)


def tokenizer_hash(tokenizer: Any) -> str:
    """Stable 16-hex-char hash of a tokenizer: vocabulary (token -> id), special and added tokens,
    and the ids of a fixed probe string (with special tokens), so that tokenizers that share a
    vocabulary but differ in BOS insertion or normalisation hash differently."""
    if tokenizer is None:
        raise ConfigError("tokenizer_hash: tokenizer is None")
    vocab = tokenizer.get_vocab()
    special = {k: (list(map(str, v)) if isinstance(v, (list, tuple)) else str(v))
               for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items()}
    added = sorted((int(i), str(t)) for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items())
    probe = list(tokenizer(_PROBE, add_special_tokens=True)["input_ids"])
    payload = {
        "vocab": sorted(((str(t), int(i)) for t, i in vocab.items()), key=lambda ti: (ti[1], ti[0])),
        "special": special,
        "added": added,
        "probe": probe,
    }
    return _sha(payload)


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces; unknown objects via ``str``)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def tensor_digest(t: Tensor, *, max_values: int = 1 << 16) -> str:
    """SHA-256 of a tensor's shape, dtype and up to ``max_values`` evenly strided values.

    ``t``: any shape; integer tensors are hashed exactly (all values when small enough),
    float tensors through a float32 copy of the strided sample.
    """
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}".encode())
    flat = t.detach().reshape(-1)
    if flat.numel() > max_values:
        flat = flat[:: flat.numel() // max_values + 1]
    flat = flat.to("cpu")
    flat = flat.to(torch.int64) if not flat.is_floating_point() else flat.to(torch.float32)
    h.update(flat.contiguous().numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module, module_names: Iterable[str] = (), *, spec: Any = None,
                      path: Optional[str] = None, samples: int = 4096) -> dict:
    """Identify a model cheaply: class, config, name/path, and a sampled checksum of its weights.

    ``hash`` covers the model alone (class, name/path, config and weights; it enters
    :func:`obdk.calibrate.cache.cache_key`); ``targets`` hashes the targeted ``module_names``;
    ``config_sha256`` (:func:`config_hash`) ignores dtype, paths and versions, so it identifies
    the architecture across dtypes and copies. ``spec``/``path``: where the model came from
    (``path`` defaults to the config's ``_name_or_path``); ``file_size`` is added when ``path`` is
    a file.

    The checksum hashes, for every parameter, its name, shape, dtype and ``samples`` evenly
    strided values (:func:`tensor_digest`): any update that touches a sampled entry (a fine-tune,
    a merge, a re-quantisation) changes it, at a cost of a few ms for a 7B model. Returns a
    JSON-able dict.
    """
    cfg = getattr(model, "config", None)
    cfg_dict: dict = {}
    if cfg is not None and hasattr(cfg, "to_dict"):
        cfg_dict = {k: v for k, v in cfg.to_dict().items() if k not in ("transformers_version", "_name_or_path")}
    names = list(module_names)
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}:{tensor_digest(p, max_values=samples)};".encode())
    name_or_path = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None)
    fp = {
        "class": type(model).__name__,
        "name_or_path": name_or_path,
        "config": cfg_dict,
        "weights": h.hexdigest(),
    }
    fp["hash"] = hashlib.sha256(canonical_json(fp).encode()).hexdigest()[:24]
    fp["targets"] = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    first = next(model.parameters(), None)
    path = path if path is not None else name_or_path
    fp.update({
        "spec": os.fspath(spec) if spec is not None else None,
        "path": path,
        "model_type": getattr(cfg, "model_type", None),
        "architectures": list(getattr(cfg, "architectures", None) or [type(model).__name__]),
        "config_sha256": config_hash(cfg) if cfg is not None else None,
        "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
        "num_parameters": sum(p.numel() for p in model.parameters()),
    })
    if path and os.path.isfile(path):
        fp["file_size"] = os.path.getsize(path)
    return fp


def data_fingerprint(input_ids: Tensor, attention_mask: Optional[Tensor], data: Any = None) -> dict:
    """Fingerprint of calibration windows ``input_ids`` [N, T] (+ ``attention_mask`` [N, T]).

    Always hashes the token ids and the mask; adds the producer's own fingerprint
    (``data.fingerprint`` dict, ``data.fingerprint_key()``) and a tokenizer hash when the
    data object carries one.
    """
    fp: dict = {"windows": int(input_ids.shape[0]), "seqlen": int(input_ids.shape[1]),
                "ids": tensor_digest(input_ids, max_values=1 << 40)}
    if attention_mask is not None:
        fp["mask"] = tensor_digest(attention_mask, max_values=1 << 40)
    if data is not None:
        src = getattr(data, "fingerprint", None)
        if isinstance(src, dict):
            fp["source"] = src
        key = getattr(data, "fingerprint_key", None)
        if callable(key):
            try:
                fp["source_key"] = str(key())
            except Exception as exc:  # a producer bug must not stop calibration
                log.warning("data.fingerprint_key() failed (%s); the cache key uses the token hash only", exc)
        tok = getattr(data, "tokenizer_hash", None)
        if tok is None and isinstance(src, dict):
            tok = next((v for k, v in src.items() if "tokenizer" in k.lower() and isinstance(v, str)), None)
        if tok is not None:
            fp["tokenizer_hash"] = str(tok)
    return fp
