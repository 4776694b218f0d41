"""Rank allocation under one parameter budget: uniform, global, zero-sum (ZS-SVD), BSI.

The budget is defined once in :mod:`obdk.allocate.budget`: ``keep`` = fraction of
the targeted Linear parameters kept; an ``m×n`` matrix costs ``m·n`` dense and
``r·(m+n)`` at rank ``r``; a rank at or above ``mn/(m+n)`` is never chosen.
"""
from .bsi import BSIScores, allocate_bsi, bsi_importance, bsi_scores, hutchinson_diag
from .budget import (Allocation, MatrixSpec, break_even, budget, max_factored_rank, params, round_rank,
                     total_params, uniform_rank)
from .grads import next_token_loss, summed_weight_grads
from .knapsack import Choices, allocate_global, solve_choices
from .svd import WhitenedSVD, damped_cholesky, whitened_svd
from .uniform import allocate_uniform
from .zerosum import ZSCorrection, ZSScores, allocate_zero_sum, gradient_step, zero_sum_scores, zs_correct

__all__ = [
    "Allocation", "MatrixSpec", "break_even", "budget", "max_factored_rank", "params", "round_rank",
    "total_params", "uniform_rank",
    "allocate_uniform", "allocate_global", "Choices", "solve_choices",
    "WhitenedSVD", "whitened_svd", "damped_cholesky",
    "ZSScores", "zero_sum_scores", "allocate_zero_sum", "ZSCorrection", "zs_correct", "gradient_step",
    "summed_weight_grads", "next_token_loss",
    "BSIScores", "hutchinson_diag", "bsi_importance", "allocate_bsi", "bsi_scores",
]
