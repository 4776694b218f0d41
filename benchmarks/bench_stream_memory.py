"""Memory of the layer-streamed calibration (``obdk.calibrate.stream``) against the resident pass.

Every variant runs in its own subprocess (``--child``); this process reads the child's peak RSS from
outside (``os.wait4`` → ``ru_maxrss``) and the child reports what it measured inside: the peak bytes of
live statistics accumulators (resident: every accumulator is allocated before the first window and held to
the end, so the peak is their total, checked against ``stats_nbytes``; streamed: ``info["peak_stats_bytes"]``,
counted as each layer's accumulators are allocated and handed off), wall time, the boundary-activation
bytes, and per-tensor norms of the statistics (a cheap cross-check of the variants; SmolLM2's statistics
are also saved and compared tensor by tensor).

Suites:

* ``llama7b-shape``: a random Llama-7B-*shaped* model (hidden 4096, ffn 11008, 32 MHA heads, bf16) with
  ``--layers`` decoder layers (default 2 and 4) and a 512-token vocabulary (the head costs nothing), on
  ``--windows`` × ``--seqlen`` random tokens (default 2 × 64), ``cx+cg``: ``resident``, ``streamed``
  (keeps every layer, returns the full ``Statistics``) and ``streamed-handoff`` (``on_layer`` takes each
  finished layer and drops it, as a decompose-and-free pipeline would).
* ``smollm2``: SmolLM2-135M (``obdk.hub.load_model("smollm2-135m")``) on WikiText-2 validation windows
  (``OBDK_DATA_DIR``, default ``/work/shared/data``), ``--smol-nsamples`` × ``--smol-seqlen`` (32 × 512),
  ``cx+cg``: ``resident`` and ``streamed``, with the max relative difference of every statistic.

* ``pipeline``: the whole compression, obdk's default ``LowRankConfig(method="obd", keep=--keep)`` (global
  ranks, zs+kfac corrections), ``prepare`` + ``Plan.apply`` on ``--pipeline-model`` (``smollm2-135m`` at
  ``--smol-nsamples`` × ``--smol-seqlen``; ``tiny`` for a dry run): ``pipeline-resident``, ``pipeline-streamed``
  (every layer's statistics kept on host memory for the corrections) and ``pipeline-streamed-scratch``
  (``max_host_memory=0``: each layer's statistics in a scratch safetensors file, read back one layer at a
  time). Wall time of prepare + apply, the ranks' hash, WikiText-2 test perplexity on ``--eval-windows``
  × 512, peak RSS, the statistics held on host (resident: all of them; streamed: peak of the kept store).

* ``disk``: the CLI's out-of-core path against the resident one. Random seeded fp32 Llamas (hidden 1024, ffn
  2816, 16 heads / 8 kv heads, vocabulary 128 with ``obdk.testing.make_char_tokenizer``) with ``--disk-layers``
  decoder layers (default 4 and 16), each saved by ``save_pretrained(safe_serialization=True,
  max_shard_size="100MB")`` into a temporary directory; for each, ``python -m obdk compress DIR --method obd
  --keep 0.8 --calib wikitext2:validation --nsamples 8 --seqlen 256 --json`` as ``resident`` (no ``--stream``),
  ``stream`` (``--stream``: the model in host memory) and ``stream-disk`` (``--stream --weights-on-disk
  --max-host-memory 0 --scratch-dir TMP``), each with ``--correct none`` and with obdk's default (zs+kfac). The
  compressed checkpoint's WikiText-2 perplexity (``--disk-eval-windows`` × 256) comes from a separate ``obdk
  eval`` child (in ``compress --eval-windows`` the loaded compressed model would be the run's peak). Rows in
  ``benchmarks/results/stream_disk.csv``.

The parent reads each child's peak RSS from ``os.wait4``'s ``ru_maxrss``. Linux carries the RSS high-water mark of
the process that forked into the exec'd child's ``ru_maxrss``, so a child forked straight from this process (torch
imported: a few hundred MiB) can never report less than this process's RSS. The ``disk`` suite therefore starts
each child through a small launcher (``_LAUNCH``: ``os.fork`` + ``execvp`` from a process of ~10 MiB, which
``wait4``s it and samples ``/proc/PID/status`` every 50 ms for the largest ``RssAnon`` / ``RssFile`` seen); the
older suites spawn directly (their rows include that floor).

``python -m benchmarks.bench_stream_memory [--suites llama7b-shape smollm2 pipeline disk]``; rows append to
``benchmarks/results/stream_memory.csv`` (``stream_pipeline.csv``, ``stream_disk.csv``). Run it alone on the
machine (it is a memory measurement).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .core.env import RESULTS, env_fields, git_sha, loadavg, timestamp
from .core.rows import print_table, write_csv

OUT = RESULTS / "stream_memory.csv"
PIPELINE_OUT = RESULTS / "stream_pipeline.csv"
DISK_OUT = RESULTS / "stream_disk.csv"
_TAG = "OBDK_BENCH_RESULT "
_RU_TAG = "OBDK_BENCH_RUSAGE "
#: ``python -c _LAUNCH ARGV...``: fork + exec ARGV from this small process (its ~10 MiB are the floor of the
#: child's ru_maxrss, not the bench's), wait4 it, print its rusage and the largest RssAnon/RssFile/RssShmem
#: (KiB) seen in /proc/PID/status every 50 ms, exit with its status.
_LAUNCH = r'''
import json, os, sys, time
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[1], sys.argv[1:])
    finally:
        os._exit(127)
peak = {"RssAnon": 0, "RssFile": 0, "RssShmem": 0, "VmHWM": 0}
t0 = time.perf_counter()
while True:
    done, status, ru = os.wait4(pid, os.WNOHANG)
    if done:
        break
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in peak:
                    peak[k] = max(peak[k], int(v.split()[0]))
    except (OSError, ValueError):
        pass
    time.sleep(0.05)
print("%s" + json.dumps({"maxrss_kib": ru.ru_maxrss, "wall_s": time.perf_counter() - t0,
                          "user_s": ru.ru_utime, "sys_s": ru.ru_stime, "sampled_kib": peak}), flush=True)
sys.exit(os.waitstatus_to_exitcode(status))
''' % _RU_TAG


# =========================================================================== child


def _norms(st) -> dict:
    """Frobenius norm of every statistic (fp32: no fp64 copy of a GiB-sized matrix inflates the peak RSS)."""
    return {f"{kind}/{k}": float(v.norm()) for kind in ("cx", "cg", "grad") for k, v in getattr(st, kind).items()}


def _vmhwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args) -> None:
    import torch

    from obdk.calibrate.memory import stats_nbytes
    from obdk.calibrate.stats import calibrate
    from obdk.calibrate.stream import calibrate_streamed
    if args.threads:
        torch.set_num_threads(args.threads)
    stats = ("cx", "cg")
    t0 = time.perf_counter()
    if args.model == "llama7b-shape":
        from .core.data import random_windows
        from .core.models import random_llama
        model = random_llama(hidden=4096, inter=11008, layers=args.layers, heads=32, vocab=512, dtype=torch.bfloat16)
        data = random_windows(512, args.windows, args.seqlen, seed=0)
    else:
        from obdk.calibrate.data import get_calibration_windows
        from obdk.hub import load_model
        model, tok = load_model("smollm2-135m")
        model.eval()
        data = get_calibration_windows("wikitext2:validation", tok, nsamples=args.windows, seqlen=args.seqlen,
                                       seed=0, data_dir=args.data_dir)
    load_s = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    total_stats = stats_nbytes(model, stats)
    info: dict = {}
    handed: list[int] = []
    norms: dict = {}
    rss_before = _vmhwm_mib()
    t0 = time.perf_counter()
    if args.variant == "resident":
        st = calibrate(model, data, stats=stats, progress=False)
        peak_stats = st.nbytes()  # allocated before the first window, held to the end
        if peak_stats != total_stats:
            raise SystemExit(f"resident accumulators {peak_stats} != stats_nbytes {total_stats}")
    elif args.variant == "streamed":
        st = calibrate_streamed(model, data, stats=stats, progress=False, info=info)
        peak_stats = info["peak_stats_bytes"]
    elif args.variant == "streamed-handoff":
        in_take = [0.0]

        def take(i, part):  # a decompose-and-free pipeline would factorise here; we only record and drop
            t = time.perf_counter()
            handed.append(part.nbytes())
            norms.update(_norms(part))
            in_take[0] += time.perf_counter() - t
        st = calibrate_streamed(model, data, stats=stats, progress=False, info=info, on_layer=take)
        peak_stats = info["peak_stats_bytes"]
    else:
        raise SystemExit(f"unknown variant {args.variant}")
    calib_s = time.perf_counter() - t0
    if args.variant == "streamed-handoff":
        calib_s -= in_take[0]  # the callback's own norms are not calibration time
    else:
        norms = _norms(st)
    if args.save:
        st.save(args.save)
    res = {"calib_seconds": calib_s, "load_seconds": load_s, "peak_stats_bytes": peak_stats,
           "total_stats_bytes": total_stats, "max_layer_stats_bytes": max(handed) if handed else "",
           "weights_bytes": weights, "boundary_host_bytes": info.get("peak_host_bytes", ""),
           "forward_sweep_s": info.get("seconds", {}).get("forward sweep", ""),
           "backward_sweep_s": info.get("seconds", {}).get("backward sweep", ""),
           "vmhwm_before_calib_mib": rss_before, "vmhwm_mib_inside": _vmhwm_mib(),
           "tokens": st.tokens, "loss_tokens": st.loss_tokens, "norms": norms}
    print(_TAG + json.dumps(res), flush=True)


def child_pipeline(args) -> None:
    """prepare + apply of obdk's default at ``args.keep``, resident or streamed; prints the result line."""
    import hashlib

    import torch

    import obdk
    from obdk.config import LowRankConfig
    from obdk.eval import perplexity

    from .core.models import load
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load(args.model)
    model.eval()
    from obdk.calibrate.data import get_calibration_windows
    data = get_calibration_windows("wikitext2:validation", tok, nsamples=args.windows, seqlen=args.seqlen, seed=0,
                                   data_dir=args.data_dir)
    stream = args.variant != "pipeline-resident"
    with tempfile.TemporaryDirectory(prefix="obdk-bench-kept-") as scratch:
        kw = {"scratch_dir": scratch, "max_host_memory": 0} if args.variant == "pipeline-streamed-scratch" else {}
        rss_before = _vmhwm_mib()
        t0 = time.perf_counter()
        plan = obdk.prepare(model, LowRankConfig(method="obd", keep=args.keep), data, progress=False, stream=stream,
                            **kw)
        rep = plan.apply(model)
        total = time.perf_counter() - t0
        st = plan.stats
        st_bytes = {"held": getattr(st, "peak_host_bytes", None), "spilled": getattr(st, "spilled_bytes", 0)}
        if st_bytes["held"] is None:
            st_bytes["held"] = st.nbytes()
        del plan, st  # the kept statistics' files go before their directory
    ranks = json.dumps({m.name: m.rank for m in rep.modules}, sort_keys=True)
    ppl = perplexity(model, tok, "wikitext2", seqlen=512, windows=args.eval_windows, data_dir=args.data_dir,
                     progress=False)["ppl"]
    res = {"seconds": total, "stages": {k: v["seconds"] for k, v in rep.stages.items()}, "ppl": ppl,
           "ranks_sha": hashlib.sha256(ranks.encode()).hexdigest()[:12], "keep_actual": rep.keep_actual,
           "stats_held_bytes": st_bytes["held"], "stats_spilled_bytes": st_bytes["spilled"],
           "vmhwm_before_mib": rss_before}
    print(_TAG + json.dumps(res), flush=True)


