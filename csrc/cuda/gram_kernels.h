// Symmetric Gram accumulation on CUDA, torch-free: acc[n, n] += alpha * x^T x for x[T, n].
//
// Only the upper-triangle 128x128 tiles (i <= j) are computed; each thread block owns one tile,
// loops over its tokens in a fixed order with fp32 accumulation (WMMA tensor cores for
// half/bf16, FMA for float), and adds alpha*tile to acc[I, J] (p <= q) and the same values to
// acc[J, I] (p < q). The result is deterministic (no atomics) and exactly symmetric. With
// split > 1 the tokens are cut into `split` chunks whose partial tiles go to an fp32 workspace
// and are summed in order 0..split-1 by a second kernel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace obdk {
namespace cuda {

constexpr int kGramTile = 128;  // output tile edge of every gram kernel

struct GramArgs {
  const void* x = nullptr;      // [T, n]; element (t, k) at x[t * stride_t + k * stride_n]
  int64_t T = 0, n = 0;
  int64_t stride_t = 0, stride_n = 1;  // in elements
  void* acc = nullptr;          // [n, n] float or double; element (p, q) at acc[p * s0 + q * s1]
  bool acc_is_double = false;
  int64_t acc_stride0 = 0, acc_stride1 = 1;
  double alpha = 1.0;
  int split = 1;                // token splits; > 1 needs `workspace`
  float* workspace = nullptr;   // gram_workspace_elems(n, split) floats (contents need no init)
  bool tensor_cores = true;     // half/bf16: WMMA when the device has it; false forces the FMA kernel
};

// Token splits worth using for [T, n] on a device with `num_sms` SMs (1: no workspace).
int gram_default_split(int64_t T, int64_t n, int num_sms);

// Floats of workspace needed for `split` (0 when split <= 1).
size_t gram_workspace_elems(int64_t n, int split);

// Enqueue acc += alpha * x^T x on `stream`. T: __half, __nv_bfloat16 or float (explicitly
// instantiated in gram_kernels.cu). Returns the launch error, if any.
template <typename T>
cudaError_t gram_acc_launch(const GramArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace obdk
