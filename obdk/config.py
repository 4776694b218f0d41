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
from typing import Any, Optional, Union

import torch

from .errors import ConfigError
from .registry import ALLOCATORS, HEALINGS, METHODS
from .registry import CORRECTIONS as REGISTERED_CORRECTIONS

FORMAT_VERSION = 1

#: whitening -> the calibration statistics its decomposition reads (the one table of it)
WHITENINGS: dict[str, tuple[str, ...]] = {
    "svd": (),
    "svd-llm": ("cx",),
    "asvd": ("cx",),  # only diag C_x
    "obd": ("cx", "cg"),
}

#: BSI's estimators of the Hessian diagonal in σ (:func:`obdk.scores.bsi_scores`)
BSI_CURVATURES = ("hutchinson", "blocked", "kfac", "fisher")
#: the names of the tables of :mod:`obdk.registry` (methods: presets; allocators; corrections, and ``none``)
CORRECTIONS = ("none",) + tuple(REGISTERED_CORRECTIONS)
ALLOCATIONS = tuple(ALLOCATORS)

#: fields :meth:`obdk.pipeline.Plan.apply` may change without recalibrating or redecomposing
APPLY_FIELDS = ("keep", "alloc", "floor", "rank_multiple", "correct", "probes", "eps", "bsi_order", "bsi_curvature",
                "bsi_terms", "probe_tol", "max_probes", "guard_windows", "heal", "heal_steps", "heal_lr", "heal_batch",
                "heal_holdout", "heal_seed", "heal_ce")