def child_disk_model(args) -> None:
    """Save the ``disk`` suite's random Llama (``args.layers`` layers) and its tokenizer to ``args.save``."""
    import torch

    from obdk.testing import make_char_tokenizer, make_tiny_llama
    model = make_tiny_llama(0, layers=args.layers, hidden=args.disk_hidden, inter=args.disk_inter, heads=16,
                            kv_heads=8, vocab=128)
    assert next(model.parameters()).dtype == torch.float32
    model.save_pretrained(args.save, safe_serialization=True, max_shard_size="100MB")
    make_char_tokenizer(128).save_pretrained(args.save)
    print(_TAG + json.dumps({"params": sum(p.numel() for p in model.parameters())}), flush=True)


def _dir_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in Path(path).glob(pattern))


#: the ``disk`` suite's variants: the flags each adds to ``obdk compress`` (``{scratch}``: a fresh directory)
DISK_VARIANTS = {"resident": [], "stream": ["--stream"],
                 "stream-disk": ["--stream", "--weights-on-disk", "--max-host-memory", "0", "--scratch-dir", "{scratch}"]}


def disk_suite(args, base: list[str], log_path: Path, env: dict) -> None:
    """The ``disk`` suite: ``obdk compress`` resident / ``--stream`` / ``--stream --weights-on-disk`` per layer count."""
    import shutil

    child_env = {**os.environ, "OMP_NUM_THREADS": str(args.disk_threads), "MKL_NUM_THREADS": str(args.disk_threads),
                 "TOKENIZERS_PARALLELISM": "false"}
    for L in args.disk_layers:
        with tempfile.TemporaryDirectory(prefix="obdk-bench-disk-") as tmp:
            model_dir = Path(tmp) / "model"
            res, _ = run_child(base + ["--variant", "disk-model", "--child-layers", str(L), "--save", str(model_dir),
                                       "--disk-hidden", str(args.disk_hidden), "--disk-inter", str(args.disk_inter)],
                               log_path)
            model_bytes = _dir_bytes(model_dir)
            shards = len(list(model_dir.glob("*.safetensors")))
            for correct in args.disk_corrections:
                for v in args.disk_variants:
                    out, scratch = Path(tmp) / f"out-{v}-{correct}", Path(tmp) / f"scratch-{v}-{correct}"
                    scratch.mkdir()
                    flags = [f.format(scratch=scratch) for f in DISK_VARIANTS[v]]
                    cmd = [sys.executable, "-m", "obdk", "compress", str(model_dir), "--method", "obd", "--keep",
                           str(args.keep), "--calib", "wikitext2:validation", "--nsamples", str(args.disk_nsamples),
                           "--seqlen", str(args.disk_seqlen), "--data-dir", args.data_dir, "--json", "--out", str(out),
                           *flags, *(["--correct", correct] if correct != "default" else [])]
                    sha = git_sha()  # the children import obdk from this working tree: its HEAD as each one starts
                    text, ru = _spawn(cmd, log_path, env=child_env, launch=True)
                    cli = json.loads([ln for ln in text.splitlines() if ln.startswith("{")][-1])
                    report = json.loads((out / "obdk_report.json").read_text())
                    ranks = [m["rank"] for m in report["modules"]]
                    ckpt_bytes = _dir_bytes(out)
                    shutil.rmtree(scratch)
                    ppl, eval_rss = "", ""
                    if args.disk_eval_windows:
                        text_e, ru_e = _spawn([sys.executable, "-m", "obdk", "eval", str(out), "--seqlen",
                                               str(args.disk_seqlen), "--windows", str(args.disk_eval_windows),
                                               "--data-dir", args.data_dir, "--json"], log_path, env=child_env,
                                              launch=True)
                        ppl = json.loads([ln for ln in text_e.splitlines() if ln.startswith("{")][-1])["ppl"]
                        eval_rss = round(ru_e["maxrss_mib"], 1)
                    shutil.rmtree(out)
                    samp = ru["sampled_kib"]
                    r = {"layers": L, "variant": v, "correct": correct if correct != "default" else "default (zs+kfac)",
                         "method": "obd", "keep": args.keep, "hidden": args.disk_hidden, "inter": args.disk_inter,
                         "dtype": "float32", "nsamples": args.disk_nsamples, "seqlen": args.disk_seqlen,
                         "model_disk_mib": round(model_bytes / 2**20, 1), "model_shards": shards,
                         "model_params": res["params"], "peak_rss_mib": round(ru["maxrss_mib"], 1),
                         "sampled_max_rss_anon_mib": round(samp["RssAnon"] / 1024, 1),
                         "sampled_max_rss_file_mib": round(samp["RssFile"] / 1024, 1),
                         "sampled_max_rss_shmem_mib": round(samp["RssShmem"] / 1024, 1),
                         "wall_s": round(ru["wall_s"], 1), "user_s": round(ru["user_s"], 1),
                         "sys_s": round(ru["sys_s"], 1), "predicted_loss": report["predicted_loss"],
                         "keep_actual": cli["keep_actual"], "ranks_sum": sum(r_ for r_ in ranks if r_ is not None),
                         "ranks_dense": sum(r_ is None for r_ in ranks),
                         "ckpt_disk_mib": round(ckpt_bytes / 2**20, 1), "ppl": ppl,
                         "ppl_windows": args.disk_eval_windows, "eval_peak_rss_mib": eval_rss,
                         "stages_s": json.dumps({k: round(x["seconds"], 2) for k, x in cli["stages"].items()
                                                 if "/" not in k}),
                         "threads": args.disk_threads, **env, "git_sha": sha, "timestamp": timestamp(),
                         "loadavg_1m": loadavg()}
                    write_csv([r], args.disk_out)
                    print_table([r], ["layers", "variant", "correct", "peak_rss_mib", "sampled_max_rss_anon_mib",
                                      "sampled_max_rss_file_mib", "wall_s", "predicted_loss", "ranks_sum", "ppl"])


