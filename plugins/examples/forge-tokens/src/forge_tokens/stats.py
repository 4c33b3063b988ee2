"""Token statistics of a data set for a model's tokenizer, cached in forge's shared cache.

The examples are built and tokenized by the core functions that `forge finetune` uses
(`llmforge.data.to_examples` and `tokenize_examples`), so an example's length is the length
that training uses: the prompt with the tokenizer's special tokens, the completion, and EOS.
Unknown tokens are counted in the prompt and completion text alone, because some tokenizers
(GPT-2's) use one token as both the unknown and the EOS token.

The statistics depend only on the data file's content, the tokenizer files and the settings,
so the cache key is built from those digests. A repeated request reads the cached document
without importing transformers.
"""

from __future__ import annotations

import hashlib
import logging
import math
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from llmforge.cache import Cache, CacheKey
from llmforge.errors import ForgeError

SCHEMA = "forge-tokens.stats/1"
CACHE_KIND = "forge-tokens.stats"
# Bump when the counting changes, so that statistics cached by an older version are not reused.
STATS_VERSION = 1
# The files AutoTokenizer may read from a model directory (config.json can name the tokenizer
# class). Sentencepiece models (*.model) are matched by suffix.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "config.json")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenCountRequest:
    """The model whose tokenizer counts, the data file, and the forge finetune options that shape examples."""

    model: str
    data: str
    fmt: str = "auto"
    prompt_template: str | None = None
    completion_template: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    max_length: int = 256
    limit: int | None = None
    top: int = 10

    def check(self) -> None:
        """Raise ForgeError on an option value that cannot work, before any file is read."""
        if self.max_length < 1:
            raise ForgeError(f"invalid --max-length {self.max_length}; it must be at least 1 token")
        if self.limit is not None and self.limit < 1:
            raise ForgeError(f"invalid --limit {self.limit}; count at least 1 record, or leave --limit out")
        if self.top < 0:
            raise ForgeError(f"invalid --top {self.top}; use 0 to list no unknown spans, or a positive number")

    def cache_params(self) -> dict[str, Any]:
        """Return the settings that change the statistics, as the cache key's parameters."""
        return {
            "version": STATS_VERSION,
            "format": self.fmt,
            "prompt_template": self.prompt_template,
            "completion_template": self.completion_template,
            "columns": dict(sorted(self.columns.items())),
            "max_length": self.max_length,
            "limit": self.limit,
            "top": self.top,
        }


def tokenizer_digest(directory: Path, cache: Cache) -> str:
    """Return ``sha256:<hex>`` over the names and contents of the tokenizer files in an HF model directory."""
    from llmforge.models import cached_file_digest

    names = sorted(path.name for path in directory.iterdir()
                   if path.is_file() and (path.name in TOKENIZER_FILES or path.suffix == ".model"))
    if not any(name != "config.json" for name in names):
        raise ForgeError(f"the model directory {directory} has no tokenizer files (such as tokenizer.json); "
                         "save the tokenizer into it with tokenizer.save_pretrained")

    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}|{cached_file_digest(directory / name, cache)}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def count_tokens(request: TokenCountRequest, *, cache: Cache | None = None, use_cache: bool = True) -> dict[str, Any]:
    """Return the statistics document of `request`, from the cache when an earlier run stored it.

    The data file is read and checked first, so a malformed record fails before a model is
    resolved. `use_cache=False` neither reads nor writes cached statistics.
    """
    from llmforge.data import read_records, resolve_data_path
    from llmforge.models import cached_file_digest, resolve_model_dir, stored_reference

    request.check()
    cache = cache or Cache()
    path = resolve_data_path(request.data)
    records = read_records(path).head(request.limit)
    logger.info("read %d records from %s", len(records), path)

    model_dir = resolve_model_dir(request.model, cache=cache)
    inputs = {"data": cached_file_digest(path, cache), "tokenizer": tokenizer_digest(model_dir, cache)}
    key = CacheKey(CACHE_KIND, inputs, request.cache_params())

    counts = cache.lookup_json(key) if use_cache else None
    cached = counts is not None
    if cached:
        logger.info("statistics read from the cache (key %s)", key.digest[:12])
    elif use_cache:
        counts = cache.get_or_compute_json(key, lambda: compute_counts(request, records, cache))
    else:
        counts = compute_counts(request, records, cache)

    longest = counts["longest"]
    return {
        "schema": SCHEMA,
        "model": stored_reference(request.model),
        "data": str(path),
        "format": request.fmt,
        "limit": request.limit,
        "records": len(records),
        "cached": cached,
        **counts,
        "longest": {**longest, "where": records.where(longest["index"])},
    }


