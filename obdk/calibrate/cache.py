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
from typing import Iterable, Optional

import torch
from torch import Tensor

from .fingerprint import canonical_json, data_fingerprint, model_fingerprint, tensor_digest  # noqa: F401
from .statistics import Statistics

log = logging.getLogger(__name__)

__all__ = ["StatsCache", "cache_key"]

#: bump when the meaning of cached statistics changes
CACHE_VERSION = 1


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
