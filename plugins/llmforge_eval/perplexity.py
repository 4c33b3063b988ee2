"""Perplexity over a text with rolling windows.

The text is tokenized once. Window k covers tokens [k * stride, k * stride + max_length) and scores
only the tokens that no earlier window scored. So every token after the first is scored exactly once,
with up to max_length - stride tokens of context from the window before.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from llmforge.errors import ForgeError
from llmforge_eval.batching import model_device
from llmforge_eval.tasks import TaskSpec, read_task_records

# Memory cap for one batch of kept logits, in float32 values (2**27 values = 512 MiB).
_MAX_LOGIT_VALUES = 2**27


def read_text(spec: TaskSpec, path: Path) -> str:
    """Read the task's text: a records file joined on blank lines when `text_field` is set, else the raw file.

    Windows line endings (CRLF) become LF.
    """
    if spec.text_field:
        records = read_task_records(path)
        text = "\n\n".join(str(record.get(spec.text_field, "")) for record in records)
    else:
        text = path.read_text(encoding="utf-8-sig")
    return text.replace("\r\n", "\n")


def rolling_windows(total: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Return (begin, end, scored) per window: the window is tokens[begin:end] and its last `scored` are scored."""
    windows = []
    previous_end = 1  # the first token has no context, so it is never scored
    for begin in range(0, total, stride):
        end = min(begin + max_length, total)
        scored = end - previous_end
        if scored > 0:
            windows.append((begin, end, scored))
        previous_end = end
        if end == total:
            break
    return windows


def window_losses(model, token_ids: list[int], windows: list[tuple[int, int, int]], batch_size: int,
                  progress=None) -> list[tuple[float, int]]:
    """Summed negative log-likelihood (nats) and scored-token count per window, batched by window length."""
    import torch

    device = model_device(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    results: list[tuple[float, int]] = [(0.0, 0)] * len(windows)

    groups: dict[tuple[int, int], list[int]] = {}
    for index, (begin, end, scored) in enumerate(windows):
        groups.setdefault((end - begin, scored), []).append(index)

    with torch.inference_mode():
        for (length, scored), indices in groups.items():
            rows = max(1, min(batch_size, _MAX_LOGIT_VALUES // ((scored + 1) * vocab)))
            for start in range(0, len(indices), rows):
                chunk = indices[start:start + rows]
                ids = torch.tensor([token_ids[windows[i][0]:windows[i][1]] for i in chunk], device=device)
                logits = model(input_ids=ids, logits_to_keep=scored + 1).logits[:, -(scored + 1):-1].float()
                losses = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), ids[:, -scored:].reshape(-1), reduction="none"
                ).view(len(chunk), scored).sum(dim=1)
                for index, loss in zip(chunk, losses.tolist()):
                    results[index] = (loss, scored)
                if progress is not None:
                    progress.update(len(chunk))
    return results


def score_perplexity(model, tokenizer, spec: TaskSpec, path: Path, batch_size: int, limit: int | None,
                     progress=None) -> dict[str, Any]:
    """Score a perplexity task: token-level perplexity, bits per byte and a standard error from window losses.

    `limit` caps the number of windows (the first ones). Bits per byte divide the summed loss by the
    UTF-8 bytes of the scored text, measured by decoding the scored tokens.
    """
    text = read_text(spec, path)
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(token_ids) < 2:
        raise ForgeError(f"Text of task {spec.name!r} ({path}) has fewer than 2 tokens; nothing to score.")

    windows = rolling_windows(len(token_ids), spec.max_length, spec.stride)
    if limit is not None:
        windows = windows[:limit]
    if progress is not None:
        progress.reset(total=len(windows))
    losses = window_losses(model, token_ids, windows, batch_size, progress)

    total_loss = sum(loss for loss, _ in losses)
    total_tokens = sum(count for _, count in losses)
    mean_loss = total_loss / total_tokens
    perplexity = math.exp(mean_loss)

    scored_text = tokenizer.decode(token_ids[1:windows[-1][1]])
    scored_bytes = len(scored_text.encode("utf-8"))
    bits_per_byte = total_loss / math.log(2) / scored_bytes

    stderr = _perplexity_stderr([loss / count for loss, count in losses], perplexity)
    metrics = {"perplexity": perplexity, "mean_nll": mean_loss, "bits_per_byte": bits_per_byte,
               "tokens": total_tokens, "bytes": scored_bytes, "windows": len(windows),
               "max_length": spec.max_length, "stride": spec.stride}
    return {"metric": "perplexity", "score": perplexity, "stderr": stderr, "n": len(windows),
            "higher_is_better": False, "metrics": metrics}


def _perplexity_stderr(window_means: list[float], perplexity: float) -> float | None:
    """Standard error of the perplexity by the delta method on the per-window mean losses.

    NOTE: windows are treated as independent samples although neighbouring windows share context,
    so this is an estimate. With a single window there is no spread, and the result is None.
    """
    n = len(window_means)
    if n < 2:
        return None
    mean = sum(window_means) / n
    variance = sum((value - mean) ** 2 for value in window_means) / (n - 1)
    return perplexity * math.sqrt(variance / n)
