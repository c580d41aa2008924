"""What a trained model learned, as pictures: written at the end of every run (trainer.viz=true)
to TensorBoard (IMAGES, TEXT and PROJECTOR tabs) and as PNG files in <run dir>/viz/.

    viz/filters            first-layer convolution filters, each scaled to [0, 1] on its own and enlarged
                           (nearest, integer factor) to >= 60 px, numbered, a title saying layer and shape
    viz/templates          linear classifier templates: each row of the first weight matrix that
                           reads the flattened pixels (linear, svm, softmax; an MLP's first layer),
                           reshaped to an image, scaled to [0, 1] on its own, enlarged to >= 112 px and
                           labelled with its class (an MLP's: its unit)
    viz/confusion_matrix   validation split: rows the true class, columns the prediction
    viz/misclassified      up to 64 wrong validation images taken round-robin over the true classes
                           (every class with errors appears), grouped by true class, each labelled
                           "true -> predicted" (the TEXT tab and misclassified.tsv say the same, in grid order)
    penultimate            the PROJECTOR tab: the features that the last linear layer reads, for
                           up to 500 validation images, with their class and thumbnail

Everything runs in eval mode without gradients and puts the model back in the mode it was in.
Images shown are the stored uint8 pixels, not the preprocessed tensors the model sees.
"""
import math
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import save_image

MAX_TILES = 64  # misclassified images in the grid
MAX_FILTERS = 256  # first-layer filters drawn
MAX_TEMPLATES = 100  # an MLP's first layer has hundreds of rows
MAX_EMBEDDING = 500  # validation images in the projector
MAX_EMBEDDING_VALUES = 256_000  # ... fewer when the features are wide (tensors.tsv is text: ~10 bytes a value)
THUMBNAIL = 32  # largest side of a projector thumbnail (the sprite stays small)
FILTER_TILE = 60  # a filter is enlarged by an integer factor (nearest) to at least this side: 5x5 -> 60 px
TEMPLATE_TILE = 112  # a linear template likewise: 28x28 digits -> 112 px, 32x32 -> 128 px
IMAGE_TILE = 84  # a misclassified image likewise (28x28 -> 84 px, 32x32 -> 96 px) ...
IMAGE_MAX = 128  # ... and a larger one shrunk (antialiased) to at most this side
GAP = 6  # px between the cells of a grid and around it
FONT = 11  # px: the labels under the tiles; the title is 2 px larger
MIN_WIDTH = 400  # px: a narrow grid is centred on a canvas this wide, so the title is not squeezed
FRAME = 170  # gray (0-255) of the 1 px frame around every tile: shows a tile's edge even where it is white


def _scale01(x: torch.Tensor) -> torch.Tensor:
    """Each item of a batch (N, ...) mapped to [0, 1] on its own (min -> 0, max -> 1)."""
    flat = x.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-12)).view_as(x)


def _as_image(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) with C other than 1 or 3 shown as the mean over channels (one gray channel)."""
    return x if x.shape[1] in (1, 3) else x.mean(1, keepdim=True)


# --- labelled grids: tiles enlarged by an integer factor (nearest), a gap, a label under each tile and a title


@lru_cache(maxsize=None)
def _font(size: int):
    """DejaVu Sans (shipped with matplotlib) at `size` px, else Pillow's default font."""
    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")), size)
    except (ImportError, OSError):
        try:
            return ImageFont.load_default(size)
        except TypeError:  # Pillow < 10.1
            return ImageFont.load_default()


def _truncate(text: str, font, width: float) -> str:
    """`text`, cut and ended with an ellipsis where it is wider than `width` px."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "\u2026") > width:
        text = text[:-1]
    return text + "\u2026"


def _wrap(text: str, font, width: float, max_lines: int) -> list:
    """`text` broken at spaces (not at no-break spaces) into lines at most `width` px wide, greedily;
    at most `max_lines`, the last one truncated. A newline in `text` always breaks."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [" ".join(lines[max_lines - 1:])]
    return [_truncate(line, font, width) for line in lines]


