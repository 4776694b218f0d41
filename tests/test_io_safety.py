"""What save_pretrained refuses, the save protocol under faults, and the checks every load path runs."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import obdk
from obdk import hub, io
from obdk.errors import CheckpointError, ObdkError, OutputPathError
from obdk.io import writer as io_writer
from obdk.models import set_module
from obdk.nn import LowRankLinear
from tests.conftest import make_char_tokenizer, make_tiny_llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UP, Q = "model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"


def _lowrank(rank=8, seed=0):
    m = make_tiny_llama(seed=seed)
    for name in (UP, Q):
        lin = m.get_submodule(name)
        u, s, vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
        set_module(m, name, LowRankLinear.from_factors(vh[:rank], u[:, :rank] * s[:rank], None))
    return m


def _logits(m, ids=torch.arange(20).view(2, 10)):
    with torch.no_grad():
        return m(ids).logits


def _ranks(d):
    return json.loads((d / "config.json").read_text())["quantization_config"]["ranks"]


def _tree(d):
    return sorted((str(p.relative_to(d)), p.read_bytes() if p.is_file() else None) for p in d.rglob("*"))


@pytest.fixture
def user_dir(tmp_path):
    d = tmp_path / "mine"
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_text("my notes")
    (d / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return d


# --------------------------------------------------------------------------- what save refuses


def test_user_directory_is_never_deleted(user_dir):
    before = _tree(user_dir)
    with pytest.raises(OutputPathError) as e:
        io.save_pretrained(_lowrank(), user_dir)
    msg = str(e.value)
    assert str(user_dir) in msg and "notes.txt" in msg and "not an obdk checkpoint" in msg and "--overwrite" in msg
    assert _tree(user_dir) == before
    assert io.temporaries(user_dir) == []
    io.save_pretrained(_lowrank(), user_dir, overwrite=True)  # asked for explicitly
    assert not (user_dir / "notes.txt").exists() and _ranks(user_dir) == {UP: 8, Q: 8}


def test_empty_dir_and_own_checkpoint_replaced_without_overwrite(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    io.save_pretrained(_lowrank(8), d)
    io.save_pretrained(_lowrank(4), d)
    assert _ranks(d) == {UP: 4, Q: 4}
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporaries left
    manifest = json.loads((d / io.MANIFEST_FILE).read_text())["files"]
    assert "model.safetensors" in manifest and "config.json" in manifest


def test_checkpoint_with_user_files_refused(tmp_path):
    d = io.save_pretrained(_lowrank(8), tmp_path / "ck")
    (d / "README.md").write_text("model card I wrote")
    with pytest.raises(OutputPathError, match=r"obdk did not write \(README\.md\)"):
        io.save_pretrained(_lowrank(4), d)
    assert _ranks(d) == {UP: 8, Q: 8} and (d / "README.md").exists()
    # an obdk checkpoint written before manifests: tokenizer/model files are obdk's, others are not
    (d / io.MANIFEST_FILE).unlink()
    make_char_tokenizer().save_pretrained(d)
    with pytest.raises(OutputPathError, match="README.md"):
        io.check_writable(d)
    (d / "README.md").unlink()
    assert io.check_writable(d) == d


def test_regular_file_and_path_under_a_file(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"precious")
    with pytest.raises(OutputPathError, match=r"is an existing file \(8 bytes\).*--overwrite"):
        io.save_pretrained(_lowrank(), f)
    assert f.read_bytes() == b"precious" and io.temporaries(f) == []
    for under in (f / "out", f / "a" / "b"):
        t0 = time.perf_counter()
        with pytest.raises(OutputPathError, match=r"under .*model\.bin, which is a regular file"):
            io.check_writable(under, overwrite=True)
        assert time.perf_counter() - t0 < 1.0
        with pytest.raises(OutputPathError, match="regular file"):
            io.save_pretrained(_lowrank(), under, overwrite=True)
    io.save_pretrained(_lowrank(), f, overwrite=True)
    assert f.is_dir() and _ranks(f) == {UP: 8, Q: 8}


def test_cwd_and_its_parents_refused_even_with_overwrite(tmp_path, monkeypatch):
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("x")
    monkeypatch.chdir(work)
    for spec in (".", "./", str(work), "..", str(tmp_path)):
        with pytest.raises(OutputPathError, match="current directory"):
            io.check_writable(spec, overwrite=True)
    with pytest.raises(OutputPathError, match="is the current directory"):
        io.save_pretrained(_lowrank(), ".", overwrite=True)
    assert (work / "keep.txt").read_text() == "x"
    with pytest.raises(OutputPathError, match="empty"):
        io.check_writable("")
    assert io.check_writable("sub/new") == work / "sub" / "new" and not (work / "sub").exists()  # no side effect


def test_source_directory_refused_even_with_overwrite(tmp_path):
    src = tmp_path / "dense"
    dense = make_tiny_llama()
    dense.save_pretrained(src)
    before = _tree(src)
    for out in (src, tmp_path, src / ".." / "dense"):
        with pytest.raises(OutputPathError, match="loaded from.*refused even with --overwrite"):
            io.save_pretrained(_lowrank(), out, source_dir=src, overwrite=True)
    assert _tree(src) == before
    # without source_dir: the directory in the model's config (_name_or_path) is protected too
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(src)
    with pytest.raises(OutputPathError, match="loaded from"):
        io.save_pretrained(m, src, overwrite=True)
    ck = io.save_pretrained(_lowrank(), tmp_path / "ck")
    m2 = obdk.load_pretrained(ck)
    with pytest.raises(OutputPathError, match="loaded from"):
        io.save_pretrained(m2, ck, overwrite=True)
    assert _tree(src) == before
    inside = io.save_pretrained(_lowrank(), src / "compressed", source_dir=src)  # beside the source is fine
    assert _ranks(inside) == {UP: 8, Q: 8}


def test_symlink_target(tmp_path, user_dir):
    link = tmp_path / "link"
    link.symlink_to(user_dir)
    before = _tree(user_dir)
    with pytest.raises(OutputPathError, match="symbolic link"):
        io.save_pretrained(_lowrank(), link)
    io.save_pretrained(_lowrank(), link, overwrite=True)
    assert not link.is_symlink() and _ranks(link) == {UP: 8, Q: 8}
    assert _tree(user_dir) == before  # the link's target is left alone


def test_mixed_factor_dtypes_refused_before_writing(tmp_path):
    m = _lowrank()
    m.get_submodule(UP).to(torch.bfloat16)
    with pytest.raises(CheckpointError, match="several dtypes"):
        io.save_pretrained(m, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


# --------------------------------------------------------------------------- temporaries and recovery


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_cleaned_live_ones_kept(tmp_path):
    d = io.save_pretrained(_lowrank(8), tmp_path / "ck")
    dead = _dead_pid()
    stale = [tmp_path / ".ck.obdk-tmp-0badf00d", tmp_path / f".ck.obdk-tmp-{dead}-0123abcd",
             tmp_path / f".ck.obdk-old-{dead}-4567abcd", tmp_path / ".ck.obdk-old-89abcdef"]
    for s in stale:
        s.mkdir()
        (s / "model.safetensors").write_bytes(b"x" * 10)
    live = tmp_path / f".ck.obdk-tmp-{os.getppid()}-feedbeef"  # another process writing right now
    live.mkdir()
    other = tmp_path / f".other.obdk-tmp-{dead}-0123abcd"  # another target's: not ours to touch
    other.mkdir()
    obdk.load_pretrained(d)  # a load cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ck", live.name, other.name])
    for s in stale[:2]:
        s.mkdir()
    io.save_pretrained(_lowrank(4), d)  # and so does a save
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ck", live.name, other.name])


def test_interrupted_swap_restored_by_next_load(tmp_path):
    d = io.save_pretrained(_lowrank(8), tmp_path / "ck")
    old = tmp_path / f".ck.obdk-old-{_dead_pid()}-0123abcd"
    os.rename(d, old)  # a kill between the two renames: nothing at the target
    newer = tmp_path / f".ck.obdk-tmp-{_dead_pid()}-4567abcd"
    newer.mkdir()
    assert io.recover(d)["restored"] == old
    assert _ranks(d) == {UP: 8, Q: 8} and io.temporaries(d) == []
    os.rename(d, old)
    m, tok = None, None
    make_char_tokenizer().save_pretrained(old)
    m, tok = hub.load_model(d)  # the CLI's loader restores it too
    assert isinstance(m.get_submodule(UP), LowRankLinear) and io.temporaries(d) == []


class _Killed(BaseException):
    """A simulated SIGKILL: nothing after it runs (every later filesystem call fails too)."""


class _Faults:
    """Counts the save's filesystem steps (renames, removals, shard writes, the shards' renames inside the
    temporary directory by ``os.replace``); fails at step ``k``."""

    def __init__(self, monkeypatch, k, kill):
        self.k, self.kill, self.n, self.dead, self.steps = k, kill, 0, False, []
        for mod, name in ((os, "rename"), (os, "replace"), (os, "unlink"), (shutil, "rmtree"),
                          (io_writer, "_write_shard")):
            monkeypatch.setattr(mod, name, self._wrap(name, getattr(mod, name)))

    def _wrap(self, name, fn):
        def step(*a, **kw):
            if self.dead:
                raise _Killed(f"{name} after the kill")
            self.n += 1
            self.steps.append(name)
            if self.n == self.k:
                self.dead = self.kill
                raise (_Killed if self.kill else OSError)(f"injected fault at step {self.k} ({name})")
            return fn(*a, **kw)
        return step


@pytest.mark.parametrize("kill", [True, False], ids=["kill", "exception"])
@pytest.mark.parametrize("existing", [True, False], ids=["replace", "fresh"])
def test_fault_at_every_step_leaves_old_or_new(tmp_path, monkeypatch, kill, existing):
    old_m, new_m = _lowrank(8, seed=0), _lowrank(4, seed=1)
    ref_old, ref_new = _logits(old_m), _logits(new_m)
    shard = 60_000  # several shards: several writer steps

    def run(k, root):
        d = root / "ck"
        if existing:
            io.save_pretrained(old_m, d, max_shard_bytes=shard)
        with monkeypatch.context() as mp:
            f = _Faults(mp, k, kill)
            try:
                io.save_pretrained(new_m, d, max_shard_bytes=shard)
                failed = False
            except (_Killed, OSError):
                failed = True
        return d, f, failed

    _, dry, failed = run(0, tmp_path / "dry")
    assert not failed and dry.n >= 3 + existing  # shard writes, the renames (and the old copy's removal)
    for k in range(1, dry.n + 1):
        root = tmp_path / f"k{k}"
        d, f, failed = run(k, root)
        # a failure to remove the old copy after the swap is only logged (the new checkpoint is complete)
        removing_old = existing and k - 1 >= dry.steps.index("rmtree")  # rmtree's own unlinks count as steps
        assert failed or (not kill and removing_old), f"step {k} ({dry.steps[k - 1]})"
        temps = io.temporaries(d)
        # the new checkpoint is in place exactly when its rename (the last one of the swap) has run
        expect_new = dry.steps[:k - 1].count("rename") >= (2 if existing else 1)
        if existing and not kill:  # an exception: the target is complete at once (rolled back or swapped)
            assert d.is_dir()
        if existing and not d.exists():  # killed mid-swap: the old copy is under its obdk-old name
            assert kill and any(tag == io.OLD_TAG for _, tag, _ in temps)
        if not existing and not expect_new:
            assert not d.exists()  # nothing was there, nothing is: no half-written directory at the name
            with pytest.raises(CheckpointError, match="no such checkpoint directory"):
                obdk.load_pretrained(d)
        else:
            m = obdk.load_pretrained(d)  # recovers, then loads a complete checkpoint: old or new
            assert (m.get_submodule(UP).rank == 4) == expect_new, f"step {k} ({dry.steps[k - 1]})"
            torch.testing.assert_close(_logits(m), ref_new if expect_new else ref_old, rtol=0, atol=0)
        assert io.temporaries(d) == [], f"step {k}: {io.temporaries(d)}"
        io.save_pretrained(new_m, d, max_shard_bytes=shard)  # and the next save simply works
        assert _ranks(d) == {UP: 4, Q: 4} and io.temporaries(d) == []
        assert sorted(p.name for p in root.iterdir()) == ["ck"]


def test_real_kill_between_the_renames(tmp_path):
    d = io.save_pretrained(_lowrank(8), tmp_path / "ck")
    child = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {REPO!r})
        from obdk import io
        from tests.test_io_safety import _lowrank
        real, n = os.rename, [0]
        def rename(a, b):
            n[0] += 1
            if n[0] == 2:
                os._exit(9)  # killed after the old copy moved aside, before the new one moved in
            real(a, b)
        os.rename = rename
        io.save_pretrained(_lowrank(4, seed=1), {str(d)!r})
    """)
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 9, r.stderr
    assert not d.exists() and {tag for _, tag, _ in io.temporaries(d)} == {io.TMP_TAG, io.OLD_TAG}
    m = obdk.load_pretrained(d)  # the writer is dead: its old copy is restored, its temporary removed
    assert m.get_submodule(UP).rank == 8 and io.temporaries(d) == []


