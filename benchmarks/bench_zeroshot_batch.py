"""Zero-shot scoring throughput against lm-eval's batch size (issue #32 item 5).

SmolLM2-135M (dense) scores the same documents of ``--tasks`` (default piqa, arc_easy and
hellaswag: two, four and four choices, short to long contexts) at each ``--batch-sizes`` (1, 8,
32 and lm-eval's ``auto``). A *request* is one (context, continuation) log-likelihood the harness
asks of the model (a document with four choices is four requests); requests/s is the number of
requests over the wall time of scoring (task building excluded), counted by wrapping the
harness's ``HFLM.loglikelihood``. Accuracies are compared with batch size 1's, document for
document through acc/acc_norm (a batch only changes padding, so an accuracy that moves is a tie
broken by rounding, reported in ``same_as_bs1``).

One CSV row per (batch size, task) plus ``task=all``, with the device, versions, git sha and
load average; ratios are against batch size 1 in the same run. Run it on a quiet machine:

    python -m benchmarks.bench_zeroshot_batch                       # ~15 min on 2 CPU cores
    python -m benchmarks.bench_zeroshot_batch --model tiny --limit 4 --out /tmp/zsb.csv   # smoke test
"""
from __future__ import annotations

import argparse
import logging
import time

from obdk.zeroshot import zeroshot

from .core.data import data_dir_of
from .core.env import RESULTS, set_threads
from .core.models import load, model_label
from .core.rows import ResultLog, print_table

DEFAULT_OUT = RESULTS / "zeroshot_batch.csv"
KEY_COLS = ("model", "batch_size", "task", "limit")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="piqa,arc_easy,hellaswag")
    ap.add_argument("--limit", type=int, default=200, help="first N documents of every task")
    ap.add_argument("--batch-sizes", nargs="+", default=["1", "8", "32", "auto"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    return ap.parse_args(argv)


class _Counter:
    """Counts the log-likelihood requests the harness sends and the seconds spent answering them."""

    def __init__(self):
        from lm_eval.models.huggingface import HFLM
        self.cls, self.orig = HFLM, HFLM.loglikelihood
        self.requests, self.seconds = 0, 0.0
        counter = self

        def loglikelihood(lm, requests, *a, **k):
            t0 = time.perf_counter()
            try:
                return counter.orig(lm, requests, *a, **k)
            finally:
                counter.requests += len(requests)
                counter.seconds += time.perf_counter() - t0

        HFLM.loglikelihood = loglikelihood

    def take(self) -> tuple[int, float]:
        out = (self.requests, self.seconds)
        self.requests, self.seconds = 0, 0.0
        return out

    def close(self):
        self.cls.loglikelihood = self.orig


def _bs(text: str):
    return text if text.startswith("auto") else int(text)


def run(args) -> list[dict]:
    logging.basicConfig(level=logging.WARNING)
    set_threads(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    out = ResultLog(args.out, KEY_COLS, resume=False)
    model, tok = load(args.model)
    label = model_label(args.model)
    data_dir = data_dir_of(args.data_dir)
    counter = _Counter()
    ref: dict[str, dict] = {}
    base_rps = None
    try:
        for bs_text in args.batch_sizes:
            bs = _bs(bs_text)
            tot_req, tot_s, same_all = 0, 0.0, True
            for t in tasks:
                r = zeroshot(model, tok, [t], limit=args.limit, batch_size=bs, data_dir=data_dir,
                             progress=args.progress)[t]
                req, sec = counter.take()
                accs = (r["acc"], r["acc_norm"])
                if bs_text == args.batch_sizes[0]:
                    ref[t] = {"acc": r["acc"], "acc_norm": r["acc_norm"]}
                same = ref[t]["acc"] == r["acc"] and ref[t]["acc_norm"] == r["acc_norm"]
                same_all &= same
                tot_req += req
                tot_s += sec
                out.write({"model": label, "batch_size": bs_text, "task": t, "limit": args.limit, "n": r["n"],
                           "requests": req, "score_s": round(sec, 2), "requests_per_s": round(req / sec, 2),
                           "acc": accs[0], "acc_norm": accs[1], "same_as_bs1": same,
                           "threads": args.threads or ""})
                print(f"[bs {bs_text}] {t}: {req} requests in {sec:.1f}s = {req / sec:.1f}/s, acc {accs[0]:.4f} "
                      f"acc_norm {accs[1]}, same as first: {same}", flush=True)
            rps = tot_req / tot_s
            base_rps = base_rps or rps
            out.write({"model": label, "batch_size": bs_text, "task": "all", "limit": args.limit, "requests": tot_req,
                       "score_s": round(tot_s, 2), "requests_per_s": round(rps, 2),
                       "speedup_vs_first": round(rps / base_rps, 3), "same_as_bs1": same_all,
                       "threads": args.threads or ""})
    finally:
        counter.close()
    print_table([r for r in out.rows if r["task"] == "all"],
                ["batch_size", "requests", "score_s", "requests_per_s", "speedup_vs_first", "same_as_bs1"])
    return out.rows


def main(argv=None):
    run(parse_args(argv))


if __name__ == "__main__":
    main()
