"""On-disk cache of calibration statistics, and resumable partial checkpoints.

Layout under ``cache_dir``::

    <key>/statistics.safetensors   finished, normalised statistics (see Statistics.save)
    <key>/statistics.json          their metadata (tokens, fisher, fingerprint, ...)
    <key>.partial-r<rank>of<world>.safetensors
                                   raw (un-normalised) accumulators of an unfinished run plus, in
                                   the safetensors header, a JSON with the windows already done

``<key>`` is :func:`cache_key` of everything that changes the result: the model fingerprint
(class, config, name/path, a checksum of a few weight tensors, the targeted modules), the
tokenizer hash when known, the data fingerprint (including a hash of the token ids and the
attention mask), the statistics set, the Fisher type, the statistics dtype and, for the true
Fisher, the sampling seed. The batch size and the number of ranks only change fp32 summation
order and are not part of it.

Every write is atomic: a finished entry is written to a temporary directory in ``cache_dir``
and renamed into place; a partial checkpoint is written to a temporary file and
``os.replace``-d. A reader therefore sees either nothing or a complete entry.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = ["StatsCache", "cache_key", "model_fingerprint", "data_fingerprint", "tensor_digest", "canonical_json"]

#: bump when the meaning of cached statistics changes
CACHE_VERSION = 1


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


def model_fingerprint(model: torch.nn.Module, module_names: Iterable[str] = (), *, samples: int = 4096) -> dict:
    """Identify a model cheaply: class, config, name/path, and a sampled checksum of its weights.

    ``hash`` covers the model alone; ``targets`` hashes the targeted ``module_names``
    (both enter :func:`cache_key`).

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
    weights = h.hexdigest()
    fp = {
        "class": type(model).__name__,
        "name_or_path": getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None),
        "config": cfg_dict,
        "weights": weights,
    }
    fp["hash"] = hashlib.sha256(canonical_json(fp).encode()).hexdigest()[:24]
    fp["targets"] = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
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


def cache_key(model_fp: dict, data_fp: dict, *, stats: Iterable[str], fisher: str, dtype: torch.dtype,
              seed: Optional[int]) -> str:
    """Hex key (32 chars) of everything the statistics depend on (see the module docstring)."""
    blob = {
        "v": CACHE_VERSION,
        "model": model_fp.get("hash", model_fp),
        "targets": model_fp.get("targets"),
        "tokenizer": data_fp.get("tokenizer_hash"),
        "data": data_fp,
        "stats": sorted(stats),
        "fisher": fisher,
        "dtype": str(dtype),
        "seed": seed,
    }
    return hashlib.sha256(canonical_json(blob).encode()).hexdigest()[:32]


def save_tensors_atomic(path: Path, tensors: dict[str, Tensor], meta: dict) -> None:
    """Write ``tensors`` to ``path`` (safetensors, ``meta`` as JSON in the header) atomically."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp,
                  metadata={"obdk": canonical_json(meta)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: Path, device: str | torch.device = "cpu") -> tuple[dict[str, Tensor], dict]:
    """Read a file written by :func:`save_tensors_atomic`: ``(tensors, meta)``."""
    from safetensors import safe_open
    tensors: dict[str, Tensor] = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        meta = json.loads((f.metadata() or {}).get("obdk", "{}"))
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    return tensors, meta


class StatsCache:
    """A directory of finished statistics and partial checkpoints, addressed by :func:`cache_key`."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def entry(self, key: str) -> Path:
        """Directory of the finished entry for ``key``."""
        return self.root / key

    def has(self, key: str) -> bool:
        """True when a complete entry for ``key`` exists."""
        d = self.entry(key)
        return (d / "statistics.safetensors").is_file() and (d / "statistics.json").is_file()

    def load(self, key: str, device: str | torch.device = "cpu"):
        """The cached :class:`~obdk.calibrate.stats.Statistics` for ``key``, or None on a miss."""
        if not self.has(key):
            return None
        from .stats import Statistics
        return Statistics.load(self.entry(key), device=device)

    def store(self, key: str, stats) -> Path:
        """Write ``stats`` under ``key`` atomically (temporary directory + rename). Returns the entry."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.entry(key)
        tmp = self.root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        try:
            stats.save(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not self.has(key):  # not a concurrent writer that won the race
                    raise
                log.info("statistics cache entry %s was written concurrently; keeping the existing one", final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    # ----------------------------------------------------------------- partial checkpoints

    def partial_path(self, key: str, rank: int = 0, world: int = 1) -> Path:
        """File of the partial checkpoint of ``rank`` out of ``world``."""
        return self.root / f"{key}.partial-r{rank}of{world}.safetensors"

    def save_partial(self, key: str, tensors: dict[str, Tensor], meta: dict, rank: int = 0, world: int = 1) -> Path:
        """Checkpoint raw accumulators ``tensors`` and ``meta`` (e.g. windows done) atomically."""
        path = self.partial_path(key, rank, world)
        save_tensors_atomic(path, tensors, meta)
        return path

    def load_partial(self, key: str, rank: int = 0, world: int = 1,
                     device: str | torch.device = "cpu") -> Optional[tuple[dict[str, Tensor], dict]]:
        """``(tensors, meta)`` of the partial checkpoint, or None when there is none."""
        path = self.partial_path(key, rank, world)
        if not path.is_file():
            return None
        return load_tensors(path, device)

    def drop_partial(self, key: str, rank: int = 0, world: int = 1) -> None:
        """Delete the partial checkpoint (after a completed run)."""
        self.partial_path(key, rank, world).unlink(missing_ok=True)
