"""Multiple-choice scoring: the log-likelihood of each choice's continuation given the prompt.

Accuracy picks the choice with the highest summed log-likelihood. Length-normalised accuracy
divides each sum by the continuation's length in characters (not tokens or bytes), leading
whitespace excluded, before picking. lm-evaluation-harness divides by the length of the choice
text without the space that joins it to the prompt, so for the usual " {choice}" continuation
the two agree.
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


def shared_context_loglikelihoods(model, tokenizer, examples: Sequence[ChoiceExample], batch_size: int,
                                  progress=None) -> list[list[float]]:
    """Return, per example, the summed log-probability of each choice's continuation, with one context per row.

    A row contains the context once, followed by every continuation. Position ids restart at the end
    of the context for each continuation, and the attention mask lets a continuation token see the
    context and the earlier tokens of its own continuation only. So each continuation is scored
    exactly as after the context alone (same positions and visible tokens), while the context is
    computed once instead of once per choice. `batch_size` counts rows, that is questions.
    """
    import torch

    limit = context_limit(model)
    rows = [_shared_row(tokenizer, example, limit) for example in examples]
    scores: list[list[float]] = [[] for _ in examples]
    pad_id, device = pad_token_id(tokenizer), model_device(model)
    with torch.inference_mode():
        for batch in batches_by_length([len(row.ids) for row in rows], batch_size):
            values = _score_shared_rows(model, [rows[i] for i in batch], pad_id, device)
            for index, value in zip(batch, values):
                scores[index] = value
            if progress is not None:
                progress.update(sum(len(examples[i].continuations) for i in batch))
    return scores


@dataclass(frozen=True)
class _SharedRow:
    """Token ids of one question's row, and each continuation's (start, length) in it; the context is ids[:context]."""

    ids: list[int]
    context: int
    spans: tuple[tuple[int, int], ...]


def _shared_row(tokenizer, example: ChoiceExample, limit: int) -> _SharedRow:
    context_ids = tokenizer(example.context)["input_ids"]
    continuations = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in example.continuations]
    for text, ids in zip(example.continuations, continuations):
        if not ids:
            raise ForgeError(f"Empty continuation {text!r}: every choice must contain text.")

    # As when scored one by one, a context that does not fit loses tokens on the left.
    longest = max(len(ids) for ids in continuations)
    context_ids = context_ids[-max(1, limit - longest):]
    ids, spans = list(context_ids), []
    for continuation in continuations:
        spans.append((len(ids), len(continuation)))
        ids.extend(continuation)
    return _SharedRow(ids, len(context_ids), tuple(spans))


def _score_shared_rows(model, rows: Sequence[_SharedRow], pad_id: int, device) -> list[list[float]]:
    import torch

    width = max(len(row.ids) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    allowed = torch.zeros((len(rows), width, width), dtype=torch.bool)
    positions, targets = [], []
    for number, row in enumerate(rows):
        input_ids[number, :len(row.ids)] = torch.tensor(row.ids)
        position_ids[number, :row.context] = torch.arange(row.context)
        allowed[number, :row.context, :row.context] = torch.ones(row.context, row.context).tril().bool()
        for start, length in row.spans:
            end = start + length
            position_ids[number, start:end] = torch.arange(row.context, row.context + length)
            allowed[number, start:end, :row.context] = True
            allowed[number, start:end, start:end] = torch.ones(length, length).tril().bool()
            # The last context token predicts the first token of a continuation, and each later token the next one.
            positions.extend((number, column) for column in [row.context - 1, *range(start, end - 1)])
            targets.extend(row.ids[start:end])
    # Padding positions attend to themselves only, so that no softmax row is empty.
    allowed |= torch.eye(width, dtype=torch.bool).unsqueeze(0)

    log_probs = _log_probs_at(model, input_ids.to(device), position_ids.to(device), allowed.to(device), positions)
    target_ids = torch.tensor(targets, device=log_probs.device)
    token_scores = log_probs.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1).tolist()

    results, offset = [], 0
    for row in rows:
        values = []
        for _, length in row.spans:
            values.append(sum(token_scores[offset:offset + length]))
            offset += length
        results.append(values)
    return results


def _log_probs_at(model, input_ids, position_ids, allowed, positions: list[tuple[int, int]]):
    """Run the model with a custom (batch, query, key) attention pattern; return log-softmax rows at `positions`.

    Only the selected hidden states go through the output layer. The boolean pattern becomes an
    additive mask (0 where allowed, the dtype's minimum elsewhere), which eager and SDPA attention
    both accept as a ready 4-D mask.
    """
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    rows = torch.tensor([row for row, _ in positions], device=input_ids.device)
    columns = torch.tensor([column for _, column in positions], device=input_ids.device)

    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=mask.unsqueeze(1), position_ids=position_ids,
                                use_cache=False).last_hidden_state
    logits = base.get_output_embeddings()(hidden[rows, columns]).float()
    softcap = getattr(base.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.log_softmax(logits, dim=-1)


def score_multiple_choice(model, tokenizer, spec: TaskSpec, records: Sequence[dict], batch_size: int,
                          progress=None) -> dict[str, Any]:
    """Score a multiple-choice task: accuracy and length-normalised accuracy with standard errors."""
    examples = build_examples(spec, records)
    if progress is not None:
        progress.reset(total=sum(len(example.continuations) for example in examples))
    loglikelihoods = shared_context_loglikelihoods(model, tokenizer, examples, batch_size, progress)

    correct = correct_norm = 0
    for example, scores in zip(examples, loglikelihoods):
        count = len(example.continuations)
        normalised = [score / max(1, len(text.lstrip())) for score, text in zip(scores, example.continuations)]
        correct += int(max(range(count), key=scores.__getitem__) == example.gold)
        correct_norm += int(max(range(count), key=normalised.__getitem__) == example.gold)

    n = len(examples)
    acc, acc_norm = correct / n, correct_norm / n
    metrics = {
        "acc": acc,
        "acc_stderr": proportion_stderr(acc, n),
        "acc_norm": acc_norm,
        "acc_norm_stderr": proportion_stderr(acc_norm, n),
        "length_normalisation": "characters without leading whitespace",
    }
    metric = spec.metric_name
    return {"metric": metric, "score": metrics[metric], "stderr": metrics[f"{metric}_stderr"], "n": n,
            "higher_is_better": True, "metrics": metrics}
