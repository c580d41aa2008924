"""What a run records: TensorBoard scalars, metrics.jsonl, hparams, and the
update/weight ratios that tell whether the learning rate is sane.

Tags are namespaced: train/loss, train/acc, val/loss, val/acc, opt/lr,
update_ratio/<param>, grad_norm/<param>, act/<layer>/<stat>, weights/<param>,
grads/<param> (histograms), summary/<metric>.
"""
import json
import logging
import math
from collections import deque
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.tensorboard import SummaryWriter

from cvtrain import TrainingDiverged
from cvtrain.checkpoint import write_text_atomic
from cvtrain.hparams import SUMMARY_METRICS, log_root, session_end, session_start, write_experiment

log = logging.getLogger("cvtrain")

DEAD_WARNING = 0.5  # warn once per layer when at least this fraction of its ReLU units is dead


def upper_median(values):
    """The median of `values` (the upper one of an even count), or None when there are none."""
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else None


class Deferred:
    """Values computed on the device, read on the host a round later, so the training loop never
    waits for the GPU: put() starts a non-blocking copy into pinned host memory; take(keep=1) returns
    the rounds before the newest one (their copies long done), take(keep=0) all of them (it waits).
    Values on the CPU are ready at once: take() returns them whatever `keep` says."""

    def __init__(self):
        self.queue = []  # (host tensor, copy-done event or None, payload)

    def put(self, values: torch.Tensor, payload) -> None:
        if values.is_cuda:
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host, done = values, None
        self.queue.append((host, done, payload))

    def take(self, keep: int = 1):
        """(values as a list, payload) of the rounds that are ready, oldest first."""
        while self.queue and (self.queue[0][1] is None or len(self.queue) > keep):
            host, done, payload = self.queue.pop(0)
            if done is not None:
                done.synchronize()
            yield host.tolist(), payload


def with_median(values: dict) -> dict:
    """`values` with update_ratio/median added when it holds update ratios."""
    median = median_update_ratio(values)
    return values if median is None else {**values, "update_ratio/median": median}


def median_update_ratio(values: dict):
    """The median of the per-tensor log10 update/weight ratios among `values`, or None when there are none."""
    return upper_median(v for k, v in values.items()
                        if k.startswith("update_ratio/") and not k.endswith("/median"))


class UpdateRatioMonitor:
    """log10(||w_after - w_before|| / ||w_before||) for each weight tensor (the change the
    optimizer step really made, whatever the optimizer), their median, and the gradient norm
    of each, on the steps it is called for. Costs one copy of the weights on those steps only."""

    def __init__(self, model: torch.nn.Module):
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.dim() > 1]
        self._before = None

    @torch.no_grad()
    def before_step(self) -> None:
        """Call after backward(), before optimizer.step()."""
        self._before = [p.detach().clone() for _, p in self.params]
        self._grad_norms = [p.grad.norm() if p.grad is not None else torch.zeros((), device=p.device)
                            for _, p in self.params]

    @torch.no_grad()
    def measure(self) -> tuple[list, torch.Tensor]:
        """After optimizer.step(): (tags, values on the device) of the log10 ratios and the gradient norms."""
        if not self.params:
            self._before = None
            return [], torch.zeros(0)
        ratios = torch.stack([(p - b).norm() / b.norm().clamp_min(1e-30)
                              for (_, p), b in zip(self.params, self._before)])
        self._before = None
        tags = [f"update_ratio/{name}" for name, _ in self.params] + [f"grad_norm/{name}" for name, _ in self.params]
        return tags, torch.cat([ratios.clamp_min(1e-30).log10(), torch.stack(self._grad_norms).float()])

    def after_step(self) -> dict:
        """measure(), read on the host (one sync), with the median log10 ratio."""
        tags, values = self.measure()
        return with_median(dict(zip(tags, values.tolist())))


