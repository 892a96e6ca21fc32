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
WORKDIR ?= workdirs/default
demo: $(STAMP)
	JAX_PLATFORMS=cpu $(BIN)/dplh-train --config default --workdir $(WORKDIR)

# Whole test suite (doctests of dplh_jax included), CPU only. Compiling is
# most of its time and one XLA compile uses one core: TEST_WORKERS pytest
# processes (pytest-xdist), each test file in one of them.
TEST_WORKERS ?= 2
test: $(STAMP)
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest tests dplh_jax -q \
	    -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
