"""forge eval scorers checked against slow one-example-at-a-time references on the tiny model."""

from __future__ import annotations

import math

import pytest

from llmforge.errors import ForgeError
from llmforge_eval.generation import (
    answers_match,
    extract_answer,
    generate_greedy,
    normalize_answer,
    score_generate,
    truncate_at_stop,
)
from llmforge_eval.multiple_choice import continuation_loglikelihoods
from llmforge_eval.perplexity import rolling_windows, score_perplexity
from llmforge_eval.report import _task_result, wilson_interval
from llmforge_eval.tasks import parse_spec, render_references


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from llmforge.models import load_model

    return load_model(str(tiny_model_dir), dtype="float32")


def reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Log-likelihood of one continuation from a single unpadded forward pass."""
    import torch

    context_ids = tokenizer(context)["input_ids"]
    continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.inference_mode():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    total = 0.0
    for offset, token in enumerate(continuation_ids):
        position = len(context_ids) + offset
        total += log_probs[position - 1, token].item()
    return total


def reference_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy decoding one token at a time with a full forward pass per step (no cache, no padding)."""
    import torch

    ids = tokenizer(prompt)["input_ids"]
    new_tokens = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + new_tokens])).logits[0, -1]
            token = int(logits.argmax())
            if token == tokenizer.eos_token_id:
                break
            new_tokens.append(token)
    return tokenizer.decode(new_tokens, skip_special_tokens=True)


PAIRS = [
    ("Question: What is the capital of France?\nAnswer:", " Paris"),
    ("Question: What is the capital of France?\nAnswer:", " the city of Berlin in Germany"),
    ("A much longer context that goes on for a while, so that padding matters in the batch.", " yes"),
    ("Short", " no"),
    ("Review: a charming and often affecting journey\nSentiment:", " positive"),
]


def test_loglikelihoods_match_reference(tiny):
    batched = continuation_loglikelihoods(tiny.model, tiny.tokenizer, PAIRS, batch_size=3)
    for (context, continuation), value in zip(PAIRS, batched):
        expected = reference_loglikelihood(tiny.model, tiny.tokenizer, context, continuation)
        assert value == pytest.approx(expected, abs=1e-4, rel=1e-5)


def test_loglikelihoods_independent_of_batch_size(tiny):
    singles = continuation_loglikelihoods(tiny.model, tiny.tokenizer, PAIRS, batch_size=1)
    batched = continuation_loglikelihoods(tiny.model, tiny.tokenizer, PAIRS, batch_size=5)
    assert singles == pytest.approx(batched, abs=1e-4)


PROMPTS = [
    "Question: 2 + 2 =\nAnswer:",
    "Question: A farmer has 17 sheep and buys 5 more. How many sheep are there now?\nAnswer:",
    "Hello",
    "The quick brown fox jumps over the lazy dog, and then",
]


def test_batched_generation_matches_one_by_one(tiny):
    batched = generate_greedy(tiny.model, tiny.tokenizer, PROMPTS, max_new_tokens=8, stop=[], batch_size=4)
    for prompt, text in zip(PROMPTS, batched):
        assert text == reference_greedy(tiny.model, tiny.tokenizer, prompt, 8)


def test_generation_cut_at_stop_sequence(tiny):
    unstopped = generate_greedy(tiny.model, tiny.tokenizer, PROMPTS, max_new_tokens=8, stop=[], batch_size=4)
    stop = [unstopped[1][2:4]] if len(unstopped[1]) >= 4 else ["\n"]
    stopped = generate_greedy(tiny.model, tiny.tokenizer, PROMPTS, max_new_tokens=8, stop=stop, batch_size=4)
    for full, cut in zip(unstopped, stopped):
        assert cut == truncate_at_stop(full, stop)
        assert stop[0] not in cut


def test_rolling_windows_score_each_token_once():
    for total, max_length, stride in [(10, 4, 2), (100, 16, 16), (17, 8, 3), (5, 16, 8), (2, 4, 1)]:
        windows = rolling_windows(total, max_length, stride)
        scored_positions = []
        for begin, end, scored in windows:
            assert end - begin <= max_length
            assert 0 < scored <= end - begin - (1 if begin == 0 else 0)
            scored_positions.extend(range(end - scored, end))
        assert scored_positions == list(range(1, total))


