"""Rank allocation under one parameter budget: uniform, global, zero-sum (ZS-SVD), BSI."""
