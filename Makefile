# make demo        saves and loads a small GPT model and its AdamW state, every writer, bit-exact (creates .venv
#                  with torch and the package's requirements only)
# make test        the test suite on this machine's torch (creates .venv when absent, adds the test and S3 tools)
# make test-fast   the same without the tests marked slow (each over about 5 s), a quicker check while working
# make test-gpu    the CUDA tests (marker gpu), with the interpreter in $(GPU_PYTHON)
# make test-matrix the suite on the CI spread of (torch, Python) cells, cached venvs outside the repo,
#                  and checkpoints written on each cell read on the others
# make test-matrix-all  the same on all fifteen minors 2.1-2.15 (venvs outside the CI spread, 5-7 GB each,
#                  deleted after their run)
# make lint        ruff, Python 3.9 target
# make bench       the benchmark against stock torch, the safetensors library, torch.save and raw file I/O,
#                  warm and (as root) cold loads; writes benchmarks/RESULTS.md, benchmarks/summary.png and
#                  README.rst's summary table from its rows (installs matplotlib, the [bench] extra, into the
#                  venv for the chart); then saves and loads through a local S3 server (benchmarks/s3_bench.py),
#                  whose rows it adds to RESULTS.md, and resharding loads at several world sizes
#                  (benchmarks/scale_bench.py: gloo ranks as processes, saved at W and loaded at W'), whose rows
#                  it adds there too
# make bench-scale only the latter (about 5 minutes on 2 cores; as root, cold loads too)

VENV ?= .venv
PYTHON := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
GPU_PYTHON ?= python3
BENCH_ARGS ?= --cold
S3_BENCH_ARGS ?= --results benchmarks/RESULTS.md
SCALE_BENCH_ARGS ?= --cold --results benchmarks/RESULTS.md
# What the package needs besides torch (setup.cfg's install_requires; tests/test_packaging.py keeps them equal):
# all that make demo installs.
REQUIRES := zlib-ng
TEST_DEPS := pytest safetensors zstandard hypothesis numpy ruff build wheel "moto[server]" s3fs "s3torchconnector[dcp]"

.PHONY: venv demo test test-fast test-gpu test-matrix test-matrix-all lint bench bench-scale

$(VENV)/.base:
	python3 -m venv --system-site-packages $(VENV)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q $(REQUIRES)
	touch $@

$(VENV)/.ready: $(VENV)/.base
	$(PYTHON) -m pip install -q $(TEST_DEPS)
	touch $@

venv: $(VENV)/.ready

demo: $(VENV)/.base
	$(PYTHON) examples/demo.py

test: $(VENV)/.ready
	$(PYTHON) -m pytest -q tests

test-fast: $(VENV)/.ready
	$(PYTHON) -m pytest -q -m "not slow" tests

test-gpu:
	$(GPU_PYTHON) -m pytest -q -m gpu tests

test-matrix:
	python3 tools/matrix.py

test-matrix-all:
	python3 tools/matrix.py --all

lint: $(VENV)/.ready
	$(PYTHON) -m ruff check dcp_filesystem tests tools benchmarks examples

bench: $(VENV)/.ready
	$(PYTHON) -c "import matplotlib" 2>/dev/null || $(PYTHON) -m pip install -q matplotlib
	$(PYTHON) benchmarks/bench.py $(BENCH_ARGS)
	$(PYTHON) benchmarks/s3_bench.py $(S3_BENCH_ARGS)
	$(PYTHON) benchmarks/scale_bench.py $(SCALE_BENCH_ARGS)

bench-scale: $(VENV)/.ready
	$(PYTHON) benchmarks/scale_bench.py $(SCALE_BENCH_ARGS)
