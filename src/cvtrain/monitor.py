"""What a run records: TensorBoard scalars, metrics.jsonl, hparams, and the
update/weight ratios that tell whether the learning rate is sane.

Tags are namespaced: train/loss, train/acc, val/loss, val/acc, opt/lr,
update_ratio/<param>, grad_norm/<param>, summary/<metric>.
"""
import json
import math
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

# the final figures shown beside the hyperparameters in TensorBoard's HPARAMS tab
SUMMARY_METRICS = ["best_val_acc", "final_val_acc", "test_acc", "train_time_s", "train_images_per_s"]
UPDATE_RATIO_REFERENCE = -3.0  # log10(1e-3): the course's rule of thumb for a healthy learning rate


class UpdateRatioMonitor:
    """Every `every` steps: log10(||w_after - w_before|| / ||w_before||) for each weight
    tensor (the change the optimizer step really made, whatever the optimizer), and
    the gradient norm of each. Costs one copy of the weights on the measured steps only."""

    def __init__(self, model: torch.nn.Module, every: int):
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.dim() > 1]
        self.every = every
        self._before = None

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    @torch.no_grad()
    def before_step(self) -> None:
        """Call after backward(), before optimizer.step()."""
        self._before = [p.detach().clone() for _, p in self.params]
        self._grad_norms = [p.grad.norm() if p.grad is not None else torch.zeros((), device=p.device)
                            for _, p in self.params]

    @torch.no_grad()
    def after_step(self) -> dict:
        ratios = torch.stack([(p - b).norm() / b.norm().clamp_min(1e-30)
                              for (_, p), b in zip(self.params, self._before)])
        log_ratios = ratios.clamp_min(1e-30).log10().tolist()
        grad_norms = torch.stack(self._grad_norms).tolist()
        self._before = None
        values = {f"update_ratio/{name}": r for (name, _), r in zip(self.params, log_ratios)}
        values.update({f"grad_norm/{name}": g for (name, _), g in zip(self.params, grad_norms)})
        values["update_ratio/reference_1e-3"] = UPDATE_RATIO_REFERENCE
        return values


# settings that do not change what is learned: left out of the HPARAMS table
_NOT_HPARAMS = {"trainer.progress", "trainer.log_every", "trainer.checkpoint", "trainer.resume",
                "trainer.monitor_every", "data.cache_dir", "data.root", "data.download", "data.eval_batch_size"}
_SYNTHETIC_ONLY = {"data.channels", "data.num_classes", "data.num_samples", "data.num_test", "data.noise"}


def run_hparams(plain_cfg: dict, choices: dict) -> dict:
    """The HPARAMS-tab row of a run: its config choices and the values that shape training."""
    values = flat_hparams({k: plain_cfg[k] for k in ("model", "loss", "reg", "optim", "sched", "aug", "data", "trainer")})
    skip = _NOT_HPARAMS | (_SYNTHETIC_ONLY if plain_cfg["data"]["source"] != "synthetic" else set())
    return {**choices, **{k: v for k, v in values.items() if k not in skip}}


def flat_hparams(node, prefix: str = "") -> dict:
    """A nested config as {"optim.lr": 0.001, ...} with values TensorBoard accepts."""
    out = {}
    for key, value in node.items():
        if str(key).startswith("_"):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_hparams(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


class RunLogger:
    """One run's TensorBoard directory (run_dir/tb) and metrics.jsonl."""

    def __init__(self, run_dir: Path, hparams: dict):
        self.writer = SummaryWriter(str(run_dir / "tb"))
        # hparams go into this run's own event file (add_hparams would make a stray sub-run)
        metric_tags = {f"summary/{m}": 0.0 for m in SUMMARY_METRICS}
        for summary in hparams_summary(hparams, metric_tags):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_custom_scalars({"babysitting": {
            "update/weight ratio, log10 (healthy near -3)": ["Multiline", ["update_ratio/.*"]],
            "loss": ["Multiline", ["train/loss", "val/loss"]],
            "accuracy": ["Multiline", ["train/acc", "val/acc"]],
        }})
        self.metrics_file = open(run_dir / "metrics.jsonl", "a")

    def scalars(self, values: dict, step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def series(self, tag: str, values: list, first_step: int) -> None:
        for i, value in enumerate(values):
            self.writer.add_scalar(tag, value, first_step + i)

    def epoch_record(self, record: dict) -> None:
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()

    def summary(self, summary: dict, step: int) -> None:
        for metric in SUMMARY_METRICS:
            value = summary.get(metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"summary/{metric}", value, step)

    def close(self) -> None:
        self.writer.close()
        self.metrics_file.close()
