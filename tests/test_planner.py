"""obdk plan: memory and FLOPs from config.json alone, checked against what calibration allocates."""
import json

import pytest

from obdk.calibrate.memory import stats_nbytes
from obdk.cli import main
from obdk.planner import PRESETS, plan_run, read_model_config
from obdk.testing import make_tiny_llama


@pytest.mark.parametrize("method, stats", [("obd", ("cx", "cg")), ("svd-llm", ("cx",)), ("zs-svd", ("cx", "grad"))])
def test_statistics_bytes_equal_what_calibration_allocates(method, stats):
    model = make_tiny_llama(layers=3)
    cfg = model.config.to_dict()
    p = plan_run(cfg, method=method, nsamples=4, seqlen=16, dtype="float32")
    assert p["total_stats_bytes"] == stats_nbytes(model, stats)
    assert p["layer_stats_bytes"] * 3 == p["total_stats_bytes"]
    assert p["params"] == sum(q.numel() for n, q in model.named_parameters() if ".layers." in n)


def test_presets_match_the_readme_table():
    p7 = plan_run(PRESETS["llama-7b"])
    assert p7["layer_cx_bytes"] == 171_507_712 * 4 and p7["layer_cg_bytes"] == 326_238_208 * 4
    p70 = plan_run(PRESETS["llama-3-70b"], nproc=8, nsamples=128, seqlen=2048)
    assert abs(p70["total_stats_bytes"] / 2**30 - 855.6) < 0.1
    assert p70["peak_device_bytes_per_rank"] < 20 * 2**30  # one layer, not 856 GiB
    one = plan_run(PRESETS["llama-3-70b"], nproc=1, nsamples=128, seqlen=2048)
    assert one["host_boundary_bytes_per_rank"] == 8 * p70["host_boundary_bytes_per_rank"]


def test_cli_plan_json_and_errors(tmp_path, capsys):
    d = tmp_path / "m"
    make_tiny_llama().config.save_pretrained(d)
    assert read_model_config(d)["hidden_size"] == 64
    assert main(["plan", str(d), "--nsamples", "8", "--seqlen", "32", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in ("layer_stats_bytes", "total_stats_bytes", "peak_device_bytes_per_rank", "host_boundary_bytes_per_rank",
              "host_factor_bytes", "calibration_flops", "decomposition_flops"):
        assert k in res and res[k] > 0, k
    assert main(["plan", str(tmp_path / "nope")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["plan", "llama-7b", "--nproc", "0"]) == 2
    assert "--nproc" in capsys.readouterr().err


@pytest.mark.parametrize("stats,method", [(("cx", "cg"), "obd"), (("cx",), "svd-llm")])
def test_streamed_figures_equal_what_the_streamed_pass_used(stats, method):
    """The planner's per-layer statistics and host boundary bytes against calibrate_streamed's own counters."""
    import torch

    from obdk.calibrate.stream import calibrate_streamed
    model = make_tiny_llama(layers=3)
    ids = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(0))
    info: dict = {}
    calibrate_streamed(model, ids, stats=stats, progress=False, info=info, on_layer=lambda i, part: None)
    p = plan_run(model.config.to_dict(), method=method, nsamples=5, seqlen=16, dtype="float32")
    assert info["peak_stats_bytes"] == p["layer_stats_bytes"]  # one layer's statistics at a time
    assert info["peak_host_bytes"] == p["host_boundary_bytes_per_rank"]
