"""The in-progress state of a run in OUTPUT.partial/: checkpoints along the path, and resuming after a kill.

Layout of OUTPUT.partial/ (a sibling of the output directory, removed when the run finishes):

    state-000100/trainer.json            step, settings, loss and eval curves, token count, seconds,
                                         Python `random` state, optimizer param groups, AdaLoRA rank pattern
    state-000100/trainable.safetensors   trainable parameters in fp32 (the master copies under bf16),
                                         plus AdaLoRA's importance scores ("adalora.*")
    state-000100/optimizer.safetensors   AdamW state tensors (step, exp_avg, exp_avg_sq per parameter)
    state-000100/rng.safetensors         torch CPU random generator state ("torch_cpu"; under data
                                         parallelism also "torch_cpu.rank1" ... of the other ranks)
    checkpoints/step-000100/             the trainable state at that step: a PEFT adapter directory,
                                         or for --method full the trainable parameters as safetensors
    stopped.json                         written when the loss became NaN or infinite

Each directory is written under a temporary name and renamed when complete, so a run killed at any
moment resumes from its newest complete state. The two newest state-* directories are kept, because
a NaN or infinite loss right after a save means the saved weights themselves diverged.
The data order needs no file: each epoch's order follows from the seed, and a resumed run skips
step * grad_accum batches. Nothing is unpickled: tensors are safetensors files and scalars are JSON.
NOTE: only the CPU random generator is saved; a run on a GPU with dropout would not resume exactly.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llmforge.checkpoint import partial_directory
from llmforge.errors import ForgeError
from llmforge.staging import remove_stale_staging, staging_prefix

STATE_FORMAT = "llmforge.finetune.partial/1"
# Settings that may change on --resume after a run stopped on a NaN or infinite loss.
RETUNABLE_AFTER_STOP = ("--lr", "--max-grad-norm")
# Settings whose mismatch is reported before any other on --resume.
LEADING_SETTINGS = ("--model", "--method")
# Test hook: the process kills itself with SIGKILL right after saving the state of this step.
KILL_AFTER_STEP_VARIABLE = "LLMFORGE_FINETUNE_KILL_AFTER_STEP"


@dataclass
class RestoredState:
    """Step, curves, token count and time of a saved state, which the training loop continues from."""

    step: int
    loss_curve: list[float]
    eval_curve: list[list[float]]
    tokens: int
    seconds: float


@dataclass
class PartialRun:
    """The OUTPUT.partial directory of one run: it saves the trainer state every `save_every` steps and restores it.

    `settings` maps option flags to the values that decide the trained weights (digests for the
    model and data). `save_checkpoint(directory, step)` writes the loadable checkpoint of the current step.
    """

    directory: Path
    settings: dict[str, Any]
    save_every: int | None = None
    save_checkpoint: Callable[[Path, int], None] | None = None
    resumes: list[dict[str, Any]] = field(default_factory=list)
    restored: RestoredState | None = None
    _state_dir: Path | None = None

    @classmethod
    def open(cls, output: Path, settings: dict[str, Any], *, save_every: int | None, resume: bool,
             overwrite: bool, main: bool = True) -> "PartialRun":
        """Check the partial directory against the request: resume it, replace it (--overwrite) or reject.

        Only the `main` process (rank 0 of a data-parallel run) removes a directory that --overwrite replaces.
        """
        directory = partial_directory(output)
        if main:
            remove_stale_staging(directory)  # what a run killed while removing OUTPUT.partial left
        # A JSON round trip turns tuples into lists, so fresh settings compare equal to saved ones.
        settings = json.loads(json.dumps(settings))
        run = cls(directory=directory, settings=settings, save_every=save_every)
        latest = run.latest_state()
        if not resume:
            if directory.exists() and not overwrite and latest is None:
                # A run killed before its first state was complete: --resume would find nothing to continue.
                raise ForgeError(f"an unfinished run of {output} left {directory} with no saved state to resume; "
                                 "pass --overwrite to discard it and start over")
            if directory.exists() and not overwrite:
                raise ForgeError(f"an unfinished run of {output} is in {directory}; pass --resume to continue it, "
                                 "or --overwrite to discard it and start over")
            if main:
                _remove_tree(directory)
            return run
        if latest is None:
            again = "with --overwrite and without --resume" if directory.exists() else "without --resume"
            raise ForgeError(f"--resume: no saved state in {directory}; the run saved no checkpoint "
                             f"(pass --save-every N to save one), so start it again {again}")
        run._state_dir = latest
        run._check_settings(json.loads((latest / "trainer.json").read_text(encoding="utf-8")))
        if main:
            _remove_temporaries(directory)
        return run

    def latest_state(self) -> Path | None:
        """Return the newest complete state-* directory, or None."""
        states = sorted(self.directory.glob("state-[0-9]*")) if self.directory.is_dir() else []
        return states[-1] if states else None

    def checkpoint_steps(self) -> list[int]:
        """Return the steps of the checkpoints saved so far."""
        folder = self.directory / "checkpoints"
        return sorted(int(p.name.removeprefix("step-")) for p in folder.glob("step-*")) if folder.is_dir() else []

    def _check_settings(self, saved: dict[str, Any]) -> None:
        stopped = (self.directory / "stopped.json").is_file()
        changed = {}
        # The method and model are compared first because when they differ, most method options differ too.
        # The second sort is stable, so the other flags stay in alphabetical order.
        flags = sorted(set(saved["settings"]) | set(self.settings))
        flags.sort(key=lambda flag: flag not in LEADING_SETTINGS)
        for flag in flags:
            before, now = saved["settings"].get(flag), self.settings.get(flag)
            if before == now:
                continue
            if stopped and flag in RETUNABLE_AFTER_STOP:
                changed[flag] = {"before": before, "now": now}
                continue
            raise ForgeError(f"--resume: the unfinished run in {self.directory} used "
                             f"{_describe_setting(flag, before)}, this command asks for "
                             f"{_describe_setting(flag, now)}; resume with the same settings, or pass --overwrite "
                             "without --resume to start over")
        self.resumes = list(saved.get("resumes", []))
        self.resumes.append({"step": saved["step"], "changed": changed})

    def restore(self, named_trainable, masters, optimizer, model, *, rank: int = 0) -> RestoredState | None:
        """Load the saved state into the parameters, optimizer and random generators; None when not resuming.

        Under data parallelism every rank reads the same directory, so it must be on a file system
        that all ranks share, and each rank restores its own random generator state (`rank`).
        """
        import torch

        from llmforge.checkpoint import load_tensors

        if self._state_dir is None:
            return None
        state = json.loads((self._state_dir / "trainer.json").read_text(encoding="utf-8"))
        tensors = load_tensors(self._state_dir / "trainable.safetensors")
        names = [name for name, _ in named_trainable]
        if sorted(names) != sorted(key for key in tensors if not key.startswith("adalora.")):
            raise ForgeError(f"--resume: the trainable parameters differ from those saved in {self._state_dir}; "
                             "pass --overwrite without --resume to start over")
        with torch.no_grad():
            for index, (name, parameter) in enumerate(named_trainable):
                if masters is not None:
                    masters.masters[index].copy_(tensors[name])
                parameter.copy_(tensors[name])

        optimizer.load_state_dict(_optimizer_state_from(load_tensors(self._state_dir / "optimizer.safetensors"),
                                                        state["optimizer_param_groups"]))
        _restore_adalora(model, state.get("adalora_rank_pattern"), tensors)
        rng = load_tensors(self._state_dir / "rng.safetensors")
        torch.set_rng_state(rng["torch_cpu" if rank == 0 else f"torch_cpu.rank{rank}"].clone())
        version, internal, gauss = state["python_random_state"]
        random.setstate((version, tuple(internal), gauss))
        self.restored = RestoredState(step=state["step"], loss_curve=state["loss_curve"],
                                      eval_curve=state["eval_curve"], tokens=state["tokens"], seconds=state["seconds"])
        return self.restored

    def save(self, step: int, result, named_trainable, masters, optimizer, model, *, rng_states=None) -> None:
        """Write the checkpoint and the trainer state of `step`, then drop the older state.

        `rng_states` lists each rank's torch CPU generator state under data parallelism; by
        default the state of this process is saved. Only rank 0 calls this.
        """
        import torch

        from llmforge.checkpoint import atomic_directory, save_tensors, write_json

        trainable = {name: (masters.masters[i] if masters is not None else p).detach().float()
                     for i, (name, p) in enumerate(named_trainable)}
        if not all(bool(torch.isfinite(tensor).all()) for tensor in trainable.values()):
            raise ForgeError(f"the trainable parameters became NaN or infinite at step {step}; lower --lr or "
                             "--max-grad-norm; " + self.stop_message(step, math.nan, weights_diverged=True))
        trainable.update(_adalora_tensors(model))

        if self.save_checkpoint is not None:
            target = self.directory / "checkpoints" / f"step-{step:06d}"
            with atomic_directory(target, overwrite=True, marker=None) as folder:
                self.save_checkpoint(folder, step)

        optimizer_tensors, param_groups = _optimizer_state_to(optimizer)
        state = {"format": STATE_FORMAT, "step": step, "settings": self.settings, "resumes": self.resumes,
                 "loss_curve": result.loss_curve, "eval_curve": result.eval_curve, "tokens": result.tokens,
                 "seconds": result.seconds, "python_random_state": random.getstate(),
                 "optimizer_param_groups": param_groups, "adalora_rank_pattern": _adalora_rank_pattern(model)}
        with atomic_directory(self.directory / f"state-{step:06d}", overwrite=True, marker=None) as folder:
            save_tensors(folder / "trainable.safetensors", trainable)
            save_tensors(folder / "optimizer.safetensors", optimizer_tensors)
            rng_states = rng_states if rng_states is not None else [torch.get_rng_state()]
            save_tensors(folder / "rng.safetensors", {"torch_cpu" if rank == 0 else f"torch_cpu.rank{rank}": state
                                                      for rank, state in enumerate(rng_states)})
            write_json(folder / "trainer.json", state)

        # The two newest states are kept: a non-finite loss at the next step discards the newest.
        for older in sorted(self.directory.glob("state-[0-9]*"))[:-2]:
            _remove_tree(older)
        (self.directory / "stopped.json").unlink(missing_ok=True)
        if os.environ.get(KILL_AFTER_STEP_VARIABLE) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)

    def stop_message(self, step: int, loss: float, *, weights_diverged: bool = False) -> str:
        """Mark the run as stopped by a non-finite loss at `step` and return what the error message adds.

        A state saved right after step - 1 contains the weights that gave the non-finite loss, so it is
        dropped together with its checkpoint and the state before it is the last good one. With
        `weights_diverged`, the update of `step` itself made the weights non-finite and nothing was saved.
        """
        from llmforge.checkpoint import write_json

        latest = self.latest_state()
        if latest is not None and not weights_diverged and _step_of(latest) == step - 1:
            _remove_tree(latest)
            _remove_tree(self.directory / "checkpoints" / f"step-{step - 1:06d}")
            latest = self.latest_state()
        if latest is None:
            return "no checkpoint from before the divergence was saved (pass --save-every N to keep one)"
        write_json(self.directory / "stopped.json", {"step": step, "loss": str(loss)})
        return (f"the state of step {_step_of(latest)} is kept in {self.directory}; rerun the same command with "
                "--resume and a lower --lr to continue from it")

    def is_due(self, step: int, total: int) -> bool:
        """Return True when `step` (1-based) is a checkpoint step; the last step is saved as the output itself."""
        return self.save_every is not None and step % self.save_every == 0 and step < total

    def discard(self) -> None:
        """Remove the partial directory after the run's output is written."""
        _remove_tree(self.directory)


