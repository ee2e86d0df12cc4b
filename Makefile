# Two commands on a fresh machine:  `make demo`  and  `make test`.
# setup also installs the CUDA compilers GPU targets' kernels are built with (NVIDIA's PyPI wheels,
# ~780 MB into ~/.cache/edgevit/cuda; `edgevit cuda setup`), so no GPU or CUDA install is needed.
# Everything installs into .venv; torch is pinned to the CPU build first so that pip never
# pulls multi-GB CUDA wheels on a CPU machine (on a GPU machine, install your CUDA torch first).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup system-deps emulator demo fashion test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/edgevit cuda setup
	touch $(STAMP)

# Debian packages: Fashion-MNIST, the aarch64 cross compiler and qemu (for the emulated board),
# chromium (the report test opens the HTML page in a real browser).
DEBS := dataset-fashion-mnist gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user chromium
system-deps:
	@if dpkg -s $(DEBS) >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $(DEBS) >/dev/null; \
	else echo "as root, run: apt-get install $(DEBS)"; fi

# The emulated aarch64 board's sysroot and wheels (cached in ~/.cache/edgevit).
emulator: setup system-deps
	$(BIN)/edgevit emulator setup

demo: setup system-deps
	$(BIN)/edgevit run recipes/quickstart.toml --json runs/quickstart.json
	@echo "report: runs/quickstart/report/index.html (and report.md beside it)"

fashion: setup system-deps
	$(BIN)/edgevit run recipes/fashion.toml --json runs/fashion.json

test: setup system-deps emulator
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check edgevit tests benchmarks

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python benchmarks/sparsity_speedup.py
	$(BIN)/python benchmarks/peers.py --trials 8 --cover 0.5 --tune-models vit_tiny swin_t
	$(BIN)/python benchmarks/search_budgets.py --checkpoint runs/fashion/adapt/model.pt

clean:
	rm -rf $(VENV) runs build *.egg-info
