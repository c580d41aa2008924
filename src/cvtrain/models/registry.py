"""Model registry: a family registers a builder under a name; a config's `name` picks it.

    @register_model("lenet")
    def lenet(in_shape, num_classes, **options) -> nn.Module: ...

    create_model("lenet", in_shape=(1, 28, 28), num_classes=10)
"""
import inspect

import torch.nn as nn

from cvtrain import UserError

_MODELS = {}


def register_model(name: str):
    def add(builder):
        if name in _MODELS:
            raise ValueError(f"model '{name}' is registered twice")
        _MODELS[name] = builder
        return builder

    return add


VARIANTS = ("auto", "imagenet", "small")
IMAGENET_MIN_SIDE = 64  # variant=auto picks the ImageNet form from this side length up


def pick_variant(variant: str, in_shape, model: str) -> str:
    """Resolve model.variant=auto from the image size: the ImageNet form for >= 64 px, the small form below."""
    if variant not in VARIANTS:
        raise UserError(f"model.variant='{variant}' is unknown for {model}; choose one of {', '.join(VARIANTS)}")
    if variant == "auto":
        return "imagenet" if min(in_shape[1:]) >= IMAGENET_MIN_SIDE else "small"
    return variant


def require_min_side(label: str, variant: str, in_shape, need: int) -> None:
    """A clear error before training when `label`'s `variant` form cannot take images this small."""
    h, w = in_shape[1:]
    if min(h, w) < need:
        hint = ("Use model.variant=small (or auto) for small images such as 32x32 and 28x28." if variant == "imagenet"
                else "Use model=mlp or model=linear for smaller inputs.")
        raise UserError(f"{label}'s {variant} form needs images of at least {need}x{need}; got {h}x{w}. {hint}")


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, in_shape: tuple[int, int, int], num_classes: int, **options) -> nn.Module:
    """Build model `name` for images of shape (C, H, W) and `num_classes` classes."""
    if name not in _MODELS:
        raise UserError(f"unknown model '{name}'; registered models: {', '.join(list_models())}")
    builder = _MODELS[name]
    accepted = set(inspect.signature(builder).parameters) - {"in_shape", "num_classes"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise UserError(f"model '{name}' has no option(s) {unknown}; its options are {sorted(accepted)}")
    return builder(in_shape=tuple(in_shape), num_classes=num_classes, **options)
