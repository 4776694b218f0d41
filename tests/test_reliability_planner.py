"""obdk plan believes no config (issue #31, class 3): every field it reads is checked, one line naming field and
file, exit 2; a valid config (fuzzed from the presets) gives positive figures."""
import json
import random

import pytest

from obdk.cli import main
from obdk.errors import ConfigError
from obdk.planner import PRESETS, plan_run

GOOD = dict(PRESETS["llama-3-8b"])
SIZES = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")


def _bad_configs():
    """(config, field at fault): every read field with a wrong value, and the structural mismatches."""
    for field in SIZES + ("num_key_value_heads", "head_dim"):
        for v in (0, -1, -4096, True, False, 4096.0, "4096", [8]):
            if v is False and field in ("num_key_value_heads", "head_dim"):
                v = -2  # (False is not null: still refused, but keep the case distinct from 0)
            yield {**GOOD, field: v}, field
    for field in SIZES:
        yield {k: v for k, v in GOOD.items() if k != field}, field
    yield {**GOOD, "num_attention_heads": 30}, "num_attention_heads"  # 4096 % 30
    yield {**GOOD, "num_key_value_heads": 5}, "num_key_value_heads"  # 32 % 5
    yield {**GOOD, "num_key_value_heads": 64}, "num_key_value_heads"  # more KV heads than heads
    yield {**GOOD, "torch_dtype": "float8"}, "torch_dtype"


@pytest.mark.parametrize("cfg,field", list(_bad_configs()))
def test_plan_refuses_each_bad_field_naming_it_and_the_file(tmp_path, capsys, cfg, field):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert field in err and (str(path) in err or field == "torch_dtype"), err
    with pytest.raises(ConfigError, match=field):
        plan_run(cfg)


def test_plan_fuzzed_valid_configs_give_positive_figures():
    rng = random.Random(0)
    for _ in range(200):
        h = rng.choice([1, 2, 4, 8, 16, 32, 64])
        kv = rng.choice([g for g in range(1, h + 1) if h % g == 0])
        cfg = dict(hidden_size=h * rng.randint(1, 64), intermediate_size=rng.randint(1, 9000), num_attention_heads=h,
                   num_key_value_heads=kv, num_hidden_layers=rng.randint(1, 100), vocab_size=rng.randint(1, 200000))
        if rng.random() < 0.3:
            cfg["head_dim"] = rng.randint(1, 256)
            cfg["hidden_size"] = rng.randint(1, 8192)  # with head_dim, heads need not divide hidden_size
        res = plan_run(cfg, nsamples=rng.randint(1, 64), seqlen=rng.randint(1, 2048), nproc=rng.randint(1, 8))
        for k in ("params", "layer_stats_bytes", "peak_device_bytes_per_rank", "host_boundary_bytes_per_rank",
                  "calibration_flops", "decomposition_flops"):
            assert res[k] > 0, (k, cfg)
        # the kept factors stop below break-even: none for matrices too thin to save parameters (hidden 1)
        assert res["host_factor_bytes"] >= 0, cfg


def test_plan_refuses_a_non_object_config(tmp_path, capsys):
    path = tmp_path / "config.json"
    for text in ("[1, 2]", '"llama"', '{"text_config": 3}'):
        path.write_text(text)
        assert main(["plan", str(path)]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(ConfigError, match="plan_run: cfg"):
        plan_run("llama-7b")
