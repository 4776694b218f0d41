"""Reference pipelines obdk is measured against, re-implemented from their published code.

* :mod:`.svd_llm` — SVD-LLM (AIoT-MLSys-Lab/SVD-LLM, ``SVDLLM.py``): hook Grams, fp64
  Cholesky, explicit inverse, full SVD.

These are libraries (tested in ``tests/test_bench_reference.py``); the scripts that time them
live one level up (``benchmarks/bench_decompose_latency.py``).
"""
