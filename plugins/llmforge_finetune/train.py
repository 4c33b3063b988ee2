"""The training loop: AdamW, warmup with a cosine or constant schedule, gradient clipping and accumulation.

Callable from Python without the command line:

    result = train(peft_model, tokenized_examples, TrainSettings(steps=100), pad_token_id=0)

Precision, measured on the 2-core AVX-512 development CPU with SmolLM2-135M, LoRA r=8 on all
linear layers and batches of 8 demo examples (about 265 tokens), forward + backward + step:
  bf16 base, bf16 LoRA factors, fp32 master copy (`precision="bf16"`): ~1.0 s, ~260 tokens/s;
  fp32 throughout (`precision="fp32"`): ~1.4 s, ~190 tokens/s;
  torch.autocast(bfloat16) on the fp32 model (`precision="autocast"`): ~1.7 s, ~155 tokens/s.
bf16 with masters is the default: over 15 steps its loss went 2.91 -> 1.33, fp32 2.91 -> 1.29. These
numbers are estimates from short runs on a machine shared with other jobs, measured before
packing (`TrainSettings.packing`, see packing.py) and the cheaper adapter dropout (dropout.py)
raised the bf16 rate on the same demo batches to about 340 tokens/s.
NOTE: when another process keeps both cores busy, two OpenMP threads per process can run 10-20x
slower than usual (spin-waiting at barriers). `forge finetune --threads 1` avoids that.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from llmforge.data import IGNORE_INDEX, PackedBatch, TokenizedExample, batch_order, collate, make_batches, pack
from llmforge.errors import ForgeError

from llmforge_finetune.distributed import World, broadcast_parameters, sum_gradients
from llmforge_finetune.packing import training_kernels

logger = logging.getLogger(__name__)

SCHEDULES = ("cosine", "constant")
PRECISIONS = ("bf16", "fp32", "autocast")


@dataclass
class TrainSettings:
    """Optimizer and schedule settings. Exactly one of `steps` and `epochs` sets the run length."""

    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_steps: int | None = None
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    precision: str = "bf16"
    packing: bool = True

    def validate(self) -> None:
        """Raise ForgeError on a value that cannot train."""
        checks = [
            (self.steps is not None and self.epochs is not None, "pass either --steps or --epochs, not both"),
            (self.steps is not None and self.steps <= 0, f"invalid --steps {self.steps}; it must be positive"),
            (self.epochs is not None and not self.epochs > 0, f"invalid --epochs {self.epochs}; it must be positive"),
            (self.batch_size <= 0, f"invalid --batch-size {self.batch_size}; it must be positive"),
            (self.grad_accum <= 0, f"invalid --grad-accum {self.grad_accum}; it must be positive"),
            (not (self.lr > 0 and math.isfinite(self.lr)), f"invalid --lr {self.lr}; it must be a positive number"),
            (self.warmup_steps is not None and self.warmup_steps < 0,
             f"invalid --warmup-steps {self.warmup_steps}; it must be zero or positive"),
            (self.schedule not in SCHEDULES, f"invalid --schedule {self.schedule!r}; use one of {SCHEDULES}"),
            (not self.max_grad_norm > 0, f"invalid --max-grad-norm {self.max_grad_norm}; it must be positive"),
            (self.weight_decay < 0, f"invalid weight decay {self.weight_decay}; it must be zero or positive"),
            (self.precision not in PRECISIONS, f"invalid precision {self.precision!r}; use one of {PRECISIONS}"),
        ]
        for failed, message in checks:
            if failed:
                raise ForgeError(message)

    def total_steps(self, batches_per_epoch: int) -> int:
        """Return the number of optimizer steps of the run."""
        if self.steps is not None:
            return self.steps
        epochs = self.epochs if self.epochs is not None else 1.0
        return max(1, math.ceil(epochs * batches_per_epoch / self.grad_accum))

    def warmup(self, total: int) -> int:
        """Return the warmup length: the given one, or else 5% of the run (at most 100 steps)."""
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total)
        return min(100, total // 20)


@dataclass
class TrainResult:
    """Outcome of a training run: per-step loss, held-out loss as [step, loss] pairs, token counts and time."""

    steps: int
    tokens: int
    seconds: float
    loss_curve: list[float] = field(default_factory=list)
    eval_curve: list[list[float]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        """Training throughput over all tokens of the batches (of all processes), padding excluded."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def final_loss(self) -> float | None:
        """Mean loss of the last 10 steps, or None before the first step."""
        tail = self.loss_curve[-10:]
        return sum(tail) / len(tail) if tail else None

    @property
    def final_eval_loss(self) -> float | None:
        """Held-out loss after the last step, or None without held-out data."""
        return self.eval_curve[-1][1] if self.eval_curve else None