def _perplexity_spec(tmp_path, max_length: int, stride: int):
    path = tmp_path / "text.txt"
    path.write_text("The cat sat on the mat.\r\nIt was a sunny day, and the birds sang in the trees. " * 3)
    spec = parse_spec({"name": "ppl", "kind": "perplexity", "data": str(path), "max_length": max_length,
                       "stride": stride})
    return spec, path


def test_perplexity_single_window_equals_direct(tiny, tmp_path):
    import torch

    spec, path = _perplexity_spec(tmp_path, max_length=256, stride=256)
    result = score_perplexity(tiny.model, tiny.tokenizer, spec, path, batch_size=4, limit=None)

    text = path.read_text().replace("\r\n", "\n")
    ids = torch.tensor([tiny.tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        loss = torch.nn.functional.cross_entropy(tiny.model(input_ids=ids).logits[0, :-1].float(), ids[0, 1:])
    assert result["score"] == pytest.approx(math.exp(loss.item()), rel=1e-4)
    assert result["metrics"]["tokens"] == ids.shape[1] - 1
    assert result["stderr"] is None


def test_perplexity_rolling_equals_per_window_loop(tiny, tmp_path):
    import torch

    spec, path = _perplexity_spec(tmp_path, max_length=16, stride=8)
    result = score_perplexity(tiny.model, tiny.tokenizer, spec, path, batch_size=3, limit=None)

    text = path.read_text().replace("\r\n", "\n")
    ids = tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
    total, count = 0.0, 0
    with torch.inference_mode():
        for begin, end, scored in rolling_windows(len(ids), 16, 8):
            window = torch.tensor([ids[begin:end]])
            losses = torch.nn.functional.cross_entropy(tiny.model(input_ids=window).logits[0, :-1], window[0, 1:],
                                                       reduction="none")
            total += losses[-scored:].sum().item()
            count += scored
    assert result["metrics"]["tokens"] == count
    assert result["score"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert result["stderr"] > 0
    assert result["metrics"]["bits_per_byte"] > 0


def test_perplexity_limit_caps_windows(tiny, tmp_path):
    spec, path = _perplexity_spec(tmp_path, max_length=16, stride=8)
    result = score_perplexity(tiny.model, tiny.tokenizer, spec, path, batch_size=3, limit=2)
    assert result["n"] == 2
    assert result["metrics"]["tokens"] == 15 + 8


@pytest.mark.parametrize(
    ("text", "extractor", "expected"),
    [
        (" The answer is 1,234.", "last_number", "1234"),
        (" -3.5 apples and 7 pears", "last_number", "7"),
        (" x = -12", "last_number", "-12"),
        (" costs .5 dollars", "last_number", ".5"),
        (" no digits here", "last_number", ""),
        ("Step one\n#### 42", "regex:####\\s*(\\S+)", "42"),
        ("answer: B", "regex:[A-D]$", "B"),
        ("nothing", "regex:(\\d+)", ""),
        ("\n\n first line \nsecond", "first_line", "first line"),
        ("  padded  ", "none", "padded"),
    ],
)
def test_extract_answer_cases(text, extractor, expected):
    assert extract_answer(text, extractor) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "metric", "expected"),
    [
        ("15", "15", "numeric_match", True),
        ("15.0", "15", "numeric_match", True),
        ("1000", "1,000", "numeric_match", True),
        ("$18", "18", "numeric_match", True),
        ("14", "15", "numeric_match", False),
        ("", "15", "numeric_match", False),
        ("Paris", "Paris", "exact_match", True),
        ("paris", "Paris", "exact_match", False),
    ],
)
def test_answers_match_cases(prediction, reference, metric, expected):
    assert answers_match(prediction, reference, metric) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Beatles", "beatles"),
        ("  an  Apple, a day!  ", "apple day"),
        ("Nineteen Eighty-Four.", "nineteen eightyfour"),
        ("theory of the atom", "theory of atom"),
        ("A", ""),
    ],
)
def test_squad_normalization_cases(text, expected):
    assert normalize_answer(text, "squad") == expected


def test_normalization_none_keeps_case():
    assert normalize_answer("  The Beatles ", "none") == "The Beatles"


