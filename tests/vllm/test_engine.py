"""obdk checkpoints served by ``vllm.LLM`` on this CPU, against obdk's own transformers load (fp32).

Tiny random Llama (tied embeddings, GQA), Qwen2 (q/k/v biases), Mistral (one KV head: replicated
k/v shards at TP 2) and Phi-3 (q/k/v and gate/up fused on disk), each compressed by
``obdk.compress`` with dense and low-rank members inside its fused groups, saved, and served at
tensor parallelism 1 and 2 (one engine per architecture and TP, reused by every check of it):
prompt log-probabilities within 1e-5 of ``obdk.load_pretrained``, greedy tokens identical, every
stored module served as stored (low-rank modules as their factors, by obdk's Linear method, which
ran in the forward), nothing densified.
"""
from __future__ import annotations

import gc
import os

import pytest
import torch

# engine core in this process (TP 1 then needs no engine process; TP 2 still starts its two workers),
# and functions sent to the workers by LLM.apply_model
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from vllm import LLM, SamplingParams  # noqa: E402
from vllm.distributed import cleanup_dist_env_and_memory  # noqa: E402

import obdk  # noqa: E402
from tests.vllm.conftest import ARCHS, VOCAB, ranks_of  # noqa: E402

PROMPTS = [torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (13, 7, 24)]
NEW = 8
CASES = [(a, 1) for a in ARCHS] + [(a, 2) for a in ARCHS]


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-tp{t}" for a, t in CASES])
def served(request, checkpoints):
    arch, tp = request.param
    path = str(checkpoints[arch])
    old = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1" if tp == 2 else "0-1"
    llm = LLM(model=path, dtype="float32", tensor_parallel_size=tp, enforce_eager=True, skip_tokenizer_init=True,
              max_model_len=128, max_num_seqs=4, seed=0)
    try:
        yield arch, tp, path, llm
    finally:
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()
        if old is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = old


def _reference(path):
    ref = obdk.load_pretrained(path)
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            lp = ref(torch.tensor([p])).logits[0].double().log_softmax(-1)
            prompt_lp = [lp[i, t].item() for i, t in enumerate(p[1:])]
            ids = list(p)
            for _ in range(NEW):  # greedy, no cache, no EOS stop
                ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
            out.append((prompt_lp, ids[len(p):]))
    return out


def test_logprobs_and_greedy_match_transformers(served):
    arch, tp, path, llm = served
    sp = SamplingParams(temperature=0.0, max_tokens=NEW, prompt_logprobs=1, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
    worst = 0.0
    for p, o, (want_lp, want_ids) in zip(PROMPTS, outs, _reference(path)):
        got_lp = [d[t].logprob for d, t in zip(o.prompt_logprobs[1:], p[1:])]
        worst = max(worst, max(abs(a - b) for a, b in zip(got_lp, want_lp)))
        assert list(o.outputs[0].token_ids) == want_ids, (arch, tp, p)
    assert worst <= 1e-5, f"{arch} TP {tp}: prompt log-probs differ by {worst:.2e}"


def _inspect(model):
    """In each worker: every Linear's method, its parameters' shapes, and calls seen by a forward hook."""
    from vllm.model_executor.layers.linear import LinearBase
    out = {}
    for name, mod in model.named_modules():
        qm = getattr(mod, "quant_method", None)
        if not isinstance(mod, LinearBase):
            continue
        layout = getattr(mod, "obdk_layout", None)
        out[name] = {"method": type(qm).__name__,
                     "members": None if layout is None else [(m.name, m.rank) for m in layout.members],
                     "weight_a": tuple(mod.weight_a.shape) if hasattr(mod, "weight_a") else None,
                     "weight": tuple(mod.weight.shape) if hasattr(mod, "weight") else None,
                     "calls": getattr(mod, "_obdk_test_calls", 0)}
    return out


def _hook(model):
    def count(mod, args):
        mod._obdk_test_calls = getattr(mod, "_obdk_test_calls", 0) + 1
    n = 0
    for mod in model.modules():
        if type(getattr(mod, "quant_method", None)).__name__ == "ObdkLinearMethod":
            mod.register_forward_pre_hook(count)
            n += 1
    return n


def test_served_as_stored(served):
    arch, tp, path, llm = served
    ranks = ranks_of(path)
    assert all(n > 0 for n in llm.apply_model(_hook))
    llm.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(max_tokens=2, detokenize=False), use_tqdm=False)
    per_rank = llm.apply_model(_inspect)
    assert len(per_rank) == tp
    for layers in per_rank:
        served_lr = {}
        for name, info in layers.items():
            if info["method"] == "ObdkLinearMethod":
                members = dict(info["members"])
                served_lr.update({n: r for n, r in members.items() if r is not None})
                # the stacked factors: exactly the stored ranks of the low-rank members, never a dense product
                assert info["weight_a"][0] == sum(r for r in members.values() if r), (name, info)
                assert info["calls"] > 0, f"{name}: obdk's apply never ran in vLLM's forward"
            else:
                assert info["method"] == "UnquantizedLinearMethod", (name, info)
        assert served_lr == ranks
    # what the checkpoint holds: fused groups that mix low-rank and dense members, unequal ranks
    mixed = [info for info in per_rank[0].values() if info["members"] and len(info["members"]) > 1
             and any(r is None for _, r in info["members"]) and any(r for _, r in info["members"])]
    assert mixed or arch == "phi3", "no fused group mixes low-rank and dense members"

