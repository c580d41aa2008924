"""Optimizers and learning-rate schedules built from the `optim` and `sched` groups.

`optim` configs are `_target_` + `_partial_: true` nodes (torch.optim classes);
`sched` configs point at the schedule factories below, which get the optimizer
and the run's length and return a LambdaLR stepped once per iteration, so
`opt/lr` in TensorBoard shows the real value at every step.
"""
import math

import torch
from hydra.utils import instantiate


def build_optimizer(optim_cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return instantiate(optim_cfg, _convert_="all")(params)


def build_scheduler(sched_cfg, optimizer, epochs: int, steps_per_epoch: int):
    return instantiate(sched_cfg, _convert_="all")(
        optimizer, epochs=epochs, steps_per_epoch=steps_per_epoch
    )


class _Warmup:
    """lr multiplier: linear warmup from 1/warmup to 1 over `warmup` steps, then `after(step)`."""

    def __init__(self, warmup_steps: int):
        self.warmup_steps = warmup_steps

    def warmup(self, step: int) -> float:
        return (step + 1) / self.warmup_steps


class _Constant(_Warmup):
    def __call__(self, step: int) -> float:
        return self.warmup(step) if step < self.warmup_steps else 1.0


class _Cosine(_Warmup):
    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float):
        super().__init__(warmup_steps)
        self.total_steps, self.min_lr_ratio = total_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup(step)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def constant_schedule(optimizer, epochs: int, steps_per_epoch: int, warmup_epochs: float = 0.0):
    warmup = round(warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Constant(warmup))


def cosine_schedule(optimizer, epochs: int, steps_per_epoch: int, warmup_epochs: float = 0.0,
                    min_lr_ratio: float = 0.0):
    warmup = round(warmup_epochs * steps_per_epoch)
    total = epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Cosine(warmup, total, min_lr_ratio))
