# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Everything installs into .venv; torch is pinned to the CPU build first so that pip never
# pulls multi-GB CUDA wheels on a CPU machine (on a GPU machine, install your CUDA torch first).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup data-fashion demo fashion test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# Fashion-MNIST comes from Debian (needs root); skipped quietly where apt is unavailable.
data-fashion:
	@test -d /usr/share/datasets/fashion-mnist || \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
	  echo "could not install dataset-fashion-mnist: run 'apt-get install dataset-fashion-mnist' as root"

demo: setup
	$(BIN)/edgevit run recipes/quickstart.toml --json runs/quickstart.json

fashion: setup data-fashion
	$(BIN)/edgevit run recipes/fashion.toml --json runs/fashion.json

test: setup data-fashion
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python benchmarks/sparsity_speedup.py

clean:
	rm -rf $(VENV) runs build *.egg-info
