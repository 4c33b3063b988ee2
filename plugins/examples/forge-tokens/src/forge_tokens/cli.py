"""The `forge tokens` command: a thin click layer over `forge_tokens.stats.count_tokens`.

Imported only when forge calls the plugin's `forge_commands` hook; torch and transformers load
later, inside the command, and only when the statistics are not cached.
"""

from __future__ import annotations

import logging

import click

from llmforge.cli import parse_columns, print_json, silence_progress_bars, unescape_template
from llmforge.data import EXAMPLE_FORMATS


@click.command(name="tokens")
@click.option("--model", required=True, metavar="REF",
              help="Model whose tokenizer counts: a built-in name, HF directory, .gguf file or PEFT adapter directory.")
@click.option("--data", required=True, metavar="FILE",
              help="Data set: a .jsonl/.json/.csv/.tsv/.txt file, or demo:NAME.")
@click.option("--format", "fmt", type=click.Choice(EXAMPLE_FORMATS), default="auto", show_default=True,
              help="Record format, as in forge finetune; auto detects it from the field names.")
@click.option("--prompt-template", callback=unescape_template,
              help='Prompt built from record fields, e.g. "Question: {question}\\nAnswer:" (\\n and \\t are unescaped).')
@click.option("--completion-template", callback=unescape_template,
              help='Completion built from record fields, e.g. " {answer}".')
@click.option("--column", "columns", multiple=True, metavar="FIELD=NAME",
              help="Read the format's FIELD from the record field NAME, e.g. prompt=question (repeatable).")
@click.option("--max-length", type=int, default=256, show_default=True,
              help="Count the examples longer than this many tokens (forge finetune's --max-length).")
@click.option("--limit", type=int, help="Count only the first N records of the data file.")
@click.option("--top", type=int, default=10, show_default=True,
              help="How many of the most frequent text spans that became unknown tokens to list.")
@click.option("--no-cache", is_flag=True, help="Recount; neither read nor write cached statistics.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON document (schema forge-tokens.stats/1) instead of the table.")
@click.option("--quiet", is_flag=True, help="No progress bars or log lines on stderr.")
def tokens_command(model, data, fmt, prompt_template, completion_template, columns, max_length, limit, top,
                   no_cache, as_json, quiet):
    """Count the tokens of a data set for a model's tokenizer, as forge finetune tokenizes it.

    Each record becomes a prompt and a completion with forge finetune's format options. An
    example's length counts the prompt with the tokenizer's special tokens, the completion and
    EOS. The report gives the total, prompt and completion tokens, the length distribution, the
    examples longer than --max-length, characters per token, and the unknown tokens with the
    text spans that produced them. Results are cached per data content, tokenizer and settings.

    \b
    forge tokens --model smollm2-135m --data demo:arith/train.jsonl
    forge tokens --model ./my-model --data train.jsonl --column prompt=question --max-length 512 --json
    """
    from forge_tokens.stats import TokenCountRequest, count_tokens

    if quiet:
        silence_progress_bars()
    else:
        logging.basicConfig(level=logging.INFO, format="forge tokens: %(message)s")

    request = TokenCountRequest(model=model, data=data, fmt=fmt, prompt_template=prompt_template,
                                completion_template=completion_template, columns=parse_columns(columns),
                                max_length=max_length, limit=limit, top=top)
    document = count_tokens(request, use_cache=not no_cache)
    if as_json:
        print_json(document)
    else:
        print_table(document)


def print_table(document: dict) -> None:
    """Print the statistics as aligned lines on stdout."""
    tokens, length, unknown = document["tokens"], document["length"], document["unknown"]
    rows = [
        ("model", document["model"]),
        ("data", f"{document['data']} ({document['records']} records, format {document['format']})"),
        ("tokens", f"{tokens['total']} (prompt {tokens['prompt']}, completion {tokens['completion']}, "
                   "special tokens and EOS included)"),
        ("per example", f"min {length['min']}, median {length['median']}, mean {length['mean']}, "
                        f"p95 {length['p95']}, max {length['max']}"),
        ("longest", f"{document['longest']['tokens']} tokens at {document['longest']['where']}"),
        (f"over {document['max_length']}", f"{document['over_max_length']} examples"),
        ("chars/token", document["characters_per_token"]),
    ]
    if unknown["token"] is None:
        rows.append(("unknown", "the tokenizer has no unknown token"))
    else:
        rows.append(("unknown", f"{unknown['count']} tokens {unknown['token']} in {unknown['examples']} examples "
                                f"(rate {unknown['rate']})"))
        if unknown["top"]:
            rows.append(("top unknown", ", ".join(f"{span['text']!r} ({span['count']})" for span in unknown["top"])))
    if document["cached"]:
        rows.append(("cached", "yes (--no-cache recounts)"))

    for label, value in rows:
        click.echo(f"{label:<12} {value}")
