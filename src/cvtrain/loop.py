"""One training step and one evaluation pass: what every task that trains shares (the loop of
tasks/train.py, the learning-rate range test, the sanity overfit check).

    forward -> data loss (+ the reg loss term) -> backward -> clip the gradient norm
            -> optimizer step -> max-norm projection

The seams for what comes later are here, in plain code: mixed precision wraps the forward and
loss in autocast and routes backward/step through a gradient scaler; a DDP-wrapped model is
passed as `model` unchanged; an EMA copy of the weights updates after `optimizer.step()`.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn


@dataclass
class Step:
    """What one training step computed, detached from the graph (no host sync)."""
    loss: torch.Tensor  # data loss + reg loss, the quantity that was minimized
    data_loss: torch.Tensor
    reg_loss: Optional[torch.Tensor]  # None without a reg loss term
    scores: torch.Tensor  # the model's outputs on the batch, before the step
    labels: torch.Tensor  # each image's own label (with mixup/cutmix: the main one)


def training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, optimizer,
                  regularizer=None, mix: Optional[Callable] = None, monitor=None, step: int = 0) -> Step:
    """One optimizer step on the batch (x, y).

    regularizer: a losses.Regularizer (loss term, gradient clipping, max-norm), or None.
    mix: mixup / cutmix as a callable (x, y) -> (x, y, y_mixed_in, lam); the loss becomes
         lam * loss(scores, y) + (1 - lam) * loss(scores, y_mixed_in).
    monitor: a monitor.TrainingMonitor (before_forward / before_step / after_step at `step`), or None.
    """
    if monitor:
        monitor.before_forward(step)
    if mix:
        x, y, y_mixed, lam = mix(x, y)
        scores = model(x)
        data_loss = lam * loss_fn(scores, y) + (1 - lam) * loss_fn(scores, y_mixed)
    else:
        scores = model(x)
        data_loss = loss_fn(scores, y)
    reg_loss = regularizer() if regularizer else None
    loss = data_loss if reg_loss is None else data_loss + reg_loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if regularizer is not None:
        regularizer.clip_grad_()  # reg.grad_clip: the global gradient norm, before the step
    if monitor:
        monitor.before_step(step)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    if regularizer is not None:
        regularizer.project_()  # reg.max_norm: each unit's incoming weights back into the ball
    if monitor:
        monitor.after_step(step, lr)
    return Step(loss.detach(), data_loss.detach(), None if reg_loss is None else reg_loss.detach(),
                scores.detach(), y)


@torch.no_grad()
def evaluate(model: nn.Module, loader, loss_fn: Callable) -> tuple[float, float]:
    """(mean loss, accuracy) of `model` in eval mode over the whole loader."""
    model.eval()
    total_loss = torch.zeros((), device=loader.labels.device)
    correct = torch.zeros((), device=loader.labels.device, dtype=torch.long)
    for x, y in loader:
        out = model(x)
        total_loss += loss_fn(out, y) * len(y)
        correct += (out.argmax(1) == y).sum()
    n = len(loader.labels)
    return total_loss.item() / n, correct.item() / n