def compute_counts(request: TokenCountRequest, records: Sequence[dict], cache: Cache) -> dict[str, Any]:
    """Tokenize the records as forge finetune does, without truncation, and summarise the lengths."""
    from llmforge.data import IGNORE_INDEX, to_examples, tokenize_examples
    from llmforge.models import load_tokenizer

    logger.info("loading the tokenizer of %s", request.model)
    tokenizer = load_tokenizer(request.model, cache=cache)
    examples = to_examples(records, tokenizer, fmt=request.fmt, columns=request.columns,
                           prompt_template=request.prompt_template, completion_template=request.completion_template)

    # No example is longer than sys.maxsize tokens, so none is truncated or dropped and each length is complete.
    tokenized = tokenize_examples(examples, tokenizer, max_length=sys.maxsize)
    lengths = [len(example.input_ids) for example in tokenized]
    prompt_tokens = sum(example.labels.count(IGNORE_INDEX) for example in tokenized)
    longest = max(range(len(lengths)), key=lengths.__getitem__)

    texts = [example.prompt for example in examples] + [example.completion for example in examples]
    text_tokens, unknown = _unknown_tokens(texts, len(examples), tokenizer, request.top)
    characters = sum(len(text) for text in texts)
    return {
        "examples": len(tokenized),
        "tokens": {"total": sum(lengths), "prompt": prompt_tokens, "completion": sum(lengths) - prompt_tokens,
                   "text": text_tokens},
        "length": _length_summary(lengths),
        "max_length": request.max_length,
        "over_max_length": sum(length > request.max_length for length in lengths),
        "longest": {"index": longest, "tokens": lengths[longest]},
        "characters_per_token": round(characters / text_tokens, 4) if text_tokens else None,
        "unknown": unknown,
    }


def _length_summary(lengths: Sequence[int]) -> dict[str, Any]:
    ordered = sorted(lengths)
    # The nearest-rank percentile: the smallest length that at least 95% of the examples do not exceed.
    p95 = ordered[math.ceil(0.95 * len(ordered)) - 1]
    return {"min": ordered[0], "max": ordered[-1], "mean": round(statistics.fmean(ordered), 4),
            "median": statistics.median(ordered), "p95": p95}


def _unknown_tokens(texts: list[str], example_count: int, tokenizer, top: int) -> tuple[int, dict[str, Any]]:
    """Return the token count of `texts` (no special tokens added) and the unknown-token summary.

    `texts` contains every example's prompt, then every example's completion. The most frequent
    source spans of unknown tokens come from the offset mapping, which only fast tokenizers have.
    """
    unknown_id = tokenizer.unk_token_id
    with_offsets = unknown_id is not None and bool(getattr(tokenizer, "is_fast", False))
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=with_offsets)
    text_tokens = sum(len(ids) for ids in encoded["input_ids"])
    if unknown_id is None:
        return text_tokens, {"token": None, "count": None, "rate": None, "examples": None, "top": []}

    spans: Counter[str] = Counter()
    count, affected = 0, set()
    for index, ids in enumerate(encoded["input_ids"]):
        positions = [position for position, token in enumerate(ids) if token == unknown_id]
        if not positions:
            continue
        count += len(positions)
        affected.add(index % example_count)
        for position in positions if with_offsets else ():
            start, end = encoded["offset_mapping"][index][position]
            spans[texts[index][start:end]] += 1

    ranked = sorted(spans.items(), key=lambda item: (-item[1], item[0]))[:top]
    return text_tokens, {
        "token": tokenizer.unk_token,
        "count": count,
        "rate": round(count / text_tokens, 6) if text_tokens else 0.0,
        "examples": len(affected),
        "top": [{"text": text, "count": number} for text, number in ranked],
    }