#: ``LowRankConfig.heal``'s values: none, and the tables of :data:`obdk.registry.HEALINGS`
HEAL_MODES = ("none",) + tuple(HEALINGS)
#: the Taylor terms BSI's importance may use (``LowRankConfig.bsi_terms``)
BSI_TERMS = ("first+second", "second")
DEFAULT_FLOOR = 0.2
DEFAULT_RANK_MULTIPLE = 8


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _patterns(value: Any, field_name: str) -> Optional[list[str]]:
    """``targets``/``ignore`` as a list of fnmatch patterns: a string is one pattern."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    try:
        items = list(value)
    except TypeError:
        raise ConfigError(f"LowRankConfig.{field_name}={value!r}: a pattern or a list of fnmatch patterns") from None
    bad = [x for x in items if not isinstance(x, str) or not x]
    if bad:
        raise ConfigError(f"LowRankConfig.{field_name}: every pattern must be a non-empty string, got {bad[0]!r}")
    return items


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
      projected in the metric the truncation minimises; :mod:`obdk.correct.steps`),
      ``zs+kfac`` (the two in turn, a fresh gradient for each), ``zs-guarded`` (ZS-SVD's step with its
      size t ∈ {0, ¼, ½, ¾, 1} chosen by the loss on the last ``guard_windows`` calibration windows, which
      the gradient then does not use; t = 0 is no correction; :mod:`obdk.correct.guarded`) or ``seq``
      (sequential refit on the compressed model's inputs, :mod:`obdk.correct.refit`).
    * ``guard_windows``: ``zs-guarded``'s held-out calibration windows (the last ones; default 8).
    * ``bsi_curvature``: BSI's Hessian diagonal in σ: ``hutchinson`` (the BSI paper's: all matrices
      perturbed at once), ``blocked`` (Hutchinson one matrix at a time), ``kfac``
      (``N (u_iᵀ C_g u_i)(x_iᵀ C_x x_i)`` from the statistics, no pass; needs ``C_g``) or ``fisher``
      (default: the exact empirical-Fisher diagonal, one pass); :func:`obdk.scores.bsi_scores`.
    * ``probes`` / ``eps``: BSI Hutchinson probes (per block; an int or ``"auto"``) and perturbation
      size; with ``"auto"`` each block is probed until the relative standard error of its estimate
      per matrix is at most ``probe_tol``, at most ``max_probes`` probes.
    * ``bsi_order``: ``spectral`` (default: BSI importances decide only the ranks; each matrix keeps
      its top components) or ``importance`` (BSI's rule: keep each matrix's most important bases, in
      any order; measured worse with every curvature, see the field's comment).
    * ``bsi_terms``: ``second`` (default: ``½h_iiσ_i²``, the first-order term of the dense model's
      calibration gradient left out) or ``first+second`` (the BSI paper's importance ``−g_iσ_i + ½h_iiσ_i²``).
      The BSI paper's recipe is ``bsi_curvature="hutchinson", bsi_order="importance", bsi_terms="first+second"``.
    * ``asvd_alpha``: ASVD activation-scaling exponent.
    * ``heal``: None/``none`` (no healing), ``layer`` (each decoder layer's factors trained on the compressed model's
      input to reproduce the dense layer's output; streams) or ``e2e`` (all factors on the KL divergence from the
      dense model's next-token distribution); :mod:`obdk.heal`. ``heal_steps`` (None: the mode's default; per
      decoder layer for ``layer``), ``heal_lr`` (Adam's step relative to each factor's RMS; None: the mode's
      default), ``heal_batch`` (windows a step), ``heal_holdout`` (the fraction of the healing windows held out for
      the early stop, the last ones), ``heal_seed`` (the window order), ``heal_ce`` (``e2e``: the weight of the
      data's next-token cross-entropy in its loss, ``(1 − w)·KL + w·CE``; 0 is pure distillation from the dense
      model, 1 plain fine-tuning on the healing text).
    """

    method: str = "obd"
    keep: float = 0.8
    alloc: Optional[str] = None
    whitening: Optional[str] = None
    targets: Optional[list[str]] = None
    ignore: list[str] = field(default_factory=list)
    rank_multiple: int = DEFAULT_RANK_MULTIPLE
    damping: float = 0.01
    floor: float = DEFAULT_FLOOR
    compute_dtype: str = "float64"
    solver: str = "eig"
    fisher: str = "empirical"
    correct: Optional[str] = None
    probes: Union[int, str] = 4
    eps: float = 1e-3
    # BSI's defaults (spectral order, exact empirical-Fisher curvature, second-order term) were chosen by
    # measurement on SmolLM2-135M: benchmarks/RESULTS.md, "BSI with an accurate curvature".
    bsi_order: str = "spectral"
    bsi_curvature: str = "fisher"
    bsi_terms: str = "second"
    probe_tol: float = 0.1
    max_probes: int = 64
    guard_windows: int = 8
    asvd_alpha: float = 0.5
    heal: Optional[str] = None
    heal_steps: Optional[int] = None
    heal_lr: Optional[float] = None
    heal_batch: int = 4
    heal_holdout: float = 0.125
    heal_seed: int = 0
    heal_ce: float = 0.5
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.targets = _patterns(self.targets, "targets")
        self.ignore = _patterns(self.ignore, "ignore") or []
        self.validate()

    def replace(self, **changes: Any) -> "LowRankConfig":
        """A copy with ``changes`` (field names), validated; an unknown field is a ``ConfigError``."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"LowRankConfig: unknown field(s) {unknown}")
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ derived
    @property
    def resolved_whitening(self) -> str:
        """The decomposition whitening actually used (``svd``, ``svd-llm``, ``asvd`` or ``obd``)."""
        return self.whitening or METHODS[self.method].whitening

    @property
    def resolved_alloc(self) -> str:
        """The allocation strategy actually used."""
        return self.alloc or METHODS[self.method].alloc

    @property
    def resolved_correct(self) -> Optional[str]:
        """The correction actually applied after truncation: None, ``zs``, ``kfac``, ``zs+kfac``, ``zs-guarded`` or ``seq``."""
        c = self.correct if self.correct is not None else METHODS[self.method].correct
        return None if c in (None, "none") else c

    @property
    def resolved_heal(self) -> Optional[str]:
        """The healing applied after the correction: None, ``layer`` or ``e2e``."""
        return None if self.heal in (None, "none") else self.heal

    @property
    def whitening_stats(self) -> tuple[str, ...]:
        """The statistics the whitening's decomposition reads (:data:`WHITENINGS`)."""
        return WHITENINGS[self.resolved_whitening]

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        """``compute_dtype`` as a ``torch.dtype``."""
        return torch.float64 if self.compute_dtype == "float64" else torch.float32

    @property
    def needed_stats(self) -> tuple[str, ...]:
        """Calibration statistics this config needs (subset of ``cx``, ``cg``, ``grad``)."""
        need = set(METHODS[self.method].stats) | set(self.whitening_stats)
        need.update(ALLOCATORS[self.resolved_alloc].stats(self))
        return tuple(s for s in ("cx", "cg", "grad") if s in need)

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise :class:`~obdk.errors.ConfigError` naming the field at fault."""
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"LowRankConfig.{name}={getattr(self, name)!r}: {why}")

        if self.method not in METHODS:
            raise bad("method", f"choose one of {', '.join(METHODS)}")
        if not (_is_number(self.keep) and 0.0 < float(self.keep) <= 1.0):
            raise bad("keep", "must be a number in (0, 1]: the fraction of the targeted Linear parameters kept")
        if self.alloc is not None and self.alloc not in ALLOCATIONS:
            raise bad("alloc", f"choose one of {', '.join(ALLOCATIONS)}")
        if self.whitening is not None and self.whitening not in WHITENINGS:
            raise bad("whitening", f"choose one of {', '.join(WHITENINGS)}")
        if not (_is_int(self.rank_multiple) and self.rank_multiple >= 1):
            raise bad("rank_multiple", "must be an integer ≥ 1")
        if not (_is_number(self.damping) and self.damping >= 0):
            raise bad("damping", "must be a number ≥ 0")
        if not (_is_number(self.floor) and 0.0 <= self.floor <= 1.0):
            raise bad("floor", "must be a number in [0, 1]")
        if self.compute_dtype not in ("float64", "float32"):
            raise bad("compute_dtype", "float64 or float32")
        if self.solver not in ("eig", "cholesky"):
            raise bad("solver", "eig or cholesky")
        if self.fisher not in ("empirical", "true"):
            raise bad("fisher", "empirical or true")
        if self.correct is not None and self.correct not in CORRECTIONS:
            raise bad("correct", f"None (the method's default) or one of {', '.join(CORRECTIONS)}")
        fix = REGISTERED_CORRECTIONS[self.resolved_correct] if self.resolved_correct is not None else None
        if fix is not None and fix.whitenings is not None and self.resolved_whitening not in fix.whitenings:
            raise ConfigError(f"LowRankConfig.correct={fix.name!r} {fix.whitening_why}: use whitening "
                              f"{' or '.join(fix.whitenings)}, not {self.resolved_whitening!r}")
        if self.bsi_order not in ("importance", "spectral"):
            raise bad("bsi_order", "importance or spectral")
        if self.bsi_terms not in BSI_TERMS:
            raise bad("bsi_terms", f"choose one of {', '.join(BSI_TERMS)}")
        if not (self.probes == "auto" or (_is_int(self.probes) and self.probes >= 1)):
            raise bad("probes", "must be an integer ≥ 1 or 'auto'")
        if self.bsi_curvature not in BSI_CURVATURES:
            raise bad("bsi_curvature", f"choose one of {', '.join(BSI_CURVATURES)}")
        if not (_is_number(self.probe_tol) and self.probe_tol > 0):
            raise bad("probe_tol", "must be a number > 0 (the relative standard error probes='auto' stops at)")
        if not (_is_int(self.max_probes) and self.max_probes >= 3):
            raise bad("max_probes", "must be an integer ≥ 3 (the cap of probes='auto')")
        if not (_is_int(self.guard_windows) and self.guard_windows >= 1):
            raise bad("guard_windows", "must be an integer ≥ 1 (the calibration windows correct='zs-guarded' holds out)")
        if not (_is_number(self.eps) and self.eps > 0):
            raise bad("eps", "must be a number > 0")
        if not (_is_number(self.asvd_alpha) and self.asvd_alpha >= 0):
            raise bad("asvd_alpha", "must be a number ≥ 0")
        if self.heal is not None and self.heal not in HEAL_MODES:
            raise bad("heal", f"None or one of {', '.join(HEAL_MODES)}")
        if self.heal_steps is not None and not (_is_int(self.heal_steps) and self.heal_steps >= 0):
            raise bad("heal_steps", "must be an integer ≥ 0 (None: the mode's default)")
        if self.heal_lr is not None and not (_is_number(self.heal_lr) and 0 < self.heal_lr < 1):
            raise bad("heal_lr", "must be a number in (0, 1): Adam's step relative to each factor's RMS")
        if not (_is_int(self.heal_batch) and self.heal_batch >= 1):
            raise bad("heal_batch", "must be an integer ≥ 1 (windows a healing step)")
        if not (_is_number(self.heal_holdout) and 0 <= self.heal_holdout < 1):
            raise bad("heal_holdout", "must be a number in [0, 1) (the fraction of the healing windows held out)")
        if not (_is_number(self.heal_ce) and 0 <= self.heal_ce <= 1):
            raise bad("heal_ce", "must be a number in [0, 1] (e2e: the cross-entropy's weight against the KL's)")
        if not _is_int(self.heal_seed):
            raise bad("heal_seed", "must be an integer")
        if not _is_int(self.version) or self.version > FORMAT_VERSION:
            raise bad("version", f"this obdk reads versions ≤ {FORMAT_VERSION}; upgrade obdk")

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LowRankConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`~obdk.errors.ConfigError` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"LowRankConfig: unknown field(s) {unknown}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "LowRankConfig":
        return cls.from_dict(json.loads(s))
