"""Optimizers and learning-rate schedules built from the `optim` and `sched` groups.

An `optim` config names a torch.optim class in OPTIMIZERS (`name: adam`); its other keys are
that class's arguments, plus keys of ours (OWN_KEYS) that build_optimizer takes itself:
`decay_norm_and_bias` (false puts biases and normalization parameters in a param group without
weight decay), `norm_and_bias_lr_scale` (default 1.0: off; airbench's bias_scaler 64 gives
those parameters their own param group at 64x the lr; see param_groups), `head_lr_mult` (default
1.0: off; another value gives the head, the model's final classifier layer (models/transfer.py
model_head), its own param group(s) at that multiple of the lr: fine-tuning a pretrained model with a
low lr and a new head at a higher one) and `scale_lr`
(none | linear: optim.lr times the number of processes, the linear scaling rule for the global
batch of a distributed run; the caller passes the factor, lr_factor, so build_optimizer needs no
knowledge of the processes).

A `sched` config names one of the schedule factories below in SCHEDULES (`name: cosine`);
its other keys are that factory's arguments. Each returns a `Schedule`, which
sets every param group's lr to

    optim.lr * warmup(u) * decay(t) * plateau_scale

and is driven by the training loop with `step_batch()` after every optimizer step and
`step_epoch(val_loss, val_acc)` after every epoch's validation. `u` counts the schedule's
units: optimizer steps with `interval: step`, finished epochs with `interval: epoch` (then the
lr changes only at epoch boundaries). warmup(u) = (u + 1) / W for the first W units
(`warmup_epochs` of them), then 1; the decay starts at optim.lr when the warmup ends, on its
own clock: `t` is the time in epochs since then, fractional with `interval: step` (steps /
steps per epoch), whole with `interval: epoch`, so decay rates are per epoch whatever the
interval. Every param group gets the same multiplier of its own initial lr, so the lr ratio of
the groups (optim.norm_and_bias_lr_scale) holds all along. The lr is a closed form of two
counters (steps, epochs) and the plateau's bookkeeping; that is all `state_dict()` holds, so a
resumed run follows its own optim.lr and trainer.epochs.
"""
import inspect
import math
from typing import Callable

import torch
from omegaconf import OmegaConf

from cvtrain import UserError
from cvtrain.config import check_arguments, named_choice
from cvtrain.checks import check_optim, check_sched, check_types
from cvtrain.models.transfer import model_head

# ---------------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------------

NORM_LAYERS = (torch.nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
               torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.RMSNorm, torch.nn.LocalResponseNorm)


# optim keys build_optimizer takes itself
OWN_KEYS = ("decay_norm_and_bias", "norm_and_bias_lr_scale", "head_lr_mult", "scale_lr")
SCALE_LR = ("none", "linear")


def check_scale_lr(scale_lr) -> None:
    """optim.scale_lr is none or linear (check_config and build_optimizer call it)."""
    if scale_lr not in SCALE_LR:
        raise UserError(f"optim.scale_lr={scale_lr}: choose none (optim.lr as given) or linear (optim.lr x the "
                        "number of processes, for the global batch of a distributed run)")


def lr_factor(optim_cfg, world_size: int) -> float:
    """The factor of optim.lr that optim.scale_lr asks for in a run of `world_size` processes: linear
    (Goyal et al. 2017: the lr grows with the global batch, data.batch_size x world_size) world_size;
    none (or absent: configs from before it existed) 1."""
    scale_lr = optim_cfg.get("scale_lr", "none")
    check_scale_lr(scale_lr)
    return float(world_size) if scale_lr == "linear" else 1.0