@pytest.mark.parametrize(
    ("prediction", "references", "metric", "normalization", "expected"),
    [
        ("1984", ["Nineteen Eighty-Four", "1984"], "exact_match", "none", True),
        ("nineteen eighty-four", ["Nineteen Eighty-Four", "1984"], "exact_match", "squad", True),
        ("nineteen eighty-four", ["Nineteen Eighty-Four", "1984"], "exact_match", "none", False),
        ("the Beatles.", ["Beatles"], "exact_match", "squad", True),
        ("1985", ["Nineteen Eighty-Four", "1984"], "exact_match", "squad", False),
        ("1,984", ["1984", "1984.0"], "numeric_match", "none", True),
        ("12", ["1984", "1984.0"], "numeric_match", "none", False),
    ],
)
def test_answers_match_any_reference(prediction, references, metric, normalization, expected):
    assert answers_match(prediction, references, metric, normalization) is expected


def test_list_reference_renders_each_answer():
    record = {"answer": ["1984", "Nineteen Eighty-Four"], "year": 1984}
    assert render_references("{answer}", record, "t") == ["1984", "Nineteen Eighty-Four"]
    assert render_references("{year}", record, "t") == ["1984"]
    assert render_references("year {year}", record, "t") == ["year 1984"]
    with pytest.raises(ForgeError, match="Invalid reference list"):
        render_references("{answer}", {"answer": []}, "t")


@pytest.mark.parametrize(
    ("change", "message"),
    [({"normalize": "lower"}, "Invalid normalize 'lower'"),
     ({"normalize": "squad", "metric": "numeric_match"}, "applies to exact_match only")],
)
def test_normalize_field_validated(change, message):
    raw = {"name": "t", "kind": "generate", "data": "x.jsonl", "prompt": "{q}", "reference": "{a}", **change}
    with pytest.raises(ForgeError, match=message):
        parse_spec(raw)


def test_generate_accepts_any_listed_answer(tiny, tmp_path):
    from llmforge_eval.evaluate import task_registry

    spec = task_registry()["nq_open"]
    questions = ["who wrote the novel about big brother", "what is the capital of atlantis"]
    prompts = [spec.prompt.format(question=question) for question in questions]
    outputs = generate_greedy(tiny.model, tiny.tokenizer, prompts, max_new_tokens=spec.max_new_tokens,
                              stop=spec.stop, batch_size=2)
    first = extract_answer(outputs[0], spec.extract)
    # str.upper is not reversible for every character ("ß" becomes "SS"), so such an output keeps its case.
    shouted = first.upper() if first.upper().lower() == first.lower() else first
    # The second answer differs from the output only by case, an article and punctuation.
    records = [{"question": questions[0], "answer": ["no such answer", f"The {shouted}."]},
               {"question": questions[1], "answer": ["no such answer"]}]

    result = score_generate(tiny.model, tiny.tokenizer, spec, records, batch_size=2)
    assert result["score"] == 0.5
    assert result["samples"][0]["reference"] == ["no such answer", f"The {shouted}."]
    assert result["samples"][1]["reference"] == "no such answer"


def test_wilson_interval_small_n():
    low, high = wilson_interval(0.2, 5)
    assert low == pytest.approx(0.0362, abs=1e-4)
    assert high == pytest.approx(0.6245, abs=1e-4)
    assert wilson_interval(0.0, 5)[0] == 0.0
    assert wilson_interval(1.0, 5)[1] == 1.0


def test_proportion_interval_stays_in_unit_range():
    for score, n in [(0.2, 5), (0.0, 3), (1.0, 4), (0.5, 1), (0.9, 10)]:
        result = {"metric": "acc", "score": score, "stderr": math.sqrt(score * (1 - score) / n), "n": n}
        entry = _task_result(result, "general", None)
        assert entry["ci95_method"] == "wilson"
        assert 0.0 <= entry["ci95"][0] <= score <= entry["ci95"][1] <= 1.0
        assert entry["stderr"] == result["stderr"]


def test_perplexity_interval_is_normal():
    result = {"metric": "perplexity", "score": 20.0, "stderr": 2.0, "n": 8}
    entry = _task_result(result, "general", None)
    assert entry["ci95_method"] == "normal"
    assert entry["ci95"] == pytest.approx([20.0 - 1.959964 * 2.0, 20.0 + 1.959964 * 2.0])


