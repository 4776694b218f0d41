"""End-to-end serving: ``generate`` tokens/s and prefill latency, dense vs low-rank (± packed).

A Llama-shaped, randomly initialised ``LlamaForCausalLM`` (``--size``: ``small`` — the CPU
default, d=1024, ffn=2816, 4 layers, vocab 8192 — or ``7b`` — the GPU default, d=4096,
ffn=11008, 32 layers, vocab 32000 — or any of ``--hidden/--inter/--layers/--heads/--vocab``)
is measured dense, then with every decoder Linear replaced by a random ``LowRankLinear`` of
the uniform rank keep·mn/(m+n) (multiple of 64, or of 8 below 256) for each ``--keeps``
(0.8, 0.6), each also with q/k/v and gate/up packed (``obdk.nn.pack_shared_inputs``)
unless ``--no-packed``. Per variant and batch size: prefill latency (one forward of
[batch, prompt] tokens, median of ``--reps``), ``generate`` wall time for exactly
``--new-tokens`` greedy tokens, tokens/s end to end and in the decode phase
(batch·(new−1) / (generate(new) − generate(1))), and speedups against dense.

    python -m benchmarks.bench_generate --quick --out benchmarks/results/generate_cpu.csv
    python -m benchmarks.bench_generate --device cuda --out benchmarks/results/generate_h100.csv

Defaults: batches 1 and 16, prompt 512, 128 new tokens; ``--quick``: batches 1 and 4,
prompt 64, 16 new tokens. Eager HF ``generate`` (dynamic cache); ``--compile`` compiles
the forward with a static cache and CUDA graphs (``mode="reduce-overhead"``), which is
where decode stops being launch-bound on a GPU.
"""
from __future__ import annotations

import argparse
import gc
import sys

import torch
import torch.nn as nn

from obdk.models import linear_groups
from obdk.nn import LowRankLinear, PackedSlice, pack_shared_inputs, unpack_shared_inputs

from .core.env import env_fields, set_threads
from .core.models import DTYPES, random_llama
from .core.rows import print_table, write_csv
from .core.timing import median_seconds

SIZES = {
    "tiny": dict(hidden=256, inter=688, layers=2, heads=4, vocab=2048),
    "small": dict(hidden=1024, inter=2816, layers=4, heads=16, vocab=8192),
    "1b": dict(hidden=2048, inter=5504, layers=16, heads=16, vocab=32000),
    "7b": dict(hidden=4096, inter=11008, layers=32, heads=32, vocab=32000),
}


def rank_for(keep: float, m: int, n: int) -> int:
    r = keep * m * n / (m + n)
    q = 64 if r >= 256 else 8
    return max(q, int(round(r / q)) * q)


def make_lowrank(model: nn.Module, groups, keep: float) -> dict:
    """Replace every targeted Linear (or previous low-rank module) by a random LowRankLinear."""
    unpack_shared_inputs(model)
    ranks = {}
    for grp in groups:
        for name in grp.names:
            old = model.get_submodule(name)
            parent, _, attr = name.rpartition(".")
            has_bias = getattr(old, "bias", None) is not None
            r = rank_for(keep, old.out_features, old.in_features)
            p = next(old.parameters())
            new = LowRankLinear(old.in_features, old.out_features, r, bias=has_bias, device=p.device, dtype=p.dtype)
            new.reset_parameters()
            setattr(model.get_submodule(parent), attr, new)
            ranks[name] = r
            del old
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return ranks


