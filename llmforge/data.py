"""Datasets for training and evaluation: prompt formats, tokenization and batching.

The pipeline is `read_records` (a file into a list of dicts; it lives in llmforge.readers and is
re-exported here) -> `to_examples` (each record into a prompt and a completion) ->
`tokenize_examples` (token ids with the prompt masked out of the labels) -> `make_batches`
(padded, or packed into one row per batch, for the training loop).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from llmforge.errors import ForgeError
from llmforge.readers import READ_FORMATS, Records, read_records, resolve_data_path, where as _where

__all__ = [
    "READ_FORMATS", "Records", "read_records", "resolve_data_path", "Example", "to_examples", "fill_template",
    "TokenizedExample", "TokenizeStats", "OVERLONG_POLICIES", "tokenize_examples", "Batch", "collate",
    "PackedBatch", "pack", "batch_order", "make_batches",
]

logger = logging.getLogger(__name__)

EXAMPLE_FORMATS = ("auto", "text", "prompt-completion", "instruction", "chat")

# Ignored by torch.nn.functional.cross_entropy: the label of every prompt and padding token.
IGNORE_INDEX = -100

# Templates of the built-in demo task (records {"question", "answer"}); `to_examples` in auto
# mode uses them for records that have these two fields.
QA_PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
QA_COMPLETION_TEMPLATE = " {answer}"

# Plain instruction template (the Alpaca layout); the "### Input" block is left out when the
# record's input is empty or absent.
INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
INSTRUCTION_INPUT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"

# The record fields that the formats read, and so the only valid targets of a column mapping.
# question and answer are the fields of the built-in question/answer layout that auto mode detects.
FORMAT_FIELDS = ("text", "prompt", "completion", "instruction", "input", "output", "messages",
                 "question", "answer")

CHAT_ROLES = ("system", "user", "assistant", "tool")


# ---------------------------------------------------------------------------------------------
# Prompt formats


@dataclass(frozen=True)
class Example:
    """One training pair: the loss covers the completion only (an empty prompt means all tokens)."""

    prompt: str
    completion: str


def to_examples(records: Sequence[Mapping[str, Any]], tokenizer=None, *, fmt: str = "auto",
                columns: Mapping[str, str] | None = None, prompt_template: str | None = None,
                completion_template: str | None = None) -> list[Example]:
    """Turn records into prompt/completion pairs.

    Formats:
    - "text": field text, no prompt, so the loss covers every token;
    - "prompt-completion": fields prompt and completion;
    - "instruction": fields instruction, optional input, and output, laid out by the plain
      template INSTRUCTION_TEMPLATE (or INSTRUCTION_INPUT_TEMPLATE when input is present);
    - "chat": field messages, rendered with the tokenizer's chat template. The prompt is
      everything before the last assistant turn plus the generation prompt, and the completion
      is that turn's content with its end-of-turn marker. "auto" picks the format from the
    first record's fields, and also maps {question, answer} records onto QA_PROMPT_TEMPLATE.
    `columns` maps a format's field onto another record field ({"prompt": "question"}).
    Templates such as "Question: {question}\\nAnswer:" fill from the record's fields and take
    precedence over the format; a prompt template alone takes the completion from the
    "completion" field.
    """
    if fmt not in EXAMPLE_FORMATS:
        raise ForgeError(f"unknown example format {fmt!r}; use one of: {', '.join(EXAMPLE_FORMATS)}")
    if not records:
        raise ForgeError("the data set is empty; there are no records to train on")

    validate_columns(columns or {})
    mapped = [_map_columns(records, index, columns or {}) for index in range(len(records))]
    if prompt_template is None and completion_template is None and fmt == "auto":
        fmt, prompt_template, completion_template = _detect_format(mapped[0], _where(records, 0))
    if completion_template is not None and prompt_template is None:
        prompt_template = ""
    if prompt_template is not None and completion_template is None:
        completion_template = "{completion}"

    examples = []
    for index, record in enumerate(mapped):
        where = _where(records, index)
        if prompt_template is not None:
            example = Example(fill_template(prompt_template, record, where),
                              fill_template(completion_template, record, where))
        elif fmt == "text":
            example = Example("", _field(record, "text", where))
        elif fmt == "prompt-completion":
            example = Example(_field(record, "prompt", where), _field(record, "completion", where))
        elif fmt == "instruction":
            example = _instruction_example(record, where)
        else:
            example = _chat_example(record, tokenizer, where)

        # An empty completion trains on the EOS token alone, and with an empty prompt on no token
        # at all, which makes the loss NaN.
        if not example.completion:
            raise ForgeError(f"{where}: empty completion; there is nothing to train on; "
                             "fill in the completion or remove the record")
        examples.append(example)
    return examples


def validate_columns(columns: Mapping[str, str]) -> None:
    """Raise ForgeError unless every FIELD of a FIELD=NAME column mapping is a field the formats read."""
    for target, source in columns.items():
        if target not in FORMAT_FIELDS:
            raise ForgeError(f"invalid column mapping {target}={source}: {target!r} is not a field of any "
                             f"data format; map one of: {', '.join(FORMAT_FIELDS)}")
        if not source:
            raise ForgeError(f"invalid column mapping {target}={source}: the record field name is empty")


def _map_columns(records: Sequence[Mapping[str, Any]], index: int, columns: Mapping[str, str]) -> dict:
    record = dict(records[index])
    for target, source in columns.items():
        if source not in record:
            raise ForgeError(f"{_where(records, index)}: missing field {source!r} (mapped to {target!r}); "
                             f"the record has: {', '.join(sorted(record)) or 'no fields'}")
        record[target] = record[source]
    return record


def _detect_format(record: Mapping[str, Any], where: str) -> tuple[str, str | None, str | None]:
    if "messages" in record:
        return "chat", None, None
    if "instruction" in record and "output" in record:
        return "instruction", None, None
    if "prompt" in record and "completion" in record:
        return "prompt-completion", None, None
    if "question" in record and "answer" in record:
        return "prompt-completion", QA_PROMPT_TEMPLATE, QA_COMPLETION_TEMPLATE
    if "text" in record:
        return "text", None, None
    raise ForgeError(f"{where}: cannot detect the data format from the fields "
                     f"{', '.join(sorted(record)) or '(none)'}; expected text, prompt+completion, "
                     "instruction+output, question+answer or messages; map fields with --column "
                     "or give --prompt-template/--completion-template")


def _field(record: Mapping[str, Any], name: str, where: str) -> str:
    if name not in record:
        raise ForgeError(f"{where}: missing field {name!r}; the record has: "
                         f"{', '.join(sorted(record)) or 'no fields'}")
    value = record[name]
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ForgeError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return str(value)


def fill_template(template: str, record: Mapping[str, Any], where: str, *, option: str = "template") -> str:
    """Fill {field} placeholders from `record`; ForgeError names `where` (FILE:LINE) and the `option` that set it."""
    try:
        return template.format_map(record)
    except KeyError as error:
        raise ForgeError(f"{where}: the {option} {template!r} names the missing field {error.args[0]!r}; "
                         f"the record has: {', '.join(sorted(record)) or 'no fields'}") from error
    except (ValueError, IndexError) as error:
        raise ForgeError(f"invalid {option} {template!r}: {error}; use {{field}} placeholders "
                         "and double braces for literal ones") from error
    except (AttributeError, TypeError) as error:
        # "{question.x}" and "{question[x]}" look up an attribute or a key of the field's value.
        raise ForgeError(f"{where}: the {option} {template!r} cannot be filled: {error}; use plain {{field}} "
                         "placeholders") from error


def _instruction_example(record: Mapping[str, Any], where: str) -> Example:
    instruction = _field(record, "instruction", where)
    text_input = _field(record, "input", where) if record.get("input") not in (None, "") else ""
    if text_input:
        prompt = INSTRUCTION_INPUT_TEMPLATE.format(instruction=instruction, input=text_input)
    else:
        prompt = INSTRUCTION_TEMPLATE.format(instruction=instruction)
    return Example(prompt, _field(record, "output", where))


def _chat_example(record: Mapping[str, Any], tokenizer, where: str) -> Example:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ForgeError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for number, message in enumerate(messages, start=1):
        _check_message(message, number, where)
    if messages[-1]["role"] != "assistant":
        raise ForgeError(f"{where}: the last message must have role 'assistant', got {messages[-1]['role']!r}")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ForgeError("chat data needs a tokenizer with a chat template; this model's tokenizer has none, "
                         "so convert the data to prompt/completion fields")

    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ForgeError(f"{where}: the chat template renders the conversation so that the prompt is not a "
                         "prefix of the full text; use prompt/completion fields instead")
    # The completion keeps the end-of-turn marker; trailing newlines after it are not trained on.
    return Example(prompt, full[len(prompt):].rstrip())


def _check_message(message: Any, number: int, where: str) -> None:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise ForgeError(f"{where}: every message needs 'role' and 'content', got {message!r}")
    role = message["role"]
    if role not in CHAT_ROLES:
        raise ForgeError(f"{where}: message {number} has the unknown role {role!r}; "
                         f"use one of: {', '.join(CHAT_ROLES)}")
    if not isinstance(message["content"], str):
        raise ForgeError(f"{where}: the content of message {number} ({role}) must be a string, "
                         f"got {type(message['content']).__name__}")


# ---------------------------------------------------------------------------------------------
# Tokenization and batching


@dataclass
class TokenizedExample:
    """Token ids and labels of one example; labels are IGNORE_INDEX on prompt tokens."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class TokenizeStats:
    """How many examples `tokenize_examples` truncated or dropped."""

    total: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    notes: list[str] = field(default_factory=list)


