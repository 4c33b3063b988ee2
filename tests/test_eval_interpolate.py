"""forge eval interpolate on the tiny model: the LoRA, OFT and dense paths, rewinding, the best point and errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmforge.cli import cli
from llmforge_eval.evaluate import evaluate
from llmforge_eval.interpolate import interpolate, oft_rotation
from llmforge_eval.interpolate_report import best_tradeoff, pareto_flags

from conftest import requires_smollm2

TASK_NAMES = {"target": ["sums_mc", "qa_text"], "general": ["quiz", "prose"]}


def write_tasks(folder: Path) -> list[Path]:
    """Write two multiple-choice and two perplexity tasks with their data; return the spec files."""
    folder.mkdir(parents=True, exist_ok=True)
    quiz = [
        {"question": "What color is the sky?", "choices": ["blue", "green", "red"], "answer": 0},
        {"question": "How many legs does a cat have?", "choices": ["two", "four", "six"], "answer": 1},
        {"question": "What is frozen water?", "choices": ["steam", "sand", "ice"], "answer": 2},
        {"question": "Which animal barks?", "choices": ["dog", "fish", "bird"], "answer": 0},
    ]
    sums = [{"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a + b + 3), str(a + b + 5)],
             "answer": 0} for a in range(3) for b in range(2)]
    (folder / "quiz.jsonl").write_text("".join(json.dumps(q) + "\n" for q in quiz))
    (folder / "sums.jsonl").write_text("".join(json.dumps(s) + "\n" for s in sums))
    (folder / "qa.txt").write_text(" ".join(f"What is {a} plus {b}? {a + b}" for a in range(3) for b in range(4)))
    (folder / "prose.txt").write_text("Small models learn small things. " * 12)

    mc = {"kind": "multiple_choice", "prompt": "Question: {question}\nAnswer:", "choices": "choices", "answer": "answer"}
    specs = {
        "quiz": {"name": "quiz", "data": "quiz.jsonl", **mc},
        "sums_mc": {"name": "sums_mc", "data": "sums.jsonl", **mc},
        "qa_text": {"name": "qa_text", "kind": "perplexity", "data": "qa.txt", "max_length": 32, "stride": 16},
        "prose": {"name": "prose", "kind": "perplexity", "data": "prose.txt", "max_length": 32, "stride": 16},
    }
    paths = []
    for name, spec in specs.items():
        paths.append(folder / f"{name}.json")
        paths[-1].write_text(json.dumps(spec))
    return paths


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """LoRA, OFT and full fine-tunes of the tiny model (3 steps, a checkpoint every step), and the task files."""
    root = tmp_path_factory.mktemp("interpolate-runs")
    data = root / "qa.jsonl"
    records = [{"question": f"What is {a} plus {b}?", "answer": str(a + b)} for a in range(3) for b in range(4)]
    data.write_text("".join(json.dumps(record) + "\n" for record in records))

    found = {"tasks": write_tasks(root / "tasks"), "cache": root / "cache"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FORGE_CACHE", str(found["cache"]))
        for method in ("lora", "oft", "full"):
            output = root / method
            result = CliRunner().invoke(cli, [
                "finetune", "--model", str(tiny_model_dir), "--data", str(data), "-o", str(output), "--steps", "3",
                "--lr", "5e-2" if method != "full" else "5e-3", "--method", method, "--no-bf16", "--quiet",
                "--save-every", "1"], catch_exceptions=False)
            assert result.exit_code == 0, result.output
            found[method] = output
    return found


def task_args(runs) -> list[str]:
    args = ["--target", ",".join(TASK_NAMES["target"]), "--general", ",".join(TASK_NAMES["general"])]
    for path in runs["tasks"]:
        args += ["--task-file", str(path)]
    return args


def run_interpolate(*args: str):
    return CliRunner().invoke(cli, ["eval", "interpolate", *args, "--dtype", "float32", "--quiet"])


def plain_scores(reference: str, runs) -> dict[str, float]:
    """Score one model with `forge eval`'s own entry point (no cache), by task name."""
    report = evaluate([reference], target=TASK_NAMES["target"], general=TASK_NAMES["general"],
                      task_files=runs["tasks"], dtype="float32", use_cache=False)
    return {name: result["score"] for name, result in report["results"][0]["tasks"].items()}


def point_scores(point: dict) -> dict[str, float]:
    return {name: result["score"] for name, result in point["tasks"].items()}


def by_label(report: dict, path: str) -> dict[str, dict]:
    return {point["label"]: point for point in report["points"] if point["path"] == path}


def score_path(runs, tuned: Path, alphas=(0.0, 0.5, 1.0), **options) -> dict:
    return interpolate(str(tuned), target=TASK_NAMES["target"], general=TASK_NAMES["general"],
                       task_files=runs["tasks"], alphas=alphas, dtype="float32", **options)


