"""One training step and one evaluation pass: what every task that trains shares (the loop of
tasks/train.py, the learning-rate range test, the sanity overfit check).

    forward -> data loss (+ the reg loss term) -> backward -> clip the gradient norm
            -> optimizer step -> max-norm projection

Mixed precision (cvtrain/speed.py, `speed`): the forward pass runs under autocast, the loss is
computed in float32 from the scores cast up; with a gradient scaler (float16) backward runs on the
scaled loss and the gradients are unscaled before clipping and the monitors read them, so gradient
norms and update/weight ratios are the real ones. A DDP-wrapped or compiled model is passed as
`model` unchanged.
"""
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from cvtrain.distributed import all_reduce_sum


@dataclass
class Step:
    """What one training step computed, detached from the graph (no host sync)."""
    loss: torch.Tensor  # data loss + reg loss, the quantity that was minimized
    data_loss: torch.Tensor
    reg_loss: Optional[torch.Tensor]  # None without a reg loss term
    scores: torch.Tensor  # the model's outputs on the batch, before the step
    labels: torch.Tensor  # each image's own label (with mixup/cutmix: the main one)


def training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, optimizer,
                  regularizer=None, mix: Optional[Callable] = None, monitor=None, step: int = 0,
                  speed=None) -> Step:
    """One optimizer step on the batch (x, y).

    regularizer: a losses.Regularizer (loss term, gradient clipping, max-norm), or None.
    mix: mixup / cutmix as a callable (x, y) -> (x, y, y_mixed_in, lam); the loss becomes
         lam * loss(scores, y) + (1 - lam) * loss(scores, y_mixed_in).
    monitor: a monitor.TrainingMonitor (before_forward / before_step / after_step at `step`), or None.
    speed: a speed.Speed (autocast, gradient scaler, memory layout), or None: float32.
    """
    scaler = speed.scaler if speed else None
    if monitor:
        monitor.before_forward(step)
    if mix:
        x, y, y_mixed, lam = mix(x, y)
    with speed.autocast() if speed else nullcontext():
        scores = model(speed.layout(x) if speed else x)
    scores = scores.float()  # the loss and the metrics in float32
    data_loss = lam * loss_fn(scores, y) + (1 - lam) * loss_fn(scores, y_mixed) if mix else loss_fn(scores, y)
    reg_loss = regularizer() if regularizer else None
    loss = data_loss if reg_loss is None else data_loss + reg_loss
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # the real gradients, for clipping and the monitors
    else:
        loss.backward()
    if regularizer is not None:
        regularizer.clip_grad_()  # reg.grad_clip: the global gradient norm, before the step
    if monitor:
        monitor.before_step(step)
    lr = optimizer.param_groups[0]["lr"]
    if scaler is not None:
        scaler.step(optimizer)  # skipped when a gradient is inf/nan (the scale then shrinks)
        scaler.update()
    else:
        optimizer.step()
    if regularizer is not None:
        regularizer.project_()  # reg.max_norm: each unit's incoming weights back into the ball
    if monitor:
        monitor.after_step(step, lr)
    return Step(loss.detach(), data_loss.detach(), None if reg_loss is None else reg_loss.detach(),
                scores.detach(), y)


TTA = ("none", "flip", "flip_translate")


def tta_views(x: torch.Tensor, tta: str) -> list[tuple[float, torch.Tensor]]:
    """Test-time augmentation: (weight, view) pairs whose weighted scores are averaged.
    none: the image; flip: the image and its mirror, 1/2 each; flip_translate: those two at 1/2,
    and both shifted one pixel up-left and one pixel down-right (reflect padding) at 1/8 each
    (airbench94's TTA level 2)."""
    if tta == "none":
        return [(1.0, x)]
    views = [(0.5, x), (0.5, x.flip(-1))]
    if tta == "flip_translate":
        padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        h, w = x.shape[-2:]
        up_left, down_right = padded[..., :h, :w], padded[..., 2:, 2:]
        views = [(0.25, x), (0.25, x.flip(-1))] + [(0.125, v) for v in
                                                   (up_left, up_left.flip(-1), down_right, down_right.flip(-1))]
    return views


