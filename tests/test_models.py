"""Model references: HF directories, adapters, GGUF conversion, digests and bad references."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llmforge import models
from llmforge.cache import Cache
from llmforge.errors import ForgeError
from llmforge.models import BuiltinModel, load_model, model_digest, resolve

from conftest import requires_smollm2, smollm2_gguf_path


def test_load_hf_directory(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))

    assert loaded.digest.startswith("sha256:")
    assert not loaded.is_adapter
    assert loaded.tokenizer.pad_token is not None
    assert loaded.model.training is False


def test_digest_stable_and_content_based(tiny_model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    first = model_digest(str(copy))

    assert model_digest(str(copy)) == first
    assert model_digest(str(tiny_model_dir)) == first

    from safetensors.torch import load_file, save_file

    weights = load_file(copy / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert model_digest(str(copy)) != first


def make_adapter(base_dir, out_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(out_dir)
    config = json.loads((out_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base_dir)
    (out_dir / "adapter_config.json").write_text(json.dumps(config))


def test_load_adapter_directory(tiny_model_dir, tmp_path):
    make_adapter(tiny_model_dir, tmp_path / "adapter")
    base = load_model(str(tiny_model_dir))

    tuned = load_model(str(tmp_path / "adapter"))

    assert tuned.is_adapter
    assert tuned.base_digest == base.digest
    assert tuned.digest != base.digest
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert not torch.allclose(tuned.model(ids).logits, base.model(ids).logits)


def test_pickle_weights_rejected_by_default(tiny_model_dir, tmp_path):
    directory = tmp_path / "pickled"
    directory.mkdir()
    shutil.copy(tiny_model_dir / "config.json", directory)
    (directory / "pytorch_model.bin").write_bytes(b"not loaded")

    with pytest.raises(ForgeError, match="pickle.*forge --allow-pickle"):
        resolve(str(directory))


def test_corrupt_weights_rejected(tiny_model_dir, tmp_path):
    directory = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dir, directory)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])

    with pytest.raises(ForgeError, match="truncated"):
        load_model(str(directory))


@pytest.mark.parametrize("reference", ["no-such-model", "./missing/dir", "hf-typo:org/name"])
def test_unknown_reference(reference):
    with pytest.raises(ForgeError, match="unknown model reference"):
        resolve(reference)


def test_directory_without_config(tmp_path):
    with pytest.raises(ForgeError, match="no config.json"):
        resolve(str(tmp_path))


def test_missing_package_names_install(monkeypatch):
    fake = BuiltinModel("fake-1m", "test model", "pip install llmforge-no-such-package", ("llmforge-no-such-package",), "x.gguf")
    monkeypatch.setitem(models.BUILTIN_MODELS, "fake-1m", fake)

    with pytest.raises(ForgeError, match="pip install llmforge-no-such-package"):
        resolve("fake-1m")


@requires_smollm2
@pytest.mark.parametrize("size", [0, 3, 1000, 5_000_000])
def test_truncated_gguf_rejected(tmp_path, size):
    path = tmp_path / "cut.gguf"
    path.write_bytes(smollm2_gguf_path().read_bytes()[:size])

    with pytest.raises(ForgeError, match="not a valid GGUF file"):
        load_model(str(path))
    assert Cache().records() == [] or all(r["kind"] == "file-digest" for _, r in Cache().records())


@pytest.mark.slow
def test_smollm2_conversion_matches_gguf(real_model_cache):
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf_path()
    loaded = load_model("smollm2-135m")
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids

    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, reference(ids).logits)

    config = json.loads((loaded.path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    from safetensors import safe_open

    with safe_open(str(loaded.path / "model.safetensors"), "pt") as handle:
        assert "lm_head.weight" not in handle.keys()
    plain = AutoModelForCausalLM.from_pretrained(str(loaded.path))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete", "bad-config"])
def test_damaged_adapter_rejected(tiny_model_dir, tmp_path, damage):
    adapter = tmp_path / "adapter"
    make_adapter(tiny_model_dir, adapter)
    weights = adapter / "adapter_model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:50])
    elif damage == "garbage":
        weights.write_bytes(b"\xff" * 4096)
    elif damage == "delete":
        weights.unlink()
    else:
        (adapter / "adapter_config.json").write_text("{not json")

    with pytest.raises(ForgeError, match="adapter_model.safetensors|not valid JSON|truncated|corrupt"):
        load_model(str(adapter))


def test_adapter_with_unknown_base_names_it(tiny_model_dir, tmp_path):
    adapter = tmp_path / "adapter"
    make_adapter(tiny_model_dir, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "gpt2"
    (adapter / "adapter_config.json").write_text(json.dumps(config))

    with pytest.raises(ForgeError, match="names the base model 'gpt2'"):
        load_model(str(adapter))


def test_cache_path_that_is_a_file(tmp_path):
    file = tmp_path / "afile"
    file.write_text("x")

    with pytest.raises(ForgeError, match="is a file, not a directory"):
        Cache(file)


def test_pickle_weights_load_when_allowed(tiny_model_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    directory = tmp_path / "pickled"
    directory.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, directory)
    state = load_file(tiny_model_dir / "model.safetensors")
    torch.save(state, directory / "pytorch_model.bin")
    reference = load_model(str(tiny_model_dir))

    monkeypatch.setenv("FORGE_ALLOW_PICKLE", "1")
    loaded = load_model(str(directory))

    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, reference.model(ids).logits)
    assert loaded.digest != reference.digest


def test_allow_pickle_flag_sets_environment(monkeypatch):
    from click.testing import CliRunner

    from llmforge.cli import cli

    monkeypatch.delenv("FORGE_ALLOW_PICKLE", raising=False)
    result = CliRunner().invoke(cli, ["--allow-pickle", "models", "--json"])

    assert result.exit_code == 0
    import os

    assert os.environ.get("FORGE_ALLOW_PICKLE") == "1"
    monkeypatch.delenv("FORGE_ALLOW_PICKLE", raising=False)


@pytest.mark.parametrize("reference", ["", "   "])
def test_empty_reference_rejected(reference, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ForgeError, match="empty model reference"):
        resolve(reference)