def measure(model, device, batch: int, prompt: int, new: int, reps: int, vocab: int, compile_: bool) -> dict:
    g = torch.Generator().manual_seed(batch * 7919 + prompt)
    ids = torch.randint(0, vocab, (batch, prompt), generator=g).to(device)
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None,
              attention_mask=mask)
    if compile_:
        kw["cache_implementation"] = "static"
    kw1 = dict(kw, max_new_tokens=1, min_new_tokens=1)
    with torch.no_grad():
        t_pre = median_seconds(lambda: model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1), device, reps)
        t_gen1 = median_seconds(lambda: model.generate(ids, **kw1), device, reps)
        t_gen = median_seconds(lambda: model.generate(ids, **kw), device, max(1, reps // 2))
    decode = t_gen - t_gen1  # the new-1 decode steps; prefill and generate's set-up cancel
    return {"prefill_ms": t_pre * 1e3, "generate_s": t_gen, "tok_s": batch * new / t_gen,
            "decode_tok_s": batch * (new - 1) / decode if decode > 0 and new > 1 else float("nan")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="default: 7b on CUDA, small on CPU")
    for k in ("hidden", "inter", "layers", "heads", "kv-heads", "vocab"):
        p.add_argument(f"--{k}", type=int, default=None)
    p.add_argument("--keeps", type=float, nargs="*", default=[0.8, 0.6])
    p.add_argument("--no-packed", action="store_true", help="skip the packed q/k/v, gate/up variants")
    p.add_argument("--batches", type=int, nargs="*", default=None)
    p.add_argument("--prompt", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="batches 1 4, prompt 64, 16 new tokens, 2 reps")
    p.add_argument("--compile", action="store_true", help="torch.compile(mode='reduce-overhead') + static cache")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend with --compile (inductor: CUDA graphs through mode='reduce-overhead'; "
                        "eager: graph capture only, for CPU dry runs)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is steadier on a shared, oversubscribed machine)")
    p.add_argument("--out", help="append rows to this CSV")
    args = p.parse_args(argv)
    set_threads(args.threads)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    size = args.size or ("7b" if gpu else "small")
    shape = dict(SIZES[size])
    for k in ("hidden", "inter", "layers", "heads", "kv_heads", "vocab"):
        v = getattr(args, k)
        if v is not None:
            shape[k] = v
    batches = args.batches or ([1, 4] if args.quick else [1, 16])
    prompt = args.prompt or (64 if args.quick else 512)
    new = args.new_tokens or (16 if args.quick else 128)
    reps = args.reps or (2 if args.quick else 3)
    env = env_fields(device)
    print(f"# {env['device_name']}  torch {env['torch']}  obdk {env['obdk']}  {env['git_sha']}  {dtype}  "
          f"model {size} {shape}  batches {batches} prompt {prompt} new {new}", flush=True)

    model = random_llama(**shape, device=device, dtype=dtype)
    if args.compile:
        kw = {"mode": "reduce-overhead"} if args.compile_backend == "inductor" else {"backend": args.compile_backend}
        model.forward = torch.compile(model.forward, fullgraph=False, **kw)
    groups = linear_groups(model)
    variants = [("dense", None, False)]
    for keep in args.keeps:
        variants.append((f"keep{keep}", keep, False))
        if not args.no_packed:
            variants.append((f"keep{keep}+packed", keep, True))

    rows, dense_by_batch = [], {}
    for name, keep, packed in variants:
        if keep is not None and not packed:
            make_lowrank(model, groups, keep)
        if packed:
            pack_shared_inputs(model)
        n_params = sum(p.numel() for p in model.parameters())
        for batch in batches:
            res = measure(model, device, batch, prompt, new, reps, shape["vocab"], args.compile)
            row = {"variant": name, "keep": keep if keep is not None else 1.0, "packed": packed, "size": size,
                   "compile": args.compile_backend if args.compile else "",
                   **{f"cfg_{k}": v for k, v in shape.items()}, "dtype": str(dtype).split(".")[-1],
                   "params_M": n_params / 1e6, "batch": batch, "prompt": prompt, "new_tokens": new, **res}
            if name == "dense":
                dense_by_batch[batch] = res
            d = dense_by_batch.get(batch)
            if d:
                row["prefill_speedup"] = d["prefill_ms"] / res["prefill_ms"]
                row["tok_s_speedup"] = res["tok_s"] / d["tok_s"]
                row["decode_speedup"] = res["decode_tok_s"] / d["decode_tok_s"]
            rows.append(row)
            print_table([row], ["variant", "batch", "params_M", "prefill_ms", "generate_s", "tok_s",
                                        "decode_tok_s", "prefill_speedup", "tok_s_speedup", "decode_speedup"])
        if packed:
            assert any(isinstance(m, PackedSlice) for m in model.modules())
    rows = [{**r, **env} for r in rows]
    if args.out:
        print(f"# wrote {len(rows)} rows to {write_csv(rows, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