# --------------------------------------------------------------------------- load checks


@pytest.fixture
def ck(tmp_path):
    m = _lowrank()
    return m, io.save_pretrained(m, tmp_path / "ck", tokenizer=make_char_tokenizer())


def _edit_tensors(d, fn):
    from safetensors.torch import load_file, save_file
    f = d / "model.safetensors"
    sd = load_file(str(f))
    fn(sd)
    save_file(sd, str(f), metadata={"format": "pt"})


def _edit_config(d, fn):
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _hf_load(d, **kw):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(d), **kw)


def _both_loaders(d, match, **kw):
    for load in (lambda: obdk.load_pretrained(d, **kw), lambda: _hf_load(d, **kw), lambda: hub.load_model(d, **kw)):
        with pytest.raises(CheckpointError, match=match):
            load()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_tensor_refused_by_every_loader(ck, bad):
    _, d = ck
    _edit_tensors(d, lambda sd: sd[f"{UP}.weight_b"].view(-1).__setitem__(7, bad))
    _both_loaders(d, rf"model\.safetensors: tensor '{UP}\.weight_b' holds (NaN|Inf) in 1 of")
    _edit_tensors(d, lambda sd: sd[f"{UP}.weight_b"].view(-1).__setitem__(7, 0.0))
    _edit_tensors(d, lambda sd: sd["model.norm.weight"].__setitem__(0, bad))  # a dense tensor too
    _both_loaders(d, r"tensor 'model\.norm\.weight' holds")


