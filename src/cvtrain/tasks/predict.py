"""task=predict: classify image files with a trained model, from its checkpoint alone.

    python -m cvtrain task=predict checkpoint=<run dir or .pt file> inputs=<image | folder | 'glob'>
    python -m cvtrain task=predict checkpoint=<...> inputs=[a.png,photos/] trainer.tta=flip

inputs: an image file, a folder (every file under it, recursively, with an extension PIL reads), a glob
(quote it: 'photos/**/*.jpg'), or a list of those. Every file is decoded with PIL in any size and mode,
converted to the training channels (grayscale "L" for 1-channel models, "RGB" for 3: RGB <-> gray, a palette,
an alpha channel dropped), and when its size is not the training geometry, resized (the shorter side, with
antialiasing) and center-cropped to it, as data=imagefolder's data.image_size does; one note says how many
were. Then [0, 1] pixels -> the checkpoint's preprocessing -> the model, data.eval_batch_size files at a
time on trainer.device, a progress bar when attached to a terminal. trainer.tta=flip | flip_translate
averages the scores of the views (the training runs' test-time augmentation). A file PIL cannot read is
named in a warning and skipped.

Writes <run dir>/predictions.csv: a header row, then one row per readable file, in input order:
    file,class,probability,top2_class,top2_probability,...,top<k>_class,top<k>_probability
class and probability are the top-1 class name (the training run's names) and its softmax probability
(kNN: the fraction of the k neighbours' votes); k = min(task.top_k, classes). Prints the first task.show
rows as a table and a summary line (files, resized, converted, skipped).
"""
import csv
import glob
import logging
import os
import sys
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from omegaconf import ListConfig
from PIL import Image
from tqdm import tqdm

from cvtrain import UserError
from cvtrain.device import resolve_device
from cvtrain.loop import TTA, tta_views
from cvtrain.table import format_table
from cvtrain.trained import TrainedModel, load_trained, require_checkpoint

log = logging.getLogger("cvtrain")
MODES = {1: "L", 3: "RGB"}  # the PIL mode a model of that many channels takes
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def image_extensions() -> set:
    return {ext.lower() for ext in Image.registered_extensions()}


def find_images(inputs) -> list:
    """The files `inputs` names, in order, without repeats: a file as is; a folder: its files with an image
    extension (recursively, sorted); anything else: a glob (recursive '**'), its files and folders' images."""
    items = list(inputs) if isinstance(inputs, (list, tuple, ListConfig)) else [inputs]
    extensions = image_extensions()
    files = []

    def folder(path: Path) -> list:
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in extensions)

    for item in items:
        text = os.path.expanduser(str(item))
        path = Path(text)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = folder(path)
            if not found:
                raise UserError(f"inputs={item}: the folder holds no image files (extensions PIL reads: .png, .jpg, "
                                "...)")
            files += found
        else:
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise UserError(f"inputs={item}: no such file or folder, and no file matches it as a glob")
            for match in map(Path, matches):
                files += folder(match) if match.is_dir() else [match] if match.is_file() else []
    seen, unique = set(), []
    for f in files:
        if f not in seen:
            seen.add(f)
            unique.append(f)
    if not unique:
        raise UserError(f"inputs={inputs}: no image files found")
    return unique


class Decoded:
    """What decoding a batch of files found: counts of resized and converted images, the unreadable files."""

    def __init__(self):
        self.resized, self.converted, self.bad = 0, {}, []


