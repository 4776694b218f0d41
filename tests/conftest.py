"""Shared fixtures: tiny models built from configs in code (no hub), real-data paths."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# The tiny-model helpers live in obdk.testing (the benchmarks' dry runs use them too); they are
# re-exported here because the tests import them as ``from tests.conftest import make_tiny_llama``.
from obdk.testing import make_char_tokenizer, make_tiny_llama, make_tiny_qwen2  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("OBDK_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_qwen2():
    return make_tiny_qwen2()


@pytest.fixture
def data_dir():
    if not (DATA_DIR / "wikitext-2-raw" / "wiki.test.raw").exists():
        pytest.skip(f"real data not found under {DATA_DIR} (set OBDK_DATA_DIR)")
    return DATA_DIR


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny Llama + char tokenizer saved as a plain HF model directory."""
    d = tmp_path / "tiny-llama"
    make_tiny_llama().save_pretrained(d)
    make_char_tokenizer().save_pretrained(d)
    return d
