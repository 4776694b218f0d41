// Torch glue of the CUDA Gram kernels: obdk::gram_acc_cuda (see csrc/ops.h, gram_kernels.h).
// Checks the tensors, picks the token split for the device, allocates the split workspace from
// the caching allocator and launches on the current stream.
#include "../ops.h"

#include <ATen/cuda/CUDAContextLight.h>  // at::cuda::getCurrentDeviceProperties
#include <c10/cuda/CUDAStream.h>          // at::cuda::getCurrentCUDAStream
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "gram_kernels.h"

namespace obdk {

void gram_acc_cuda(at::Tensor acc, const at::Tensor& x, double alpha) {
  TORCH_CHECK(acc.is_cuda() && x.is_cuda(), "gram_acc_cuda: tensors must be on CUDA, got acc on ", acc.device(),
              " and x on ", x.device());
  TORCH_CHECK(acc.device() == x.device(), "gram_acc_cuda: acc is on ", acc.device(), " but x is on ", x.device());
  TORCH_CHECK(acc.dim() == 2 && acc.size(0) == acc.size(1), "gram_acc_cuda: acc must be square [n, n], got ",
              acc.sizes());
  TORCH_CHECK(acc.scalar_type() == at::kFloat || acc.scalar_type() == at::kDouble,
              "gram_acc_cuda: acc must be float32 or float64, got ", acc.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == acc.size(0), "gram_acc_cuda: x must be [T, ", acc.size(0), "], got ",
              x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat,
              "gram_acc_cuda: x must be float16, bfloat16 or float32, got ", dt);
  const int64_t T = x.size(0), n = x.size(1);
  if (T == 0 || n == 0) return;

  const c10::cuda::CUDAGuard guard(x.device());
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;

  cuda::GramArgs args;
  args.x = x.data_ptr();
  args.T = T;
  args.n = n;
  args.stride_t = x.stride(0);
  args.stride_n = x.stride(1);
  args.acc = acc.data_ptr();
  args.acc_is_double = acc.scalar_type() == at::kDouble;
  args.acc_stride0 = acc.stride(0);
  args.acc_stride1 = acc.stride(1);
  args.alpha = alpha;
  args.split = cuda::gram_default_split(T, n, sms);
  at::Tensor workspace;  // lives until the end of this call; the caching allocator keeps it stream-ordered
  if (args.split > 1) {
    workspace = at::empty({static_cast<int64_t>(cuda::gram_workspace_elems(n, args.split))},
                          x.options().dtype(at::kFloat));
    args.workspace = workspace.data_ptr<float>();
  }

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cudaError_t err = cudaSuccess;
  switch (dt) {
    case at::kHalf: err = cuda::gram_acc_launch<__half>(args, stream); break;
    case at::kBFloat16: err = cuda::gram_acc_launch<__nv_bfloat16>(args, stream); break;
    default: err = cuda::gram_acc_launch<float>(args, stream); break;
  }
  TORCH_CHECK(err == cudaSuccess, "gram_acc_cuda: launch failed: ", cudaGetErrorString(err));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace obdk
