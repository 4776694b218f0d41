"""The vLLM tests run in the vLLM venv only (`make test-vllm`; `make test` runs it after the main suite).

vLLM pins an older transformers than obdk's main environment, so it lives in its own venv
(.ci/vllm_venv.sh). In an environment without vLLM (the main suite's `pytest tests`) this
directory is not collected at all: these tests are run by their own pytest invocation, never
reported as skipped.
"""
from __future__ import annotations

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("vllm") is not None else ["*.py"]
