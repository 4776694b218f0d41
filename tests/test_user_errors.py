"""The CLI boundary and the API's input checks: every user or data error is an ObdkError, and the CLI
turns it into exit status 2 and one line naming the culprit (no traceback), before any work starts."""
import time

import pytest
import torch

import obdk
from obdk.cli import main
from obdk.config import LowRankConfig
from obdk.errors import ConfigError, DataError, NonFiniteError, ObdkError, UnsupportedModelError
from obdk.models import coverage, select_targets
from obdk.testing import make_char_tokenizer, make_tiny_llama


def _run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("obdk ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("extra, needles", [
    (["--keep", "1.5"], ["--keep 1.5"]),
    (["--device", "tpu9"], ["--device 'tpu9'"]),
    (["--rank-multiple", "0"], ["--rank-multiple 0"]),
    (["--alloc", "zero-sum", "--floor", "0.3"], ["--floor", "zero-sum"]),
    (["--method", "nope"], ["--method 'nope'"]),
    (["--scratch-dir", "/tmp"], ["--stream"]),
    (["--keep", "0.8", "0.8"], ["repeated"]),
])
def test_compress_flag_errors_exit_2_before_loading(tiny_model_dir, tmp_path, capsys, extra, needles):
    t0 = time.perf_counter()
    code, _, err = _run(["compress", tiny_model_dir, "--out", tmp_path / "out", *extra], capsys)
    _one_line_error(code, err, *needles)
    assert not (tmp_path / "out").exists()
    assert time.perf_counter() - t0 < 30


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_device_and_backend_without_a_gpu(tiny_model_dir, tmp_path, capsys):
    code, _, err = _run(["compress", tiny_model_dir, "--out", tmp_path / "o", "--device", "cuda"], capsys)
    _one_line_error(code, err, "--device 'cuda'")
    code, _, err = _run(["generate", tiny_model_dir, "--prompt", "ab", "--backend", "cuda"], capsys)
    _one_line_error(code, err, "cuda")
    code, _, err = _run(["generate", tiny_model_dir, "--prompt", "ab", "--backend", "nope"], capsys)
    _one_line_error(code, err, "nope")


def test_out_under_a_regular_file_fails_before_compute(tiny_model_dir, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("mine")
    t0 = time.perf_counter()
    code, _, err = _run(["compress", tiny_model_dir, "--out", f / "sub", "--nsamples", "2", "--seqlen", "16"], capsys)
    _one_line_error(code, err, str(f))
    assert f.read_text() == "mine" and time.perf_counter() - t0 < 30


def test_binary_calibration_file_names_the_file(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "calib.txt"
    bad.write_bytes(b"hello \xff\xfe\x00 world" * 50)
    code, _, err = _run(["compress", tiny_model_dir, "--out", tmp_path / "o", "--calib", bad, "--nsamples", "2",
                         "--seqlen", "16"], capsys)
    _one_line_error(code, err, str(bad), "UTF-8")


def test_learned_positions_limit_seqlen():
    from transformers import OPTConfig, OPTForCausalLM
    model = OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)).eval()
    ids = torch.randint(0, 128, (2, 80))
    with pytest.raises(ConfigError, match="learned position embeddings.*64"):
        obdk.compress(model, LowRankConfig(method="svd-llm", keep=0.8), ids, progress=False)
    with pytest.raises(ConfigError, match="seqlen 80"):
        obdk.perplexity(model, make_char_tokenizer(), ["x" * 400], seqlen=80)


def test_nan_weight_is_named_where_it_first_appears():
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    ids = torch.randint(0, 128, (2, 16))
    with pytest.raises(NonFiniteError, match=r"layers\.1\.mlp\.up_proj"):
        obdk.compress(model, LowRankConfig(method="obd", keep=0.8, correct="none"), ids, progress=False)