def evaluate(model: nn.Module, loader, loss_fn: Callable, speed=None, tta: str = "none",
             across_ranks: bool = False) -> tuple[float, float]:
    """(mean loss, accuracy) of `model` in eval mode over the whole loader, under torch.inference_mode
    and `speed`'s precision and layout; `tta`: see tta_views (the scores of the views averaged).

    across_ranks: the loader holds this process's part of the split (several processes): the loss
    sum, the correct count and the image count of every process are added up (one all_reduce), so
    every process returns the figures of the whole split. Pass the plain model, not a DDP wrapper
    (its forward may broadcast buffers: a collective that processes with fewer batches never join)."""
    model.eval()
    total_loss = torch.zeros((), device=loader.labels.device)
    correct = torch.zeros((), device=loader.labels.device, dtype=torch.long)
    with torch.inference_mode():
        for x, y in loader:
            out = scores_of(model, x, speed, tta)
            total_loss += loss_fn(out, y) * len(y)
            correct += (out.argmax(1) == y).sum()
    n = len(loader.labels)
    if across_ranks:
        sums = all_reduce_sum(torch.stack([total_loss.double(), correct.double(),
                                           torch.tensor(n, dtype=torch.float64, device=total_loss.device)]))
        total_loss, correct, n = sums[0], sums[1], int(sums[2].item())
    return total_loss.item() / n, correct.item() / n


def predict(model: nn.Module, loader, speed=None, tta: str = "none") -> torch.Tensor:
    """The scores of `model` (eval mode, torch.inference_mode) for every image of the loader, in its order:
    (images, classes), float32, on the loader's device; with `tta` the weighted sum of the views' scores
    (tta_views), as evaluate() computes them. task=ensemble turns them into probabilities."""
    model.eval()
    with torch.inference_mode():
        return torch.cat([scores_of(model, x, speed, tta) for x, _ in loader])


def scores_of(model: nn.Module, x: torch.Tensor, speed=None, tta: str = "none") -> torch.Tensor:
    """The float32 scores of `model` for the batch `x` under `speed`'s precision and layout; with `tta`
    the weighted sum of the views' scores (tta_views). The caller sets eval mode and inference_mode."""
    out = 0
    for weight, view in tta_views(x, tta):
        with speed.autocast() if speed else nullcontext():
            scores = model(speed.layout(view) if speed else view)
        out = out + weight * scores.float()
    return out


class Lookahead:
    """Lookahead weight averaging (Zhang et al. 2019; airbench94's form), trainer.lookahead_every = k:
    after every k-th optimizer step the slow weights move a fraction alpha toward the trained (fast)
    ones, slow += alpha * (fast - slow), and training goes on from the slow weights (fast = slow).
    alpha starts at 1 (no averaging while the weights move fast) and falls to trainer.lookahead_alpha
    at the last step: alpha_t = 1 - (1 - alpha) * (t / total_steps)^3. Parameters and floating-point
    buffers (batch norm's running statistics) both take part."""

    def __init__(self, model: nn.Module, every: int, alpha: float, total_steps: int):
        self.every, self.alpha, self.total_steps = every, alpha, max(1, total_steps)
        self.slow = [t.detach().clone() for t in self._tensors(model)]

    @staticmethod
    def _tensors(model: nn.Module) -> list:
        return list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int, force: bool = False) -> None:
        """Call with the number of completed steps; `force`: average now (the last step of training)."""
        if not (force or step % self.every == 0):
            return
        alpha = 1 - (1 - self.alpha) * min(1.0, step / self.total_steps) ** 3
        for t, s in zip(self._tensors(model), self.slow):
            s.lerp_(t, alpha)
            t.copy_(s)

    def state_dict(self) -> dict:
        return {"slow": [s.clone() for s in self.slow]}

    def load_state_dict(self, state: dict) -> None:
        for s, saved in zip(self.slow, state["slow"]):
            s.copy_(saved)
