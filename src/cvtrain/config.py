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
    # fitted on the training split only, stored in checkpoints (src/cvtrain/data/preprocess.py):
    preprocess: str = "standardize"  # standardize | channel_mean | mean_image | pca_whiten | zca_whiten
    whiten_eps: float = 1e-2  # pca/zca_whiten: added to the covariance eigenvalues ([0, 1] pixel scale)
    # synthetic data only
    channels: int = 3
    num_classes: int = 10
    num_samples: int = 1000
    num_test: int = 200
    noise: float = 0.6


@dataclass
class AugConfig:
    """Batched augmentation (src/cvtrain/data/augment.py); every default is off."""
    hflip: bool = False  # random horizontal flip (p = 1/2)
    vflip: bool = False  # random vertical flip (p = 1/2)
    crop_padding: int = 0  # random crop of the original size after zero padding
    resized_crop: bool = False  # random resized crop: a window of the area/aspect below, scaled to full size
    resized_crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # [min, max] area fraction
    resized_crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])  # [min, max] width/height
    brightness: float = 0.0  # color jitter: factor in [1 - a, 1 + a]
    contrast: float = 0.0
    saturation: float = 0.0  # RGB only
    hue: float = 0.0  # RGB only; shift in [-hue, hue] of a full turn, <= 0.5
    grayscale_p: float = 0.0  # RGB only; probability of turning an image gray
    rotation_degrees: float = 0.0  # affine: rotation in [-d, d]
    translate: float = 0.0  # affine: shift in [-t, t] of the width / height
    shear_degrees: float = 0.0  # affine: x-shear angle in [-d, d]
    stretch: list[float] = field(default_factory=lambda: [1.0, 1.0])  # affine: x and y scale factors in [min, max]
    pca_color_std: float = 0.0  # AlexNet's PCA color noise (paper: 0.1); RGB only
    erasing_p: float = 0.0  # random erasing / cutout probability
    erasing_scale: list[float] = field(default_factory=lambda: [0.02, 0.33])  # [min, max] area fraction
    erasing_ratio: list[float] = field(default_factory=lambda: [0.3, 3.3])  # [min, max] height/width
    mixup_alpha: float = 0.0  # mixup lam ~ Beta(a, a); 0 = off
    cutmix_alpha: float = 0.0  # cutmix lam ~ Beta(a, a); 0 = off (both set: one per batch, p = 1/2)


@dataclass
class RegConfig:
    l2: float = 0.0  # loss term 0.5 * l2 * sum(w^2) over weight tensors
    l1: float = 0.0  # loss term l1 * sum(|w|)
    max_norm: float = 0.0  # after each step: each unit's incoming weights projected into ||w||_2 <= max_norm; 0: off
    grad_clip: float = 0.0  # before each step: the global gradient norm clipped to grad_clip; 0: off


@dataclass
class TrainerConfig:
    epochs: int = 10
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    monitor_every: int = 50  # steps between update-ratio / grad-norm / activation measurements
    histogram_every: int = 500  # steps between weight and gradient histograms (0: never)
    explode_factor: float = 3.0  # stop when the loss exceeds this x the initial loss (0: only non-finite)
    log_every: int = 10  # steps between flushes of the per-step loss to TensorBoard
    progress: bool = True  # progress bar per epoch (only on a terminal)
    checkpoint: bool = True  # write checkpoints/last.pt and best.pt
    resume: Optional[str] = None  # path to a checkpoint to continue from
    test: bool = False  # evaluate the best checkpoint on the test split at the end
    sanity: bool = False  # run task=sanity's checks first; a failed check stops the run (exit 2)
    viz: bool = True  # write filters/templates/confusion matrix/misclassified/embedding at the end of the run
    lr_find_steps: int = 100  # task=lr_find: steps of the learning-rate range test (fewer if the loss explodes)
    lr_find_start: float = 1e-7  # task=lr_find: the first lr; it grows exponentially ...
    lr_find_end: float = 10.0  # task=lr_find: ... to this last lr


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


# Config keys that do not change what is learned, or repeat a group's choice: not hyperparameters,
# neither in TensorBoard's HPARAMS tab (monitor.run_hparams) nor as columns of scripts/compare_runs.py.
NOT_HPARAMS = {"task", "data.source", "data.root", "data.download", "data.cache_dir", "data.eval_batch_size",
               "trainer.progress", "trainer.log_every", "trainer.checkpoint", "trainer.resume", "trainer.sanity",
               "trainer.monitor_every", "trainer.histogram_every", "trainer.explode_factor", "trainer.viz",
               "trainer.lr_find_steps", "trainer.lr_find_start", "trainer.lr_find_end"}
SYNTHETIC_ONLY = {"data.channels", "data.num_classes", "data.num_samples", "data.num_test", "data.noise"}


def register_configs() -> None:
    ConfigStore.instance().store(name="cvtrain_schema", node=Config)
