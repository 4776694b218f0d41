// Torch glue of the CUDA two-factor low-rank linear: y = (x a^T) b^T + bias.
// M <= kLowrankDecodeMaxM rows: the split-n decode kernels of lowrank_kernels.cu (fp32 t).
// Larger M: two cuBLAS GEMMs (at::mm, then at::addmm with the bias); cuBLAS accumulates
// in fp32 and t is rounded once to x.dtype, as in the Triton prefill path.
// Compiled only in CUDA builds (setup.py), behind OBDK_WITH_CUDA.
#include "../ops.h"
#include "lowrank_kernels.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <map>
#include <mutex>
#include <utility>

namespace obdk {
namespace {

cuda::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "lowrank_linear_cuda: dtype ", t, " not supported (float32, float16, bfloat16)");
  }
}

// Zeroed split-reduction counters per (device, stream); the kernels leave them zero.
// Intentionally leaked: no CUDA frees at interpreter exit.
int* counters_for(const at::Device& device, cudaStream_t stream, int64_t n) {
  static std::mutex mu;
  static auto* cache = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();
  std::lock_guard<std::mutex> lock(mu);
  auto key = std::make_pair(static_cast<int>(device.index()), stream);
  auto it = cache->find(key);
  if (it == cache->end() || it->second.numel() < n) {
    // Synchronous zero-fill on the stream that will use it.
    at::Tensor buf = at::zeros({std::max<int64_t>(n, 1024)}, at::TensorOptions().dtype(at::kInt).device(device));
    (*cache)[key] = buf;
    it = cache->find(key);
  }
  return it->second.data_ptr<int>();
}

int sm_count(int device) {
  static std::mutex mu;
  static auto* cache = new std::map<int, int>();
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache->find(device);
  if (it != cache->end()) return it->second;
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();
    sms = 0;  // the plan assumes an H100
  }
  (*cache)[device] = sms;
  return sms;
}

}  // namespace

at::Tensor lowrank_linear_cuda(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                               const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda() && a.is_cuda() && b.is_cuda(), "lowrank_linear_cuda: x, a, b must be CUDA tensors");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "lowrank_linear_cuda: a must be [r, n] and b [m, r]");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == a.size(1), "lowrank_linear_cuda: x has ", x.size(-1),
              " features but a is ", a.sizes());
  TORCH_CHECK(b.size(1) == a.size(0), "lowrank_linear_cuda: b is ", b.sizes(), " but a is ", a.sizes());
  TORCH_CHECK(a.scalar_type() == x.scalar_type() && b.scalar_type() == x.scalar_type(),
              "lowrank_linear_cuda: a and b must have x's dtype ", x.scalar_type(), ", got ", a.scalar_type(),
              " and ", b.scalar_type());
  TORCH_CHECK(a.device() == x.device() && b.device() == x.device(), "lowrank_linear_cuda: tensors on different devices");
  const auto dtype = to_dtype(x.scalar_type());
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor bias_t;
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == b.size(0), "lowrank_linear_cuda: bias must be [", b.size(0), "]");
    TORCH_CHECK(bias->device() == x.device(), "lowrank_linear_cuda: bias on ", bias->device(), ", x on ", x.device());
    bias_t = bias->to(x.scalar_type()).contiguous();
  }
  c10::cuda::CUDAGuard guard(x.device());

  const int64_t n = x.size(-1), r = a.size(0), m = b.size(0);
  auto out_shape = x.sizes().vec();
  out_shape.back() = m;
  at::Tensor x2 = x.reshape({-1, n});
  if (x2.size(0) > 0 && x2.stride(1) != 1) x2 = x2.contiguous();
  const int64_t M = x2.size(0);
  if (M == 0) return at::empty(out_shape, x.options());
  if (r == 0) {
    at::Tensor y = has_bias ? bias_t.expand({M, m}).clone() : at::zeros({M, m}, x.options());
    return y.view(out_shape);
  }

  if (M > cuda::kLowrankDecodeMaxM) {
    at::Tensor t = at::mm(x2, a.t());
    at::Tensor y = has_bias ? at::addmm(bias_t, t, b.t()) : at::mm(t, b.t());
    return y.view(out_shape);
  }

  TORCH_CHECK(n <= INT32_MAX && r <= INT32_MAX && m <= INT32_MAX, "lowrank_linear_cuda: dimension too large");
  at::Tensor ac = a.contiguous(), bc = b.contiguous();
  const auto plan = cuda::lowrank_decode_plan((int)M, (int)n, (int)r, sm_count(x.device().index()));
  at::Tensor ws = at::empty({(int64_t)plan.workspace_floats}, x.options().dtype(at::kFloat));
  at::Tensor y = at::empty({M, m}, x.options());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  int* counters = counters_for(x.device(), stream, plan.r_blocks);
  cudaError_t err = cuda::lowrank_decode(dtype, x2.data_ptr(), x2.stride(0), ac.data_ptr(), bc.data_ptr(),
                                         has_bias ? bias_t.data_ptr() : nullptr, y.data_ptr(), y.stride(0),
                                         (int)M, (int)n, (int)r, (int)m, plan, ws.data_ptr<float>(), counters,
                                         stream);
  TORCH_CHECK(err == cudaSuccess, "lowrank_linear_cuda: kernel launch failed: ", cudaGetErrorString(err));
  return y.view(out_shape);
}

}  // namespace obdk
