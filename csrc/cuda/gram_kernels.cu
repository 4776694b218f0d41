// Symmetric Gram accumulation kernels (see gram_kernels.h). Torch-free: CUDA runtime only.
//
// Grid: blockIdx.x enumerates the upper-triangle tiles column by column, (0,0) (0,1) (1,1)
// (0,2) ..., so neighbouring blocks share the x[:, J] operand in L2; blockIdx.y is the token
// split. 256 threads per block, 128x128 output tile, fp32 accumulation:
//  * gram_wmma_kernel (half, bf16): 8 warps in a 4x2 grid, each 32x64 = 2x4 WMMA 16x16x16
//    fragments; 32-token slabs of x[:, I] and x[:, J] staged in double-buffered shared memory
//    (the next slab is prefetched into registers while the current one is multiplied).
//  * gram_fma_kernel (float, and 16-bit on GPUs without WMMA): 8x8 register micro-tile per
//    thread, 8-token slabs converted to fp32 in shared memory, same double buffering.
// Epilogue: the tile goes through shared memory in 32-row strips so that both the direct
// update acc[I, J] (p <= q) and the mirrored acc[J, I] (p < q) are coalesced. alpha*tile is
// rounded once (no FMA contraction) and added to both halves, so acc stays exactly symmetric.
// Each acc element is written by one block; every block sums its tokens in a fixed order.
#include "gram_kernels.h"

#include <mma.h>

#include <algorithm>
#include <climits>
#include <type_traits>

