// CPU two-factor low-rank linear: y = (x a^T) b^T + bias. ATen's GEMMs (BLAS)
// beat hand-written loops on CPU; for 16-bit inputs ATen accumulates in fp32.
#include "../ops.h"

namespace obdk {

at::Tensor lowrank_linear_cpu(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                              const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "lowrank_linear_cpu: a and b must be 2-D");
  TORCH_CHECK(x.size(-1) == a.size(1), "lowrank_linear_cpu: x has ", x.size(-1),
              " features but a is ", a.sizes());
  TORCH_CHECK(b.size(1) == a.size(0), "lowrank_linear_cpu: b is ", b.sizes(), " but a is ", a.sizes());
  auto out_shape = x.sizes().vec();
  out_shape.back() = b.size(0);
  at::Tensor x2 = x.reshape({-1, x.size(-1)});
  at::Tensor t = at::mm(x2, a.t());
  at::Tensor y;
  if (bias.has_value() && bias->defined()) {
    y = at::addmm(*bias, t, b.t());
  } else {
    y = at::mm(t, b.t());
  }
  return y.view(out_shape);
}

}  // namespace obdk