def _columns(n: int) -> int:
    """Tiles per row: all in one row up to 5, two rows up to 12, else about square."""
    return n if n <= 5 else math.ceil(n / 2) if n <= 12 else math.ceil(math.sqrt(n))


class Grid(NamedTuple):
    image: torch.Tensor  # (3, H, W) on [0, 1]
    boxes: list  # per tile (top, left, height, width) of its pixels in `image`, in the order given
    scale: int  # the integer enlargement factor of every tile
    columns: int


def labelled_grid(images: torch.Tensor, labels=None, title: str = "", min_side: int = IMAGE_TILE,
                  columns: Optional[int] = None, label_lines: int = 2) -> Grid:
    """Images (N, C, h, w) on [0, 1] as one picture: each enlarged by the smallest integer factor that
    makes its longer side >= `min_side` (nearest neighbour: every source pixel a constant block),
    framed by 1 px of gray, in rows of `columns` with a gap, `labels[i]` (up to `label_lines` lines)
    centred under tile i and `title` wrapped above; black text on white. C other than 1 or 3: the mean."""
    images = _as_image(images.detach().float().cpu()).clamp(0, 1)
    n, _, h, w = images.shape
    scale = max(1, math.ceil(min_side / max(h, w)))
    th, tw = h * scale, w * scale
    columns = max(1, min(columns or _columns(n), n))
    rows = math.ceil(n / columns)
    font, title_font = _font(FONT), _font(FONT + 2)
    line_h, title_h = FONT + 4, FONT + 6
    cell_w = tw + 2
    labels = [_wrap(str(t), font, cell_w, label_lines) for t in labels] if labels is not None else []
    label_h = max((len(t) for t in labels), default=0) * line_h + (2 if labels else 0)
    cell_h = th + 2 + label_h
    grid_w = columns * cell_w + (columns + 1) * GAP
    width = max(grid_w, MIN_WIDTH if title else 0)
    title_lines = _wrap(title, title_font, width - 2 * GAP, 8) if title else []
    top = GAP + len(title_lines) * title_h + (GAP // 2 if title_lines else 0)
    height = top + rows * cell_h + rows * GAP
    left0 = (width - grid_w) // 2 + GAP

    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    tiles = (images.repeat_interleave(scale, -2).repeat_interleave(scale, -1).mul(255).round().to(torch.uint8)
             .expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy())
    boxes = []
    for i in range(n):
        y = top + (i // columns) * (cell_h + GAP) + 1
        x = left0 + (i % columns) * (cell_w + GAP) + 1
        canvas[y - 1:y + th + 1, x - 1:x + tw + 1] = FRAME
        canvas[y:y + th, x:x + tw] = tiles[i]
        boxes.append((y, x, th, tw))
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    for k, line in enumerate(title_lines):
        draw.text((GAP, GAP + k * title_h), line, fill=(0, 0, 0), font=title_font)
    for (y, x, _, _), lines in zip(boxes, labels):
        for k, line in enumerate(lines):
            draw.text((x + (tw - font.getlength(line)) / 2, y + th + 3 + k * line_h), line, fill=(0, 0, 0), font=font)
    image = torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1).float().div_(255)
    return Grid(image, boxes, scale, columns)


# --- what the first layer learned


class Tiles(NamedTuple):
    images: torch.Tensor  # (N, C, h, w) on [0, 1]
    labels: list  # one per tile: a filter's index, a template's class
    title: str


def _first(model: nn.Module, kind):
    """(qualified name, module) of the first submodule of type `kind`, (None, None) if none. The name
    is only shown (layer names change): the layer is found by its type."""
    return next(((name, m) for name, m in model.named_modules() if isinstance(m, kind)), (None, None))


def _shown_as(channels: int) -> str:
    return {1: "gray", 3: "in RGB"}.get(channels, f"as the mean over the {channels} channels (gray)")


def _extremes(channels: int) -> str:
    """What the min-max scaling of one tile maps where, in words."""
    if channels == 3:
        return "over its 3 channels together: 0 = its lowest weight, 255 = its highest, so colors keep their meaning"
    return "black = its lowest weight, white = its highest"


def first_layer_filters(model: nn.Module, limit: int = MAX_FILTERS) -> Optional[Tiles]:
    """The first Conv2d's filters (out, C, kh, kw), each scaled to [0, 1] on its own (min-max over
    all its values), labelled with their index; C is the mean over the input channels unless there
    are 1 or 3. None when the model has no convolution."""
    name, conv = _first(model, nn.Conv2d)
    if conv is None:
        return None
    weight = conv.weight.detach().float().cpu()
    out, c, kh, kw = weight.shape
    scale = max(1, math.ceil(FILTER_TILE / max(kh, kw)))
    shown = f"the first {limit} of {out}" if out > limit else f"all {out}"
    title = (f"First convolution (Conv2d{f' {name!r}' if name else ''}): {shown} filters, {c}x{kh}x{kw} "
             f"(in channels x height x width), shown {_shown_as(c)}. Each filter min-max scaled on its own "
             f"({_extremes(c)}), each weight a {scale}x{scale} px block. "
             f"Number = filter index.")
    return Tiles(_scale01(_as_image(weight[:limit])), [str(i) for i in range(min(out, limit))], title)


def linear_templates(model: nn.Module, shape, classes=None, limit: int = MAX_TEMPLATES) -> Optional[Tiles]:
    """The rows of the model's first nn.Linear, when it reads the flattened pixels (in_features ==
    C*H*W) and the model has no convolution, each reshaped to the image `shape` (C, H, W) and scaled
    to [0, 1] on its own (min-max over all its pixels and channels together, so colors keep their
    meaning): (rows, C, H, W), at most `limit` rows. Labels: the class names, in the row order,
    when that layer is also the last one (linear, svm, softmax: row c scores class c; `classes`
    defaults to their indices), else "unit i" (an MLP's hidden units). None otherwise (a
    convolutional network). With data.preprocess=pca_whiten the rows weigh principal components."""
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return None
    name, layer = _first(model, nn.Linear)
    if layer is None or layer.in_features != math.prod(shape):
        return None
    rows = layer.out_features
    is_classifier = layer is [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    classes = [str(c) for c in classes] if classes is not None else [str(i) for i in range(rows)]
    if is_classifier and len(classes) == rows:
        heading, labels = "Linear templates", classes[:limit]
        what = f"class c's template: row c of W ({rows}x{layer.in_features})"
    else:
        heading, labels = "First-layer weights", [f"unit {i}" for i in range(min(rows, limit))]
        what = f"a hidden unit's weights: a row of the first layer's W ({rows}x{layer.in_features})"
    shown = f", the first {limit} of {rows}" if rows > limit else ""
    c, h, w = shape
    scale = max(1, math.ceil(TEMPLATE_TILE / max(h, w)))
    title = (f"{heading} (Linear{f' {name!r}' if name else ''}){shown}. Each tile is {what} reshaped to "
             f"{c}x{h}x{w}, shown {_shown_as(c)}, min-max scaled on its own ({_extremes(c)}; "
             f"shades are not comparable between tiles), each weight a {scale}x{scale} px "
             f"block.")
    templates = _scale01(layer.weight.detach()[:limit].float().cpu().view(-1, *shape))
    return Tiles(templates, labels, title)


def penultimate_layer(model: nn.Module) -> nn.Module:
    """The layer whose input are the penultimate features: the last nn.Linear, else the last
    Conv2d (a network without fully connected layers, as NiN: its input averaged over space)."""
    for kind in (nn.Linear, nn.Conv2d):
        layers = [m for m in model.modules() if isinstance(m, kind)]
        if layers:
            return layers[-1]
    raise ValueError(f"{type(model).__name__} has neither a Linear nor a Conv2d layer")


class _Evaluating:
    """with _Evaluating(model): eval mode and no gradients inside, the previous mode restored after."""

    def __init__(self, model):
        self.model, self.no_grad = model, torch.no_grad()

    def __enter__(self):
        self.training = self.model.training
        self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc):
        self.no_grad.__exit__(*exc)
        self.model.train(self.training)


def predict(model: nn.Module, loader, features: int = 0):
    """One pass over `loader` (in order): (predictions, labels, penultimate features of the first
    `features` images or None), on the CPU."""
    preds, labels, feats = [], [], []
    kept = 0

    def hook(module, inputs, out):
        nonlocal kept
        if kept < features:
            x = inputs[0].detach()
            x = x.mean((2, 3)) if x.dim() == 4 else x.flatten(1)
            feats.append(x[:features - kept].float().cpu())
            kept += len(feats[-1])

    handle = penultimate_layer(model).register_forward_hook(hook) if features else None
    try:
        with _Evaluating(model):
            for x, y in loader:
                preds.append(model(x).argmax(1).cpu())
                labels.append(y.cpu())
    finally:
        if handle:
            handle.remove()
    return torch.cat(preds), torch.cat(labels), torch.cat(feats) if feats else None


def confusion_counts(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts: row = true class, column = predicted class."""
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes**2).view(num_classes, num_classes)


def _figure():
    """A matplotlib Figure with an Agg canvas (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure()
    FigureCanvasAgg(fig)
    return fig


def figure_to_tensor(fig) -> torch.Tensor:
    """A drawn figure as a (3, H, W) float image on [0, 1]."""

    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).float().div_(255)


def confusion_figure(counts: torch.Tensor, classes, split: str = "validation") -> torch.Tensor:
    """The confusion matrix as an image (3, H, W): color = fraction of the true class (row),
    numbers = counts (up to 20 classes), class names on the axes (up to 40); `split` starts the title."""
    k = len(classes)
    fig = _figure()
    side = min(max(4.0, 0.45 * k + 2), 16.0)
    fig.set_size_inches(side + 1, side)
    ax = fig.add_subplot()
    rows = counts.double() / counts.sum(1, keepdim=True).clamp_min(1)
    image = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if k <= 40:
        names = [str(c) for c in classes]
        ax.set_xticks(range(k), names, rotation=90 if max(map(len, names)) > 3 else 0, fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if rows[i, j] > 0.5 else "black")
    total = int(counts.sum())
    ax.set(xlabel="predicted", ylabel="true",
           title=f"{split}: {int(counts.trace())} of {total} correct ({counts.trace() / max(total, 1):.2%})")
    fig.tight_layout()
    return figure_to_tensor(fig)


def misclassified(labels: torch.Tensor, preds: torch.Tensor, limit: int = MAX_TILES,
                  per_class: Optional[int] = None) -> torch.Tensor:
    """Indices of up to `limit` wrongly predicted images, spread over the true classes: round-robin,
    round r takes the r-th error (in index order) of every class that has one, so every class with
    errors appears (unless more than `limit` classes have errors: then those with the most errors)
    and a class gets more than ceil(limit / classes with errors) only when others run out of errors
    (at most `per_class` if given). Returned grouped by true class, each group in index order."""
    labels, wrong = labels.tolist(), torch.nonzero(labels != preds).flatten().tolist()
    by_class = {}
    for i in wrong:
        by_class.setdefault(labels[i], []).append(i)
    order = sorted(by_class, key=lambda c: (-len(by_class[c]), c))
    rounds = max((len(v) for v in by_class.values()), default=0)
    if per_class is not None:
        rounds = min(rounds, per_class)
    picked = [by_class[c][r] for r in range(rounds) for c in order if r < len(by_class[c])][:limit]
    return torch.tensor(sorted(picked, key=lambda i: (labels[i], i)), dtype=torch.long)


def misclassified_grid(images: torch.Tensor, labels, preds, classes, limit: int = MAX_TILES):
    """(Grid, text) of up to `limit` wrong images (uint8 (N, C, H, W), in loader order) chosen by
    misclassified(), each labelled "true -> predicted", or (None, None) when there is none; the text
    (TSV) lists position, index, true and predicted class in grid order."""
    wrong = misclassified(labels, preds, limit)
    if len(wrong) == 0:
        return None, None
    errors = labels != preds
    total, shown, with_errors = int(errors.sum()), len(wrong), len(labels[errors].unique())
    labels, preds = labels.tolist(), preds.tolist()
    pairs = [(classes[labels[i]], classes[preds[i]]) for i in wrong.tolist()]
    x = images[wrong.to(images.device)].cpu()
    x = thumbnails(x, side=IMAGE_MAX) if max(x.shape[-2:]) > IMAGE_MAX else x.float().div(255)
    spread = len(set(t for t, _ in pairs))
    title = (f"All {total} misclassified validation images" if shown == total else
             f"{shown} of the {total} misclassified validation images, taken round-robin over the true classes")
    title += f", grouped by true class ({spread} classes"
    title += f": of the {with_errors} with errors, those with the most)" if spread < with_errors else ")"
    title += ". Label: true class\u00a0\u2192\u00a0predicted class."
    grid = labelled_grid(x, [f"{t} \u2192\u00a0{p}" for t, p in pairs], title, min_side=IMAGE_TILE)
    lines = ["position\tindex\ttrue\tpredicted"]
    lines += [f"{p // grid.columns + 1},{p % grid.columns + 1}\t{i}\t{t}\t{q}"
              for p, (i, (t, q)) in enumerate(zip(wrong.tolist(), pairs))]
    return grid, "\n".join(lines)


def thumbnails(images: torch.Tensor, side: int = THUMBNAIL) -> torch.Tensor:
    """uint8 images (N, C, H, W) as floats on [0, 1], shrunk to at most `side` px, 1 or 3 channels."""
    x = _as_image(images.float().cpu().div(255))
    if max(x.shape[-2:]) > side:
        scale = side / max(x.shape[-2:])
        x = F.interpolate(x, scale_factor=scale, mode="bilinear", antialias=True).clamp_(0, 1)
    return x


def _markdown(tsv: str) -> str:
    """A TSV as a markdown table (TensorBoard's TEXT tab renders markdown)."""
    rows = [line.split("\t") for line in tsv.splitlines()]
    header, body = rows[0], rows[1:]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(row) + " |" for row in body)])


