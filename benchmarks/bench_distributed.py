"""Data-parallel streamed compression on one CPU: 1 process × 2 threads against 2 processes × 1 thread.

The question: what do ``torchrun`` ranks buy on one machine, and what do they cost? Both variants run
``obdk.prepare(stream=True)`` with method obd, ``correct="none"`` and the global allocation (the
configuration that streams fully: each layer decomposed as its sweep ends, its statistics dropped):

* ``1x2``: one process, ``torch.set_num_threads(2)`` (the decompositions two at a time);
* ``2x1``: ``python -m torch.distributed.run --standalone --nproc-per-node 2`` with gloo, one thread per rank:
  each rank streams every layer over its half of the windows, each statistic is reduced to its
  group's owner rank only, the owners decompose, eigenvalues go to every rank and factors to rank 0
  (:mod:`obdk.stream.distributed`).

Every rank (in its own process) records: ``prepare_s`` (its wall time in ``prepare``), ``peak_rss_mib``
(``ru_maxrss`` of the process: model, boundary activations, statistics, factors), ``rss_before_mib``
(the same high-water mark before ``prepare``: the model and data), the bytes it sent (``reduce_bytes``: accumulators to
their owners; ``share_bytes``: factors to rank 0; ``object_bytes``: pickled eigenvalues/metadata) and
``collective_s`` (seconds inside collective calls: waiting for the other rank plus the transfer). The
parent records ``wall_s`` of the whole variant (process start, model load, prepare, apply, evaluation).
Rank 0 of each variant applies ``--keep`` and scores WikiText-2 perplexity on ``--eval-windows``
windows; ``same_as_1x2`` says whether the 2-rank run gave the same ranks (sha of the rank map) and a
perplexity within 1e-4 relative (the statistics are fp32 sums in another order).

``python -m benchmarks.bench_distributed`` (SmolLM2-135M, 32 × 512 WikiText-2 validation, keep 0.8) writes
``benchmarks/results/distributed_smollm2.csv``; ``--model tiny`` is the dry run (a 2-layer Llama,
random windows, seconds). Run it alone on the machine: it is a timing and memory measurement.
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

from .core.env import RESULTS
from .core.rows import ResultLog, print_table
from .core.timing import peak_rss_mib

_COLS = ["variant", "rank", "wall_s", "prepare_s", "peak_rss_mib", "reduce_bytes", "share_bytes", "collective_s",
         "ppl", "same_as_1x2"]


# =========================================================================== one rank


def child(args) -> None:
    """One rank (or the single process): prepare, allocate, and on rank 0 apply and evaluate; a JSON file."""
    import hashlib

    import torch

    import obdk
    from obdk.config import LowRankConfig
    from obdk.eval import perplexity
    from obdk.stream import distributed as dist

    from .core.data import random_windows
    from .core.models import load
    torch.set_num_threads(args.threads)
    own, _ = dist.init_from_env("cpu", timeout_s=3600)
    try:
        rank, world = dist.world()
        model, tok = load(args.model)
        if args.model == "tiny":
            data = random_windows(model.config.vocab_size, args.nsamples, args.seqlen, seed=0)
        else:
            from obdk.calibrate.data import get_calibration_windows
            data = get_calibration_windows("wikitext2:validation", tok, nsamples=args.nsamples, seqlen=args.seqlen,
                                           seed=0, data_dir=args.data_dir)
        cfg = LowRankConfig(method="obd", correct="none", alloc="global", keep=args.keep)
        rss_before = peak_rss_mib()
        dist.barrier()  # both ranks start prepare together: its time is not the other's load time
        t0 = time.perf_counter()
        plan = obdk.prepare(model, cfg, data, stream=True, progress=False)
        prepare_s = time.perf_counter() - t0
        ranks = plan.allocate().ranks
        sha = hashlib.sha256(json.dumps(ranks, sort_keys=True).encode()).hexdigest()[:12]
        res = {"rank": rank, "world": world, "threads": args.threads, "prepare_s": prepare_s,
               "rss_before_mib": rss_before, "peak_rss_mib": peak_rss_mib(),
               "ranks_sha": sha, **dist.traffic()}
        if rank == 0:
            with dist.alone():
                rep = plan.apply(model)
                res["keep_actual"] = rep.keep_actual
                res["ppl"] = perplexity(model, tok, "wikitext2", seqlen=args.seqlen, windows=args.eval_windows,
                                        data_dir=args.data_dir, progress=False)["ppl"]
        Path(args.result_dir, f"rank{rank}.json").write_text(json.dumps(res))
        dist.barrier()
    finally:
        if own:
            dist.destroy()


# =========================================================================== parent


def run_variant(name: str, nproc: int, threads: int, args, log_path: Path) -> tuple[list[dict], float]:
    """Run one variant in fresh processes; ``(each rank's result, wall seconds)``."""
    with tempfile.TemporaryDirectory(prefix="obdk-bench-dist-") as tmp:
        child_args = ["-m", "benchmarks.bench_distributed", "--child", "--model", args.model, "--threads",
                      str(threads), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--keep",
                      str(args.keep), "--eval-windows", str(args.eval_windows), "--data-dir", args.data_dir,
                      "--result-dir", tmp]
        if nproc == 1:
            argv = [sys.executable, *child_args]
        else:
            argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                    *child_args]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        t0 = time.perf_counter()
        with log_path.open("a") as log:
            log.write(f"\n$ {' '.join(argv)}\n")
            log.flush()
            p = subprocess.run(argv, stdout=log, stderr=log, env=env, cwd=Path(__file__).resolve().parents[1])
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"variant {name} failed ({p.returncode}); see {log_path}")
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(nproc)], wall


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default) or tiny (dry run)")
    ap.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 32; tiny: 6)")
    ap.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 512; tiny: 32)")
    ap.add_argument("--keep", type=float, default=0.8)
    ap.add_argument("--eval-windows", type=int, default=None, help="perplexity windows (default 8; tiny: 2)")
    ap.add_argument("--data-dir", default=os.environ.get("OBDK_DATA_DIR", "/work/shared/data"))
    ap.add_argument("--out", default=None, help="CSV (default benchmarks/results/distributed_smollm2.csv; "
                                                "tiny: distributed_tiny.csv)")
    ap.add_argument("--log", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--result-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    tiny = args.model == "tiny"
    args.nsamples = args.nsamples or (6 if tiny else 32)
    args.seqlen = args.seqlen or (32 if tiny else 512)
    args.eval_windows = args.eval_windows or (2 if tiny else 8)
    if args.child:
        child(args)
        return
    label = "tiny" if tiny else args.model.replace("-135m", "")
    out = Path(args.out or RESULTS / f"distributed_{label}.csv")
    log_path = Path(args.log or out.with_suffix(".log"))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    results = ResultLog(out, key_cols=("model", "variant", "rank"), resume=False, device="cpu")
    ref = None
    for name, nproc, threads in (("1x2", 1, 2), ("2x1", 2, 1)):
        ranks, wall = run_variant(name, nproc, threads, args, log_path)
        ref = ref or ranks[0]
        same = (all(r["ranks_sha"] == ref["ranks_sha"] for r in ranks)
                and abs(ranks[0]["ppl"] - ref["ppl"]) <= 1e-4 * abs(ref["ppl"]))
        for r in ranks:
            row = {"model": args.model, "variant": name, "processes": nproc, "threads": threads, "rank": r["rank"],
                   "nsamples": args.nsamples, "seqlen": args.seqlen, "method": "obd", "correct": "none",
                   "alloc": "global", "keep": args.keep, "wall_s": round(wall, 2),
                   "prepare_s": round(r["prepare_s"], 2), "peak_rss_mib": round(r["peak_rss_mib"], 1),
                   "rss_before_mib": round(r["rss_before_mib"], 1), "reduce_bytes": r["reduce_bytes"],
                   "all_reduce_bytes": r["all_reduce_bytes"], "share_bytes": r["share_bytes"],
                   "object_bytes": r["object_bytes"], "collective_s": round(r["collective_seconds"], 3),
                   "collectives": r["collectives"], "ranks_sha": r["ranks_sha"], "ppl": r.get("ppl", ""),
                   "ppl_windows": args.eval_windows, "keep_actual": r.get("keep_actual", ""), "same_as_1x2": same}
            print_table([results.write(row)], _COLS)
    print(f"rows written to {out}; logs in {log_path}")


if __name__ == "__main__":
    main()
