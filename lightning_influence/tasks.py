"""Tasks: how a batch turns into a training loss and a query measurement.

A :class:`Task` tells the library three things about a batch:

* ``train_loss(model, batch, sample)``: the training loss summed over the batch's
  examples (not averaged: per-example gradients must be the gradients of each
  example's own loss). With ``sample=True`` the targets are drawn from the model's
  own predictive distribution (true Fisher, the paper's default); with
  ``sample=False`` the dataset's targets are used (empirical Fisher).
* ``measurement(model, batch)``: the query measurement f summed over the batch's
  queries; by default the log-likelihood of the query targets.
* ``token_mask(batch)``: ``[B, T]`` of which token positions exist (padding is
  excluded from every statistic), or ``None`` when every position counts.

Scores follow the sign of ``docs/method.md``, section 1: ``score = grad f^T (G + lambda I)^-1 grad(-L)``,
positive when training on the example made the query's measurement larger.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from lightning_influence.errors import TaskInputError

__all__ = ["Task", "ClassificationTask", "RegressionTask", "CausalLMTask", "batch_size_of"]



class Task:
    """Base class (and protocol) for tasks. Subclass and override the three methods."""

    def train_loss(self, model: nn.Module, batch: Any, sample: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The query measurement f summed over the batch (default for built-ins: log-likelihood)."""
        raise NotImplementedError

    def token_mask(self, batch: Any) -> torch.Tensor | None:
        return None

    def batch_size(self, batch: Any) -> int:
        return batch_size_of(batch)

    def query_target_count(self, batch: Any) -> torch.Tensor | None:
        """Per-query number of target positions, to reject queries with nothing to measure."""
        return None