def test_cast_overflow_is_refused(ck):
    _, d = ck
    _edit_tensors(d, lambda sd: sd[f"{Q}.weight_a"].view(-1).__setitem__(0, 1e6))
    obdk.load_pretrained(d)  # finite in fp32
    with pytest.raises(CheckpointError, match=rf"'{Q}\.weight_a' holds Inf.*after the cast to float16"):
        obdk.load_pretrained(d, dtype=torch.float16)
    with pytest.raises(CheckpointError, match=rf"'{Q}\.weight_a' holds Inf"):
        _hf_load(d, dtype=torch.float16)


@pytest.mark.parametrize("rank", [24.7, 8.0, "8", True, 0, -3, None])
def test_rank_must_be_a_positive_integer(ck, rank):
    _, d = ck
    _edit_config(d, lambda c: c["quantization_config"]["ranks"].__setitem__(UP, rank))
    _both_loaders(d, rf"ranks\['{UP}'\] = {__import__('re').escape(repr(rank))} is not a positive integer")


@pytest.mark.parametrize("drop", [f"{UP}.weight_b", f"{Q}.weight_a", "model.layers.1.mlp.down_proj.weight"])
def test_missing_tensor_refused_by_every_loader(ck, drop):
    _, d = ck
    _edit_tensors(d, lambda sd: sd.pop(drop))
    _both_loaders(d, rf"tensor '{__import__('re').escape(drop)}' missing")


