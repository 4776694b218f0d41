"""CLI flags checked where they enter (issue #31, class 5): a count, ratio, duration or text that cannot be right
is one line naming the flag, exit 2, before any model loads; --tasks "" no longer runs the whole perplexity."""
import pytest

import obdk.cli as cli
from obdk.cli import main

BAD = [
    (["eval", "M", "--tasks", ""], "--tasks"),
    (["eval", "M", "--tasks", " , "], "--tasks"),
    (["eval", "M", "--windows", "0"], "--windows 0"),
    (["eval", "M", "--batch-size", "-2"], "--batch-size -2"),
    (["eval", "M", "--seqlen", "1.5"], "--seqlen '1.5'"),
    (["eval", "M", "--limit", "0"], "--limit 0"),
    (["eval", "M", "--num-fewshot", "-1"], "--num-fewshot -1"),
    (["eval", "M", "--dataset", ""], "--dataset"),
    (["generate", "M", "--prompt", "hi", "--max-new-tokens", "-1"], "--max-new-tokens -1"),
    (["generate", "M", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens 0"),
    (["generate", "M", "--prompt", "hi", "--max-new-tokens", "ten"], "--max-new-tokens 'ten'"),
    (["generate", "M", "--prompt", ""], "--prompt"),
    (["compress", "M", "--out", "o", "--nsamples", "0"], "--nsamples 0"),
    (["compress", "M", "--out", "o", "--seqlen", "-64"], "--seqlen -64"),
    (["compress", "M", "--out", "o", "--calib-batch-size", "0"], "--calib-batch-size 0"),
    (["compress", "M", "--out", "o", "--max-host-memory", "-1"], "--max-host-memory -1"),
    (["compress", "M", "--out", "o", "--dist-timeout", "0"], "--dist-timeout 0"),
    (["compress", "M", "--out", "o", "--dist-timeout", "nan"], "--dist-timeout nan"),
    (["compress", "M", "--out", "o", "--keep", "0.8", "1.5"], "--keep 1.5"),
    (["compress", "M", "--out", "o", "--keep", "nan"], "--keep nan"),
    (["compress", "M", "--out", "o", "--eval-tasks", ""], "--eval-tasks"),
    (["compress", "M", "--out", "o", "--eval-windows", "-1"], "--eval-windows -1"),
    (["compress", "M", "--out", "o", "--calib", ""], "--calib"),
    (["plan", "llama-7b", "--seqlen", "0"], "--seqlen 0"),
    (["plan", "llama-7b", "--nproc", "-8"], "--nproc -8"),
    (["compress", "M", "--out", "o", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
]


@pytest.mark.parametrize("argv,needle", BAD)
def test_bad_flags_are_one_line_exit_2_before_loading(argv, needle, capsys, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(cli, "_load", no_load)
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("obdk") and f": error: {needle}" in lines[0], err


def test_tasks_are_normalised_and_help_still_exits_0(capsys):
    args = cli.build_parser().parse_args(["eval", "M", "--tasks", " arc_easy, ,piqa "])
    assert args.tasks == "arc_easy,piqa"
    assert main(["--help"]) == 0 and "compress" in capsys.readouterr().out
