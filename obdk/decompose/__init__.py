"""Closed-form low-rank decompositions: SVD, SVD-LLM (input whitening), OBD (two-sided)."""
