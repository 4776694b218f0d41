"""Zero-shot accuracy through lm-evaluation-harness (obdk.zeroshot, obdk eval --tasks, python -m obdk.lm_eval).

A tiny Llama with a character tokenizer on the first few documents of each local task: the
accuracies are meaningless but real (the harness's prompts and metrics, scored by the model).
Needs the extra ``obdk[eval]`` and the local task data (``$OBDK_DATA_DIR/zeroshot``).
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

import obdk  # noqa: E402
from obdk.cli import main  # noqa: E402
from obdk.errors import ConfigError, DatasetNotFoundError, ObdkError  # noqa: E402
from obdk.zeroshot import DEFAULT_BATCH_SIZE, LOCAL_TASKS, zeroshot  # noqa: E402

try:
    from obdk.testing import make_char_tokenizer, make_tiny_llama
except ImportError:  # pragma: no cover - older layout
    from tests.conftest import make_char_tokenizer, make_tiny_llama

from tests.conftest import DATA_DIR  # noqa: E402

ZS = DATA_DIR / "zeroshot"
needs_data = pytest.mark.skipif(not all((ZS / t / "validation").is_dir() for t in LOCAL_TASKS),
                                reason=f"local zero-shot data not found under {ZS} (set OBDK_DATA_DIR)")
KEYS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "split", "source", "seconds")


@pytest.fixture(scope="module")
def tok():
    return make_char_tokenizer()


@pytest.fixture(scope="module")
def dense():
    return make_tiny_llama()


@pytest.fixture(scope="module")
def compressed(dense, tok):
    m = copy.deepcopy(dense)
    calib = torch.randint(2, 128, (4, 64), generator=torch.Generator().manual_seed(0))
    obdk.compress(m, obdk.LowRankConfig(method="svd-llm", keep=0.6, rank_multiple=4), calib, tokenizer=tok,
                  progress=False)
    assert any(type(x).__name__ == "LowRankLinear" for x in m.modules())
    return m


@pytest.fixture
def offline(monkeypatch):
    """No hub: the environment variables, and the flags datasets / huggingface_hub read at import."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)


def _check(res, tasks, limit):
    assert list(res) == list(tasks)
    for t, r in res.items():
        for k in KEYS:
            assert k in r, (t, k)
        assert r["n"] == limit, t
        assert r["split"] == "validation" and r["source"] == f"local:{ZS / t / 'validation'}"
        assert isinstance(r["acc"], float) and 0.0 <= r["acc"] <= 1.0, t
        assert r["acc_stderr"] is not None and r["acc_stderr"] >= 0
        if t == "winogrande":  # the harness defines acc only
            assert r["acc_norm"] is None
        else:
            assert 0.0 <= r["acc_norm"] <= 1.0 and r["acc_norm_stderr"] >= 0
        # an accuracy on n documents is a multiple of 1/n
        assert abs(r["acc"] * limit - round(r["acc"] * limit)) < 1e-9
        assert r["seconds"] > 0


@needs_data
def test_local_tasks_dense_and_compressed(dense, compressed, tok, offline):
    res = zeroshot(dense, tok, ",".join(LOCAL_TASKS), limit=4, data_dir=DATA_DIR, progress=False)
    _check(res, LOCAL_TASKS, 4)
    comp = zeroshot(compressed, tok, list(LOCAL_TASKS), limit=4, data_dir=DATA_DIR, progress=False)
    _check(comp, LOCAL_TASKS, 4)
    # deterministic: the same model on the same documents gives the same numbers
    again = zeroshot(dense, tok, ["arc_easy", "winogrande"], limit=4, data_dir=DATA_DIR, progress=False)
    for t in again:
        assert {k: again[t][k] for k in KEYS if k != "seconds"} == {k: res[t][k] for k in KEYS if k != "seconds"}