def learning_rate(step: int, *, base: float, warmup: int, total: int, schedule: str) -> float:
    """Return the learning rate of optimizer step `step` (0-based): linear warmup, then cosine to 0 or constant."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def completion_loss(model, batch, reduction: str = "mean"):
    """Return the cross-entropy over the labelled tokens of a batch: their mean, or with `reduction="sum"` their sum.

    Logits are computed only at the positions that have a label: the decoder runs once, and the
    output embedding (49k x 576 for SmolLM2, the largest matmul per token) is applied to the
    selected hidden states only. For prompt-heavy data such as the demo this removes most of
    the output-layer cost. Models without a separate decoder fall back to the full forward.
    """
    import torch
    import torch.nn.functional as F

    from llmforge_finetune.packing import packed_forward

    labels = batch.labels[:, 1:]
    mask = labels != IGNORE_INDEX
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    head = base.get_output_embeddings()

    if decoder is None or head is None:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        return F.cross_entropy(logits[mask].float(), labels[mask], reduction=reduction)

    if isinstance(batch, PackedBatch):
        hidden = packed_forward(decoder, batch)
    else:
        hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    logits = head(hidden[:, :-1][mask]).float()
    softcap = getattr(base.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, labels[mask], reduction=reduction)


class MasterWeights:
    """fp32 copies of low-precision trainable parameters, which the optimizer updates.

    bf16 has an 8-bit mantissa, so small updates such as lr * grad ~ 1e-6 vanish when added to
    bf16 weights directly. The optimizer steps the fp32 copies, and the model gets them back
    rounded to bf16 after each step.
    """

    def __init__(self, parameters: Sequence):
        import torch

        self.model_params = list(parameters)
        self.masters = [p.detach().to(torch.float32).clone().requires_grad_(True) for p in self.model_params]

    def copy_grads_to_masters(self) -> None:
        for param, master in zip(self.model_params, self.masters):
            master.grad = None if param.grad is None else param.grad.to(master.dtype)

    def promote_model_to_fp32(self) -> None:
        """Replace the model's low-precision trainable parameters by their fp32 masters (for saving)."""
        for param, master in zip(self.model_params, self.masters):
            param.data = master.detach()

    def copy_masters_to_model(self) -> None:
        import torch

        with torch.no_grad():
            for param, master in zip(self.model_params, self.masters):
                param.copy_(master)
                param.grad = None


@dataclass
class HeldOut:
    """Held-out examples whose mean loss is computed every `every` steps and after the last step."""

    examples: Sequence[TokenizedExample]
    every: int | None = None

    def is_due(self, step: int, total: int) -> bool:
        """Return True when the held-out loss is computed after `step` (1-based)."""
        return step == total or (self.every is not None and step % self.every == 0)


