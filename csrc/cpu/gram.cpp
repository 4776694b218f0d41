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
// memory-bound: ~1 ms at n = 1536, as much as a 256-token SYRK's compute saving). gram_cpu_blas() says which path is in use.
// bf16 inputs (fp32 acc, alpha 1, n ≥ 1024 and a multiple of 16) take oneDNN's AMX BRGEMM on the lower
// triangle where the CPU has AMX (gram_cpu_bf16() says so; OBDK_CPU_AMX=0 turns it off), else
// the GEMM (see gram_acc_cpu).
//
// x is converted to acc's dtype in row chunks so a 16-bit activation never
// needs a full-size fp32 copy; accumulation is in acc's dtype (fp32 or fp64).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include "../ops.h"

// bf16 inputs on CPUs with AMX: oneDNN's BRGEMM micro-kernel as ATen exports it
// (at::native::cpublas::brgemm / pack / could_pack / brgemm_release, bf16 x bf16 -> fp32). Declared
// weak again so that a torch build without them still loads obdk._C (the GEMM path is used).
#if defined(CPUBLAS_BRGEMM_BF16BF16F32) && defined(__x86_64__)
#define OBDK_HAVE_BRGEMM 1
namespace at::native::cpublas {
TORCH_API void brgemm(int64_t M, int64_t N, int64_t K, int64_t ld_a, int64_t ld_b, int64_t ld_c, const bool add_C,
                      const at::BFloat16* A, const at::BFloat16* B, float* C, bool is_vnni) __attribute__((weak));
TORCH_API void brgemm_release(bool is_vnni) __attribute__((weak));
TORCH_API void pack(int64_t K, int64_t N, int64_t ld_in, int64_t ld_out, ScalarType dt_in, ScalarType dt_out,
                    const void* in, void* out) __attribute__((weak));
TORCH_API bool could_pack(ScalarType dt_in) __attribute__((weak));
}  // namespace at::native::cpublas
#else
#define OBDK_HAVE_BRGEMM 0
#endif

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

#if OBDK_HAVE_BRGEMM
namespace cpublas = at::native::cpublas;

bool amx_bf16_available() {
  static const bool ok = [] {
    const char* v = std::getenv("OBDK_CPU_AMX");
    if (v != nullptr && (std::strcmp(v, "0") == 0 || std::strcmp(v, "false") == 0)) return false;
    using BrgemmFn = void (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const bool, const at::BFloat16*,
                              const at::BFloat16*, float*, bool);
    const BrgemmFn f = &cpublas::brgemm;
    if (f == nullptr || &cpublas::pack == nullptr || &cpublas::could_pack == nullptr ||
        &cpublas::brgemm_release == nullptr)
      return false;
    return cpublas::could_pack(at::kBFloat16);  // AMX present and oneDNN enabled
  }();
  return ok;
}

