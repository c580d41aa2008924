"""Model registry: a family registers a builder under a name; a config's `name` picks it.

    @register_model                     # the name is the function's: "lenet"
    def lenet(in_shape, num_classes, **options) -> nn.Module: ...

    @register_model("resnet20")         # an explicit name
    @register_model(kind="fitted")      # fitted, named after the function

    create_model("lenet", in_shape=(1, 28, 28), num_classes=10)
    model_kind("lenet") == "trained"

A model is of one of two kinds. "trained": an nn.Module whose weights the optimizer loop learns.
"fitted": an object with fit(x, y, num_classes) / predict(x) that needs no gradient loop (kNN).
Code that treats the kinds differently asks model_kind(name), never compares names.
"""
import inspect

from cvtrain import UserError

KINDS = ("trained", "fitted")
_MODELS = {}  # name -> builder
_KIND = {}  # name -> one of KINDS


def register_model(name=None, *, kind: str = "trained"):
    """Register a builder; usable as @register_model, @register_model(), @register_model("name"),
    @register_model(kind="fitted"). Without a name the builder's __name__ is used."""
    if kind not in KINDS:
        raise ValueError(f"model kind '{kind}' is unknown; choose one of {', '.join(KINDS)}")

    def add(builder, model_name=None):
        model_name = model_name or builder.__name__
        if model_name in _MODELS:
            raise ValueError(f"model '{model_name}' is registered twice")
        _MODELS[model_name], _KIND[model_name] = builder, kind
        return builder

    if callable(name):  # bare @register_model
        return add(name)
    return lambda builder: add(builder, name)


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


def list_models(kind: str | None = None) -> list[str]:
    """The registered names, sorted; only those of `kind` ("trained" | "fitted") when given."""
    return sorted(name for name in _MODELS if kind is None or _KIND[name] == kind)


def _require_known(name) -> None:
    if name not in _MODELS:
        raise UserError(f"unknown model '{name}'; registered models: {', '.join(list_models())}")


def model_kind(name: str) -> str:
    """'trained' (an nn.Module for the optimizer loop) or 'fitted' (fit/predict, no gradient loop)."""
    _require_known(name)
    return _KIND[name]


def model_builder(name):
    """The registered builder of model `name` (None when there is none)."""
    return _MODELS.get(name)


def check_model_options(name: str, options: dict) -> None:
    """A UserError unless model `name` is registered and takes every key of `options`."""
    _require_known(name)
    accepted = set(inspect.signature(_MODELS[name]).parameters) - {"in_shape", "num_classes"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise UserError(f"model '{name}' has no option(s) {unknown}; its options are {sorted(accepted)}")


def create_model(name: str, in_shape: tuple[int, int, int], num_classes: int, **options):
    """Build model `name` for images of shape (C, H, W) and `num_classes` classes, as its constructor
    initializes it (model.init=native); build_model applies model.init and the output-layer rule."""
    check_model_options(name, options)
    return _MODELS[name](in_shape=tuple(in_shape), num_classes=num_classes, **options)
