// CPU Gram accumulation: acc += alpha * x^T x.
//
// Fast path: the symmetric rank-k update (SYRK) of the MKL that PyTorch's CPU
// builds link statically and export (mkl_blas_ssyrk / mkl_blas_dsyrk, Fortran
// calling convention; this internal layer takes 64-bit integers). SYRK computes one triangle only — half
// the FLOPs of a GEMM — and the other triangle is mirrored afterwards, so acc
// stays exactly symmetric after every call. The symbols are declared weak: a
// torch build without them (or OBDK_CPU_SYRK=0) uses ATen's GEMM (addmm_),
// which computes the same sums. With mirror=false only the lower triangle is guaranteed
// updated, and the caller runs symmetrize_lower_cpu once after many calls (the mirror is
// memory-bound: ~1 ms at n = 1536, as much as a 256-token SYRK's compute saving). gram_cpu_blas() says which path is in use. bf16 inputs always
// take the GEMM (see gram_acc_cpu).
//
// x is converted to acc's dtype in row chunks so a 16-bit activation never
// needs a full-size fp32 copy; accumulation is in acc's dtype (fp32 or fp64).
#include <cstdlib>
#include <cstring>

#include "../ops.h"

extern "C" {
// Fortran BLAS ?syrk: C = alpha * A * A^T + beta * C (trans = 'N'), column-major.
void mkl_blas_ssyrk(const char* uplo, const char* trans, const int64_t* n, const int64_t* k,
                    const float* alpha, const float* a, const int64_t* lda, const float* beta, float* c,
                    const int64_t* ldc)
    __attribute__((weak));
void mkl_blas_dsyrk(const char* uplo, const char* trans, const int64_t* n, const int64_t* k,
                    const double* alpha, const double* a, const int64_t* lda, const double* beta, double* c,
                    const int64_t* ldc)
    __attribute__((weak));
}

namespace obdk {
namespace {

bool syrk_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("OBDK_CPU_SYRK");
    return !(v != nullptr && (std::strcmp(v, "0") == 0 || std::strcmp(v, "false") == 0));
  }();
  return enabled;
}

bool have_syrk(at::ScalarType t) {
  if (!syrk_enabled()) return false;
  if (t == at::kFloat) return mkl_blas_ssyrk != nullptr;
  if (t == at::kDouble) return mkl_blas_dsyrk != nullptr;
  return false;
}

// acc (row-major n x n) lower triangle += alpha * xs^T xs, xs row-major [k, n].
// Row-major xs is column-major xs^T ([n, k], ld n), so A A^T with trans 'N' is
// xs^T xs; column-major 'U' is row-major lower.
template <typename T>
void syrk_lower(at::Tensor& acc, const at::Tensor& xs, double alpha_d) {
  const int64_t n = acc.size(0);
  const int64_t k = xs.size(0);
  const char uplo = 'U', trans = 'N';
  const T alpha = static_cast<T>(alpha_d), beta = T(1);
  if constexpr (std::is_same_v<T, float>) {
    mkl_blas_ssyrk(&uplo, &trans, &n, &k, &alpha, xs.data_ptr<float>(), &n, &beta, acc.data_ptr<float>(), &n);
  } else {
    mkl_blas_dsyrk(&uplo, &trans, &n, &k, &alpha, xs.data_ptr<double>(), &n, &beta, acc.data_ptr<double>(), &n);
  }
}

// Copy the lower triangle onto the upper one. Each off-diagonal 64×64 block is read row by row
// into an L1-resident buffer and written back transposed row by row, so neither side strides
// through memory column-wise (a naive loop costs as much as the SYRK itself at n = 1536).
template <typename T>
void mirror_lower(at::Tensor& acc) {
  const int64_t n = acc.size(0);
  T* c = acc.data_ptr<T>();
  constexpr int64_t B = 64;
  const int64_t nb = (n + B - 1) / B;
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    T tmp[B * B];
    for (int64_t bi = b0; bi < b1; ++bi) {
      const int64_t i0 = bi * B, ih = std::min(B, n - i0);
      for (int64_t bj = 0; bj <= bi; ++bj) {
        const int64_t j0 = bj * B, jw = std::min(B, n - j0);
        if (bj == bi) {  // diagonal block: in place
          for (int64_t i = 0; i < ih; ++i)
            for (int64_t j = 0; j < i; ++j) c[(j0 + j) * n + i0 + i] = c[(i0 + i) * n + j0 + j];
          continue;
        }
        for (int64_t i = 0; i < ih; ++i)  // lower block rows i0.., cols j0..
          std::memcpy(tmp + i * B, c + (i0 + i) * n + j0, sizeof(T) * jw);
        for (int64_t j = 0; j < jw; ++j) {  // upper block rows j0.., cols i0..
          T* dst = c + (j0 + j) * n + i0;
          for (int64_t i = 0; i < ih; ++i) dst[i] = tmp[i * B + j];
        }
      }
    }
  });
}

}  // namespace

std::string gram_cpu_blas() {
  if (have_syrk(at::kFloat) && have_syrk(at::kDouble)) return "mkl-syrk";
  return "gemm";
}

void symmetrize_lower_cpu(at::Tensor acc) {
  TORCH_CHECK(acc.device().is_cpu() && acc.dim() == 2 && acc.size(0) == acc.size(1) && acc.is_contiguous(),
              "symmetrize_lower_cpu: acc must be a contiguous square CPU matrix, got ", acc.sizes());
  TORCH_CHECK(acc.scalar_type() == at::kFloat || acc.scalar_type() == at::kDouble,
              "symmetrize_lower_cpu: acc must be float32 or float64, got ", acc.scalar_type());
  if (acc.scalar_type() == at::kFloat) mirror_lower<float>(acc);
  else mirror_lower<double>(acc);
}

void gram_acc_cpu(at::Tensor acc, const at::Tensor& x, double alpha, bool mirror) {
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
  const int64_t n = x.size(1);
  const auto st = acc.scalar_type();
  // bf16 input keeps the GEMM: with oneDNN's bf16 math (which obdk.calibrate enables around the
  // call, exact for bf16 values) it runs on AMX/AVX512-BF16 ~1.6x faster than an IEEE fp32 SYRK.
  const bool syrk = have_syrk(st) && x.scalar_type() != at::kBFloat16;
  // Bound the converted chunk to ~64 MiB.
  const int64_t elem = acc.element_size();
  int64_t chunk = std::max<int64_t>(1, (int64_t(64) << 20) / std::max<int64_t>(1, n * elem));
  for (int64_t s = 0; s < T; s += chunk) {
    const int64_t e = std::min(T, s + chunk);
    at::Tensor xs = x.slice(0, s, e).to(st).contiguous();
    if (syrk) {
      if (st == at::kFloat) syrk_lower<float>(acc, xs, alpha);
      else syrk_lower<double>(acc, xs, alpha);
    } else {
      acc.addmm_(xs.t(), xs, /*beta=*/1.0, /*alpha=*/alpha);
    }
  }
  if (syrk && mirror) symmetrize_lower_cpu(acc);
}

}  // namespace obdk
