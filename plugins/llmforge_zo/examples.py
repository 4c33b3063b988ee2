"""Training and dev examples of `forge zo`: verbalizer classification or completions, and their batches."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from llmforge.data import IGNORE_INDEX, TokenizedExample, collate, fill_template
from llmforge.errors import ForgeError
from llmforge.readers import where

from llmforge_zo.objective import OPTIONS, TOKENS, ScoringBatch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verbalizer:
    """Label values (as they appear in the data, compared as strings) and one word for each."""

    labels: tuple[str, ...]
    words: tuple[str, ...]


def parse_verbalizers(text: str) -> Verbalizer:
    """Parse "0=terrible,1=great" into a Verbalizer; at least two labels, each with a distinct word."""
    labels, words = [], []
    for item in text.split(","):
        label, separator, word = item.partition("=")
        if not separator or not label.strip() or not word.strip():
            raise ForgeError(f"invalid --verbalizers item {item!r}; use LABEL=WORD pairs such as 0=terrible,1=great")
        labels.append(label.strip())
        words.append(word.strip())
    if len(labels) < 2:
        raise ForgeError(f"--verbalizers {text!r} names {len(labels)} label; classification needs at least two")
    for values, kind in ((labels, "label"), (words, "word")):
        repeated = sorted({value for value in values if values.count(value) > 1})
        if repeated:
            raise ForgeError(f"--verbalizers {text!r} repeats the {kind} {repeated[0]!r}; each must appear once")
    return Verbalizer(tuple(labels), tuple(words))


@dataclass
class ClassificationData:
    """Prompts, label indices and the token ids of every option word."""

    prompts: list[list[int]]
    labels: list[int]
    option_tokens: list[list[int]]
    pad_id: int

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def single_token(self) -> bool:
        return all(len(tokens) == 1 for tokens in self.option_tokens)

    def batch(self, indices: Sequence[int]) -> ScoringBatch:
        """Return the batch of `indices`: one row per prompt (single-token options) or per option."""
        if not self.single_token:
            return self.option_rows_batch(indices)

        rows = [TokenizedExample(self.prompts[i], [IGNORE_INDEX] * len(self.prompts[i])) for i in indices]
        padded = collate(rows, self.pad_id)
        positions = torch.tensor([len(self.prompts[i]) - 1 for i in indices])
        option_ids = torch.tensor([tokens[0] for tokens in self.option_tokens])
        return ScoringBatch(OPTIONS, padded.input_ids, padded.attention_mask, labels=self.label_tensor(indices),
                            positions=positions, option_ids=option_ids)

    def option_rows_batch(self, indices: Sequence[int]) -> ScoringBatch:
        """Return the batch with one row per (example, option), each option scored by its tokens' log-probabilities."""
        rows = [TokenizedExample(self.prompts[i] + option, [IGNORE_INDEX] * len(self.prompts[i]) + option)
                for i in indices for option in self.option_tokens]
        batch = _token_batch(rows, self.pad_id)
        batch.choices = len(self.option_tokens)
        batch.labels = self.label_tensor(indices)
        return batch

    def label_tensor(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.tensor([self.labels[i] for i in indices])


@dataclass
class CompletionData:
    """Tokenized prompt/completion examples; the loss covers completion tokens."""

    examples: list[TokenizedExample]
    pad_id: int

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, indices: Sequence[int]) -> ScoringBatch:
        return _token_batch([self.examples[i] for i in indices], self.pad_id)


def _token_batch(rows: Sequence[TokenizedExample], pad_id: int) -> ScoringBatch:
    """Pad rows and list their targets: the token at p + 1 is predicted at position p."""
    padded = collate(rows, pad_id)
    targets = padded.labels[:, 1:] != IGNORE_INDEX
    target_rows, target_positions = targets.nonzero(as_tuple=True)
    target_ids = padded.labels[target_rows, target_positions + 1]
    return ScoringBatch(TOKENS, padded.input_ids, padded.attention_mask, target_rows=target_rows,
                        target_positions=target_positions, target_ids=target_ids)


