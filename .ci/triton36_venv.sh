#!/usr/bin/env bash
# A venv with the GPU image's Triton (3.6.0) beside the installed one, for the sm_90a compile check
# of the Triton kernels under the Triton version the H200 image runs (tests/kernels/test_sm90_compile.py
# uses it when it exists, and skips the triton-3.6 part with a reason when it does not).
#
#   .ci/triton36_venv.sh         # idempotent; prints the venv's python
#   make triton36-venv           # the same
#
# Self-contained: torch (the kernel modules import it for dtypes; no CUDA needed, the CPU build
# $OBDK_TRITON36_TORCH_SPEC), numpy and triton==$OBDK_TRITON36_SPEC (triton has no dependencies),
# so it does not depend on which environment made it. About 40 s and 0.9 GB from local wheels.
#
# Environment: PYTHON (default python3; only its interpreter is used), OBDK_TRITON36_VENV (default
# ../venvs/triton36 beside the repo), OBDK_TRITON36_SPEC (default triton==3.6.0),
# OBDK_TRITON36_TORCH_SPEC (default torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
venv="${OBDK_TRITON36_VENV:-$(cd .. && pwd)/venvs/triton36}"
spec="${OBDK_TRITON36_SPEC:-triton==3.6.0}"
torch_spec="${OBDK_TRITON36_TORCH_SPEC:-torch==2.13.0}"
want="${spec#triton==}"
if [[ -x "$venv/bin/python" ]] && [[ "$("$venv/bin/python" -c 'import torch, triton; print(triton.__version__)' 2>/dev/null)" == "$want" ]]; then
  echo "$venv/bin/python"
  exit 0
fi
mkdir -p "$(dirname "$venv")"
rm -rf "$venv"
"$PYTHON" -m venv "$venv" >&2
"$venv/bin/python" -m pip install -q "$torch_spec" numpy >&2
"$venv/bin/python" -m pip install -q --no-deps "$spec" >&2
"$venv/bin/python" -c 'import triton, torch; print("triton", triton.__version__, "torch", torch.__version__)' >&2
echo "$venv/bin/python"
