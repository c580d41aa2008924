"""Structured-config schemas and the one convention of the config groups.

Two kinds of group:

- A group that picks one of several things (model, loss, optim, sched, data) names it with
  `name:`; the other keys of the node are that thing's arguments, checked against its
  signature when it is built (`named_choice` + `check_arguments`), so a key it does not take
  is an error naming the valid ones. Their option files (configs/<group>/<option>.yaml) are
  the one copy of the arguments' values: the builders have no defaults of their own.
- A group of settings of one thing (data, aug, reg, trainer) has a typed dataclass schema
  below that holds every default, with a comment per field; its option files set only what
  differs from the schema (data picks its source with `name:` as well). A misspelled key
  (`trainer.epoch=3`) or a wrong type (`trainer.epochs=abc`) fails at start with Hydra's own
  message.

No config node has a `_target_`: nothing is instantiated by Hydra.
"""
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from cvtrain import UserError


@dataclass
class DataConfig:
    # the source; every data option sets it (src/cvtrain/data/sources.py):
    name: str = MISSING  # digits | mnist | fashion_mnist | cifar10 | cifar100 | svhn | imagefolder | synthetic
    root: Optional[str] = "data"  # torchvision sources: the folder that holds their files; imagefolder: required
    download: bool = True  # torchvision sources only: fetch the files when they are missing (needs internet)
    batch_size: int = 128
    eval_batch_size: int = 1000
    # where the uint8 images live during training: device (on the GPU: no copies per batch), host (pinned
    # memory, each batch copied ahead on a side stream), auto: device when they fit in half its free memory
    placement: str = "auto"  # auto | device | host; on the CPU all three are the same
    val_fraction: float = 0.1  # carved from train (stratified) when the source has no val split
    split_seed: int = 0  # fixes the validation split independently of trainer.seed
    # a subset of every split, taken after the validation split (src/cvtrain/data/subset.py): the classes kept, by
    # name or index, labeled 0..k-1 in the order given (null: all); at most max_per_class training images per class,
    # a random choice seeded by data.split_seed (null: all; val and test are never capped)
    classes: Optional[list[Any]] = None
    max_per_class: Optional[int] = None
    # imagefolder: resize (shorter side) + center-crop to this side, needed when sizes differ; synthetic: the side
    image_size: Optional[int] = None
    cache_dir: str = "~/.cache/cvtrain"  # imagefolder: the decoded images (a uint8 file), keyed by the files, sizes, mtimes
    # imagefolder: true keeps the decoded images in memory; false leaves them memory-mapped in data.cache_dir, read a
    # batch at a time (datasets larger than memory; the same batches); auto: in memory when they take at most half
    # the available memory. The other sources are always in memory (false says so in the log)
    in_memory: str = "auto"  # auto | true | false
    num_workers: Optional[int] = None  # imagefolder: processes decoding into the cache and reading mapped batches;
    # null: min(8, CPUs); 0: none (all in the main process)
    on_bad_image: str = "error"  # imagefolder: error (stop, naming the file) | skip (leave it out, with a warning)
    # fitted on the training split only, stored in checkpoints (src/cvtrain/data/preprocess.py):
    preprocess: str = "standardize"  # standardize | channel_mean | mean_image | pca_whiten | zca_whiten
    whiten_eps: float = 1e-2  # pca/zca_whiten: added to the covariance eigenvalues ([0, 1] pixel scale)
    # synthetic data only: class prototypes + pixel noise
    channels: int = 3
    num_classes: int = 10
    num_samples: int = 1000  # training images (val_fraction is carved from these)
    num_test: int = 200
    noise: float = 0.6


@dataclass
class AugConfig:
    """Batched augmentation (src/cvtrain/data/augment.py); every default is off (aug=none)."""
    hflip: bool = False  # random horizontal flip (p = 1/2)
    vflip: bool = False  # random vertical flip (p = 1/2)
    alternate_flips: bool = False  # with hflip: each image mirrored in every other epoch (airbench's altflip)
    crop_padding: int = 0  # random crop of the original size after padding by this many pixels
    crop_padding_mode: str = "zeros"  # zeros | reflect (mirror the border: airbench's "translate")
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
    """Regularization (src/cvtrain/losses.py); every default is off (reg=none). The optimizers
    may still apply their own weight_decay."""
    l2: float = 0.0  # loss term 0.5 * l2 * sum(w^2) over weight tensors (biases excluded)
    l1: float = 0.0  # loss term l1 * sum(|w|) over weight tensors (biases excluded)
    max_norm: float = 0.0  # after each step: each unit's incoming weights projected into ||w||_2 <= max_norm; 0: off
    grad_clip: float = 0.0  # before each step: the global gradient norm clipped to grad_clip; 0: off


