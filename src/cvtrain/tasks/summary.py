"""task=summary: the layer table of a model: output shapes, weight shapes, parameters, multiply-adds.

One row per leaf module, in the order the forward pass calls them (never-called leaves last).
Multiply-adds (MACs) of one image are counted with forward hooks:
    Conv1d/2d/3d: output elements * (in_channels / groups * kernel elements)
    Linear:       output elements * in_features
    anything else (pooling, normalization, activations, ...): 0
"""
import math
from pathlib import Path

import torch
import torch.nn as nn

from cvtrain.data import load_data
from cvtrain.models import build_model, model_kind
from cvtrain.table import format_table

# data.name -> ((C, H, W), classes), known without loading the data
GEOMETRY = {
    "digits": ((1, 28, 28), 10),
    "mnist": ((1, 28, 28), 10),
    "fashion_mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
    "svhn": ((3, 32, 32), 10),
}
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def data_geometry(data_cfg) -> tuple[tuple, int]:
    """((C, H, W), classes) of the configured data; loads it only when it is not known up front."""
    if data_cfg.name == "synthetic":
        return (data_cfg.channels, data_cfg.image_size, data_cfg.image_size), data_cfg.num_classes
    if data_cfg.name in GEOMETRY:
        return GEOMETRY[data_cfg.name]
    data = load_data(data_cfg)
    return data.shape, data.num_classes


def _first_tensor(out):
    """`out` itself, or the first tensor of a tuple/list output (None if there is none)."""
    if isinstance(out, (tuple, list)):
        return next((t for t in out if isinstance(t, torch.Tensor)), None)
    return out if isinstance(out, torch.Tensor) else None


def layer_macs(module: nn.Module, out: torch.Tensor) -> int:
    """Multiply-adds of one call of `module` that produced `out` (batch of 1)."""
    if isinstance(module, CONVS):
        return out.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    return 0


@torch.no_grad()
def summarize(model: nn.Module, in_shape) -> tuple[list[dict], dict]:
    """(rows, totals) for one image of shape (C, H, W): a row per leaf module with keys
    name, type, output (shape without batch dim, or None if never called), weight (shape or None),
    params, macs; totals has input, output, params (all model parameters) and macs."""
    leaves = {m: name for name, m in model.named_modules() if not any(m.children())}
    rows = {}

    def hook(module, inputs, out):
        out = _first_tensor(out)
        row = rows.setdefault(module, {"name": leaves[module], "type": type(module).__name__, "macs": 0})
        row["output"] = None if out is None else tuple(out.shape[1:])
        row["macs"] += 0 if out is None else layer_macs(module, out)

    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters(), torch.empty(0)).device
        out = model(torch.zeros(1, *in_shape, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    for module, name in leaves.items():
        row = rows.setdefault(module, {"name": name, "type": type(module).__name__, "output": None, "macs": 0})
        weight = getattr(module, "weight", None)
        row["weight"] = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
        row["params"] = sum(p.numel() for p in module.parameters(recurse=False))
    rows = list(rows.values())
    out = _first_tensor(out)
    totals = {"input": tuple(in_shape), "output": None if out is None else tuple(out.shape[1:]),
              "params": sum(p.numel() for p in model.parameters()), "macs": sum(r["macs"] for r in rows)}
    return rows, totals


def _shape(shape) -> str:
    return "-" if shape is None else "x".join(map(str, shape))


def layer_table(rows: list[dict], totals: dict) -> str:
    """The table as text; its last line is exactly `params=<int> macs=<int>`."""
    header = ("layer", "type", "output", "weight", "params", "MACs")
    body = [("input", "", _shape(totals["input"]), "", "", "")]
    body += [(r["name"] or "(model)", r["type"], _shape(r["output"]), _shape(r["weight"]),
              f"{r['params']:,}", f"{r['macs']:,}") for r in rows]
    footer = ("total", "", _shape(totals["output"]), "", f"{totals['params']:,}", f"{totals['macs']:,}")
    table = format_table(header, body, right=(4, 5), footer=footer)
    return f"{table}\nparams={totals['params']} macs={totals['macs']}"


def model_summary(cfg) -> str:
    """The table of cfg.model built for cfg.data's geometry (CPU, eval mode, one image)."""
    shape, num_classes = data_geometry(cfg.data)
    if model_kind(cfg.model.name) == "fitted":
        return (f"{cfg.model.name} is fitted, not trained: no layers or trained parameters; it stores the "
                f"training images ({_shape(shape)} each) and compares every query with them\nparams=0 macs=0")
    model = build_model(cfg.model, shape, num_classes)
    rows, totals = summarize(model, shape)
    title = f"{cfg.model.name} on {_shape(shape)} images, {num_classes} classes"
    return f"{title}\n{layer_table(rows, totals)}"


def run(cfg, run_dir: Path, emit=print) -> None:
    """The task: print the table."""
    emit(model_summary(cfg))
