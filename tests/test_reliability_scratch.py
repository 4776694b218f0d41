"""Scratch stores leave nothing behind (issue #31, classes 1 and 2): a SIGTERM (or SIGHUP) at each streamed phase
and inside Plan.save removes every obdk-* store; stores of processes killed with SIGKILL are swept by the next run
with one line; an unwritable or vanishing scratch directory, and an unwritable --out, are one line naming it."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from obdk import scratch
from obdk.cli import main
from obdk.errors import ConfigError, ObdkError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--keep", "0.6", "--calib", "wikitext2:validation", "--nsamples", "4", "--seqlen", "64", "--rank-multiple", "4",
        "--json"]

# the child process: obdk compress --stream with every store spilled (--max-host-memory 0) and the default
# correction (zs+kfac: kept statistics and corrected factors), killed by itself with SIG right after PHASE's first
# call; it prints how many obdk-* stores existed at that moment, so that the test knows the kill had work to undo
CHILD = textwrap.dedent("""
    import os, signal, sys
    from obdk.calibrate.layer_statistics import LayerStatistics
    from obdk.correct.factor_store import FactorStore
    from obdk.decompose.spectrum_store import SpectrumStore
    from obdk.stream.boundary import BoundaryStore
    from obdk.io import CheckpointWriter
    from obdk.cli import main
    phase, sig, scratch_dir = sys.argv[1], getattr(signal, sys.argv[2]), sys.argv[3]
    where = {"boundary": (BoundaryStore, "alloc"), "statistics": (LayerStatistics, "put"),
             "spectra": (SpectrumStore, "put_layer"), "correction": (FactorStore, "put_layer"),
             "save": (CheckpointWriter, "add_lowrank")}[phase]
    orig = getattr(*where)
    def hooked(self, *a, **k):
        out = orig(self, *a, **k)
        if phase != "boundary" or out.spilled:
            print("stores", len([e for e in os.listdir(scratch_dir) if e.startswith("obdk-")]), flush=True)
            os.kill(os.getpid(), sig)
        return out
    setattr(where[0], where[1], hooked)
    sys.exit(main(sys.argv[4:]))
""")


def _child(phase, sig, scratch_dir, argv, env_extra=None):
    env = {**os.environ, "PYTHONPATH": REPO, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", CHILD, phase, sig, str(scratch_dir), *map(str, argv)],
                          capture_output=True, text=True, env=env, timeout=600)


def _stores(d):
    return sorted(e for e in os.listdir(d) if e.startswith("obdk-"))


@pytest.mark.parametrize("phase,sig", [("boundary", "SIGTERM"), ("statistics", "SIGTERM"), ("spectra", "SIGHUP"),
                                       ("correction", "SIGTERM"), ("save", "SIGTERM")])
def test_a_signal_at_each_streamed_phase_leaves_no_store(tiny_model_dir, data_dir, tmp_path, phase, sig):
    work = tmp_path / "scratch"
    work.mkdir()
    argv = ["compress", tiny_model_dir, *ARGS, "--out", tmp_path / "out", "--data-dir", data_dir, "--stream",
            "--scratch-dir", work, "--max-host-memory", "0"]
    r = _child(phase, sig, work, argv)
    assert r.returncode == -getattr(signal, sig), r.stderr[-3000:]  # died of the signal, as without obdk's handler
    held = [int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("stores ")]
    assert held and (held[0] >= 1 or phase == "boundary"), r.stdout  # the kill came while stores were on disk
    assert _stores(work) == []


def test_an_ignored_sighup_stays_ignored(tmp_path):
    code = textwrap.dedent(f"""
        import os, signal
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        from obdk import scratch
        p = scratch.new_store("obdk-kept-", {str(tmp_path)!r}, "test")
        os.kill(os.getpid(), signal.SIGHUP)
        print("alive", os.path.isdir(p))
        os.kill(os.getpid(), signal.SIGTERM)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
    assert "alive True" in r.stdout and r.returncode == -signal.SIGTERM, r.stderr
    assert _stores(tmp_path) == []


def _make_store_and(how, where):
    code = textwrap.dedent(f"""
        import os, signal, sys, time
        from obdk import scratch
        p = scratch.new_store("obdk-spectra-", {str(where)!r}, "test")
        open(os.path.join(p, "layer-0.safetensors"), "wb").write(b"x" * 1000)
        print(p, flush=True)
        if {how!r} == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.stdin.read()  # alive until the test closes stdin
    """)
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": REPO})


