#!/usr/bin/env bash
# Full CUDA build of obdk._C on a machine without a GPU: a separate venv with the CUDA build of
# torch, obdk._C built with its CUDA sources for sm_90a by nvcc, imported, and its CUDA kernels
# checked to be registered. Leaves the main (CPU) build untouched: nothing is written to obdk/
# or to ./build/temp.*; the CUDA extension is built into $OBDK_CUDA_BUILD_DIR and imported from
# a staged copy of the package there.
#
#   .ci/cuda_build.sh            # exit 0: built, imported, CUDA kernels registered; else 1
#   make cuda-build              # the same
#
# Steps (each timed; the times go to $OBDK_CUDA_BUILD_DIR/timings.txt):
#   1. venv    $OBDK_CUDA_VENV (transformers, numpy, pybind11, ninja ... come from $PYTHON's
#              environment through a .pth file rewritten on every run, behind the venv's own) with $OBDK_CUDA_TORCH_SPEC (torch==2.14.1, CUDA 13.0,
#              about 5.5 GB, from this machine's local index); skipped when already there.
#   2. stage   obdk/ and kernels/ copied to $OBDK_CUDA_BUILD_DIR/stage/obdk (no .so, no caches).
#   3. build   `setup.py build_ext -b stage -t temp` with TORCH_CUDA_ARCH_LIST=9.0a
#              (-gencode arch=compute_90a,code=sm_90a) and OBDK_PTXAS_VERBOSE=1 (-Xptxas -v),
#              always from a clean temp dir so the ptxas lines are complete; log: build.log.
#   4. check   .ci/cuda_build_check.py in the venv: obdk._C is the staged CUDA build,
#              with_cuda(), gram_acc_cuda / lowrank_linear_cuda exported, the ops' kernels
#              reachable from the CUDA dispatch key, the obdk "cuda" backend selectable, and
#              the .so's cubins are sm_90a.
#   5. table   the ptxas lines (registers, stack, spills, smem per CUDA kernel) replace the
#              source=nvcc rows of benchmarks/results/triton_sm90_resources.csv
#              (skipped with OBDK_CUDA_BUILD_NO_TABLE=1).
#
# Environment:
#   OBDK_CUDA_VENV         venv path (default: ../venvs/torch-cuda beside the repo, outside git)
#   OBDK_CUDA_TORCH_SPEC   torch to install there (default: torch==2.14.1)
#   OBDK_CUDA_BUILD_DIR    build output (default: build/cuda, git-ignored)
#   CUDA_HOME              toolkit (default: the real directory of nvcc, e.g. /usr/local/cuda-13.0)
#   TORCH_CUDA_ARCH_LIST   default 9.0a;  MAX_JOBS: default as setup.py (cores, RAM/2 GiB)
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
PYTHON="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}"
venv="${OBDK_CUDA_VENV:-$(cd .. && pwd)/venvs/torch-cuda}"
spec="${OBDK_CUDA_TORCH_SPEC:-torch==2.14.1}"
out="${OBDK_CUDA_BUILD_DIR:-$repo/build/cuda}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
timings="$out/timings.txt"
: > "$timings"
t_all=$SECONDS
phase() {  # phase NAME START
  local dt=$((SECONDS - $2))
  printf '%-8s %5d s\n' "$1" "$dt" | tee -a "$timings"
}

# --------------------------------------------------------------------------- 1. venv
t0=$SECONDS
vpy="$venv/bin/python"
want_version="${spec#torch==}"
have_version="$("$vpy" -c 'import torch; print(torch.__version__.split("+")[0], torch.version.cuda or "none")' 2>/dev/null || true)"
if [[ "$have_version" == "$want_version "* && "$have_version" != *" none" ]]; then
  echo "cuda_build: venv $venv already has torch $have_version"
else
  echo "cuda_build: creating $venv with $spec (several GB; local index)"
  "$PYTHON" -m venv "$venv"
  "$vpy" -m pip install -q "$spec"
