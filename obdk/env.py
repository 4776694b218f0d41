"""Environment report for bug reports (``obdk env`` / ``python -m obdk env``)."""
from __future__ import annotations

import platform
import sys
from typing import Any


def _version(mod: str) -> str:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except Exception as exc:
        return f"not available ({type(exc).__name__})"


def report() -> dict[str, Any]:
    """Versions, whether ``obdk._C`` loaded (and for which devices), and each op's backend per device."""
    import torch

    import obdk
    from obdk import _ext, backends

    cuda = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "obdk": obdk.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "extension": {"loaded": _ext.loaded(), "devices": _ext.devices(), "error": _ext.load_error,
                      "cpu_gram_blas": _ext._C.gram_cpu_blas() if _ext.has("gram_cpu_blas") else None,
                      "cpu_gram_bf16": _ext._C.gram_cpu_bf16() if _ext.has("gram_cpu_bf16") else None},
        "backend_override": backends.forced_backend() if _safe_forced() else "invalid",
        "ops": backends.report(),
    }


def _safe_forced() -> bool:
    from obdk import backends
    try:
        backends.forced_backend()
        return True
    except ValueError:
        return False


def format_report(rep: dict[str, Any]) -> str:
    """Human-readable lines of :func:`report`."""
    ext = rep["extension"]
    lines = [
        f"obdk          {rep['obdk']}",
        f"python        {rep['python']} ({rep['platform']})",
        f"torch         {rep['torch']} (CUDA {rep['torch_cuda']})",
        f"triton        {rep['triton']}",
        f"transformers  {rep['transformers']}",
        f"gpu           {rep['gpu'] or 'none'}",
        f"obdk._C       {'loaded, devices: ' + ', '.join(ext['devices']) if ext['loaded'] else 'NOT loaded: ' + str(ext['error'])}",
        f"CPU Gram BLAS {ext.get('cpu_gram_blas') or 'n/a'} (OBDK_CPU_SYRK=0 forces gemm)",
        f"CPU Gram bf16 {ext.get('cpu_gram_bf16') or 'n/a'} (n >= 1024; OBDK_CPU_AMX=0 forces gemm)",
        f"OBDK_BACKEND  {rep['backend_override'] or 'auto'}",
        "op backends:",
    ]
    for op, per_dev in rep["ops"].items():
        lines.append(f"  {op:16s} " + ", ".join(f"{d}: {b}" for d, b in per_dev.items()))
    return "\n".join(lines)