@needs_data
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_default_batch_size_scores_like_batch_one(compressed, tok, dtype, offline):
    """The default batch (DEFAULT_BATCH_SIZE requests per forward, shorter ones padded) gives the
    accuracies of batch size 1 on every task, document counts equal; fp64 leaves no rounding to
    break a tie, fp32 is what users run."""
    assert DEFAULT_BATCH_SIZE > 1
    assert inspect.signature(zeroshot).parameters["batch_size"].default == DEFAULT_BATCH_SIZE
    m = copy.deepcopy(compressed).to(dtype)
    tasks = ["piqa", "arc_easy", "hellaswag", "winogrande"]
    one = zeroshot(m, tok, tasks, limit=12, batch_size=1, data_dir=DATA_DIR, progress=False)
    batched = zeroshot(m, tok, tasks, limit=12, data_dir=DATA_DIR, progress=False)
    for t in tasks:
        assert batched[t]["n"] == one[t]["n"] == 12
        assert (batched[t]["acc"], batched[t]["acc_norm"]) == (one[t]["acc"], one[t]["acc_norm"]), t


def test_cli_batch_size_defaults(tiny_model_dir, monkeypatch, capsys):
    """obdk eval: --tasks without --batch-size scores DEFAULT_BATCH_SIZE requests per forward;
    perplexity keeps one window per forward; an explicit --batch-size reaches both."""
    import obdk.eval
    import obdk.zeroshot as zs
    seen = {}
    monkeypatch.setattr(zs, "check_tasks", lambda *a, **k: None)
    monkeypatch.setattr(zs, "zeroshot", lambda *a, **k: seen.setdefault("zs", []).append(k["batch_size"]) or {})
    monkeypatch.setattr(obdk.eval, "perplexity", lambda *a, **k: seen.setdefault("ppl", []).append(
        k["batch_size"]) or {"ppl": 1.0, "dataset": "x", "windows": 1, "seqlen": 8, "tokens": 8, "seconds": 0.0})
    assert main(["eval", str(tiny_model_dir), "--tasks", "piqa", "--dataset", "wikitext2"]) == 0
    assert main(["eval", str(tiny_model_dir), "--tasks", "piqa", "--dataset", "wikitext2", "--batch-size", "3"]) == 0
    assert main(["eval", str(tiny_model_dir), "--dataset", "wikitext2"]) == 0
    assert seen == {"zs": [DEFAULT_BATCH_SIZE, 3], "ppl": [1, 3, 1]}