def decode(path: Path, shape, notes: Decoded):
    """uint8 (C, H, W) of the image at `path` in the training geometry `shape`, or None when PIL cannot read
    it (recorded in notes.bad with the reason)."""
    c, h, w = shape
    mode = MODES[c]
    try:
        with Image.open(path) as img:
            img.load()
            source = "gray" if img.mode in GRAY_MODES else "RGB"  # a palette, RGBA, CMYK, YCbCr: color
            converted = img.convert(mode)
    except Exception as err:  # noqa: BLE001  unreadable, truncated, not an image: any decoder error
        notes.bad.append((path, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"))
        return None
    target = "gray" if mode == "L" else "RGB"
    if source != target:
        key = f"{source} -> {target}"
        notes.converted[key] = notes.converted.get(key, 0) + 1
    t = TF.pil_to_tensor(converted)
    if tuple(t.shape[1:]) != (h, w):
        notes.resized += 1
        t = fit(t, h, w)
    return t


def fit(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """uint8 (C, h0, w0) resized (antialiased) so it covers h x w, then center-cropped to h x w; for a square
    target, data=imagefolder's data.image_size transform (the shorter side to the side, then the crop)."""
    if h == w:
        return TF.center_crop(TF.resize(t, h, antialias=True), [h, w])
    h0, w0 = t.shape[1:]
    scale = max(h / h0, w / w0)
    size = [max(h, round(h0 * scale)), max(w, round(w0 * scale))]
    return TF.center_crop(TF.resize(t, size, antialias=True), [h, w])


@torch.inference_mode()
def probabilities(trained: TrainedModel, images: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Class probabilities (N, classes) of uint8 images (N, C, H, W) in the training geometry: the softmax
    of the scores, the views of `tta` averaged in score space (as evaluation during training)."""
    x = trained.preprocess(images.to(trained.device).float().div_(255))
    scores = 0
    for weight, view in tta_views(x, tta):
        scores = scores + weight * trained.model(view).float()
    return scores.softmax(1).cpu()


def header(top_k: int) -> list:
    return ["file", "class", "probability"] + [f"top{i}_{what}" for i in range(2, top_k + 1)
                                               for what in ("class", "probability")]


def run(cfg, run_dir: Path) -> None:
    """The task: classify every file of inputs=, write predictions.csv, print the first rows."""
    run_dir = Path(run_dir)
    path = require_checkpoint(cfg)
    if cfg.get("inputs") in (None, ""):
        raise UserError("task=predict needs inputs=<image, folder or 'glob'> (or a list: inputs=[a.png,b.jpg])")
    if cfg.trainer.tta not in TTA:
        raise UserError(f"trainer.tta={cfg.trainer.tta} is unknown; choose one of {', '.join(TTA)}")
    top_k = int(cfg.task.top_k)
    if top_k < 1:
        raise UserError(f"task.top_k={top_k}: list at least 1 class per file")
    files = find_images(cfg.inputs)
    device = resolve_device(cfg.trainer.device)
    trained = load_trained(path, device)
    if trained.shape[0] not in MODES:
        raise UserError(f"the checkpoint's model takes {trained.shape[0]}-channel images; task=predict reads image "
                        "files as grayscale (1 channel) or RGB (3)")
    top_k = min(top_k, trained.num_classes)
    batch = int(cfg.data.eval_batch_size)
    if trained.kind == "fitted":  # bounded memory: distances to every training image per query
        batch = min(batch, int(trained.config.model.get("chunk_size", batch)))
    c, h, w = trained.shape
    log.info("predict: %s | %d file(s) | device %s%s", trained.describe(), len(files), device,
             f" | trainer.tta={cfg.trainer.tta}" if cfg.trainer.tta != "none" else "")
    notes = Decoded()
    rows = []
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "predictions.csv"
    show_bar = cfg.trainer.progress and sys.stderr.isatty()
    with open(out, "w", newline="") as f, tqdm(total=len(files), disable=not show_bar, unit="file",
                                               desc="predict") as bar:
        writer = csv.writer(f)
        writer.writerow(header(top_k))
        for start in range(0, len(files), batch):
            chunk = files[start:start + batch]
            decoded = [(p, decode(p, trained.shape, notes)) for p in chunk]
            decoded = [(p, t) for p, t in decoded if t is not None]
            bar.update(len(chunk))
            if not decoded:
                continue
            probs = probabilities(trained, torch.stack([t for _, t in decoded]), cfg.trainer.tta)
            values, indices = probs.topk(top_k, dim=1)
            for (p, _), vals, idx in zip(decoded, values.tolist(), indices.tolist()):
                row = [str(p)]
                for v, i in zip(vals, idx):
                    row += [trained.classes[i], f"{v:.6f}"]
                writer.writerow(row)
                if len(rows) < int(cfg.task.show):
                    rows.append(row)
    _report(rows, top_k, len(files), notes, out, (c, h, w))


def _report(rows: list, top_k: int, total: int, notes: Decoded, out: Path, shape) -> None:
    c, h, w = shape
    if notes.resized:
        log.info("note: %d of %d image(s) were not %dx%d: resized (shorter side, antialiased) and center-cropped "
                 "to the training geometry", notes.resized, total, h, w)
    for what, count in notes.converted.items():
        log.info("note: %d image(s) converted %s (the model was trained on %s images)", count, what,
                 "grayscale" if c == 1 else "RGB")
    if notes.bad:
        log.warning("skipped %d unreadable file(s): %s", len(notes.bad),
                    "; ".join(f"{p} ({why})" for p, why in notes.bad))
    shown = min(top_k, 3)
    table_rows = [[r[0], r[1], f"{float(r[2]):.4f}"] + [f"{r[1 + 2 * i]} {float(r[2 + 2 * i]):.3f}"
                                                       for i in range(1, shown)] for r in rows]
    heading = ["file", "class", "probability"] + [f"top{i}" for i in range(2, shown + 1)]
    predicted = total - len(notes.bad)
    more = f" (the first {len(rows)} of {predicted})" if predicted > len(rows) else ""
    if rows:
        log.info("predictions%s:\n%s", more, format_table(heading, table_rows, right=(2,)))
    skipped = f"; skipped {len(notes.bad)} unreadable: {', '.join(str(p) for p, _ in notes.bad)}" if notes.bad else ""
    log.info("predicted %d of %d file(s) -> %s (file, class, probability, then top-2..%d classes)%s", predicted,
             total, out, top_k, skipped)