# Policies of `tokenize_examples` for an example longer than max_length: cut it, or raise ForgeError.
OVERLONG_POLICIES = ("truncate", "reject")


def tokenize_examples(examples: Sequence[Example], tokenizer, *, max_length: int,
                      stats: TokenizeStats | None = None, overlong: str = "truncate",
                      locations: Sequence[str] | None = None) -> list[TokenizedExample]:
    """Tokenize prompt and completion separately and append EOS to the completion.

    The prompt is tokenized with the tokenizer's special tokens (BOS where it adds one) and the
    completion without, so the label boundary is exact and matches generation from the prompt
    alone. EOS is not appended twice when the completion already ends with it (chat turns).

    An example is overlong when prompt, completion and EOS exceed max_length tokens. With
    `overlong="truncate"`, overlong examples are cut at the end, and those left without a
    completion token are dropped. Both counts are logged as a warning and stored in `stats`
    when given. With `overlong="reject"`, ForgeError names the first overlong example (its entry
    in `locations`, such as FILE:LINE, else "example N"), its token count and how many are
    overlong. Raises ForgeError on an example with an empty completion.
    """
    if max_length < 2:
        raise ForgeError(f"invalid max_length {max_length}; it must be at least 2 tokens")
    if overlong not in OVERLONG_POLICIES:
        raise ForgeError(f"invalid --overlong {overlong!r}; use one of: {', '.join(OVERLONG_POLICIES)}")
    stats = stats if stats is not None else TokenizeStats()
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ForgeError("the tokenizer has no EOS token; training needs one to end completions")

    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=True)["input_ids"]
    completions = tokenizer([e.completion for e in examples], add_special_tokens=False)["input_ids"]

    tokenized = []
    overlong_lengths: dict[int, int] = {}
    for index, (prompt_ids, completion_ids) in enumerate(zip(prompts, completions)):
        if not examples[index].completion:
            raise ForgeError(f"example {index + 1}: empty completion; there is nothing to train on")
        if not completion_ids or completion_ids[-1] != eos:
            completion_ids = completion_ids + [eos]
        input_ids = prompt_ids + completion_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids

        stats.total += 1
        if len(input_ids) > max_length:
            overlong_lengths[index] = len(input_ids)
            stats.truncated += 1
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        # The first position is never a target: the model predicts token t from the tokens before it.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            stats.dropped += 1
            continue

        stats.tokens += len(input_ids)
        tokenized.append(TokenizedExample(input_ids, labels))

    if overlong == "reject" and overlong_lengths:
        _reject_overlong(overlong_lengths, len(examples), max_length, locations)
    if stats.truncated:
        logger.warning("%d of %d examples are longer than max_length=%d tokens and were truncated; "
                       "%d of them had no completion token left and were dropped",
                       stats.truncated, stats.total, max_length, stats.dropped)
    if not tokenized:
        raise ForgeError(f"none of the {stats.total} examples keeps a completion token within --max-length "
                         f"{max_length}, because the prompts fill it; raise --max-length")
    return tokenized


