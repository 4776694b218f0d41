// Native entry points of obdk._C. Each op is *declared* once, in Python
// (obdk/ops.py, torch.library.custom_op); these functions are the per-device
// implementations that obdk/backends.py registers for it.
#pragma once
#include <torch/extension.h>

namespace obdk {

// acc[n, n] (fp32 or fp64, contiguous) += alpha * x^T x, with x[T, n] of any float dtype.
// mirror=false: only the lower triangle is guaranteed updated; call symmetrize_lower_cpu later.
void gram_acc_cpu(at::Tensor acc, const at::Tensor& x, double alpha, bool mirror = true);
// acc[n, n] (fp32/fp64, contiguous): copy the lower triangle onto the upper one.
void symmetrize_lower_cpu(at::Tensor acc);
// Which BLAS routine gram_acc_cpu uses: "mkl-syrk" (one triangle, mirrored) or "gemm".
std::string gram_cpu_blas();
// Which path bf16 inputs take in gram_acc_cpu: "amx-brgemm" (oneDNN AMX micro-kernel, lower triangle) or "gemm".
std::string gram_cpu_bf16();

// y[M, m] = (x[M, n] a[r, n]^T) b[m, r]^T + bias[m]
at::Tensor lowrank_linear_cpu(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                              const c10::optional<at::Tensor>& bias);

#ifdef OBDK_WITH_CUDA
void gram_acc_cuda(at::Tensor acc, const at::Tensor& x, double alpha);
at::Tensor lowrank_linear_cuda(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                               const c10::optional<at::Tensor>& bias);
#endif

}  // namespace obdk
