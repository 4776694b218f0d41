"""A Llama-2-7B-shaped fp32 model larger than this machine's memory, compressed end to end from disk (issue #30).

The model: :mod:`benchmarks.scale7b_checkpoint` (random weights, Llama-2-7B's config, fp32, one safetensors shard
per decoder layer; 26.9 GB at 32 layers), built under ``--workdir`` unless it is there already. The run, for each
``--corrections`` entry (``none``; ``default``: the method's, zs+kfac for obd)::

    obdk compress MODEL --stream --weights-on-disk --method obd --keep 0.8 --calib wikitext2:validation \\
        --nsamples 8 --seqlen 256 --scratch-dir SCRATCH --max-host-memory BYTES --json --out OUT

started through the ``_LAUNCH`` launcher of :mod:`benchmarks.bench_stream_memory` (fork + exec from a ~10 MiB
process, ``os.wait4``: the peak RSS is read from outside, and ``/proc/PID/status`` is sampled for RssAnon/RssFile).
While it runs a thread samples, every ``--poll`` seconds: the scratch directory's bytes (its files, plus any
memory-mapped boundary buffer already unlinked from it, read from ``/proc/PID/maps``), the bytes of the output
checkpoint and its temporary directory, the file system's free bytes, the load average, the process's RSS (and
in which phase it was seen), and the progress bars on its stderr, timestamped: the forward sweep, the recomputed
backward sweep and each layer's decompositions (run inside the backward sweep, after the layer's last batch)
per decoder layer. Then, each from its own launcher: ``obdk eval OUT --dtype EVAL_DTYPE --windows W`` (perplexity
of the compressed checkpoint; in bf16 when its fp32 tensors would not fit next to the other tenants of this
machine) and a load with ``transformers.AutoModelForCausalLM.from_pretrained`` after ``import obdk`` (its
quantizer), with one forward whose logits must be finite. The row also holds what ``obdk plan`` predicts for the
same config and settings (``plan_*`` columns) and the FLOPs per layer it counts, so the achieved rates can be read.

Disk: the model (26.9 GB), the scratch (the kept spectra beyond ``--max-host-memory``: 0.81 GB per layer, compacted
to break-even in fp32), the compressed checkpoint (~22 GB at keep 0.8), at once during the save. Everything is
under ``--workdir`` (outside the repository); the scratch and the compressed checkpoint are removed after each
run unless ``--keep-outputs``, the model only with ``--remove-model``. The checks refuse to start a run that would
leave less than ``--min-free`` bytes free.

``python -m benchmarks.bench_scale_7b --workdir /work/scale7b --layers 32 --corrections none``; rows to
``benchmarks/results/scale_7b.csv``, child logs to ``benchmarks/results/scale_7b.log``. A dry run of minutes:
``--layers 2 --hidden 256 --inter 688 --heads 4 --nsamples 2 --seqlen 32 --eval-windows 1``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

from .bench_stream_memory import _spawn
from .core.env import RESULTS, env_fields, git_sha, loadavg, timestamp
from .core.rows import print_table, write_csv

OUT = RESULTS / "scale_7b.csv"
_BAR = re.compile(r"obdk stream \[(forward|backward) sweep\] layer (\d+)/(\d+):\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")
GB = 1e9


# =========================================================================== sampling a running compression


def _tree_bytes(path: Path) -> int:
    """Bytes allocated on disk by the regular files under ``path`` (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def _mapped_deleted_bytes(pid: int, under: str) -> int:
    """Bytes of files under ``under`` that ``pid`` has memory-mapped after unlinking them (the streamed pass's
    spilled boundary buffers: ``du`` cannot see them), one count per file."""
    sizes: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].startswith(under) and parts[5].rstrip().endswith("(deleted)"):
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    name = parts[5].rstrip()
                    sizes[name] = max(sizes.get(name, 0), hi - lo)
    except OSError:
        return 0
    return sum(sizes.values())


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` so far (``/proc/PID/stat``), None when it cannot be read."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            vals = {k: int(v.split()[0]) for k, _, v in (ln.partition(":") for ln in f) if k in ("RssAnon", "RssFile")}
        return vals.get("RssAnon", 0) + vals.get("RssFile", 0)
    except (OSError, ValueError):
        return 0


class Watcher(threading.Thread):
    """Samples a launched ``obdk compress`` every ``interval`` s until :meth:`stop` (see the module docstring)."""

    def __init__(self, launcher: int, scratch: Path, out: Path, log_path: Path, interval: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.launcher, self.scratch, self.out, self.log_path, self.interval = launcher, scratch, out, log_path, interval
        self._halt = threading.Event()
        self.t0 = time.perf_counter()
        self._offset = log_path.stat().st_size if log_path.exists() else 0
        self._tail = ""
        self.pid = None
        self.peak = {"scratch": 0, "scratch_files": 0, "scratch_mapped": 0, "out": 0, "scratch_plus_out": 0}
        self.min_free = None
        self.loads: list[float] = []
        self.rss_by_phase: dict[str, int] = {}
        self.phase = "load"
        self.cpu_at_save = None
        self.first: dict[tuple, float] = {}  # (sweep, layer) -> first time seen
        self.done: dict[tuple, float] = {}  # (sweep, layer) -> first time its last batch was counted
        self.cpu = 0.0  # the child's CPU seconds at the last sample: the clock of the *_cpu tables
        self.first_cpu: dict[tuple, float] = {}
        self.done_cpu: dict[tuple, float] = {}
        self.timeline: list[tuple] = []

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()  # the last lines of the log

    def _child(self) -> int | None:
        if self.pid is None:
            try:
                kids = Path(f"/proc/{self.launcher}/task/{self.launcher}/children").read_text().split()
                self.pid = int(kids[0]) if kids else None
            except (OSError, ValueError):
                return None
        return self.pid

    def _read_log(self, now: float) -> None:
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return
        self._offset += len(chunk)
        text = self._tail + chunk.decode("utf-8", "replace")
        segs = re.split(r"[\r\n]", text)
        self._tail = segs.pop()  # maybe incomplete
        for seg in segs + [self._tail]:
            m = _BAR.search(seg)
            if not m:
                if "obdk stream [fingerprint]" in seg and self.phase == "load":
                    self.phase = "fingerprint"
                continue
            sweep, layer, n, count, total = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4)), int(m.group(5))
            self.phase = f"{sweep} sweep"
            self.first.setdefault((sweep, layer), now)
            self.first_cpu.setdefault((sweep, layer), self.cpu)
            nb = total // n
            finished = layer * nb if sweep == "forward" else (n - layer + 1) * nb
            if count >= finished:
                self.done.setdefault((sweep, layer), now)
                self.done_cpu.setdefault((sweep, layer), self.cpu)
                if sweep == "backward":
                    self.phase = "decompose"

    def sample(self) -> None:
        now = time.perf_counter() - self.t0
        pid = self._child()
        cpu = _cpu_s(pid) if pid else None
        self.cpu = self.cpu if cpu is None else cpu
        self._read_log(now)
        files = _tree_bytes(self.scratch)
        mapped = _mapped_deleted_bytes(pid, str(self.scratch)) if pid else 0
        outs = sum(_tree_bytes(p) for p in self.out.parent.iterdir()
                   if p.name == self.out.name or p.name.startswith(f".{self.out.name}.obdk-"))
        if outs and self.phase in ("decompose", "backward sweep"):
            self.phase = "save"
            self.cpu_at_save = self.cpu
        free = shutil.disk_usage(self.scratch.parent).free
        self.min_free = free if self.min_free is None else min(self.min_free, free)
        for k, v in (("scratch", files + mapped), ("scratch_files", files), ("scratch_mapped", mapped), ("out", outs),
                     ("scratch_plus_out", files + mapped + outs)):
            self.peak[k] = max(self.peak[k], v)
        self.loads.append(os.getloadavg()[0])
        if pid:
            rss = _rss_kib(pid)
            self.rss_by_phase[self.phase] = max(self.rss_by_phase.get(self.phase, 0), rss)
        if not self.timeline or now - self.timeline[-1][0] >= 60:
            self.timeline.append((round(now), self.phase, files + mapped, outs, free, self.loads[-1]))

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def layer_times(self, backward_sweep_s: float | None, cpu: bool = False) -> dict:
        """Per decoder layer (1-based, as the bars count): forward sweep, backward compute, decompositions (wall
        seconds; with ``cpu`` the child's CPU seconds, which a loaded machine inflates less; the last layer's
        decompositions then end at the last sample)."""
        first, done = (self.first_cpu, self.done_cpu) if cpu else (self.first, self.done)
        out: dict[str, dict[int, float]] = {"forward": {}, "backward": {}, "decompose": {}}
        fwd = sorted(layer for (s, layer) in first if s == "forward")
        for layer in fwd:
            nxt = first.get(("forward", layer + 1)) or first.get(("backward", layer))
            if nxt is not None:
                out["forward"][layer] = nxt - first[("forward", layer)]
        bwd = sorted((layer for (s, layer) in first if s == "backward"), reverse=True)
        for layer in bwd:
            start, end = first[("backward", layer)], done.get(("backward", layer))
            if end is None:
                continue
            out["backward"][layer] = end - start
            nxt = first.get(("backward", layer - 1))
            if nxt is None and layer == 1 and cpu:
                nxt = self.cpu_at_save
            if nxt is None and layer == 1 and not cpu and backward_sweep_s is not None and bwd:
                nxt = first[("backward", bwd[0])] + backward_sweep_s  # the sweep's own clock: its end
            if nxt is not None:
                out["decompose"][layer] = nxt - end
        return {k: {i: round(v, 1) for i, v in sorted(d.items())} for k, d in out.items()}


# =========================================================================== children


def child_hf_load(args) -> None:
    """Load ``args.hf_load`` with transformers (obdk's quantizer registered by ``import obdk``), one forward."""
    import torch
    from transformers import AutoModelForCausalLM

    import obdk  # noqa: F401  (registers the quantizer)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.hf_load, dtype=getattr(torch, args.eval_dtype))
    load_s = time.perf_counter() - t0
    lowrank = sum(isinstance(m, obdk.LowRankLinear) for m in model.modules())
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = model(ids).logits
    print(json.dumps({"hf_load_s": load_s, "hf_lowrank_modules": lowrank, "hf_class": type(model).__name__,
                      "hf_logits_finite": bool(torch.isfinite(logits).all()),
                      "hf_logits_std": float(logits.float().std())}), flush=True)


# =========================================================================== the run


def _last_json(text: str) -> dict:
    return json.loads([ln for ln in text.splitlines() if ln.startswith("{")][-1])


def _median(d: dict) -> float | str:
    return round(statistics.median(d.values()), 1) if d else ""


def _plan(args, model_dir: Path, correct: str) -> dict:
    """What ``obdk plan`` says for this run (the same config, method, windows, dtype and host budget)."""
    from obdk.planner import plan_run, read_model_config
    return plan_run(read_model_config(model_dir), method="obd", nsamples=args.nsamples, seqlen=args.seqlen,
                    dtype="float32", correct=None if correct == "default" else correct,
                    max_host_memory=args.max_host_memory)


def run_one(args, model_dir: Path, build: dict, correct: str, log_path: Path, child_env: dict) -> dict:
    work = Path(args.workdir)
    tag = f"L{args.layers}-{correct}"
    out, scratch = work / f"out-{tag}", work / f"scratch-{tag}"
    for p in (out, scratch):
        if p.exists():
            raise SystemExit(f"{p} exists (a previous run's?); remove it first")
    scratch.mkdir()
    plan = _plan(args, model_dir, correct)
    cmd = [sys.executable, "-m", "obdk", "compress", str(model_dir), "--stream", "--weights-on-disk", "--method", "obd",
           "--keep", str(args.keep), "--calib", "wikitext2:validation", "--nsamples", str(args.nsamples), "--seqlen",
           str(args.seqlen), "--data-dir", args.data_dir, "--scratch-dir", str(scratch), "--max-host-memory",
           str(args.max_host_memory), "--device", args.device, "--json", "--out", str(out)] \
        + (["--correct", correct] if correct != "default" else [])
    watch: list[Watcher] = []

    def start(pid: int) -> None:
        w = Watcher(pid, scratch, out, log_path, args.poll)
        w.start()
        watch.append(w)

    sha = git_sha()
    load0 = loadavg()
    try:
        text, ru = _spawn(cmd, log_path, env=child_env, launch=True, on_start=start)
    finally:
        if watch:
            watch[0].stop()
    w = watch[0]
    cli = _last_json(text)
    report = json.loads((out / "obdk_report.json").read_text())
    ranks = [m["rank"] for m in report["modules"]]
    stages = {k: round(v["seconds"], 1) for k, v in cli["stages"].items()}
    per_layer = w.layer_times(cli["stages"].get("calibration/backward sweep", {}).get("seconds"))
    per_layer_cpu = w.layer_times(None, cpu=True)
    ckpt_bytes = _tree_bytes(out)
    shards = sorted(p.stat().st_size for p in out.glob("*.safetensors"))
    shutil.rmtree(scratch)
    # ---- the compressed checkpoint: obdk eval, then transformers
    fp32_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    eval_dtype = args.eval_dtype if args.eval_dtype != "auto" else ("float32" if fp32_bytes < 0.4 * mem else "bfloat16")
    text_e, ru_e = _spawn([sys.executable, "-m", "obdk", "eval", str(out), "--seqlen", str(args.seqlen), "--windows",
                           str(args.eval_windows), "--dtype", eval_dtype, "--data-dir", args.data_dir, "--json"],
                          log_path, env=child_env, launch=True)
    ev = _last_json(text_e)
    text_h, ru_h = _spawn([sys.executable, "-m", "benchmarks.bench_scale_7b", "--hf-load", str(out), "--eval-dtype",
                           eval_dtype], log_path, env=child_env, launch=True)
    hf = _last_json(text_h)
    if not args.keep_outputs:
        shutil.rmtree(out)
    samp = ru["sampled_kib"]
    L = args.layers
    fl = {k: plan.get(k) for k in ("calibration_flops", "decomposition_flops")}
    r = {"layers": L, "correct": correct if correct != "default" else "default (zs+kfac)", "method": "obd",
         "keep": args.keep, "hidden": build["config"]["hidden_size"], "inter": build["config"]["intermediate_size"],
         "vocab": build["config"]["vocab_size"], "dtype": "float32", "nsamples": args.nsamples, "seqlen": args.seqlen,
         "max_host_memory": args.max_host_memory, "model_params": build["params"],
         "model_disk_gb": round(build["disk_bytes"] / GB, 2), "model_shards": build["shards"],
         "mem_total_gib": round(mem / 2**30, 1),
         "peak_rss_gib": round(ru["maxrss_mib"] / 1024, 2),
         "sampled_max_rss_anon_gib": round(samp["RssAnon"] / 2**20, 2),
         "sampled_max_rss_file_gib": round(samp["RssFile"] / 2**20, 2),
         "rss_by_phase_gib": json.dumps({k: round(v / 2**20, 2) for k, v in w.rss_by_phase.items()}),
         "peak_scratch_gb": round(w.peak["scratch"] / GB, 2),
         "peak_scratch_mapped_gb": round(w.peak["scratch_mapped"] / GB, 2),
         "peak_out_gb": round(w.peak["out"] / GB, 2),
         "peak_scratch_plus_out_gb": round(w.peak["scratch_plus_out"] / GB, 2),
         "min_free_disk_gb": round((w.min_free or 0) / GB, 1),
         "wall_s": round(ru["wall_s"], 1), "user_s": round(ru["user_s"], 1), "sys_s": round(ru["sys_s"], 1),
         **{f"stage_{k.replace(' ', '_').replace('/', '__')}_s": v for k, v in stages.items()},
         "forward_layer_median_s": _median(per_layer["forward"]),
         "backward_layer_median_s": _median(per_layer["backward"]),
         "decompose_layer_median_s": _median(per_layer["decompose"]),
         "per_layer_s": json.dumps(per_layer),
         "forward_layer_median_cpu_s": _median(per_layer_cpu["forward"]),
         "backward_layer_median_cpu_s": _median(per_layer_cpu["backward"]),
         "decompose_layer_median_cpu_s": _median(per_layer_cpu["decompose"]),
         "per_layer_cpu_s": json.dumps(per_layer_cpu),
         "ranks_sum": sum(x for x in ranks if x is not None), "ranks_dense": sum(x is None for x in ranks),
         "keep_actual": cli["keep_actual"], "predicted_loss": report["predicted_loss"],
         "ckpt_disk_gb": round(ckpt_bytes / GB, 2), "ckpt_shards": len(shards),
         "ckpt_largest_shard_gb": round(shards[-1] / GB, 2) if shards else "",
         "eval_dtype": eval_dtype, "ppl": ev["ppl"], "ppl_windows": args.eval_windows,
         "eval_peak_rss_gib": round(ru_e["maxrss_mib"] / 1024, 2), "eval_wall_s": round(ru_e["wall_s"], 1),
         **hf, "hf_peak_rss_gib": round(ru_h["maxrss_mib"] / 1024, 2),
         **{f"plan_{k}": plan[k] for k in plan if k.endswith("_bytes") or k.endswith("_bytes_per_rank")},
         **{f"plan_{k}": v for k, v in fl.items()},
         "threads": args.threads, "loadavg_start": load0, "loadavg_mean": round(statistics.mean(w.loads), 2) if w.loads else "",
         "loadavg_max": round(max(w.loads), 2) if w.loads else "",
         "compress_device": args.device, **env_fields(args.device), "git_sha": sha, "timestamp": timestamp(), "loadavg_1m": loadavg()}
    with log_path.open("a") as log:
        log.write(f"\n# {tag}: timeline (s, phase, scratch bytes, output bytes, free bytes, load): "
                  f"{json.dumps(w.timeline)}\n# per-layer seconds: {json.dumps(per_layer)}\n")
    return r


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=os.environ.get("OBDK_SCALE_DIR"),
                    help="where the model, scratch and compressed checkpoint go (outside the repository; "
                         "default $OBDK_SCALE_DIR)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=None, help="dry runs: a narrower model (default Llama-2-7B's)")
    ap.add_argument("--inter", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--corrections", nargs="+", default=["none"], choices=["none", "default"])
    ap.add_argument("--keep", type=float, default=0.8)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--max-host-memory", type=int, default=4 << 30, help="--max-host-memory of the run (bytes)")
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--eval-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="auto: float32 when the compressed checkpoint is under 40%% of the machine's memory")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the children")
    ap.add_argument("--device", default="cpu", help="obdk compress --device (cuda: a GPU session's run)")
    ap.add_argument("--poll", type=float, default=2.0, help="seconds between samples of the running compression")
    ap.add_argument("--min-free", type=float, default=8e9, help="bytes that must stay free on the disk")
    ap.add_argument("--keep-outputs", action="store_true", help="leave the compressed checkpoint(s) in --workdir")
    ap.add_argument("--remove-model", action="store_true", help="remove the model checkpoint at the end")
    ap.add_argument("--data-dir", default=os.environ.get("OBDK_DATA_DIR", "/work/shared/data"))
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--log", default=str(RESULTS / "scale_7b.log"))
    ap.add_argument("--hf-load", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.hf_load:
        child_hf_load(args)
        return
    if not args.workdir:
        raise SystemExit("--workdir (or $OBDK_SCALE_DIR): a directory outside the repository with room for the model")
    from .scale7b_checkpoint import build
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    shape = {k: v for k, v in (("hidden_size", args.hidden), ("intermediate_size", args.inter),
                               ("num_attention_heads", args.heads), ("num_key_value_heads", args.heads)) if v}
    suffix = "" if not shape else "-" + "-".join(f"{v}" for v in shape.values())
    model_dir = work / f"llama7b-L{args.layers}{suffix}"
    build_rec = build(model_dir, args.layers, **shape)
    log_path = Path(args.log)
    child_env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
                 "TOKENIZERS_PARALLELISM": "false"}
    for correct in args.corrections:
        plan = _plan(args, model_dir, correct)
        # Plan.save(release=True) frees each layer's scratch as its shard is written, so scratch and the
        # compressed checkpoint peak together at about the larger of the two plus one 1 GiB shard
        # (2 layers measured: 2.34 GB against 1.62 GB scratch and a 2.3 GB checkpoint).
        need = max(plan.get("scratch_bytes_per_rank", 0), 0.85 * build_rec["disk_bytes"]) + 2**30
        free = shutil.disk_usage(work).free
        if free - need < args.min_free:
            raise SystemExit(f"{work}: {free / GB:.1f} GB free; the {correct} run needs about {need / GB:.1f} GB "
                             f"(scratch {plan.get('scratch_bytes_per_rank', 0) / GB:.1f} GB + the compressed "
                             f"checkpoint) and --min-free {args.min_free / GB:.1f} GB must stay free")
        r = run_one(args, model_dir, build_rec, correct, log_path, child_env)
        write_csv([r], args.out)
        print_table([r], ["layers", "correct", "peak_rss_gib", "peak_scratch_gb", "peak_scratch_plus_out_gb",
                          "wall_s", "ranks_sum", "ppl", "eval_dtype", "hf_logits_finite"])
    if args.remove_model:
        shutil.rmtree(model_dir)
    print(f"rows appended to {args.out}; child logs in {log_path}")


if __name__ == "__main__":
    main()
