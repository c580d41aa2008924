"""Structured-config schemas.

Hydra merges the YAML files of each config group into these dataclasses, so a
misspelled key (``trainer.epoch=3``) or a wrong type (``trainer.epochs=abc``)
fails at start with Hydra's own message. Groups whose keys depend on the choice
(model, optim, sched, loss) are plain YAML; Hydra's struct mode still rejects
unknown keys there, and the model builder checks its arguments.
"""
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class DataConfig:
    source: str = "digits"  # digits | mnist | fashion_mnist | cifar10 | cifar100 | svhn | imagefolder | synthetic
    root: Optional[str] = None  # where torchvision datasets / an ImageFolder tree live
    download: bool = True  # torchvision sources only
    batch_size: int = 128
    eval_batch_size: int = 1000
    val_fraction: float = 0.1  # carved from train (stratified) when the source has no val split
    split_seed: int = 0  # fixes the validation split independently of trainer.seed
    image_size: Optional[int] = None  # imagefolder: resize+center-crop; synthetic: side length
    cache_dir: str = "~/.cache/cvtrain"  # decoded ImageFolder tensors
    # synthetic data only
    channels: int = 3
    num_classes: int = 10
    num_samples: int = 1000
    num_test: int = 200
    noise: float = 0.6


@dataclass
class AugConfig:
    hflip: bool = False  # random horizontal flip
    crop_padding: int = 0  # random crop of the original size after zero padding


@dataclass
class RegConfig:
    l2: float = 0.0  # loss term 0.5 * l2 * sum(w^2) over weight tensors
    l1: float = 0.0  # loss term l1 * sum(|w|)


@dataclass
class TrainerConfig:
    epochs: int = 10
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    monitor_every: int = 50  # steps between update-ratio / grad-norm measurements
    log_every: int = 10  # steps between flushes of the per-step loss to TensorBoard
    progress: bool = True  # progress bar per epoch (only on a terminal)
    checkpoint: bool = True  # write checkpoints/last.pt and best.pt
    resume: Optional[str] = None  # path to a checkpoint to continue from
    test: bool = False  # evaluate the best checkpoint on the test split at the end


@dataclass
class Config:
    task: str = "train"
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    reg: RegConfig = field(default_factory=RegConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    model: Any = None
    loss: Any = None
    optim: Any = None
    sched: Any = None


def register_configs() -> None:
    ConfigStore.instance().store(name="cvtrain_schema", node=Config)
