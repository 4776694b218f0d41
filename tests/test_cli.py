"""The obdk CLI on a tiny model directory: every verb, --json outputs, error paths."""
import json
import subprocess
import sys

import pytest

from obdk.cli import main


def _run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def compressed(tiny_model_dir, data_dir, tmp_path_factory, capsys):
    out = tmp_path_factory.mktemp("c") / "obd"
    code, stdout, err = _run(["compress", tiny_model_dir, "--method", "obd", "--keep", "0.6", "--calib",
                              "wikitext2:validation", "--nsamples", "4", "--seqlen", "64", "--rank-multiple", "4",
                              "--out", out, "--json", "--data-dir", data_dir], capsys)
    assert code == 0, err
    return out, json.loads(stdout.strip().splitlines()[-1])


def test_compress_json_and_files(compressed):
    out, res = compressed
    assert res["out"] == str(out) and res["method"] == "obd" and res["alloc"] == "global"
    assert 0.5 < res["keep_actual"] <= 0.6 + 1e-9
    assert res["model_params_after"] < res["model_params_before"]
    for stage in ("load", "calibration", "factorisation", "allocation", "truncation", "correction", "save"):
        assert stage in res["stages"], stage
    assert "packing" not in res["stages"]  # (Plan.save writes the checkpoint without building the compressed model)
    assert (out / "model.safetensors").exists() and (out / "obdk_report.json").exists()
    assert (out / "tokenizer.json").exists()


def test_eval_json(compressed, data_dir, capsys):
    out, _ = compressed
    code, stdout, err = _run(["eval", out, "--dataset", "wikitext2", "--seqlen", "64", "--windows", "3", "--json",
                              "--data-dir", data_dir], capsys)
    assert code == 0, err
    res = json.loads(stdout.strip().splitlines()[-1])
    for k in ("ppl", "dataset", "seqlen", "windows", "tokens"):
        assert k in res
    assert res["windows"] == 3 and res["seqlen"] == 64 and res["ppl"] > 1


def test_generate_inspect_env(compressed, capsys, tmp_path):
    out, _ = compressed
    code, stdout, err = _run(["generate", out, "--prompt", "The", "--max-new-tokens", "5"], capsys)
    assert code == 0, err
    assert stdout.startswith("The") and "tokens/s" in err
    png = tmp_path / "ranks.png"
    code, stdout, err = _run(["inspect", out, "--heatmap", png], capsys)
    assert code == 0, err
    assert "q_proj" in stdout and "layer" in stdout and png.stat().st_size > 1000
    code, stdout, _ = _run(["inspect", out, "--json"], capsys)
    data = json.loads(stdout)
    assert data["ranks"] and data["quantization_config"]["quant_method"] == "obdk"
    code, stdout, _ = _run(["env"], capsys)
    assert code == 0 and "obdk._C" in stdout and "lowrank_linear" in stdout


def test_several_keeps_write_one_model_each(tiny_model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "m"
    code, stdout, err = _run(["compress", tiny_model_dir, "--method", "svd-llm", "--keep", "0.9", "0.5",
                              "--calib", "wikitext2:validation", "--nsamples", "2", "--seqlen", "32",
                              "--rank-multiple", "4", "--out", out, "--json", "--data-dir", data_dir], capsys)
    assert code == 0, err
    res = json.loads(stdout.strip().splitlines()[-1])["results"]
    assert [r["keep"] for r in res] == [0.9, 0.5]
    assert (tmp_path / "m-keep0.9").is_dir() and (tmp_path / "m-keep0.5").is_dir()
    assert res[1]["targeted_params_after"] < res[0]["targeted_params_after"]


@pytest.mark.parametrize("args,needle", [
    (["--calib", "wikitext2:train"], "split"),                  # split not available: lists the ones that are
    (["--calib", "nosuchdataset"], "nosuchdataset"),
    (["--method", "magic"], "method"),
    (["--keep", "1.7"], "keep"),
])
def test_compress_errors_name_the_culprit(tiny_model_dir, data_dir, tmp_path, capsys, args, needle):
    base = ["compress", tiny_model_dir, "--nsamples", "2", "--seqlen", "32", "--out", tmp_path / "x",
            "--data-dir", data_dir]
    code, _, err = _run(base + args, capsys)
    assert code == 2
    assert needle in err
    if needle == "split":
        assert "validation" in err and "test" in err
    assert not (tmp_path / "x").exists()


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    code, _, err = _run(["eval", tmp_path / "nope", "--windows", "1"], capsys)
    assert code == 2 and "nope" in err


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "obdk", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for verb in ("compress", "eval", "generate", "inspect", "env"):
        assert verb in out.stdout


def test_compress_with_eval_records_measured_loss(tiny_model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "e"
    code, stdout, err = _run(["compress", tiny_model_dir, "--method", "obd", "--keep", "0.5", "--calib",
                              "wikitext2:validation", "--nsamples", "2", "--seqlen", "32", "--rank-multiple", "4",
                              "--eval-windows", "2", "--out", out, "--json", "--data-dir", data_dir], capsys)
    assert code == 0, err
    res = json.loads(stdout.strip().splitlines()[-1])
    meas = res["measured"]
    assert meas["windows"] == 2 and meas["dense_ppl"] > 1 and abs(meas["loss_increase"]) < 50
    rep = json.loads((out / "obdk_report.json").read_text())
    assert rep["measured"]["loss_increase"] == pytest.approx(meas["loss_increase"])
