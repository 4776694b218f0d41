"""Closed-form low-rank decompositions: SVD, SVD-LLM (input whitening), OBD (two-sided).

* :func:`factorize` — optimal rank-r factors ``b`` [m, r], ``a`` [r, n] of a weight [m, n]
  under the method's K-FAC loss (or the dense weight at break-even).
* :func:`spectrum` — the full decomposition, computed once; :meth:`Spectrum.truncate` gives
  any rank by slicing and :meth:`Spectrum.tail_loss` its predicted loss increase.
* :func:`spectra` — the same for a batch of same-shaped weights, one batched call per step.
* :func:`asvd_spectrum` — ASVD's activation-scaled SVD; :func:`whitened_svd` / :class:`WhitenedSVD`
  — the input-whitened SVD ZS-SVD and BSI score components in; :func:`spectrum_as_svd` — any
  spectrum as ``Σ σ_i u_i x_iᵀ``.
* :func:`break_even_rank`, :func:`damp_covariance`, :func:`kfac_loss` — helpers.

The only damped Cholesky and the damping rule live in :mod:`obdk.decompose.roots`;
:mod:`obdk.decompose.schedule` runs a model's decompositions (batched on GPU, side by side on CPU).
"""
from .asvd import asvd_spectrum
from .closed_form import (
                          METHODS,
                          SOLVERS,
                          Factorization,
                          Spectrum,
                          break_even_rank,
                          damp_covariance,
                          factorize,
                          kfac_loss,
                          spectra,
                          spectrum,
)
from .whitened import WhitenedSVD, spectrum_as_svd, whitened_svd

__all__ = ["asvd_spectrum", "WhitenedSVD", "spectrum_as_svd", "whitened_svd", "METHODS", "SOLVERS", "Factorization", "Spectrum", "break_even_rank", "damp_covariance", "factorize",
           "kfac_loss", "spectra", "spectrum"]
