// Decode-path CUDA kernels of y = (x a^T) b^T + bias (see lowrank_kernels.h).
// Torch-free: CUDA runtime + cuda_fp16 / cuda_bf16 only.
#include "lowrank_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

namespace obdk {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarps = 4;                    // warps per block
constexpr int kRowsPerWarp = 4;              // factor rows a warp streams at once
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
constexpr int kThreads = kWarps * kWarp;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Load VEC consecutive elements (16 bytes when VEC * sizeof(T) == 16) as floats.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&out)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_f(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_f(__ldg(p + i));
  }
}

// Streaming load of a factor: bypass L1 allocation (read once).
template <typename T, int VEC>
__device__ __forceinline__ void load_vec_stream(const T* __restrict__ p, float (&out)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    uint4 raw = __ldcs(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_f(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_f(p[i]);
  }
}

template <int VEC>
__device__ __forceinline__ void load_vec_f32(const float* __restrict__ p, float (&out)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int i = 0; i < VEC; i += 4) {
      float4 v = __ldg(reinterpret_cast<const float4*>(p + i));
      out[i] = v.x; out[i + 1] = v.y; out[i + 2] = v.z; out[i + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = __ldg(p + i);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Stage 1: partial t over one n-split for 16 rows of a; last block sums the splits.
// MT: compile-time bound on M (rows >= M skipped); VEC: elements per vector load.
template <typename T, int MT, int VEC>
__global__ void __launch_bounds__(kThreads)
lowrank_shrink_splitn(const T* __restrict__ x, int64_t ldx, const T* __restrict__ a,
                      float* __restrict__ ws, float* __restrict__ t, int* __restrict__ counters,
                      int M, int n, int r, int split_k) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int row0 = blockIdx.x * kRowsPerBlock + warp * kRowsPerWarp;
  const int split = blockIdx.y, splits = gridDim.y;
  const int k_begin = split * split_k;
  const int k_end = min(n, k_begin + split_k);

  float acc[kRowsPerWarp][MT];
#pragma unroll
  for (int w = 0; w < kRowsPerWarp; ++w)
#pragma unroll
    for (int i = 0; i < MT; ++i) acc[w][i] = 0.f;

  for (int k = k_begin + lane * VEC; k < k_end; k += kWarp * VEC) {
    float av[kRowsPerWarp][VEC];
#pragma unroll
    for (int w = 0; w < kRowsPerWarp; ++w) {
      if (row0 + w < r) {
        load_vec_stream<T, VEC>(a + (int64_t)(row0 + w) * n + k, av[w]);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) av[w][j] = 0.f;
      }
    }
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      if (i < M) {
        float xv[VEC];
        load_vec<T, VEC>(x + (int64_t)i * ldx + k, xv);
#pragma unroll
        for (int w = 0; w < kRowsPerWarp; ++w)
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[w][i] = fmaf(av[w][j], xv[j], acc[w][i]);
      }
    }
  }

  float* dst = splits == 1 ? t : ws + (int64_t)split * M * r;
#pragma unroll
  for (int w = 0; w < kRowsPerWarp; ++w)
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      float v = warp_sum(acc[w][i]);
      if (lane == 0 && i < M && row0 + w < r) dst[(int64_t)i * r + row0 + w] = v;
    }
  if (splits == 1) return;

  // Serial split reduction: the last block to arrive sums all splits in split order.
  __shared__ int is_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    int prev = atomicAdd(counters + blockIdx.x, 1);
    is_last = (prev == splits - 1);
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  const int rb0 = blockIdx.x * kRowsPerBlock;
  for (int idx = threadIdx.x; idx < M * kRowsPerBlock; idx += kThreads) {
    const int i = idx / kRowsPerBlock, row = rb0 + idx % kRowsPerBlock;
    if (row >= r) continue;
    float s = 0.f;
    for (int sp = 0; sp < splits; ++sp) s += __ldcg(ws + ((int64_t)sp * M + i) * r + row);
    t[(int64_t)i * r + row] = s;
  }
  if (threadIdx.x == 0) counters[blockIdx.x] = 0;  // ready for the next launch on this stream
}

// Stage 2: y[i, row] = sum_k t[i, k] b[row, k] + bias[row], fp32 math, 16 rows of b per block.
template <typename T, int MT, int VEC>
__global__ void __launch_bounds__(kThreads)
lowrank_expand(const float* __restrict__ t, const T* __restrict__ b, const T* __restrict__ bias,
               T* __restrict__ y, int64_t ldy, int M, int r, int m) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int row0 = blockIdx.x * kRowsPerBlock + warp * kRowsPerWarp;
  float acc[kRowsPerWarp][MT];
#pragma unroll
  for (int w = 0; w < kRowsPerWarp; ++w)
#pragma unroll
    for (int i = 0; i < MT; ++i) acc[w][i] = 0.f;

  for (int k = lane * VEC; k < r; k += kWarp * VEC) {
    float bv[kRowsPerWarp][VEC];
#pragma unroll
    for (int w = 0; w < kRowsPerWarp; ++w) {
      if (row0 + w < m) {
        load_vec_stream<T, VEC>(b + (int64_t)(row0 + w) * r + k, bv[w]);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) bv[w][j] = 0.f;
      }
    }
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      if (i < M) {
        float tv[VEC];
        load_vec_f32<VEC>(t + (int64_t)i * r + k, tv);
#pragma unroll
        for (int w = 0; w < kRowsPerWarp; ++w)
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[w][i] = fmaf(bv[w][j], tv[j], acc[w][i]);
      }
    }
  }