def test_config_types_are_checked_where_they_enter():
    model = make_tiny_llama()
    one = select_targets(model, LowRankConfig(targets="*.q_proj"))  # a string is one pattern
    assert {t.name.rsplit(".", 1)[-1] for t in one} == {"q_proj"} and len(one) == 2
    kept = select_targets(model, LowRankConfig(ignore="*.mlp.*"))
    assert kept and all(".mlp." not in t.name for t in kept)
    for bad, field in [(dict(keep=True), "keep"), (dict(rank_multiple=2.5), "rank_multiple"),
                       (dict(probes=True), "probes"), (dict(targets=[3]), "targets"), (dict(floor="0.2"), "floor")]:
        with pytest.raises(ConfigError, match=field):
            LowRankConfig(**bad)


def test_plan_apply_overrides_validated_once():
    model = make_tiny_llama()
    ids = torch.randint(0, 128, (4, 16))
    plan = obdk.prepare(model, LowRankConfig(method="svd-llm", keep=0.8, rank_multiple=4), ids, progress=False)
    with pytest.raises(ConfigError, match="keep"):
        plan.apply(make_tiny_llama(), keep=0)
    with pytest.raises(ConfigError, match="whitening"):
        plan.apply(make_tiny_llama(), whitening="obd")
    with pytest.raises(ConfigError, match="unknown"):
        plan.apply(make_tiny_llama(), colour="red")
    with pytest.raises(obdk.errors.NotCollectedError, match="grad"):
        plan.apply(make_tiny_llama(), alloc="zero-sum")
    r1 = plan.apply(make_tiny_llama(), keep=0.6, alloc="uniform")
    assert r1.config["keep"] == 0.6 and r1.config["alloc"] == "uniform" and 0.5 < r1.keep_actual < 0.7


def test_compress_many_callback_and_variants():
    model = make_tiny_llama()
    ids = torch.randint(0, 128, (4, 16))
    seen = []
    out = obdk.compress_many(model, LowRankConfig(method="svd-llm", rank_multiple=4),
                             [0.8, {"keep": 0.6, "alloc": "global"}], ids, progress=False,
                             on_result=lambda m, rep, v: seen.append((rep.config["keep"], rep.config["alloc"])) or v)
    assert seen == [(0.8, "uniform"), (0.6, "global")]
    assert out == [{"keep": 0.8}, {"keep": 0.6, "alloc": "global"}]
    with pytest.raises(ConfigError, match="keep"):  # every variant validated before any work
        obdk.compress_many(model, LowRankConfig(method="svd-llm"), [0.8, 2.0], ids, progress=False,
                           on_result=lambda *a: pytest.fail("ran before validating"))


def test_coverage_names_fused_experts():
    from transformers import MixtralConfig, MixtralForCausalLM
    model = MixtralForCausalLM(MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             num_local_experts=4, num_experts_per_tok=2)).eval()
    targets = select_targets(model, LowRankConfig())
    cov = coverage(model, targets)
    kinds = {u["kind"] for u in cov["untargeted"]}
    fused = [u for u in cov["untargeted"] if u["kind"] == "fused-experts"]
    assert cov["targeted_fraction"] < 0.5
    if any(p.dim() >= 3 for p in model.parameters()):  # transformers 5: experts are 3-D parameters
        assert fused and "fused-experts" in kinds
    ids = torch.randint(0, 128, (2, 16))
    rep = obdk.compress(model, LowRankConfig(method="svd-llm", keep=0.8, rank_multiple=4), ids, progress=False)
    assert "coverage" in rep.summary() and rep.coverage["targeted_fraction"] == cov["targeted_fraction"]


def test_conv1d_model_is_named_unsupported():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    with pytest.raises(UnsupportedModelError, match="Conv1D"):
        select_targets(model, LowRankConfig())


def test_every_error_class_is_an_obdk_error():
    for cls in (ConfigError, DataError, NonFiniteError, UnsupportedModelError, obdk.errors.CheckpointError,
                obdk.errors.BackendUnavailable, obdk.errors.NonFiniteLossError, obdk.errors.ModelNotFoundError):
        assert issubclass(cls, ObdkError)
    assert issubclass(ConfigError, ValueError) and issubclass(obdk.errors.ModelNotFoundError, FileNotFoundError)
