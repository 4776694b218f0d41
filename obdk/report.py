"""What a compression did: stage timing, per-module and whole-model reports, parameter counts.

:class:`StageTimer` records wall time and peak memory per named stage (``calibration``,
``factorisation`` with its sub-stages ``factorisation/roots`` …, ``allocation``, ``correction``,
…); :class:`CompressionReport` is what :func:`obdk.compress` returns and what a checkpoint's
``obdk_report.json`` holds.
"""
from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn

__all__ = ["Stage", "StageTimer", "ModuleReport", "CompressionReport", "count_params"]


# --------------------------------------------------------------------------- stage timing


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class Stage:
    """Wall time and peak memory of one pipeline stage."""
    seconds: float = 0.0
    peak_rss_mib: float = 0.0
    peak_cuda_mib: Optional[float] = None


class StageTimer:
    """Accumulates :class:`Stage` records by name (``with timer("calibration"): ...``)."""

    def __init__(self) -> None:
        self.stages: dict[str, Stage] = {}

    @contextmanager
    def __call__(self, name: str):
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize()
            st = self.stages.setdefault(name, Stage())
            st.seconds += time.perf_counter() - t0
            st.peak_rss_mib = max(st.peak_rss_mib, _peak_rss_mib())
            if cuda:
                st.peak_cuda_mib = max(st.peak_cuda_mib or 0.0, torch.cuda.max_memory_allocated() / 2**20)

    def to_dict(self) -> dict[str, dict]:
        return {k: asdict(v) for k, v in self.stages.items()}


# --------------------------------------------------------------------------- report


@dataclass
class ModuleReport:
    """One targeted Linear: its shape, chosen rank (None = kept dense) and costs."""
    name: str
    out_features: int
    in_features: int
    rank: Optional[int]
    params: int
    dense_params: int
    predicted_loss: float
    damping: dict
    seconds: float


@dataclass
class CompressionReport:
    """What :func:`compress` did: per module and totals, stage timings, provenance."""
    config: dict
    modules: list[ModuleReport]
    targeted_params_before: int
    targeted_params_after: int
    model_params_before: int
    model_params_after: int
    predicted_loss: float
    stages: dict[str, dict]
    calibration: Optional[dict] = None
    allocation: dict = field(default_factory=dict)
    measured: dict = field(default_factory=dict)
    coverage: dict = field(default_factory=dict)
    zeroshot: dict = field(default_factory=dict)
    healing: dict = field(default_factory=dict)

    def record_zeroshot(self, dense: dict, compressed: dict) -> None:
        """Store zero-shot accuracies: two :func:`obdk.zeroshot.zeroshot` results on the same tasks and documents
        (``{task: {"acc", "acc_norm", "dense_acc", "dense_acc_norm", "acc_stderr", "acc_norm_stderr", "n", "split"}}``)."""
        self.zeroshot = {t: {"acc": r["acc"], "acc_norm": r["acc_norm"], "dense_acc": dense.get(t, {}).get("acc"),
                             "dense_acc_norm": dense.get(t, {}).get("acc_norm"), "acc_stderr": r["acc_stderr"],
                             "acc_norm_stderr": r["acc_norm_stderr"], "n": r["n"], "split": r["split"]}
                         for t, r in compressed.items()}

    def record_measurement(self, dense: dict, compressed: dict) -> None:
        """Store a measured loss increase (two :func:`obdk.eval.perplexity` results on the same windows)."""
        self.measured = {
            "dataset": compressed.get("dataset"), "seqlen": compressed.get("seqlen"),
            "windows": compressed.get("windows"), "dense_ppl": dense["ppl"], "ppl": compressed["ppl"],
            "loss_increase": compressed["nll"] - dense["nll"], "predicted_loss_increase": self.predicted_loss,
        }

    @property
    def keep_actual(self) -> float:
        """Kept fraction of the targeted Linear parameters."""
        return self.targeted_params_after / max(1, self.targeted_params_before)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["keep_actual"] = self.keep_actual
        return d

    def summary(self) -> str:
        """A short human-readable summary (totals and stage times)."""
        c = self.config
        lines = [
            f"method={c['method']} alloc={c.get('alloc')} keep={c['keep']} → kept {self.keep_actual:.4f} of targeted Linear params",
            f"targeted params {self.targeted_params_before:,} → {self.targeted_params_after:,}; "
            f"model params {self.model_params_before:,} → {self.model_params_after:,}",
            f"modules: {sum(m.rank is not None for m in self.modules)} low-rank, {sum(m.rank is None for m in self.modules)} dense; "
            f"predicted loss increase {self.predicted_loss:.4f} nats",
            "stages: " + ", ".join(self._stage_text(k) for k in self.stages if "/" not in k),
        ]
        if self.coverage:
            lines.insert(2, self.coverage_text())
        return "\n".join(lines)

    def coverage_text(self) -> str:
        """One line: the fraction of the model the targets cover and the largest parameters they leave out."""
        cov = self.coverage
        kinds: dict[str, int] = {}
        for u in cov.get("untargeted", []):
            kinds[u["kind"]] = kinds.get(u["kind"], 0) + u["params"]
        total = max(1, cov.get("model_params", 1))
        left = ", ".join(f"{k} {v / total:.1%}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
        text = f"coverage: targets hold {cov.get('targeted_fraction', 0.0):.1%} of the model's parameters"
        text += f"; not targeted: {left}" if left else ""
        if "fused-experts" in kinds or "Conv1D" in kinds:
            text += (" (obdk compresses nn.Linear only: fused MoE experts and Conv1D layers stay dense, "
                     "so keep applies to the targets alone)")
        return text

    def _stage_text(self, name: str) -> str:
        """``factorisation 7.7s (roots 1.1s, …)``: a stage with its sub-stages (``name/sub``) in brackets."""
        subs = [(k.split("/", 1)[1], v["seconds"]) for k, v in self.stages.items() if k.startswith(name + "/")]
        text = f"{name} {self.stages[name]['seconds']:.1f}s"
        return text + (" (" + ", ".join(f"{k} {v:.1f}s" for k, v in subs) + ")" if subs else "")


def count_params(model: nn.Module) -> int:
    """Parameters of ``model``, each shared (tied) tensor counted once."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