def test_shared_context_scores_equal_pairwise(tiny):
    from llmforge_eval.multiple_choice import ChoiceExample, shared_context_loglikelihoods

    examples = [ChoiceExample("Question: what is two plus two?\nAnswer:", (" four", " five", " a large number"), 0),
                ChoiceExample("The sky is", (" blue", " green"), 0),
                ChoiceExample("Pick one", (" x", " y y y y", " z z"), 2)]
    pairs = [(example.context, text) for example in examples for text in example.continuations]

    pairwise = continuation_loglikelihoods(tiny.model, tiny.tokenizer, pairs, batch_size=1)
    shared = shared_context_loglikelihoods(tiny.model, tiny.tokenizer, examples, batch_size=2)

    flat = [score for scores in shared for score in scores]
    assert [len(scores) for scores in shared] == [3, 2, 3]
    assert flat == pytest.approx(pairwise, rel=1e-4, abs=1e-4)


# Report statistics and the Pareto frontier, against values computed by hand.


@pytest.mark.parametrize(
    ("p1", "n1", "p2", "n2", "z", "p_value"),
    [
        # pooled p = 0.55, SE = sqrt(0.55 * 0.45 * (1/100 + 1/100)) = 0.0703562, z = 0.1 / SE
        (0.6, 100, 0.5, 100, 1.4213381, 0.1552185),
        # pooled p = (15 + 75) / 200 = 0.45, SE = sqrt(0.2475 * (1/50 + 1/150)) = 0.0812404
        (0.3, 50, 0.5, 150, -2.4618298, 0.0138230),
        (0.0, 10, 0.0, 20, 0.0, 1.0),
        (1.0, 10, 1.0, 10, 0.0, 1.0),
    ],
)
def test_two_proportion_z_test_by_hand(p1, n1, p2, n2, z, p_value):
    from llmforge_eval.report import two_proportion_z_test

    got_z, got_p = two_proportion_z_test(p1, n1, p2, n2)
    assert got_z == pytest.approx(z, abs=1e-6)
    assert got_p == pytest.approx(p_value, abs=1e-6)


def test_mean_and_difference_stderr_by_hand():
    from llmforge_eval.report import difference_stderr, mean_stderr

    # sqrt(0.03^2 + 0.04^2) = 0.05, divided by 2 tasks
    assert mean_stderr([0.03, 0.04]) == pytest.approx(0.025)
    assert mean_stderr([0.05]) == pytest.approx(0.05)
    assert mean_stderr([]) is None
    assert mean_stderr([0.03, None]) is None
    assert difference_stderr(0.03, 0.04) == pytest.approx(0.05)
    assert difference_stderr(None, 0.04) is None


def test_pareto_frontier_hand_example():
    from llmforge_eval.pareto import pareto_frontier

    points = [
        (0.5, 0.5),  # on the frontier
        (0.6, 0.4),  # on the frontier: best general score
        (0.4, 0.4),  # dominated by (0.5, 0.5)
        (0.5, 0.5),  # equal to the first point, which does not dominate it
        (0.6, 0.3),  # dominated by (0.6, 0.4): same general score, lower target score
        (0.2, 0.7),  # on the frontier: best target score
    ]
    assert pareto_frontier(points) == [True, True, False, True, False, True]
    assert pareto_frontier([]) == []
    assert pareto_frontier([(0.1, 0.1)]) == [True]


def report_fixture(tmp_path):
    """Two hand-written model entries (baseline and tuned) on an accuracy target, two accuracies and a perplexity."""
    from llmforge_eval.evaluate import SelectedTask

    data = tmp_path / "data.txt"
    data.write_text("x")
    specs = [("math", "target", {"kind": "generate", "prompt": "{q}", "reference": "{a}"}),
             ("quiz", "general", {"kind": "multiple_choice", "prompt": "{q}", "choices": ["a", "b"], "answer": "a"}),
             ("trivia", "general", {"kind": "multiple_choice", "prompt": "{q}", "choices": ["a", "b"], "answer": "a"}),
             ("wiki", "general", {"kind": "perplexity"})]
    tasks = [SelectedTask(parse_spec({"name": name, "data": str(data), **fields}), role, data, f"sha256:{name}")
             for name, role, fields in specs]

    def result(metric, score, stderr, n, higher=True):
        return {"metric": metric, "score": score, "stderr": stderr, "n": n, "higher_is_better": higher, "cached": False}

    entries = {
        "base": {"reference": "base", "digest": "sha256:base", "tasks": {
            "math": result("numeric_match", 0.5, 0.05, 100), "quiz": result("acc", 0.6, 0.03, 200),
            "trivia": result("acc", 0.8, 0.04, 100), "wiki": result("perplexity", 20.0, 0.5, 10, higher=False)}},
        "tuned": {"reference": "tuned", "digest": "sha256:tuned", "tasks": {
            "math": result("numeric_match", 0.6, 0.04, 100), "quiz": result("acc", 0.5, 0.035, 200),
            "trivia": result("acc", 0.7, 0.045, 100), "wiki": result("perplexity", 22.0, 0.6, 10, higher=False)}},
    }
    return tasks, entries


