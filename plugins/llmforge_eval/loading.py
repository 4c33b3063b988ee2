"""Models for one evaluation run: their digests, and each base model loaded once with adapters attached in turn.

An adapter is applied to its base with peft and never merged, so detaching it restores the base
weights exactly. All adapters of one base share the base's weights in memory: the base is loaded
once per run however many of its adapters are evaluated.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

from llmforge.cache import Cache
from llmforge.errors import ForgeError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """A model reference resolved on disk, with its digest and, for an adapter, its base model."""

    reference: str
    digest: str
    path: Path
    is_adapter: bool = False
    base_reference: str | None = None
    base_digest: str | None = None

    @property
    def host_reference(self) -> str:
        """The reference whose weights are loaded: the base model for an adapter, else the model itself."""
        return self.base_reference if self.is_adapter else self.reference

    @property
    def host_digest(self) -> str:
        """The digest of the weights that are loaded (see `host_reference`)."""
        return self.base_digest if self.is_adapter else self.digest


def describe_model(reference: str, cache: Cache) -> ModelInfo:
    """Resolve a reference and digest it (and its base, for an adapter) without loading any weights."""
    from llmforge.models import model_digest, resolve

    resolved = resolve(reference, cache=cache)
    digest = model_digest(reference, cache=cache)
    if not resolved.is_adapter:
        return ModelInfo(reference, digest, resolved.path)
    base_reference = resolved.base.reference
    return ModelInfo(reference, digest, resolved.path, is_adapter=True, base_reference=base_reference,
                     base_digest=model_digest(base_reference, cache=cache))


def check_adapter_bases(models: list[ModelInfo], baseline: ModelInfo | None) -> None:
    """Raise ForgeError when an adapter's base model is not the baseline (or the baseline's own base).

    A delta against a baseline measures what the adapter changed only when the adapter sits on
    that baseline. Models that are not adapters carry no base, so they are not checked.
    """
    if baseline is None:
        return
    allowed = {baseline.digest, baseline.base_digest} - {None}
    for info in models:
        if info.is_adapter and info.base_digest not in allowed:
            raise ForgeError(
                f"Adapter {info.reference} is based on {info.base_reference} ({info.base_digest}), but --baseline "
                f"{baseline.reference} is a different model ({baseline.digest}). Pass --baseline {info.base_reference}, "
                "or evaluate this adapter in a separate run."
            )


class BaseHost:
    """One base model in memory; adapters are attached to it one at a time and never merged.

    Adapters of the same peft type are swapped with `load_adapter`, `set_adapter` and
    `delete_adapter`. peft 0.21 rejects mixing adapter types in one PeftModel, so an adapter of
    another type first unloads the current ones, which removes their modules and leaves the base
    weights as they were loaded.
    """

    def __init__(self, reference: str, *, dtype: str, cache: Cache):
        from llmforge.models import load_model

        logger.info("loading %s (%s)", reference, dtype)
        self.loaded = load_model(reference, dtype=dtype, cache=cache)
        self.loads = 1
        self.dtype = dtype
        self.model = self.loaded.model
        self.peft_model = None
        self.active_adapter: str | None = None
        self.attached = 0

    def plain(self):
        """Return the base model as loaded, with no adapter attached."""
        import dataclasses

        self._unload_adapters()
        return dataclasses.replace(self.loaded, model=self.model)

    def with_adapter(self, info: ModelInfo):
        """Attach the adapter of `info` in place of the current one and return it as a LoadedModel."""
        from llmforge.models import LoadedModel

        self.attached += 1
        name = f"adapter{self.attached}"
        try:
            self._attach(info.path, name)
        except (ValueError, RuntimeError, KeyError) as error:
            detail = str(error)[:600]
            raise ForgeError(f"Adapter {info.reference} does not fit its base model {info.base_reference}: "
                             f"{detail}") from None
        return LoadedModel(self.peft_model, self.loaded.tokenizer, info.reference, info.digest, info.path,
                           is_adapter=True, base_reference=info.base_reference, base_digest=info.base_digest)

    def _attach(self, path: Path, name: str) -> None:
        import torch
        from peft import PeftConfig, PeftModel

        config = PeftConfig.from_pretrained(str(path))
        if self.peft_model is not None and self.peft_model.peft_type != config.peft_type:
            self._unload_adapters()

        with warnings.catch_warnings():
            # transformers 5.x warns about its own deprecated attribute whenever peft wraps a model.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            if self.peft_model is None:
                self.peft_model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name,
                                                            is_trainable=False)
            else:
                self.peft_model.load_adapter(str(path), adapter_name=name, is_trainable=False)
                self.peft_model.set_adapter(name)
                self.peft_model.delete_adapter(self.active_adapter)
        self.active_adapter = name

        # The same cast as llmforge.models.load_model, so scores match a run that loads the adapter alone.
        self.peft_model.to(getattr(torch, self.dtype)).eval()

    def _unload_adapters(self) -> None:
        if self.peft_model is None:
            return
        self.model = self.peft_model.unload()
        self.peft_model = None
        self.active_adapter = None
