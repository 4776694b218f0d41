"""Lets ``transformers.AutoModelForCausalLM.from_pretrained(dir)`` load obdk checkpoints.

Registers a quantization config and an ``HfQuantizer`` for ``quant_method: "obdk"``
with transformers (where its version allows registration): before the weights
load, every module named in ``quantization_config.ranks`` is swapped for a
``LowRankLinear`` of that rank, so ``weight_a``/``weight_b`` load as plain
parameters. Called by ``import obdk``; failures only log (``obdk.load_pretrained``
always works).
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

log = logging.getLogger(__name__)
_registered = False


def register() -> bool:
    """Register obdk with transformers' quantizer registry; True on success (idempotent)."""
    global _registered
    if _registered:
        return True
    try:
        from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                                  register_quantization_config, register_quantizer)
        from transformers.quantizers.base import HfQuantizer
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except Exception as exc:  # pragma: no cover - very old/new transformers
        log.info("transformers quantizer registration unavailable (%s); use obdk.load_pretrained", exc)
        return False
    from .io import QUANT_METHOD

    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        _registered = True
        return True

    @register_quantization_config(QUANT_METHOD)
    class ObdkConfig(QuantizationConfigMixin):
        """quantization_config of an obdk checkpoint (ranks per module and provenance)."""

        def __init__(self, ranks=None, format_version=1, obdk_version=None, config=None, calibration=None, **kw):
            self.quant_method = QUANT_METHOD
            self.ranks = dict(ranks or {})
            self.format_version = format_version
            self.obdk_version = obdk_version
            self.config = config
            self.calibration = calibration
            for k, v in kw.items():
                setattr(self, k, v)

        def to_dict(self):
            return {k: v for k, v in self.__dict__.items()}

    @register_quantizer(QUANT_METHOD)
    class ObdkHfQuantizer(HfQuantizer):
        """Swaps Linears for ``LowRankLinear`` of the saved ranks before weights load."""

        requires_calibration = True

        def validate_environment(self, *args, **kwargs):
            from .config import FORMAT_VERSION
            ver = getattr(self.quantization_config, "format_version", None)
            if not isinstance(ver, int) or not 1 <= ver <= FORMAT_VERSION:
                raise ValueError(f"obdk checkpoint format_version={ver!r} is unknown (this obdk reads 1..{FORMAT_VERSION})")

        def _process_model_before_weight_loading(self, model, **kwargs):
            from .models import set_module
            from .nn import LowRankLinear
            modules = dict(model.named_modules())
            for name, rank in self.quantization_config.ranks.items():
                old = modules.get(name)
                if not isinstance(old, nn.Linear):
                    raise ValueError(f"obdk checkpoint names module {name!r}, which is not an nn.Linear of {type(model).__name__}")
                dev = old.weight.device
                with torch.device(dev):
                    new = LowRankLinear(old.in_features, old.out_features, int(rank), bias=old.bias is not None,
                                        dtype=old.weight.dtype)
                set_module(model, name, new)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            return model

        def is_serializable(self, *args, **kwargs):
            return True

        @property
        def is_trainable(self):
            return True

    _registered = True
    return True
