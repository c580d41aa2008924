"""What a trained model learned, as pictures: written at the end of every run (trainer.viz=true)
to TensorBoard (IMAGES, TEXT and PROJECTOR tabs) and as PNG files in <run dir>/viz/.

    viz/filters            first-layer convolution filters, each scaled to [0, 1] on its own
    viz/templates          linear classifier templates: each row of the first weight matrix that
                           reads the flattened pixels (linear, svm, softmax; an MLP's first layer),
                           reshaped to an image
    viz/confusion_matrix   validation split: rows the true class, columns the prediction
    viz/misclassified      up to 64 wrong validation images (the TEXT tab and misclassified.tsv
                           say true and predicted class of each, in grid order)
    penultimate            the PROJECTOR tab: the features that the last linear layer reads, for
                           up to 500 validation images, with their class and thumbnail

Everything runs in eval mode without gradients and puts the model back in the mode it was in.
Images shown are the stored uint8 pixels, not the preprocessed tensors the model sees.
"""
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

MAX_TILES = 64  # misclassified images in the grid
MAX_TEMPLATES = 100  # an MLP's first layer has hundreds of rows
MAX_EMBEDDING = 500  # validation images in the projector
MAX_EMBEDDING_VALUES = 256_000  # ... fewer when the features are wide (tensors.tsv is text: ~10 bytes a value)
THUMBNAIL = 32  # largest side of a projector thumbnail (the sprite stays small)
TILE = 32  # small images and filters are enlarged (nearest) to at least this side in the grids


def _scale01(x: torch.Tensor) -> torch.Tensor:
    """Each item of a batch (N, ...) mapped to [0, 1] on its own (min -> 0, max -> 1)."""
    flat = x.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-12)).view_as(x)


def _as_image(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) with C other than 1 or 3 shown as the mean over channels (one gray channel)."""
    return x if x.shape[1] in (1, 3) else x.mean(1, keepdim=True)


def image_grid(images: torch.Tensor, nrow: int = None, tile: int = TILE) -> torch.Tensor:
    """Images (N, C, H, W) on [0, 1] as one (3, H', W') grid, each enlarged (nearest) to >= `tile` px."""
    images = _as_image(images.float().cpu())
    scale = max(1, math.ceil(tile / max(images.shape[-2:])))
    if scale > 1:
        images = images.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    nrow = nrow or math.ceil(math.sqrt(len(images)))
    return make_grid(images, nrow=nrow, padding=2, pad_value=1.0)


def first_layer_filters(model: nn.Module):
    """The first Conv2d's filters (out, C, kh, kw), each scaled to [0, 1]; C is the mean over the
    input channels unless there are 1 or 3. None when the model has no convolution."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        return None
    return _scale01(_as_image(conv.weight.detach().float().cpu()))


def linear_templates(model: nn.Module, shape, limit: int = MAX_TEMPLATES):
    """The rows of the model's first nn.Linear, when it reads the flattened pixels (in_features ==
    C*H*W) and the model has no convolution, each reshaped to the image `shape` (C, H, W) and scaled
    to [0, 1]: (rows, C, H, W), at most `limit` rows. None otherwise (a convolutional network).
    With data.preprocess=pca_whiten the rows weigh principal components, not pixels."""
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return None
    layer = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    if layer is None or layer.in_features != math.prod(shape):
        return None
    return _scale01(layer.weight.detach()[:limit].float().cpu().view(-1, *shape))


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


def confusion_figure(counts: torch.Tensor, classes) -> torch.Tensor:
    """The confusion matrix as an image (3, H, W): color = fraction of the true class (row),
    numbers = counts (up to 20 classes), class names on the axes (up to 40)."""
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
           title=f"validation: {int(counts.trace())} of {total} correct ({counts.trace() / max(total, 1):.2%})")
    fig.tight_layout()
    return figure_to_tensor(fig)


def misclassified(labels: torch.Tensor, preds: torch.Tensor, limit: int = MAX_TILES) -> torch.Tensor:
    """Indices of the first `limit` wrongly predicted images."""
    return torch.nonzero(labels != preds).flatten()[:limit]


def misclassified_grid(images: torch.Tensor, labels, preds, classes, limit: int = MAX_TILES):
    """(grid (3, H, W), text) of the first `limit` wrong images (uint8 (N, C, H, W), in loader order),
    or (None, None) when there is none; the text lists true and predicted class in grid order."""
    wrong = misclassified(labels, preds, limit)
    if len(wrong) == 0:
        return None, None
    nrow = math.ceil(math.sqrt(len(wrong)))
    grid = image_grid(images[wrong.to(images.device)].float().div(255), nrow=nrow)
    lines = ["position\tindex\ttrue\tpredicted"]
    labels, preds = labels.tolist(), preds.tolist()
    lines += [f"{p // nrow + 1},{p % nrow + 1}\t{i}\t{classes[labels[i]]}\t{classes[preds[i]]}"
              for p, i in enumerate(wrong.tolist())]
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

    filters = first_layer_filters(model)
    if filters is not None:
        image("filters", image_grid(filters))
    templates = linear_templates(model, data.shape)
    if templates is not None:
        image("templates", image_grid(templates, nrow=len(templates) if len(templates) <= 10 else None))

    preds, labels, features = predict(model, val_loader, features=MAX_EMBEDDING)
    classes = [str(c) for c in data.classes]
    image("confusion_matrix", confusion_figure(confusion_counts(labels, preds, len(classes)), classes))
    grid, text = misclassified_grid(data.val.images, labels, preds, classes)
    if grid is not None:
        image("misclassified", grid)
        (out / "misclassified.tsv").write_text(text + "\n")
        writer.add_text("viz/misclassified", _markdown(text), step)

    if features is not None and len(features):
        n = min(len(features), max(100, MAX_EMBEDDING_VALUES // features.shape[1]))
        features = features[:n]
        writer.add_embedding(features, metadata=[classes[i] for i in labels[:n].tolist()],
                             label_img=thumbnails(data.val.images[:n]), global_step=step, tag="penultimate")
    writer.flush()
    return written
