"""data=imagefolder's files: listing a split's class folders, reading the image headers, decoding the images
(with PIL) into uint8 tensors; data/mapped.py runs the decoding in worker processes, a chunk of files each."""
from pathlib import Path
from typing import Optional

import torch
import torchvision.transforms.functional as TF
from PIL import Image

from cvtrain import UserError

LAYOUT = "root/train/<class>/*.jpg (any format PIL reads), and optionally root/val/<class>/..., root/test/<class>/..."


def image_files(split_dir: Path):
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


def bad(path: Path, err: Exception, on_bad_image: str):
    if on_bad_image != "skip":
        raise UserError(f"cannot read image {path} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                        "fix or remove it, or set data.on_bad_image=skip to leave unreadable images out") from None


def mode_of(modes: set) -> str:
    """The PIL mode every image is decoded as: grayscale when all are, else RGB."""
    return "L" if modes == {"L"} else "RGB"


def read_headers(files, on_bad_image: str = "error") -> tuple[set, list, list]:
    """(the modes of `files` as decoded, "L" or "RGB"; the readable files; the unreadable ones, left out with
    data.on_bad_image=skip). Opening an image reads only its header."""
    modes, readable, skipped = set(), [], []
    for path, label in files:
        try:
            with Image.open(path) as img:
                modes.add("L" if img.mode in ("1", "L", "I;16", "I") else "RGB")
            readable.append((path, label))
        except (OSError, SyntaxError, ValueError) as err:  # UnidentifiedImageError is an OSError
            bad(path, err, on_bad_image)
            skipped.append(path)
    return modes, readable, skipped


def decode(files, image_size: Optional[int], on_bad_image: str = "error", mode: Optional[str] = None,
            size: Optional[tuple] = None) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(the images of `files` as one uint8 tensor (in file order), their labels, and the files left out as unreadable
    (data.on_bad_image=skip). `mode`: "L" or "RGB" (None: read the headers first, "L" when all are grayscale).
    Without image_size every image must have the same size: `size` (H, W), else that of the first one.
    data/mapped.py decodes the cache with it, a chunk of files per worker process."""
    skipped = []
    if mode is None:
        modes, files, skipped = read_headers(files, on_bad_image)
        mode = mode_of(modes)
    tensors, labels = [], []
    for path, label in files:
        try:
            with Image.open(path) as img:
                t = TF.pil_to_tensor(img.convert(mode))  # decodes: a truncated file fails here
        except (OSError, SyntaxError, ValueError) as err:
            bad(path, err, on_bad_image)
            skipped.append(path)
            continue
        if image_size:
            t = TF.center_crop(TF.resize(t, image_size, antialias=True), [image_size, image_size])
        else:
            size = size or tuple(t.shape[1:])
            if tuple(t.shape[1:]) != tuple(size):
                raise UserError(f"images differ in size ({tuple(size)} and {tuple(t.shape[1:])} at {path}); "
                                "set data.image_size=<side> to resize and center-crop them all")
        tensors.append(t)
        labels.append(label)
    images = torch.stack(tensors) if tensors else torch.empty(0, dtype=torch.uint8)
    return images, torch.tensor(labels, dtype=torch.long), skipped