namespace obdk {
namespace cuda {
namespace {

constexpr int kTile = kGramTile;
constexpr int kThreads = 256;
constexpr int kStrip = 32;                 // epilogue rows per shared-memory strip
constexpr int kWmmaK = 32;                 // tokens per slab, WMMA kernel
constexpr int kFmaK = 8;                   // tokens per slab, FMA kernel
constexpr int kMinTokensPerSplit = 1024;
constexpr int kMaxSplit = 64;
constexpr size_t kMaxWorkspaceBytes = size_t(256) << 20;

template <typename T> struct WmmaOk : std::false_type {};
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
template <> struct WmmaOk<__half> : std::true_type {};
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
template <> struct WmmaOk<__nv_bfloat16> : std::true_type {};
#endif

struct Epilogue {
  void* acc;
  bool f64;
  int64_t s0, s1, n;
  double alpha;
  float* ws;     // split partials [split, tiles, kTile, kTile], or nullptr: update acc
  int ntiles;
};

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// Tile (i, j), i <= j, of upper tile number p (column by column).
__device__ __forceinline__ void upper_tile(int p, int& i, int& j) {
  int jj = static_cast<int>((sqrt(8.0 * p + 1.0) - 1.0) * 0.5);
  while (static_cast<long long>(jj + 1) * (jj + 2) / 2 <= p) ++jj;
  while (static_cast<long long>(jj) * (jj + 1) / 2 > p) --jj;
  j = jj;
  i = p - jj * (jj + 1) / 2;
}

// acc[i0+r0+r, j0+c] += alpha*st[r][c] where row <= col; acc[j0+c, i0+r0+r] += same where row < col.
template <typename AccT>
__device__ void add_strip(const float* st, int lds, int r0, int64_t i0, int64_t j0, const Epilogue& e) {
  AccT* acc = static_cast<AccT*>(e.acc);
  const AccT alpha = static_cast<AccT>(e.alpha);
  for (int idx = threadIdx.x; idx < kStrip * kTile; idx += blockDim.x) {  // along acc rows
    const int r = idx / kTile, c = idx % kTile;
    const int64_t gi = i0 + r0 + r, gj = j0 + c;
    if (gj < e.n && gi <= gj) {
      AccT* p = acc + gi * e.s0 + gj * e.s1;
      *p = *p + mul_rn(alpha, static_cast<AccT>(st[r * lds + c]));
    }
  }
  for (int idx = threadIdx.x; idx < kStrip * kTile; idx += blockDim.x) {  // mirror, along acc rows too
    const int r = idx % kStrip, c = idx / kStrip;
    const int64_t gi = i0 + r0 + r, gj = j0 + c;
    if (gj < e.n && gi < gj) {
      AccT* p = acc + gj * e.s0 + gi * e.s1;
      *p = *p + mul_rn(alpha, static_cast<AccT>(st[r * lds + c]));
    }
  }
}

// One 32-row strip of the finished tile (in shared memory) to acc, or raw to the workspace.
__device__ void emit_strip(const float* st, int lds, int r0, int i, int j, int split_idx, const Epilogue& e) {
  if (e.ws != nullptr) {
    float* w = e.ws + (static_cast<size_t>(split_idx) * e.ntiles + (static_cast<size_t>(j) * (j + 1) / 2 + i)) *
                          (kTile * kTile);
    for (int idx = threadIdx.x; idx < kStrip * kTile; idx += blockDim.x) {
      const int r = idx / kTile, c = idx % kTile;
      w[(r0 + r) * kTile + c] = st[r * lds + c];
    }
    return;
  }
  const int64_t i0 = static_cast<int64_t>(i) * kTile, j0 = static_cast<int64_t>(j) * kTile;
  if (e.f64) add_strip<double>(st, lds, r0, i0, j0, e);
  else add_strip<float>(st, lds, r0, i0, j0, e);
}

// ------------------------------------------------------------------------------------ FMA kernel

template <typename T>
__global__ void __launch_bounds__(kThreads)
gram_fma_kernel(const T* __restrict__ x, int64_t ntok, int64_t n, int64_t sxt, int64_t sxn, int64_t per_split,
                bool vec4, Epilogue e) {
  constexpr int LDA = kTile + 4;
  constexpr int LDST = kTile + 1;
  constexpr int kBuf = kFmaK * LDA;
  static_assert(4 * kBuf >= kStrip * LDST, "epilogue strip must fit in the slab buffers");
  __shared__ __align__(16) float smem[4 * kBuf];  // [A0, A1, B0, B1] slabs, later the epilogue strip

  int ti, tj;
  upper_tile(blockIdx.x, ti, tj);
  const bool diag = ti == tj;
  const int64_t i0 = static_cast<int64_t>(ti) * kTile, j0 = static_cast<int64_t>(tj) * kTile;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * per_split;
  const int64_t t_end = min(ntok, t_begin + per_split);

  const int tid = threadIdx.x;
  const int lrow = tid / 32, lcol = (tid % 32) * 4;  // slab loader: 8 rows x 32 groups of 4
  const int ty = tid / 16, tx = tid % 16;             // 8x8 micro-tile: rows ty*4+{0..3}, 64+ty*4+{0..3}

  float ra[4] = {0.f, 0.f, 0.f, 0.f}, rb[4] = {0.f, 0.f, 0.f, 0.f};
  auto load = [&](int64_t t0, int64_t c0, float (&r)[4]) {
    const int64_t t = t0 + lrow, c = c0 + lcol;
    if (vec4 && t < t_end && c < n) {  // vec4: float, unit feature stride, n % 4 == 0, aligned
      const float4 v = *reinterpret_cast<const float4*>(reinterpret_cast<const float*>(x) + t * sxt + c);
      r[0] = v.x; r[1] = v.y; r[2] = v.z; r[3] = v.w;
    } else {
#pragma unroll
      for (int q = 0; q < 4; ++q) r[q] = (t < t_end && c + q < n) ? to_f(x[t * sxt + (c + q) * sxn]) : 0.f;
    }
  };
  auto stash = [&](int buf) {
    *reinterpret_cast<float4*>(smem + buf * kBuf + lrow * LDA + lcol) = make_float4(ra[0], ra[1], ra[2], ra[3]);
    if (!diag)
      *reinterpret_cast<float4*>(smem + (2 + buf) * kBuf + lrow * LDA + lcol) =
          make_float4(rb[0], rb[1], rb[2], rb[3]);
  };

  float c[8][8];
#pragma unroll
  for (int a = 0; a < 8; ++a)
#pragma unroll
    for (int b = 0; b < 8; ++b) c[a][b] = 0.f;

  int buf = 0;
  if (t_begin < t_end) {
    load(t_begin, i0, ra);
    if (!diag) load(t_begin, j0, rb);
    stash(0);
    __syncthreads();
  }
  for (int64_t t0 = t_begin; t0 < t_end; t0 += kFmaK) {
    const bool more = t0 + kFmaK < t_end;
    if (more) {
      load(t0 + kFmaK, i0, ra);
      if (!diag) load(t0 + kFmaK, j0, rb);
    }
    const float* sA = smem + buf * kBuf;
    const float* sB = diag ? sA : smem + (2 + buf) * kBuf;
#pragma unroll
    for (int k = 0; k < kFmaK; ++k) {
      const float4 a0 = *reinterpret_cast<const float4*>(sA + k * LDA + ty * 4);
      const float4 a1 = *reinterpret_cast<const float4*>(sA + k * LDA + 64 + ty * 4);
      const float4 b0 = *reinterpret_cast<const float4*>(sB + k * LDA + tx * 4);
      const float4 b1 = *reinterpret_cast<const float4*>(sB + k * LDA + 64 + tx * 4);
      const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int a = 0; a < 8; ++a)
#pragma unroll
        for (int b = 0; b < 8; ++b) c[a][b] = fmaf(av[a], bv[b], c[a][b]);
    }
    if (more) stash(buf ^ 1);
    __syncthreads();
    buf ^= 1;
  }

