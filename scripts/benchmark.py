"""cvtrain beside its peers, side by side in one process run: a table on stdout, every row in JSON.

Sections (--only picks some; each measures both sides in the same run, alternating the order round
by round so that machine noise hits both alike, and reports medians):

  overhead   cvtrain's trainer (tasks/train.py: train(), monitors and TensorBoard logging on, as
             configured) beside a minimal hand-written PyTorch loop: same model and init, same data in
             memory, same batch size and optimizer, one epoch per round; images/s and the overhead
             ratio plain/cvtrain (target, checked by a person: <= 1.03 on CPU). LeNet and ResNet-20,
             on the CPU and on CUDA when present. On the CPU ResNet-20 trains on a fixed subset of the
             training images (--images), so the section stays within minutes on 2 cores.
  augment    LeNet trained by cvtrain with aug=cifar (pad-4 crop + flip) beside aug=none: images/s and the
             ratio cifar/none, the cost of augmentation next to a real model (target, checked by a person:
             >= 0.9 on CPU).
  pipeline   cvtrain's input pipeline (load_data: JPGs decoded once and cached under data.cache_dir;
             InMemoryLoader + BatchAugment(aug=cifar) + the fitted preprocess, as tasks/train.py setup()
             builds it) beside torchvision's ImageFolder + DataLoader (num_workers = os.cpu_count())
             + v2 transforms (RandomCrop(32, padding=4), RandomHorizontalFlip, ToImage, ToDtype float
             scaled, Normalize) on the CIFAR-10 JPGs: images/s of batches drawn, augmented and
             preprocessed, no model. cvtrain's epoch figure excludes the one-time decode; its first
             load (decode + cache write) and a cached load are reported beside it (target, checked by
             a person: cvtrain >= 20x the DataLoader).
  disk       data=imagefolder's two paths on the CIFAR-10 JPGs, on the CPU: images/s of a full pass of shuffled
             batches of 512 (pad-4 crop + flip, the fitted preprocess), (a) in memory (data.in_memory=true),
             (b) memory-mapped (data.in_memory=false: the batches read from the cache file by a DataLoader's
             workers; and, beside it, read by index in the training process, data.num_workers=0),
             (c) torchvision's ImageFolder + DataLoader with RandomCrop(32, padding=4), RandomHorizontalFlip,
             ToTensor, Normalize; (b) and (c) with the same workers (--workers, default os.cpu_count(); (a)
             has nothing to read); and the one-time cache build (the JPGs decoded into the memory-mapped file)
             with 2 workers (DISK_BUILD_WORKERS). The file and the JPGs are in the page cache (warm).
  knn        cvtrain's kNN (model=knn) beside scikit-learn's KNeighborsClassifier(algorithm="brute")
             on the same preprocessed features: time, and the fraction of predictions that agree
             (a disagreement is explained: float64 neighbours, gap at the k-th, votes). scikit-learn
             is optional: the row is skipped with a note without it.
  speedrun   CUDA only: experiment=cifar10_speedrun (cvtrain.tasks.train.train) beside airbench94
             (pip package airbench==0.1.8, fed the same 45,000 training images as the uint8 dict its
             CifarLoader reads, and evaluated on the same 5,000-image validation split: load_data's,
             data.val_fraction=0.1, data.split_seed=0), --seeds runs each, alternating, after one
             warm-up run each: mean and std of accuracy and of time. Without airbench the row is
             skipped with a note saying how to install it.
  resnet20   CUDA only: experiment=cifar10_resnet20 beside a plain PyTorch ResNet-20 loop with the
             same recipe (SGD momentum 0.9, no Nesterov, lr 0.1, wd 1e-4, batch 128, lr /10 at 50% and
             75% (the preset's milestones), pad-4 crop + flip, the preset's normalization): training
             seconds to --target-acc validation accuracy. The preset trains 182 epochs: on one GPU that
             is minutes per side, so --resnet20-epochs caps both (the milestones scaled alike).

    python scripts/benchmark.py --cifar-root /tmp/cifar10 --json bench.json      # sections 1-3 (+4 on CUDA)
    python scripts/benchmark.py --quick --json /tmp/quick.json                    # about a minute: the test suite's
    python scripts/benchmark.py --only overhead --models lenet data=mnist data.root=../shared/data data.download=false
    python scripts/benchmark.py --only knn --cifar-root /tmp/cifar10 data.val_fraction=0.2   # 40,000 x 10,000
    python scripts/benchmark.py --only disk --cifar-root /tmp/cifar10 --threads 1 --workers 2 --rounds 5
    CVTRAIN_CIFAR_ROOT=/tmp/cifar10 python scripts/benchmark.py --only knn --knn-queries 2000 --knn-metric l1
    python scripts/benchmark.py --cifar-root /tmp/cifar10 --only speedrun,resnet20 --seeds 5 --resnet20-epochs 40

--cifar-root is the data=imagefolder root, the folder that holds train/<class>/*.jpg (the train/ folder
itself, or any folder of class folders, works too). Without it (and without $CVTRAIN_CIFAR_ROOT)
overhead and knn run on the embedded digits and the CIFAR-only sections are skipped with a note.
Extra arguments are cvtrain config overrides, applied last to every config the benchmark composes.
--threads sets torch's threads (and scikit-learn's BLAS threads) for both sides: on a shared, loaded
CPU 1 is far steadier than the default. Nothing is written to the working directory: run dirs and the
decode cache live in a temporary folder (removed at the end), unless --cache-dir names a cache to reuse.
--presets-on-cpu runs the CUDA sections on the CPU (with --quick: 2 epochs, a dry run of their code).
The exit status is 0 when every section ran (or was skipped with a note), 1 when one failed; the
targets are for a person to check, not the exit status.
"""
import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from hydra import compose, initialize_config_module

from cvtrain.config import register_configs
from cvtrain.data import BatchAugment, DataBundle, InMemoryLoader, Split, load_data, stratified_split
from cvtrain.models import build_model
from cvtrain.optim import build_optimizer
from cvtrain.tasks.knn import preprocessed

SECTIONS = ("overhead", "augment", "pipeline", "disk", "knn", "speedrun", "resnet20")
ENV_ROOT = "CVTRAIN_CIFAR_ROOT"
DEFAULT_IMAGES = "lenet=0,resnet20=15000"  # --images: training images per epoch in the overhead section on the CPU
QUICK_IMAGES = "lenet=0,resnet20=128"
OVERHEAD_VAL_IMAGES = 500  # validation after each overhead epoch: not timed, so kept small
DISK_BATCH, DISK_BUILD_WORKERS = 512, 2  # the disk section's batch size and cache-building processes
AIRBENCH_INSTALL = ("pip install airbench==0.1.8 (offline: pip download airbench==0.1.8 --no-deps elsewhere, "
                    "then pip install --no-deps ./airbench-0.1.8.tar.gz)")


# --- small helpers --------------------------------------------------------------------------------------

def compose_cfg(overrides) -> object:
    with initialize_config_module(config_module="cvtrain.configs", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def parse_images(spec: str, models) -> dict:
    """--images: "N" (every model) or "model=N,model=N" -> {model: N}; 0 means every training image."""
    spec = str(spec).strip()
    if spec.lstrip("-").isdigit():
        n = int(spec)
        if n < 0:
            raise ValueError(f"--images {spec}: use 0 (all) or a positive count")
        return {m: n for m in models}
    out = {m: 0 for m in models}
    for part in filter(None, spec.split(",")):
        name, sep, value = part.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"--images {spec}: expected N or model=N,model=N (e.g. {DEFAULT_IMAGES})")
        out[name.strip()] = int(value)
    return out


def parse_sections(spec: str) -> list:
    chosen = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown or not chosen:
        raise ValueError(f"--only {spec}: choose among {', '.join(SECTIONS)}")
    return [s for s in SECTIONS if s in chosen]


