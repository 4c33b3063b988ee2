"""Tests of the shipped arithmetic demo data and its generator."""

from __future__ import annotations

import json
from pathlib import Path

from llmforge.data import read_records, resolve_data_path, to_examples
from llmforge.demo import generate

DEMO_DIR = Path(generate.__file__).parent / "arith"


def test_generator_reproduces_shipped_files(tmp_path):
    generate.main(["--output", str(tmp_path)])
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / name).read_bytes() == (DEMO_DIR / name).read_bytes(), name


def test_splits_are_disjoint_and_sized():
    train = read_records(resolve_data_path("demo:arith/train.jsonl"))
    test = read_records(resolve_data_path("demo:arith/test.jsonl"))
    assert len(train) == generate.TRAIN_SIZE
    assert len(test) == generate.TEST_SIZE
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert len({r["question"] for r in train}) == len(train)


def problem_key(question: str) -> tuple:
    """Return the kind and numbers of a demo question, which identify the problem."""
    numbers = tuple(int(word.strip(",.?")) for word in question.split() if word.strip(",.?").isdigit())
    if question.startswith("Each"):
        return ("multiply", *numbers)
    if "gave away" in question:
        return ("subtract", *numbers)
    if "buys" in question:
        return ("two-step", *numbers)
    return ("add", *numbers)


def test_problem_keys_are_disjoint():
    train, test = generate.generate()
    train_keys = {problem_key(r["question"]) for r in train}
    test_keys = {problem_key(r["question"]) for r in test}
    assert len(train_keys) == len(train)
    assert len(test_keys) == len(test)
    assert not train_keys & test_keys


def test_records_have_the_fixed_format():
    for line in (DEMO_DIR / "test.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        assert set(record) == {"question", "answer"}
        assert record["answer"].lstrip("-").isdigit()
        assert str(int(record["answer"])) == record["answer"]


def test_answers_are_correct():
    train, test = generate.generate(train_size=300, test_size=0)
    for record in train:
        question = record["question"]
        kind, *numbers = problem_key(question)
        if kind == "multiply":
            expected = numbers[0] * numbers[1]
        elif kind == "subtract":
            expected = numbers[0] - numbers[1]
        elif kind == "two-step":
            expected = numbers[0] + numbers[1] - numbers[2]
        else:
            expected = numbers[0] + numbers[1]
        assert record["answer"] == str(expected), question


def test_demo_prompt_and_completion():
    [example] = to_examples([{"question": "Each box holds 3 pens. How many pens are in 4 boxes?", "answer": "12"}])
    assert example.prompt == "Question: Each box holds 3 pens. How many pens are in 4 boxes?\nAnswer:"
    assert example.completion == " 12"
