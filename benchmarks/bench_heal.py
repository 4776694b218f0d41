"""Healing on SmolLM2-135M: the default method with and without each healing mode, and SVD-LLM healed (issue #28).

One plan per method, calibrated on ``--nsamples`` × ``--seqlen`` tokens of ``--calib`` (WikiText-2 validation);
per ratio the truncated and corrected factors are made once and every healing mode starts from them (the steps
``plan.apply(copy, keep=..., heal=...)`` takes, without repeating the corrections' passes per row), healed on the
calibration windows
(``heal_data=calib``), on ``--heal-windows`` windows of C4 drawn from the tokens *after* the evaluated ones
(``c4``: no evaluated token is trained on) or on ``--heal-windows`` other windows of WikiText-2 validation (``wt2``,
seed + 1: more healing tokens than the calibration's). Evaluated on the first ``--windows`` windows of WikiText-2 test
and of the local C4 validation sample, and (``--tasks``) zero-shot on ``--limit`` documents per task (the dense
row on the same documents).

Rows (``--rows``): ``METHOD:HEAL[:DATA]`` with HEAL ``none``, ``layer``, ``e2e`` (its default loss, KL + CE
mixed by ``heal_ce`` 0.5), ``e2e-kl`` (``heal_ce`` 0: pure distillation) or ``e2e-ce`` (1: fine-tuning) and DATA
``calib`` (default), ``c4`` or ``wt2`` (the CSV's ``heal_data`` names the windows drawn: ``c4:32``); ``dense`` is the
uncompressed model. ``--heal-steps``/``--heal-lr`` override the modes' defaults (the tuning runs). Columns: perplexities, zero-shot accuracy per task and their mean, healing seconds, held-out
distillation loss before/after, steps, tokens used, peak RSS of the process so far (``ru_maxrss``; the streamed
memory comparison is measured from outside the process by ``--stream-memory``).

    python -m benchmarks.bench_heal --resume                          # the committed table (hours on 1 core)
    python -m benchmarks.bench_heal --model tiny --keeps 0.6 --rows obd:none obd:layer --windows 2 \\
        --nsamples 4 --seqlen 64 --tasks '' --out /tmp/h.csv          # seconds: smoke test
"""
from __future__ import annotations

import argparse
import copy
import resource
import time

import torch

import obdk
from obdk.heal import heal as heal_factors
from obdk.report import StageTimer

from .core.data import EvalSets, calibration_data, data_dir_of
from .core.env import RESULTS, set_threads
from .core.models import load, model_label
from .core.rows import ResultLog

DEFAULT_OUT = RESULTS / "heal_smollm2.csv"
TASKS = "arc_easy,arc_challenge,piqa,hellaswag,winogrande"
KEY = ("model", "method", "keep", "heal", "heal_data", "heal_steps_arg", "heal_lr_arg", "windows", "limit",
       "nsamples", "seqlen")


def _row_spec(s: str) -> tuple[str, str, str]:
    parts = s.split(":")
    if parts[0] == "dense":
        return "dense", "none", "-"
    if len(parts) not in (2, 3) or parts[1] not in ("none", "layer", "e2e", "e2e-kl", "e2e-ce"):
        raise SystemExit(f"--rows {s!r}: METHOD:HEAL[:DATA], HEAL none|layer|e2e|e2e-kl|e2e-ce, DATA calib|c4|wt2")
    data = parts[2] if len(parts) == 3 else ("calib" if parts[1] != "none" else "-")
    if data not in ("calib", "c4", "wt2", "-"):
        raise SystemExit(f"--rows {s!r}: DATA is calib, c4 or wt2")
    return parts[0], parts[1], data


def _evaluate(model, tok, evals: EvalSets, args) -> dict:
    out: dict = {}
    with torch.inference_mode():
        for name in args.eval:
            out[f"ppl_{name}"] = evals.perplexity(model, name, args.seqlen, args.windows)["ppl"]
    if args.tasks:
        from obdk.zeroshot import zeroshot
        t0 = time.perf_counter()
        res = zeroshot(model, tok, args.tasks, limit=args.limit, data_dir=data_dir_of(args.data_dir), progress=False)
        accs = {t: r["acc_norm"] if r.get("acc_norm") is not None else r["acc"] for t, r in res.items()}
        out.update({f"acc_{t}": round(100 * a, 2) for t, a in accs.items()})
        out["acc_mean"] = round(100 * sum(accs.values()) / len(accs), 2)
        out["zeroshot_s"] = round(time.perf_counter() - t0, 1)
    return out