  float* st = smem;
  for (int r0 = 0; r0 < kTile; r0 += kStrip) {
    if (e.ws == nullptr && i0 + r0 >= n) break;  // block-uniform: the rest of the tile is padding
#pragma unroll
    for (int a = 0; a < 8; ++a) {
      const int row = (a < 4 ? ty * 4 + a : 64 + ty * 4 + a - 4) - r0;
      if (row >= 0 && row < kStrip) {
#pragma unroll
        for (int b = 0; b < 8; ++b) st[row * LDST + (b < 4 ? tx * 4 + b : 64 + tx * 4 + b - 4)] = c[a][b];
      }
    }
    __syncthreads();
    emit_strip(st, LDST, r0, ti, tj, blockIdx.y, e);
    __syncthreads();
  }
}

// ----------------------------------------------------------------------------------- WMMA kernel

template <typename T>
__global__ void __launch_bounds__(kThreads)
gram_wmma_kernel(const T* __restrict__ x, int64_t ntok, int64_t n, int64_t sxt, int64_t sxn, int64_t per_split,
                 bool vec8, Epilogue e) {
  if constexpr (WmmaOk<T>::value) {
    namespace wmma = nvcuda::wmma;
    constexpr int LDS = kTile + 8;   // elements; keeps rows 16-byte aligned, ldmatrix conflict-free
    constexpr int LDST = kTile + 4;  // floats; wmma::store_matrix_sync needs a multiple of 4
    constexpr int kBuf = kWmmaK * LDS;
    constexpr size_t kSlabBytes = 4 * kBuf * sizeof(T);
    constexpr size_t kStripBytes = kStrip * LDST * sizeof(float);
    __shared__ __align__(128) unsigned char smem[kSlabBytes > kStripBytes ? kSlabBytes : kStripBytes];
    T* slabs = reinterpret_cast<T*>(smem);  // [A0, A1, B0, B1]

    int ti, tj;
    upper_tile(blockIdx.x, ti, tj);
    const bool diag = ti == tj;
    const int64_t i0 = static_cast<int64_t>(ti) * kTile, j0 = static_cast<int64_t>(tj) * kTile;
    const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * per_split;
    const int64_t t_end = min(ntok, t_begin + per_split);

    const int tid = threadIdx.x, warp = tid / 32;
    const int wr = warp / 2, wc = warp % 2;  // warp owns rows wr*32..+31, cols wc*64..+63
    const uint16_t* xr = reinterpret_cast<const uint16_t*>(x);  // raw 16-bit values (0 bits == 0.0)

    // slab loader: 32 tokens x 128 features = 512 groups of 8; a thread loads groups tid, tid + 256
    uint4 ra[2] = {}, rb[2] = {};
    auto load = [&](int64_t t0, int64_t c0, uint4 (&r)[2]) {
#pragma unroll
      for (int g = 0; g < 2; ++g) {
        const int grp = tid + g * kThreads;
        const int64_t t = t0 + grp / 16, c = c0 + (grp % 16) * 8;
        if (vec8) {  // unit feature stride, n % 8 == 0, 16-byte aligned rows
          r[g] = (t < t_end && c < n) ? *reinterpret_cast<const uint4*>(xr + t * sxt + c) : make_uint4(0, 0, 0, 0);
        } else {
          uint32_t w[4];
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const uint32_t lo = (t < t_end && c + 2 * q < n) ? xr[t * sxt + (c + 2 * q) * sxn] : 0u;
            const uint32_t hi = (t < t_end && c + 2 * q + 1 < n) ? xr[t * sxt + (c + 2 * q + 1) * sxn] : 0u;
            w[q] = lo | (hi << 16);
          }
          r[g] = make_uint4(w[0], w[1], w[2], w[3]);
        }
      }
    };
    auto stash = [&](int buf) {
#pragma unroll
      for (int g = 0; g < 2; ++g) {
        const int grp = tid + g * kThreads;
        const int off = (grp / 16) * LDS + (grp % 16) * 8;
        *reinterpret_cast<uint4*>(slabs + buf * kBuf + off) = ra[g];
        if (!diag) *reinterpret_cast<uint4*>(slabs + (2 + buf) * kBuf + off) = rb[g];
      }
    };

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][4];
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) wmma::fill_fragment(acc[a][b], 0.f);