@pytest.mark.parametrize("method, path_method", [("lora", "lora-scaling"), ("oft", "oft-cayley")])
def test_adapter_path_endpoints_match_eval(runs, tiny_model_dir, method, path_method):
    report = score_path(runs, runs[method])
    points = by_label(report, "interpolation")

    assert report["path_method"] == path_method
    assert list(points) == ["a=0", "a=0.5", "a=1"]
    base, tuned = plain_scores(str(tiny_model_dir), runs), plain_scores(str(runs[method]), runs)
    assert base["qa_text"] != tuned["qa_text"]
    assert point_scores(points["a=0"]) == base
    assert point_scores(points["a=1"]) == tuned
    assert points["a=0.5"]["tasks"]["qa_text"]["score"] not in (base["qa_text"], tuned["qa_text"])
    assert points["a=0"]["summary"]["target_delta"] == 0.0
    assert points["a=0"]["tasks"]["prose"]["delta"] == 0.0


def test_cayley_path_orthogonal_and_endpoint(runs):
    import torch
    from peft.tuners.oft.layer import OFTRotationModule

    from llmforge.models import load_model
    from llmforge_eval.interpolation_path import PathModel

    loaded = load_model(str(runs["oft"]))
    modules = [module for module in loaded.model.modules() if isinstance(module, OFTRotationModule)]
    assert modules
    originals = [module.weight.detach().clone() for module in modules]
    adapter_rotations = [module.get_weight().detach() for module in modules]
    path = PathModel(loaded, "oft-cayley")

    for alpha in (0.0, 0.3, 0.5, 1.0):
        path.set_alpha(alpha)
        for module, original, adapter_rotation in zip(modules, originals, adapter_rotations):
            blocks = oft_rotation(original, module.block_size, alpha)
            identity = torch.eye(module.block_size).expand_as(blocks)
            assert torch.allclose(blocks.transpose(-2, -1) @ blocks, identity, atol=1e-5)
            assert torch.allclose(module.get_weight(), torch.block_diag(*blocks), atol=1e-6)
            if alpha == 0.0:
                assert torch.equal(blocks, identity)
            if alpha == 1.0:
                assert torch.allclose(torch.block_diag(*blocks), adapter_rotation, atol=1e-6)


def test_cayley_scale_rule_sqrt_and_linear():
    import torch

    generator = torch.randn(3, 6)
    half_sqrt = oft_rotation(generator, 4, 0.25, "sqrt")
    half_linear = oft_rotation(generator, 4, 0.5, "linear")
    assert torch.allclose(half_sqrt, half_linear, atol=1e-6)


