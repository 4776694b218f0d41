"""Lets ``transformers.AutoModelForCausalLM.from_pretrained(dir)`` load obdk checkpoints.

Registers a quantization config and an ``HfQuantizer`` for ``quant_method: "obdk"``
with transformers (where its version allows registration): before the weights
load, every module named in ``quantization_config.ranks`` is swapped for a
``LowRankLinear`` of that rank, so ``weight_a``/``weight_b`` load as plain
parameters. Called by ``import obdk``; failures only log (``obdk.load_pretrained``
always works).

The quantizer runs the checks of :func:`obdk.load_pretrained` (:mod:`obdk.io`): before the
weights load, the ranks and every tensor header (names, shapes, factor dtypes) against the
model; after, the finiteness of every tensor. Errors are :class:`obdk.errors.CheckpointError`
naming the file and tensor. Without ``import obdk``, transformers does not know
``quant_method: "obdk"`` (it warns and skips it); the empty ``<module>.weight`` tombstones an
obdk checkpoint stores then fail the load with a size mismatch instead of random layers.
"""
from __future__ import annotations

import logging
import re

log = logging.getLogger(__name__)
_registered = False


def register() -> bool:
    """Register obdk with transformers' quantizer registry; True on success (idempotent)."""
    global _registered
    if _registered:
        return True
    try:
        from transformers.quantizers.auto import (
            AUTO_QUANTIZER_MAPPING,
            register_quantization_config,
            register_quantizer,
        )
        from transformers.quantizers.base import HfQuantizer
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except Exception as exc:  # pragma: no cover - very old/new transformers
        log.info("transformers quantizer registration unavailable (%s); use obdk.load_pretrained", exc)
        return False
    from .io.format import QUANT_METHOD

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
        """Swaps Linears for ``LowRankLinear`` of the saved ranks before weights load, and runs the checks
        of :func:`obdk.load_pretrained` (headers before loading, finiteness after)."""

        requires_calibration = True

        def validate_environment(self, *args, **kwargs):
            from .io.format import check_quantization_config
            check_quantization_config(self.quantization_config.to_dict(), "config.json")

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            import os
            from pathlib import Path

            from .errors import CheckpointError
            from .io.format import _read_config_json, tensor_index
            from .io.load import _tied_names, check_tensors, install_lowrank
            q = self.quantization_config.to_dict()
            ckpt = Path(os.path.dirname(checkpoint_files[0])) if checkpoint_files else None
            where = str(ckpt / "config.json") if ckpt is not None else "config.json"
            first = next(model.parameters(), None)
            kw = {"device": first.device, "dtype": first.dtype} if first is not None else {}
            install_lowrank(model, q["ranks"], where, **kw)
            self._obdk_index = {}
            if ckpt is not None:
                if not all(str(f).endswith(".safetensors") for f in checkpoint_files):
                    raise CheckpointError(f"{ckpt}: an obdk checkpoint stores safetensors files only, found "
                                          f"{[os.path.basename(f) for f in checkpoint_files][:3]}")
                self._obdk_index = tensor_index(ckpt)
                check_tensors(ckpt, _read_config_json(ckpt), q, self._obdk_index, model.state_dict(),
                              _tied_names(model))
            # the empty ``<module>.weight`` tombstones are expected: no "unexpected key" warning for them
            tomb = {re.escape(f"{n}.weight") + "$" for n in q["ranks"]}
            model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | tomb
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            from .io.format import check_finite
            seen = set()
            for name, t in model.state_dict().items():
                if t.device.type == "meta":
                    from .errors import CheckpointError
                    raise CheckpointError(f"tensor {name!r} was not loaded (still on the meta device)")
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype)
                if key in seen:
                    continue
                seen.add(key)
                info = self._obdk_index.get(name)
                check_finite(name, t, info.file if info is not None else "checkpoint")
            return model

        def is_serializable(self, *args, **kwargs):
            return True

        @property
        def is_trainable(self):
            return True

    _registered = True
    return True
