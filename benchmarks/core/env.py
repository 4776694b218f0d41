"""Provenance of a benchmark row: device, library versions, git SHA, time, machine load."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Optional

import torch

#: the repository root (``benchmarks/`` is directly under it)
REPO = Path(__file__).resolve().parents[2]
#: where the scripts write their CSVs and figures by default
RESULTS = REPO / "benchmarks" / "results"

#: Peak numbers per GPU (dense, no sparsity): HBM bytes/s and 16-bit tensor-core FLOP/s.
PEAKS = {
    "H100": {"bw": 3.35e12, "flops_16": 989e12},
    "H200": {"bw": 4.8e12, "flops_16": 989e12},
    "A100": {"bw": 2.0e12, "flops_16": 312e12},
}


def device_name(device: torch.device | str | None = None) -> str:
    """GPU name, or the CPU model with the thread count torch uses."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def peaks(device: torch.device | str | None = None) -> Optional[dict]:
    """Peak bandwidth / FLOP rate of the device if known (``PEAKS``), else None (e.g. CPUs)."""
    name = device_name(device)
    for key, val in PEAKS.items():
        if key in name:
            return val
    return None


def versions() -> dict:
    out = {"torch": torch.__version__}
    for mod in ("triton", "transformers", "obdk"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # not installed (triton on some CPU machines): an empty cell
            out[mod] = ""
    out["cuda"] = torch.version.cuda or ""
    return out


def git_sha() -> str:
    """Short SHA of the checkout, ``+dirty`` when it has uncommitted changes ('' outside git)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if sha and dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def loadavg() -> str:
    """The 1-minute load average: CPU contention from other processes (timings are only comparable when low)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return ""


def env_fields(device: torch.device | str | None = None) -> dict:
    """The provenance columns of a CSV row."""
    v = versions()
    return {"device_name": device_name(device), "torch": v["torch"], "triton": v["triton"], "obdk": v["obdk"],
            "transformers": v["transformers"], "cuda": v["cuda"], "git_sha": git_sha(), "timestamp": timestamp(),
            "loadavg_1m": loadavg()}


def set_threads(n: Optional[int]) -> None:
    """``torch.set_num_threads(n)`` when ``n`` is given (``--threads``)."""
    if n:
        torch.set_num_threads(n)
