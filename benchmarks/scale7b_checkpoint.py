"""Write a random Llama-2-7B-*shaped* fp32 checkpoint to disk, one decoder layer at a time (never the whole model).

``python -m benchmarks.scale7b_checkpoint OUT_DIR [--layers 32] [--seed 0]`` writes a Hugging Face safetensors
checkpoint: ``config.json`` (Llama-2-7B's shape: hidden 4096, intermediate 11008, 32 heads, 32 kv heads, vocabulary
32000, untied head, ``torch_dtype`` float32; ``--layers`` decoder layers), one shard per decoder layer
(``model-layer-00007.safetensors``: its 9 tensors, 0.81 GB at this width), one for the embeddings and one for the
final norm and the LM head, ``model.safetensors.index.json``, and a character tokenizer
(:func:`obdk.testing.make_char_tokenizer`, 128 ids: a real tokenizer is not needed, the ids index the 32000-row
embedding). Host memory holds one shard's tensors at a time (≤ 0.81 GB).

Values: every Linear and the embedding ``N(0, 0.02²)`` (Llama-2's ``initializer_range``, what
``LlamaForCausalLM._init_weights`` draws), every RMSNorm weight 1: the residual stream grows to an RMS of a few units
over 32 layers and every activation stays finite. Each tensor has its own generator, seeded by ``--seed`` and the
tensor's name, so a checkpoint is the same bytes on any machine and at any layer count (layer ``i`` of a 2-layer
checkpoint equals layer ``i`` of the 32-layer one). The directory is written as ``OUT_DIR.partial`` and renamed
when complete, with ``scale7b_build.json`` (sizes, seconds) inside: a directory without it is not a checkpoint.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

#: Llama-2-7B's config.json fields that fix the shapes and the forward (the published
#: meta-llama/Llama-2-7b-hf config), in fp32
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 num_hidden_layers=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False, initializer_range=0.02,
                 bos_token_id=1, eos_token_id=2, attention_bias=False, mlp_bias=False)
DONE = "scale7b_build.json"
INDEX = "model.safetensors.index.json"


def llama7b_config(layers: int = 32, **shape):
    """A ``LlamaConfig`` of Llama-2-7B's shape with ``layers`` decoder layers (``shape`` overrides, e.g. for tests)."""
    from transformers import LlamaConfig
    return LlamaConfig(**{**LLAMA2_7B, "num_hidden_layers": int(layers), **shape}, torch_dtype="float32")


def _tensor(name: str, shape: tuple[int, ...], seed: int, std: float) -> torch.Tensor:
    """The value of checkpoint tensor ``name``: ones for a norm, else ``N(0, std²)`` from its own seeded generator."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed * 1_000_003 + int(hashlib.sha256(name.encode()).hexdigest()[:12], 16))
    return torch.randn(shape, generator=g, dtype=torch.float32).mul_(std)


def shards_of(config) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
    """``[(file name, [(tensor name, shape)])]`` of the checkpoint of ``config``, read from the model built on the
    meta device (no memory): the embeddings, each decoder layer, then the final norm and the head."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    layers = config.num_hidden_layers
    out = [("model-embed.safetensors", [(n, s) for n, s in params if n.startswith("model.embed_tokens.")])]
    for i in range(layers):
        out.append((f"model-layer-{i:05d}.safetensors", [(n, s) for n, s in params
                                                          if n.startswith(f"model.layers.{i}.")]))
    placed = {n for _, group in out for n, _ in group}
    out.append(("model-head.safetensors", [(n, s) for n, s in params if n not in placed]))
    return out


def build(out: str | os.PathLike, layers: int = 32, *, seed: int = 0, std: float = 0.02, progress: bool = True,
          **shape) -> dict:
    """Write the checkpoint (see the module docstring) to ``out``; returns what ``scale7b_build.json`` records.

    An existing complete checkpoint of the same layers, seed and shape is kept as it is (its record returned);
    anything else at ``out`` is an error (never overwritten)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from obdk.testing import make_char_tokenizer
    out = Path(out)
    config = llama7b_config(layers, **shape)
    want = {"layers": int(layers), "seed": int(seed), "std": float(std), "config": config.to_diff_dict()}
    if out.exists():
        rec = json.loads((out / DONE).read_text()) if (out / DONE).is_file() else None
        if rec is None or {k: rec.get(k) for k in want} != want:
            raise SystemExit(f"{out} exists and is not this checkpoint ({DONE} missing or different); remove it")
        return rec
    part = Path(f"{out}.partial")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    t0 = time.perf_counter()
    weight_map, total = {}, 0
    plan = shards_of(config)
    with tqdm(total=len(plan), desc="scale7b checkpoint [writing shards]", unit="shard", disable=not progress) as bar:
        for fname, group in plan:
            tensors = {n: _tensor(n, s, seed, std) for n, s in group}
            save_file(tensors, str(part / fname), metadata={"format": "pt"})
            for n, t in tensors.items():
                weight_map[n] = fname
                total += t.numel() * t.element_size()
            del tensors
            bar.update(1)
    (part / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(str(part))
    make_char_tokenizer(128).save_pretrained(str(part))
    rec = {**want, "tensor_bytes": total, "shards": len(plan),
           "params": total // 4, "disk_bytes": sum(f.stat().st_size for f in part.iterdir()),
           "seconds": round(time.perf_counter() - t0, 1)}
    (part / DONE).write_text(json.dumps(rec, indent=2))
    os.replace(part, out)
    return rec


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="checkpoint directory to write (must not exist, or be this same checkpoint)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--std", type=float, default=0.02, help="standard deviation of every Linear and the embedding")
    args = ap.parse_args(argv)
    print(json.dumps(build(args.out, args.layers, seed=args.seed, std=args.std)))


if __name__ == "__main__":
    main()