def subset(split: Split, n: int, seed: int = 0) -> Split:
    """A fixed subset of n images (the same every run: a seeded permutation, kept in order); 0 or >= len: all."""
    if not n or n >= len(split):
        return split
    keep = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return split.subset(keep)


def fmt_s(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1000:.1f} ms"


def mean_std(values) -> tuple:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt_ms(values, scale: float = 1.0, unit: str = "", digits: int = 2) -> str:
    m, s = mean_std(values)
    if m is None:
        return "-"
    return f"{m * scale:.{digits}f} +- {s * scale:.{digits}f}{unit}"


def time_to_target(epochs: list, target: float):
    """epochs: [(epoch_time_s, val_acc)] in order -> (training seconds until val_acc >= target, epoch), or
    (None, None) when the target is never reached. Only training time counts, not validation."""
    total = 0.0
    for i, (seconds, acc) in enumerate(epochs, start=1):
        total += seconds
        if acc is not None and acc >= target:
            return total, i
    return None, None


def read_metrics(run_dir: Path) -> list:
    """[(epoch_time_s, val_acc)] of each epoch of a cvtrain run, from <run dir>/metrics.jsonl."""
    path = Path(run_dir, "metrics.jsonl")
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["epoch_time_s"], r.get("val_acc")) for r in records if "epoch_time_s" in r]


def row(section, device, name, ours="", peer="", ratio="", note="", **values) -> dict:
    """One result: the strings the table prints and, in `values`, the figures the JSON keeps."""
    return {"section": section, "device": str(device), "name": name, "skipped": False, "failed": False,
            "ours": ours, "peer": peer, "ratio": ratio, "note": note, **values}


def skipped(section, device, name, note) -> dict:
    r = row(section, device, name, note=note)
    r["skipped"] = True
    return r


@contextlib.contextmanager
def given_data(bundle: DataBundle):
    """cvtrain's train() on `bundle` (already loaded, possibly a subset): its own load_data is bypassed.
    Everything else in setup/fit/finish runs as it would."""
    import cvtrain.tasks.train as train_module

    original = train_module.load_data
    train_module.load_data = lambda data_cfg, device=None, need_test=False: bundle
    try:
        yield
    finally:
        train_module.load_data = original


# --- data -------------------------------------------------------------------------------------------------

class Context:
    """What every section shares: options, the data config overrides and the data loaded once."""

    def __init__(self, args, overrides, workdir: Path):
        self.args, self.overrides, self.workdir = args, list(overrides), workdir
        self.devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
        self.cuda = torch.cuda.is_available()
        # the CUDA-only sections: on CUDA, or on the CPU as a dry run of their code paths (--presets-on-cpu)
        self.preset_device = torch.device("cuda" if self.cuda else "cpu")
        self.preset_overrides = [] if self.cuda else ["trainer.device=cpu"]
        self.cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else workdir / "cache"
        self.root, self.data_note = None, ""
        self.data_overrides = []
        self.load_times = {}
        self._data = None

    def prepare(self) -> None:
        """Pick the data: --quick a small imagefolder (a subset of the CIFAR JPGs, or generated JPGs),
        else the CIFAR root, else the config's default data (the embedded digits)."""
        args = self.args
        cifar = cifar_imagefolder_root(args.cifar_root, self.workdir) if args.cifar_root else None
        if args.quick:
            self.root = quick_imagefolder(self.workdir / "quick-data", cifar, per_class=args.quick_per_class)
            self.data_note = (f"--quick: {args.quick_per_class} JPGs per class "
                              f"{'of ' + str(cifar) if cifar else '(generated, synthetic)'}")
        elif cifar:
            self.root = cifar
            self.data_note = f"CIFAR-10 JPGs under {self.root}"
        else:
            self.data_note = (f"no CIFAR root (--cifar-root or ${ENV_ROOT}): the config's default data "
                              f"(data=digits unless overridden)")
        if self.root is not None:
            self.data_overrides = ["data=imagefolder", f"data.root={self.root}", f"data.cache_dir={self.cache_dir}"]

    @property
    def imagefolder_root(self):
        cfg = self.base_cfg()
        return Path(cfg.data.root).expanduser().resolve() if cfg.data.name == "imagefolder" and cfg.data.root else None

    def base_cfg(self, *extra):
        return compose_cfg([*self.data_overrides, *extra, *self.overrides])

    @property
    def data(self) -> DataBundle:
        """The training/validation data, loaded once: timed cold (decode + cache write) and cached."""
        if self._data is None:
            cfg = self.base_cfg()
            cache = Path(cfg.data.cache_dir).expanduser()
            before = set(cache.glob("imagefolder-*")) if cache.is_dir() else set()
            t0 = time.perf_counter()
            load_data(cfg.data)
            first = time.perf_counter() - t0
            after = set(cache.glob("imagefolder-*")) if cache.is_dir() else set()
            t0 = time.perf_counter()
            self._data = load_data(cfg.data)
            self.load_times = {"first_load_s": round(first, 3), "cached_load_s": round(time.perf_counter() - t0, 3),
                               "first_load_decoded": cfg.data.name == "imagefolder" and bool(after - before)}
            d = self._data
            print(f"data={cfg.data.name}: {len(d.train):,} train / {len(d.val):,} val images {tuple(d.shape)}, "
                  f"first load {first:.1f} s ({'decode + cache write' if self.load_times['first_load_decoded'] else 'no decode'}),"
                  f" cached load {self.load_times['cached_load_s']:.1f} s", flush=True)
        return self._data


def cifar_imagefolder_root(path, workdir: Path) -> Path:
    """The data=imagefolder root (the folder holding train/<class>/) for --cifar-root, which may also name the
    folder of the class folders itself (train/, or any folder: then linked as <workdir>/cifar-root/train)."""
    p = Path(path).expanduser().resolve()
    if (p / "train").is_dir():
        return p
    if p.name == "train":
        return p.parent
    link = workdir / "cifar-root"
    link.mkdir(parents=True, exist_ok=True)
    if not (link / "train").exists():
        (link / "train").symlink_to(p, target_is_directory=True)
    return link


