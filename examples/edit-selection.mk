# Compare layer selections for a task-vector edit: SAE-ranked top-k layers against all layers,
# k random layers, the bottom-k layers and the SAE projection, each scored with `forge eval`
# against the base with two-proportion z-tests.
#
#   make -f examples/edit-selection.mk FORGE_DATA_DIR=../shared/data
#   make -f examples/edit-selection.mk K=3 SAE_TOKENS=20000 EVAL_LIMIT=100   # a quicker pass
#
# Every step writes a real file, so `make` reruns only what an edited variable or input changed;
# the shared forge cache makes the activation passes and the scores of unchanged models free.

FORGE ?= forge
MODEL ?= smollm2-135m
OUT ?= edit-selection
K ?= 5
SEED ?= 0
LAMBDA ?= 1.0
FT_STEPS ?= 300
FT_LR ?= 1e-3
TASK_DATA ?= demo:arith/train.jsonl
PROMPT ?= Question: {question}\nAnswer:
# make strips leading blanks from a value, so the completion's leading space is spelled out.
space := $(subst ,, )
COMPLETION ?= $(space){answer}
# General text for the SAEs and for the general side of the layer scores.
FORGE_DATA_DIR ?= ../shared/data
GENERAL_TEXT ?= $(FORGE_DATA_DIR)/alpaca/alpaca_5000.json
SAE_TOKENS ?= 200000
SAE_EPOCHS ?= 2
LAYER_TOKENS ?= 20000
TARGET ?= arith
GENERAL ?= arc_easy,boolq
EVAL_LIMIT ?= 300
export FORGE_DATA_DIR

SELECTIONS := top-k all random-k bottom-k top-k-projected
EDITS := $(SELECTIONS:%=$(OUT)/%/forge_run.json)

.PHONY: all
all: $(OUT)/report.json

$(OUT)/tuned/forge_run.json:
	$(FORGE) finetune --model $(MODEL) --data $(TASK_DATA) --prompt-template '$(PROMPT)' \
		--completion-template '$(COMPLETION)' --steps $(FT_STEPS) --lr $(FT_LR) -o $(@D) --overwrite

$(OUT)/tv.safetensors: $(OUT)/tuned/forge_run.json
	$(FORGE) edit diff --base $(MODEL) --tuned $(<D) -o $@ --overwrite

$(OUT)/saes/forge_run.json:
	$(FORGE) edit sae train --model $(MODEL) --data $(GENERAL_TEXT) --tokens $(SAE_TOKENS) \
		--epochs $(SAE_EPOCHS) -o $(@D) --overwrite

$(OUT)/scores.json: $(OUT)/saes/forge_run.json
	$(FORGE) edit layers --model $(MODEL) --sae $(<D) --task-data $(TASK_DATA) \
		--prompt-template '$(PROMPT)' --completion-template '$(COMPLETION)' \
		--general-data $(GENERAL_TEXT) --tokens $(LAYER_TOKENS) -o $@ --plot $(OUT)/scores.png

APPLY = $(FORGE) edit apply --base $(MODEL) --vector $(OUT)/tv.safetensors --lambda $(LAMBDA) --overwrite

$(OUT)/top-k/forge_run.json $(OUT)/bottom-k/forge_run.json: $(OUT)/%/forge_run.json: $(OUT)/tv.safetensors $(OUT)/scores.json
	$(APPLY) --select $* --k $(K) --scores $(OUT)/scores.json -o $(@D)

$(OUT)/random-k/forge_run.json: $(OUT)/tv.safetensors
	$(APPLY) --select random-k --k $(K) --seed $(SEED) -o $(@D)

$(OUT)/all/forge_run.json: $(OUT)/tv.safetensors
	$(APPLY) --select all -o $(@D)

$(OUT)/top-k-projected/forge_run.json: $(OUT)/tv.safetensors $(OUT)/scores.json
	$(APPLY) --select top-k --k $(K) --scores $(OUT)/scores.json --project sae --sae $(OUT)/saes -o $(@D)

$(OUT)/report.json: $(EDITS)
	$(FORGE) eval --baseline $(MODEL) --model $(MODEL) --model $(OUT)/tuned $(EDITS:%/forge_run.json=--model %) \
		--target $(TARGET) --general $(GENERAL) --limit $(EVAL_LIMIT) -o $@
