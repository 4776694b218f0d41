"""``LowRankConfig``: everything that decides how a model is compressed.

A versioned dataclass with a JSON round trip, so it can live in a checkpoint's
``config.json`` (``quantization_config.config``). ``keep`` is defined here once:
the fraction of the *targeted* Linear parameters kept (a matrix m×n kept dense
counts m·n, at rank r it counts r·(m+n)). By default the targets are every
``nn.Linear`` inside the decoder layers; embeddings and a tied ``lm_head`` stay
untouched.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

FORMAT_VERSION = 1

#: method -> (whitening used to decompose, default allocation, statistics needed, default correction)
#: ``obd``'s default (global allocation + the ZS step and the K-FAC step) is the best combination
#: measured on SmolLM2-135M (benchmarks/results/allocation_smollm2.csv).
METHODS: dict[str, tuple[str, str, tuple[str, ...], Optional[str]]] = {
    "svd": ("svd", "uniform", (), None),
    "svd-llm": ("svd-llm", "uniform", ("cx",), None),
    "asvd": ("asvd", "uniform", ("cx",), None),
    "obd": ("obd", "global", ("cx", "cg"), "zs+kfac"),
    "zs-svd": ("svd-llm", "zero-sum", ("cx", "grad"), None),
    "bsi": ("svd-llm", "bsi", ("cx", "grad"), None),
}
CORRECTIONS = ("none", "zs", "kfac", "zs+kfac", "seq")
ALLOCATIONS = ("uniform", "global", "zero-sum", "bsi")


@dataclass
class LowRankConfig:
    """How to compress. Fields:

    * ``method``: ``svd`` | ``svd-llm`` | ``asvd`` | ``obd`` | ``zs-svd`` | ``bsi`` (presets: whitening + allocation).
    * ``keep``: fraction of targeted Linear parameters kept, in (0, 1].
    * ``alloc``: ``uniform`` | ``global`` | ``zero-sum`` | ``bsi``; None → the method's default.
    * ``whitening``: override the method's whitening (``svd``, ``svd-llm``, ``obd``).
    * ``targets`` / ``ignore``: fnmatch patterns over full module names (None targets all decoder Linears).
    * ``rank_multiple``: ranks are rounded to a multiple of this.
    * ``damping``: initial relative damping α (C ← C + α·mean(diag C)·I), escalated on failure.
    * ``floor``: ``global`` allocation's per-matrix floor as a fraction of the uniform rank.
    * ``compute_dtype``: ``float64`` or ``float32`` for the decompositions.
    * ``solver``: ``eig`` (exact eigen form) or ``cholesky``.
    * ``fisher``: ``empirical`` or ``true`` (labels sampled from the model).
    * ``correct``: None (the method's default: ``zs+kfac`` for ``obd``, none otherwise), ``none``,
      ``zs`` (ZS-SVD's one-step projected-gradient correction, then re-truncation in the same
      whitening), ``kfac`` (the same step along the K-FAC natural gradient ``C_g⁻¹ G C_x⁻¹``,
      projected in the metric the truncation minimises; :meth:`Plan._gradient_correct`),
      ``zs+kfac`` (the two in turn, a fresh gradient for each) or ``seq`` (sequential refit on the compressed model's inputs, :mod:`obdk.refit`).
    * ``probes`` / ``eps``: BSI Hutchinson probes and perturbation size.
    * ``bsi_order``: ``importance`` (BSI's rule: keep each matrix's most important bases, in any
      order) or ``spectral`` (BSI importances decide only the ranks; each matrix keeps its top
      components).
    * ``asvd_alpha``: ASVD activation-scaling exponent.
    """

    method: str = "obd"
    keep: float = 0.8
    alloc: Optional[str] = None
    whitening: Optional[str] = None
    targets: Optional[list[str]] = None
    ignore: list[str] = field(default_factory=list)
    rank_multiple: int = 8
    damping: float = 0.01
    floor: float = 0.2
    compute_dtype: str = "float64"
    solver: str = "eig"
    fisher: str = "empirical"
    correct: Optional[str] = None
    probes: int = 4
    eps: float = 1e-3
    bsi_order: str = "importance"
    asvd_alpha: float = 0.5
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def resolved_whitening(self) -> str:
        """The decomposition whitening actually used (``svd``, ``svd-llm``, ``asvd`` or ``obd``)."""
        return self.whitening or METHODS[self.method][0]

    @property
    def resolved_alloc(self) -> str:
        """The allocation strategy actually used."""
        return self.alloc or METHODS[self.method][1]

    @property
    def resolved_correct(self) -> Optional[str]:
        """The correction actually applied after truncation: None, ``zs``, ``kfac``, ``zs+kfac`` or ``seq``."""
        c = self.correct if self.correct is not None else METHODS[self.method][3]
        return None if c in (None, "none") else c

    @property
    def needed_stats(self) -> tuple[str, ...]:
        """Calibration statistics this config needs (subset of ``cx``, ``cg``, ``grad``)."""
        need = set(METHODS[self.method][2])
        w = self.resolved_whitening
        if w in ("svd-llm", "obd", "asvd"):
            need.add("cx")
        if w == "obd":
            need.add("cg")
        if self.resolved_alloc in ("zero-sum", "bsi"):
            need.update(("cx", "grad"))  # (the ZS correction takes its own gradient at the truncation)
        return tuple(s for s in ("cx", "cg", "grad") if s in need)

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ``ValueError`` naming the field at fault."""
        if self.method not in METHODS:
            raise ValueError(f"LowRankConfig.method={self.method!r}: choose one of {', '.join(METHODS)}")
        if not (isinstance(self.keep, (int, float)) and 0.0 < float(self.keep) <= 1.0):
            raise ValueError(f"LowRankConfig.keep={self.keep!r}: must be a fraction in (0, 1] of the targeted Linear parameters kept")
        if self.alloc is not None and self.alloc not in ALLOCATIONS:
            raise ValueError(f"LowRankConfig.alloc={self.alloc!r}: choose one of {', '.join(ALLOCATIONS)}")
        if self.whitening is not None and self.whitening not in ("svd", "svd-llm", "obd", "asvd"):
            raise ValueError(f"LowRankConfig.whitening={self.whitening!r}: choose svd, svd-llm, asvd or obd")
        if int(self.rank_multiple) < 1:
            raise ValueError(f"LowRankConfig.rank_multiple={self.rank_multiple!r}: must be ≥ 1")
        if not (self.damping >= 0):
            raise ValueError(f"LowRankConfig.damping={self.damping!r}: must be ≥ 0")
        if not (0.0 <= self.floor <= 1.0):
            raise ValueError(f"LowRankConfig.floor={self.floor!r}: must be in [0, 1]")
        if self.compute_dtype not in ("float64", "float32"):
            raise ValueError(f"LowRankConfig.compute_dtype={self.compute_dtype!r}: float64 or float32")
        if self.solver not in ("eig", "cholesky"):
            raise ValueError(f"LowRankConfig.solver={self.solver!r}: eig or cholesky")
        if self.fisher not in ("empirical", "true"):
            raise ValueError(f"LowRankConfig.fisher={self.fisher!r}: empirical or true")
        if self.correct is not None and self.correct not in CORRECTIONS:
            raise ValueError(f"LowRankConfig.correct={self.correct!r}: None (the method's default) or one of "
                             f"{', '.join(CORRECTIONS)}")
        if self.resolved_correct == "seq" and self.resolved_whitening not in ("svd-llm", "obd"):
            raise ValueError(f"LowRankConfig.correct='seq' refits under input whitening: use whitening "
                             f"svd-llm or obd, not {self.resolved_whitening!r}")
        if self.bsi_order not in ("importance", "spectral"):
            raise ValueError(f"LowRankConfig.bsi_order={self.bsi_order!r}: importance or spectral")
        if int(self.probes) < 1 or not self.eps > 0:
            raise ValueError(f"LowRankConfig.probes/eps={self.probes}/{self.eps}: need probes ≥ 1 and eps > 0")
        if self.version > FORMAT_VERSION:
            raise ValueError(f"LowRankConfig.version={self.version}: this obdk reads versions ≤ {FORMAT_VERSION}; upgrade obdk")

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LowRankConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"LowRankConfig: unknown field(s) {unknown}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "LowRankConfig":
        return cls.from_dict(json.loads(s))