def quick_imagefolder(folder: Path, cifar_root, per_class: int) -> Path:
    """A small data=imagefolder root: `per_class` JPGs per class, linked from the CIFAR root when there is one,
    else generated (smooth random class prototypes plus noise, 32x32 RGB)."""
    from PIL import Image

    train = folder / "train"
    if cifar_root:
        src = Path(cifar_root) / "train"
        classes = sorted(d for d in src.iterdir() if d.is_dir())
        for cls in classes:
            (train / cls.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(cls.glob("*.jpg"))[:per_class]:
                target = train / cls.name / f.name
                if not target.exists():
                    target.symlink_to(f)
        return folder
    gen = torch.Generator().manual_seed(0)
    prototypes = F.interpolate(torch.rand(10, 3, 4, 4, generator=gen), size=(32, 32), mode="bilinear",
                               align_corners=False)
    for c in range(10):
        (train / f"class{c}").mkdir(parents=True, exist_ok=True)
        noisy = (prototypes[c] + 0.25 * torch.randn(per_class, 3, 32, 32, generator=gen)).clamp(0, 1)
        for i, img in enumerate((noisy * 255).round().to(torch.uint8)):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(train / f"class{c}" / f"{i:04d}.jpg", quality=90)
    return folder


# --- 1. overhead: cvtrain's trainer vs a plain loop -----------------------------------------------------

def plain_loop_images_per_s(cfg, data: DataBundle, device, max_steps: int = 0) -> float:
    """What one would write by hand: shuffle, slice, normalize, forward, backward, step (one epoch)."""
    torch.manual_seed(cfg.trainer.seed)
    model = build_model(cfg.model, data.shape, data.num_classes).to(device)
    optimizer = build_optimizer(cfg.optim, model)
    loss_fn = torch.nn.CrossEntropyLoss()
    images, labels = data.train.images.to(device), data.train.labels.to(device)
    mean, std = data.mean.to(device).view(1, -1, 1, 1), data.std.to(device).view(1, -1, 1, 1)
    bs = cfg.data.batch_size
    steps = len(labels) // bs if len(labels) >= bs else 1
    if max_steps:
        steps = min(steps, max_steps)
    model.train()
    sync(device)
    start = time.perf_counter()
    order = torch.randperm(len(labels), device=device)
    for i in range(steps):
        idx = order[i * bs:(i + 1) * bs]
        x = (images[idx].float() / 255 - mean) / std
        loss = loss_fn(model(x), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    loss.item()
    sync(device)
    return min(steps * bs, len(labels)) / (time.perf_counter() - start)


def cvtrain_images_per_s(cfg, data: DataBundle, workdir: Path) -> float:
    """cvtrain's train() for the configured epoch on `data`: the train_images_per_s of its summary."""
    from cvtrain.tasks.train import train

    with given_data(data), tempfile.TemporaryDirectory(dir=workdir) as run_dir:
        return train(cfg, Path(run_dir))["train_images_per_s"]


def section_overhead(ctx: Context) -> list:
    """One row per (device, model); a model that fails is a failed row, the others still run."""
    rows = []
    images = parse_images(ctx.args.images, ctx.args.models)
    for device in ctx.devices:
        for model in ctx.args.models:
            n = images.get(model, 0) if device.type == "cpu" else 0
            try:
                rows.append(overhead_row(ctx, device, model, n))
            except Exception as err:  # noqa: BLE001
                traceback.print_exc()
                failed = row("overhead", device, model, note=f"FAILED: {type(err).__name__}: {err}")
                failed["failed"] = True
                rows.append(failed)
    return rows


def overhead_row(ctx: Context, device, model: str, n: int) -> dict:
    args, full = ctx.args, ctx.data
    train_split = subset(full.train, n)
    data = DataBundle(train_split, subset(full.val, OVERHEAD_VAL_IMAGES), None, full.classes, full.mean,
                      full.std, full.preprocess)
    cfg = ctx.base_cfg(f"model={model}", "trainer.epochs=1", "trainer.checkpoint=false", "trainer.progress=false",
                       "trainer.viz=false", "trainer.test=false", "trainer.sanity=false",
                       f"trainer.device={device}")
    bs = cfg.data.batch_size
    steps = max(1, len(train_split) // bs)
    what = (f"{model}, {len(train_split):,} images{' (fixed subset, --images)' if n and n < len(full.train) else ''}, "
            f"batch {bs}, optim={cfg.optim.name}")
    print(f"[overhead] {device} {what}: monitor_every={cfg.trainer.monitor_every}, "
          f"histogram_every={cfg.trainer.histogram_every}, log_every={cfg.trainer.log_every}, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    # warm-up (allocator, kernels, lazy imports): a few plain steps and a cvtrain run of a few batches
    plain_loop_images_per_s(cfg, data, device, max_steps=args.warmup_steps)
    warm = DataBundle(subset(train_split, min(len(train_split), 4 * bs)), subset(data.val, 2 * bs), None,
                      full.classes, full.mean, full.std, full.preprocess)
    cvtrain_images_per_s(cfg, warm, ctx.workdir)
    plain, ours = [], []
    for r in range(args.rounds):  # alternate the order too: plain first, then cvtrain first, ...
        for side in (("plain", "cvtrain") if r % 2 == 0 else ("cvtrain", "plain")):
            if side == "plain":
                plain.append(plain_loop_images_per_s(cfg, data, device))
            else:
                ours.append(cvtrain_images_per_s(cfg, data, ctx.workdir))
        print(f"  round {r + 1}: plain {plain[-1]:,.0f} img/s | cvtrain {ours[-1]:,.0f} img/s", flush=True)
    p, f = statistics.median(plain), statistics.median(ours)
    return row("overhead", device, model, ours=f"cvtrain {f:,.0f} img/s", peer=f"plain loop {p:,.0f} img/s",
                ratio=f"{p / f:.3f} plain/cvtrain",
                note=f"{what}; median of {args.rounds} alternating rounds of one epoch ({steps} steps; "
                     f"cvtrain's per-epoch costs, e.g. the histograms at step 0 and at the epoch's end, weigh "
                     f"more on a short epoch than on a full one); best rounds: plain {max(plain):,.0f}, cvtrain "
                     f"{max(ours):,.0f} img/s, ratio {max(plain) / max(ours):.3f}" +
                     ("; target <= 1.03" if device.type == "cpu" else ""),
                model=model, images=len(train_split), steps=steps, batch_size=bs, rounds=args.rounds,
                cvtrain_images_per_s=round(f, 1), plain_images_per_s=round(p, 1),
                overhead_ratio=round(p / f, 4), overhead_ratio_best=round(max(plain) / max(ours), 4),
                cvtrain_rounds=[round(v, 1) for v in ours],
                plain_rounds=[round(v, 1) for v in plain])


def section_augment(ctx: Context) -> list:
    """LeNet's training images/s with aug=cifar (pad-4 crop + flip, on the training device) beside aug=none:
    the cost of augmentation next to a real model (target, checked by a person: >= 0.9 on the CPU)."""
    full, rows = ctx.data, []
    data = DataBundle(full.train, subset(full.val, OVERHEAD_VAL_IMAGES), None, full.classes, full.mean, full.std,
                      full.preprocess)
    for device in ctx.devices:
        cfgs = {aug: ctx.base_cfg("model=lenet", f"aug={aug}", "trainer.epochs=1", "trainer.checkpoint=false",
                                  "trainer.progress=false", "trainer.viz=false", f"trainer.device={device}")
                for aug in ("none", "cifar")}
        speed = {"none": [], "cifar": []}
        for r in range(ctx.args.rounds):
            for aug in (("none", "cifar") if r % 2 == 0 else ("cifar", "none")):
                speed[aug].append(cvtrain_images_per_s(cfgs[aug], data, ctx.workdir))
            print(f"  round {r + 1}: aug=none {speed['none'][-1]:,.0f} | aug=cifar {speed['cifar'][-1]:,.0f} img/s",
                  flush=True)
        none, cifar = statistics.median(speed["none"]), statistics.median(speed["cifar"])
        rows.append(row("augment", device, "lenet aug=cifar", ours=f"aug=cifar {cifar:,.0f} img/s",
                        peer=f"aug=none {none:,.0f} img/s", ratio=f"{cifar / none:.3f} cifar/none",
                        note=f"LeNet, {len(full.train):,} images, batch {cfgs['none'].data.batch_size}; median of "
                             f"{ctx.args.rounds} alternating rounds of one epoch" +
                             ("; target >= 0.9" if device.type == "cpu" else ""),
                        none_images_per_s=round(none, 1), cifar_images_per_s=round(cifar, 1),
                        ratio_value=round(cifar / none, 4), none_rounds=speed["none"], cifar_rounds=speed["cifar"]))
    return rows


# --- 2. pipeline: cvtrain's InMemoryLoader vs ImageFolder + DataLoader -----------------------------------

def torchvision_pipeline(train_dir: Path, mean, std, indices=None):
    """ImageFolder with the usual v2 CIFAR transforms (optionally a Subset of `indices`)."""
    from torchvision import datasets
    from torchvision.transforms import v2

    transform = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), v2.ToImage(),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean.tolist(), std.tolist())])
    dataset = datasets.ImageFolder(str(train_dir), transform=transform)
    return dataset if indices is None else torch.utils.data.Subset(dataset, indices.tolist())