def train(model, examples: Sequence[TokenizedExample], settings: TrainSettings, *, pad_token_id: int,
          progress: bool = True, step_hook: Callable[[int], None] | None = None,
          regularizer: Callable[[], Any] | None = None, held_out: HeldOut | None = None,
          partial=None, world: World | None = None) -> TrainResult:
    """Train the trainable parameters of `model` on `examples` and return the loss curve and counts.

    `regularizer()` returns a loss term added to every micro-batch loss (the loss curve records the
    completion loss without it). `step_hook(step)` runs after each optimizer step while the model's
    gradients are still set. With bf16 master weights the masters overwrite the model's parameters
    after the hook, so methods that edit parameters in the hook must train in fp32.
    `held_out` adds the eval curve. `partial` (a `resume.PartialRun`) restores a saved state before
    the first step and saves one at its checkpoint steps.
    `world` (default: one process) trains data parallel: every process passes the same examples
    and settings, rank 0's trainable parameters are copied to all ranks, each rank runs its share
    of every micro-batch, and only rank 0 shows progress and saves the partial state.
    Raises ForgeError when the loss becomes NaN or infinite (the usual cause is a too high --lr).
    """
    import torch
    from tqdm.auto import tqdm

    world = world or World()
    settings.validate()
    world.check_batch_size(settings.batch_size)
    world.connect()
    torch.manual_seed(settings.seed)
    broadcast_parameters(world, [p for p in model.parameters() if p.requires_grad])
    named, masters, optimizer = _make_optimizer(model, settings)
    trainable = [p for _, p in named]

    batches_per_epoch = math.ceil(len(examples) / settings.batch_size)
    total = settings.total_steps(batches_per_epoch)
    warmup = settings.warmup(total)
    result = _start_result(settings, partial, named, masters, optimizer, model, world)
    first = result.steps
    batches = _batch_stream(examples, settings, skip=first * settings.grad_accum)

    model.train()
    bar = tqdm(total=total, initial=first, desc="finetune", unit="step", disable=not (progress and world.is_main),
               dynamic_ncols=True)
    start = time.perf_counter() - result.seconds
    with training_kernels(model, packing=settings.packing) as packing:
        make_batch = pack if packing else lambda rows: collate(rows, pad_token_id)
        for step in range(first, total):
            loss, tokens = _accumulate(model, batches, settings, regularizer, trainable=trainable, world=world,
                                       make_batch=make_batch)
            if not math.isfinite(loss):
                bar.close()
                _raise_non_finite(loss, step + 1, settings, partial, world)

            lr = learning_rate(step, base=settings.lr, warmup=warmup, total=total, schedule=settings.schedule)
            _optimizer_step(optimizer, masters, trainable, settings.max_grad_norm, lr,
                            None if step_hook is None else lambda: step_hook(step))

            result.steps += 1
            result.tokens += tokens
            result.loss_curve.append(round(loss, 5))
            if held_out is not None and held_out.is_due(step + 1, total):
                eval_loss = evaluate_loss(model, held_out.examples, settings, pad_token_id=pad_token_id, world=world)
                result.eval_curve.append([step + 1, round(eval_loss, 6)])
            _show_step(bar, loss, lr, result)
            if partial is not None and partial.is_due(step + 1, total):
                result.seconds = time.perf_counter() - start
                _save_partial(partial, step + 1, result, named, masters, optimizer, model, world)

    result.seconds = time.perf_counter() - start
    bar.close()
    if masters is not None:
        masters.promote_model_to_fp32()
    model.eval()
    return result


def _show_step(bar, loss: float, lr: float, result: TrainResult) -> None:
    postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}"}
    if result.eval_curve:
        postfix["eval_loss"] = f"{result.eval_curve[-1][1]:.4f}"
    bar.update(1)
    bar.set_postfix(postfix)


def _save_partial(partial, step: int, result: TrainResult, named, masters, optimizer, model, world: World) -> None:
    import torch

    # Each rank's dropout has drawn from its own generator, so every rank's state is saved.
    rng_states = world.all_gather(torch.get_rng_state())
    if world.is_main:
        partial.save(step, result, named, masters, optimizer, model, rng_states=rng_states)


def _start_result(settings: TrainSettings, partial, named, masters, optimizer, model, world: World) -> TrainResult:
    """Return an empty result, or with `partial` resuming, restore the saved state and return its curves and counts."""
    result = TrainResult(steps=0, tokens=0, seconds=0.0, settings=asdict(settings))
    restored = partial.restore(named, masters, optimizer, model, rank=world.rank) if partial is not None else None
    if restored is not None:
        result.steps, result.tokens, result.seconds = restored.step, restored.tokens, restored.seconds
        result.loss_curve, result.eval_curve = list(restored.loss_curve), [list(p) for p in restored.eval_curve]
    return result