def stream_memory(args) -> None:
    """``obdk compress MODEL --stream`` at ``--keeps[0]`` without and with ``--heal layer``, each a child process
    whose peak RSS is read from outside (``wait4``); rows to ``--out`` with ``_stream_memory`` in its name."""
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path
    out = Path(str(args.out).replace(".csv", "_stream_memory.csv"))
    log = ResultLog(out, ("model", "keep", "heal", "nsamples", "seqlen", "heal_steps_arg"), args.resume)
    for heal in ("none", "layer"):
        row = {"model": model_label(args.model), "keep": args.keeps[0], "heal": heal, "nsamples": args.nsamples,
               "seqlen": args.seqlen, "heal_steps_arg": args.heal_steps or ""}
        if log.has(**row):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "obdk", "compress", args.model, "--stream", "--keep", str(args.keeps[0]),
                   "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--out", f"{tmp}/out", "--json"]
            if heal != "none":
                cmd += ["--heal", heal] + (["--heal-steps", str(args.heal_steps)] if args.heal_steps else [])
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            stdout = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)
            if status != 0:
                raise SystemExit(f"{' '.join(cmd)} failed ({status})")
            import json
            rep = json.loads(stdout.strip().splitlines()[-1])
            row.update(peak_rss_mib=round(usage.ru_maxrss / 1024), wall_s=round(time.perf_counter() - t0, 1),
                       stages={k: round(v["seconds"], 1) for k, v in rep["stages"].items() if "/" not in k})
        log.write(row)
        print(row, flush=True)


def _sorted(rows) -> list[dict]:
    order = {"none": 0, "layer": 1, "e2e-kl": 2, "e2e-ce": 3, "e2e": 4}
    return sorted(rows, key=lambda r: (r["method"] != "dense", -float(r["keep"]), r["method"] != "obd", r["method"],
                                       order.get(r["heal"], 3), r["heal_data"], r.get("heal_steps_arg", "")))


