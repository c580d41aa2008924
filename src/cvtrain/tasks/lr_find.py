"""task=lr_find: the learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training
Neural Networks", sec. 3.3; fastai's lr_find).

    python -m cvtrain task=lr_find [model=... optim=... data=...] [task.steps=100]

A fresh model of the configured model, loss, reg, optim and data trains for task.steps steps
while the learning rate grows exponentially from task.start to task.end
(optim.lr and the sched group are not used; aug's per-image ops are, mixup/cutmix are not). After
every step it records the loss and a smoothed loss (a bias-corrected exponential moving average,
SMOOTHING), and it stops early when the loss is not finite or the smoothed loss exceeds
EXPLODE x the best smoothed loss so far.

The suggested lr is where the smoothed loss falls fastest: the most negative slope of the smoothed
loss against log10(lr), looked for before the smoothed loss's minimum (past it, the loss is
already turning up). That is a rate at which training still makes fast progress, typically about
10x below the lr of the minimum. Treat it as a starting point for optim.lr, not an answer.

Writes into the run dir: lr_find.png (loss and smoothed loss against lr, log x axis, the
suggestion marked), lr_find.csv (step, lr, loss, smoothed) and an event file (scalars lr_find/loss,
lr_find/smoothed_loss and lr_find/lr against the step; the plot as the image lr_find/plot and the
result as the text lr_find/result). Prints a short result whose last line is `suggested_lr=<lr>`.
Nothing is saved to the configs or checkpoints.
"""
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import save_image

from cvtrain import UserError
from cvtrain.data import BatchAugment, InMemoryLoader, load_data
from cvtrain.device import resolve_device
from cvtrain.loop import training_step
from cvtrain.losses import Regularizer, build_loss
from cvtrain.models import build_model, model_kind
from cvtrain.optim import build_optimizer

SMOOTHING = 0.9  # EMA weight of the past: ~10 steps of memory (fastai's 0.98 lags ~50 steps behind the lr)
EXPLODE = 4.0  # stop when the smoothed loss exceeds this x its best value so far
MIN_POINTS = 5  # fewer recorded steps than this: no suggestion


def lr_sequence(start: float, end: float, steps: int) -> list[float]:
    """`steps` learning rates growing exponentially (evenly spaced on a log scale) from start to end."""
    if steps < MIN_POINTS:
        raise UserError(f"task.steps={steps}: the range test needs at least {MIN_POINTS} steps "
                        "(100 is usual)")
    if not 0 < start < end:
        raise UserError(f"task.start={start:g} and task.end={end:g}: need "
                        "0 < start < end (defaults 1e-7 and 10)")
    return [start * (end / start) ** (i / (steps - 1)) for i in range(steps)]


@dataclass
class RangeTest:
    """What the range test recorded: one entry per completed step, and why it stopped early (or None)."""
    lrs: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    smoothed: list = field(default_factory=list)
    stopped: str = None


def range_test(train_step: Callable[[float], float], lrs, smoothing: float = SMOOTHING,
               explode: float = EXPLODE) -> RangeTest:
    """Call train_step(lr) -> loss for each lr in turn; stop at a non-finite loss (not recorded) or when
    the smoothed loss exceeds `explode` x the best smoothed loss so far (recorded, as the last point)."""
    result, average, best = RangeTest(), 0.0, math.inf
    for i, lr in enumerate(lrs):
        loss = float(train_step(lr))
        if not math.isfinite(loss):
            result.stopped = f"the loss became {loss} at lr {lr:.3g}"
            break
        average = smoothing * average + (1 - smoothing) * loss
        smoothed = average / (1 - smoothing ** (i + 1))  # bias correction: the average starts at 0
        result.lrs.append(lr), result.losses.append(loss), result.smoothed.append(smoothed)
        best = min(best, smoothed)
        if smoothed > explode * best:
            result.stopped = f"the smoothed loss {smoothed:.3g} exceeded {explode:g}x its best {best:.3g} at lr {lr:.3g}"
            break
    return result


def suggest_lr(lrs, smoothed) -> float:
    """The lr of steepest descent of the smoothed loss against log10(lr), before its minimum."""
    if len(lrs) < MIN_POINTS:
        raise UserError(f"the range test stopped after {len(lrs)} steps, too few for a suggestion: the loss "
                        f"exploded right away; lower task.start (now {lrs[0] if lrs else '?'})")
    x = torch.tensor(lrs, dtype=torch.float64).log10()
    y = torch.tensor(smoothed, dtype=torch.float64)
    end = max(int(y.argmin()), 2) + 1  # up to the minimum, at least 3 points
    slope = torch.gradient(y[:end], spacing=(x[:end],))[0]
    return lrs[int(slope.argmin())]