class ActivationMonitor:
    """Statistics of every nonlinearity's output on the measured steps (forward hooks attached
    for that one forward pass only): mean, std, and
      dead_fraction      ReLU family: units never positive over the batch (a unit is a channel
                         of a conv layer, a feature of a linear layer);
      saturated_fraction sigmoid/tanh: outputs within 0.01 of the asymptotes.
    A module called several times in one forward (a shared ReLU) reports its last call."""

    RELU_FAMILY = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.ReLU6)
    SQUASHING = (nn.Sigmoid, nn.Tanh)

    def __init__(self, model: nn.Module):
        self.layers = [(n, m) for n, m in model.named_modules() if isinstance(m, self.RELU_FAMILY + self.SQUASHING)]
        self._handles, self._stats = [], {}

    def attach(self) -> None:
        self._stats = {}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in self.layers]

    def _hook(self, name):
        @torch.no_grad()
        def hook(module, inputs, out):
            out = out.detach().float()
            stats = {"mean": out.mean(), "std": out.std()}
            if isinstance(module, self.RELU_FAMILY):
                units = out.transpose(0, 1).flatten(1) if out.dim() > 1 else out[None]  # unit x (batch, positions)
                stats["dead_fraction"] = 1 - (units > 0).any(1).float().mean()
            else:
                low, high = (0.01, 0.99) if isinstance(module, nn.Sigmoid) else (-0.99, 0.99)
                stats["saturated_fraction"] = ((out < low) | (out > high)).float().mean()
            self._stats[name] = stats
        return hook

    def measure(self) -> tuple[list, torch.Tensor]:
        """Remove the hooks; (tags "act/<layer>/<stat>", values on the device) of the forward pass since attach()."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        names = [(f"act/{layer}/{stat}", v) for layer, stats in self._stats.items() for stat, v in stats.items()]
        if not names:
            return [], torch.zeros(0)
        return [tag for tag, _ in names], torch.stack([v.float() for _, v in names])

    def collect(self) -> dict:
        """measure(), read on the host: {"act/<layer>/<stat>": value}."""
        tags, values = self.measure()
        return dict(zip(tags, values.tolist()))


class LearningRateWatch:
    """Plain-words warning when the median update/weight ratio stays far from 1e-3 (more than
    10x off, i.e. log10 above -2 or below -4) for `patience` measurements in a row.

    "Too low" is only judged while the learning rate is at least half of its peak so far: a
    schedule that anneals the lr (cosine, step decay) shrinks the updates on purpose."""

    def __init__(self, patience: int = 5, low: float = -4.0, high: float = -2.0):
        self.patience, self.low, self.high = patience, low, high
        self.too_high = self.too_low = 0
        self.peak_lr = 0.0
        self.warned = set()

    def update(self, values: dict, lr: float | None = None):
        median = median_update_ratio(values)
        if median is None:
            return None
        if lr is not None:
            self.peak_lr = max(self.peak_lr, lr)
        annealed = lr is not None and lr < 0.5 * self.peak_lr
        self.too_high = self.too_high + 1 if median > self.high else 0
        self.too_low = self.too_low + 1 if median < self.low and not annealed else 0
        for direction, count in (("high", self.too_high), ("low", self.too_low)):
            if count >= self.patience and direction not in self.warned:
                self.warned.add(direction)
                return (f"learning rate likely too {direction}: the median update/weight ratio has been "
                        f"1e{median:.1f} for {count} measurements in a row (healthy: about 1e-3); "
                        f"{'lower' if direction == 'high' else 'raise'} optim.lr")
        return None


class LossGuard:
    """Stops a diverging run: at once on a non-finite loss, and when the mean of the last
    `window` losses exceeds `factor` x the initial loss (the first one, measured before any
    update). Averaging over a window lets a one-batch spike (Adam's first steps, an odd
    batch) pass and still stops a run whose loss has really climbed, within `window` steps."""

    def __init__(self, factor: float = 3.0, window: int = 10):
        self.factor, self.window = factor, window
        self.initial, self.recent = None, deque(maxlen=window)

    def check(self, losses: list, first_step: int) -> None:
        for i, loss in enumerate(losses):
            step = first_step + i
            if not math.isfinite(loss):
                raise TrainingDiverged(f"the loss became {loss} at step {step}; lower optim.lr "
                                       "(or clip gradients) and try again")
            if self.initial is None:
                self.initial = loss
            self.recent.append(loss)
            if len(self.recent) < self.window:
                continue
            mean = sum(self.recent) / self.window
            if self.factor > 0 and mean > self.factor * self.initial:
                raise TrainingDiverged(f"the loss exploded at step {step}: its mean over the last {self.window} "
                                       f"steps is {mean:.4g} > {self.factor:g} x the initial {self.initial:.4g}; "
                                       "lower optim.lr and try again")


class TrainingMonitor:
    """Everything the loop measures, behind three calls per step:

        monitor.before_forward(step); out = model(x); ...; loss.backward()
        monitor.before_step(step); optimizer.step(); monitor.after_step(step)

    Every `monitor_every` steps: update/weight ratios, gradient norms and activation
    statistics (TensorBoard), and the learning-rate watch (a warning in the log);
    every `histogram_every` steps and at the end of every epoch (`end_epoch`): weight and
    gradient histograms, so a short run shows how they moved. `check_losses`
    stops a diverging run (LossGuard). measure=False (the processes of a distributed run other
    than rank 0): nothing is measured, only the loss guard watches."""

    def __init__(self, model: nn.Module, trainer_cfg, logger: "RunLogger", measure: bool = True):
        self.model, self.logger = model, logger
        self.every, self.histogram_every = trainer_cfg.monitor_every, trainer_cfg.histogram_every
        if not measure:
            self.every = self.histogram_every = 0
        self.ratios = UpdateRatioMonitor(model)
        self.activations = ActivationMonitor(model)
        self.lr_watch = LearningRateWatch()
        self.loss_guard = LossGuard(trainer_cfg.explode_factor)
        self.median_ratios = []  # the median log10 update/weight ratio of each measurement
        self.measured = Deferred()  # measurements on their way to the host (written a measurement later on CUDA)
        self.dead_warned = set()  # layers already reported as mostly dead

    def measures(self, step: int) -> bool:
        """Whether `step` is a measured one (update ratios, gradient norms, activations)."""
        return self.every > 0 and step % self.every == 0

    def before_forward(self, step: int) -> None:
        if self.measures(step):
            self.activations.attach()

    def before_step(self, step: int) -> None:
        """After backward(), before optimizer.step()."""
        if self.measures(step):
            self.ratios.before_step()
        if self.histogram_every > 0 and step % self.histogram_every == 0:
            self.logger.histograms(self.model, step)

    def after_step(self, step: int, lr: float | None = None) -> None:
        """After optimizer.step(); `lr`: the learning rate of that step (for the lr watch). The values stay
        on the device until the next measurement (on the CPU: written now)."""
        if not self.measures(step):
            return
        (ratio_tags, ratios), (act_tags, acts) = self.ratios.measure(), self.activations.measure()
        parts = [v for v in (ratios, acts) if len(v)]  # each on the model's device
        self.measured.put(torch.cat(parts) if parts else torch.zeros(0), (ratio_tags + act_tags, step, lr))
        self.write_measured(keep=1)

    def write_measured(self, keep: int = 0) -> None:
        """Write the measurements that reached the host (keep=0: all of them) to TensorBoard, with the
        lr watch and the dead-layer warnings."""
        for values, (tags, step, lr) in self.measured.take(keep):
            self._write(with_median(dict(zip(tags, values))), step, lr)

    def _write(self, values: dict, step: int, lr: float | None) -> None:
        if "update_ratio/median" in values:
            self.median_ratios.append(values["update_ratio/median"])
        self.logger.scalars(values, step)
        warning = self.lr_watch.update(values, lr)
        if warning:
            log.warning(warning)
        for tag, value in values.items():
            layer = tag.removeprefix("act/").removesuffix("/dead_fraction")
            if tag.endswith("/dead_fraction") and value >= DEAD_WARNING and step > 0 and layer not in self.dead_warned:
                self.dead_warned.add(layer)
                log.warning("dead ReLUs: %.0f%% of the units of layer %s never fired on the measured batch (step %d);"
                            " a too-high learning rate or a bad init kills them for good: lower optim.lr",
                            100 * value, layer, step)

    def end_epoch(self, step: int) -> None:
        """After the last step of an epoch: the measurements still on their way, and histograms (unless
        trainer.histogram_every=0)."""
        self.write_measured()
        if self.histogram_every > 0:
            self.logger.histograms(self.model, step)

    def check_losses(self, losses: list, first_step: int) -> None:
        self.loss_guard.check(losses, first_step)

    def summary(self) -> dict:
        """For summary.json: the median over the run of the per-measurement median log10
        update/weight ratio (healthy: about -3), or nothing when none was measured."""
        self.write_measured()
        median = upper_median(self.median_ratios)
        return {} if median is None else {"update_ratio_log10": round(median, 3)}


def write_summary(run_dir: Path, summary: dict) -> None:
    """<run dir>/summary.json: the one place it is written (every task that trains or fits)."""
    Path(run_dir, "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


class NoLogger:
    """RunLogger's stand-in in the processes of a distributed run other than rank 0: rank 0 writes
    the run's files (TensorBoard, metrics.jsonl), the others write nothing."""
    writer = None

    def scalars(self, values: dict, step: int) -> None:
        pass

    def series(self, tag: str, values: list, first_step: int) -> None:
        pass

    def histograms(self, model: nn.Module, step: int) -> None:
        pass

    def epoch_record(self, record: dict) -> None:
        pass

    def summary(self, summary: dict, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def drop_records_after(path: Path, epoch: int) -> None:
    """Rewrite metrics.jsonl at `path` (if any) without the records of epochs after `epoch` and without lines
    that are not whole JSON records; atomically (a temporary file renamed over it), and only if it changes."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("epoch", 0) <= epoch:
            kept.append(line)
    if len(kept) == len(lines):
        return
    log.info("%s: dropped %d record(s) written after epoch %d (the checkpoint this run resumes from)",
             path.name, len(lines) - len(kept), epoch)
    write_text_atomic(path, "".join(line + "\n" for line in kept))


class RunLogger:
    """One run's TensorBoard event file (directly in the run dir, so the run's name in TensorBoard is
    the run dir's path under the log dir) and metrics.jsonl; its HPARAMS session (cvtrain/hparams.py).
    Inside a Hydra run it also rewrites the log dir's HPARAMS experiment, at the start and at close().

    `resumed_at` (epoch, step) of the checkpoint a resumed run continues from: whatever the run dir recorded
    after it (a process killed between an epoch's record and its checkpoint) is written again by the resumed
    run, so metrics.jsonl drops its records of later epochs (and a half-written last line) and TensorBoard
    hides the events after that step (SummaryWriter's purge_step): one record, one point per epoch and step."""

    def __init__(self, run_dir: Path, hparams: dict, resumed_at: tuple[int, int] | None = None):
        if resumed_at is not None:
            drop_records_after(run_dir / "metrics.jsonl", resumed_at[0])
        self.writer = SummaryWriter(str(run_dir), purge_step=None if resumed_at is None else resumed_at[1] + 1)
        self.writer.file_writer.add_summary(session_start(hparams))
        self.writer.add_custom_scalars({"babysitting": {
            "update/weight ratio, log10: the median over a run's weight tensors (healthy near -3)":
                ["Multiline", ["update_ratio/median", "update_ratio/reference_1e-3"]],
            "learning rate, log10": ["Multiline", ["opt/lr_log10"]],
            "loss": ["Multiline", ["train/loss", "val/loss"]],
            "accuracy": ["Multiline", ["train/acc", "val/acc"]],
        }})
        self.metrics_file = open(run_dir / "metrics.jsonl", "a")
        self.root = log_root(run_dir)
        self._update_experiment()

    def _update_experiment(self) -> None:
        if self.root is None:
            return
        try:
            write_experiment(self.root)
        except (OSError, ValueError) as err:  # a run rewriting it, or a half-written file of a run in progress
            # at the same moment: the next write covers this run
            log.warning("could not update the HPARAMS experiment in %s: %s", self.root, err)

    def scalars(self, values: dict, step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def series(self, tag: str, values: list, first_step: int) -> None:
        """values[i] at step first_step + i; None: no point at that step."""
        for i, value in enumerate(values):
            if value is not None:
                self.writer.add_scalar(tag, value, first_step + i)

    @torch.no_grad()
    def histograms(self, model: nn.Module, step: int) -> None:
        for name, p in model.named_parameters():
            self.writer.add_histogram(f"weights/{name}", p.detach().float().cpu(), step)
            if p.grad is not None:
                self.writer.add_histogram(f"grads/{name}", p.grad.detach().float().cpu(), step)

    def epoch_record(self, record: dict) -> None:
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()

    def summary(self, summary: dict, step: int) -> None:
        """The final figures as summary/<metric> scalars (the HPARAMS tab's metrics) and the session end."""
        for metric in SUMMARY_METRICS:
            value = summary.get(metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"summary/{metric}", value, step)
        self.writer.file_writer.add_summary(session_end(summary.get("status", "completed")))

    def close(self) -> None:
        self.writer.close()
        self.metrics_file.close()
        self._update_experiment()
