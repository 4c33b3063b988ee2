# Carry a fine-tune from an old base model to a "new version" of it without training, and compare
# the transfer methods with fine-tuning the new version directly.
#
# The new version is the old base after continued pre-training on other text. The old base is
# fine-tuned on the task; its update is moved to the new version with `forge transfer` (bico,
# activations, naive), and the same fine-tune is run on the new version for reference. `forge eval`
# scores the new models with two-proportion z-tests against the new base (report.json), and the
# old fine-tune against the old base (report-old.json).
#
#   make -f examples/transfer-version-pair.mk FORGE_DATA_DIR=../shared/data
#   make -f examples/transfer-version-pair.mk CPT_STEPS=50 EVAL_LIMIT=100   # a quicker pass
#
# Every step writes a real file, so `make` reruns only what an edited variable or input changed.

FORGE ?= forge
MODEL ?= smollm2-135m
OUT ?= transfer-version-pair
FORGE_DATA_DIR ?= ../shared/data
# Continued pre-training: the text, steps, batch size and learning rate that make the new version.
NEW_TEXT ?= $(FORGE_DATA_DIR)/tiny_shakespeare/input.txt
CPT_STEPS ?= 150
CPT_BATCH ?= 32
CPT_LR ?= 1e-4
# The task fine-tune, run once on each base with the same settings.
TASK_DATA ?= demo:arith/train.jsonl
FT_STEPS ?= 300
FT_LR ?= 1e-3
CALIB_TOKENS ?= 4096
TARGET ?= arith
GENERAL ?= arc_easy
EVAL_LIMIT ?= 200
export FORGE_DATA_DIR

ALIGNS := bico activations naive
TRANSFERS := $(ALIGNS:%=$(OUT)/new-tuned-%/forge_run.json)
FINETUNE = $(FORGE) finetune --data $(TASK_DATA) --steps $(FT_STEPS) --lr $(FT_LR) --overwrite

.PHONY: all
all: $(OUT)/report.json

$(OUT)/new-base/forge_run.json:
	$(FORGE) finetune --model $(MODEL) --method full --data $(NEW_TEXT) --steps $(CPT_STEPS) \
		--batch-size $(CPT_BATCH) --lr $(CPT_LR) -o $(@D) --overwrite

$(OUT)/old-tuned/forge_run.json:
	$(FINETUNE) --model $(MODEL) -o $(@D)

$(OUT)/new-tuned-direct/forge_run.json: $(OUT)/new-base/forge_run.json
	$(FINETUNE) --model $(OUT)/new-base -o $(@D)

$(TRANSFERS): $(OUT)/new-tuned-%/forge_run.json: $(OUT)/old-tuned/forge_run.json $(OUT)/new-base/forge_run.json
	$(FORGE) transfer --source-base $(MODEL) --source-tuned $(OUT)/old-tuned --target-base $(OUT)/new-base \
		--calib $(TASK_DATA) --calib-tokens $(CALIB_TOKENS) --align $* -o $(@D) --overwrite

# forge eval compares an adapter only with its own base, so the old pair is scored apart.
$(OUT)/report-old.json: $(OUT)/old-tuned/forge_run.json
	$(FORGE) eval --baseline $(MODEL) --model $(MODEL) --model $(OUT)/old-tuned \
		--target $(TARGET) --general $(GENERAL) --limit $(EVAL_LIMIT) -o $@

$(OUT)/report.json: $(OUT)/new-tuned-direct/forge_run.json $(TRANSFERS) $(OUT)/report-old.json
	$(FORGE) eval --baseline $(OUT)/new-base --model $(OUT)/new-base --model $(OUT)/new-tuned-direct \
		$(TRANSFERS:%/forge_run.json=--model %) --target $(TARGET) --general $(GENERAL) --limit $(EVAL_LIMIT) -o $@