#pragma unroll
  for (int w = 0; w < kRowsPerWarp; ++w) {
    const int row = row0 + w;
    const float bb = (bias != nullptr && row < m) ? to_f(bias[row]) : 0.f;
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      float v = warp_sum(acc[w][i]);
      if (lane == 0 && i < M && row < m) y[(int64_t)i * ldy + row] = from_f<T>(v + bb);
    }
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T, int MT, int VEC>
cudaError_t launch_mt_vec(const T* x, int64_t ldx, const T* a, const T* b, const T* bias, T* y,
                          int64_t ldy, int M, int n, int r, int m, const LowrankDecodePlan& plan,
                          float* ws, int* counters, cudaStream_t stream) {
  float* t = ws + (int64_t)plan.splits * M * r;
  dim3 g1(plan.r_blocks, plan.splits);
  lowrank_shrink_splitn<T, MT, VEC><<<g1, kThreads, 0, stream>>>(x, ldx, a, ws, t, counters, M, n, r,
                                                                  plan.split_k);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  dim3 g2((m + kRowsPerBlock - 1) / kRowsPerBlock);
  lowrank_expand<T, MT, VEC><<<g2, kThreads, 0, stream>>>(t, b, bias, y, ldy, M, r, m);
  return cudaGetLastError();
}

template <typename T, int MT>
cudaError_t launch_mt(const T* x, int64_t ldx, const T* a, const T* b, const T* bias, T* y, int64_t ldy,
                      int M, int n, int r, int m, const LowrankDecodePlan& plan, float* ws, int* counters,
                      cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  // Both stages vectorise when every row start of x, a, b and t is 16-byte aligned.
  const bool vec = n % V == 0 && r % V == 0 && ldx % V == 0 && plan.split_k % V == 0 && aligned16(x) &&
                   aligned16(a) && aligned16(b) && aligned16(ws) && ((int64_t)plan.splits * M * r) % 4 == 0;
  if (vec) return launch_mt_vec<T, MT, V>(x, ldx, a, b, bias, y, ldy, M, n, r, m, plan, ws, counters, stream);
  return launch_mt_vec<T, MT, 1>(x, ldx, a, b, bias, y, ldy, M, n, r, m, plan, ws, counters, stream);
}

template <typename T>
cudaError_t launch(const void* x, int64_t ldx, const void* a, const void* b, const void* bias, void* y,
                   int64_t ldy, int M, int n, int r, int m, const LowrankDecodePlan& plan, float* ws,
                   int* counters, cudaStream_t stream) {
  auto X = static_cast<const T*>(x);
  auto A = static_cast<const T*>(a);
  auto B = static_cast<const T*>(b);
  auto BI = static_cast<const T*>(bias);
  auto Y = static_cast<T*>(y);
  if (M <= 1) return launch_mt<T, 1>(X, ldx, A, B, BI, Y, ldy, M, n, r, m, plan, ws, counters, stream);
  if (M <= 2) return launch_mt<T, 2>(X, ldx, A, B, BI, Y, ldy, M, n, r, m, plan, ws, counters, stream);
  if (M <= 4) return launch_mt<T, 4>(X, ldx, A, B, BI, Y, ldy, M, n, r, m, plan, ws, counters, stream);
  if (M <= 8) return launch_mt<T, 8>(X, ldx, A, B, BI, Y, ldy, M, n, r, m, plan, ws, counters, stream);
  return launch_mt<T, 16>(X, ldx, A, B, BI, Y, ldy, M, n, r, m, plan, ws, counters, stream);
}

}  // namespace

LowrankDecodePlan lowrank_decode_plan(int M, int n, int r, int sm_count) {
  LowrankDecodePlan p;
  if (sm_count <= 0) sm_count = 132;
  p.r_blocks = (r + kRowsPerBlock - 1) / kRowsPerBlock;
  const int target_blocks = 4 * sm_count;
  const int want_splits = std::max(1, (target_blocks + p.r_blocks - 1) / std::max(1, p.r_blocks));
  constexpr int kQuantum = 256;  // a multiple of every vector width x warp
  int split_k = (n + want_splits - 1) / want_splits;
  split_k = std::max(kQuantum, (split_k + kQuantum - 1) / kQuantum * kQuantum);
  p.split_k = split_k;
  p.splits = std::max(1, (n + split_k - 1) / split_k);
  p.workspace_floats = (size_t)(p.splits + 1) * (size_t)std::max(M, 1) * (size_t)r;
  return p;
}

cudaError_t lowrank_decode(DType dtype, const void* x, int64_t ldx, const void* a, const void* b,
                           const void* bias, void* y, int64_t ldy, int M, int n, int r, int m,
                           const LowrankDecodePlan& plan, float* workspace, int* counters,
                           cudaStream_t stream) {
  if (M < 1 || M > kLowrankDecodeMaxM || n < 1 || r < 1 || m < 1) return cudaErrorInvalidValue;
  if (plan.split_k <= 0 || plan.splits < 1 || plan.r_blocks < (r + kRowsPerBlock - 1) / kRowsPerBlock)
    return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return launch<float>(x, ldx, a, b, bias, y, ldy, M, n, r, m, plan, workspace, counters, stream);
    case DType::kFloat16:
      return launch<__half>(x, ldx, a, b, bias, y, ldy, M, n, r, m, plan, workspace, counters, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(x, ldx, a, b, bias, y, ldy, M, n, r, m, plan, workspace, counters, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace obdk