# =========================================================================== parent


def _spawn(argv: list[str], log_path: Path, *, env: dict | None = None, launch: bool = False,
           on_start=None) -> tuple[str, dict]:
    """Run ``argv`` (stderr to ``log_path``); ``(its stdout, its rusage)`` — ``maxrss_mib`` from ``os.wait4``,
    and with ``launch`` (through ``_LAUNCH``) also ``wall_s``, ``user_s``, ``sys_s`` and the sampled peaks.
    ``on_start(pid)``: called once the process is started (with ``launch``, ``pid`` is the launcher's: the
    command is its one child), e.g. to start a thread that samples it while this call waits."""
    cmd = [sys.executable, "-c", _LAUNCH, *argv] if launch else argv
    with log_path.open("a") as log:
        log.write(f"\n$ {' '.join(argv)}\n")
        log.flush()
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        if on_start is not None:
            on_start(p.pid)
        out = p.stdout.read()
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        log.write(out)
    if p.returncode != 0:
        raise SystemExit(f"child failed ({p.returncode}): {' '.join(argv)}; see {log_path}")
    if not launch:
        return out, {"maxrss_mib": ru.ru_maxrss / 1024, "wall_s": wall}  # Linux: KiB
    lines = [ln for ln in out.splitlines() if ln.startswith(_RU_TAG)]
    r = json.loads(lines[-1][len(_RU_TAG):])
    r["maxrss_mib"] = r.pop("maxrss_kib") / 1024
    return "\n".join(ln for ln in out.splitlines() if not ln.startswith(_RU_TAG)), r


