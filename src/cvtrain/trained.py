"""A trained model from its checkpoint alone: what task=evaluate, predict and export start from.

    path = checkpoint_file("outputs/2026-12-01/15-12-29_digits_lenet_adam")   # a run dir -> its best.pt
    trained = load_trained(path, device="cpu")
    trained.scores(x01)       # float images (N, C, H, W) on [0, 1] -> scores (N, classes)
    trained.classes, trained.shape, trained.config, trained.preprocess, trained.model

A checkpoint (cvtrain/checkpoint.py) holds the weights, the resolved config, the class names, the image
shape and the fitted preprocessing (data.preprocess): build_model(config.model, shape, classes) and
load_state_dict rebuild the network, Preprocessor.from_state_dict the transform. No data is read and
nothing is re-fitted. A fitted model (model_kind "fitted": kNN) stores its training images and labels
instead of weights (tasks/knn.py, checkpoints/best.pt): they go through the stored preprocessing once
and a KNNScores module scores queries against them.

`trained.model` maps preprocessed images to scores: a trained network's logits; kNN's log of the vote
fractions, log(votes / k), so a softmax of the scores is the vote fractions, the argmax is the vote
(ties to the smallest class index, as KNNClassifier) and every consumer treats both kinds alike.

Deployable(trained, input="float"|"uint8") is the whole model as one nn.Module, preprocessing folded
in: images on [0, 1] (or uint8 0-255) in, scores out; what task=export writes as ONNX, TorchScript and
a torch.export program.
"""
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from cvtrain import UserError
from cvtrain.checkpoint import load_checkpoint, rng_state
from cvtrain.data.preprocess import Preprocessor
from cvtrain.models import build_model, model_kind

log = logging.getLogger("cvtrain")

CHECKPOINT_TASKS = ("evaluate", "predict", "export")  # the tasks that read checkpoint=
INPUTS = ("float", "uint8")  # what a Deployable takes: float images on [0, 1], or uint8 images 0-255
PREPROCESS_CHUNK = 10_000  # images preprocessed at a time (kNN's stored training images), as tasks/knn.py does


def checkpoint_file(path) -> Path:
    """The checkpoint that `path` names: a .pt file as is; a run dir: its checkpoints/best.pt (the best
    validation accuracy), else checkpoints/last.pt with a note; a checkpoints/ folder likewise."""
    given = str(path)
    path = Path(os.path.expanduser(given))
    if not path.exists():
        raise UserError(f"checkpoint={given}: no such file or folder; give a run dir (outputs/<date>/<time>_<run>/) "
                        "or a checkpoint file (<run dir>/checkpoints/best.pt)")
    if path.is_file():
        return path
    for folder in (path / "checkpoints", path):
        if (folder / "best.pt").is_file():
            return folder / "best.pt"
        if (folder / "last.pt").is_file():
            log.info("note: %s has no best.pt; using %s", folder, folder / "last.pt")
            return folder / "last.pt"
    hint = ("a run with trainer.checkpoint=false writes none (kNN runs store their training images in "
            "checkpoints/best.pt since cvtrain 0.1.0: fit it again with model=knn trainer.checkpoint=true)")
    raise UserError(f"checkpoint={given}: {path} holds no checkpoints/best.pt or last.pt; {hint}")


def require_checkpoint(cfg) -> Path:
    """The checkpoint file of the command line's checkpoint=, or an error naming what to give."""
    given = OmegaConf.select(cfg, "checkpoint", default=None)
    if given in (None, ""):
        task = OmegaConf.select(cfg, "task.name", default="evaluate")
        runs = sorted(Path("outputs").glob("*/*/checkpoints/best.pt"), key=lambda p: p.stat().st_mtime)
        example = runs[-1].parent.parent if runs else "outputs/<date>/<time>_<data>_<model>_<optim>"
        raise UserError(f"task={task} needs checkpoint=<run dir or .pt file>, e.g. checkpoint={example} "
                        "(a run dir: its checkpoints/best.pt)")
    return checkpoint_file(given)