def drain(batches, device) -> tuple:
    """(images, seconds) of iterating over every batch (moved to `device`)."""
    n = 0
    sync(device)
    start = time.perf_counter()
    for x, y in batches:
        if x.device != device:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        n += len(y)
    sync(device)
    return n, time.perf_counter() - start


def section_pipeline(ctx: Context) -> list:
    from torchvision import datasets

    args = ctx.args
    root = ctx.imagefolder_root
    if root is None:
        return [skipped("pipeline", "cpu", "input pipeline",
                        f"needs JPGs in ImageFolder layout: --cifar-root <folder holding train/<class>/> or ${ENV_ROOT}")]
    data = ctx.data
    cfg = ctx.base_cfg("aug=cifar")
    bs, workers = cfg.data.batch_size, args.workers or os.cpu_count()
    # the same training images on both sides: ImageFolder's file order is cvtrain's, so the same split applies
    targets = torch.tensor(datasets.ImageFolder(str(root / "train")).targets)
    train_idx, _ = stratified_split(targets, cfg.data.val_fraction, cfg.data.split_seed)
    same = len(train_idx) == len(data.train) and torch.equal(targets[train_idx], data.train.labels)
    indices = train_idx if same else None
    dl_images = len(train_idx) if same else len(targets)
    rows = []
    for device in ctx.devices:
        loader = InMemoryLoader(data.train, bs, device=device, shuffle=True, preprocess=data.preprocess,
                                augment=BatchAugment(cfg.aug), seed=cfg.trainer.seed, drop_last=True)
        dataset = torchvision_pipeline(root / "train", data.mean, data.std, indices)
        dl = torch.utils.data.DataLoader(dataset, batch_size=bs, shuffle=True, num_workers=workers, drop_last=True,
                                         pin_memory=device.type == "cuda")
        print(f"[pipeline] {device}: {len(data.train):,} cvtrain images, {dl_images:,} DataLoader images, batch {bs}, "
              f"{workers} workers", flush=True)
        drain(loader, device)  # warm-up (cvtrain's is short; the DataLoader's first epoch counts its worker start-up)
        ours, theirs = [], []
        for r in range(args.rounds):
            for side in (("cvtrain", "torchvision") if r % 2 == 0 else ("torchvision", "cvtrain")):
                if side == "cvtrain":
                    loader.set_epoch(r + 1)
                    n, t = drain(loader, device)
                    ours.append(n / t)
                else:
                    n, t = drain(dl, device)
                    theirs.append(n / t)
            print(f"  round {r + 1}: cvtrain {ours[-1]:,.0f} img/s | DataLoader {theirs[-1]:,.0f} img/s", flush=True)
        f, d = statistics.median(ours), statistics.median(theirs)
        lt = ctx.load_times
        epoch_s = len(loader) * bs / f
        first_epoch = len(loader) * bs / (lt["first_load_s"] + epoch_s)
        note = (f"aug=cifar + preprocess; cvtrain's img/s exclude the one-time decode: first load "
                f"{lt['first_load_s']:.1f} s ({'decode + cache write' if lt['first_load_decoded'] else 'cache already there'}),"
                f" cached load {lt['cached_load_s']:.1f} s, so a first epoch with the decode runs at {first_epoch:,.0f} img/s;"
                f" DataLoader decodes every epoch, {workers} workers, img/s include worker start-up; "
                f"median of {args.rounds} rounds; target >= 20x")
        if not same:
            note += f"; DataLoader over all {dl_images:,} images of train/ (cvtrain's split did not match its files)"
        rows.append(row("pipeline", device, "input pipeline", ours=f"cvtrain {f:,.0f} img/s",
                        peer=f"DataLoader {d:,.0f} img/s", ratio=f"{f / d:.1f}x cvtrain/DataLoader", note=note,
                        cvtrain_images_per_s=round(f, 1), dataloader_images_per_s=round(d, 1), speedup=round(f / d, 2),
                        images=len(data.train), dataloader_images=dl_images, batch_size=bs, workers=workers,
                        decode_included=False, first_load_s=lt["first_load_s"], cached_load_s=lt["cached_load_s"],
                        first_load_decoded=lt["first_load_decoded"],
                        cvtrain_first_epoch_with_load_images_per_s=round(first_epoch, 1), rounds=args.rounds,
                        cvtrain_rounds=[round(v, 1) for v in ours], dataloader_rounds=[round(v, 1) for v in theirs]))
    return rows


# --- 2b. disk: data.in_memory=true vs false vs ImageFolder + DataLoader ------------------------------------

def section_disk(ctx: Context) -> list:
    from torchvision import datasets, transforms

    args, device = ctx.args, torch.device("cpu")
    root = ctx.imagefolder_root
    if root is None:
        return [skipped("disk", device, "memory-mapped data",
                        f"needs JPGs in ImageFolder layout: --cifar-root <folder holding train/<class>/> or ${ENV_ROOT}")]
    workers = args.workers or os.cpu_count()
    cache = ctx.workdir / "disk-cache"  # a fresh cache: its first load decodes
    cfg = {mode: ctx.base_cfg("aug=cifar", f"data.cache_dir={cache}", f"data.in_memory={mode}",
                              f"data.num_workers={DISK_BUILD_WORKERS}") for mode in ("true", "false")}
    t0 = time.perf_counter()
    load_data(cfg["false"].data)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    mapped = load_data(cfg["false"].data)
    cached_s = time.perf_counter() - t0
    memory = load_data(cfg["true"].data)
    images = len(mapped.train)
    decoded = sum(len(split) for split in (mapped.train, mapped.val, mapped.test) if split is not None)
    print(f"[disk] {images:,} training images {tuple(mapped.shape)}: first load {build_s:.1f} s (decode into the cache, "
          f"{DISK_BUILD_WORKERS} workers), cached load {cached_s:.1f} s; batch {DISK_BATCH}, {workers} workers, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    augment, seed = BatchAugment(cfg["true"].aug), cfg["true"].trainer.seed

    def loader(data, **extra):
        return InMemoryLoader(data.train, DISK_BATCH, shuffle=True, augment=augment, seed=seed,
                              preprocess=data.preprocess, **extra)
    # ImageFolder over the same training images (its file order is cvtrain's: the same split applies)
    transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(),
                                    transforms.Normalize(memory.mean.tolist(), memory.std.tolist())])
    folder = datasets.ImageFolder(str(root / "train"), transform=transform)
    train_idx, _ = stratified_split(torch.tensor(folder.targets), cfg["true"].data.val_fraction,
                                    cfg["true"].data.split_seed)
    passes = {"in_memory": loader(memory), "mapped": loader(mapped, num_workers=workers),
              "mapped_in_process": loader(mapped, num_workers=0),
              "dataloader": torch.utils.data.DataLoader(torch.utils.data.Subset(folder, train_idx.tolist()),
                                                        batch_size=DISK_BATCH, shuffle=True, num_workers=workers)}
    speed = {name: [] for name in passes}
    for r in range(args.rounds):  # the order rotates round by round
        for name in list(passes)[r % 4:] + list(passes)[:r % 4]:
            if name != "dataloader":
                passes[name].set_epoch(r)
            n, t = drain(passes[name], device)
            speed[name].append(n / t)
        print(f"  round {r + 1}: " + " | ".join(f"{name} {v[-1]:,.0f} img/s" for name, v in speed.items()), flush=True)
    mem, mm, mm0, dl = (statistics.median(speed[name]) for name in passes)
    values = dict(images=images, batch_size=DISK_BATCH, workers=workers, rounds=args.rounds,
                  in_memory_images_per_s=round(mem, 1), mapped_images_per_s=round(mm, 1),
                  mapped_in_process_images_per_s=round(mm0, 1), dataloader_images_per_s=round(dl, 1),
                  build_s=round(build_s, 3), build_workers=DISK_BUILD_WORKERS, build_images=decoded,
                  cached_load_s=round(cached_s, 3),
                  cache_bytes=sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()),
                  **{f"{name}_rounds": [round(v, 1) for v in speed[name]] for name in passes})
    what = (f"{images:,} images, a full shuffled pass of batches of {DISK_BATCH}, pad-4 crop + flip + preprocess, "
            f"median of {args.rounds} rotating rounds")
    return [row("disk", device, f"mapped ({workers} workers) vs in memory", ours=f"mapped {mm:,.0f} img/s",
                peer=f"in memory {mem:,.0f} img/s", ratio=f"{mm / mem:.2f} mapped/in memory",
                note=f"{what}; data.in_memory=false, data.num_workers={workers}: each batch read from the map by a "
                     f"DataLoader worker (new worker processes every pass, counted)", **values),
            row("disk", device, "mapped (in-process) vs in memory", ours=f"mapped {mm0:,.0f} img/s",
                peer=f"in memory {mem:,.0f} img/s", ratio=f"{mm0 / mem:.2f} mapped/in memory",
                note=f"{what}; data.in_memory=false, data.num_workers=0: each batch read from the map by index in "
                     "the training process", **values),
            row("disk", device, "mapped vs ImageFolder", ours=f"mapped {mm:,.0f} img/s",
                peer=f"DataLoader {dl:,.0f} img/s", ratio=f"{mm / dl:.1f}x mapped/DataLoader",
                note=f"{what}; both with {workers} workers; torchvision ImageFolder + DataLoader (RandomCrop(32, "
                     "padding=4), RandomHorizontalFlip, ToTensor, Normalize) decodes every JPG every epoch",
                **values),
            row("disk", device, "cache build", ours=f"{build_s:.1f} s ({decoded / max(build_s, 1e-9):,.0f} img/s)",
                note=f"the first load_data: the {decoded:,} JPGs of train/ decoded into the memory-mapped cache by "
                     f"{DISK_BUILD_WORKERS} worker processes, plus the training statistics; a cached load (the "
                     f"statistics only) takes {cached_s:.2f} s", **values)]


