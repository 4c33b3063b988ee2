"""forge eval end to end on the tiny model: specs, the cache, baselines, the report and the installed script."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmforge.cli import cli
from llmforge_eval.evaluate import evaluate
from llmforge_eval.tasks import parse_spec, resolve_data_path, task_digest

from conftest import FORGE, SHARED_DATA



def write_tasks(folder: Path) -> dict[str, Path]:
    """Write a small multiple-choice, generation and perplexity task with their data; return the spec paths."""
    folder.mkdir(parents=True, exist_ok=True)
    questions = [
        {"question": "What color is the sky?", "choices": ["blue", "green", "red"], "answer": 0},
        {"question": "How many legs does a cat have?", "choices": ["two", "four", "six"], "answer": 1},
        {"question": "What is frozen water?", "choices": ["steam", "sand", "ice"], "answer": 2},
        {"question": "Which animal barks?", "choices": ["dog", "fish", "bird"], "answer": 0},
    ]
    (folder / "quiz.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    sums = [{"question": f"What is {a} plus {b}?", "answer": str(a + b)} for a, b in [(2, 3), (10, 7), (4, 4)]]
    (folder / "sums.jsonl").write_text("".join(json.dumps(s) + "\n" for s in sums))
    (folder / "text.txt").write_text("Small models learn small things. " * 20)

    specs = {
        "quiz": {"name": "quiz", "kind": "multiple_choice", "data": "quiz.jsonl",
                 "prompt": "Question: {question}\nAnswer:", "choices": "choices", "answer": "answer"},
        "sums": {"name": "sums", "kind": "generate", "data": "sums.jsonl", "prompt": "Question: {question}\nAnswer:",
                 "reference": "{answer}", "extract": "last_number", "metric": "numeric_match",
                 "stop": ["\n"], "max_new_tokens": 4},
        "text": {"name": "text", "kind": "perplexity", "data": "text.txt", "max_length": 32, "stride": 16},
    }
    paths = {}
    for name, spec in specs.items():
        paths[name] = folder / f"{name}.json"
        paths[name].write_text(json.dumps(spec))
    return paths


def run_eval(*args: str):
    return CliRunner().invoke(cli, ["eval", *args])


def test_eval_json_report(tiny_model_dir, tmp_path):
    tasks = write_tasks(tmp_path / "tasks")
    output = tmp_path / "report.json"
    result = run_eval("--model", str(tiny_model_dir), "--target", "sums", "--general", "quiz,text",
                      "--task-file", str(tasks["quiz"]), "--task-file", str(tasks["sums"]),
                      "--task-file", str(tasks["text"]), "--dtype", "float32", "--quiet", "--json", "-o", str(output))
    assert result.exit_code == 0, result.output

    report = json.loads(result.stdout)
    assert report == json.loads(output.read_text())
    assert report["schema"] == "llmforge.eval/2"
    assert report["inputs"]["dtype"] == "float32"
    assert [task["name"] for task in report["inputs"]["tasks"]] == ["sums", "quiz", "text"]

    entry = report["results"][0]
    assert entry["digest"].startswith("sha256:")
    assert entry["tasks"]["quiz"]["n"] == 4
    assert entry["tasks"]["sums"]["n"] == 3
    assert entry["tasks"]["text"]["metric"] == "perplexity"
    assert entry["summary"]["target_score"] == entry["tasks"]["sums"]["score"]
    assert entry["summary"]["general_score"] == entry["tasks"]["quiz"]["score"]
    assert entry["summary"]["excluded_from_mean"] == ["text"]


def test_eval_repeat_served_from_cache(tiny_model_dir, tmp_path, monkeypatch):
    tasks = write_tasks(tmp_path / "tasks")
    args = ["--model", str(tiny_model_dir), "--general", "quiz,sums", "--task-file", str(tasks["quiz"]),
            "--task-file", str(tasks["sums"]), "--quiet", "--json"]
    first = json.loads(run_eval(*args).stdout)
    assert first["results"][0]["weights_loaded"] is True
    assert [r["cached"] for r in first["results"][0]["tasks"].values()] == [False, False]

    def fail_on_load(*args, **kwargs):
        raise AssertionError("load_model called although every score is cached")

    monkeypatch.setattr("llmforge.models.load_model", fail_on_load)
    second = run_eval(*args)
    assert second.exit_code == 0, second.output
    repeated = json.loads(second.stdout)["results"][0]
    assert repeated["weights_loaded"] is False
    assert [r["cached"] for r in repeated["tasks"].values()] == [True, True]
    for name in ("quiz", "sums"):
        assert repeated["tasks"][name]["score"] == first["results"][0]["tasks"][name]["score"]


def test_eval_no_cache_recomputes(tiny_model_dir, tmp_path):
    tasks = write_tasks(tmp_path / "tasks")
    args = ["--model", str(tiny_model_dir), "--general", "quiz", "--task-file", str(tasks["quiz"]), "--quiet", "--json"]
    run_eval(*args)
    report = json.loads(run_eval(*args, "--no-cache").stdout)
    assert report["results"][0]["tasks"]["quiz"]["cached"] is False
    assert report["inputs"]["cache"] is False


@pytest.fixture(scope="module")
def perturbed_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A copy of the tiny model with noise added to every weight, so that its scores differ."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    out = tmp_path_factory.mktemp("tiny-perturbed")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_baseline_deltas_equal_difference(tiny_model_dir, perturbed_model_dir, tmp_path):
    tasks = write_tasks(tmp_path / "tasks")
    report = evaluate([str(perturbed_model_dir)], target=["text"], general=["quiz"], baseline=str(tiny_model_dir),
                      task_files=[tasks["quiz"], tasks["text"]], dtype="float32")

    by_reference = {entry["reference"]: entry for entry in report["results"]}
    model, base = by_reference[str(perturbed_model_dir)], by_reference[str(tiny_model_dir)]
    assert base["is_baseline"] is True
    assert report["inputs"]["baseline"]["digest"] == base["digest"]
    assert model["digest"] != base["digest"]
    for name in ("quiz", "text"):
        assert model["tasks"][name]["delta"] == pytest.approx(model["tasks"][name]["score"] - base["tasks"][name]["score"])
    assert model["tasks"]["text"]["delta"] != 0
    assert model["summary"]["general_delta"] == pytest.approx(
        model["summary"]["general_score"] - base["summary"]["general_score"])
    assert "delta" not in base["tasks"]["quiz"]


def test_builtin_demo_tasks_run(tiny_model_dir):
    report = evaluate([str(tiny_model_dir)], target=["arith"], general=["facts"], limit=3, dtype="float32")
    entry = report["results"][0]
    assert entry["tasks"]["arith"]["n"] == 3
    assert entry["tasks"]["facts"]["n"] == 3
    assert entry["tasks"]["facts"]["metric"] == "acc"


def test_list_tasks_json():
    result = run_eval("--list-tasks", "--json")
    assert result.exit_code == 0, result.output
    names = {task["name"] for task in json.loads(result.stdout)["tasks"]}
    assert {"arith", "facts", "gsm8k", "sst2", "arc_easy", "arc_challenge", "boolq", "nq_open", "wikitext2"} <= names


def test_facts_data_shape():
    from llmforge_eval.tasks import read_task_records

    path = Path(__file__).resolve().parents[1] / "plugins" / "llmforge_eval" / "data" / "facts.jsonl"
    records = read_task_records(path)
    assert 60 <= len(records) <= 80
    for record in records:
        assert len(record["choices"]) == 4
        assert len(set(record["choices"])) == 4
        assert record["answer"] in range(4)
    assert len({record["question"] for record in records}) == len(records)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "red"}, "Unknown field 'colour'"),
        ({"kind": "ranking"}, "Invalid kind 'ranking'"),
        ({"data": "missing.jsonl"}, "Data file not found"),
        ({"extract": "regex:("}, "Invalid regular expression"),
        ({"max_new_tokens": "many"}, "Invalid value 'many' for field 'max_new_tokens'"),
    ],
)
def test_invalid_spec_exits_1(tiny_model_dir, tmp_path, change, message):
    tasks = write_tasks(tmp_path / "tasks")
    spec = {**json.loads(tasks["sums"].read_text()), **change}
    bad = tmp_path / "tasks" / "bad.json"
    bad.write_text(json.dumps(spec))
    output = tmp_path / "report.json"

    result = run_eval("--model", str(tiny_model_dir), "--general", "sums", "--task-file", str(bad), "-o", str(output))
    assert result.exit_code == 1
    assert message in result.stderr
    assert str(bad) in result.stderr or "missing.jsonl" in result.stderr
    assert not output.exists()


def test_missing_data_dir_exits_1(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("FORGE_DATA_DIR", raising=False)
    result = run_eval("--model", str(tiny_model_dir), "--general", "gsm8k")
    assert result.exit_code == 1
    assert "--data-dir" in result.stderr


def test_unknown_task_exits_1(tiny_model_dir):
    result = run_eval("--model", str(tiny_model_dir), "--general", "nonesuch")
    assert result.exit_code == 1
    assert "Unknown task or suite 'nonesuch'" in result.stderr


def test_task_digest_ignores_data_location(tmp_path):
    first, second = tmp_path / "a" / "data.txt", tmp_path / "b" / "data.txt"
    for path in (first, second):
        path.parent.mkdir()
        path.write_text("same bytes")
    spec_a = parse_spec({"name": "t", "kind": "perplexity", "data": str(first)})
    spec_b = parse_spec({"name": "t", "kind": "perplexity", "data": str(second)})
    assert task_digest(spec_a, first) == task_digest(spec_b, second)
    second.write_text("other bytes")
    assert task_digest(spec_a, first) != task_digest(spec_b, second)


def test_installed_script_table_and_json(tiny_model_dir, tmp_path, forge_env):
    tasks = write_tasks(tmp_path / "tasks")
    base = [str(FORGE), "eval", "--model", str(tiny_model_dir), "--general", "quiz", "--task-file", str(tasks["quiz"])]
    table = subprocess.run([*base, "--quiet"], capture_output=True, text=True, env=forge_env, timeout=300)
    assert table.returncode == 0, table.stderr
    assert "quiz" in table.stdout
    assert table.stderr == ""

    as_json = subprocess.run([*base, "--json"], capture_output=True, text=True, env=forge_env, timeout=300)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["results"][0]["tasks"]["quiz"]["cached"] is True

    missing = subprocess.run([*base[:-2], "--task-file", str(tmp_path / "nope.yaml")], capture_output=True,
                             text=True, env={**forge_env, "PATH": os.environ.get("PATH", "")}, timeout=300)
    assert missing.returncode == 1
    assert "Task file not found" in missing.stderr


def test_adapter_model_scores_all_kinds(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    tasks = write_tasks(tmp_path / "tasks")

    report = evaluate([str(adapter_dir)], target=["sums"], general=["quiz", "text"], baseline=str(tiny_model_dir),
                      task_files=list(tasks.values()), dtype="float32")
    entry = next(entry for entry in report["results"] if entry["reference"] == str(adapter_dir))
    assert entry["base_reference"] == str(tiny_model_dir)
    assert entry["base_digest"] == report["inputs"]["baseline"]["digest"]
    assert set(entry["tasks"]) == {"sums", "quiz", "text"}
    assert entry["tasks"]["text"]["delta"] != 0


def write_sst2(data_dir: Path) -> Path:
    path = data_dir / "sst2" / "test.tsv"
    path.parent.mkdir(parents=True)
    path.write_text("sentence\tlabel\na fine film\t1\na dull film\t0\nwonderful\t1\n")
    return path


def test_relative_data_dir_is_cwd_relative(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = write_sst2(tmp_path / "dd")

    result = run_eval("--model", str(tiny_model_dir), "--general", "sst2", "--data-dir", "dd", "--dtype", "float32",
                      "--quiet", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["inputs"]["tasks"][0]["data"] == str(expected)
    assert report["results"][0]["tasks"]["sst2"]["n"] == 3


def test_relative_data_dir_env_is_cwd_relative(tmp_path, monkeypatch):
    from llmforge_eval.evaluate import task_registry

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FORGE_DATA_DIR", "dd")
    expected = write_sst2(tmp_path / "dd")
    assert resolve_data_path(task_registry()["sst2"]) == expected


def test_spec_relative_data_stays_spec_relative(tmp_path, monkeypatch):
    tasks = write_tasks(tmp_path / "tasks")
    monkeypatch.chdir(tmp_path)
    spec = parse_spec(json.loads(tasks["quiz"].read_text()), source=str(tasks["quiz"]))
    assert resolve_data_path(spec, data_dir="elsewhere") == tmp_path / "tasks" / "quiz.jsonl"


NQ_OPEN = SHARED_DATA / "nq_open" / "NQ-open.dev.jsonl"


@pytest.mark.skipif(not NQ_OPEN.is_file(), reason="NQ-open data set not present")
def test_nq_open_spec_reads_answer_lists():
    from llmforge_eval.evaluate import task_registry
    from llmforge_eval.tasks import read_task_records, render_references

    spec = task_registry()["nq_open"]
    path = resolve_data_path(spec, NQ_OPEN.parents[1])
    assert path == NQ_OPEN
    records = read_task_records(path)
    assert len(records) == 3610
    answers = [render_references(spec.reference, record, "nq_open") for record in records[:50]]
    assert all(answer and all(isinstance(item, str) for item in answer) for answer in answers)
    assert any(len(answer) > 1 for answer in answers)


# Several models in one run: the base and two adapters from the real `forge finetune`.


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """A LoRA and an OFT adapter of the tiny model, each trained for 3 steps by `forge finetune`."""
    folder = tmp_path_factory.mktemp("adapters")
    data = folder / "qa.jsonl"
    records = [{"question": f"What is {a} plus {b}?", "answer": str(a + b)} for a in range(3) for b in range(4)]
    data.write_text("".join(json.dumps(record) + "\n" for record in records))

    paths = {}
    for method in ("lora", "oft"):
        paths[method] = folder / method
        result = CliRunner().invoke(cli, ["finetune", "--model", str(tiny_model_dir), "--data", str(data),
                                          "-o", str(paths[method]), "--steps", "3", "--lr", "5e-2",
                                          "--method", method, "--no-bf16", "--quiet"])
        assert result.exit_code == 0, result.output
    return paths


def test_several_models_share_one_base_load(tiny_model_dir, adapters, tmp_path):
    tasks = write_tasks(tmp_path / "tasks")
    output, plot = tmp_path / "report.json", tmp_path / "pareto.png"
    models = [str(adapters["oft"]), str(adapters["lora"]), str(tiny_model_dir)]
    args = ["--target", "sums", "--general", "quiz,text", "--task-file", str(tasks["quiz"]),
            "--task-file", str(tasks["sums"]), "--task-file", str(tasks["text"]), "--dtype", "float32", "--quiet"]
    result = run_eval(*[item for model in models for item in ("--model", model)], "--baseline", str(tiny_model_dir),
                      *args, "--json", "-o", str(output), "--plot", str(plot))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)

    assert report["loads"] == [{"reference": str(tiny_model_dir), "digest": report["inputs"]["baseline"]["digest"],
                                "loads": 1, "models": [str(tiny_model_dir), *models[:2]]}]
    assert [entry["reference"] for entry in report["results"]] == [str(tiny_model_dir), *models[:2]]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["plots"] == {"pareto": str(plot)}
    assert len(report["pareto"]["points"]) == 3
    assert any(point["on_frontier"] for point in report["pareto"]["points"])

    # Each adapter attached to the shared base scores exactly as when it is loaded alone.
    for model in [*models[:2], str(tiny_model_dir)]:
        alone = json.loads(run_eval("--model", model, *args, "--json", "--no-cache").stdout)
        shared = next(entry for entry in report["results"] if entry["reference"] == model)
        for name in ("quiz", "sums", "text"):
            assert shared["tasks"][name]["score"] == pytest.approx(alone["results"][0]["tasks"][name]["score"], rel=1e-6)

    by_reference = {entry["reference"]: entry for entry in report["results"]}
    assert by_reference[str(adapters["lora"])]["tasks"]["text"]["score"] != by_reference[str(tiny_model_dir)]["tasks"]["text"]["score"]
    assert by_reference[str(adapters["oft"])]["tasks"]["text"]["score"] != by_reference[str(tiny_model_dir)]["tasks"]["text"]["score"]
    assert by_reference[str(adapters["lora"])]["tasks"]["quiz"]["test"]["name"].startswith("two-proportion z-test")
    assert by_reference[str(adapters["lora"])]["tasks"]["text"]["test"]["z"] is None


def test_base_host_detaches_adapters_exactly(tiny_model_dir, adapters):
    import torch

    from llmforge.cache import Cache
    from llmforge.models import load_model
    from llmforge_eval.loading import BaseHost, describe_model

    cache = Cache()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])

    def logits(model):
        with torch.inference_mode():
            return model(input_ids=ids).logits

    host = BaseHost(str(tiny_model_dir), dtype="float32", cache=cache)
    plain = logits(host.plain().model)
    for method in ("lora", "oft", "lora"):
        attached = host.with_adapter(describe_model(str(adapters[method]), cache))
        expected = logits(load_model(str(adapters[method]), dtype="float32", cache=cache).model)
        assert torch.allclose(logits(attached.model), expected, atol=1e-5)
    assert torch.equal(logits(host.plain().model), plain)
    assert host.loads == 1


def test_text_report_has_pareto_and_tests(tiny_model_dir, adapters, tmp_path):
    tasks = write_tasks(tmp_path / "tasks")
    output = tmp_path / "out" / "report.json"
    output.parent.mkdir()
    result = run_eval("--model", str(adapters["lora"]), "--baseline", str(tiny_model_dir), "--target", "sums",
                      "--general", "quiz", "--task-file", str(tasks["quiz"]), "--task-file", str(tasks["sums"]),
                      "--quiet", "-o", str(output))
    assert result.exit_code == 0, result.output
    assert "pareto" in result.stdout
    assert "two-proportion z-test" in result.stdout
    assert (tmp_path / "out" / "report.pareto.png").is_file()
    assert json.loads(output.read_text())["plots"]["pareto"] == str(tmp_path / "out" / "report.pareto.png")
    assert sorted(path.name for path in output.parent.iterdir()) == ["report.json", "report.pareto.png"]


def test_adapter_of_other_base_rejected(tiny_model_dir, perturbed_model_dir, adapters, tmp_path):
    tasks = write_tasks(tmp_path / "tasks")
    output = tmp_path / "report.json"
    result = run_eval("--model", str(adapters["lora"]), "--baseline", str(perturbed_model_dir), "--general", "quiz",
                      "--task-file", str(tasks["quiz"]), "-o", str(output))
    assert result.exit_code == 1
    assert f"Adapter {adapters['lora']} is based on {tiny_model_dir}" in result.stderr
    assert f"--baseline {perturbed_model_dir}" in result.stderr
    assert not output.exists()


# Suites


def test_list_tasks_shows_suites():
    result = run_eval("--list-tasks", "--json")
    assert result.exit_code == 0, result.output
    suites = {suite["name"]: suite["tasks"] for suite in json.loads(result.stdout)["suites"]}
    assert suites["general"] == ["arc_easy", "boolq", "wikitext2"]
    assert suites["math"] == ["gsm8k", "math500"]

    text = run_eval("--list-tasks").stdout
    assert "suites:" in text
    assert "arc_easy,boolq,wikitext2" in text


def test_suite_names_expand(tiny_model_dir, tmp_path):
    tasks = write_tasks(tmp_path / "tasks")
    result = run_eval("--model", str(tiny_model_dir), "--target", "demo-target", "--general", "demo-general,quiz",
                      "--task-file", str(tasks["quiz"]), "--limit", "2", "--quiet", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [(task["name"], task["role"]) for task in report["inputs"]["tasks"]] == [
        ("arith", "target"), ("facts", "general"), ("quiz", "general")]
    assert report["inputs"]["selection"] == {"target": ["demo-target"], "general": ["demo-general", "quiz"]}


def test_task_in_suite_and_list_rejected(tiny_model_dir):
    result = run_eval("--model", str(tiny_model_dir), "--target", "demo-target", "--general", "arith")
    assert result.exit_code == 1
    assert "Task 'arith' is named more than once" in result.stderr


# Bad input: each case exits 1 with a message that names the field, file or value, and writes nothing.


def bad_input_cases(folder: Path) -> list[tuple[list[str], list[str]]]:
    """(extra arguments, expected message parts) per bad input, built on the tasks of `write_tasks`."""
    paths = write_tasks(folder)
    no_reference = folder / "no_reference.json"
    no_reference.write_text(json.dumps({key: value for key, value in json.loads(paths["sums"].read_text()).items()
                                        if key != "reference"}))
    unknown_kind = folder / "unknown_kind.json"
    unknown_kind.write_text(json.dumps({**json.loads(paths["quiz"].read_text()), "kind": "ranking"}))

    wrong_fields = folder / "wrong_fields.jsonl"
    wrong_fields.write_text(json.dumps({"query": "What color is the sky?", "choices": ["a", "b"], "answer": 0}) + "\n")
    needs_question = folder / "needs_question.json"
    needs_question.write_text(json.dumps({**json.loads(paths["quiz"].read_text()), "data": wrong_fields.name}))

    empty = folder / "empty.jsonl"
    empty.write_text("")
    empty_task = folder / "empty_task.json"
    empty_task.write_text(json.dumps({**json.loads(paths["quiz"].read_text()), "name": "empty", "data": empty.name}))
    return [
        (["--general", "sums", "--task-file", str(no_reference)], ["Missing field 'reference'", str(no_reference)]),
        (["--general", "quiz", "--task-file", str(unknown_kind)], ["Invalid kind 'ranking'", str(unknown_kind)]),
        (["--general", "quiz", "--task-file", str(needs_question)], ["Missing field 'question'", str(wrong_fields)]),
        (["--general", "empty", "--task-file", str(empty_task), "--limit", "5"],
         [str(empty), "no records found"]),
    ]


def test_bad_input_exits_1(tiny_model_dir, tmp_path):
    output, plot = tmp_path / "report.json", tmp_path / "plot.png"
    for args, expected in bad_input_cases(tmp_path / "tasks"):
        result = run_eval("--model", str(tiny_model_dir), *args, "-o", str(output), "--plot", str(plot))
        assert result.exit_code == 1, (args, result.output)
        for part in expected:
            assert part in result.stderr, (args, result.stderr)
        assert not output.exists()
        assert not plot.exists()


# An interrupted run resumes: a run killed after its first task reuses that score.


def test_killed_run_resumes(tiny_model_dir, tmp_path, forge_env):
    import signal

    tasks = write_tasks(tmp_path / "tasks")
    long_text = tmp_path / "tasks" / "long.txt"
    long_text.write_text("Small models learn small things, one window at a time. " * 400)
    long_spec = tmp_path / "tasks" / "long.json"
    long_spec.write_text(json.dumps({"name": "long", "kind": "perplexity", "data": "long.txt",
                                     "max_length": 64, "stride": 16}))
    command = [str(FORGE), "eval", "--model", str(tiny_model_dir), "--general", "quiz,long", "--task-file",
               str(tasks["quiz"]), "--task-file", str(long_spec), "--batch-size", "1", "--dtype", "float32"]

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=forge_env)
    try:
        for line in process.stderr:
            if "scored quiz" in line:
                process.send_signal(signal.SIGKILL)
                break
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL

    resumed = subprocess.run([*command, "--json", "--quiet"], capture_output=True, text=True, env=forge_env,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    entry = json.loads(resumed.stdout)["results"][0]
    assert entry["tasks"]["quiz"]["cached"] is True
    assert entry["tasks"]["long"]["cached"] is False
    assert entry["tasks"]["long"]["n"] > 100


@pytest.mark.slow
def test_real_model_base_lora_oft(real_model_cache, tmp_path):
    adapters = {}
    for method in ("lora", "oft"):
        adapters[method] = tmp_path / method
        result = CliRunner().invoke(cli, ["finetune", "--model", "smollm2-135m", "--data", "demo:arith/train.jsonl",
                                          "-o", str(adapters[method]), "--steps", "2", "--limit", "32",
                                          "--method", method, "--quiet"])
        assert result.exit_code == 0, result.output

    output = tmp_path / "report.json"
    result = run_eval("--model", "smollm2-135m", "--model", str(adapters["lora"]), "--model", str(adapters["oft"]),
                      "--baseline", "smollm2-135m", "--target", "demo-target", "--general", "demo-general",
                      "--limit", "24", "--quiet", "-o", str(output))
    assert result.exit_code == 0, result.output
    report = json.loads(output.read_text())

    assert [load["loads"] for load in report["loads"]] == [1]
    assert len(report["loads"][0]["models"]) == 3
    assert (tmp_path / "report.pareto.png").is_file()
    assert len(report["pareto"]["points"]) == 3
    base = report["results"][0]
    # The base model scored 0.72 on all 76 facts questions, where chance is 0.25.
    assert base["tasks"]["facts"]["score"] > 0.5
    for entry in report["results"][1:]:
        assert entry["tasks"]["facts"]["test"]["p_value"] <= 1.0
        assert entry["summary"]["general_delta_stderr"] > 0
    assert "pareto" in result.stdout


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data sets not present")
def test_named_suites_resolve_on_shared_data():
    from llmforge_eval.evaluate import check_task_data, select_tasks, task_registry

    tasks = select_tasks(task_registry(), ["math"], ["general"], SHARED_DATA)
    assert [(task.spec.name, task.role) for task in tasks] == [
        ("gsm8k", "target"), ("math500", "target"), ("arc_easy", "general"), ("boolq", "general"),
        ("wikitext2", "general")]
    for task in tasks:
        check_task_data(task, limit=5, seed=0)