class KNNScores(nn.Module):
    """kNN as a module: preprocessed queries (N, ...) -> log(votes / k) per class (N, classes), the same
    distances, neighbours and vote as KNNClassifier (models/knn.py) for queries of one chunk. -inf for a class
    without votes: its softmax is the vote fractions exactly."""

    def __init__(self, train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, k: int, distance: str):
        super().__init__()
        self.register_buffer("train_x", train_x.flatten(1).float())
        self.register_buffer("train_y", train_y.long())
        self.register_buffer("train_sq", (self.train_x * self.train_x).sum(1))
        self.num_classes, self.k, self.distance = num_classes, min(k, len(train_y)), distance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x.flatten(1).float()
        if self.distance == "l2":
            d = (q * q).sum(1, keepdim=True) - 2 * q @ self.train_x.T + self.train_sq
        else:  # (no ONNX: the exporter has no translation of torch.cdist)
            d = torch.cdist(q, self.train_x, p=1)
        labels = self.train_y[d.topk(self.k, dim=1, largest=False, sorted=True).indices]
        votes = F.one_hot(labels, self.num_classes).sum(1).float()
        return torch.log(votes / self.k)

    def extra_repr(self) -> str:
        return f"k={self.k}, distance={self.distance}, {len(self.train_y)} training images"