@dataclass
class TrainerConfig:
    """The training loop (src/cvtrain/train.py)."""
    epochs: int = 10
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0  # model init, batch order, augmentation (not the validation split: data.split_seed)
    monitor_every: int = 50  # steps between update/weight-ratio, grad-norm and activation measurements
    histogram_every: int = 500  # steps between weight and gradient histograms (0: never)
    explode_factor: float = 3.0  # stop when the loss exceeds this x the initial loss (0: only on nan/inf)
    log_every: int = 10  # steps between flushes of the per-step loss to TensorBoard
    progress: bool = True  # progress bar per epoch (only when attached to a terminal)
    checkpoint: bool = True  # checkpoints/last.pt every epoch, best.pt on a new best val acc
    resume: Optional[str] = None  # a checkpoint to continue from (outputs/.../checkpoints/last.pt), or auto:
    # the newest good checkpoint of this run dir (hydra.run.dir=<run dir>), a fresh start when there is none
    checkpoint_every_steps: int = 0  # also checkpoints/step-<step>.pt every N optimizer steps (0: off)
    keep_checkpoints: int = 2  # step-<step>.pt files kept (the newest ones)
    test: bool = False  # evaluate best.pt on the test split at the end
    sanity: bool = False  # run task=sanity's checks first; a failed check stops the run (exit 2)
    viz: bool = True  # filters/templates, confusion matrix, misclassified, projector at the end (<run dir>/viz, tb)
    # speed (src/cvtrain/speed.py); an option that does not apply on the device is ignored with a note
    precision: str = "32"  # 32 | bf16 (bfloat16 autocast) | 16 (float16 autocast + gradient scaler; CUDA)
    channels_last: bool = False  # NHWC memory layout for the model and its input batches
    compile: bool = False  # torch.compile the model (compile_time_s is reported apart from training)
    compile_mode: str = "default"  # default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    cudnn_benchmark: bool = True  # CUDA: cuDNN picks the fastest convolution algorithm per shape
    tf32: bool = False  # CUDA: float32 matrix products in TF32 (Ampere and newer)
    # evaluation and weight averaging (src/cvtrain/loop.py)
    tta: str = "none"  # test-time augmentation of validation/test: none | flip | flip_translate
    lookahead_every: int = 0  # Lookahead weight averaging every k optimizer steps (0: off)
    lookahead_alpha: float = 0.5  # the slow weights' step toward the fast ones at the end (from 1.0 at the start)
    # an exponential moving average of the weights (src/cvtrain/ema.py), evaluated each epoch beside them
    ema: float = 0.0  # its decay per optimizer step, in [0, 1), e.g. 0.999 (0: off); warm-up for short runs
    select: str = "raw"  # the weights best.pt keeps: raw | ema (the EMA's val acc decides) | best (the better each epoch)
    keep_snapshots: int = 0  # checkpoints/snapshot-<cycle>.pt at the ends of the last N cycles of sched=cosine_restarts
    # several processes (torchrun, src/cvtrain/distributed.py)
    sync_bn: bool = False  # batch norm statistics over the global batch (SyncBatchNorm; CUDA only, ignored on the CPU)


