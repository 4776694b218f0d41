// CPU Gram accumulation: acc += alpha * x^T x through ATen's BLAS GEMM.
// x is converted to acc's dtype in row chunks so a 16-bit activation never
// needs a full-size fp32 copy; accumulation is in acc's dtype (fp32 or fp64).
#include "../ops.h"

namespace obdk {

void gram_acc_cpu(at::Tensor acc, const at::Tensor& x, double alpha) {
  TORCH_CHECK(acc.device().is_cpu() && x.device().is_cpu(), "gram_acc_cpu: tensors must be on CPU");
  TORCH_CHECK(acc.dim() == 2 && acc.size(0) == acc.size(1), "gram_acc_cpu: acc must be square, got ",
              acc.sizes());
  TORCH_CHECK(acc.scalar_type() == at::kFloat || acc.scalar_type() == at::kDouble,
              "gram_acc_cpu: acc must be float32 or float64, got ", acc.scalar_type());
  TORCH_CHECK(acc.is_contiguous(), "gram_acc_cpu: acc must be contiguous");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == acc.size(0), "gram_acc_cpu: x must be [T, ", acc.size(0),
              "], got ", x.sizes());
  const int64_t T = x.size(0);
  if (T == 0) return;
  // Bound the converted chunk to ~64 MiB.
  const int64_t n = x.size(1);
  const int64_t elem = acc.element_size();
  int64_t chunk = std::max<int64_t>(1, (int64_t(64) << 20) / std::max<int64_t>(1, n * elem));
  for (int64_t s = 0; s < T; s += chunk) {
    const int64_t e = std::min(T, s + chunk);
    at::Tensor xs = x.slice(0, s, e).to(acc.scalar_type());
    acc.addmm_(xs.t(), xs, /*beta=*/1.0, /*alpha=*/alpha);
  }
}

}  // namespace obdk
