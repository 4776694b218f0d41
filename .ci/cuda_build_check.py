"""Checks a CUDA build of obdk._C on a machine without a GPU (run by .ci/cuda_build.sh).

    PYTHONPATH=<stage> <venv>/bin/python .ci/cuda_build_check.py <stage>/obdk/_C*.so

Exits 1 with a message on the first failed check. What it checks:

* the CUDA build of torch imports (no GPU needed) and ``obdk`` and ``obdk._C`` are the staged
  copies (not the main CPU build in the repository), and ``_C.with_cuda()`` is true;
* ``_C`` exports ``gram_acc_cuda`` and ``lowrank_linear_cuda`` and obdk's loader saw them;
* ``obdk::gram_acc_``, ``obdk::lowrank_linear`` and ``obdk::lowrank_linear_grouped`` have a kernel
  for the CUDA dispatch key. They are ``torch.library.custom_op``s: one
  CompositeExplicitAutograd kernel serves every device (so ``_dispatch_has_kernel_for_dispatch_key
  (op, "CUDA")`` is false by design) and picks the implementation through obdk's backend
  registry. So the check is the dispatcher's *computed* CUDA kernel plus the registry: forcing
  the ``cuda`` and the ``triton`` backend on device ``cuda`` must select the native
  ``obdk._C.*_cuda`` function and the Triton launcher, with no "cannot run" reason;
* the extension's machine code is sm_90a (``cuobjdump --list-elf``, when a cuobjdump is found).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys


def fail(msg: str) -> None:
    print(f"cuda_build_check: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def ok(msg: str) -> None:
    print(f"cuda_build_check: ok   {msg}")


def main() -> None:
    so = os.path.realpath(sys.argv[1]) if len(sys.argv) > 1 else None
    stage = os.path.realpath(os.environ.get("OBDK_CUDA_STAGE", ""))

    import torch
    if not torch.version.cuda:
        fail(f"torch {torch.__version__} has no CUDA")
    ok(f"torch {torch.__version__} (CUDA {torch.version.cuda}) imported; GPU visible: {torch.cuda.is_available()}")

    import obdk
    from obdk import _ext
    pkg = os.path.realpath(os.path.dirname(obdk.__file__))
    if stage and not pkg.startswith(stage + os.sep):
        fail(f"obdk imported from {pkg}, not from the stage {stage}")
    if _ext._C is None:
        fail(f"obdk._C did not load: {_ext.load_error}")
    c_file = os.path.realpath(_ext._C.__file__)
    if so and c_file != so:
        fail(f"obdk._C is {c_file}, not the CUDA build {so}")
    if not _ext._C.with_cuda():
        fail("obdk._C.with_cuda() is False: the CUDA sources were not compiled in")
    ok(f"obdk._C loaded from {c_file}, with_cuda() = True, devices {_ext.devices()}")

    for name in ("gram_acc_cuda", "lowrank_linear_cuda"):
        if not _ext.has(name):
            fail(f"obdk._C does not export {name}")
    ok("obdk._C exports gram_acc_cuda, lowrank_linear_cuda")

    import obdk.nn  # noqa: F401  (declares obdk::lowrank_linear_grouped)
    from obdk.backends import select
    ops = ["obdk::gram_acc_", "obdk::lowrank_linear", "obdk::lowrank_linear_grouped"]
    for op in ops:
        if not torch._C._dispatch_has_computed_kernel_for_dispatch_key(op, "CUDA"):
            fail(f"{op} has no kernel for the CUDA dispatch key")
        direct = torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
        cea = torch._C._dispatch_has_kernel_for_dispatch_key(op, "CompositeExplicitAutograd")
        ok(f"{op}: CUDA dispatch key has a kernel (direct CUDA registration: {direct}, "
           f"CompositeExplicitAutograd: {cea})")

    for op, native in (("gram_acc_", "gram_acc_cuda"), ("lowrank_linear", "lowrank_linear_cuda")):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            c = select(op, "cuda", dtype, backend="cuda")
            if c.fn.__name__ != f"obdk._C.{native}":
                fail(f"obdk backend 'cuda' for {op} on cuda/{dtype} is {c.fn.__name__}")
            t = select(op, "cuda", dtype, backend="triton")
            if t.backend != "triton":
                fail(f"obdk backend 'triton' for {op} on cuda/{dtype} is {t.backend}")
        ok(f"obdk backend registry: {op} on cuda selects obdk._C.{native} (forced 'cuda') and "
           f"{select(op, 'cuda', torch.float16, backend='triton').fn.__name__} (forced 'triton'), fp16/bf16/fp32")
    # the grouped op dispatches on the backend obdk::lowrank_linear would use
    ok(f"automatic choice on cuda: gram_acc_ -> {select('gram_acc_', 'cuda', torch.bfloat16).backend}, "
       f"lowrank_linear -> {select('lowrank_linear', 'cuda', torch.bfloat16).backend}")

    cuobjdump = shutil.which("cuobjdump")
    if cuobjdump is None:
        try:
            import triton
            cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
            cuobjdump = cand if os.path.exists(cand) else None
        except ImportError:
            pass
    if cuobjdump and so:
        res = subprocess.run([cuobjdump, "--list-elf", so], capture_output=True, text=True)
        archs = sorted({w.split(".")[-2] for w in res.stdout.split() if w.endswith(".cubin")})
        if not archs:
            fail(f"no cubin in {so} (cuobjdump --list-elf: {res.stdout.strip()} {res.stderr.strip()})")
        if any(a != "sm_90a" for a in archs):
            fail(f"{so} holds machine code for {archs}, expected sm_90a only")
        n = sum(1 for w in res.stdout.split() if w.endswith(".cubin"))
        ok(f"{n} cubins in the extension, all sm_90a")
    print("cuda_build_check: all checks passed")


if __name__ == "__main__":
    main()