def _remove_tree(path: Path) -> None:
    """Remove a directory, first renamed to a staging name so that a kill never leaves it half removed.

    A half-removed state-* directory would look like a state to resume from. What a kill leaves
    is removed by `_remove_temporaries` inside OUTPUT.partial, and beside it by the next run's
    `remove_stale_staging`.
    """
    renamed = path.with_name(f"{staging_prefix(path)}{os.urandom(4).hex()}.tmp")
    try:
        os.rename(path, renamed)
    except FileNotFoundError:
        return
    shutil.rmtree(renamed, ignore_errors=True)


def _remove_temporaries(directory: Path) -> None:
    """Remove what a kill inside atomic_write or atomic_directory leaves: ".NAME.*.tmp" and ".NAME.*.old" entries.

    Without this, a resumed run would hard-link the leftovers under checkpoints/ into its output.
    """
    for folder in (directory, directory / "checkpoints"):
        for leftover in folder.glob(".*"):
            if not leftover.name.endswith((".tmp", ".old")):
                continue
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _describe_setting(flag: str, value: Any) -> str:
    """Return a setting as the user would type it: "--method lora", "no --eval-data", or a digest for files."""
    if value is None:
        return f"no {flag}"
    if isinstance(value, str) and value.startswith("sha256:"):
        return f"{flag} with content digest {value}"
    if isinstance(value, str):
        return f"{flag} {value}" if re.fullmatch(r"[\w.:/+-]+", value) else f"{flag} {value!r}"
    return f"{flag} {json.dumps(value, sort_keys=True)}"