def pad_id_of(tokenizer) -> int:
    """Return the tokenizer's padding id, else its EOS id (padding is masked and never scored)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ForgeError("the tokenizer has neither a padding nor an EOS token; forge zo needs one to pad batches")
    return pad


def classification_data(records: Sequence[Mapping], tokenizer, *, template: str, verbalizer: Verbalizer,
                        label_field: str, max_length: int, single_token: str = "auto",
                        warn_options: bool = True) -> ClassificationData:
    """Fill the template for every record and map its label onto a verbalizer option.

    Each option is the word after one space (none when the template ends in whitespace). With
    `single_token` "require", a word of more than one token is an error. With "auto", the options
    are then scored token by token, one row per option (logged once when `warn_options` is on).
    Prompts longer than `max_length` tokens lose tokens from the start, so the cue at the end of
    the template stays.
    """
    separator = "" if template[-1:].isspace() else " "
    option_tokens = [tokenizer(separator + word, add_special_tokens=False)["input_ids"] for word in verbalizer.words]
    _check_options(verbalizer, option_tokens, single_token, warn_options)

    prompts, labels, cut = [], [], 0
    for index, record in enumerate(records):
        prompt = fill_template(template, record, where(records, index), option="--template")
        label = _label_index(record, label_field, verbalizer, where(records, index))
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        limit = max_length - max(len(tokens) for tokens in option_tokens)
        if len(ids) > limit:
            ids, cut = ids[len(ids) - limit:], cut + 1
        prompts.append(ids)
        labels.append(label)

    if cut:
        logger.warning("%d of %d prompts are longer than --max-length %d allows and lost tokens from the start",
                       cut, len(prompts), max_length)
    _warn_unseen_labels(labels, verbalizer)
    return ClassificationData(prompts, labels, option_tokens, pad_id_of(tokenizer))


def _check_options(verbalizer: Verbalizer, option_tokens: list[list[int]], single_token: str, warn: bool) -> None:
    for word, tokens in zip(verbalizer.words, option_tokens):
        if not tokens:
            raise ForgeError(f"the verbalizer word {word!r} tokenizes to nothing; choose a real word")
        if len(tokens) > 1 and single_token == "require":
            raise ForgeError(f"the verbalizer word {word!r} is {len(tokens)} tokens, and --single-token require "
                             "needs one token per word; choose one-token words or pass --single-token auto")
    if all(len(tokens) == 1 for tokens in option_tokens):
        if len({tokens[0] for tokens in option_tokens}) < len(option_tokens):
            raise ForgeError(f"two verbalizer words of {', '.join(verbalizer.words)} are the same token; "
                             "choose words the model can tell apart")
        return
    long_words = [repr(word) for word, tokens in zip(verbalizer.words, option_tokens) if len(tokens) > 1]
    if warn:
        logger.warning("the verbalizer word %s takes more than one token, so each option is scored as its own "
                       "row: %d times the rows of one-token words", " and ".join(long_words), len(option_tokens))


def _label_index(record: Mapping, label_field: str, verbalizer: Verbalizer, location: str) -> int:
    if label_field not in record or record[label_field] in (None, ""):
        raise ForgeError(f"{location}: the record has no label in the field {label_field!r}; "
                         "pass --label-field to name the label column")
    value = str(record[label_field]).strip()
    if value not in verbalizer.labels:
        raise ForgeError(f"{location}: label {value!r} has no verbalizer word; --verbalizers covers "
                         f"{', '.join(verbalizer.labels)}; add a LABEL=WORD pair for it")
    return verbalizer.labels.index(value)


def _warn_unseen_labels(labels: list[int], verbalizer: Verbalizer) -> None:
    unseen = [verbalizer.labels[i] for i in range(len(verbalizer.labels)) if i not in set(labels)]
    if unseen:
        logger.warning("no example has the label %s; its option is only ever a wrong answer", ", ".join(unseen))


def batch_indices(size: int, batch_size: int, *, seed: int, step: int) -> list[int]:
    """Return the example indices of `step`: epochs of seeded shuffles, the last partial batch dropped.

    A pure function of (seed, step), so a resumed run draws the same batches as an uninterrupted one.
    """
    per_epoch = size // batch_size
    if per_epoch == 0:
        raise ForgeError(f"the training data has {size} examples, fewer than one batch of {batch_size}; "
                         "lower --batch-size or add data")
    epoch, position = divmod(step, per_epoch)
    order = list(range(size))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order[position * batch_size:(position + 1) * batch_size]
