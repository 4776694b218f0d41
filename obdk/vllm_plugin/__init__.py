"""obdk checkpoints served by vLLM, as stored: low-rank factors, dense members, any mix, tensor-parallel.

vLLM finds this through the ``vllm.general_plugins`` entry point ``obdk`` (``pyproject.toml``), which
calls :func:`register` in every vLLM process; a checkpoint whose ``config.json`` says
``quantization_config.quant_method: "obdk"`` then loads with ``vllm serve DIR`` or ``vllm.LLM(DIR)``,
no flag needed. ``import obdk`` never imports vLLM; only :mod:`obdk.vllm_plugin.method` does.

* :mod:`obdk.vllm_plugin.layout` — where each stored factor row lands in a vLLM Linear on one
  tensor-parallel rank (pure; no vLLM);
* :mod:`obdk.vllm_plugin.method` — ``ObdkVllmConfig`` (the quantization config vLLM builds from
  ``config.json``) and ``ObdkLinearMethod`` (parameters, loaders and ``apply`` of one Linear).

docs/serving.md says how to serve and what is tested and refused.
"""
from __future__ import annotations

__all__ = ["register"]


def register() -> None:
    """Register ``quant_method: "obdk"`` with vLLM (the ``vllm.general_plugins`` entry point).

    Idempotent (vLLM calls it in every process it starts, possibly more than once); imports vLLM.
    """
    from vllm.model_executor.layers.quantization import register_quantization_config

    from ..io import QUANT_METHOD
    from .method import ObdkVllmConfig

    # re-registering the same class under the same name only replaces the entry: idempotent
    register_quantization_config(QUANT_METHOD)(ObdkVllmConfig)