# --- 3. kNN: cvtrain's vs scikit-learn's -------------------------------------------------------------------

def explain_disagreement(i, train_x, train_y, query, k, metric, ours, theirs) -> str:
    """Why query i differs: its neighbours in float64, the gap at the k-th one, the votes."""
    diff = train_x.flatten(1).double() - query.flatten().double()
    dist = diff.abs().sum(1) if metric == "l1" else diff.pow(2).sum(1).sqrt()
    order = dist.argsort()
    kth, next_ = dist[order[k - 1]].item(), dist[order[min(k, len(order) - 1)]].item()
    votes = torch.bincount(train_y[order[:k]], minlength=int(train_y.max()) + 1).tolist()
    return (f"query {i}: cvtrain says {ours}, scikit-learn {theirs}; float64 votes of the {k} nearest {votes}; "
            f"k-th / (k+1)-th distance {kth:.6f} / {next_:.6f} (relative gap {(next_ - kth) / max(kth, 1e-30):.1e})")


def section_knn(ctx: Context) -> list:
    args = ctx.args
    data = ctx.data
    cfg = ctx.base_cfg("model=knn", f"model.k={args.knn_k}", f"model.distance={args.knn_metric}")
    cpu = torch.device("cpu")
    train_x, train_y = preprocessed(data.train, data.preprocess, cpu)  # data.preprocess, as cvtrain's kNN
    val_x, val_y = preprocessed(data.val, data.preprocess, cpu)
    if args.knn_queries:
        val_x, val_y = val_x[:args.knn_queries], val_y[:args.knn_queries]
    k, metric = cfg.model.k, cfg.model.distance
    what = f"{len(train_y):,} training vectors of {train_x[0].numel()} values, {len(val_y):,} queries, k={k}, {metric}"
    print(f"[knn] {what}, torch threads {torch.get_num_threads()}", flush=True)
    ours, times = {}, {}
    for device in ctx.devices:
        knn = build_model(cfg.model, data.shape, data.num_classes)  # model=knn: a KNNClassifier
        tx, ty, vx = train_x.to(device), train_y.to(device), val_x.to(device)
        if device.type == "cuda":  # warm-up
            knn.fit(tx, ty, data.num_classes).predict(vx[:256])
        sync(device)
        t0 = time.perf_counter()
        ours[device.type] = knn.fit(tx, ty, data.num_classes).predict(vx).cpu()
        sync(device)
        times[device.type] = time.perf_counter() - t0
    try:
        from sklearn.neighbors import KNeighborsClassifier
    except ImportError:
        KNeighborsClassifier = None
    theirs, t_sk = None, None
    if KNeighborsClassifier is not None:
        try:  # scikit-learn's BLAS gets as many threads as torch has (--threads), as cvtrain's matmul
            from threadpoolctl import threadpool_limits
            limits = threadpool_limits(limits=torch.get_num_threads())
        except ImportError:
            limits = contextlib.nullcontext()
        sk = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric={"l1": "manhattan", "l2": "euclidean"}[metric])
        with limits:
            t0 = time.perf_counter()
            theirs = torch.from_numpy(sk.fit(train_x.flatten(1).numpy(), train_y.numpy()).predict(val_x.flatten(1).numpy()))
            t_sk = time.perf_counter() - t0
    rows = []
    for device in ctx.devices:
        pred, t = ours[device.type], times[device.type]
        acc = (pred == val_y).float().mean().item()
        values = dict(k=k, metric=metric, train_vectors=len(train_y), queries=len(val_y), dims=train_x[0].numel(),
                      cvtrain_s=round(t, 3), cvtrain_acc=round(acc, 5))
        if theirs is None:
            rows.append(row("knn", device, "kNN", ours=f"cvtrain {fmt_s(t)}", peer="scikit-learn: skipped",
                            note=f"{what}; accuracy {100 * acc:.2f}%; scikit-learn is not importable here "
                                 "(pip install scikit-learn): no comparison", sklearn_s=None, **values))
            continue
        agree = (pred == theirs).float().mean().item()
        differ = torch.nonzero(pred != theirs).flatten().tolist()
        explanations = [explain_disagreement(i, train_x, train_y, val_x[i], k, metric, int(pred[i]), int(theirs[i]))
                        for i in differ[:args.knn_explain]]
        for line in explanations:
            print("  " + line)
        note = (f"{what}; predictions agree on {100 * agree:.2f}% ({len(val_y) - len(differ):,} of {len(val_y):,})"
                f"; accuracy {100 * acc:.2f}%; scikit-learn on the CPU, brute force, {torch.get_num_threads()} BLAS thread(s)")
        if agree < 0.999:
            note += "; WARNING: agreement below 99.9%, the times are not at equal predictions"
        rows.append(row("knn", device, "kNN", ours=f"cvtrain {fmt_s(t)}", peer=f"scikit-learn {fmt_s(t_sk)}",
                        ratio=f"{t_sk / t:.2f}x faster", note=note, sklearn_s=round(t_sk, 3), speedup=round(t_sk / t, 3),
                        agreement=round(agree, 6), disagreements=len(differ), explanations=explanations, **values))
    return rows


# --- 4a. speedrun: experiment=cifar10_speedrun vs airbench94 (CUDA) ----------------------------------------

def write_airbench_data(train: Split, val: Split, classes, folder: Path) -> Path:
    """The two files airbench's CifarLoader reads from `folder` (which must be named cifar10 and sit in the
    working directory of train94, which loads its own test loader from ./cifar10): train.pt and test.pt, each a
    dict {'images': uint8 (N, 32, 32, 3) HWC, 'labels': int64 (N,), 'classes': [names]}, as it saves
    torchvision's CIFAR10. test.pt holds our validation split."""
    for name, split in (("train", train), ("val", val)):
        if split.images.dtype != torch.uint8 or tuple(split.images.shape[1:]) != (3, 32, 32):
            raise ValueError(f"airbench needs 32x32 RGB uint8 images; the {name} split holds "
                             f"{split.images.dtype} {tuple(split.images.shape[1:])}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", train), ("test", val)):
        torch.save({"images": split.images.permute(0, 2, 3, 1).contiguous(), "labels": split.labels.long().clone(),
                    "classes": list(classes)}, folder / f"{name}.pt")
    return folder


