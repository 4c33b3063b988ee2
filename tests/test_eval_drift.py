"""forge eval drift: the metrics against closed forms, the capture, and the command on real fine-tunes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from llmforge.cli import cli
from llmforge.errors import ForgeError
from llmforge_eval.drift import (
    capability_drift,
    capture_activations,
    gram_distortion,
    linear_cka,
    linear_modules,
    module_metrics,
    procrustes_residuals,
    summarise,
    tokenize_prompts,
)

from conftest import requires_smollm2


def random_orthogonal(size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def activations(tokens: int = 200, features: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator, dtype=torch.float64)
    return torch.randn(tokens, features, generator=generator, dtype=torch.float64) @ mixing + 3.0


# Metrics against closed forms


def test_rotation_gives_zero_procrustes():
    x0 = activations()
    x1 = x0 @ random_orthogonal(16, seed=1)
    residual, raw = procrustes_residuals(x0, x1)
    assert residual < 1e-5
    assert raw > 0.5


def test_rotation_with_few_tokens():
    x0 = activations(tokens=10, features=40)
    x1 = x0 @ random_orthogonal(40, seed=5)
    residual, raw = procrustes_residuals(x0, x1)
    assert residual < 1e-5
    assert raw > 0.5


@pytest.mark.parametrize("tokens", [12, 80])
def test_procrustes_matches_full_svd(tokens):
    # Reference: the d x d SVD of X1^T X0 in float64, with R = U V^T applied to the centred X.
    x0 = activations(tokens=tokens, features=30, seed=6)
    x1 = activations(tokens=tokens, features=30, seed=7)
    c0, c1 = x0 - x0.mean(0), x1 - x1.mean(0)
    u, _, vh = torch.linalg.svd(c1.T @ c0)
    expected = torch.linalg.matrix_norm(c1 @ u @ vh - c0) / torch.linalg.matrix_norm(c0)
    residual, _ = procrustes_residuals(x0, x1)
    assert residual == pytest.approx(float(expected), rel=1e-5)


def test_rotation_keeps_cka_and_gram():
    x0 = activations()
    x1 = x0 @ random_orthogonal(16, seed=2)
    assert linear_cka(x0, x1) == pytest.approx(1.0, abs=1e-9)
    assert gram_distortion(x0, x1) < 1e-6


def test_scaling_keeps_cka_and_gram():
    x0 = activations()
    x1 = 2.5 * x0
    assert linear_cka(x0, x1) == pytest.approx(1.0, abs=1e-9)
    assert gram_distortion(x0, x1) < 1e-6
    residual, raw = procrustes_residuals(x0, x1)
    assert residual == pytest.approx(1.5, abs=1e-5)  # ||2.5 X - X|| / ||X||, R = I is optimal
    assert raw == pytest.approx(1.5, abs=1e-9)


def test_identical_activations_give_zero_drift():
    x0 = activations()
    metrics = module_metrics(x0, x0.clone())
    assert metrics["procrustes"] < 1e-6
    assert metrics["procrustes_raw"] == 0.0
    assert metrics["gram_distortion"] < 1e-6
    assert metrics["cka"] == pytest.approx(1.0, abs=1e-12)
    assert metrics["csd_rel"] is None


def test_independent_activations_give_small_cka():
    x0 = torch.randn(2000, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x1 = torch.randn(2000, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    # For independent Gaussian X, CKA is about features / tokens (0.008 here).
    assert linear_cka(x0, x1) < 0.03
    assert gram_distortion(x0, x1) > 0.5


@pytest.mark.parametrize("tokens", [10, 60])
def test_cka_and_gram_match_definition(tokens):
    # Reference: the formulas written out with the token x token Gram matrices, for T < d and T > d.
    x0 = activations(tokens=tokens, features=25, seed=8)
    x1 = activations(tokens=tokens, features=25, seed=9)
    c0, c1 = x0 - x0.mean(0), x1 - x1.mean(0)
    cka = torch.linalg.matrix_norm(c0.T @ c1) ** 2 / (torch.linalg.matrix_norm(c0.T @ c0)
                                                      * torch.linalg.matrix_norm(c1.T @ c1))
    z0 = x0 / x0.norm(dim=1, keepdim=True)
    z1 = x1 / x1.norm(dim=1, keepdim=True)
    gram = torch.linalg.matrix_norm(z1 @ z1.T - z0 @ z0.T) / torch.linalg.matrix_norm(z0 @ z0.T)
    assert linear_cka(x0, x1) == pytest.approx(float(cka), rel=1e-9)
    assert gram_distortion(x0, x1) == pytest.approx(float(gram), rel=1e-7)


def test_cka_ignores_a_shift():
    x0 = activations()
    assert linear_cka(x0, x0 + 100.0) == pytest.approx(1.0, abs=1e-9)


def test_gram_distortion_by_hand():
    # Rows of unit length: Z0 Z0^T = [[1, 0], [0, 1]], Z1 Z1^T = [[1, 1], [1, 1]].
    x0 = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    x1 = torch.tensor([[1.0, 0.0], [4.0, 0.0]])
    assert gram_distortion(x0, x1) == pytest.approx((2 / 2) ** 0.5, abs=1e-12)


def test_procrustes_rejects_constant_base():
    x0 = torch.ones(10, 4)
    with pytest.raises(ForgeError, match="constant"):
        procrustes_residuals(x0, torch.randn(10, 4))


def test_csd_by_hand():
    # h = [1, 2] on both tokens; W0 = I, dW = [[0, 1], [0, 0]] so dW h = [2, 0] and W0 h = [1, 2].
    h = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    base = torch.eye(2)
    delta = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    relative, normalised = capability_drift(h, base, delta, eps=0.0)
    assert relative == pytest.approx(4 / 5)
    assert normalised == pytest.approx(4 / (1 * 5))


def test_csd_eps_when_base_output_zero():
    # W0 h = 0 on every token: CSD_rel = E||dW h||^2 / eps.
    h = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    base = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    delta = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    relative, normalised = capability_drift(h, base, delta, eps=0.5)
    assert relative == pytest.approx(2.5 / 0.5)  # E||dW h||^2 = (1 + 4) / 2
    assert normalised == pytest.approx(2.5 / (1 * 2.5))


def test_csd_zero_update_is_zero():
    h = torch.randn(8, 3)
    relative, normalised = capability_drift(h, torch.randn(4, 3), torch.zeros(4, 3))
    assert relative == 0.0
    assert normalised == 0.0


def test_summarise_means_per_group():
    rows = [
        {"layer": 0, "module_type": "q_proj", "procrustes": 0.1, "procrustes_raw": 0.2, "gram_distortion": 0.0,
         "cka": 1.0, "csd_rel": None, "csd_norm": None},
        {"layer": 0, "module_type": "v_proj", "procrustes": 0.3, "procrustes_raw": 0.4, "gram_distortion": 0.2,
         "cka": 0.5, "csd_rel": 1.0, "csd_norm": 2.0},
    ]
    by_layer = summarise(rows, "layer")
    assert len(by_layer) == 1
    assert by_layer[0]["procrustes"] == pytest.approx(0.2)
    assert by_layer[0]["csd_rel"] == 1.0
    assert [row["module_type"] for row in summarise(rows, "module_type")] == ["q_proj", "v_proj"]


# Tokens and capture on the tiny model


class FakeTokenizer:
    def __call__(self, text):
        return {"input_ids": [len(word) for word in text.split()]}


def test_token_cap_cuts_last_prompt():
    sequences = tokenize_prompts(FakeTokenizer(), ["a bb ccc", "dddd eeeee ffffff", "g"], max_tokens=5)
    assert sequences == [[1, 2, 3], [4, 5]]


def test_token_cap_rejects_too_small():
    with pytest.raises(ForgeError, match="max-tokens"):
        tokenize_prompts(FakeTokenizer(), ["a b"], max_tokens=1)


def test_padding_leaves_activations_unchanged(tiny_model_dir):
    from llmforge.models import load_model

    loaded = load_model(str(tiny_model_dir))
    names = sorted(linear_modules(loaded.model, ["q_proj", "down_proj"]))
    sequences = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    batched = capture_activations(loaded.model, sequences, names, pad_token_id=0, with_inputs=True, batch_size=3)
    single = capture_activations(loaded.model, sequences, names, pad_token_id=0, with_inputs=True, batch_size=1)

    assert len(names) == 4  # two layers
    assert sorted(batched) == sorted(single)
    for key in batched:
        assert batched[key].shape[0] == 11
        torch.testing.assert_close(batched[key], single[key], rtol=1e-5, atol=1e-5)


def test_unknown_module_type_rejected(tiny_model_dir):
    from llmforge.models import load_model

    loaded = load_model(str(tiny_model_dir))
    with pytest.raises(ForgeError, match="qq_proj"):
        linear_modules(loaded.model, ["qq_proj"])


# The command on adapters from forge finetune


def finetune(tiny_model_dir, data: Path, output: Path, method: str = "lora", seed: int = 0) -> Path:
    result = CliRunner().invoke(cli, ["finetune", "--model", str(tiny_model_dir), "--data", str(data), "-o",
                                      str(output), "--steps", "3", "--lr", "5e-2", "--method", method, "--no-bf16",
                                      "--seed", str(seed), "--quiet"])
    assert result.exit_code == 0, result.output
    return output


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("drift-adapters")
    data = folder / "qa.jsonl"
    records = [{"question": f"What is {a} plus {b}?", "answer": str(a + b)} for a in range(3) for b in range(4)]
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    return {"lora": finetune(tiny_model_dir, data, folder / "lora"),
            "lora2": finetune(tiny_model_dir, data, folder / "lora2", seed=1),
            "oft": finetune(tiny_model_dir, data, folder / "oft", method="oft"),
            "full": finetune(tiny_model_dir, data, folder / "full", method="full")}


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    texts = ["The sky is blue and the grass is green.", "Cats sleep most of the day.",
             "Water freezes at zero degrees.", "A small model learns small things."]
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def run_drift(*args: str):
    return CliRunner().invoke(cli, ["eval", "drift", *args])


@pytest.mark.parametrize("method", ["lora", "oft"])
def test_tuned_capture_includes_adapter(tiny_model_dir, adapters, method):
    # Layer 0's attention input is the normalised embedding, which no adapter changes, so the tuned
    # q_proj output must be that base input times the merged weight (W0 + dW)^T.
    from llmforge.models import load_model
    from llmforge_eval.weights import weight_updates

    base = load_model(str(tiny_model_dir))
    tuned = load_model(str(adapters[method]))
    name = "model.layers.0.self_attn.q_proj"
    sequences = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    base_capture = capture_activations(base.model, sequences, [name], pad_token_id=0, with_inputs=True)
    tuned_capture = capture_activations(tuned.model, sequences, [name], pad_token_id=0, with_inputs=False)

    update = next(u for u in weight_updates(str(adapters[method]), str(tiny_model_dir)) if u.name == f"{name}.weight")
    expected = base_capture[f"input.{name}"] @ (update.base + update.delta).T
    assert not torch.allclose(tuned_capture[f"output.{name}"], base_capture[f"output.{name}"], atol=1e-3)
    torch.testing.assert_close(tuned_capture[f"output.{name}"], expected, rtol=1e-4, atol=1e-4)


def test_drift_report_on_lora(tiny_model_dir, adapters, prompts, tmp_path):
    output = tmp_path / "out" / "drift.json"
    output.parent.mkdir()
    result = run_drift("--model", str(adapters["lora"]), "--baseline", str(tiny_model_dir), "--data", str(prompts),
                       "--json", "-o", str(output), "--quiet")
    assert result.exit_code == 0, result.output

    report = json.loads(result.stdout)
    assert report["schema"] == "llmforge.eval.drift/1"
    assert report["data"]["prompts"] == 4
    entry = report["models"][0]
    assert len(entry["modules"]) == 14  # 2 layers x 7 linear modules
    assert [row["layer"] for row in entry["by_layer"]] == [0, 1]
    assert len(entry["by_module_type"]) == 7
    updated = [row for row in entry["modules"] if row["updated"]]
    assert updated, "LoRA updates some modules"
    assert all(row["csd_rel"] > 0 and row["csd_norm"] > 0 for row in updated)
    assert all(row["csd_rel"] == 0 for row in entry["modules"] if not row["updated"])
    assert all(0 <= row["cka"] <= 1 + 1e-9 for row in entry["modules"])
    assert any(row["procrustes_raw"] > 0 for row in entry["modules"])
    assert entry["cached"] == {"metrics": False, "activations": False, "base_activations": False}

    assert json.loads(output.read_text())["models"] == report["models"]
    for plot in report["plots"]:
        assert Path(plot).read_bytes().startswith(b"\x89PNG")


def test_drift_second_run_reads_cache(tiny_model_dir, adapters, prompts):
    base_args = ["--baseline", str(tiny_model_dir), "--data", str(prompts), "--json", "--quiet"]
    first = run_drift("--model", str(adapters["lora"]), *base_args)
    assert first.exit_code == 0, first.output

    second = run_drift("--model", str(adapters["lora2"]), "--model", str(adapters["oft"]), *base_args)
    assert second.exit_code == 0, second.output
    entries = json.loads(second.stdout)["models"]
    assert entries[0]["cached"] == {"metrics": False, "activations": False, "base_activations": True}
    assert entries[1]["cached"]["base_activations"] is True

    repeat = run_drift("--model", str(adapters["lora"]), *base_args)
    assert repeat.exit_code == 0, repeat.output
    assert json.loads(repeat.stdout)["models"][0]["cached"]["metrics"] is True
    assert json.loads(repeat.stdout)["models"][0]["modules"] == json.loads(first.stdout)["models"][0]["modules"]


def test_drift_table_and_module_filter(tiny_model_dir, adapters, prompts, tmp_path):
    result = run_drift("--model", str(adapters["oft"]), "--baseline", str(tiny_model_dir), "--data", str(prompts),
                       "--modules", "q_proj,v_proj", "--max-tokens", "16", "--plots", str(tmp_path / "plots"),
                       "--quiet")
    assert result.exit_code == 0, result.output
    assert "q_proj" in result.stdout
    assert "up_proj" not in result.stdout
    assert sorted(path.name for path in (tmp_path / "plots").iterdir()) == ["drift-1-oft.png"]


def test_drift_full_finetune(tiny_model_dir, adapters, prompts):
    result = run_drift("--model", str(adapters["full"]), "--baseline", str(tiny_model_dir), "--data", str(prompts),
                       "--json", "--quiet")
    assert result.exit_code == 0, result.output
    entry = json.loads(result.stdout)["models"][0]
    assert entry["is_adapter"] is False
    assert len(entry["modules"]) == 14
    assert all(row["updated"] for row in entry["modules"])
    assert all(row["csd_norm"] > 0 for row in entry["modules"])


def test_drift_task_prompts(tiny_model_dir, adapters):
    result = run_drift("--model", str(adapters["lora"]), "--baseline", str(tiny_model_dir), "--data", "facts",
                       "--limit", "5", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)["data"]
    assert data["kind"] == "task"
    assert data["prompts"] == 5


@pytest.mark.parametrize("args, message", [
    (["--data", "no-such-file.jsonl"], "neither a task name nor an existing file"),
    (["--modules", "qq_proj"], "qq_proj"),
    (["--limit", "0"], "--limit"),
    (["--max-tokens", "1"], "--max-tokens"),
])
def test_drift_bad_input(tiny_model_dir, adapters, prompts, tmp_path, args, message):
    output = tmp_path / "drift.json"
    defaults = {"--data": str(prompts)}
    for flag, value in zip(args[::2], args[1::2]):
        defaults[flag] = value
    flat = [item for pair in defaults.items() for item in pair]
    result = run_drift("--model", str(adapters["lora"]), "--baseline", str(tiny_model_dir), *flat, "-o", str(output),
                       "--quiet")
    assert result.exit_code == 1
    assert message in result.output
    assert not output.exists()


def test_drift_rejects_other_base(tiny_model_dir, adapters, prompts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = tmp_path / "other-base"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(2)
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)

    result = run_drift("--model", str(adapters["lora"]), "--baseline", str(other), "--data", str(prompts), "--quiet")
    assert result.exit_code == 1
    assert "fine-tuned from" in result.output


def test_drift_rejects_prompts_without_text(tiny_model_dir, adapters, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "Why?", "answer": "Because."}) + "\n")
    result = run_drift("--model", str(adapters["lora"]), "--baseline", str(tiny_model_dir), "--data", str(data),
                       "--quiet")
    assert result.exit_code == 1
    assert "'text' or 'prompt'" in result.output


@pytest.mark.slow
@requires_smollm2
def test_drift_smollm2_lora(real_model_cache, tmp_path, prompts):
    data = tmp_path / "qa.jsonl"
    records = [{"question": f"What is {a} plus {b}?", "answer": str(a + b)} for a in range(4) for b in range(4)]
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    adapter = tmp_path / "lora"
    trained = CliRunner().invoke(cli, ["finetune", "--model", "smollm2-135m", "--data", str(data), "-o", str(adapter),
                                       "--steps", "3", "--lr", "1e-3", "--method", "lora", "--no-bf16", "--quiet"])
    assert trained.exit_code == 0, trained.output

    result = run_drift("--model", str(adapter), "--baseline", "smollm2-135m", "--data", "facts", "--limit", "20",
                       "--max-tokens", "256", "--modules", "q_proj,v_proj,down_proj", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    entry = json.loads(result.stdout)["models"][0]
    assert len(entry["modules"]) == 30 * 3
    assert len(entry["by_layer"]) == 30
    # A short LoRA run moves the activations a little: high CKA, small but nonzero residuals.
    assert entry["mean"]["cka"] > 0.9
    assert 0 < entry["mean"]["procrustes"] < 0.5
    assert entry["mean"]["procrustes"] <= entry["mean"]["procrustes_raw"] + 1e-9