def plot(result: RangeTest, suggested: float, title: str) -> torch.Tensor:
    """Loss and smoothed loss against lr (log x axis), the suggestion marked: a (3, H, W) image on [0, 1]."""
    from cvtrain.viz import _figure, figure_to_tensor

    fig = _figure()
    fig.set_size_inches(7, 4.5)
    ax = fig.add_subplot()
    ax.plot(result.lrs, result.losses, color="0.7", lw=1, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", lw=2, label="smoothed loss")
    ax.axvline(suggested, color="C3", ls="--", label=f"suggested lr {suggested:.2g} (steepest descent)")
    ax.set_xscale("log")
    low, high = min(result.smoothed), result.smoothed[0]  # the plot ends where it exploded: clip the spike
    ax.set_ylim(low - 0.1 * (high - low), high + 0.4 * (high - low) + 1e-12)
    ax.set(xlabel="learning rate (log scale)", ylabel="training loss", title=title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.92)  # fixed margins: tight_layout costs ~0.5 s
    return figure_to_tensor(fig)


def run(cfg, run_dir: Path, emit=print) -> float:
    """The task: the range test on the configured model/optimizer/data; returns the suggested lr."""
    if model_kind(cfg.model.name) != "trained":
        raise UserError(f"task=lr_find: model={cfg.model.name} has no learning rate (it is fitted, not trained); "
                        "choose a trained model, e.g. model=lenet")
    t = cfg.task
    lrs = lr_sequence(t.start, t.end, t.steps)
    device = resolve_device(cfg.trainer.device)
    torch.manual_seed(cfg.trainer.seed)
    data = load_data(cfg.data, device)
    model = build_model(cfg.model, data.shape, data.num_classes).to(device).train()
    loss_fn, regularizer, optimizer = build_loss(cfg.loss), Regularizer(cfg.reg, model), build_optimizer(cfg.optim, model)
    loader = InMemoryLoader(data.train, cfg.data.batch_size, device=device, shuffle=True, preprocess=data.preprocess,
                            augment=BatchAugment(cfg.aug), seed=cfg.trainer.seed, drop_last=True)

    def batches():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    stream = batches()

    scales = [group["lr"] / optimizer.param_groups[0]["lr"] for group in optimizer.param_groups]

    def train_step(lr: float) -> float:
        for group, scale in zip(optimizer.param_groups, scales):  # optim.norm_and_bias_lr_scale: kept
            group["lr"] = lr * scale
        return training_step(model, *next(stream), loss_fn, optimizer, regularizer).loss.item()

    result = range_test(train_step, lrs)
    suggested = suggest_lr(result.lrs, result.smoothed)

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "lr_find.csv", "w") as f:
        f.write("step,lr,loss,smoothed\n")
        f.writelines(f"{i},{lr:.6g},{loss:.6g},{s:.6g}\n"
                     for i, (lr, loss, s) in enumerate(zip(result.lrs, result.losses, result.smoothed)))
    best = min(range(len(result.smoothed)), key=result.smoothed.__getitem__)
    name = f"{cfg.model.name} + {cfg.optim.name} on {cfg.data.name}"
    lines = [f"lr range test: {name}, {len(result.lrs)} of {len(lrs)} steps, lr {lrs[0]:.3g} to {lrs[-1]:.3g}"
             + (f" (stopped: {result.stopped})" if result.stopped else ""),
             f"smoothed loss: {result.smoothed[0]:.4g} at the start, lowest {result.smoothed[best]:.4g} "
             f"at lr {result.lrs[best]:.3g}; steepest descent at lr {suggested:.3g}",
             f"plot: {run_dir / 'lr_find.png'}"]
    image = plot(result, suggested, f"lr range test: {name}")
    save_image(image, run_dir / "lr_find.png")
    writer = SummaryWriter(str(run_dir))
    for i, (lr, loss, s) in enumerate(zip(result.lrs, result.losses, result.smoothed)):
        writer.add_scalar("lr_find/loss", loss, i)
        writer.add_scalar("lr_find/smoothed_loss", s, i)
        writer.add_scalar("lr_find/lr", lr, i)
    writer.add_image("lr_find/plot", image, 0)
    writer.add_text("lr_find/result", "  \n".join(lines + [f"suggested_lr={suggested:.3g}"]), 0)
    writer.close()
    for line in lines:
        emit(line)
    emit(f"suggested_lr={suggested:.3g}")
    return suggested
