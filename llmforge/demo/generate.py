"""Generate the arithmetic word-problem demo task: `python -m llmforge.demo.generate`.

Writes arith/train.jsonl and arith/test.jsonl beside this file. Each record is
{"question": "...", "answer": "68"} (the answer is an integer as a string); the
fine-tuning and evaluation prompt is "Question: {question}\\nAnswer:" with the completion
" {answer}". The output depends only on SEED, so a rerun rewrites identical files, and no
problem (kind and numbers) appears in both splits.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20240
TRAIN_SIZE = 2000
TEST_SIZE = 200

NAMES = ["Ava", "Ben", "Carla", "Dev", "Elena", "Felix", "Grace", "Hugo", "Iris", "Jonas",
         "Kira", "Liam", "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq"]
ITEMS = ["apples", "books", "marbles", "stickers", "pencils", "coins", "shells", "cards",
         "cookies", "stamps", "balloons", "candles"]
CONTAINERS = {"box": "boxes", "bag": "bags", "jar": "jars", "basket": "baskets", "crate": "crates",
              "shelf": "shelves"}


def make_problem(rng: random.Random) -> tuple[tuple, str, int]:
    """Draw one problem: (kind and numbers, question text, answer)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.choice(["add", "subtract", "multiply", "two-step"])

    if kind == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        question = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        return (kind, a, b), question, a + b

    if kind == "subtract":
        a = rng.randint(30, 99)
        b = rng.randint(10, a - 5)
        question = f"{name} had {a} {item} and gave away {b}. How many {item} are left?"
        return (kind, a, b), question, a - b

    if kind == "multiply":
        a, b = rng.randint(3, 12), rng.randint(3, 12)
        container = rng.choice(sorted(CONTAINERS))
        question = f"Each {container} holds {a} {item}. How many {item} are in {b} {CONTAINERS[container]}?"
        return (kind, a, b), question, a * b

    a, b = rng.randint(10, 60), rng.randint(10, 40)
    c = rng.randint(5, a + b - 5)
    question = (f"{name} has {a} {item}, buys {b} more and then gives {c} to a friend. "
                f"How many {item} does {name} have now?")
    return (kind, a, b, c), question, a + b - c


def generate(train_size: int = TRAIN_SIZE, test_size: int = TEST_SIZE, seed: int = SEED) -> tuple[list, list]:
    """Return (train, test) record lists with no problem in both."""
    rng = random.Random(seed)
    seen: set[tuple] = set()
    records = []
    while len(records) < train_size + test_size:
        key, question, answer = make_problem(rng)
        if key in seen:
            continue
        seen.add(key)
        records.append({"question": question, "answer": str(answer)})
    return records[test_size:], records[:test_size]


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write records one JSON object per line, with a trailing newline."""
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    """Rewrite the demo files (by default the ones shipped in the package)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "arith",
                        help="directory for train.jsonl and test.jsonl (default: the package copy)")
    args = parser.parse_args(argv)

    train, test = generate()
    args.output.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.output / "train.jsonl", train)
    write_jsonl(args.output / "test.jsonl", test)
    print(f"wrote {len(train)} training and {len(test)} test problems to {args.output}")


if __name__ == "__main__":
    main()