fi
# $PYTHON's site-packages behind the venv's own (what --system-site-packages does for a system
# python, which $PYTHON, the project's venv, is not)
base_site="$("$PYTHON" -c 'import site; print(site.getsitepackages()[0])')"
venv_site="$("$vpy" -c 'import site; print(site.getsitepackages()[0])')"
echo "import site; site.addsitedir('$base_site')" > "$venv_site/_obdk_base_env.pth"
"$vpy" -c 'import torch; assert torch.version.cuda, "torch in the venv has no CUDA"; print("cuda_build: torch", torch.__version__, "CUDA", torch.version.cuda, "| GPU visible:", torch.cuda.is_available())'
phase venv "$t0"

# --------------------------------------------------------------------------- 2. stage
t0=$SECONDS
stage="$out/stage"
rm -rf "$stage" "$out/temp"
mkdir -p "$stage"
# -h: obdk/kernels is a symlink to ../kernels; the stage gets the files themselves
tar -C "$repo" -h --exclude='__pycache__' --exclude='*.so' -cf - obdk | tar -C "$stage" -xf -
phase stage "$t0"

# --------------------------------------------------------------------------- 3. build
t0=$SECONDS
if [[ -z "${CUDA_HOME:-}" ]]; then
  nvcc_path="$(command -v nvcc || true)"
  [[ -z "$nvcc_path" && -x /usr/local/cuda/bin/nvcc ]] && nvcc_path=/usr/local/cuda/bin/nvcc
  [[ -n "$nvcc_path" ]] || { echo "cuda_build: ERROR: no nvcc (set CUDA_HOME)" >&2; exit 1; }
  # /usr/local/bin/nvcc may be a wrapper script: ask nvcc where its toolkit is
  CUDA_HOME="$("$nvcc_path" -v -E -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n1)"
  CUDA_HOME="$(cd "$CUDA_HOME/.." 2>/dev/null && pwd || true)"
  [[ -d "$CUDA_HOME/include" ]] || CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$nvcc_path")")")"
fi
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
export OBDK_PTXAS_VERBOSE=1
# The CUDA torch's headers include cuBLAS/cuSPARSE/cuDNN headers; with a minimal toolkit they come
# from the nvidia-* wheels installed next to torch in the venv.
pkg_inc="$("$vpy" - <<'EOF'
import glob, os, site
dirs = []
for sp in site.getsitepackages():
    dirs += sorted(d for d in glob.glob(os.path.join(sp, "nvidia", "**", "include"), recursive=True) if os.path.isdir(d))
print(":".join(dirs))
EOF
)"
export CPATH="${pkg_inc}${CPATH:+:$CPATH}"
echo "cuda_build: nvcc $("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p') (CUDA_HOME=$CUDA_HOME), TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=${MAX_JOBS:-setup.py default}"
set +e
"$vpy" setup.py -q build_ext -b "$stage" -t "$out/temp" > "$out/build.log" 2>&1
rc=$?
set -e
if (( rc != 0 )); then
  echo "cuda_build: ERROR: build failed (exit $rc); last lines of $out/build.log:" >&2
  tail -n 40 "$out/build.log" >&2
  exit 1
fi
so="$(ls "$stage"/obdk/_C*.so)"
echo "cuda_build: built $so ($(du -h "$so" | cut -f1)); $(grep -c 'ptxas info    : Used' "$out/build.log") ptxas resource lines in $out/build.log"
phase build "$t0"

# --------------------------------------------------------------------------- 4. check
t0=$SECONDS
PYTHONPATH="$stage" OBDK_CUDA_STAGE="$stage" "$vpy" .ci/cuda_build_check.py "$so"
phase check "$t0"

# --------------------------------------------------------------------------- 5. table
if [[ "${OBDK_CUDA_BUILD_NO_TABLE:-0}" != "1" ]]; then
  t0=$SECONDS
  "$PYTHON" -m benchmarks.triton_sm90_resources --nvcc-log "$out/build.log" \
    --nvcc-version "$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
  phase table "$t0"
fi
phase total "$t_all"
echo "cuda_build: OK (times in $timings)"
