"""Resumable state of a zeroth-order run: OUTPUT.partial/ contains the newest step's trainable state.

A zeroth-order step is a pure function of (seed, step, state): its batch and its noise are drawn
from the seed. So the trainable state (fp32 weights or LoRA factors, LoZO's accumulated update
and momentum) plus the step number is all a resumed run needs to continue exactly where an
uninterrupted one would be. Each save is one safetensors file written atomically, with the step
and the history so far in its metadata. The older file is removed only after the new one is in
place, so a kill at any moment leaves a loadable state.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmforge.checkpoint import load_tensors, partial_directory, read_metadata, save_tensors, write_json
from llmforge.errors import ForgeError

SETTINGS_FILE = "zo_settings.json"


@dataclass
class History:
    """The run's report so far: mean probe loss per step, dev evaluations, and the steps it resumed at."""

    losses: list[list[float]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    resumed_at: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"losses": self.losses, "evaluations": self.evaluations, "resumed_at": self.resumed_at}


@dataclass
class Restored:
    step: int
    tensors: dict[str, Any]
    history: History


class PartialRun:
    """The OUTPUT.partial directory: settings that must match on --resume, and the newest state."""

    def __init__(self, output: Path, settings: dict[str, Any]):
        self.output = Path(output)
        self.directory = partial_directory(output)
        self.settings = json.loads(json.dumps(settings))

    def open(self, *, resume: bool, overwrite: bool) -> Restored | None:
        """Start fresh (removing an old partial run only with `overwrite`) or return the state to resume.

        A fresh run creates the directory at its first save, so a run that fails before saving
        leaves nothing behind.
        """
        if not resume:
            if self.directory.exists() and not overwrite:
                raise ForgeError(f"an unfinished run of {self.output} is in {self.directory}; pass --resume to "
                                 "continue it, or --overwrite to discard it and start over")
            shutil.rmtree(self.directory, ignore_errors=True)
            return None

        latest = self.latest()
        if latest is None:
            raise ForgeError(f"--resume: no saved state in {self.directory}; pass --save-every N so that a run "
                             "saves one, and start this run again without --resume")
        self._check_settings()
        metadata = read_metadata(latest)
        history = History(**json.loads(metadata["history"]))
        step = int(metadata["step"])
        history.resumed_at.append(step)
        return Restored(step, load_tensors(latest), history)

    def latest(self) -> Path | None:
        states = sorted(self.directory.glob("state-[0-9]*.safetensors")) if self.directory.is_dir() else []
        return states[-1] if states else None

    def _check_settings(self) -> None:
        saved = json.loads((self.directory / SETTINGS_FILE).read_text(encoding="utf-8"))
        for name in sorted(set(saved) | set(self.settings)):
            if saved.get(name) != self.settings.get(name):
                flag = "--" + name.replace("_", "-")
                raise ForgeError(f"--resume: {flag} was {saved.get(name)!r} in the saved run and is "
                                 f"{self.settings.get(name)!r} now; resume with the same settings, "
                                 "or pass --overwrite to start over")

    def save(self, step: int, tensors: dict[str, Any], history: History) -> None:
        """Write the state after `step` steps, then remove older states."""
        if not (self.directory / SETTINGS_FILE).is_file():
            self.directory.mkdir(parents=True, exist_ok=True)
            write_json(self.directory / SETTINGS_FILE, self.settings)
        path = self.directory / f"state-{step:08d}.safetensors"
        older = [state for state in self.directory.glob("state-[0-9]*.safetensors") if state != path]
        metadata = {"step": str(step), "history": json.dumps(history.as_dict())}
        save_tensors(path, tensors, metadata)
        for state in older:
            state.unlink(missing_ok=True)

    def discard(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
