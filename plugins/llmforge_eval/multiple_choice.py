"""Multiple-choice scoring: the log-likelihood of each choice's continuation given the prompt.

Accuracy picks the choice with the highest summed log-likelihood. Length-normalised accuracy
divides each sum by the continuation's length in characters (not tokens or bytes) before picking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from llmforge.errors import ForgeError
from llmforge_eval.batching import (
    batches_by_length,
    context_limit,
    left_padded,
    model_device,
    pad_token_id,
    proportion_stderr,
)
from llmforge_eval.tasks import TaskSpec, field_value, render


@dataclass(frozen=True)
class ChoiceExample:
    """One question: the prompt text, the continuation text of each choice and the gold index."""

    context: str
    continuations: tuple[str, ...]
    gold: int


def build_examples(spec: TaskSpec, records: Sequence[dict]) -> list[ChoiceExample]:
    """Turn records into ChoiceExamples following the spec's prompt, choices and answer fields."""
    examples = []
    for index, record in enumerate(records):
        where = f"task {spec.name!r}, record {index + 1}"
        texts, labels = _choices_of(spec, record, where)
        gold = _gold_index(spec, record, texts, labels, where)
        continuations = tuple(render(spec.continuation, {"choice": text}, where) for text in texts)
        examples.append(ChoiceExample(render(spec.prompt, record, where), continuations, gold))
    return examples


def _choices_of(spec: TaskSpec, record: dict, where: str) -> tuple[list[str], list[str]]:
    if isinstance(spec.choices, list):
        return list(spec.choices), list(spec.choices)

    items = field_value(record, spec.choices, where)
    if not isinstance(items, list) or len(items) < 2:
        raise ForgeError(f"Invalid choices in {where}: field {spec.choices!r} must be a list of 2 or more items.")
    if spec.choice_text:
        texts = [str(field_value(item, spec.choice_text, where)) for item in items]
    else:
        texts = [str(item) for item in items]
    labels = [str(field_value(item, spec.choice_label, where)) for item in items] if spec.choice_label else texts
    return texts, labels


def _gold_index(spec: TaskSpec, record: dict, texts: list[str], labels: list[str], where: str) -> int:
    raw = field_value(record, spec.answer, where)

    if spec.answer_map is not None:
        if str(raw) not in spec.answer_map:
            raise ForgeError(f"Answer {raw!r} in {where} is not a key of answer_map {spec.answer_map}.")
        index = spec.answer_map[str(raw)]
    elif isinstance(raw, int) and not isinstance(raw, bool):
        index = raw
    elif str(raw) in labels:
        index = labels.index(str(raw))
    else:
        raise ForgeError(f"Answer {raw!r} in {where} matches no choice label {labels}; fix the data or add answer_map.")

    if not 0 <= index < len(texts):
        raise ForgeError(f"Answer index {index} in {where} is out of range for {len(texts)} choices.")
    return index


def continuation_loglikelihoods(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int,
                                progress=None) -> list[float]:
    """Sum of token log-probabilities of each continuation given its context, in one batched pass per batch.

    The context is tokenized with the tokenizer's special tokens (a BOS token where the model uses
    one) and the continuation without them. A context longer than the model's limit loses tokens on
    the left.
    """
    import torch

    limit = context_limit(model)
    sequences, lengths = [], []
    for context, continuation in pairs:
        context_ids = tokenizer(context)["input_ids"]
        continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not continuation_ids:
            raise ForgeError(f"Empty continuation {continuation!r}: every choice must contain text.")
        ids = (context_ids + continuation_ids)[-limit:]
        sequences.append(ids)
        lengths.append(len(continuation_ids))

    scores = [0.0] * len(pairs)
    pad_id, device = pad_token_id(tokenizer), model_device(model)
    with torch.inference_mode():
        for batch in batches_by_length([len(s) for s in sequences], batch_size):
            values = _score_batch(model, [sequences[i] for i in batch], [lengths[i] for i in batch], pad_id, device)
            for index, value in zip(batch, values):
                scores[index] = value
            if progress is not None:
                progress.update(len(batch))
    return scores


def _score_batch(model, sequences, continuation_lengths, pad_id, device) -> list[float]:
    import torch

    input_ids, attention_mask, position_ids = left_padded(sequences, pad_id, device)
    keep = max(continuation_lengths) + 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=keep).logits
    logits = logits[:, -keep:].float()

    # Column j of the kept logits predicts the token in column j + 1 of the kept ids.
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = input_ids[:, -(keep - 1):]
    token_scores = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    lengths = torch.tensor(continuation_lengths, device=token_scores.device)
    columns = torch.arange(keep - 1, device=token_scores.device)
    in_continuation = columns.unsqueeze(0) >= (keep - 1 - lengths).unsqueeze(1)
    return (token_scores * in_continuation).sum(dim=1).tolist()


def score_multiple_choice(model, tokenizer, spec: TaskSpec, records: Sequence[dict], batch_size: int,
                          progress=None) -> dict[str, Any]:
    """Score a multiple-choice task: accuracy and length-normalised accuracy with standard errors."""
    examples = build_examples(spec, records)
    pairs = [(example.context, continuation) for example in examples for continuation in example.continuations]
    if progress is not None:
        progress.reset(total=len(pairs))
    loglikelihoods = continuation_loglikelihoods(model, tokenizer, pairs, batch_size, progress)

    correct = correct_norm = 0
    offset = 0
    for example in examples:
        count = len(example.continuations)
        scores = loglikelihoods[offset:offset + count]
        offset += count
        normalised = [score / len(text) for score, text in zip(scores, example.continuations)]
        correct += int(max(range(count), key=scores.__getitem__) == example.gold)
        correct_norm += int(max(range(count), key=normalised.__getitem__) == example.gold)

    n = len(examples)
    acc, acc_norm = correct / n, correct_norm / n
    metrics = {
        "acc": acc,
        "acc_stderr": proportion_stderr(acc, n),
        "acc_norm": acc_norm,
        "acc_norm_stderr": proportion_stderr(acc_norm, n),
        "length_normalisation": "characters",
    }
    metric = spec.metric_name
    return {"metric": metric, "score": metrics[metric], "stderr": metrics[f"{metric}_stderr"], "n": n,
            "higher_is_better": True, "metrics": metrics}
