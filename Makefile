# Two commands on a fresh machine: `make demo` and `make test`. Both create/refresh .venv themselves.
PY ?= python3
TORCH_INDEX_URL ?=  # empty: pip's configured index (a CPU wheel on the development machine)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export MEDLORA_HOME ?= $(HOME)/.cache/medlora
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test test-unit test-e2e test-slow demo demo-retrain demo-prefer train-full bench bench-quick bench-llamacpp llamacpp clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The torch wheel first and pinned: an unpinned torch would pull a multi-GB CUDA build. Where pip's index serves
	# CUDA builds of 2.13.0, choose the CPU one: make demo TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
	$(BIN)/pip install --quiet $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,web,cmekg,gguf-export,prefer]'
	# llama.cpp's HF->GGUF converter (medlora export), unpacked from llama-cpp-python's PyPI sdist (sha256-pinned)
	$(BIN)/python -m medlora.llamacpp fetch
	touch $(STAMP)

venv: $(STAMP)

# llama.cpp itself (llama-cpp-python built from its PyPI sdist), to run exported GGUF files: once, kept in .venv
# (pip finds it installed on later runs). Lowest priority and one compile job: the machine has 2 shared cores.
LLAMACPP_STAMP := $(VENV)/.llamacpp-installed
LLAMACPP_JOBS ?= 1
$(LLAMACPP_STAMP): $(STAMP)
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$(LLAMACPP_JOBS) nice -n 19 \
		$(BIN)/pip install --quiet --no-binary llama-cpp-python -e '.[llamacpp]'
	touch $(LLAMACPP_STAMP)

llamacpp: $(LLAMACPP_STAMP)

test: $(STAMP)
	$(BIN)/lint-imports --no-cache  # the import contract of pyproject.toml ([tool.importlinter])
	$(BIN)/python -m pytest -q

# The two halves of `make test`: unit tests of the library (minutes), end-to-end runs of commands and servers
test-unit: $(STAMP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q -m "not slow and not e2e"

test-e2e: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and e2e"

test-slow: $(STAMP) $(LLAMACPP_STAMP)
	$(BIN)/python -m pytest -q -m slow

demo: $(STAMP)
	$(BIN)/python -m medlora.demo

train-full: $(STAMP)
	$(BIN)/medlora finetune --config recipes/gemma3-270m-full.yaml
	$(BIN)/medlora eval --base_model gemma3-270m --lora_weights tuned=runs/full/adapter \
		--data data/medqa/test.jsonl --out runs/full/eval --train_dir runs/full/adapter --frequency_penalty 0.3
	$(BIN)/medlora eval --base_model gemma3-270m --lora_weights tuned=runs/full/adapter \
		--data data/exam/exam.jsonl --out runs/full/exam --train_dir runs/full/adapter --frequency_penalty 0.3

bench: $(STAMP)
	$(BIN)/python bench/run.py --write docs/benchmarks.md

bench-quick: $(STAMP)
	$(BIN)/python bench/run.py --quick

bench-llamacpp: $(LLAMACPP_STAMP)
	$(BIN)/python bench/llamacpp_agreement.py

clean:
	rm -rf $(VENV) runs

demo-retrain: $(STAMP)
	$(BIN)/python -m medlora.demo --retrain

# the preference stage on the demo adapter: pairs judged by the knowledge base, DPO, SFT against DPO (README, Results)
demo-prefer: $(STAMP)
	$(BIN)/python -m medlora.demo --prefer