def import_airbench():
    """(the airbench module, None) or (None, why not)."""
    try:
        import airbench  # noqa: F401
        from airbench import lib_airbench94  # noqa: F401
    except ImportError as err:
        return None, f"airbench is not importable ({err}); install it: {AIRBENCH_INSTALL}"
    return airbench, None


def run_airbench(airbench, folder: Path, seed: int, batch_size: int = 0) -> dict:
    """airbench94 on the data in `folder` (write_airbench_data): train94 with its own hyperparameters (batch_size:
    its 1024 unless given), timed by the wall clock around the call (synchronized); accuracy on the validation
    split with its TTA (level 2, its published figure) and without."""
    from airbench.lib_airbench94 import hyp

    folder = Path(folder)
    torch.manual_seed(seed)
    with contextlib.chdir(folder.parent):  # train94 builds CifarLoader('cifar10', train=False) in the cwd
        loader = airbench.CifarLoader(str(folder), train=True, batch_size=batch_size or hyp["opt"]["batch_size"],
                                      aug=hyp["aug"], altflip=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model = airbench.train94(loader, verbose=False)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        val = airbench.CifarLoader(str(folder), train=False, batch_size=2000)
        acc_tta = airbench.evaluate(model, val, tta_level=hyp["net"]["tta_level"])
        acc = airbench.evaluate(model, val, tta_level=0)
    return {"seed": seed, "time_s": seconds, "val_acc_tta": acc_tta, "val_acc": acc}


def run_cvtrain_preset(cfg, workdir: Path) -> dict:
    """cvtrain.tasks.train.train(cfg) in a fresh run dir: the summary's figures, the wall time of the call and
    the per-epoch (epoch_time_s, val_acc) of metrics.jsonl."""
    from cvtrain.device import resolve_device
    from cvtrain.tasks.train import train

    device = resolve_device(cfg.trainer.device)
    with tempfile.TemporaryDirectory(dir=workdir) as run_dir:
        sync(device)
        t0 = time.perf_counter()
        summary = train(cfg, Path(run_dir))
        sync(device)
        wall = time.perf_counter() - t0
        epochs = read_metrics(Path(run_dir))
    return {"seed": cfg.trainer.seed, "best_val_acc": summary.get("best_val_acc"),
            "final_val_acc": summary.get("final_val_acc"), "train_time_s": summary.get("train_time_s"),
            "wall_s": wall, "epoch_train_s": sum(t for t, _ in epochs), "epochs": epochs, "summary": summary}


def split_overrides(ctx: Context) -> list:
    """The 45,000 / 5,000 split of the CIFAR-10 training JPGs (stratified, data.split_seed=0)."""
    return ["data=imagefolder", f"data.root={ctx.root}", f"data.cache_dir={ctx.cache_dir}",
            "data.val_fraction=0.1", "data.split_seed=0"]


def compose_preset(ctx, name: str, *extra):
    """(cfg, None) or (None, why not): experiment=<name> composed as the command line would, on the split above.
    trainer.test=false: the CIFAR-10 JPGs have no test split (the real one is kept aside)."""
    try:
        return compose_cfg([f"experiment={name}", *split_overrides(ctx), "trainer.progress=false", "trainer.test=false",
                            *getattr(ctx, "preset_overrides", []), *extra, *ctx.overrides]), None
    except Exception as err:  # noqa: BLE001 (a preset not written yet: Hydra's MissingConfigException)
        return None, f"experiment={name} cannot be composed ({type(err).__name__}: {str(err).splitlines()[0]})"


def cuda_only(ctx: Context, section: str, name: str):
    """A skipped row when the section cannot run here, else None."""
    if not ctx.cuda and not ctx.args.presets_on_cpu:
        return skipped(section, "cpu", name, "CUDA only: no CUDA device here (--presets-on-cpu: a dry run on the CPU)")
    if ctx.root is None:
        return skipped(section, ctx.preset_device, name, f"needs the CIFAR-10 JPGs: --cifar-root or ${ENV_ROOT}")
    return None


def attempt(errors: list, what: str, fn, *a, **kw):
    """fn(*a, **kw), or None with the error noted: one failed run does not lose the section's other figures."""
    try:
        return fn(*a, **kw)
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        errors.append(f"{what} FAILED: {type(err).__name__}: {err}")
        return None


def section_speedrun(ctx: Context) -> list:
    args, device = ctx.args, ctx.preset_device
    preset = args.speedrun_preset
    skip = cuda_only(ctx, "speedrun", f"{preset} vs airbench94")
    if skip:
        return [skip]
    quick = ["trainer.epochs=2"] if args.quick else []  # a smoke test of the code path, not a measurement
    cfg, why = compose_preset(ctx, preset, *quick)
    data = load_data(compose_cfg(split_overrides(ctx)).data)  # the split both sides train and validate on
    airbench, why_not = import_airbench()
    if airbench and device.type != "cuda":
        airbench, why_not = None, "airbench94 runs on CUDA only (its network is .cuda().half())"
    benchmark_flag = torch.backends.cudnn.benchmark  # airbench sets cudnn.benchmark on import: for its runs only
    folder = write_airbench_data(data.train, data.val, data.classes, ctx.workdir / "airbench" / "cifar10") \
        if airbench else None
    ab_batch = 0 if not args.quick else min(1024, max(32, len(data.train) // 4))
    what = (f"{len(data.train):,} train / {len(data.val):,} val images (val_fraction 0.1, split_seed 0), "
            f"{args.seeds} seed(s), alternating{'; --quick: 2 epochs, airbench batch ' + str(ab_batch) if args.quick else ''}")
    print(f"[speedrun] {device}: {what}", flush=True)
    errors, ours, theirs = [], [], []
    if not args.quick:  # warm-ups (cuDNN autotuning, lazy CUDA init): one short run of each, not counted
        warm, _ = compose_preset(ctx, preset, "trainer.epochs=1")
        if cfg is not None and warm is not None:
            attempt([], "cvtrain warm-up", run_cvtrain_preset, warm, ctx.workdir)
        if airbench:
            torch.backends.cudnn.benchmark = True
            attempt(errors, "airbench warm-up", run_airbench, airbench, folder, 0)
            torch.backends.cudnn.benchmark = benchmark_flag
    for seed in range(args.seeds):
        for side in (("cvtrain", "airbench") if seed % 2 == 0 else ("airbench", "cvtrain")):
            if side == "cvtrain" and cfg is not None:
                torch.backends.cudnn.benchmark = benchmark_flag
                seeded, _ = compose_preset(ctx, preset, *quick, f"trainer.seed={seed}")
                r = attempt(errors, f"cvtrain seed {seed}", run_cvtrain_preset, seeded, ctx.workdir)
                if r:
                    ours.append(r)
                    print(f"  seed {seed}: cvtrain final {100 * r['final_val_acc']:.2f}% (best "
                          f"{100 * r['best_val_acc']:.2f}%) in {r['train_time_s']:.2f} s", flush=True)
            elif side == "airbench" and airbench:
                torch.backends.cudnn.benchmark = True
                r = attempt(errors, f"airbench seed {seed}", run_airbench, airbench, folder, seed, ab_batch)
                if r:
                    theirs.append(r)
                    print(f"  seed {seed}: airbench94 {100 * r['val_acc_tta']:.2f}% with TTA "
                          f"({100 * r['val_acc']:.2f}% without) in {r['time_s']:.2f} s", flush=True)
    torch.backends.cudnn.benchmark = benchmark_flag
    failed = "; ".join(errors)
    rows = []
    name = f"cvtrain experiment={preset}"
    if cfg is None:
        rows.append(skipped("speedrun", device, name, why))
    elif not ours:
        rows.append(skipped("speedrun", device, name, failed))
        rows[-1]["failed"] = True
    else:
        accs, times = [r["final_val_acc"] for r in ours], [r["train_time_s"] for r in ours]
        rows.append(row("speedrun", device, name, ours=f"{fmt_ms(accs, 100, '%')} in {fmt_ms(times, 1, ' s')}",
                        note=f"{what}; final val acc (best {fmt_ms([r['best_val_acc'] for r in ours], 100, '%')}); "
                             "time: summary train_time_s (epochs + per-epoch validation, data loading excluded); "
                             f"wall of train() {fmt_ms([r['wall_s'] for r in ours], 1, ' s')}"
                             f"{'; ' + failed if failed else ''}",
                        runs=[{k: v for k, v in r.items() if k != "summary"} for r in ours],
                        val_acc_mean=mean_std(accs)[0], val_acc_std=mean_std(accs)[1],
                        time_s_mean=mean_std(times)[0], time_s_std=mean_std(times)[1]))
    name = "airbench94 (airbench 0.1.8)"
    if not airbench:
        rows.append(skipped("speedrun", device, name, why_not))
    elif not theirs:
        rows.append(skipped("speedrun", device, name, failed))
        rows[-1]["failed"] = True
    else:
        accs, times = [r["val_acc_tta"] for r in theirs], [r["time_s"] for r in theirs]
        rows.append(row("speedrun", device, name, peer=f"{fmt_ms(accs, 100, '%')} in {fmt_ms(times, 1, ' s')}",
                        note=f"{what}; val acc with its TTA level 2 (without: "
                             f"{fmt_ms([r['val_acc'] for r in theirs], 100, '%')}); time: wall of train94() "
                             "(whitening init + training, no evaluation)",
                        runs=theirs, val_acc_mean=mean_std(accs)[0], val_acc_std=mean_std(accs)[1],
                        val_acc_no_tta_mean=mean_std([r["val_acc"] for r in theirs])[0],
                        time_s_mean=mean_std(times)[0], time_s_std=mean_std(times)[1]))
    if len(rows) == 2 and not rows[0]["skipped"] and not rows[1]["skipped"]:
        rows[0]["ratio"] = f"{rows[1]['time_s_mean'] / rows[0]['time_s_mean']:.2f}x airbench/cvtrain time"
    return rows


# --- 4b. resnet20: experiment=cifar10_resnet20 vs a plain ResNet-20 loop (CUDA) -----------------------------

class PlainBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.extra = stride, cout - cin

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        if self.extra:  # option A: zero-padded channels
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra))
        return F.relu(out + shortcut)


class PlainResNet20(nn.Module):
    """ResNet-20 for CIFAR as in He et al. 2016 Sec. 4.2, written out plainly: 16-32-64 channels, 3 blocks per
    stage, option-A shortcuts, He-normal conv init."""

    def __init__(self, in_channels=3, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(PlainBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(x.mean((2, 3)))


def pad_crop_flip(x: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Zero-pad, a random crop of the original size and a random horizontal flip, per image (batched)."""
    b, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (b,), device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(b, c, h, w + 2 * padding)
    x = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(b, c, h, w)
    x = x.gather(3, cols)
    flip = torch.rand(b, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def plain_resnet20_run(data: DataBundle, epochs: int, device, seed: int = 0, batch_size: int = 128, lr: float = 0.1,
                       momentum: float = 0.9, weight_decay: float = 1e-4, milestones=None, normalize: str = "channel",
                       log=print) -> dict:
    """The classic recipe by hand: SGD (momentum 0.9, not Nesterov), lr 0.1 divided by 10 at `milestones`
    (epochs; default 50% and 75% of them), weight decay 1e-4 on every parameter, batch 128 (full batches),
    pad-4 crop + flip, then normalize: "channel" (the training split's per-channel mean/std) or "mean_image"
    (the training split's per-pixel mean image subtracted, as He et al.). Training time per epoch
    (synchronized, validation not counted) and the validation accuracy after each epoch."""
    device = torch.device(device)
    torch.manual_seed(seed)
    model = PlainResNet20(data.shape[0], data.num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=False, weight_decay=weight_decay)
    if milestones is None:
        milestones = [math.ceil(0.5 * epochs), math.ceil(0.75 * epochs)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(milestones), 0.1)
    images, labels = data.train.images.to(device), data.train.labels.to(device)
    val_x, val_y = data.val.images.to(device), data.val.labels.to(device)
    if normalize == "mean_image":
        total = sum(chunk.double().sum(0) for chunk in data.train.images.split(5000))
        mean = (total / (255 * len(data.train))).float().to(device).unsqueeze(0)
        std = torch.ones((), device=device)
    elif normalize == "channel":
        mean, std = data.mean.to(device).view(1, -1, 1, 1), data.std.to(device).view(1, -1, 1, 1)
    else:
        raise ValueError(f"normalize={normalize!r}: channel or mean_image")
    steps = max(1, len(labels) // batch_size)
    history = []
    for epoch in range(epochs):
        model.train()
        sync(device)
        t0 = time.perf_counter()
        order = torch.randperm(len(labels), device=device)
        for i in range(steps):
            idx = order[i * batch_size:(i + 1) * batch_size]
            x = (pad_crop_flip(images[idx].float() / 255) - mean) / std
            loss = F.cross_entropy(model(x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        sync(device)
        seconds = time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            correct = sum((model((xb.float() / 255 - mean) / std).argmax(1) == yb).sum().item()
                          for xb, yb in zip(val_x.split(1000), val_y.split(1000)))
        history.append((seconds, correct / len(val_y)))
        if log:
            log(f"  plain resnet20 epoch {epoch + 1}/{epochs}: {seconds:.2f} s, val acc {100 * history[-1][1]:.2f}%")
    accs = [a for _, a in history]
    return {"epochs": history, "train_s": sum(t for t, _ in history), "best_val_acc": max(accs),
            "final_val_acc": accs[-1]}


def scaled_schedule(cfg, epochs: int) -> list:
    """Overrides that cap the preset at `epochs` keeping the shape of its multistep schedule: the milestones
    scaled by epochs / the preset's epochs (182 epochs with [91, 137] capped at 40: [20, 30])."""
    extra = [f"trainer.epochs={epochs}"]
    if cfg.sched.name == "multistep" and epochs != cfg.trainer.epochs:
        scaled = [max(1, round(m * epochs / cfg.trainer.epochs)) for m in cfg.sched.milestones]
        extra.append(f"sched.milestones=[{','.join(map(str, scaled))}]")
    return extra


def section_resnet20(ctx: Context) -> list:
    args, device = ctx.args, ctx.preset_device
    preset = args.resnet20_preset
    skip = cuda_only(ctx, "resnet20", f"{preset} vs plain ResNet-20")
    if skip:
        return [skip]
    cap = args.resnet20_epochs or (2 if args.quick else 0)
    cfg, why = compose_preset(ctx, preset)
    if cfg is not None and cap:
        cfg, why = compose_preset(ctx, preset, *scaled_schedule(cfg, cap))
    epochs = cfg.trainer.epochs if cfg is not None else (cap or 182)
    # the plain loop follows the preset where the recipe leaves a choice: its milestones, its normalization
    milestones = list(cfg.sched.milestones) if cfg is not None and cfg.sched.name == "multistep" else None
    normalize = "mean_image" if cfg is not None and cfg.data.preprocess == "mean_image" else "channel"
    data = load_data((cfg if cfg is not None else compose_cfg(split_overrides(ctx))).data)
    target = args.target_acc
    what = (f"{len(data.train):,} train / {len(data.val):,} val images, {epochs} epochs"
            f"{' (capped, milestones scaled)' if cap else ''}, target {100 * target:.0f}%")
    print(f"[resnet20] {device}: {what}", flush=True)
    errors, results = [], {}
    results["plain"] = attempt(errors, "plain loop", plain_resnet20_run, data, epochs, device, seed=0,
                               milestones=milestones, normalize=normalize)
    if cfg is not None:
        results["cvtrain"] = attempt(errors, "cvtrain", run_cvtrain_preset, cfg, ctx.workdir)
    rows = []
    for side, name in (("cvtrain", f"cvtrain experiment={preset}"), ("plain", "plain ResNet-20 loop")):
        r = results.get(side)
        if r is None:
            rows.append(skipped("resnet20", device, name, why if side == "cvtrain" and cfg is None else "; ".join(errors)))
            rows[-1]["failed"] = not (side == "cvtrain" and cfg is None)
            continue
        seconds, epoch = time_to_target(r["epochs"], target)
        reached = f"{100 * target:.0f}% after {seconds:.1f} s (epoch {epoch})" if seconds is not None else \
            f"{100 * target:.0f}% not reached in {len(r['epochs'])} epochs"
        text = f"{reached}; best {100 * r['best_val_acc']:.2f}%"
        rows.append(row("resnet20", device, name, **({"ours": text} if side == "cvtrain" else {"peer": text}),
                        note=f"{what}; training seconds to the target (validation not counted), summed over epochs"
                             + (f"; plain: SGD 0.9 (no Nesterov), lr 0.1 /10 at epochs "
                                f"{milestones or 'ceil(50%), ceil(75%)'}, wd 1e-4, batch 128, pad-4 crop + flip, "
                                f"{normalize} normalization, fp32" if side == "plain" else ""),
                        time_to_target_s=seconds, epoch_to_target=epoch, target_acc=target, epochs=len(r["epochs"]),
                        best_val_acc=r["best_val_acc"], final_val_acc=r["final_val_acc"],
                        history=[list(e) for e in r["epochs"]]))
    a, b = rows[0].get("time_to_target_s"), rows[1].get("time_to_target_s")
    if a and b:
        rows[0]["ratio"] = f"{b / a:.2f}x plain/cvtrain time"
    return rows


# --- the table and main -------------------------------------------------------------------------------------

def print_table(rows: list) -> None:
    headers = ["section", "device", "what", "cvtrain", "peer", "ratio"]
    cells = [[r["section"], r["device"], r["name"], r["ours"] or ("skipped" if r["skipped"] else ("FAILED" if r["failed"] else "")),
              r["peer"], r["ratio"]] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    print()
    print(line(headers))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print(line(c))
    print()
    for i, r in enumerate(rows, start=1):
        if r["note"]:
            print(f"  [{i}] {r['section']}/{r['device']}/{r['name']}: {r['note']}")
    print(flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar-root", default=os.environ.get(ENV_ROOT) or None,
                   help=f"data=imagefolder root holding train/<class>/*.jpg (default: ${ENV_ROOT}, else none: "
                        "CIFAR sections skipped)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"sections to run, comma-separated ({','.join(SECTIONS)})")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of overhead and pipeline (median reported)")
    p.add_argument("--models", default="lenet,resnet20", help="models of the overhead section")
    p.add_argument("--images", default=None,
                   help=f"overhead on the CPU: training images per epoch, N or model=N,... (0: all; default "
                        f"{DEFAULT_IMAGES}, with --quick {QUICK_IMAGES}); CUDA always uses all")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads for both sides (0: torch's default; 1 is steadier on a shared, loaded CPU)")
    p.add_argument("--warmup-steps", type=int, default=20, help="plain-loop warm-up steps before the overhead rounds")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: os.cpu_count())")
    p.add_argument("--cache-dir", default=None,
                   help="cvtrain's decode cache (default: a fresh temporary one, so the first load is a real decode)")
    p.add_argument("--knn-k", type=int, default=5)
    p.add_argument("--knn-metric", choices=["l1", "l2"], default="l2")
    p.add_argument("--knn-queries", type=int, default=0, help="use only the first N validation images (0: all)")
    p.add_argument("--knn-explain", type=int, default=10, help="disagreements explained (at most)")
    p.add_argument("--seeds", type=int, default=5, help="speedrun: runs of each side")
    p.add_argument("--speedrun-preset", default="cifar10_speedrun", help="speedrun: cvtrain's experiment=")
    p.add_argument("--resnet20-preset", default="cifar10_resnet20", help="resnet20: cvtrain's experiment=")
    p.add_argument("--presets-on-cpu", action="store_true",
                   help="run speedrun and resnet20 on the CPU when there is no CUDA: a dry run of their code paths "
                        "(airbench itself needs CUDA), e.g. with --quick and stand-in presets")
    p.add_argument("--resnet20-epochs", type=int, default=0,
                   help="resnet20: cap the epochs of both sides (0: the preset's trainer.epochs)")
    p.add_argument("--target-acc", type=float, default=0.91, help="resnet20: the validation accuracy to reach")
    p.add_argument("--quick", action="store_true",
                   help="about a minute on the CPU: tiny data (CIFAR JPG subset or generated JPGs), 1 round")
    p.add_argument("--quick-per-class", type=int, default=40, help=argparse.SUPPRESS)
    p.add_argument("--json", dest="json_path", default=None, help="write every row (and the run's settings) here")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-") or "=" not in o]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (extra arguments are cvtrain overrides KEY=VALUE)")
    try:
        args.sections = parse_sections(args.only)
        args.models = [m.strip() for m in args.models.split(",") if m.strip()]
        if args.images is None:
            args.images = QUICK_IMAGES if args.quick else DEFAULT_IMAGES
        parse_images(args.images, args.models)
    except ValueError as err:
        parser.error(str(err))
    if args.quick:
        args.rounds, args.seeds, args.warmup_steps = 1, min(args.seeds, 1), min(args.warmup_steps, 2)
    if args.rounds < 1 or args.seeds < 1:
        parser.error("--rounds and --seeds must be at least 1")
    if args.cifar_root and not Path(args.cifar_root).expanduser().is_dir():
        parser.error(f"--cifar-root {args.cifar_root}: not a folder")
    return args, overrides


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    register_configs()
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="cvtrain-benchmark-"))
    ctx = Context(args, overrides, workdir)
    rows = []
    meta = {"command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
            "quick": args.quick, "sections": args.sections, "overrides": overrides,
            "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name() if ctx.cuda else None,
            "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        ctx.prepare()
        meta["data"] = ctx.data_note
        print(f"cvtrain benchmark: sections {', '.join(args.sections)}; {ctx.data_note}; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
              f"{', CUDA ' + meta['cuda'] if ctx.cuda else ', no CUDA'}", flush=True)
        for section in args.sections:
            t0 = time.perf_counter()
            try:
                rows += globals()[f"section_{section}"](ctx)
            except Exception as err:  # noqa: BLE001: one failed section does not lose the others' figures
                traceback.print_exc()
                failed = row(section, "-", section, note=f"FAILED: {type(err).__name__}: {err}")
                failed["failed"] = True
                rows.append(failed)
            print(f"[{section}] {time.perf_counter() - t0:.1f} s", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta.update(load_times=ctx.load_times, total_s=round(time.perf_counter() - started, 1),
                load_average_end=os.getloadavg() if hasattr(os, "getloadavg") else None)
    print_table(rows)
    print(f"total {meta['total_s']:.0f} s; load average {meta['load_average_start']} -> {meta['load_average_end']}")
    if args.json_path:
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str) + "\n")
        print(f"wrote {path}")
    return 1 if any(r["failed"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
