"""Rank allocation under one parameter budget: uniform, global, zero-sum (ZS-SVD), BSI.

Pure: specs in (:class:`MatrixSpec`: shape, predicted losses or scores per component), ranks
out (:class:`Allocation`); nothing here runs a model. The budget is defined once in
:mod:`obdk.allocate.budget`: ``keep`` = fraction of the targeted Linear parameters kept; an
``m×n`` matrix costs ``m·n`` dense and ``r·(m+n)`` at rank ``r``; a rank at or above
``mn/(m+n)`` is never chosen. The scores of ``zero-sum`` and ``bsi`` come from
:mod:`obdk.scores`, ZS-SVD's correction from :mod:`obdk.correct`.
"""
from .bsi import allocate_bsi
from .budget import (
    Allocation,
    MatrixSpec,
    break_even,
    budget,
    max_factored_rank,
    params,
    round_rank,
    total_params,
    uniform_rank,
)
from .knapsack import Choices, allocate_global, solve_choices
from .uniform import allocate_uniform
from .zerosum import allocate_zero_sum

__all__ = [
    "Allocation", "MatrixSpec", "break_even", "budget", "max_factored_rank", "params", "round_rank",
    "total_params", "uniform_rank",
    "allocate_uniform", "allocate_global", "Choices", "solve_choices", "allocate_zero_sum", "allocate_bsi",
]

# Names that lived here before the scores, the whitened SVD and the corrections got rooms of their
# own; still importable from obdk.allocate.
_MOVED = {
    "WhitenedSVD": "obdk.decompose.whitened", "whitened_svd": "obdk.decompose.whitened",
    "ZSScores": "obdk.scores", "zero_sum_scores": "obdk.scores", "BSIScores": "obdk.scores",
    "hutchinson_diag": "obdk.scores", "bsi_importance": "obdk.scores", "bsi_scores": "obdk.scores",
    "summed_weight_grads": "obdk.calibrate.head", "next_token_loss": "obdk.calibrate.head",
    "ZSCorrection": "obdk.correct.steps", "zs_correct": "obdk.correct.steps", "gradient_step": "obdk.correct.steps",
}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'obdk.allocate' has no attribute {name!r}")
