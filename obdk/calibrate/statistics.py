"""The :class:`Statistics` container of a calibration pass and its disk format (safetensors + JSON meta)."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ..errors import CheckpointError, ConfigError, DataError, MissingFileError, NotCollectedError

log = logging.getLogger(__name__)

__all__ = ["Statistics", "STATS"]

#: the statistics ``calibrate`` can collect
STATS = ("cx", "cg", "grad")
_FORMAT = "obdk-statistics"
_FORMAT_VERSION = 1
_FISHER = ("empirical", "true")


@dataclass
class Statistics:
    """Calibration statistics of the targeted Linears of one model.

    * ``cx``: group key → ``C_x`` [n, n], one per unique input, normalised by ``tokens``;
    * ``cg``: module name → ``C_g`` [m, m], normalised by ``loss_tokens``;
    * ``grad``: module name → ``∂L/∂W`` [m, n] of the summed loss (not normalised);
    * ``input_key``: module name → its group key in ``cx``;
    * ``tokens`` (N_x): non-padding tokens seen; ``loss_tokens`` (N_ℓ): positions with a loss;
      ``windows``: calibration windows;
    * ``fisher``: ``"empirical"`` or ``"true"``; ``dtype``: dtype of the statistics;
    * ``fingerprint``: data fingerprint, model hash, stats set, dtype, fisher, seed (JSON-able).
    """

    cx: dict[str, Tensor] = field(default_factory=dict)
    cg: dict[str, Tensor] = field(default_factory=dict)
    grad: dict[str, Tensor] = field(default_factory=dict)
    input_key: dict[str, str] = field(default_factory=dict)
    tokens: int = 0
    loss_tokens: int = 0
    windows: int = 0
    fisher: str = "empirical"
    dtype: torch.dtype = torch.float32
    fingerprint: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ access

    @property
    def modules(self) -> list[str]:
        """Names of the Linears covered, in forward order."""
        return list(self.input_key)

    @property
    def stats(self) -> tuple[str, ...]:
        """Which statistics are present (subset of ``("cx", "cg", "grad")``)."""
        return tuple(s for s in STATS if getattr(self, s))

    def cx_for(self, module_name: str) -> Tensor:
        """``C_x`` [n, n] of the input read by ``module_name`` (shared within its group)."""
        key = self.input_key.get(module_name)
        if key is None:
            raise NotCollectedError(f"Statistics: no Linear named {module_name!r} (have {len(self.input_key)}, "
                           f"e.g. {self.modules[:3]})")
        if key not in self.cx:
            raise NotCollectedError(f"Statistics: C_x of {module_name!r} (input {key!r}) was not collected "
                           f"(stats present: {self.stats})")
        return self.cx[key]

    def nbytes(self) -> int:
        """Bytes held by all tensors."""
        return sum(t.numel() * t.element_size() for d in (self.cx, self.cg, self.grad) for t in d.values())

    def to(self, device: str | torch.device) -> "Statistics":
        """A copy with every tensor on ``device`` (tensors already there are shared, not copied)."""
        mv = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return Statistics(mv(self.cx), mv(self.cg), mv(self.grad), dict(self.input_key), self.tokens,
                          self.loss_tokens, self.windows, self.fisher, self.dtype, dict(self.fingerprint))

    @classmethod
    def merge(cls, parts: Sequence["Statistics"]) -> "Statistics":
        """Join statistics of disjoint module slices computed on the same data (e.g. the per-layer parts of a streamed pass, or passes with disjoint ``groups=``)."""
        if not parts:
            raise ConfigError("Statistics.merge: nothing to merge")
        first = parts[0]
        out = Statistics(tokens=first.tokens, loss_tokens=first.loss_tokens, windows=first.windows,
                         fisher=first.fisher, dtype=first.dtype, fingerprint=dict(first.fingerprint))
        for i, p in enumerate(parts):
            same = (p.tokens, p.loss_tokens, p.fisher, p.dtype, p.fingerprint.get("data"))
            ref = (first.tokens, first.loss_tokens, first.fisher, first.dtype, first.fingerprint.get("data"))
            if same != ref:
                raise DataError(f"Statistics.merge: part {i} was computed on other data or settings "
                                 f"(tokens/loss_tokens/fisher/dtype/data {same[:4]} vs {ref[:4]})")
            for kind in STATS:
                dst, src = getattr(out, kind), getattr(p, kind)
                clash = dst.keys() & src.keys()
                if clash:
                    raise DataError(f"Statistics.merge: part {i} repeats {kind} of {sorted(clash)[:3]}")
                dst.update(src)
            out.input_key.update(p.input_key)
        return out

    # ------------------------------------------------------------------ disk

    def _meta(self) -> dict:
        return {"format": _FORMAT, "version": _FORMAT_VERSION, "tokens": self.tokens,
                "loss_tokens": self.loss_tokens, "windows": self.windows, "fisher": self.fisher,
                "dtype": str(self.dtype).replace("torch.", ""), "input_key": self.input_key,
                "stats": list(self.stats), "fingerprint": self.fingerprint}

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/statistics.safetensors`` (tensors ``cx/<key>``, ``cg/<name>``,
        ``grad/<name>``) and ``path/statistics.json`` (everything else). Returns ``path``."""
        from safetensors.torch import save_file
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {f"{kind}/{k}": v.detach().to("cpu").contiguous()
                   for kind in STATS for k, v in getattr(self, kind).items()}
        tmp = path / ".statistics.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"format": _FORMAT})
        os.replace(tmp, path / "statistics.safetensors")
        tmpj = path / ".statistics.json.tmp"
        tmpj.write_text(json.dumps(self._meta(), indent=1, default=str))  # keeps forward order
        os.replace(tmpj, path / "statistics.json")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "Statistics":
        """Read statistics written by :meth:`save` onto ``device``."""
        from safetensors import safe_open
        path = Path(path)
        meta_file, tens_file = path / "statistics.json", path / "statistics.safetensors"
        if not meta_file.is_file() or not tens_file.is_file():
            raise MissingFileError(f"Statistics.load: {path} has no statistics.json/statistics.safetensors")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != _FORMAT or int(meta.get("version", 0)) > _FORMAT_VERSION:
            raise CheckpointError(f"Statistics.load: {meta_file} is not {_FORMAT} version <= {_FORMAT_VERSION} "
                             f"(format={meta.get('format')!r}, version={meta.get('version')!r})")
        st = Statistics(input_key=dict(meta["input_key"]), tokens=int(meta["tokens"]),
                        loss_tokens=int(meta["loss_tokens"]), windows=int(meta["windows"]),
                        fisher=meta["fisher"], dtype=getattr(torch, meta["dtype"]),
                        fingerprint=meta.get("fingerprint", {}))
        with safe_open(str(tens_file), framework="pt", device=str(device)) as f:
            for k in f.keys():
                kind, name = k.split("/", 1)
                getattr(st, kind)[name] = f.get_tensor(k)
        return st