def _reject_overlong(lengths: Mapping[int, int], total: int, max_length: int,
                     locations: Sequence[str] | None) -> None:
    """Raise ForgeError on the first overlong example; `lengths` maps example indices to token counts."""
    first = min(lengths)
    location = locations[first] if locations is not None else f"example {first + 1}"
    raise ForgeError(f"{location}: the example is {lengths[first]} tokens long (prompt, completion and EOS), "
                     f"more than --max-length {max_length}; {len(lengths)} of {total} examples exceed it. "
                     "Raise --max-length, shorten or remove them, or pass --overlong truncate to cut them")


@dataclass
class Batch:
    """Right-padded tensors of one batch; `tokens` counts the non-padding tokens."""

    input_ids: Any
    attention_mask: Any
    labels: Any
    tokens: int


def collate(examples: Sequence[TokenizedExample], pad_token_id: int) -> Batch:
    """Pad examples on the right into one batch (padding labels are IGNORE_INDEX)."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        attention_mask[row, :length] = 1
    return Batch(input_ids, attention_mask, labels, int(attention_mask.sum()))


@dataclass
class PackedBatch:
    """A micro-batch packed into one row of real tokens: no padding reaches the linear layers.

    `position_ids` restart at 0 for each example. `labels` ignore each example's first token,
    which would otherwise be predicted from the previous example's last token. For attention,
    `segment_index[i, t]` is the row position of token t of example i and `segment_valid[i, t]`
    is True when example i has a token t; both have shape (examples, longest example).
    """

    input_ids: Any
    labels: Any
    position_ids: Any
    segment_index: Any
    segment_valid: Any
    tokens: int
    attention_mask: Any = None


def pack(examples: Sequence[TokenizedExample]) -> PackedBatch:
    """Concatenate examples into one row (batch dimension 1) with per-example positions and segments."""
    import torch

    lengths = [len(e.input_ids) for e in examples]
    input_ids = torch.tensor([[token for e in examples for token in e.input_ids]], dtype=torch.long)
    labels = torch.tensor([[label for e in examples for label in e.labels]], dtype=torch.long)
    starts = torch.tensor([0, *lengths[:-1]], dtype=torch.long).cumsum(0)
    labels[0, starts] = IGNORE_INDEX
    position_ids = torch.cat([torch.arange(length) for length in lengths]).unsqueeze(0)

    offsets = torch.arange(max(lengths))
    segment_valid = offsets.unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    segment_index = torch.where(segment_valid, starts.unsqueeze(1) + offsets, starts.unsqueeze(1))
    return PackedBatch(input_ids, labels, position_ids, segment_index, segment_valid, sum(lengths))


def batch_order(examples: Sequence[TokenizedExample], batch_size: int, *, seed: int = 0,
                group_size: int = 64) -> list[list[TokenizedExample]]:
    """Return one epoch of length-grouped batches of examples in a seeded random order.

    Examples are shuffled, then sorted by length inside windows of group_size batches, cut into
    batches, and the batch order is shuffled again. Padding waste stays small while batches
    remain random.
    """
    if batch_size < 1:
        raise ForgeError(f"invalid batch size {batch_size}; it must be at least 1")
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)

    window = batch_size * group_size
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: len(examples[i].input_ids))
        for offset in range(0, len(chunk), batch_size):
            batches.append([examples[i] for i in chunk[offset:offset + batch_size]])

    rng.shuffle(batches)
    return batches


def make_batches(examples: Sequence[TokenizedExample], batch_size: int, *, pad_token_id: int,
                 seed: int = 0, group_size: int = 64, packed: bool = False) -> list[Batch | PackedBatch]:
    """Return `batch_order`'s batches as padded tensors, or with `packed` as one PackedBatch row each.

    A packed and a padded epoch of the same seed train on the same examples in the same steps.
    """
    batches = batch_order(examples, batch_size, seed=seed, group_size=group_size)
    return [pack(batch) if packed else collate(batch, pad_token_id) for batch in batches]
