#!/usr/bin/env bash
# Compile every torch-free CUDA kernel file, csrc/cuda/*_kernels.cu, with nvcc for sm_90a so a
# broken kernel fails CI even on machines without a GPU or a CUDA build of torch.
#
#   .ci/nvcc_check.sh            # exit 0: all compiled; 1: a compile error or no nvcc
#
# Environment:
#   NVCC                  the compiler to use (default: $CUDA_HOME/bin/nvcc, nvcc on PATH,
#                         /usr/local/cuda/bin/nvcc, in that order)
#   OBDK_ALLOW_NO_NVCC=1  exit 0 with a message when no nvcc is found (default: fail)
#   OBDK_NVCC_GENCODE     gencode flags (default: -gencode arch=compute_90a,code=sm_90a)
#   OBDK_CUDA_SRC_DIR     where the *_kernels.cu files are (default: csrc/cuda)
#   OBDK_NVCC_JOBS        parallel compiles (default: 2)
# Objects go to a fresh mktemp directory removed on exit, so concurrent runs never collide.
set -euo pipefail
cd "$(dirname "$0")/.."

find_nvcc() {
  if [[ -n "${NVCC:-}" ]]; then
    [[ -x "$NVCC" ]] && { echo "$NVCC"; return 0; }
    command -v "$NVCC" 2>/dev/null && return 0
    return 1  # an explicit NVCC that does not exist means "no nvcc"
  fi
  if [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then echo "$CUDA_HOME/bin/nvcc"; return 0; fi
  command -v nvcc 2>/dev/null && return 0
  if [[ -x /usr/local/cuda/bin/nvcc ]]; then echo /usr/local/cuda/bin/nvcc; return 0; fi
  return 1
}

if ! nvcc_bin="$(find_nvcc)"; then
  if [[ "${OBDK_ALLOW_NO_NVCC:-0}" == "1" ]]; then
    echo "nvcc_check: no nvcc found (NVCC, \$CUDA_HOME/bin, PATH, /usr/local/cuda/bin); skipped because OBDK_ALLOW_NO_NVCC=1"
    exit 0
  fi
  echo "nvcc_check: ERROR: no nvcc found (NVCC, \$CUDA_HOME/bin, PATH, /usr/local/cuda/bin);" \
       "install the CUDA toolkit or set OBDK_ALLOW_NO_NVCC=1 to skip" >&2
  exit 1
fi

src_dir="${OBDK_CUDA_SRC_DIR:-csrc/cuda}"
read -r -a gencode <<< "${OBDK_NVCC_GENCODE:--gencode arch=compute_90a,code=sm_90a}"
jobs="${OBDK_NVCC_JOBS:-2}"

shopt -s nullglob
sources=("$src_dir"/*_kernels.cu)
if (( ${#sources[@]} == 0 )); then
  echo "nvcc_check: no *_kernels.cu under $src_dir: nothing to compile"
  exit 0
fi

tmp="$(mktemp -d "${TMPDIR:-/tmp}/obdk-nvcc.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

echo "nvcc_check: $("$nvcc_bin" --version | tail -n 2 | head -n 1) (${nvcc_bin})"
echo "nvcc_check: ${#sources[@]} file(s), ${gencode[*]}"

compile() {  # $1: source, $2: index; writes $tmp/$2.{o,log,rc}
  local rc=0
  "$nvcc_bin" -c -std=c++17 -O3 --use_fast_math -lineinfo "${gencode[@]}" -I"$src_dir" \
    -o "$tmp/$2.o" "$1" > "$tmp/$2.log" 2>&1 || rc=$?
  echo "$rc" > "$tmp/$2.rc"
}

running=0
for i in "${!sources[@]}"; do
  compile "${sources[$i]}" "$i" &
  running=$((running + 1))
  if (( running >= jobs )); then wait -n || true; running=$((running - 1)); fi
done
wait

failed=0
for i in "${!sources[@]}"; do
  rc="$(cat "$tmp/$i.rc" 2>/dev/null || echo 1)"
  if [[ "$rc" == "0" ]]; then
    echo "  ok    ${sources[$i]}"
  else
    echo "  FAIL  ${sources[$i]} (nvcc exit $rc)" >&2
    sed 's/^/        /' "$tmp/$i.log" >&2
    failed=1
  fi
  # warnings are shown too: they are cheap to fix while the file is fresh
  if [[ "$rc" == "0" && -s "$tmp/$i.log" ]]; then sed 's/^/        /' "$tmp/$i.log"; fi
done
exit "$failed"
