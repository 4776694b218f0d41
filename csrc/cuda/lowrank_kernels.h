// Torch-free CUDA kernels for the two-factor low-rank linear y = (x a^T) b^T + bias
// at decode (M <= kLowrankDecodeMaxM rows). Raw-pointer launchers; the torch glue
// is csrc/cuda/lowrank.cpp.
//
// Two launches, both streaming one factor with 16-byte vector loads:
//  1. shrink, split over n: grid (r-blocks of 16 rows of a, n-splits); each warp owns
//     4 rows of a, accumulates the M dot products in fp32 and writes its partial to
//     workspace[split][M][r]; the last block of an r-block to finish (atomic counter,
//     reset by that block) sums the splits in fixed order into t[M][r] (fp32), so the
//     result is deterministic.
//  2. expand: grid over 16-row blocks of b; y[M][m] = t b^T + bias with fp32 math,
//     stored in the input dtype.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace obdk {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Rows of x at or below which the decode kernels apply.
constexpr int kLowrankDecodeMaxM = 16;

struct LowrankDecodePlan {
  int splits = 1;                // n-splits of the shrink
  int split_k = 0;               // columns of n per split
  int r_blocks = 0;              // 16-row blocks of a (= counters used)
  size_t workspace_floats = 0;   // fp32 elements of workspace: (splits + 1) * M * r
};

// Choose the split of n so the shrink fills ~4 blocks per SM. sm_count <= 0: assume 132.
LowrankDecodePlan lowrank_decode_plan(int M, int n, int r, int sm_count);

// y[M, m] (row stride ldy) = (x[M, n] (row stride ldx) a[r, n]^T) b[m, r]^T + bias[m].
// a, b contiguous row-major; x, a, b, bias, y all of `dtype`; bias may be nullptr.
// `workspace`: plan.workspace_floats fp32; `counters`: >= plan.r_blocks ints, zero
// before the first call (the kernels leave them zero; one set per concurrent stream).
// Returns the launch error (cudaSuccess on success); 1 <= M <= kLowrankDecodeMaxM.
cudaError_t lowrank_decode(DType dtype, const void* x, int64_t ldx, const void* a, const void* b,
                           const void* bias, void* y, int64_t ldy, int M, int n, int r, int m,
                           const LowrankDecodePlan& plan, float* workspace, int* counters,
                           cudaStream_t stream);

}  // namespace cuda
}  // namespace obdk