def param_groups(model: torch.nn.Module, decay_norm_and_bias: bool, norm_and_bias_lr_scale: float = 1.0,
                 lr: float | None = None, weight_decay: float = 0.0, head: torch.nn.Module | None = None,
                 head_lr_mult: float = 1.0) -> list:
    """The trainable parameters (requires_grad: a frozen one is in no group) as optimizer param groups.

    "Norm and bias" parameters: biases, every other 1-D parameter (PReLU slopes, ...) and all
    parameters of normalization layers; the rest are "weights". With norm_and_bias_lr_scale 1:
    one group when `decay_norm_and_bias` (torch's default: weight decay on everything); otherwise
    a first group of the weights and a second one of the norm and bias parameters with
    weight_decay 0.

    With another norm_and_bias_lr_scale s (airbench's bias_scaler: 64), the norm and bias parameters
    form a last group with lr s * `lr` and weight_decay `weight_decay` / s (0 unless
    decay_norm_and_bias): s times the step, the same decay per step lr * weight_decay as the weights
    (exactly so for SGD's L2 and AdamW's decoupled decay; Adam/RMSprop/Adagrad rescale the L2 term
    with the gradient). The groups then are: weights; the norm and bias parameters that keep the base
    lr, if any (weight_decay 0 unless decay_norm_and_bias); the scaled group. A module whose attribute
    `keep_base_lr` is true keeps its parameters out of the scale (airbench's whitening conv: airbench
    scales the BatchNorm biases only). `lr` and `weight_decay` are the optimizer's (needed when s != 1).

    A module whose attribute `train_for_epochs` is an integer N (airbench's whitening conv, from
    model.whiten_bias_epochs) has its parameters in a group of their own at the base lr, with the key
    "train_for_epochs": N; the Schedule sets that group's lr to 0 once N epochs are done (frozen, as
    airbench's requires_grad=False, but the parameter keeps its gradient, so DDP's buckets still fill).

    With head_lr_mult m != 1, the parameters of module `head` (the final classifier layer) leave their
    groups for groups of their own, appended in the same order, at m times that group's lr (the same
    weight_decay): m * lr for the head's weight, m * lr (or m * s * lr) for its bias. m = 1 changes nothing.
    """
    scaled = norm_and_bias_lr_scale != 1
    if scaled and lr is None:
        raise ValueError("param_groups: norm_and_bias_lr_scale != 1 needs the base lr")
    decay, no_decay, boosted, seen, limited = [], [], [], set(), {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            exempt = param.ndim <= 1 or isinstance(module, NORM_LAYERS)
            epochs = getattr(module, "train_for_epochs", None)
            if epochs is not None:
                limited.setdefault((epochs, not exempt or decay_norm_and_bias), []).append(param)
            elif exempt and scaled and not getattr(module, "keep_base_lr", False):
                boosted.append(param)
            else:
                (no_decay if exempt and not decay_norm_and_bias else decay).append(param)
    groups = [{"params": decay}] if decay else []
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if boosted:
        groups.append({"params": boosted, "lr": lr * norm_and_bias_lr_scale,
                       "weight_decay": weight_decay / norm_and_bias_lr_scale if decay_norm_and_bias else 0.0})
    for (epochs, decayed), params in limited.items():
        groups.append({"params": params, "train_for_epochs": epochs, **({} if decayed else {"weight_decay": 0.0})})
    if head_lr_mult != 1 and head is not None:
        if lr is None:
            raise ValueError("param_groups: head_lr_mult != 1 needs the base lr")
        in_head = {id(p) for p in head.parameters()}
        heads = [{**group, "params": [p for p in group["params"] if id(p) in in_head],
                  "lr": group.get("lr", lr) * head_lr_mult} for group in groups]
        groups = [{**group, "params": [p for p in group["params"] if id(p) not in in_head]} for group in groups]
        groups = [group for group in groups + heads if group["params"]]
    return groups


def check_lr_factor(key: str, value, what: str) -> float:
    """optim.norm_and_bias_lr_scale, optim.head_lr_mult: a positive finite number, else a UserError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise UserError(f"optim.{key}={value!r}: {what} must be a positive number (1.0: off)")
    return float(value)


OPTIMIZERS = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop,
              "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def _default(cls, key: str, options: dict):
    """options[key], else the default of `cls`'s argument `key`."""
    if key in options:
        return options[key]
    param = inspect.signature(cls).parameters.get(key)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def build_optimizer(optim_cfg, model: torch.nn.Module, lr_factor: float = 1.0) -> torch.optim.Optimizer:
    """OPTIMIZERS[optim.name](param_groups(model, optim.decay_norm_and_bias, optim.norm_and_bias_lr_scale, ...),
    **the other optim keys), at lr_factor x optim.lr (see lr_factor: optim.scale_lr). norm_and_bias_lr_scale
    and scale_lr may be absent (1.0, none: configs from before they existed)."""
    name, cls, options = named_choice("optim", optim_cfg, OPTIMIZERS)
    if "decay_norm_and_bias" not in options:
        raise UserError(f"optim={name} needs optim.decay_norm_and_bias (true: weight decay on every parameter)")
    decay_norm_and_bias = options.pop("decay_norm_and_bias")
    check_scale_lr(options.pop("scale_lr", "none"))
    scale = options.pop("norm_and_bias_lr_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        raise UserError(f"optim.norm_and_bias_lr_scale={scale!r}: the lr factor of the biases and normalization "
                        "parameters must be a positive number (1.0: off; airbench uses 64)")
    head_lr_mult = check_lr_factor("head_lr_mult", options.pop("head_lr_mult", 1.0), "the lr factor of the head")
    check_arguments("optim", name, cls, options, passed=("params",), own=OWN_KEYS)
    check_types("optim", name, options, cls)
    check_optim(name, options)
    if lr_factor != 1:
        options["lr"] = _default(cls, "lr", options) * lr_factor
    head = model_head(model)[1] if head_lr_mult != 1 else None  # the final classifier layer
    groups = param_groups(model, decay_norm_and_bias, float(scale), lr=_default(cls, "lr", options),
                          weight_decay=_default(cls, "weight_decay", options) or 0.0, head=head,
                          head_lr_mult=head_lr_mult)
    return cls(groups, **options)


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules
# ---------------------------------------------------------------------------------------------

def build_scheduler(sched_cfg, optimizer, epochs: int, steps_per_epoch: int) -> "Schedule":
    """SCHEDULES[sched.name](optimizer, epochs, steps_per_epoch, **the other sched keys)."""
    name, factory, options = named_choice("sched", sched_cfg, SCHEDULES)
    check_arguments("sched", name, factory, options, passed=("optimizer", "epochs", "steps_per_epoch"))
    check_types("sched", name, options, factory)
    check_sched(name, options, epochs)
    return factory(optimizer, epochs=epochs, steps_per_epoch=steps_per_epoch, **options)


class Plateau:
    """Reduce-on-plateau bookkeeping, as torch.optim.lr_scheduler.ReduceLROnPlateau (threshold_mode rel).

    `update(metric)` once per epoch with the `monitor` metric: val_loss is watched for a minimum
    (mode min: an epoch improves when it is below best * (1 - threshold)), val_acc for a maximum
    (mode max: above best * (1 + threshold)). When more than `patience` epochs in a row did not
    improve, `scale` is multiplied by `factor` (not below `min_scale`) and `cooldown` epochs
    follow in which no epoch counts as bad.
    """
    MODES = {"val_loss": "min", "val_acc": "max"}

    def __init__(self, monitor: str, factor: float, patience: int, threshold: float, cooldown: int, min_scale: float):
        if monitor not in self.MODES:
            raise UserError(f"sched.monitor={monitor}: use val_loss (mode min) or val_acc (mode max)")
        if not 0 < factor < 1:
            raise UserError(f"sched.factor={factor}: the plateau schedule needs 0 < factor < 1")
        self.monitor, self.mode, self.factor, self.patience = monitor, self.MODES[monitor], factor, patience
        self.threshold, self.cooldown, self.min_scale = threshold, cooldown, min_scale
        self.scale, self.bad_epochs, self.cooldown_left = 1.0, 0, 0
        self.best = math.inf if self.mode == "min" else -math.inf

    def improves(self, metric: float) -> bool:
        if self.mode == "min":
            return metric < self.best * (1 - self.threshold)
        return metric > self.best * (1 + self.threshold)

    def update(self, metric: float) -> None:
        if self.improves(metric):
            self.best, self.bad_epochs = metric, 0
        else:
            self.bad_epochs += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad_epochs = 0
        if self.bad_epochs > self.patience:
            self.scale = max(self.scale * self.factor, self.min_scale)
            self.cooldown_left, self.bad_epochs = self.cooldown, 0

    STATE = ("scale", "best", "bad_epochs", "cooldown_left")

    def state_dict(self) -> dict:
        return {key: getattr(self, key) for key in self.STATE}

    def load_state_dict(self, state: dict) -> None:
        for key in self.STATE:
            setattr(self, key, state[key])


class Schedule:
    """Sets every param group's lr to base_lr * warmup(u) * decay(t) * plateau scale (see the module doc).

    `decay(t)` is a multiplier, 1 at t = 0, of the time t in epochs since the warmup ended.
    base_lr is each param group's lr when the Schedule is built (optim.lr).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, decay: Callable[[float], float], steps_per_epoch: int,
                 warmup_epochs: float, interval: str, plateau: Plateau | None = None):
        if interval not in ("step", "epoch"):
            raise UserError(f"sched.interval={interval}: use step (the lr changes every iteration) or epoch")
        self.units_per_epoch = steps_per_epoch if interval == "step" else 1
        self.warmup = round(warmup_epochs * self.units_per_epoch)  # in units
        if interval == "epoch" and self.warmup != warmup_epochs:
            raise UserError(f"sched.warmup_epochs={warmup_epochs} with sched.interval=epoch: "
                            f"use whole epochs, or sched.interval=step")
        self.optimizer, self.decay, self.interval, self.plateau = optimizer, decay, interval, plateau
        self.steps_per_epoch = steps_per_epoch
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.steps, self.epochs = 0, 0  # optimizer steps taken, epochs finished
        self._apply()

    @property
    def units(self) -> int:
        return self.steps if self.interval == "step" else self.epochs

    def multiplier(self) -> float:
        u = self.units
        warmup = (u + 1) / self.warmup if u < self.warmup else 1.0
        t = max(0, u - self.warmup) / self.units_per_epoch
        return warmup * self.decay(t) * (self.plateau.scale if self.plateau else 1.0)

    def _apply(self) -> None:
        factor = self.multiplier()
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            done = self.epochs >= group.get("train_for_epochs", math.inf)  # param_groups: frozen after N epochs
            group["lr"] = 0.0 if done else base_lr * factor

    def step_batch(self) -> None:
        """After every optimizer.step()."""
        self.steps += 1
        if self.interval == "step":
            self._apply()

    def step_epoch(self, val_loss: float, val_acc: float) -> None:
        """After every epoch, once its validation metrics are known."""
        self.epochs += 1
        if self.plateau:
            self.plateau.update({"val_loss": val_loss, "val_acc": val_acc}[self.plateau.monitor])
        self._apply()

    def state_dict(self) -> dict:
        """Plain numbers only (torch.load(weights_only=True) reads it); the shape of the schedule
        (optim.lr, trainer.epochs, the sched values) comes from the run that loads it."""
        return {"steps": self.steps, "epochs": self.epochs,
                "plateau": self.plateau.state_dict() if self.plateau else None}

    def load_state_dict(self, state: dict) -> None:
        if "last_epoch" in state:  # a LambdaLR's state, from checkpoints older than this class: it counted steps
            state = {"steps": state["last_epoch"], "epochs": state["last_epoch"] // self.steps_per_epoch}
        self.steps, self.epochs = state["steps"], state["epochs"]
        if self.plateau and state.get("plateau"):
            self.plateau.load_state_dict(state["plateau"])
        self._apply()


# --- the `sched=` options: factories called with (optimizer, epochs=, steps_per_epoch=) ---------

def constant_schedule(optimizer, epochs: int, steps_per_epoch: int, warmup_epochs: float,
                      interval: str) -> Schedule:
    return Schedule(optimizer, lambda t: 1.0, steps_per_epoch, warmup_epochs, interval)


def step_schedule(optimizer, epochs: int, steps_per_epoch: int, every_epochs: float, factor: float,
                  warmup_epochs: float, interval: str) -> Schedule:
    """factor ** floor(t / every_epochs)"""
    if every_epochs <= 0:
        raise UserError(f"sched.every_epochs={every_epochs}: must be positive")
    return Schedule(optimizer, lambda t: factor ** math.floor(t / every_epochs + 1e-9), steps_per_epoch,
                    warmup_epochs, interval)


def multistep_schedule(optimizer, epochs: int, steps_per_epoch: int, milestones: list, factor: float,
                       warmup_epochs: float, interval: str) -> Schedule:
    """factor ** (number of milestones <= t)"""
    milestones = sorted(milestones)
    return Schedule(optimizer, lambda t: factor ** sum(t + 1e-9 >= m for m in milestones), steps_per_epoch,
                    warmup_epochs, interval)


def triangle_schedule(optimizer, epochs: int, steps_per_epoch: int, start: float, peak_at: float, end: float,
                      warmup_epochs: float, interval: str) -> Schedule:
    """Straight lines from `start` up to 1 at the fraction `peak_at` of the run after the warmup, then down
    to `end` at its last step (airbench's schedule: 0.2 -> 1 at 23% -> 0.07, no warmup)."""
    if not (0 < peak_at < 1 and start >= 0 and end >= 0):
        raise UserError(f"sched.peak_at={peak_at} must be in (0, 1), sched.start={start} and sched.end={end} >= 0")
    length = epochs - warmup_epochs
    peak = peak_at * length

    def triangle(t):
        if t < peak:
            return start + (1 - start) * t / peak
        return 1 + (end - 1) * min(1.0, (t - peak) / (length - peak))
    return Schedule(optimizer, triangle, steps_per_epoch, warmup_epochs, interval)


def exponential_schedule(optimizer, epochs: int, steps_per_epoch: int, k: float, warmup_epochs: float,
                         interval: str) -> Schedule:
    """exp(-k t)"""
    return Schedule(optimizer, lambda t: math.exp(-k * t), steps_per_epoch, warmup_epochs, interval)


def inverse_time_schedule(optimizer, epochs: int, steps_per_epoch: int, k: float, warmup_epochs: float,
                          interval: str) -> Schedule:
    """1 / (1 + k t)"""
    return Schedule(optimizer, lambda t: 1.0 / (1.0 + k * t), steps_per_epoch, warmup_epochs, interval)


def cosine_schedule(optimizer, epochs: int, steps_per_epoch: int, warmup_epochs: float,
                    min_lr_ratio: float, interval: str) -> Schedule:
    """min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * t / T)) / 2, T = the epochs after the warmup."""
    if interval == "step":  # the warmup takes whole steps
        warmup_epochs = round(warmup_epochs * steps_per_epoch) / steps_per_epoch
    span = max(1e-9, epochs - warmup_epochs)

    def cosine(t):
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t / span)))
    return Schedule(optimizer, cosine, steps_per_epoch, warmup_epochs, interval)


