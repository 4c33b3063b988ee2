"""Data-parallel training across processes started by `torchrun` or `accelerate launch`.

Both launchers set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in each process's
environment. Without WORLD_SIZE (or with WORLD_SIZE=1) the run is a single process and every
collective below is a no-op, so the training loop calls them unconditionally.

The process group uses gloo for CPU tensors and, when CUDA is available, NCCL for CUDA tensors.
The training loop keeps the model on the CPU, so its collectives go through gloo.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from llmforge.errors import ForgeError

ENVIRONMENT_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# How long a rank waits in a collective for the others. Rank 0 saves checkpoints and writes the
# output while the others wait, so those writes must finish within it. A failed rank is usually
# noticed sooner, because torchrun stops all workers once one of them exits with an error.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run: its rank, the number of processes and its rank on the node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, *, connect: bool = True) -> "World":
        """Read the launcher's variables and, with `connect` and more than one process, join the process group.

        Pass `connect=False` to validate the settings first and call `connect()` later, so that
        errors every rank raises alike happen before any process waits for the others.
        Raises ForgeError naming the variable that is missing or invalid.
        """
        environ = os.environ if environ is None else environ
        size = _integer_variable(environ, "WORLD_SIZE", default=1)
        if size < 1:
            raise ForgeError(f"invalid WORLD_SIZE {size}; it must be at least 1")
        if size == 1:
            return cls()

        missing = [name for name in ENVIRONMENT_VARIABLES if not environ.get(name)]
        if missing:
            raise ForgeError(f"WORLD_SIZE is {size} but {', '.join(missing)} is not set; start the run with "
                             "`torchrun --nproc-per-node N forge finetune ...` or `accelerate launch`, "
                             "or unset WORLD_SIZE for a single process")
        rank = _integer_variable(environ, "RANK")
        if not 0 <= rank < size:
            raise ForgeError(f"invalid RANK {rank}; it must be in [0, {size - 1}] for WORLD_SIZE {size}")
        _integer_variable(environ, "MASTER_PORT")
        world = cls(rank=rank, size=size, local_rank=_integer_variable(environ, "LOCAL_RANK"))
        if connect:
            world.connect()
        return world

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that shows progress and writes the outputs."""
        return self.rank == 0

    def connect(self) -> None:
        """Join the default process group, unless this is a single process or the group exists already."""
        if self.size == 1:
            return
        import torch
        import torch.distributed as dist

        if dist.is_initialized():
            if dist.get_world_size() != self.size:
                raise ForgeError(f"the process group has {dist.get_world_size()} processes but WORLD_SIZE is "
                                 f"{self.size}")
            return
        # NOTE: the training loop keeps its tensors on the CPU, so only gloo carries traffic. The NCCL
        # part is there for CUDA tensors and has not been run; no device is selected for it here.
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        # init_method "env://" reads MASTER_ADDR and MASTER_PORT.
        dist.init_process_group(backend=backend, init_method="env://", rank=self.rank, world_size=self.size,
                                timeout=PROCESS_GROUP_TIMEOUT)

    def check_batch_size(self, batch_size: int) -> None:
        """Raise ForgeError unless the global micro-batch splits evenly over the processes."""
        if batch_size % self.size:
            raise ForgeError(f"invalid --batch-size {batch_size} for a world size of {self.size}: --batch-size is "
                             f"the global micro-batch over all processes and must be divisible by {self.size}")

    def shard(self, items: Sequence[Any]) -> Sequence[Any]:
        """Return this rank's contiguous share of `items`; the shares of all ranks differ in length by at most one."""
        count = len(items)
        return items[self.rank * count // self.size:(self.rank + 1) * count // self.size]

    def all_reduce_sum(self, tensor):
        """Sum `tensor` over all processes in place and return it."""
        if self.size > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast(self, tensor, source: int = 0):
        """Overwrite `tensor` in place with rank `source`'s copy and return it."""
        if self.size > 1:
            import torch.distributed as dist

            dist.broadcast(tensor, src=source)
        return tensor

    def all_gather(self, tensor) -> list:
        """Return every rank's copy of `tensor`, by rank; all copies must have the same shape and dtype."""
        if self.size == 1:
            return [tensor]
        import torch
        import torch.distributed as dist

        gathered = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(gathered, tensor)
        return gathered

    def barrier(self) -> None:
        """Wait until every process reaches this point."""
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Leave the process group; a no-op for a single process or when the group was never joined."""
        if self.size == 1:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def broadcast_parameters(world: World, parameters: Sequence) -> None:
    """Copy rank 0's values of `parameters` to every rank, in one broadcast of a flat fp32 buffer."""
    if world.size == 1 or not parameters:
        return
    import torch

    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1).to(torch.float32) for p in parameters])
        world.broadcast(flat)
        offset = 0
        for parameter in parameters:
            parameter.copy_(flat[offset:offset + parameter.numel()].view_as(parameter))
            offset += parameter.numel()


def sum_gradients(world: World, parameters: Sequence, loss_sum: float) -> float:
    """Sum the gradients of `parameters` and `loss_sum` over all ranks in one all-reduce; return the summed loss.

    The gradients travel in one flat fp32 buffer and come back in each parameter's dtype. A rank
    whose share of the batch was empty has no gradient and adds zeros. A parameter without a
    gradient on every rank keeps `grad` None, as in a single process.
    """
    if world.size == 1:
        return loss_sum
    import torch

    parts = []
    for parameter in parameters:
        grad = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
        parts.append(grad.detach().reshape(-1).to(torch.float32))
    present = [0.0 if parameter.grad is None else 1.0 for parameter in parameters]
    parts.append(torch.tensor([*present, loss_sum], dtype=torch.float32))
    flat = world.all_reduce_sum(torch.cat(parts))

    offset = 0
    for index, parameter in enumerate(parameters):
        size = parameter.numel()
        if flat[-len(present) - 1 + index] > 0:
            parameter.grad = flat[offset:offset + size].view_as(parameter).to(parameter.dtype).clone()
        offset += size
    return float(flat[-1])


def _integer_variable(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = environ.get(name)
    if not value:
        if default is None:
            raise ForgeError(f"missing environment variable {name}")
        return default
    try:
        return int(value)
    except ValueError:
        raise ForgeError(f"invalid {name} {value!r}; it must be an integer") from None
