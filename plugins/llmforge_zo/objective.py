"""Objectives of zeroth-order fine-tuning: what a batch is and how a state's loss is read off the model.

Two objectives:

- classification by verbalizers: a prompt template ends in a cue ("{sentence} It was") and each
  label has one word ("terrible", "great"). The loss is the cross-entropy over the options'
  log-probabilities. When every word is one token, one forward of the prompt scores all options
  at its last position (`OPTIONS`); otherwise each option is appended to the prompt as its own
  row and scored by the sum of its tokens' log-probabilities (`TOKENS` with `choices` > 1);
- language modelling on completions (the `forge finetune` data formats): the loss is the mean
  negative log-likelihood of the completion tokens (`TOKENS` with `choices` = 1).

A `ScoringBatch` contains the token rows of one batch. Scorers run those rows under several states
at once, state-major (the first block of model rows is the batch under state 0, and so on), and
hand the final hidden states to `state_losses`, which returns one loss per state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

OPTIONS = "options"
TOKENS = "tokens"


@dataclass
class ScoringBatch:
    """Token rows of one batch and where their losses are read.

    `input_ids` and `attention_mask` are R x T, right-padded. For `OPTIONS`, `positions[r]` is
    the last prompt token of row r, `option_ids` the K single-token options and `labels[r]` the
    correct option. For `TOKENS`, target token `target_ids[j]` of row `target_rows[j]` is
    predicted at position `target_positions[j]`. Rows come in groups of `choices` (one group
    per example, options in label order), and `labels` is the correct option of each group.
    """

    kind: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    option_ids: torch.Tensor | None = None
    target_rows: torch.Tensor | None = None
    target_positions: torch.Tensor | None = None
    target_ids: torch.Tensor | None = None
    choices: int = 1

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def examples(self) -> int:
        return self.rows // self.choices

    @property
    def classifies(self) -> bool:
        return self.kind == OPTIONS or self.choices > 1


@dataclass
class OutputHead:
    """The LM head as the loss needs it: the unembedding matrix and Gemma-style logit soft-capping."""

    weight: torch.Tensor
    softcap: float | None = None

    def logits(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Return hidden @ W^T (restricted to vocabulary `rows` when given), soft-capped if the model does."""
        weight = self.weight if rows is None else self.weight[rows]
        logits = hidden @ weight.to(hidden.dtype).T
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def output_head(model) -> OutputHead:
    """Return the `OutputHead` of a Hugging Face causal LM."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    return OutputHead(model.get_output_embeddings().weight, softcap)


@dataclass
class StateScores:
    """Per-state losses [S] and, for classification, per-state option scores [S, E, K]."""

    losses: torch.Tensor
    option_scores: torch.Tensor | None = None

    def correct(self, labels: torch.Tensor) -> torch.Tensor:
        """Return, per state, how many examples have their label as the best-scored option."""
        return (self.option_scores.argmax(dim=-1) == labels).sum(dim=-1)


def state_losses(batch: ScoringBatch, hidden: torch.Tensor, head: OutputHead, locate=None) -> StateScores:
    """Read each state's loss from final hidden states S x X x H, where X runs over every row's tokens.

    `locate(rows, positions)` maps batch rows and token positions to indices into X; the default
    is the padded layout, X = R * T.
    """
    states = hidden.shape[0]
    if locate is None:
        width = batch.input_ids.shape[1]
        locate = lambda rows, positions: rows * width + positions  # noqa: E731
    if batch.kind == OPTIONS:
        last = hidden[:, locate(torch.arange(batch.rows), batch.positions)]
        option_logits = head.logits(last.float(), batch.option_ids)
        return _option_losses(torch.log_softmax(option_logits, dim=-1), batch.labels)

    picked = hidden[:, locate(batch.target_rows, batch.target_positions)]
    log_probs = torch.log_softmax(head.logits(picked.float()), dim=-1)
    target_log_probs = log_probs.gather(-1, batch.target_ids.expand(states, -1).unsqueeze(-1)).squeeze(-1)
    return _token_losses(batch, target_log_probs)


def losses_from_logits(batch: ScoringBatch, logits: torch.Tensor) -> StateScores:
    """Read the loss of one state from full R x T x V logits (the conventional path)."""
    logits = logits.float()
    if batch.kind == OPTIONS:
        last = logits[torch.arange(batch.rows), batch.positions][:, batch.option_ids]
        return _option_losses(torch.log_softmax(last, dim=-1).unsqueeze(0), batch.labels)

    log_probs = torch.log_softmax(logits[batch.target_rows, batch.target_positions], dim=-1)
    target_log_probs = log_probs.gather(-1, batch.target_ids.unsqueeze(-1)).squeeze(-1)
    return _token_losses(batch, target_log_probs.unsqueeze(0))


def _option_losses(option_log_probs: torch.Tensor, labels: torch.Tensor) -> StateScores:
    picked = option_log_probs.gather(-1, labels.expand(option_log_probs.shape[0], -1).unsqueeze(-1))
    return StateScores(-picked.squeeze(-1).mean(dim=-1), option_log_probs)


def _token_losses(batch: ScoringBatch, target_log_probs: torch.Tensor) -> StateScores:
    """Turn per-target log-probabilities [S, M] into per-state losses."""
    states = target_log_probs.shape[0]
    if batch.choices == 1:
        return StateScores(-target_log_probs.sum(dim=-1) / target_log_probs.shape[-1])

    row_scores = torch.zeros(states, batch.rows, dtype=target_log_probs.dtype)
    row_scores.index_add_(1, batch.target_rows, target_log_probs)
    option_scores = row_scores.view(states, batch.examples, batch.choices)
    return _option_losses(torch.log_softmax(option_scores, dim=-1), batch.labels)
