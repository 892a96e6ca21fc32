# Two entry points; both create ./.venv on first use (only Python 3.11 and pip needed).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[faces,test]'
	touch $(STAMP)

# The main job on the embedded default: synthetic faces, DP HyperFace on CPU.
# First a model trained without DP on public synthetic faces (no image of the
# private split), then the DP run starting from it (configs/demo.py).
WORKDIR ?= workdirs/default
PUBLIC_WORKDIR ?= workdirs/public
demo: $(STAMP)
	JAX_PLATFORMS=cpu $(BIN)/dplh-train --config public_pretrain \
	    --workdir $(PUBLIC_WORKDIR)
	JAX_PLATFORMS=cpu $(BIN)/dplh-train --config demo --workdir $(WORKDIR) \
	    --config.init_params_from=$(PUBLIC_WORKDIR)

# Whole test suite (doctests of dplh_jax included), CPU only. Compiling is
# most of its time and one XLA compile uses one core: TEST_WORKERS pytest
# processes (pytest-xdist), each test file in one of them. The DP core and
# the doctests run at XLA's default CPU optimization, as users run them; the
# application at level 0 (conftest.py), which compiles in half the time.
TEST_WORKERS ?= 2
PYTEST := JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q -n $(TEST_WORKERS) \
    --dist loadfile
test: $(STAMP)
	XLA_FLAGS=--xla_backend_optimization_level=3 $(PYTEST) tests/dp dplh_jax
	$(PYTEST) tests/hyperface

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
