"""obdk compress --stream on a tiny model directory: the default method (global ranks, zs+kfac) streams with its
statistics spilled to --scratch-dir, gives the resident run's ranks, and what cannot stream exits 2 naming it."""
import json

from obdk.cli import main

ARGS = ["--keep", "0.6", "--calib", "wikitext2:validation", "--nsamples", "4", "--seqlen", "64", "--rank-multiple", "4",
        "--json"]


def _run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _ranks(out_dir):
    rep = json.loads((out_dir / "obdk_report.json").read_text())
    return {m["name"]: m["rank"] for m in rep["modules"]}


def test_compress_stream_spills_and_matches_the_resident_run(tiny_model_dir, data_dir, tmp_path, capsys):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    outs = {}
    for kind, extra in (("resident", []), ("stream", ["--stream", "--scratch-dir", scratch, "--max-host-memory", "0"])):
        outs[kind] = tmp_path / kind
        code, stdout, err = _run(["compress", tiny_model_dir, *ARGS, "--out", outs[kind], "--data-dir", data_dir,
                                  *extra], capsys)
        assert code == 0, err
        res = json.loads(stdout.strip().splitlines()[-1])
        rep = json.loads((outs[kind] / "obdk_report.json").read_text())
        assert res["alloc"] == "global" and rep["config"]["correct"] == "zs+kfac"
    assert _ranks(outs["stream"]) == _ranks(outs["resident"])
    assert not list(scratch.iterdir())  # the spilled activations and statistics leave nothing behind


def test_compress_stream_refuses_what_does_not_stream(tiny_model_dir, data_dir, tmp_path, capsys):
    code, stdout, err = _run(["compress", tiny_model_dir, *ARGS, "--method", "bsi", "--bsi-curvature", "hutchinson",
                              "--stream", "--out", tmp_path / "o", "--data-dir", data_dir], capsys)
    assert code == 2 and "hutchinson" in err and "without --stream" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_compress_stream_refuses_a_missing_scratch_dir_before_loading(tiny_model_dir, tmp_path, capsys):
    code, stdout, err = _run(["compress", tiny_model_dir, *ARGS, "--stream", "--scratch-dir", tmp_path / "nope",
                              "--out", tmp_path / "o"], capsys)
    assert code == 2 and f"--scratch-dir {tmp_path / 'nope'}: not a directory" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def _tensors(d):
    from safetensors.torch import load_file
    out = {}
    for f in sorted(d.iterdir()):
        if f.name.endswith(".safetensors"):
            out.update(load_file(str(f)))
    return out


def test_compress_weights_on_disk_writes_the_streamed_checkpoint(tiny_model_dir, data_dir, tmp_path, capsys):
    """--weights-on-disk: the decoder layers stay in the shards; the checkpoint equals --stream's on the loaded model
    (same ranks, tensors to rounding), evaluated from its checkpoint; the input directory is untouched."""
    before = {f.name: f.stat().st_mtime_ns for f in tiny_model_dir.iterdir()}
    outs = {}
    for kind, extra in (("stream", ["--stream"]), ("disk", ["--stream", "--weights-on-disk", "--max-host-memory", "0"])):
        outs[kind] = tmp_path / kind
        code, stdout, err = _run(["compress", tiny_model_dir, *ARGS, "--out", outs[kind], "--data-dir", data_dir,
                                  "--eval-windows", "2", *extra], capsys)
        assert code == 0, err
        res = json.loads(stdout.strip().splitlines()[-1])
        assert res["eval"]["windows"] == 2 and res["eval"]["ppl"] > 1
        outs[kind + "_ppl"] = res["eval"]["ppl"]
    assert _ranks(outs["disk"]) == _ranks(outs["stream"])
    a, b = _tensors(outs["disk"]), _tensors(outs["stream"])
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if a[k].numel():  # (tombstones are empty)
            assert (a[k].double() - b[k].double()).abs().max() <= 1e-4 * max(1.0, b[k].double().abs().max()), k
    assert abs(outs["disk_ppl"] - outs["stream_ppl"]) <= 1e-3 * outs["stream_ppl"]
    assert {f.name: f.stat().st_mtime_ns for f in tiny_model_dir.iterdir()} == before


def test_compress_weights_on_disk_needs_stream_and_a_safetensors_dir(tiny_model_dir, tmp_path, capsys):
    code, _, err = _run(["compress", tiny_model_dir, *ARGS, "--weights-on-disk", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "--weights-on-disk" in err and "add --stream" in err and "Traceback" not in err
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    code, _, err = _run(["compress", gguf, *ARGS, "--stream", "--weights-on-disk", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "--weights-on-disk" in err and "safetensors" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_compress_stream_refuses_zs_guarded_before_any_work(tiny_model_dir, data_dir, tmp_path, capsys):
    code, _, err = _run(["compress", tiny_model_dir, *ARGS, "--correct", "zs-guarded", "--stream",
                         "--out", tmp_path / "o", "--data-dir", data_dir], capsys)
    assert code == 2 and "zs-guarded" in err and "does not stream" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
