"""Build script for obdk's one native extension, ``obdk._C``.

* C++ CPU implementations (ATen/BLAS) are always built when torch is importable.
* CUDA sources are added only when torch was built with CUDA *and* a CUDA toolkit
  is found (``CUDA_HOME``); otherwise no CUDA extension is ever constructed.
* ``TORCH_CUDA_ARCH_LIST`` is honoured (default: the visible GPU, else ``9.0a``),
  ``MAX_JOBS`` is honoured (default: bounded by cores and by RAM at ~2 GiB a job).
* ``OBDK_SKIP_EXT=1`` skips the extension; ``OBDK_SKIP_CUDA_BUILD=1`` skips CUDA;
  ``DEBUG=1`` builds with ``-O0 -g``; ``OBDK_PTXAS_VERBOSE=1`` adds ``-Xptxas -v`` (ptxas prints
  each CUDA kernel's registers, stack frame, spills and shared memory; .ci/cuda_build.sh).

Install with ``pip install --no-build-isolation -e .`` so the build uses the
installed torch (torch is intentionally not in ``[build-system].requires``).
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"[obdk setup] {msg}", file=sys.stderr)


def _default_max_jobs() -> str:
    cores = os.cpu_count() or 1
    try:
        ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        ram_gib = 8.0
    return str(max(1, min(cores, int(ram_gib // 2))))


def _cxx_std(torch) -> str:
    """The C++ standard torch's headers need: C++20 from torch 2.14 on (its all.h checks
    ``__cplusplus >= 202002L``), else C++17. ``OBDK_CXX_STD`` (e.g. ``c++20``) overrides."""
    if os.environ.get("OBDK_CXX_STD"):
        return os.environ["OBDK_CXX_STD"]
    header = os.path.join(os.path.dirname(torch.__file__), "include", "torch", "csrc", "api", "include",
                          "torch", "all.h")
    try:
        with open(header, encoding="utf-8", errors="replace") as f:
            return "c++20" if "202002L" in f.read() else "c++17"
    except OSError:
        return "c++17"


def _extensions():
    if os.environ.get("OBDK_SKIP_EXT") == "1":
        _log("OBDK_SKIP_EXT=1: building no native extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError:
        _log("torch is not importable: obdk._C is not built (pure-PyTorch fallback). "
             "Install torch first and use `pip install --no-build-isolation -e .`.")
        return [], {}

    os.environ.setdefault("MAX_JOBS", _default_max_jobs())
    debug = os.environ.get("DEBUG") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    std = _cxx_std(torch)
    cxx += [f"-std={std}"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    with_cuda = (
        torch.version.cuda is not None
        and ce.CUDA_HOME is not None
        and os.environ.get("OBDK_SKIP_CUDA_BUILD") != "1"
    )
    define_macros = []
    if with_cuda:
        if "TORCH_CUDA_ARCH_LIST" not in os.environ:
            if torch.cuda.is_available():
                major, minor = torch.cuda.get_device_capability()
                arch = f"{major}.{minor}" + ("a" if major >= 9 else "")
            else:
                arch = "9.0a"
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        _log(f"building CUDA sources for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        define_macros.append(("OBDK_WITH_CUDA", None))
        nvcc = (["-O0", "-g", "-G"] if debug else ["-O3"]) + [f"-std={std}", "--use_fast_math", "-lineinfo"]
        if os.environ.get("OBDK_PTXAS_VERBOSE") == "1":
            nvcc += ["-Xptxas", "-v"]
        ext = ce.CUDAExtension(
            "obdk._C", sources, define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        )
    else:
        why = "torch has no CUDA" if torch.version.cuda is None else (
            "no CUDA toolkit found" if ce.CUDA_HOME is None else "OBDK_SKIP_CUDA_BUILD=1")
        _log(f"building the CPU extension only ({why})")
        ext = ce.CppExtension("obdk._C", sources, define_macros=define_macros,
                              extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
