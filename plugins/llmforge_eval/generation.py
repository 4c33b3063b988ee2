"""Generation tasks: greedy batched generation, answer extraction and exact or numeric matching."""

from __future__ import annotations

import re
import string
from decimal import Decimal, InvalidOperation
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
from llmforge_eval.tasks import TaskSpec, render, render_references

# An integer or decimal with optional sign and thousands separators: "-1,234.5", "7", ".5".
_NUMBER = re.compile(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def extract_answer(text: str, extractor: str) -> str:
    """Apply an answer extractor to generated or reference text; return "" when nothing matches.

    `last_number`: the last integer or decimal, commas removed; `first_line`: the first non-empty
    line; `regex:PATTERN`: the first match's group 1 (or the whole match without groups); `none`:
    the stripped text.
    """
    if extractor == "last_number":
        numbers = _NUMBER.findall(text)
        return numbers[-1].replace(",", "") if numbers else ""
    if extractor == "first_line":
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        return lines[0] if lines else ""
    if extractor.startswith("regex:"):
        match = re.search(extractor[len("regex:"):], text)
        if match is None:
            return ""
        return (match.group(1) if match.groups() else match.group(0)).strip()
    return text.strip()


def parse_number(text: str) -> Decimal | None:
    """Read a number written with optional commas, a leading '$' or a trailing '.'; None when it is not one."""
    cleaned = text.strip().replace(",", "").removeprefix("$").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def normalize_answer(text: str, normalization: str) -> str:
    """Apply an answer normalisation: "squad" lowercases, drops ASCII punctuation and the articles a/an/the,
    and collapses whitespace; "none" only strips the ends."""
    if normalization == "none":
        return text.strip()
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answers_match(prediction: str, references: str | Sequence[str], metric: str,
                  normalization: str = "none") -> bool:
    """Compare an extracted prediction with one or more extracted references; any match counts.

    exact_match compares the texts after `normalize_answer`, numeric_match compares them as numbers.
    """
    if isinstance(references, str):
        references = [references]
    return any(_answer_matches(prediction, reference, metric, normalization) for reference in references)


def _answer_matches(prediction: str, reference: str, metric: str, normalization: str) -> bool:
    if metric == "exact_match":
        return normalize_answer(prediction, normalization) == normalize_answer(reference, normalization)

    expected = parse_number(reference)
    if expected is None:
        raise ForgeError(f"Reference answer {reference!r} is not a number; numeric_match needs numeric references.")
    predicted = parse_number(prediction)
    return predicted is not None and predicted == expected


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut generated text at the earliest stop sequence."""
    cut = len(text)
    for sequence in stop:
        position = text.find(sequence)
        if position != -1:
            cut = min(cut, position)
    return text[:cut]


class _StopOnText:
    """Stopping criterion: a row is done once its generated text (the prompt excluded) contains a stop sequence.

    transformers' own `stop_strings` (checked with transformers 5.25) also matches across the end of the
    prompt, so a prompt ending in ":" would stop a row whose first generated token is ":" for the stop
    sequence "::".
    """

    def __init__(self, tokenizer, stop: Sequence[str], prompt_width: int):
        self.tokenizer, self.stop, self.prompt_width = tokenizer, list(stop), prompt_width

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width:], skip_special_tokens=True)
        done = [any(sequence in text for sequence in self.stop) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def generate_greedy(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str],
                    batch_size: int, progress=None) -> list[str]:
    """Generate greedily for each prompt in left-padded batches; return the text cut at the first stop sequence."""
    import torch
    from transformers import GenerationConfig, StoppingCriteriaList

    pad_id, device = pad_token_id(tokenizer), model_device(model)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)

    # A prompt too long for the model keeps its last tokens, leaving room for the new ones.
    room = max(1, context_limit(model) - max_new_tokens)
    encoded = [tokenizer(prompt)["input_ids"][-room:] for prompt in prompts]
    outputs = [""] * len(prompts)
    with torch.inference_mode():
        for batch in batches_by_length([len(ids) for ids in encoded], batch_size):
            input_ids, attention_mask, _ = left_padded([encoded[i] for i in batch], pad_id, device)
            criteria = StoppingCriteriaList([_StopOnText(tokenizer, stop, input_ids.shape[1])] if stop else [])
            generated = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                       generation_config=config, stopping_criteria=criteria)
            new_tokens = generated[:, input_ids.shape[1]:]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for index, text in zip(batch, texts):
                outputs[index] = truncate_at_stop(text, stop)
            if progress is not None:
                progress.update(len(batch))
    return outputs


def score_generate(model, tokenizer, spec: TaskSpec, records: Sequence[dict], batch_size: int,
                   progress=None) -> dict[str, Any]:
    """Score a generation task: the share of examples whose extracted answer matches a reference."""
    where = f"task {spec.name!r}"
    prompts = [render(spec.prompt, record, where) for record in records]
    references = []
    for record in records:
        accepted = render_references(spec.reference, record, where)
        references.append([extract_answer(text, spec.reference_extract) for text in accepted])
    if progress is not None:
        progress.reset(total=len(prompts))

    outputs = generate_greedy(model, tokenizer, prompts, max_new_tokens=spec.max_new_tokens, stop=spec.stop,
                              batch_size=batch_size, progress=progress)
    predictions = [extract_answer(output, spec.extract) for output in outputs]
    correct = sum(answers_match(prediction, accepted, spec.metric_name, spec.normalize)
                  for prediction, accepted in zip(predictions, references))

    n = len(records)
    score = correct / n
    # A sample's reference is a string, or the list of accepted answers when there are several.
    samples = [{"prompt": prompt, "output": output, "prediction": prediction,
                "reference": accepted[0] if len(accepted) == 1 else accepted}
               for prompt, output, prediction, accepted in list(zip(prompts, outputs, predictions, references))[:3]]
    return {"metric": spec.metric_name, "score": score, "stderr": proportion_stderr(score, n), "n": n,
            "higher_is_better": True, "metrics": {spec.metric_name: score}, "samples": samples}