def test_factor_in_another_dtype_refused(ck):
    _, d = ck
    _edit_tensors(d, lambda sd: sd.__setitem__(f"{UP}.weight_b", sd[f"{UP}.weight_b"].to(torch.bfloat16)))
    _both_loaders(d, rf"tensor '{UP}\.weight_b' is stored as bfloat16, but .*config\.json records the factors "
                     r"as float32")


def test_unexpected_tensor_and_wrong_module_refused(ck):
    m, d = ck
    _edit_tensors(d, lambda sd: sd.__setitem__("model.layers.0.extra", torch.zeros(3)))
    _both_loaders(d, r"unexpected tensors \['model\.layers\.0\.extra'\]")
    _edit_tensors(d, lambda sd: sd.pop("model.layers.0.extra"))
    _edit_config(d, lambda c: c["quantization_config"]["ranks"].__setitem__("model.layers.0.mlp", 4))
    _both_loaders(d, r"names module 'model\.layers\.0\.mlp', which is a LlamaMLP, not an nn\.Linear")


def test_transformers_with_obdk_loads_exactly_and_quietly(ck, caplog):
    m, d = ck
    with caplog.at_level("WARNING"):
        m2 = _hf_load(d)
    torch.testing.assert_close(_logits(m2), _logits(m), rtol=0, atol=0)
    assert "UNEXPECTED" not in caplog.text  # the tombstones are expected