def batch_size_of(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        for v in batch.values():
            if isinstance(v, torch.Tensor):
                return v.shape[0]
    if isinstance(batch, (list, tuple)):
        for v in batch:
            if isinstance(v, torch.Tensor):
                return v.shape[0]
    raise TaskInputError(f"cannot tell the batch size of a {type(batch).__name__}; batches must hold tensors")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Losses in at least float32 (bf16/fp16 logits lose too much in log-softmax); float64 stays."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return _upcast(output)
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None:
        raise TaskInputError(
            f"the model returned a {type(output).__name__}; expected a tensor or an object with `.logits`"
        )
    return _upcast(logits)


class _SupervisedTask(Task):
    """Shared input handling for ``(x, y)`` / dict batches."""

    def __init__(self, input_key: str | int = 0, target_key: str | int = 1):
        self.input_key = input_key
        self.target_key = target_key

    def _split(self, batch: Any) -> tuple[Any, torch.Tensor]:
        try:
            if isinstance(batch, Mapping):
                key_in = self.input_key if isinstance(self.input_key, str) else "x"
                key_t = self.target_key if isinstance(self.target_key, str) else "y"
                return batch[key_in], batch[key_t]
            if isinstance(batch, (list, tuple)):
                return batch[self.input_key if isinstance(self.input_key, int) else 0], batch[
                    self.target_key if isinstance(self.target_key, int) else 1
                ]
        except (KeyError, IndexError) as err:
            raise TaskInputError(
                f"{type(self).__name__} could not read the batch ({err!r}); expected (inputs, targets) or a dict "
                f"with keys '{self.input_key}' and '{self.target_key}' (set input_key=/target_key=)"
            ) from None
        raise TaskInputError(
            f"{type(self).__name__} expects (inputs, targets) tuples or dicts, got {type(batch).__name__}"
        )


class ClassificationTask(_SupervisedTask):
    """Cross-entropy classification. Batches are ``(x, y)`` or ``{"x": ..., "y": ...}``.

    The measurement is ``log p(y | x)`` of the query's label.
    """

    def _forward(self, model, batch):
        x, y = self._split(batch)
        logits = _logits(model(x))
        if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TaskInputError(
                f"ClassificationTask needs integer class targets, got {getattr(y, 'dtype', type(y).__name__)}"
            )
        return logits, y.long()

    def train_loss(self, model, batch, sample=False):
        logits, y = self._forward(model, batch)
        if sample:
            with torch.no_grad():
                y = torch.distributions.Categorical(logits=logits.detach()).sample()
        return F.cross_entropy(logits, y, reduction="sum")

    def measurement(self, model, batch):
        logits, y = self._forward(model, batch)
        return -F.cross_entropy(logits, y, reduction="sum")


class RegressionTask(_SupervisedTask):
    """Gaussian regression with unit variance: ``L = 0.5 * ||y - f(x)||^2`` summed.

    Sampling draws ``y ~ N(f(x), I)``; the measurement is the Gaussian log-likelihood
    of the query target (up to its constant).
    """

    def _forward(self, model, batch):
        x, y = self._split(batch)
        pred = _logits(model(x))
        y = y.to(pred.dtype)
        if y.shape != pred.shape:
            if y.numel() == pred.numel():
                y = y.reshape(pred.shape)
            else:
                raise TaskInputError(f"RegressionTask: target shape {tuple(y.shape)} != prediction {tuple(pred.shape)}")
        return pred, y

    def train_loss(self, model, batch, sample=False):
        pred, y = self._forward(model, batch)
        if sample:
            with torch.no_grad():
                y = pred.detach() + torch.randn_like(pred)
        return 0.5 * ((pred - y) ** 2).sum()

    def measurement(self, model, batch):
        pred, y = self._forward(model, batch)
        return -0.5 * ((pred - y) ** 2).sum()


class CausalLMTask(Task):
    """Causal language modelling for transformers-style models.

    Batches are dicts with ``input_ids`` ``[B, T]``, ``attention_mask`` ``[B, T]`` and
    ``labels`` ``[B, T]`` (-100 on positions that do not count: prompt and padding).
    Labels are shifted inside, as in transformers (position t predicts token t+1).
    The measurement is ``log p(completion | prompt)``: the summed log-probability of
    the label tokens.
    """

    def __init__(self, ignore_index: int = -100):
        self.ignore_index = ignore_index

    def _read(self, batch):
        if not isinstance(batch, Mapping):
            raise TaskInputError(
                f"CausalLMTask expects dict batches with 'input_ids', 'attention_mask', 'labels'; got {type(batch).__name__}"
            )
        missing = [k for k in ("input_ids", "labels") if k not in batch]
        if missing:
            raise TaskInputError(
                f"CausalLMTask batch lacks {missing}; it has {sorted(batch.keys())}. Provide 'input_ids', "
                "'attention_mask' and 'labels' (-100 where a token does not count)"
            )
        ids, labels = batch["input_ids"], batch["labels"]
        if ids.dtype.is_floating_point or labels.dtype.is_floating_point:
            raise TaskInputError("CausalLMTask: 'input_ids' and 'labels' must be integer tensors")
        return ids, batch.get("attention_mask"), labels

    def _token_logprobs(self, model, batch, sample: bool):
        ids, mask, labels = self._read(batch)
        logits = _logits(model(input_ids=ids, attention_mask=mask))[:, :-1]
        targets = labels[:, 1:]
        valid = targets != self.ignore_index
        if sample:
            # Draw only at the positions that count, in row-major order: the random stream then
            # does not depend on how much padding (or prompt) surrounds them, so the sampled
            # factors of a batch are the same whatever length it is padded to.
            with torch.no_grad():
                targets = targets.clone()
                if valid.any():
                    targets[valid] = torch.distributions.Categorical(logits=logits.detach()[valid]).sample()
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        # Fused log-softmax + gather: no [B, T, vocab] log-probability tensor is kept for backward.
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), safe.reshape(-1), reduction="none")
        return -nll.view_as(safe) * valid

    def train_loss(self, model, batch, sample=False):
        return -self._token_logprobs(model, batch, sample).sum()

    def measurement(self, model, batch):
        return self._token_logprobs(model, batch, sample=False).sum()

    def token_mask(self, batch):
        _, mask, _ = self._read(batch)
        return mask

    def query_target_count(self, batch):
        _, _, labels = self._read(batch)
        return (labels[:, 1:] != self.ignore_index).sum(dim=1)


def checked_loss(loss: Any, batch_index: int, what: str = "training loss") -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise TaskInputError(
            f"the task's {what} for batch {batch_index} is {shape}, not a scalar tensor; "
            "return the loss SUMMED over the batch's examples"
        )
    if not torch.isfinite(loss):
        raise TaskInputError(
            f"the task's {what} for batch {batch_index} is {loss.item()}; influence needs finite losses. "
            "Check the batch's data and the model's numerical stability (precision, learning rate)."
        )
    return loss