def test_stores_of_killed_processes_are_swept_with_one_line(tmp_path, caplog):
    alive = _make_store_and("wait", tmp_path)  # (first: a new store sweeps its directory, this one would sweep the dead)
    alive_path = alive.stdout.readline().strip()
    dead = _make_store_and("kill", tmp_path)
    dead_path = dead.stdout.readline().strip()
    assert dead.wait() == -signal.SIGKILL and os.path.isdir(dead_path)  # SIGKILL: no handler can run
    foreign = tmp_path / "obdk-kept-olderversion"  # no pid@host in its name: never touched
    foreign.mkdir()
    gone_pid = dead.pid
    other_host = tmp_path / f"obdk-factors-{gone_pid}@not-this-host.abcd1234"  # another machine's (shared fs)
    other_host.mkdir()
    spill = tmp_path / f"obdk-stream-{gone_pid}@{scratch._host()}.abcd1234.bin"  # a dead run's spill file
    spill.write_bytes(b"x" * 100)
    try:
        with caplog.at_level("WARNING", logger="obdk.scratch"):
            removed = scratch.sweep(tmp_path, force=True)
        assert sorted(removed) == sorted([os.path.realpath(dead_path), os.path.realpath(spill)])
        assert not os.path.exists(dead_path) and not spill.exists()
        assert os.path.isdir(alive_path) and foreign.is_dir() and other_host.is_dir()
        lines = [r.getMessage() for r in caplog.records if r.name == "obdk.scratch"]
        assert len(lines) == 1 and "2 stale scratch store" in lines[0] and os.path.basename(dead_path) in lines[0]
    finally:
        alive.stdin.close()
        alive.wait()
    assert scratch.sweep(tmp_path, force=True) == [os.path.realpath(alive_path)]  # its owner is gone now


def test_the_next_streamed_run_sweeps_a_killed_runs_stores(tiny_model_dir, data_dir, tmp_path, capsys):
    work = tmp_path / "scratch"
    work.mkdir()
    argv = ["compress", tiny_model_dir, *ARGS, "--out", tmp_path / "out", "--data-dir", data_dir, "--stream",
            "--scratch-dir", work, "--max-host-memory", "0"]
    r = _child("correction", "SIGKILL", work, argv)
    assert r.returncode == -signal.SIGKILL and len(_stores(work)) >= 2, r.stderr[-2000:]
    again = [a if a != tmp_path / "out" else tmp_path / "out2" for a in argv]
    r = subprocess.run([sys.executable, "-m", "obdk", *map(str, again)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": REPO}, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    said = [line for line in r.stderr.splitlines() if "stale scratch store" in line]
    assert len(said) == 1 and str(work) in said[0], r.stderr[-2000:]
    assert _stores(work) == []


# --------------------------------------------------------------------------- class 2: writable, vanishing


def test_writable_dir_tries_the_write(tmp_path):
    assert scratch.writable_dir(tmp_path, "--scratch-dir") == str(tmp_path)
    assert not [e for e in os.listdir(tmp_path)]  # the probe is removed
    for bad in ("/proc", tmp_path / "nope", tmp_path / "f"):
        (tmp_path / "f").write_text("x")
        with pytest.raises(ConfigError, match=f"--scratch-dir {bad}"):
            scratch.writable_dir(bad, "--scratch-dir")


def test_unwritable_scratch_and_out_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import obdk.cli as cli

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(cli, "_load", no_load)
    for extra, named in ((["--stream", "--scratch-dir", "/proc", "--out", tmp_path / "o"], "--scratch-dir /proc"),
                         (["--out", "/proc/x"], "/proc")):
        code = main([str(a) for a in ["compress", tmp_path / "no-model", "--keep", "0.5", *extra]])
        err = capsys.readouterr().err
        assert code == 2 and named in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_save_pretrained_to_an_unwritable_place_is_an_obdk_error(tiny_llama):
    import obdk
    with pytest.raises(ObdkError, match="/proc"):
        obdk.save_pretrained(tiny_llama, "/proc/x")


def test_a_scratch_dir_removed_mid_run_is_one_line(tmp_path):
    import torch

    from obdk.calibrate.layer_statistics import LayerStatistics
    from obdk.correct.factor_store import FactorStore
    from obdk.stream.boundary import BoundaryStore
    from obdk.stream.budget import HostBudget
    gone = tmp_path / "gone"
    gone.mkdir()
    fs = FactorStore(scratch_dir=gone, budget=HostBudget(0))
    bs = BoundaryStore(0, gone)
    LayerStatistics(0, gone)
    gone.rmdir()
    with pytest.raises(ConfigError, match=f"FactorStore: cannot create a scratch directory in {gone}"):
        fs.put_layer(0, {"m": (torch.ones(2, 3), torch.ones(3, 2), 0.0)})
    with pytest.raises(ConfigError, match=f"calibrate_streamed: cannot create a scratch (directory|file) in {gone}"):
        bs.alloc((2, 3), torch.float32)
    gone.mkdir()  # the store's own directory removed after its first spill
    fs = FactorStore(scratch_dir=gone, budget=HostBudget(0))
    fs.put_layer(0, {"m": (torch.ones(2, 3), torch.ones(3, 2), 0.0)})
    import shutil
    shutil.rmtree(fs.scratch_path)
    with pytest.raises(ObdkError, match="is gone"):
        fs["m"]
    with pytest.raises(ConfigError, match=f"cannot write .* to scratch_dir {gone}"):
        fs.put_layer(1, {"n": (torch.ones(2, 3), torch.ones(3, 2), 0.0)})