def test_report_deltas_tests_and_pareto(tmp_path):
    from llmforge_eval.report import build_report

    tasks, entries = report_fixture(tmp_path)
    report = build_report(tasks, entries, ["tuned"], "base", {"seed": 0})
    base, tuned = report["results"]

    assert tuned["tasks"]["math"]["delta"] == pytest.approx(0.1)
    assert tuned["tasks"]["math"]["delta_stderr"] == pytest.approx(math.sqrt(0.05**2 + 0.04**2))
    assert tuned["tasks"]["math"]["test"]["z"] == pytest.approx(1.4213381, abs=1e-6)
    assert tuned["tasks"]["math"]["test"]["p_value"] == pytest.approx(0.1552185, abs=1e-6)
    assert tuned["tasks"]["wiki"]["test"]["name"] is None
    assert "paired test" in tuned["tasks"]["wiki"]["test"]["note"]
    assert "test" not in base["tasks"]["math"]

    # general = mean(0.6, 0.8) = 0.7 with SE sqrt(0.03^2 + 0.04^2) / 2 = 0.025; perplexity stays out.
    assert base["summary"]["general_score"] == pytest.approx(0.7)
    assert base["summary"]["general_stderr"] == pytest.approx(0.025)
    assert base["summary"]["excluded_from_mean"] == ["wiki"]
    assert tuned["summary"]["general_score"] == pytest.approx(0.6)
    assert tuned["summary"]["general_delta"] == pytest.approx(-0.1)
    tuned_stderr = math.sqrt(0.035**2 + 0.045**2) / 2
    assert tuned["summary"]["general_stderr"] == pytest.approx(tuned_stderr)
    assert tuned["summary"]["general_delta_stderr"] == pytest.approx(math.sqrt(tuned_stderr**2 + 0.025**2))
    assert tuned["summary"]["target_delta"] == pytest.approx(0.1)

    # base (0.7, 0.5) and tuned (0.6, 0.6): neither dominates the other.
    assert [point["on_frontier"] for point in report["pareto"]["points"]] == [True, True]
    assert report["schema"] == "llmforge.eval/2"


def test_report_table_marks_frontier(tmp_path):
    from llmforge_eval.report import build_report, format_table

    tasks, entries = report_fixture(tmp_path)
    entries["tuned"]["tasks"]["math"]["score"] = 0.4
    report = build_report(tasks, entries, ["tuned"], "base", {"seed": 0})
    assert [point["on_frontier"] for point in report["pareto"]["points"]] == [True, False]

    summary_rows = {line.split()[0]: line for line in format_table(report).splitlines()[-6:] if line.strip()}
    assert summary_rows["base"].rstrip().endswith("*")
    assert not summary_rows["tuned"].rstrip().endswith("*")
    assert "+1.42" not in format_table(report)
    assert "-1.42" in format_table(report)


def test_pareto_plot_is_png(tmp_path):
    from llmforge_eval.pareto import write_pareto_plot

    pareto = {"points": [
        {"reference": "/runs/base", "is_baseline": True, "general_score": 0.7, "target_score": 0.5, "on_frontier": True},
        {"reference": "/runs/lora/", "is_baseline": False, "general_score": 0.6, "target_score": 0.6, "on_frontier": True},
        {"reference": "/runs/oft", "is_baseline": False, "general_score": 0.5, "target_score": 0.5, "on_frontier": False},
    ]}
    path = write_pareto_plot(pareto, tmp_path / "pareto.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [item.name for item in tmp_path.iterdir()] == ["pareto.png"]
