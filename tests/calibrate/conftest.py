"""Fixtures shared by the torchrun tests of tests/calibrate."""
from __future__ import annotations

import pytest

from obdk.testing import make_char_tokenizer, make_tiny_llama


@pytest.fixture
def cli_inputs(tmp_path):
    """``(a tiny Llama checkpoint directory with its tokenizer, a calibration text file)``."""
    from .test_distributed_stream import LAYERS
    d = tmp_path / "tiny"
    make_tiny_llama(layers=LAYERS).save_pretrained(d)
    make_char_tokenizer().save_pretrained(d)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"word{i % 97} and some more text {i * 7 % 13}" for i in range(200)))
    return d, calib