def table(path) -> str:
    """The results section's markdown tables, from the CSV: perplexities (the last row of each key, whether or not
    it also scored zero-shot: the runs are seeded and repeat their perplexities) and, where rows scored zero-shot,
    accuracy per task on the same documents with the difference from the dense row."""
    from .core.rows import last_rows, read_rows
    every = read_rows(path)
    rows = _sorted(last_rows(every, [k for k in KEY if k != "limit"]))
    f = lambda v, nd=2: "" if v in ("", None) else f"{float(v):.{nd}f}"  # noqa: E731
    out = ["| method | keep | heal | data | WikiText-2 | C4 | healing s | steps | tokens | held-out before → after |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ho = (f"{float(r['heal_heldout_before']):.4g} → {float(r['heal_heldout_after']):.4g}"
              if r.get("heal_heldout_before") not in ("", None) else "")
        out.append(f"| {r['method']} | {r['keep']} | {r['heal']} | {r['heal_data']} | {f(r.get('ppl_wikitext2'))} | "
                   f"{f(r.get('ppl_c4'))} | {f(r.get('heal_s'), 0)} | {r.get('heal_steps', '')} | "
                   f"{r.get('heal_tokens', '')} | {ho} |")
    zs = _sorted(last_rows([r for r in every if r.get("acc_mean") not in ("", None)], KEY))
    if zs:
        tasks = [c[len("acc_"):] for c in zs[0] if c.startswith("acc_") and c != "acc_mean"]
        dense = {r["limit"]: float(r["acc_mean"]) for r in zs if r["method"] == "dense"}
        out += ["", f"| method | keep | heal | data | {' | '.join(tasks)} | mean | vs dense |",
                "|---|---|---|---|" + "---:|" * (len(tasks) + 2)]
        for r in zs:
            d = dense.get(r["limit"])
            delta = "" if r["method"] == "dense" or d is None else f"{float(r['acc_mean']) - d:+.2f}"
            out.append(f"| {r['method']} | {r['keep']} | {r['heal']} | {r['heal_data']} | "
                       + " | ".join(f(r.get(f"acc_{t}")) for t in tasks) + f" | {f(r['acc_mean'])} | {delta} |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.7, 0.6])
    ap.add_argument("--rows", nargs="+", default=["dense", "obd:none", "obd:layer", "obd:e2e", "svd-llm:none",
                                                   "svd-llm:layer", "obd:layer:c4"])
    ap.add_argument("--calib", default="wikitext2:validation")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heal-windows", type=int, default=32, help="windows drawn for the c4 and wt2 healing rows")
    ap.add_argument("--heal-steps", type=int, default=None)
    ap.add_argument("--heal-lr", type=float, default=None)
    ap.add_argument("--eval", nargs="+", default=["wikitext2", "c4"])
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--tasks", default=TASKS, help="zero-shot tasks ('' for none)")
    ap.add_argument("--limit", type=int, default=500, help="documents per zero-shot task")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--table", action="store_true", help="print the results section's table from --out and stop")
    ap.add_argument("--stream-memory", action="store_true",
                    help="only the streamed CLI runs without and with --heal layer (peak RSS from outside)")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    if args.table:
        print(table(args.out))
        return
    if args.stream_memory:
        stream_memory(args)
        return
    # heal_data in the CSV: calib, or c4/wt2 with the number of windows drawn (c4:32)
    specs = [(m, h, f"{d}:{args.heal_windows}" if d in ("c4", "wt2") else d)
             for m, h, d in (_row_spec(s) for s in args.rows)]
    model, tok = load(args.model)
    model.eval()
    label = model_label(args.model)
    evals = EvalSets(tok, data_dir_of(args.data_dir))
    eval_tokens = args.windows * args.seqlen
    log = ResultLog(args.out, KEY, args.resume)
    base = {"model": label, "heal_steps_arg": args.heal_steps or "", "heal_lr_arg": args.heal_lr or "",
            "windows": args.windows, "limit": args.limit if args.tasks else 0, "nsamples": args.nsamples,
            "seqlen": args.seqlen}
    calib, calib_source = calibration_data(args.calib, tok, nsamples=args.nsamples, seqlen=args.seqlen,
                                           seed=args.seed, data_dir=data_dir_of(args.data_dir), evals=args.eval,
                                           eval_tokens=eval_tokens)
    heal_sets = {"calib": calib}
    for data, source in (("c4", "c4"), ("wt2", "wikitext2:validation")):
        if any(d.startswith(data + ":") for _, _, d in specs):
            heal_sets[f"{data}:{args.heal_windows}"], _ = calibration_data(
                source, tok, nsamples=args.heal_windows, seqlen=args.seqlen, seed=args.seed + 1,
                data_dir=data_dir_of(args.data_dir), evals=args.eval, eval_tokens=eval_tokens)
    if ("dense", "none", "-") in specs and not log.has(**base, method="dense", keep=1.0, heal="none", heal_data="-"):
        row = {**base, "method": "dense", "keep": 1.0, "heal": "none", "heal_data": "-"}
        log.write({**row, **_evaluate(model, tok, evals, args)})
        print(log.rows[-1], flush=True)
    plans: dict[str, obdk.Plan] = {}
    for method in dict.fromkeys(m for m, _, _ in specs if m != "dense"):
        todo = [(k, h, d) for m, h, d in specs if m == method for k in args.keeps
                if not log.has(**base, method=method, keep=k, heal=h, heal_data=d)]
        if not todo:
            continue
        t0 = time.perf_counter()
        plans[method] = plan = obdk.prepare(model, {"method": method}, calib, progress=False)
        prep_s = time.perf_counter() - t0
        print(f"[{method}] prepared in {prep_s:.0f}s ({calib_source})", flush=True)
        for keep in dict.fromkeys(k for k, _, _ in todo):
            # the truncated, corrected factors once per ratio; each healing starts from them (what plan.apply(heal=)
            # does after its own truncation and correction: the tests check that path)
            cfg = plan.resolve(keep)
            timer = StageTimer()
            t0 = time.perf_counter()
            allocation = plan.allocate(config=cfg)
            _, factors, _ = plan._truncate_and_correct(model, cfg, timer, allocation)
            factors = dict(factors)
            correct_s = time.perf_counter() - t0
            for _, heal, data in [t for t in todo if t[0] == keep]:
                info, healed = {}, factors
                t0 = time.perf_counter()
                if heal != "none":
                    mode, _, loss = heal.partition("-")  # e2e-kl: heal_ce 0 (pure distillation); e2e-ce: 1
                    hcfg = cfg.replace(heal=mode, heal_steps=args.heal_steps, heal_lr=args.heal_lr,
                                       **({"heal_ce": {"kl": 0.0, "ce": 1.0}[loss]} if loss else {}))
                    healed, info = heal_factors(model, plan, hcfg, factors, data=heal_sets[data],
                                                progress=False)
                m = copy.deepcopy(model)
                plan._pack(m, allocation, dict(healed), {}, StageTimer())
                row = {**base, "method": method, "keep": keep, "heal": heal, "heal_data": data,
                       "keep_actual": round(allocation.keep, 4),
                       "calib_source": calib_source, "prepare_s": round(prep_s, 1),
                       "truncate_correct_s": round(correct_s, 1), "heal_s": round(time.perf_counter() - t0, 1),
                       "heal_steps": info.get("steps", 0), "heal_tokens": info.get("tokens", 0),
                       "heal_heldout_before": info.get("heldout_before"),
                       "heal_heldout_after": info.get("heldout_after"),
                       "heal_stopped_early": info.get("stopped_early", info.get("stopped")),
                       "peak_rss_mib_so_far": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
                row.update(_evaluate(m, tok, evals, args))
                log.write(row)
                print({k: row[k] for k in row if k.startswith(("method", "keep", "heal", "ppl", "acc_mean"))},
                      flush=True)
                del m
        plan.close()
    print(f"rows in {args.out}")


if __name__ == "__main__":
    main()
