"""Safety guarantees that no other test file checks: pickle, remote code and plugin loading.

Each test plants code that leaves a marker file when it runs: a pickle whose unpickling opens a
file, a model directory whose config names custom Python code, a plugin module that writes on
import. The test then checks that forge never runs it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from llmforge.errors import ForgeError
from llmforge.models import load_model, load_tokenizer

from conftest import FORGE, install_plugin


class OpensFileWhenUnpickled:
    """An object whose pickle calls open(path, "w"): a stand-in for a pickle that runs code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def write_pickled_weights(directory: Path, model_dir: Path, marker: Path) -> None:
    """Save the model's weights as pytorch_model.bin with one entry that would create `marker`."""
    import torch
    from safetensors.torch import load_file

    state = load_file(model_dir / "model.safetensors")
    state["lm_head.extra"] = OpensFileWhenUnpickled(marker)
    torch.save(state, directory / "pytorch_model.bin")


def test_allowed_pickle_loads_weights_only(tiny_model_dir, tmp_path, monkeypatch):
    directory = tmp_path / "pickled"
    directory.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, directory)
    marker = tmp_path / "unpickled-code-ran"
    write_pickled_weights(directory, tiny_model_dir, marker)
    monkeypatch.setenv("FORGE_ALLOW_PICKLE", "1")

    with pytest.raises(ForgeError, match="failed to load the model in .*Weights only load failed"):
        load_model(str(directory))

    assert not marker.exists()


def test_pickle_beside_safetensors_never_read(tiny_model_dir, tmp_path, monkeypatch):
    directory = tmp_path / "both"
    shutil.copytree(tiny_model_dir, directory)
    marker = tmp_path / "unpickled-code-ran"
    write_pickled_weights(directory, tiny_model_dir, marker)
    monkeypatch.setenv("FORGE_ALLOW_PICKLE", "1")

    loaded = load_model(str(directory))

    assert "lm_head.extra" not in loaded.model.state_dict()
    assert not marker.exists()


def write_remote_code_model(directory: Path, model_dir: Path, marker: Path) -> None:
    """Copy the tiny model and point its config and tokenizer config at custom code that creates `marker`."""
    shutil.copytree(model_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "forge_custom"
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}
    (directory / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["custom.CustomTokenizer", None]}
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (directory / "custom.py").write_text(textwrap.dedent(f"""\
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("custom code ran")
        from transformers import PretrainedConfig, PreTrainedTokenizerFast
        class CustomConfig(PretrainedConfig):
            model_type = "forge_custom"
        class CustomModel:
            pass
        class CustomTokenizer(PreTrainedTokenizerFast):
            pass
    """))


def test_remote_code_never_runs_on_load(tiny_model_dir, tmp_path):
    directory = tmp_path / "custom"
    marker = tmp_path / "custom-code-ran"
    write_remote_code_model(directory, tiny_model_dir, marker)

    with pytest.raises(ForgeError, match="custom code"):
        load_model(str(directory))
    tokenizer = load_tokenizer(str(directory))

    assert type(tokenizer).__name__ != "CustomTokenizer"
    assert not marker.exists()


def test_remote_code_never_runs_on_finetune_plan(tiny_model_dir, tmp_path, forge_env):
    directory = tmp_path / "custom"
    marker = tmp_path / "custom-code-ran"
    write_remote_code_model(directory, tiny_model_dir, marker)
    env = {**forge_env, "HF_MODULES_CACHE": str(tmp_path / "modules")}

    # The "y" replies to the prompt that transformers shows on stdin when trust_remote_code is unset.
    result = subprocess.run([FORGE, "finetune", "--model", str(directory), "--dry-run"], input="y\ny\n",
                            capture_output=True, text=True, env=env, timeout=300)

    assert not marker.exists()
    assert result.returncode == 1


# Plugins


def run_forge(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([FORGE, *args], capture_output=True, text=True, env=env, timeout=300)


def test_plugin_with_invalid_hookimpl_skipped(tmp_path, forge_env):
    install_plugin(tmp_path, "forge_bad_signature", """\
        from llmforge.hookspecs import hookimpl

        @hookimpl
        def forge_commands(cli, unknown_argument):
            pass
    """)
    env = {**forge_env, "PYTHONPATH": str(tmp_path)}

    listing = run_forge("plugins", "--json", env=env)
    models = run_forge("models", "--json", env=env)

    assert listing.returncode == 0, listing.stderr
    document = json.loads(listing.stdout)
    assert [error["name"] for error in document["errors"]] == ["forge_bad_signature"]
    assert "unknown_argument" in document["errors"][0]["error"]
    assert "forge_bad_signature" not in [plugin["name"] for plugin in document["plugins"]]
    assert "plugin 'forge_bad_signature' failed to load and is skipped" in listing.stderr
    assert models.returncode == 0


def test_empty_load_plugins_imports_none(tmp_path, forge_env):
    marker = tmp_path / "plugin-imported"
    install_plugin(tmp_path, "forge_marker_plugin", f"""\
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("imported")
    """)
    env = {**forge_env, "PYTHONPATH": str(tmp_path), "FORGE_LOAD_PLUGINS": ""}

    result = run_forge("plugins", "--json", env=env)

    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["plugins"] == []
    assert document["errors"] == []
    assert not marker.exists()
    assert run_forge("plugins", "--json", env={**env, "FORGE_LOAD_PLUGINS": "forge_marker_plugin"}).returncode == 0
    assert marker.exists()