def test_dense_path_full_finetune(runs, tiny_model_dir):
    report = score_path(runs, runs["full"])
    points = by_label(report, "interpolation")
    tuned = plain_scores(str(runs["full"]), runs)

    assert report["path_method"] == "dense"
    assert point_scores(points["a=0"]) == plain_scores(str(tiny_model_dir), runs)
    for name, score in point_scores(points["a=1"]).items():
        assert score == pytest.approx(tuned[name], rel=1e-5)
    assert points["a=0.5"]["tasks"]["qa_text"]["score"] != points["a=1"]["tasks"]["qa_text"]["score"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_rewind_scores_each_checkpoint(runs, tiny_model_dir, method):
    report = score_path(runs, runs[method], alphas=(), checkpoints=True)
    points = by_label(report, "rewind")

    assert list(points) == ["base", "step-000001", "step-000002", "final"]
    assert report["path_method"] is None
    assert point_scores(points["final"]) == plain_scores(str(runs[method]), runs)
    assert point_scores(points["base"]) == plain_scores(str(tiny_model_dir), runs)
    perplexities = [point["tasks"]["qa_text"]["score"] for point in points.values()]
    assert len(set(perplexities)) == 4
    if method == "lora":
        checkpoint = runs[method] / "checkpoints" / "step-000001"
        assert point_scores(points["step-000001"]) == plain_scores(str(checkpoint), runs)


def test_write_best_loads_and_scores_as_reported(runs, tmp_path):
    output, best_dir = tmp_path / "report.json", tmp_path / "best"
    result = run_interpolate("--model", str(runs["lora"]), *task_args(runs), "--alphas", "0,0.5,1", "--json",
                             "-o", str(output), "--write-best", str(best_dir))
    assert result.exit_code == 0, result.output

    report = json.loads(result.stdout)
    assert report == json.loads(output.read_text())
    assert (tmp_path / "interpolate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = report["points"][report["best"]["index"]]
    assert best["best"] is True
    assert report["written_model"]["format"] == "hf-model"

    rescored = plain_scores(str(best_dir), runs)
    for name, score in point_scores(best).items():
        assert rescored[name] == pytest.approx(score, rel=1e-5)


def test_table_and_cached_rerun(runs):
    args = ["--model", str(runs["oft"]), *task_args(runs), "--alphas", "0,1", "--checkpoints"]
    first = run_interpolate(*args)
    second = run_interpolate(*args, "--json")
    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output

    assert "best trade-off:" in first.stdout
    assert "step-000002" in first.stdout
    report = json.loads(second.stdout)
    cached = [result["cached"] for point in report["points"] for result in point["tasks"].values()]
    assert all(cached)


def test_pareto_and_best_tradeoff():
    pairs = [(0.10, 0.50), (0.30, 0.45), (0.31, 0.40), (0.20, 0.44), (None, 0.9)]
    assert pareto_flags(pairs) == [True, True, True, False, False]
    assert best_tradeoff(pairs, tolerance=1.0) == 1
    assert best_tradeoff(pairs, tolerance=0.5) == 2
    assert best_tradeoff(pairs, tolerance=25.0) == 0
    assert best_tradeoff([(None, None)], tolerance=1.0) is None


def test_errors_exit_1(runs, tiny_model_dir, tmp_path):
    other_base = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other_base)
    config = json.loads((other_base / "config.json").read_text())
    (other_base / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep")

    cases = [
        (["--model", str(runs["lora"]), "--baseline", str(other_base)], "not from --baseline"),
        (["--model", str(runs["lora"]), "--alphas", "0,1.5"], "must be in [0, 1]"),
        (["--model", str(runs["lora"]), "--alphas", "none"], "Nothing to score"),
        (["--model", str(runs["lora"]), "--limit", "0"], "Invalid --limit"),
        (["--model", str(tiny_model_dir), "--alphas", "1"], "names no base model"),
        (["--model", str(runs["oft"] / "checkpoints" / "step-000001"), "--checkpoints"], "no checkpoints"),
        (["--model", str(runs["lora"]), "--alphas", "0", "--write-best", str(occupied)], "already exists"),
    ]
    for args, message in cases:
        output = tmp_path / "report.json"
        result = run_interpolate(*args, *task_args(runs), "-o", str(output))
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output, (args, result.output)
        assert not output.exists(), args
    assert (occupied / "notes.txt").read_text() == "keep"


@pytest.mark.slow
@requires_smollm2
def test_smollm2_lora_path_and_rewind(real_model_cache, tmp_path):
    tasks = write_tasks(tmp_path / "tasks")
    data = tmp_path / "qa.jsonl"
    records = [{"question": f"What is {a} plus {b}?", "answer": str(a + b)} for a in range(4) for b in range(4)]
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    output = tmp_path / "lora"
    trained = CliRunner().invoke(cli, ["finetune", "--model", "smollm2-135m", "--data", str(data), "-o", str(output),
                                       "--steps", "2", "--method", "lora", "--lr", "1e-3", "--save-every", "1",
                                       "--quiet"], catch_exceptions=False)
    assert trained.exit_code == 0, trained.output

    report = interpolate(str(output), target=TASK_NAMES["target"], general=TASK_NAMES["general"], task_files=tasks,
                         alphas=(0.0, 0.5, 1.0), checkpoints=True, dtype="float32")
    points, rewind = by_label(report, "interpolation"), by_label(report, "rewind")
    evaluated = evaluate(["smollm2-135m", str(output)], target=TASK_NAMES["target"], general=TASK_NAMES["general"],
                         task_files=tasks, dtype="float32", use_cache=False)
    base, tuned = ({name: r["score"] for name, r in entry["tasks"].items()} for entry in evaluated["results"])

    assert report["path_method"] == "lora-scaling"
    assert point_scores(points["a=0"]) == base
    assert point_scores(points["a=1"]) == tuned
    assert list(rewind) == ["base", "step-000001", "final"]
    assert sum(point["best"] for point in report["points"]) == 1


@pytest.mark.parametrize("method, path_method", [("lora", "lora-scaling"), ("oft", "oft-cayley"), ("full", "dense")])
def test_path_model_endpoints_give_base_and_tuned_logits(runs, tiny_model_dir, method, path_method):
    # The report takes the a=0 and a=1 scores from the models themselves, so this checks the
    # in-memory path directly: its logits at the ends equal the base's and the tuned model's.
    import torch

    from llmforge.cache import Cache
    from llmforge.models import load_model
    from llmforge_eval.interpolate import load_path_model

    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        base_logits = load_model(str(tiny_model_dir)).model(ids).logits
        tuned_logits = load_model(str(runs[method])).model(ids).logits
        path = load_path_model(str(runs[method]), str(tiny_model_dir), path_method, dtype="float32",
                               oft_scale="sqrt", cache=Cache())
        path.set_alpha(0.0)
        start = path.loaded.model(ids).logits
        path.set_alpha(1.0)
        end = path.loaded.model(ids).logits

    assert not torch.allclose(base_logits, tuned_logits, atol=1e-4)
    assert torch.allclose(start, base_logits, atol=1e-5)
    assert torch.allclose(end, tuned_logits, atol=1e-4)
