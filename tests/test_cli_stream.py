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