def _step_of(state_dir: Path) -> int:
    return int(state_dir.name.removeprefix("state-"))


def _optimizer_state_to(optimizer) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Split an optimizer's state_dict into tensors (keyed "INDEX.NAME") and JSON-able param groups."""
    import torch

    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            tensors[f"{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    groups = [{key: list(value) if isinstance(value, tuple) else value for key, value in group.items()}
              for group in state["param_groups"]]
    return tensors, groups


def _optimizer_state_from(tensors: dict[str, Any], param_groups: list[dict[str, Any]]) -> dict[str, Any]:
    """Rebuild an optimizer state_dict from `_optimizer_state_to`'s output."""
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor.clone()
    groups = [{key: tuple(value) if key == "betas" else value for key, value in group.items()} for group in param_groups]
    return {"state": state, "param_groups": groups}


def _rank_allocator(model):
    tuner = getattr(model, "base_model", None)
    return getattr(tuner, "rankallocator", None)


def _adalora_tensors(model) -> dict[str, Any]:
    """Return AdaLoRA's importance scores, which its rank allocation reads at every step."""
    allocator = _rank_allocator(model)
    if allocator is None:
        return {}
    return {f"adalora.{kind}.{name}": tensor.detach()
            for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc") for name, tensor in getattr(allocator, kind).items()}


def _adalora_rank_pattern(model):
    if _rank_allocator(model) is None:
        return None
    return model.peft_config["default"].rank_pattern


def _restore_adalora(model, rank_pattern, tensors: dict[str, Any]) -> None:
    allocator = _rank_allocator(model)
    if allocator is None:
        return
    for key, tensor in tensors.items():
        if key.startswith("adalora."):
            _, kind, name = key.split(".", 2)
            getattr(allocator, kind)[name] = tensor.clone()
    model.peft_config["default"].rank_pattern = rank_pattern