def run_child(argv: list[str], log_path: Path) -> tuple[dict, float]:
    """Run one variant; ``(its result, its peak RSS in MiB read by the parent from ru_maxrss)``."""
    out, ru = _spawn(argv, log_path)
    line = [ln for ln in out.splitlines() if ln.startswith(_TAG)][-1]
    return json.loads(line[len(_TAG):]), ru["maxrss_mib"]


def norm_rel(a: dict, b: dict) -> float:
    if set(a) != set(b):
        return float("inf")
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-300) for k in b) if b else 0.0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suites", nargs="+", default=["llama7b-shape", "smollm2"],
                    choices=["llama7b-shape", "smollm2", "pipeline", "disk"])
    ap.add_argument("--pipeline-model", default="smollm2-135m")
    ap.add_argument("--pipeline-variants", nargs="+",
                    default=["pipeline-resident", "pipeline-streamed", "pipeline-streamed-scratch"])
    ap.add_argument("--keep", type=float, default=0.8)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--layers", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--variants", nargs="+", default=["resident", "streamed", "streamed-handoff"])
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--smol-nsamples", type=int, default=32)
    ap.add_argument("--smol-seqlen", type=int, default=512)
    ap.add_argument("--data-dir", default=os.environ.get("OBDK_DATA_DIR", "/work/shared/data"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--disk-layers", nargs="+", type=int, default=[4, 16])
    ap.add_argument("--disk-variants", nargs="+", default=list(DISK_VARIANTS), choices=list(DISK_VARIANTS))
    ap.add_argument("--disk-corrections", nargs="+", default=["none", "default"],
                    help="--correct of each disk run ('default': the method's, zs+kfac for obd)")
    ap.add_argument("--disk-hidden", type=int, default=1024)
    ap.add_argument("--disk-inter", type=int, default=2816)
    ap.add_argument("--disk-nsamples", type=int, default=8)
    ap.add_argument("--disk-seqlen", type=int, default=256)
    ap.add_argument("--disk-eval-windows", type=int, default=4, help="0: no perplexity")
    ap.add_argument("--disk-threads", type=int, default=2, help="OMP_NUM_THREADS of the disk suite's children")
    ap.add_argument("--disk-out", default=str(DISK_OUT))
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--log", default=str(RESULTS / "stream_memory.log"))
    # child mode
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--save", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-layers", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.layers = args.child_layers
        if args.variant == "disk-model":
            child_disk_model(args)
        else:
            (child_pipeline if args.variant.startswith("pipeline") else child)(args)
        return

    log_path = Path(args.log)
    base = [sys.executable, "-m", "benchmarks.bench_stream_memory", "--child", "--data-dir", args.data_dir]
    if args.threads:
        base += ["--threads", str(args.threads)]
    rows = []
    env = env_fields("cpu")

    def row(model, layers, variant, windows, seqlen, res, rss, **extra):
        r = {"model": model, "layers": layers, "variant": variant, "stats": "cx+cg", "windows": windows,
             "seqlen": seqlen, "calib_s": round(res["calib_seconds"], 2),
             "forward_sweep_s": _r(res["forward_sweep_s"]), "backward_sweep_s": _r(res["backward_sweep_s"]),
             "peak_stats_gib": round(res["peak_stats_bytes"] / 2**30, 4),
             "total_stats_gib": round(res["total_stats_bytes"] / 2**30, 4),
             "max_layer_stats_gib": _r(res["max_layer_stats_bytes"], 2**30),
             "boundary_host_gib": _r(res["boundary_host_bytes"], 2**30),
             "weights_gib": round(res["weights_bytes"] / 2**30, 4), "peak_rss_mib": round(rss, 1),
             "rss_before_calib_mib": round(res["vmhwm_before_calib_mib"], 1), **extra, **env}
        rows.append(r)
        write_csv([r], args.out)
        print_table([r], ["model", "layers", "variant", "calib_s", "peak_stats_gib", "peak_rss_mib",
                          "rss_before_calib_mib"])
        return r

    if "llama7b-shape" in args.suites:
        for L in args.layers:
            ref = None
            for v in args.variants:
                res, rss = run_child(base + ["--model", "llama7b-shape", "--child-layers", str(L), "--variant", v,
                                             "--windows", str(args.windows), "--seqlen", str(args.seqlen)], log_path)
                if v == "resident":
                    ref = res["norms"]
                extra = {"norm_max_rel_diff_vs_resident": norm_rel(res["norms"], ref) if ref is not None else ""}
                row("llama7b-shape", L, v, args.windows, args.seqlen, res, rss, **extra)
    if "smollm2" in args.suites:
        with tempfile.TemporaryDirectory(prefix="obdk-bench-stream-") as tmp:
            saved = {}
            for v in ("resident", "streamed"):
                saved[v] = os.path.join(tmp, v)
                res, rss = run_child(base + ["--model", "smollm2-135m", "--variant", v, "--windows",
                                             str(args.smol_nsamples), "--seqlen", str(args.smol_seqlen),
                                             "--save", saved[v]], log_path)
                extra = {}
                if v == "streamed":
                    extra["stats_max_rel_diff_vs_resident"] = _compare(saved["resident"], saved["streamed"])
                row("smollm2-135m", 30, v, args.smol_nsamples, args.smol_seqlen, res, rss, **extra)
    pipeline_out = PIPELINE_OUT if args.out == str(OUT) else args.out + ".pipeline.csv"
    if "pipeline" in args.suites:
        ref = None
        for v in args.pipeline_variants:
            res, rss = run_child(base + ["--model", args.pipeline_model, "--variant", v, "--windows",
                                         str(args.smol_nsamples), "--seqlen", str(args.smol_seqlen), "--keep",
                                         str(args.keep), "--eval-windows", str(args.eval_windows)], log_path)
            ref = ref or res
            r = {"model": args.pipeline_model, "variant": v, "stats": "cx+cg", "windows": args.smol_nsamples,
                 "seqlen": args.smol_seqlen, "keep": args.keep, "total_s": round(res["seconds"], 2),
                 "time_vs_resident": round(res["seconds"] / ref["seconds"], 3),
                 **{f"stage_{k.replace(' ', '_').replace('/', '__')}_s": round(x, 3) for k, x in res["stages"].items()},
                 "ppl": res["ppl"], "ppl_windows": args.eval_windows, "ranks_sha": res["ranks_sha"],
                 "same_ranks_as_first": res["ranks_sha"] == ref["ranks_sha"], "keep_actual": res["keep_actual"],
                 "stats_held_gib": round(res["stats_held_bytes"] / 2**30, 4),
                 "stats_spilled_gib": round(res["stats_spilled_bytes"] / 2**30, 4), "peak_rss_mib": round(rss, 1),
                 "rss_before_calib_mib": round(res["vmhwm_before_mib"], 1), **env}
            write_csv([r], pipeline_out)
            print_table([r], ["variant", "total_s", "time_vs_resident", "ppl", "same_ranks_as_first", "stats_held_gib",
                              "peak_rss_mib"])
    if "disk" in args.suites:
        disk_suite(args, base, log_path, env)
    outs = ([str(args.out)] * bool(set(args.suites) - {"pipeline", "disk"}) + [str(pipeline_out)] * ("pipeline" in args.suites)
            + [str(args.disk_out)] * ("disk" in args.suites))
    print(f"rows appended to {', '.join(outs)}; child logs in {log_path}")


def _r(v, div=1.0):
    return round(v / div, 4) if isinstance(v, (int, float)) else ""


def _compare(a_dir: str, b_dir: str) -> float:
    """Max over statistics of ``‖a − b‖_F / ‖a‖_F`` (keys and normalisers must match)."""
    from obdk.calibrate.statistics import Statistics
    a, b = Statistics.load(a_dir), Statistics.load(b_dir)
    if (a.tokens, a.loss_tokens, list(a.cx), list(a.cg)) != (b.tokens, b.loss_tokens, list(b.cx), list(b.cg)):
        return float("inf")
    worst = 0.0
    for kind in ("cx", "cg"):
        for k, v in getattr(a, kind).items():
            w = getattr(b, kind)[k]
            worst = max(worst, float((v.double() - w.double()).norm() / v.double().norm().clamp_min(1e-300)))
    return worst


if __name__ == "__main__":
    main()