    int buf = 0;
    if (t_begin < t_end) {
      load(t_begin, i0, ra);
      if (!diag) load(t_begin, j0, rb);
      stash(0);
      __syncthreads();
    }
    for (int64_t t0 = t_begin; t0 < t_end; t0 += kWmmaK) {
      const bool more = t0 + kWmmaK < t_end;
      if (more) {
        load(t0 + kWmmaK, i0, ra);
        if (!diag) load(t0 + kWmmaK, j0, rb);
      }
      const T* sA = slabs + buf * kBuf;                  // sA[k][m] = x[t0+k, i0+m]
      const T* sB = diag ? sA : slabs + (2 + buf) * kBuf;  // sB[k][q] = x[t0+k, j0+q]
#pragma unroll
      for (int kk = 0; kk < kWmmaK; kk += 16) {
        // A = x[:, I]^T is M x K with (m, k) at sA[k*LDS + m]: column-major.
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[4];
#pragma unroll
        for (int a = 0; a < 2; ++a) wmma::load_matrix_sync(fa[a], sA + kk * LDS + wr * 32 + a * 16, LDS);
#pragma unroll
        for (int b = 0; b < 4; ++b) wmma::load_matrix_sync(fb[b], sB + kk * LDS + wc * 64 + b * 16, LDS);
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
          for (int b = 0; b < 4; ++b) wmma::mma_sync(acc[a][b], fa[a], fb[b], acc[a][b]);
      }
      if (more) stash(buf ^ 1);
      __syncthreads();
      buf ^= 1;
    }

    float* st = reinterpret_cast<float*>(smem);
    for (int s = 0; s < kTile / kStrip; ++s) {
      const int r0 = s * kStrip;
      if (e.ws == nullptr && i0 + r0 >= n) break;  // block-uniform: the rest of the tile is padding
      if (wr == s) {
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
          for (int b = 0; b < 4; ++b)
            wmma::store_matrix_sync(st + a * 16 * LDST + wc * 64 + b * 16, acc[a][b], LDST, wmma::mem_row_major);
      }
      __syncthreads();
      emit_strip(st, LDST, r0, ti, tj, blockIdx.y, e);
      __syncthreads();
    }
  }
}

// ------------------------------------------------------------------------------ split reduction

__global__ void __launch_bounds__(kThreads) gram_reduce_kernel(const float* __restrict__ ws, int split, Epilogue e) {
  constexpr int LDST = kTile + 1;
  __shared__ float st[kStrip * LDST];
  int ti, tj;
  upper_tile(blockIdx.x, ti, tj);
  Epilogue direct = e;
  direct.ws = nullptr;
  const size_t tile_elems = static_cast<size_t>(kTile) * kTile;
  const float* base = ws + static_cast<size_t>(blockIdx.x) * tile_elems;
  const size_t split_stride = static_cast<size_t>(e.ntiles) * tile_elems;
  for (int r0 = 0; r0 < kTile; r0 += kStrip) {
    if (static_cast<int64_t>(ti) * kTile + r0 >= e.n) break;
    for (int idx = threadIdx.x; idx < kStrip * kTile; idx += blockDim.x) {
      const int r = idx / kTile, c = idx % kTile;
      const float* p = base + (r0 + r) * kTile + c;
      float sum = 0.f;
      for (int s = 0; s < split; ++s) sum += p[s * split_stride];  // fixed order: deterministic
      st[r * LDST + c] = sum;
    }
    __syncthreads();
    emit_strip(st, LDST, r0, ti, tj, 0, direct);
    __syncthreads();
  }
}