def cycle_ends(cycle_epochs: float, cycle_mult: float, span: float) -> list[float]:
    """The ends of the complete cycles of sched=cosine_restarts within `span` epochs after the warmup:
    cycle i lasts cycle_epochs * cycle_mult**i epochs."""
    _check_cycles(cycle_epochs, cycle_mult)
    ends, end, length = [], 0.0, float(cycle_epochs)
    while end + length <= span + 1e-9:
        end += length
        ends.append(end)
        length *= cycle_mult
    return ends


def _check_cycles(cycle_epochs: float, cycle_mult: float) -> None:
    if not (cycle_epochs > 0 and cycle_mult >= 1):
        raise UserError(f"sched.cycle_epochs={cycle_epochs} must be positive and sched.cycle_mult={cycle_mult} "
                        ">= 1 (like 5 and 1)")


def cosine_restarts_schedule(optimizer, epochs: int, steps_per_epoch: int, cycle_epochs: float, cycle_mult: float,
                             min_lr_ratio: float, warmup_epochs: float, interval: str) -> Schedule:
    """SGDR (Loshchilov & Hutter 2017, "SGDR: Stochastic Gradient Descent with Warm Restarts"): cosine
    decay from 1 to min_lr_ratio over each cycle, then a warm restart at 1. Cycle i lasts
    T_i = cycle_epochs * cycle_mult**i epochs; with t_i the time in the current cycle,
    min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * t_i / T_i)) / 2. The ends of the cycles are where
    trainer.keep_snapshots takes its snapshots (Huang et al. 2017, "Snapshot Ensembles")."""
    _check_cycles(cycle_epochs, cycle_mult)

    def restarts(t):
        start, length = 0.0, float(cycle_epochs)
        while t >= start + length - 1e-9:  # a restart at the exact step the cycle ends
            start += length
            length *= cycle_mult
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * (t - start) / length))
    return Schedule(optimizer, restarts, steps_per_epoch, warmup_epochs, interval)