@needs_data
def test_cli_json_limit_and_perplexity(tiny_model_dir, capsys, offline):
    code = main(["eval", str(tiny_model_dir), "--tasks", "arc_challenge,piqa", "--limit", "3", "--json",
                 "--data-dir", str(DATA_DIR)])
    out, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert "ppl" not in res  # --tasks alone: no perplexity
    assert res["model"] == str(tiny_model_dir) and set(res["zeroshot"]["tasks"]) == {"arc_challenge", "piqa"}
    for t, r in res["zeroshot"]["tasks"].items():
        assert r["n"] == 3 and r["split"] == "validation" and 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1
        assert r["acc_stderr"] >= 0 and r["acc_norm_stderr"] >= 0
    assert 0 <= res["zeroshot"]["mean_acc"] <= 1
    # both in one call: the perplexity keys as before, plus zeroshot; and the table without --json
    code = main(["eval", str(tiny_model_dir), "--tasks", "piqa", "--limit", "2", "--dataset", "wikitext2",
                 "--seqlen", "32", "--windows", "1", "--data-dir", str(DATA_DIR)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "wikitext2 ppl" in out and "piqa" in out and "acc_norm" in out and "validation" in out


@needs_data
def test_compress_records_dense_and_compressed_accuracy(tiny_model_dir, tmp_path, capsys, offline):
    out = tmp_path / "c"
    code = main(["compress", str(tiny_model_dir), "--method", "svd-llm", "--keep", "0.6", "--nsamples", "2",
                 "--seqlen", "32", "--rank-multiple", "4", "--out", str(out), "--eval-tasks", "arc_easy,winogrande",
                 "--eval-limit", "2", "--json", "--data-dir", str(DATA_DIR)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    row = json.loads(stdout.strip().splitlines()[-1])
    assert set(row["zeroshot"]) == {"arc_easy", "winogrande"} and row["zeroshot"]["arc_easy"]["n"] == 2
    rep = json.loads((out / "obdk_report.json").read_text())
    zs = rep["zeroshot"]
    assert set(zs) == {"arc_easy", "winogrande"}
    for r in zs.values():
        assert 0 <= r["acc"] <= 1 and 0 <= r["dense_acc"] <= 1 and r["n"] == 2 and r["split"] == "validation"


@needs_data
def test_missing_task_data_offline(dense, tok, tmp_path, capsys, tiny_model_dir, offline):
    with pytest.raises(DatasetNotFoundError) as ei:
        zeroshot(dense, tok, "arc_easy", limit=2, data_dir=tmp_path, progress=False)
    msg = str(ei.value)
    assert "arc_easy" in msg and str(tmp_path / "zeroshot" / "arc_easy" / "validation") in msg
    assert "HF_DATASETS_OFFLINE" in msg
    # the CLI: exit status 2 and one line, no traceback
    capsys.readouterr()  # drop what the fixtures printed
    code = main(["eval", str(tiny_model_dir), "--tasks", "piqa", "--data-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 2
    # one line of error (after transformers' own "Loading weights" bar of the model load)
    lines = [ln for ln in err.strip().splitlines() if "Loading weights" not in ln]
    assert len(lines) == 1 and lines[0].startswith("obdk eval: error:") and "piqa" in lines[0], err
    assert "Traceback" not in err


def test_unknown_task_and_bad_arguments(dense, tok, tiny_model_dir, capsys):
    with pytest.raises(ConfigError, match="no_such_task_xyz"):
        zeroshot(dense, tok, "arc_easy,no_such_task_xyz", limit=2, progress=False)
    for bad in ({"limit": 0}, {"batch_size": 0}, {"num_fewshot": -1}):
        with pytest.raises(ConfigError):
            zeroshot(dense, tok, "arc_easy", progress=False, **bad)
    with pytest.raises(ObdkError):
        zeroshot(dense, tok, " , ", progress=False)
    capsys.readouterr()
    code = main(["eval", str(tiny_model_dir), "--tasks", "no_such_task_xyz"])
    out, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no_such_task_xyz" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def obdk_dir(compressed, tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("zs") / "tiny-obdk"
    obdk.save_pretrained(compressed, d, tokenizer=tok)
    return d


def test_lm_eval_model_registration(obdk_dir):
    from lm_eval.api.registry import get_model

    from obdk.lm_eval import ObdkLM
    assert get_model("obdk") is ObdkLM
    lm = ObdkLM(pretrained=str(obdk_dir), batch_size=1)
    assert any(type(x).__name__ == "LowRankLinear" for x in lm.model.modules())


@needs_data
@pytest.mark.slow
def test_harness_cli_on_obdk_checkpoint(obdk_dir, compressed, tok, tmp_path):
    """``python -m obdk.lm_eval --model hf`` loads the obdk directory through transformers and scores the
    local split: the same accuracies as obdk.zeroshot on the in-memory model."""
    env = {**os.environ, "OBDK_DATA_DIR": str(DATA_DIR), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    outp = tmp_path / "lm_eval_out"
    proc = subprocess.run([sys.executable, "-m", "obdk.lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={obdk_dir},dtype=float32", "--tasks", "arc_easy", "--limit", "3",
                           "--device", "cpu", "--batch_size", "1", "--output_path", str(outp)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"arc_easy: scoring the local validation split {ZS / 'arc_easy' / 'validation'}" in proc.stderr
    files = sorted(Path(outp).rglob("results_*.json"))
    assert files, proc.stdout[-2000:]
    got = json.loads(files[-1].read_text())["results"]["arc_easy"]
    ref = zeroshot(compressed, tok, "arc_easy", limit=3, data_dir=DATA_DIR, progress=False)["arc_easy"]
    assert got["acc,none"] == pytest.approx(ref["acc"]) and got["acc_norm,none"] == pytest.approx(ref["acc_norm"])