@dataclass
class SearchConfig:
    """task=search (src/cvtrain/tasks/search.py): hyperparameter search on Optuna. The space comes from the
    group `search` (configs/search/*.yaml: search=lr_reg, task=search's default); the rest are settings."""
    # config key (nested or dotted) -> range: [low, high] (uniform), [low, high, log] (log-uniform),
    # {low, high, log, step, type: int|float} or {choices: [...]}
    space: dict[str, Any] = field(default_factory=dict)
    n_trials: int = 20  # trials in all, counting every worker's (a killed trial is redone, not counted)
    sampler: str = "random"  # random (the course's: independent draws) | tpe (Optuna's TPE) | grid
    grid_points: int = 3  # sampler=grid: values per range (log-spaced for a log range), or a range's choices
    pruner: str = "median"  # median | halving (successive halving) | none: stop hopeless trials after an epoch
    prune_startup_trials: int = 2  # median: no pruning before this many trials completed
    prune_warmup_epochs: int = 0  # median: no pruning before this epoch of a trial
    seed: Optional[int] = 0  # the draws (per trial number); null: different ones each time
    # null: <search dir>/study.log (an Optuna journal file); a path (.db / .sqlite: SQLite), or a database URL
    # (sqlite:///..., postgresql://...): workers on several machines share it
    storage: Optional[str] = None
    study_name: Optional[str] = None  # null: search (with stages: search-stage1, search-stage2, ...)
    # coarse-to-fine: a list of {trials, epochs}, e.g. [{trials:12,epochs:2},{trials:6,epochs:8}]; each stage's
    # ranges span the best top_fraction of the previous stage's trials, widened by margin of the range on each side
    stages: Optional[list[Any]] = None
    top_fraction: float = 0.25
    margin: float = 0.1
    edge_fraction: float = 0.1  # a warning when the best value lies in the outer 10% of its range (log axis for log)
    stale_after_s: float = 3600.0  # a running trial of another machine without a heartbeat (each epoch) this long: failed
    plots: bool = True  # plots/history.png, importances.png, params.png


@dataclass
class Config:
    task: Any = None
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    reg: RegConfig = field(default_factory=RegConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    model: Any = None
    loss: Any = None
    optim: Any = None
    sched: Any = None
    # task=evaluate | predict | export (cvtrain/trained.py): a run dir (its checkpoints/best.pt) or a checkpoint file
    checkpoint: Optional[str] = None
    # task=predict: an image, a folder (searched recursively), a glob ('photos/*.jpg', quoted), or a list of them
    inputs: Any = None
    search: Optional[SearchConfig] = None  # task=search only: its settings and space (configs/search/)


# Config keys that do not change what is learned, or repeat a group's choice: not hyperparameters,
# neither in TensorBoard's HPARAMS tab (monitor.run_hparams) nor as columns of scripts/compare_runs.py.
NOT_HPARAMS = {"task", "data.name", "data.root", "data.download", "data.cache_dir", "data.on_bad_image",
               "data.eval_batch_size", "data.placement", "data.in_memory", "data.num_workers", "trainer.channels_last", "trainer.compile",
               "trainer.compile_mode", "trainer.cudnn_benchmark", "trainer.tf32",
               "trainer.progress", "trainer.log_every", "trainer.checkpoint", "trainer.resume", "trainer.sanity",
               "trainer.checkpoint_every_steps", "trainer.keep_checkpoints", "trainer.keep_snapshots",
               "trainer.monitor_every", "trainer.histogram_every", "trainer.explode_factor", "trainer.viz"}
SYNTHETIC_ONLY = {"data.channels", "data.num_classes", "data.num_samples", "data.num_test", "data.noise"}


def register_configs() -> None:
    ConfigStore.instance().store(name="cvtrain_schema", node=Config)


# --- groups that pick one of several things by `name:` -------------------------------------------

def named_choice(group: str, node, registry: dict) -> tuple[str, Callable, dict]:
    """(name, registry[name], the node's other keys as a plain dict) of a `name:` group's node."""
    options = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    name = options.pop("name", None)
    if name not in registry:
        raise UserError(f"{group}.name={name} is unknown; choose one of {', '.join(registry)}")
    return name, registry[name], options


def check_arguments(group: str, name: str, target: Callable, options: dict, passed: Iterable[str] = (),
                    own: Iterable[str] = ()) -> None:
    """A UserError unless `options` are arguments `target` takes and hold every argument it needs.

    `passed`: the arguments the builder gives `target` itself (not config keys); `own`: config
    keys the builder takes out of `options` before (listed among the valid keys)."""
    params = inspect.signature(target).parameters
    valid = [p for p, param in params.items() if p not in passed and param.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    takes_any = any(param.kind == inspect.Parameter.VAR_KEYWORD for param in params.values())
    unknown = [key for key in options if key not in valid and not takes_any]
    if unknown:
        raise UserError(f"{', '.join(f'{group}.{key}' for key in unknown)}: not an argument of {group}={name}; "
                        f"its keys are {', '.join([*valid, *own])}")
    missing = [p for p in valid if p not in options and params[p].default is inspect.Parameter.empty]
    if missing:
        raise UserError(f"{group}={name} needs {', '.join(f'{group}.{key}' for key in missing)}")