int64_t num_tiles(int64_t n) {
  const int64_t nt = (n + kTile - 1) / kTile;
  return nt * (nt + 1) / 2;
}

int device_major() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return 0;
  return major;
}

}  // namespace

int gram_default_split(int64_t T, int64_t n, int num_sms) {
  const int64_t tiles = num_tiles(n);
  if (tiles <= 0 || tiles >= num_sms) return 1;
  int64_t split = (2 * static_cast<int64_t>(num_sms) + tiles - 1) / tiles;
  split = std::min<int64_t>(split, std::max<int64_t>(1, T / kMinTokensPerSplit));
  split = std::min<int64_t>(split, kMaxSplit);
  const int64_t by_memory = static_cast<int64_t>(kMaxWorkspaceBytes / (tiles * kTile * kTile * sizeof(float)));
  split = std::min<int64_t>(split, std::max<int64_t>(1, by_memory));
  return static_cast<int>(std::max<int64_t>(1, split));
}

size_t gram_workspace_elems(int64_t n, int split) {
  if (split <= 1) return 0;
  return static_cast<size_t>(split) * static_cast<size_t>(num_tiles(n)) * kTile * kTile;
}

template <typename T>
cudaError_t gram_acc_launch(const GramArgs& a, cudaStream_t stream) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value ||
                    std::is_same<T, float>::value,
                "gram_acc_launch: T must be __half, __nv_bfloat16 or float");
  if (a.T <= 0 || a.n <= 0) return cudaSuccess;
  if (a.x == nullptr || a.acc == nullptr || a.stride_t < 0 || a.stride_n < 0) return cudaErrorInvalidValue;
  const int64_t tiles = num_tiles(a.n);
  if (tiles > INT_MAX) return cudaErrorInvalidValue;

  const int k_step = (std::is_same<T, float>::value ? kFmaK : kWmmaK);
  int split = std::max(1, a.split);
  int64_t per_split = a.T;
  if (split > 1) {
    if (a.workspace == nullptr) return cudaErrorInvalidValue;
    per_split = ((a.T + split - 1) / split + k_step - 1) / k_step * k_step;  // whole slabs per split
    split = static_cast<int>((a.T + per_split - 1) / per_split);              // never more than asked
    if (split > 65535) return cudaErrorInvalidValue;
  }
  Epilogue e{a.acc, a.acc_is_double, a.acc_stride0, a.acc_stride1, a.n, a.alpha,
             split > 1 ? a.workspace : nullptr, static_cast<int>(tiles)};
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(split));
  const T* x = static_cast<const T*>(a.x);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(a.x);

  bool wmma = false;
  if (!std::is_same<T, float>::value && a.tensor_cores) {
    const int major = device_major();
    wmma = std::is_same<T, __half>::value ? major >= 7 : major >= 8;
  }
  if (wmma) {
    const bool vec8 = a.stride_n == 1 && a.n % 8 == 0 && a.stride_t % 8 == 0 && addr % 16 == 0;
    gram_wmma_kernel<T><<<grid, kThreads, 0, stream>>>(x, a.T, a.n, a.stride_t, a.stride_n, per_split, vec8, e);
  } else {
    const bool vec4 = std::is_same<T, float>::value && a.stride_n == 1 && a.n % 4 == 0 && a.stride_t % 4 == 0 &&
                      addr % 16 == 0;
    gram_fma_kernel<T><<<grid, kThreads, 0, stream>>>(x, a.T, a.n, a.stride_t, a.stride_n, per_split, vec4, e);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || split == 1) return err;
  gram_reduce_kernel<<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(a.workspace, split, e);
  return cudaGetLastError();
}

template cudaError_t gram_acc_launch<__half>(const GramArgs&, cudaStream_t);
template cudaError_t gram_acc_launch<__nv_bfloat16>(const GramArgs&, cudaStream_t);
template cudaError_t gram_acc_launch<float>(const GramArgs&, cudaStream_t);

}  // namespace cuda
}  // namespace obdk
