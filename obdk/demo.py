"""The README's first command: obdk's main job on the real default model and data.

Runs the CLI twice: ``obdk compress smollm2-135m --method obd --keep 0.8 --calib
wikitext2:validation --nsamples 32 --seqlen 512 --eval-windows 32 --out DIR`` (calibrate,
decompose, allocate, save; WikiText-2 test perplexity of the dense and the compressed
model on the same first 32 windows of 512, with the measured and predicted loss
increase), then ``obdk generate DIR`` (the saved checkpoint loaded back from disk).
``python -m obdk.demo --help`` for options.
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m obdk.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="obd")
    ap.add_argument("--keep", type=float, default=0.8)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=32, help="evaluation windows of --seqlen tokens")
    ap.add_argument("--out", default="runs/smollm2-135m-obd-keep0.8")
    ap.add_argument("--prompt", default="The history of the city of Paris")
    args = ap.parse_args(argv)

    from obdk.cli import main as cli

    t0 = time.perf_counter()
    compress = ["compress", args.model, "--method", args.method, "--keep", str(args.keep),
                "--calib", "wikitext2:validation", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                "--seed", "0", "--eval-windows", str(args.windows), "--out", args.out]
    print("$ obdk " + " ".join(compress), flush=True)
    code = cli(compress)
    if code:
        return code
    generate = ["generate", args.out, "--prompt", args.prompt, "--max-new-tokens", "32"]
    print("\n$ obdk " + " ".join(generate), flush=True)
    code = cli(generate)
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s; compressed model saved in {args.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