class Preprocess(nn.Module):
    """A fitted Preprocessor as a module (its statistics as buffers): the same arithmetic, exportable."""

    def __init__(self, preprocess: Preprocessor, shape):
        super().__init__()
        self.method, self.shape = preprocess.method, tuple(shape)
        stats = {k: v.float() for k, v in preprocess.stats.items()}
        mean = stats["mean"]
        self.register_buffer("mean", mean.view(1, -1, 1, 1) if mean.dim() == 1 else mean.unsqueeze(0))
        if "std" in stats:
            self.register_buffer("std", stats["std"].view(1, -1, 1, 1))
        if "matrix" in stats:
            self.register_buffer("matrix", stats["matrix"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == "standardize":
            return (x - self.mean) / self.std
        if self.method in ("channel_mean", "mean_image"):
            return x - self.mean
        return ((x - self.mean).flatten(1) @ self.matrix).reshape(-1, *self.shape)


class Deployable(nn.Module):
    """The model with its preprocessing folded in: images (N, C, H, W), float on [0, 1] (input="float") or
    uint8 0-255 (input="uint8"), in the training geometry and channel order (RGB or gray) -> scores
    (N, classes): logits (kNN: log vote fractions); their softmax is the class probabilities."""

    def __init__(self, trained: "TrainedModel", input: str = "float"):
        super().__init__()
        if input not in INPUTS:
            raise UserError(f"task.input={input} is unknown; choose float (images on [0, 1]) or uint8 (0-255)")
        self.input = input
        self.preprocess = Preprocess(trained.preprocess, trained.shape)
        self.model = trained.model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if self.input == "uint8":
            x = x / 255.0
        return self.model(self.preprocess(x))


@dataclass
class TrainedModel:
    """A model rebuilt from a checkpoint: `model` (preprocessed images -> scores, in eval mode), the
    fitted `preprocess`, the class names, the image shape (C, H, W), the training run's config."""
    model: nn.Module
    preprocess: Preprocessor
    classes: list
    shape: tuple
    config: Any  # DictConfig of the training run (the checkpoint's resolved config)
    path: Path  # the checkpoint file
    kind: str = "trained"  # model_kind: "trained" (a network) or "fitted" (kNN)
    info: dict = field(default_factory=dict)  # epoch, step, best_val_acc, best_epoch of the checkpoint; weights:
    # "ema" when it holds trainer.ema's moving average (best.pt of trainer.select=ema), else None (trained weights)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def name(self) -> str:
        return str(self.config.model.name)

    @property
    def run_dir(self) -> Optional[Path]:
        """The training run's dir when the checkpoint lies in its checkpoints/ folder."""
        return self.path.parent.parent if self.path.parent.name == "checkpoints" else None

    @property
    def device(self) -> torch.device:
        tensor = next(iter(self.model.buffers()), None) if self.kind == "fitted" else \
            next(iter(self.model.parameters()), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def to(self, device) -> "TrainedModel":
        self.model.to(device)
        self.preprocess = self.preprocess.to(device)
        return self

    @torch.inference_mode()
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Float images (N, C, H, W) on [0, 1] -> scores (N, classes), through the stored preprocessing."""
        return self.model(self.preprocess(x.to(self.device)))

    def describe(self) -> str:
        """One line: the checkpoint, its model, data and training state."""
        data = self.config.data.name if "data" in self.config else "?"
        shape = "x".join(map(str, self.shape))
        state = (f"epoch {self.info['epoch']}, best val acc {100 * self.info['best_val_acc']:.2f}%"
                 if self.kind == "trained" and self.info.get("best_val_acc", -1) >= 0 else
                 f"k={self.model.k}, {len(self.model.train_y)} training images" if self.kind == "fitted" else
                 f"epoch {self.info.get('epoch', '?')}")
        return f"{self.path} ({self.name} on {data} {shape}, {self.num_classes} classes; {state})"


def load_trained(path, device="cpu") -> TrainedModel:
    """The model of the checkpoint `path` (a .pt file or a run dir), on `device`, in eval mode."""
    path = checkpoint_file(path)
    saved = load_checkpoint(path, map_location="cpu")
    data = saved.get("data") or {}
    missing = [key for key in ("classes", "shape") if key not in data]
    if missing:
        raise UserError(f"{path} has no {' or '.join(missing)} stored; a checkpoint of an older cvtrain: "
                        "train the run again")
    classes, shape = [str(c) for c in data["classes"]], tuple(int(s) for s in data["shape"])
    preprocess = Preprocessor.from_state_dict(data["preprocess"]) if data.get("preprocess") else \
        Preprocessor.standardize(data["mean"], data["std"])
    config = OmegaConf.create(saved["config"])
    model_cfg = saved["config"]["model"]
    kind = model_kind(model_cfg["name"])
    info = {key: saved.get(key) for key in ("epoch", "step", "best_val_acc", "best_epoch", "weights")}
    if kind == "fitted":
        model = _fitted_module(saved, model_cfg, preprocess, len(classes), path)
    else:
        model = build_model(model_cfg, shape, len(classes))
        try:
            model.load_state_dict(saved["model"])
        except RuntimeError as err:
            raise UserError(f"{path}: its weights do not fit model {model_cfg} on images {shape}: "
                            f"{str(err).splitlines()[-1].strip()}") from None
    model.eval()
    return TrainedModel(model, preprocess, classes, shape, config, path, kind, info).to(torch.device(device))


def _fitted_module(saved: dict, model_cfg: dict, preprocess: Preprocessor, num_classes: int, path: Path) -> nn.Module:
    """A fitted model's module from its stored training images (kNN: KNNScores)."""
    stored = saved["model"]
    if not isinstance(stored, dict) or "train_images" not in stored:
        raise UserError(f"{path} holds no training images of {model_cfg['name']}; fit it again "
                        "(kNN runs store them in checkpoints/best.pt)")
    images, labels = stored["train_images"], stored["train_labels"]
    x = torch.cat([preprocess(part.float().div_(255)) for part in images.split(PREPROCESS_CHUNK)])
    options = build_model(model_cfg, images.shape[1:], num_classes)  # checks the options, as training did
    return KNNScores(x, labels, num_classes, options.k, options.distance)


def fitted_checkpoint(images: torch.Tensor, labels: torch.Tensor, config: dict, data, val_acc: float) -> dict:
    """The checkpoint of a fitted model (kNN): its training images (uint8) and labels in place of weights,
    the keys every checkpoint has (load_checkpoint), and the data's classes, shape and preprocessing."""
    return {"model": {"train_images": images.cpu().clone(), "train_labels": labels.cpu().clone()},
            "optimizer": {}, "scheduler": {}, "epoch": 0, "step": 0, "best_val_acc": val_acc, "best_epoch": 0,
            "rng": rng_state(), "config": config,
            "data": {"mean": data.mean, "std": data.std, "preprocess": data.preprocess.state_dict(),
                     "classes": list(data.classes), "shape": list(data.shape)}}