// Lower-triangle tiles of acc (fp32, row-major n x n) += x^T x for bf16 x [T, n], n % 16 == 0.
// B = x is packed once into oneDNN's VNNI layout, one 64-column block at a time (pairs of token
// rows interleaved; an odd token count gets a zero row). A = x^T is never formed whole: each
// thread transposes a [kc, bm] slab of x into an L2-resident buffer and multiplies it with every
// packed column block left of the diagonal. Accumulation is fp32 in the AMX tiles and in acc:
// products of two bf16 values are exact in fp32, as in the GEMM path.
void gram_bf16_amx_lower(at::Tensor& acc, const at::Tensor& x_in) {
  constexpr int64_t BN = 64, BM = 256, KC = 256;
  const at::Tensor x = x_in.contiguous();
  const int64_t T = x.size(0), n = x.size(1);
  const int64_t Te = (T + 1) / 2 * 2;
  at::Tensor xp = x;
  if (Te != T) {
    xp = at::zeros({Te, n}, x.options());
    xp.narrow(0, 0, T).copy_(x);
  }
  const auto* xs = reinterpret_cast<const uint16_t*>(xp.data_ptr<at::BFloat16>());
  at::Tensor packed = at::empty({Te * n}, x.options());
  at::BFloat16* ps = packed.data_ptr<at::BFloat16>();
  const int64_t nbn = (n + BN - 1) / BN;
  at::parallel_for(0, nbn, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t j = b0; j < b1; ++j) {
      const int64_t j0 = j * BN, bn = std::min(BN, n - j0);
      cpublas::pack(Te, bn, n, bn, at::kBFloat16, at::kBFloat16, xp.data_ptr<at::BFloat16>() + j0, ps + j0 * Te);
    }
  });
  // Row blocks of BM rows; block i costs ~(i+1) column blocks: longest first onto the least-loaded thread.
  const int64_t nbm = (n + BM - 1) / BM;
  const int nth = std::max<int>(1, std::min<int64_t>(at::get_num_threads(), nbm));
  std::vector<std::vector<int64_t>> own(nth);
  std::vector<int64_t> load(nth, 0);
  for (int64_t i = nbm - 1; i >= 0; --i) {
    const int64_t cost = (std::min(n, (i + 1) * BM) + BN - 1) / BN;
    const int t = int(std::min_element(load.begin(), load.end()) - load.begin());
    own[t].push_back(i);
    load[t] += cost;
  }
  float* c = acc.data_ptr<float>();
  at::parallel_for(0, nth, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint16_t> abuf(BM * KC);
    for (int64_t t = t0; t < t1; ++t) {
      for (const int64_t i : own[t]) {
        const int64_t i0 = i * BM, bm = std::min(BM, n - i0), jend = std::min(n, i0 + bm);
        for (int64_t k0 = 0; k0 < Te; k0 += KC) {
          const int64_t kc = std::min(KC, Te - k0);
          for (int64_t r0 = 0; r0 < kc; r0 += 16) {  // abuf[c][r] = x[k0 + r][i0 + c], 16 x 16 blocks
            const int64_t rh = std::min<int64_t>(16, kc - r0);
            for (int64_t c0 = 0; c0 < bm; c0 += 16) {
              const int64_t cw = std::min<int64_t>(16, bm - c0);
              for (int64_t cc = 0; cc < cw; ++cc)
                for (int64_t rr = 0; rr < rh; ++rr)
                  abuf[(c0 + cc) * kc + r0 + rr] = xs[(k0 + r0 + rr) * n + i0 + c0 + cc];
            }
          }
          const auto* a = reinterpret_cast<const at::BFloat16*>(abuf.data());
          for (int64_t j0 = 0; j0 < jend; j0 += BN) {
            const int64_t bn = std::min(BN, n - j0);
            cpublas::brgemm(bm, bn, kc, kc, bn, n, /*add_C=*/true, a, ps + j0 * Te + k0 * bn, c + i0 * n + j0,
                            /*is_vnni=*/true);
          }
        }
      }
    }
    cpublas::brgemm_release(true);
  });
}
#else
bool amx_bf16_available() { return false; }
#endif

}  // namespace

std::string gram_cpu_bf16() { return amx_bf16_available() ? "amx-brgemm" : "gemm"; }

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
#if OBDK_HAVE_BRGEMM
  // bf16 into fp32 with alpha 1 (what calibration does), on AMX: the BRGEMM lower-triangle path.
  // Only from n = 1024 up: at n = 1536 it runs 1.5x faster than the GEMM below on this project's
  // 2-core AMX machine, at n = 576 no faster (packing and transposing cost as much as it saves).
  if (x.scalar_type() == at::kBFloat16 && st == at::kFloat && alpha == 1.0 && n % 16 == 0 && n >= 1024 &&
      amx_bf16_available()) {
    gram_bf16_amx_lower(acc, x);
    if (mirror) symmetrize_lower_cpu(acc);
    return;
  }
#endif
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