def _make_optimizer(model, settings: TrainSettings):
    """Return the named trainable parameters, their fp32 masters (None when they are fp32) and AdamW over them."""
    import torch

    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ForgeError("the model has no trainable parameters")
    trainable = [p for _, p in named]
    masters = MasterWeights(trainable) if trainable[0].dtype != torch.float32 else None
    optimizer = torch.optim.AdamW(masters.masters if masters else trainable, lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    return named, masters, optimizer


def _raise_non_finite(loss: float, step: int, settings: TrainSettings, partial, world: World) -> None:
    message = (f"the training loss became {loss} at step {step}; lower --lr (now {settings.lr}) or "
               "--max-grad-norm, or check the data")
    if partial is not None and world.is_main:
        message += "; " + partial.stop_message(step, loss)
    # Every rank gets the same summed loss and stops here. The others wait until rank 0 has marked
    # the partial directory, because a launcher stops all workers once one of them exits.
    world.barrier()
    raise ForgeError(message)


def evaluate_loss(model, examples: Sequence[TokenizedExample], settings: TrainSettings, *, pad_token_id: int,
                  world: World | None = None) -> float:
    """Return the mean completion loss over all labelled tokens of `examples`, without gradients.

    Batches are weighted by their labelled-token count, so the result does not depend on the batch
    size. With a `world` of several processes, each rank computes its contiguous share of the
    examples and the summed losses and counts are added up, so every rank returns the same value
    as one process would, up to float rounding. The model is put in eval mode (no dropout, which
    also leaves the random generators untouched) and back in train mode afterwards.
    """
    import torch

    world = world or World()
    local = world.shard(list(examples))
    was_training = model.training
    model.eval()
    loss_sum = 0.0
    count = 0
    with torch.inference_mode(), training_kernels(model, packing=settings.packing, dropout=False) as packing:
        batches = make_batches(local, max(1, settings.batch_size // world.size), pad_token_id=pad_token_id,
                               seed=0, packed=packing) if local else []
        for batch in batches:
            labelled = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
            if labelled == 0:
                continue
            loss_sum += _micro_batch_loss(model, batch, settings, reduction="sum").item()
            count += labelled
    if was_training:
        model.train()

    totals = world.all_reduce_sum(torch.tensor([loss_sum, float(count)], dtype=torch.float64))
    loss_sum, count = float(totals[0]), int(totals[1])
    return loss_sum / count if count else math.nan


def _batch_stream(examples, settings: TrainSettings, *, skip: int = 0):
    """Yield global micro-batches (lists of examples) forever, each epoch in a new seeded order; skip the first `skip`.

    The order depends only on the seed and the epoch, so a resumed run that skips the batches it
    has already trained on gets the same batches as an uninterrupted run. Under data parallelism
    every rank builds the same global batches and `_accumulate` takes its share of each.
    """
    batches_per_epoch = math.ceil(len(examples) / settings.batch_size)
    epoch, offset = divmod(skip, batches_per_epoch)
    while True:
        yield from batch_order(examples, settings.batch_size, seed=settings.seed + epoch)[offset:]
        offset = 0
        epoch += 1


def _micro_batch_loss(model, batch, settings: TrainSettings, *, reduction: str):
    import torch

    if settings.precision == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return completion_loss(model, batch, reduction)
    return completion_loss(model, batch, reduction)


def _labelled_count(example: TokenizedExample) -> int:
    """Labelled tokens of an example that the loss counts: all but the first token's, which nothing predicts."""
    return sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)


def _accumulate(model, batches, settings: TrainSettings, regularizer=None, *, trainable=(),
                world: World | None = None, make_batch: Callable = pack) -> tuple[float, int]:
    """Run forward and backward on one optimizer step's micro-batches; return its mean completion loss and token count.

    The step's loss is the mean over all its labelled tokens: those of its grad_accum global
    micro-batches, of which this rank runs its contiguous share of examples, turned into tensors
    by `make_batch` (packed or padded). Each share's summed cross-entropy is divided by the step's
    global labelled-token count, and the gradients of `trainable` are then summed over the ranks.
    One process with batch 8, two with batch 8, and one with batch 4 and grad_accum 2 thus compute
    the same gradient up to float rounding. The regularizer is weighted so that it counts once per
    step in total. The loss and token count are those of all ranks together.
    """
    world = world or World()
    micro_batches = [next(batches) for _ in range(settings.grad_accum)]
    # Every rank builds the same global micro-batches, so each counts the global tokens without communication.
    labelled = sum(_labelled_count(example) for rows in micro_batches for example in rows)
    tokens = sum(len(example.input_ids) for rows in micro_batches for example in rows)

    loss_sum = 0.0
    for rows in micro_batches:
        objective = None
        local = world.shard(rows)
        if local:
            loss = _micro_batch_loss(model, make_batch(local), settings, reduction="sum")
            loss_sum += loss.item()
            objective = loss / max(labelled, 1)
        if regularizer is not None:
            term = regularizer() / (settings.grad_accum * world.size)
            objective = term if objective is None else objective + term
        if objective is not None:
            objective.backward()

    loss_sum = sum_gradients(world, trainable, loss_sum)
    return (loss_sum / labelled if labelled else math.nan), tokens


def _optimizer_step(optimizer, masters: MasterWeights | None, trainable, max_grad_norm: float, lr: float,
                    after_step: Callable[[], None] | None = None) -> None:
    import torch

    if masters is not None:
        masters.copy_grads_to_masters()
        parameters = masters.masters
    else:
        parameters = trainable

    torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    if after_step is not None:
        after_step()
    optimizer.zero_grad(set_to_none=True)

    if masters is not None:
        masters.copy_masters_to_model()