def test_transformers_without_obdk_fails_loudly(ck):
    _, d = ck
    child = textwrap.dedent(f"""
        import sys
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(d)!r})
        except Exception as exc:
            assert "obdk" not in sys.modules
            print("REFUSED", type(exc).__name__, exc)
            sys.exit(3)
        print("LOADED")
    """)
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd="/")
    out = r.stdout + r.stderr
    assert r.returncode == 3 and "REFUSED RuntimeError" in out and "LOADED" not in out, out
    assert "Unknown quantization type, got obdk" in out and f"{UP}.weight" in out and "MISMATCH" in out


def test_quantization_config_removed_is_refused(ck):
    _, d = ck
    _edit_config(d, lambda c: c.pop("quantization_config"))
    with pytest.raises(RuntimeError, match="mismatch"):  # transformers itself: tombstones do not fit
        _hf_load(d)
    with pytest.raises(CheckpointError, match=r"holds obdk low-rank factors .* quantization_config is missing"):
        hub.load_model(d)
    with pytest.raises(CheckpointError, match="quant_method is not 'obdk'"):
        obdk.load_pretrained(d)


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    d = io.save_pretrained(_lowrank(), tmp_path / "ck")  # no tokenizer saved
    with pytest.raises(CheckpointError, match=r"obdk checkpoint .*ck: no loadable tokenizer"):
        hub.load_model(d)


@pytest.mark.parametrize("method", ["made-up-method", "gptq"])
def test_checkpoint_of_another_quant_method_is_a_clear_error(tmp_path, method):
    d = tmp_path / "q"
    make_tiny_llama().save_pretrained(d)
    make_char_tokenizer().save_pretrained(d)
    _edit_config(d, lambda c: c.__setitem__("quantization_config", {"quant_method": method, "bits": 4}))
    with pytest.raises(CheckpointError, match=rf"quant_method={method!r}|{method!r}-quantized") as e:
        hub.load_model(d)
    assert isinstance(e.value, ObdkError) and "\n" not in str(e.value)


def test_hub_dispatch_still_loads_good_checkpoints(ck):
    m, d = ck
    m2, tok = hub.load_model(d, dtype="bf16")
    assert m2.get_submodule(UP).weight_a.dtype == torch.bfloat16 and tok.eos_token == "<eos>"
