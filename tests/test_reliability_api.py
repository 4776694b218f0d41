"""The Python API's boundary (issue #31, class 4): every public entry point checks its arguments' types and values
and raises an ObdkError naming the argument (or the module on the meta device) before any work; a dict config is
accepted as LowRankConfig(**dict)."""
import pytest
import torch

import obdk
from obdk.errors import ObdkError
from tests.conftest import make_char_tokenizer, make_tiny_llama

C = obdk.LowRankConfig
IDS = torch.randint(0, 50, (4, 32), generator=torch.Generator().manual_seed(0))


def _meta_in_one_layer():
    m = make_tiny_llama()
    m.model.layers[1].mlp.up_proj.to("meta")
    return m


CASES = [
    ("compress", lambda m: obdk.compress("some/dir", C()), "model must be a torch.nn.Module"),
    ("compress", lambda m: obdk.compress(m, "obd", IDS), "config must be an obdk.LowRankConfig"),
    ("compress", lambda m: obdk.compress(m, 0.8, IDS), "config must be"),
    ("prepare", lambda m: obdk.compress(m, {"kep": 0.8}, IDS), "kep"),
    ("prepare", lambda m: obdk.compress(m, C(), "wikitext2", tokenizer=make_char_tokenizer(), nsamples="4"),
     "nsamples must be an int, got str"),
    ("prepare", lambda m: obdk.compress(m, C(), "wikitext2", tokenizer=make_char_tokenizer(), seqlen=64.0),
     "seqlen must be an int, got float"),
    ("prepare", lambda m: obdk.compress(m, C(), IDS, nsamples=True), "nsamples must be an int, got bool"),
    ("prepare", lambda m: obdk.compress(m, C(), IDS, calib_batch_size=0), "calib_batch_size must be >= 1"),
    ("prepare", lambda m: obdk.compress(m, C(), IDS, stream=True, max_host_memory=-1), "max_host_memory"),
    ("prepare", lambda m: obdk.compress(m, C(), IDS, stream=True, scratch_dir=3), "scratch_dir must be a path"),
    ("prepare", lambda m: obdk.compress(m, C(), 123), "calibration must be calibration data"),
    ("prepare", lambda m: obdk.compress(m, C(), "wikitext2", tokenizer="gpt2"), "tokenizer must be a tokenizer"),
    ("prepare", lambda m: obdk.compress(m, C(), IDS, device="tpu"), "device 'tpu'"),
    ("compress", lambda m: obdk.compress(_meta_in_one_layer(), C(), IDS),
     "parameter model.layers.1.mlp.up_proj.weight is on the meta device"),
    ("calibrate", lambda m: obdk.calibrate(_meta_in_one_layer(), IDS), "model.layers.1.mlp.up_proj.weight"),
    ("calibrate", lambda m: obdk.calibrate("model", IDS), "model must be a torch.nn.Module"),
    ("compress_many", lambda m: obdk.compress_many(m, C(), 0.8, IDS), "keeps must be a list"),
    ("compress_many", lambda m: obdk.compress_many("dir", C(), [0.8], IDS), "model must be"),
    ("save_pretrained", lambda m: obdk.save_pretrained("dir", "out"), "model must be a torch.nn.Module"),
    ("save_pretrained", lambda m: obdk.save_pretrained(m, 5), "save_dir must be a path"),
    ("load_pretrained", lambda m: obdk.load_pretrained(5), "path must be a path"),
    ("load_model", lambda m: obdk.load_model(None), "spec must be a path"),
    ("perplexity", lambda m: obdk.perplexity("dir", make_char_tokenizer()), "model must be"),
    ("perplexity", lambda m: obdk.perplexity(m, make_char_tokenizer(), seqlen=32.0), "seqlen must be an int"),
    ("perplexity", lambda m: obdk.perplexity(m, make_char_tokenizer(), windows=0), "windows must be >= 1"),
    ("perplexity", lambda m: obdk.perplexity(m, make_char_tokenizer(), dataset=5), "dataset must be"),
    ("pack_shared_inputs", lambda m: obdk.pack_shared_inputs("dir"), "model must be a torch.nn.Module"),
    ("LowRankLinear", lambda m: obdk.LowRankLinear(4, 4, 0), "rank must be >= 1"),
    ("LowRankLinear", lambda m: obdk.LowRankLinear("4", 4, 2), "in_features must be an int"),
]


@pytest.mark.parametrize("where,call,needle", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_public_api_names_the_wrong_argument(where, call, needle):
    with pytest.raises(ObdkError) as exc:
        call(make_tiny_llama())
    msg = str(exc.value)
    assert needle in msg and (msg.startswith(f"{where}:") or where == "prepare" and "LowRankConfig" in msg), msg


def test_a_dict_config_is_a_lowrankconfig():
    a, b = make_tiny_llama(), make_tiny_llama()
    ra = obdk.compress(a, {"keep": 0.6, "method": "svd-llm"}, IDS, nsamples=4, seqlen=32, progress=False)
    rb = obdk.compress(b, C(keep=0.6, method="svd-llm"), IDS, nsamples=4, seqlen=32, progress=False)
    assert [m.rank for m in ra.modules] == [m.rank for m in rb.modules]


def test_plan_apply_refuses_a_meta_model_naming_the_tensor():
    plan = obdk.prepare(make_tiny_llama(), C(keep=0.6, method="svd-llm"), IDS, nsamples=4, seqlen=32, progress=False)
    with pytest.raises(ObdkError, match="Plan.apply: model's parameter model.layers.1.mlp.up_proj.weight"):
        plan.apply(_meta_in_one_layer())