def snapshot_epochs(sched_cfg, epochs: int, keep: int) -> dict:
    """trainer.keep_snapshots=N: {epoch: cycle} for the ends of the last N complete cycles of the
    schedule (epochs counted from the start of the run, the cycles from 1), where fit() saves
    checkpoints/snapshot-<cycle>.pt; {} for N = 0. A UserError, before any work, when the schedule has no
    cycles, fewer than N, or cycles that do not end at an epoch's end (snapshots are taken there)."""
    if not keep:
        return {}
    options = OmegaConf.to_container(sched_cfg, resolve=True) if OmegaConf.is_config(sched_cfg) else dict(sched_cfg)
    name = options.get("name")
    if name != "cosine_restarts":
        raise UserError(f"trainer.keep_snapshots={keep}: snapshots are taken at the ends of the schedule's cycles, and "
                        f"sched={name} has no cycles; use sched=cosine_restarts (warm restarts), e.g. "
                        f"sched=cosine_restarts sched.cycle_epochs={max(1, epochs // keep)}")
    warmup = options.get("warmup_epochs", 0) or 0
    ends = [warmup + end for end in cycle_ends(options["cycle_epochs"], options["cycle_mult"], epochs - warmup)]
    if len(ends) < keep:
        raise UserError(f"trainer.keep_snapshots={keep}: trainer.epochs={epochs} holds {len(ends)} complete cycle(s) "
                        f"of sched.cycle_epochs={options['cycle_epochs']} (sched.cycle_mult={options['cycle_mult']}"
                        f"{f', after sched.warmup_epochs={warmup}' if warmup else ''}); lower trainer.keep_snapshots, "
                        "shorten sched.cycle_epochs or raise trainer.epochs")
    kept = {i + 1: end for i, end in enumerate(ends)}
    kept = dict(list(kept.items())[-keep:])
    odd = [end for end in kept.values() if abs(end - round(end)) > 1e-6]
    if odd:
        raise UserError(f"trainer.keep_snapshots={keep}: the cycles end at epoch {odd[0]:g}, inside an epoch, and "
                        "snapshots are taken at epoch ends; use whole numbers for sched.cycle_epochs, "
                        "sched.cycle_mult and sched.warmup_epochs")
    return {round(end): cycle for cycle, end in kept.items()}


def plateau_schedule(optimizer, epochs: int, steps_per_epoch: int, monitor: str, factor: float, patience: int,
                     threshold: float, cooldown: int, min_lr_ratio: float, warmup_epochs: float,
                     interval: str) -> Schedule:
    """factor ** (plateaus of `monitor` so far); see Plateau."""
    plateau = Plateau(monitor, factor, patience, threshold, cooldown, min_lr_ratio)
    return Schedule(optimizer, lambda t: 1.0, steps_per_epoch, warmup_epochs, interval, plateau)


SCHEDULES = {"constant": constant_schedule, "step": step_schedule, "multistep": multistep_schedule,
             "exponential": exponential_schedule, "inverse_time": inverse_time_schedule,
             "cosine": cosine_schedule, "plateau": plateau_schedule, "triangle": triangle_schedule,
             "cosine_restarts": cosine_restarts_schedule}
