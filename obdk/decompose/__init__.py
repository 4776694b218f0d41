"""Closed-form low-rank decompositions: SVD, SVD-LLM (input whitening), OBD (two-sided).

* :func:`factorize` — optimal rank-r factors ``b`` [m, r], ``a`` [r, n] of a weight [m, n]
  under the method's K-FAC loss (or the dense weight at break-even).
* :func:`spectrum` — the full decomposition, computed once; :meth:`Spectrum.truncate` gives
  any rank by slicing and :meth:`Spectrum.tail_loss` its predicted loss increase.
* :func:`spectra` — the same for a batch of same-shaped weights, one batched call per step.
* :func:`break_even_rank`, :func:`damp_covariance`, :func:`kfac_loss` — helpers.
"""
from .closed_form import (METHODS, SOLVERS, Factorization, Spectrum, break_even_rank, damp_covariance, factorize,
                          kfac_loss, spectra, spectrum)

__all__ = ["METHODS", "SOLVERS", "Factorization", "Spectrum", "break_even_rank", "damp_covariance", "factorize",
           "kfac_loss", "spectra", "spectrum"]
