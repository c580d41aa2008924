"""trainer.ema=<decay>: an exponential moving average of the weights (Polyak averaging with an
exponential window), kept beside the trained ("raw") weights and evaluated, checkpointed and
selectable on its own (tasks/train.py: trainer.select).

After every optimizer step (n = the updates before this one, 0 for the first):

    d_n = min(decay, (1 + n) / (10 + n))          the warm-up
    ema = d_n * ema + (1 - d_n) * weights           for every parameter

The warm-up is TensorFlow's tf.train.ExponentialMovingAverage with `num_updates` (its docs: "decay =
min(decay, (1 + num_updates) / (10 + num_updates))"): the first updates move the average most of the way
to the weights (d_0 = 0.1, d_10 = 0.55, d_90 = 0.91), so the average forgets the random initialization
in a few dozen steps instead of ~1 / (1 - decay), which matters in a short run (decay 0.999: a
1,000-step memory; without the warm-up the average of a 1,000-step run still holds a third of the init).

Buffers (batch norm's running mean and variance, num_batches_tracked) are copied from the model at
every update, not averaged. They are already a running average (momentum 0.1: the last ~10 batches)
of the activations' statistics, and averaging them a second time, over the EMA's much longer window,
would mix in statistics of weights from thousands of steps ago; copied, they are the recent batches'
statistics, which the averaged weights (close to the recent weights once the lr is small) see too.
This is what Keras' optimizer(use_ema=True) does (it averages the trainable variables only; the
moving statistics stay the model's). The exact alternative, recomputing them with a pass over the
training data under the averaged weights (torch.optim.swa_utils.update_bn), costs a forward pass over
the data per evaluation and is not done here.

The update is two fused foreach ops (torch._foreach_lerp_ over the parameters, torch._foreach_copy_
over the buffers) on the training device; the decay is a Python number computed from a host counter,
so there is no host sync in the loop. Several processes (torchrun): every process keeps its own copy
(the parameters are the same everywhere after DDP's gradient average; the buffers are each process's,
and the training loop broadcasts rank 0's before evaluating, as it does for the model); rank 0 saves it.
"""
import copy

import torch
from torch import nn


def ema_decay(decay: float, updates: int) -> float:
    """The decay of the update after `updates` earlier ones: min(decay, (1 + updates) / (10 + updates))."""
    return min(decay, (1 + updates) / (10 + updates))


class EMA:
    """The moving average of `model`'s parameters (`module`: a copy of the model in eval mode, without
    gradients), updated from the model with update() after each optimizer step."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay {decay} must be in [0, 1)")
        self.decay = float(decay)
        self.model = model
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0
        self._pairs()

    def _pairs(self) -> None:
        """The (average, model) tensor lists the update walks (the same order: the copy's structure)."""
        self._ema_params, self._params = list(self.module.parameters()), list(self.model.parameters())
        self._ema_buffers, self._buffers = list(self.module.buffers()), list(self.model.buffers())
        if len(self._ema_params) != len(self._params) or len(self._ema_buffers) != len(self._buffers):
            raise RuntimeError("EMA: the model's parameters or buffers changed after the average was made")

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average: parameters lerp toward the model's by 1 - d, buffers copied."""
        weight = 1.0 - ema_decay(self.decay, self.updates)
        if self._params:
            torch._foreach_lerp_(self._ema_params, self._params, weight)
        if self._buffers:
            torch._foreach_copy_(self._ema_buffers, self._buffers)
        self.updates += 1

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average afresh from the model's current weights (no updates yet)."""
        self.module.load_state_dict(self.model.state_dict())
        self.updates = 0

    def state_dict(self) -> dict:
        """Plain tensors and numbers (torch.load(weights_only=True) reads it): the averaged weights
        (a state dict of the model's own keys) and the update count (the warm-up's position)."""
        return {"model": {k: v.detach().clone() for k, v in self.module.state_dict().items()},
                "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        """Continue a saved average exactly (its weights and update count); the decay stays this run's."""
        self.module.load_state_dict(state["model"])
        self.updates = int(state["updates"])
