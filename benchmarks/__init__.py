"""obdk's benchmarks, as a package: run a script with ``python -m benchmarks.<script> ...``.

``benchmarks.core`` holds what the scripts share (provenance, timing, resumable CSV rows,
model loaders, evaluation sets, the keep sweep); ``benchmarks.baselines`` the reference
pipelines obdk is measured against; ``benchmarks.plot_results`` draws every figure.
See ``benchmarks/README.md``.
"""
