// pybind11 module obdk._C: exposes the native implementations; registration
// with the torch.library op declarations happens in obdk/backends.py.
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "obdk native kernels (CPU always; CUDA when built with a CUDA torch)";
  m.def("with_cuda", []() {
#ifdef OBDK_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("gram_acc_cpu", &obdk::gram_acc_cpu,
        "acc += alpha * x^T x (CPU, BLAS); mirror=False leaves the upper triangle to symmetrize_lower_cpu",
        py::arg("acc"), py::arg("x"), py::arg("alpha") = 1.0, py::arg("mirror") = true);
  m.def("symmetrize_lower_cpu", &obdk::symmetrize_lower_cpu, "copy acc's lower triangle onto its upper one",
        py::arg("acc"));
  m.def("gram_cpu_blas", &obdk::gram_cpu_blas,
        "BLAS routine of gram_acc_cpu: 'mkl-syrk' (one triangle, mirrored) or 'gemm'");
  m.def("gram_cpu_bf16", &obdk::gram_cpu_bf16,
        "path of gram_acc_cpu for bf16 inputs: 'amx-brgemm' (AMX, lower triangle) or 'gemm'");
  m.def("lowrank_linear_cpu", &obdk::lowrank_linear_cpu, "y = (x a^T) b^T + bias (CPU)",
        py::arg("x"), py::arg("a"), py::arg("b"), py::arg("bias") = py::none());
#ifdef OBDK_WITH_CUDA
  m.def("gram_acc_cuda", &obdk::gram_acc_cuda, "acc += alpha * x^T x (CUDA, symmetric tiles)",
        py::arg("acc"), py::arg("x"), py::arg("alpha") = 1.0);
  m.def("lowrank_linear_cuda", &obdk::lowrank_linear_cuda, "y = (x a^T) b^T + bias (CUDA)",
        py::arg("x"), py::arg("a"), py::arg("b"), py::arg("bias") = py::none());
#endif
}