def write_visualizations(model: nn.Module, val_loader, data, writer, run_dir, step: int) -> list[str]:
    """Every visualization that applies to `model`, to TensorBoard (at `step`) and <run_dir>/viz/*.png.
    `data` is the DataBundle (classes, shape, val images). Returns the names of the PNG files written."""
    out = Path(run_dir) / "viz"
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def image(name, grid):
        writer.add_image(f"viz/{name}", grid, step)
        save_image(grid, out / f"{name}.png")
        written.append(f"{name}.png")

    classes = [str(c) for c in data.classes]
    filters = first_layer_filters(model)
    if filters is not None:
        image("filters", labelled_grid(filters.images, filters.labels, filters.title, min_side=FILTER_TILE).image)
    templates = linear_templates(model, data.shape, classes)
    if templates is not None:
        title = templates.title
        if getattr(data.preprocess, "whitening", False):
            title += (f" data.preprocess={data.preprocess.method}: the weights act on whitened inputs, "
                      "not on pixels.")
        image("templates", labelled_grid(templates.images, templates.labels, title, min_side=TEMPLATE_TILE).image)

    preds, labels, features = predict(model, val_loader, features=MAX_EMBEDDING)
    image("confusion_matrix", confusion_figure(confusion_counts(labels, preds, len(classes)), classes))
    grid, text = misclassified_grid(data.val.images, labels, preds, classes)
    if grid is not None:
        image("misclassified", grid.image)
        (out / "misclassified.tsv").write_text(text + "\n")
        writer.add_text("viz/misclassified", _markdown(text), step)

    if features is not None and len(features):
        n = min(len(features), max(100, MAX_EMBEDDING_VALUES // features.shape[1]))
        features = features[:n]
        writer.add_embedding(features, metadata=[classes[i] for i in labels[:n].tolist()],
                             label_img=thumbnails(data.val.images[:n]), global_step=step, tag="penultimate")
    writer.flush()
    return written
