# Make targets are the interface: CI and the README call these.
PYTHON ?= python
NPROC ?= 2
export OMP_NUM_THREADS ?= 1

.PHONY: install install-demo demo test test-unit test-distributed test-torch test-torch-range test-min-deps bench gpu-check lint docs-testing \
	docs-testing-results mutants soak

# Uses the torch already installed; installs the CPU wheel torch==2.13.0 only when there is none,
# so that the range in setup.cfg never pulls a multi-GB CUDA build.
INSTALL_TORCH = $(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
install:
	$(INSTALL_TORCH)
	$(PYTHON) -m pip install -q -e ".[test,dev]"

# What the demo needs and no more: torch and fsdp_ac (no test or dev extras).
# numpy: torch's CPU wheel does not require it, but warns on every rank when it is missing.
install-demo:
	$(INSTALL_TORCH)
	$(PYTHON) -m pip install -q -e . numpy

# The main job: a small GPT trained under torchrun with FSDP2, without and with fsdp_ac.
demo: install-demo
	$(PYTHON) -m torch.distributed.run --standalone --nproc_per_node $(NPROC) scripts/demo.py

# The whole suite: single-process tests and the multi-rank tests (2 ranks, gloo on CPU).
test: install
	$(PYTHON) -m pytest -n 2 tests

test-unit: install
	$(PYTHON) -m pytest -n 2 tests --ignore=tests/distributed

test-distributed: install
	FSDP_AC_NPROC=$(NPROC) $(PYTHON) -m pytest tests/distributed

# The torch releases the unit tests also run on, besides the one `install` uses (2.13.0): the range in
# setup.cfg is the range these cover (docs/testing.md, "The torch range"). Each is a CUDA build of
# several GB that pip takes from this machine's disk (2.14.1) or downloads.
TORCH_RANGE ?= 2.14.1

# The unit tests on torch==$(TORCH), in a venv of its own under build/ that is reused while it holds
# that release: `make test-torch TORCH=2.14.1`.
TORCH_VENV = build/torch-$(TORCH)
test-torch:
	@test -n "$(TORCH)" || { echo "make test-torch needs a release, e.g. TORCH=2.14.1"; exit 2; }
	$(TORCH_VENV)/bin/python -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$(TORCH)')" \
	2>/dev/null || { rm -rf $(TORCH_VENV) && $(PYTHON) -m venv $(TORCH_VENV) \
	&& $(TORCH_VENV)/bin/python -m pip install -q torch==$(TORCH) \
	&& $(TORCH_VENV)/bin/python -m pip install -q -e ".[test]"; }
	$(TORCH_VENV)/bin/python -m pytest -n 2 tests --ignore=tests/distributed

test-torch-range:
	for version in $(TORCH_RANGE); do $(MAKE) test-torch TORCH=$$version || exit 1; done

# The lowest releases of Accelerate, transformers, PEFT, TRL, Lightning and datasets that setup.cfg
# admits (tests/tools/lower_bounds.py reads them from it), with torch 2.13.0, in a venv under build/
# that is reused while it holds them: the unit tests and the launch tests of the integrations.
MIN_DEPS_VENV = build/min-deps
MIN_DEPS_TESTS = $(wildcard tests/test_*.py) tests/distributed/test_accelerate_launch.py \
	tests/distributed/test_trainers.py tests/distributed/test_peft.py tests/distributed/test_lightning.py
test-min-deps:
	mkdir -p build
	$(PYTHON) tests/tools/lower_bounds.py > build/min-deps.txt
	cmp -s build/min-deps.txt $(MIN_DEPS_VENV)/constraints.txt || { rm -rf $(MIN_DEPS_VENV) \
	&& $(PYTHON) -m venv $(MIN_DEPS_VENV) && $(MIN_DEPS_VENV)/bin/python -m pip install -q torch==2.13.0 \
	&& $(MIN_DEPS_VENV)/bin/python -m pip install -q -c build/min-deps.txt -e ".[test]" \
	&& cp build/min-deps.txt $(MIN_DEPS_VENV)/constraints.txt; }
	$(MIN_DEPS_VENV)/bin/python tests/tools/lower_bounds.py --check
	$(MIN_DEPS_VENV)/bin/python -m pytest -n 2 $(MIN_DEPS_TESTS)

bench: install
	$(PYTHON) scripts/benchmark.py

# Breaks fsdp_ac on purpose, one way at a time, and fails if the tests chosen to catch a breakage all
# pass (docs/testing.md, "Mutation smoke test"). Not part of `make test`: about 4 minutes on 2 cores.
mutants: install
	$(PYTHON) tests/tools/mutants.py

# Trains the demo model under torchrun for MINUTES with random faults (kills, a torn save, a hang) and
# restarts, and checks the result against a fault-free run (docs/testing.md, "Elastic restarts"). Not
# part of `make test` or CI.
MINUTES ?= 30
soak: install
	$(PYTHON) tests/tools/soak.py --minutes $(MINUTES)

# On one CUDA GPU, offline and within 8 minutes (at most 450 s of timeouts): every gpu-marked test (one
# rank per GPU), the demo on one rank with NCCL, and the offload benchmark with its stress checks
# (docs/offload.md), whose records go to build/. No install, no pip: the installed packages and this
# checkout (PYTHONPATH).
gpu-check: export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
gpu-check:
	$(PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'make gpu-check needs a CUDA GPU')"
	mkdir -p build
	FSDP_AC_NPROC=1 timeout 180 $(PYTHON) -m pytest -m gpu tests
	FSDP_AC_BACKEND=nccl timeout 90 $(PYTHON) -m torch.distributed.run --standalone --nproc_per_node 1 scripts/demo.py
	timeout 180 $(PYTHON) scripts/offload_benchmark.py --json build/offload_benchmark.json --check

lint: install
	$(PYTHON) -m ruff check fsdp_ac tests scripts
	$(PYTHON) -m ruff format --check fsdp_ac
	$(PYTHON) -m mypy

# The inventory of docs/testing.md (test counts, matrix cells, portability configurations), from the
# code; tests/test_docs_testing.py fails when it is out of date.
docs-testing: install
	$(PYTHON) tests/tools/suite_inventory.py

# Runs the whole suite (minutes), as make test does, and writes its results into docs/testing.md.
RESULTS_PYTEST = -m pytest -n 2 tests
docs-testing-results: install
	mkdir -p build
	$(PYTHON) $(RESULTS_PYTEST) -o junit_family=xunit1 --junitxml=build/junit.xml; status=$$?; \
	$(PYTHON) tests/tools/suite_inventory.py --results build/junit.xml --command "python $(RESULTS_PYTEST)" \
	&& exit $$status
