"""Transfer learning: model.pretrained (start from trained weights) and model.freeze (keep some fixed).

Two keys of every trained model's node that cvtrain handles itself (the builders never see them):

    model.pretrained   null | <cvtrain checkpoint file or run dir> | <weights file (.pth)> | torchvision
    model.freeze       null | [<module-name prefix>, ...] | backbone

The head. Every trained model has one: the final classifier layer, the last Conv/Linear the model
registers (models/init.py final_layer: the FC of most networks, NiN's last 1x1 conv). model_head(model)
names it: fc (resnets, googlenet), classifier.fc3 (vgg, alexnet), classifier (densenet121),
classifier.fc2 (lenet), ...

model.pretrained: the weights are matched by name and shape. A cvtrain checkpoint gives its model's
weights (a run dir: its checkpoints/best.pt, else last.pt); a weights file is a plain state dict of
tensors (torchvision's .pth files; {"state_dict": ...} and DDP's "module." prefix are accepted);
`torchvision` fetches torchvision's default weights for the model of the same name through
torchvision's own API (torchvision.models.get_model_weights(<name>).DEFAULT; vgg with
model.batch_norm=true: vgg<n>_bn), from the torch hub cache when the file is there; offline without
it, a UserError names the file to place there. torchvision's names (resnet's downsample.0,
vgg's features.<i> and classifier.6, alexnet's, googlenet's inception4e.branch2.0, densenet's
denselayer<n>) are mapped onto cvtrain's (torchvision_renamer); the networks are the same layer for
layer in their imagenet variant. The head's tensors are *replaced* (keep the new model's fresh init)
when their shape differs (another number of classes) or when the checkpoint names other classes
(a cvtrain checkpoint stores its class names: classes 0-4 pretrained, classes 5-9 fine-tuned);
every other tensor whose shape differs is left new with a warning (a layer whose size depends on the
image size, the small variant's stem). A file that fits none of the model's parameters, and a first
layer made for another number of image channels (ImageNet weights, 3 channels, on 1-channel digits),
are UserErrors. One log line says what was loaded, replaced, left new and unused.

Applied by task=train's setup() right after the model is built, only on a fresh start: a resumed run's
checkpoint already holds its weights. The new run fits its own data.preprocess on its own training
split (a cvtrain checkpoint trained with another data.preprocess gets a warning).

model.freeze: the parameters under the given module-name prefixes (`layer1` is layer1 and everything in
it, not layer10) get requires_grad=False, so they are in no optimizer param group and never change;
`backbone` is everything but the head. A BatchNorm layer under a frozen prefix stays in eval mode
(it normalizes with its running statistics and never updates them), whatever model.train() is called:
its `train` is replaced by one that keeps it in eval mode. Applied on a fresh start and on a resume (the
optimizer's param groups must be the same). optim.head_lr_mult (cvtrain/optim.py) gives the head its own
learning rate: fine-tuning with a low optim.lr for the pretrained layers and a higher one for the new head.
"""
import logging
import os
import re
import sys
import types
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torchvision
from omegaconf import OmegaConf

from cvtrain import UserError
from cvtrain.models.init import final_layer
from cvtrain.models.registry import model_kind
from cvtrain.models.vgg import cfgs

log = logging.getLogger("cvtrain")

KEYS = ("pretrained", "freeze")  # model keys of cvtrain's own: taken out before the builder is called
BACKBONE = "backbone"  # model.freeze=backbone: everything but the head
TORCHVISION = "torchvision"  # model.pretrained=torchvision: torchvision's default weights
BATCH_NORMS = nn.modules.batchnorm._BatchNorm
SHOWN = 8  # names listed per kind in the log line


# --- the options -----------------------------------------------------------------------------------------

def split_options(options: dict) -> dict:
    """Take model.pretrained and model.freeze out of a model node's `options` (a plain dict); returns them."""
    return {key: options.pop(key) for key in KEYS if key in options}


def check_options(name: str, transfer: dict) -> None:
    """model.pretrained: null or a non-empty string; model.freeze: null, a string or a list of strings;
    neither for a fitted model (kNN)."""
    pretrained, freeze = transfer.get("pretrained"), transfer.get("freeze")
    if model_kind(name) == "fitted":
        if pretrained is not None or freeze is not None:
            raise UserError(f"model={name} is fitted (it memorizes the training images), not trained: "
                            "model.pretrained and model.freeze do not apply to it; use a trained model")
        return
    if pretrained is not None and not (isinstance(pretrained, str) and pretrained.strip()):
        raise UserError(f"model.pretrained={pretrained!r}: give a cvtrain checkpoint or run dir, a torchvision weights "
                        "file (.pth), or torchvision")
    if pretrained == TORCHVISION:
        torchvision_name({"name": name})  # a model torchvision has no weights for: before any data is loaded
    prefixes = [freeze] if isinstance(freeze, str) else freeze
    if freeze is not None and not (isinstance(prefixes, (list, tuple))
                                   and all(isinstance(p, str) and p for p in prefixes)):
        raise UserError(f"model.freeze={freeze!r}: give module-name prefixes (model.freeze=[conv1,layer1]) or "
                        "model.freeze=backbone (everything but the head)")


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def model_head(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the model's head: its final classifier layer (the last Conv/Linear it registers)."""
    layer = final_layer(model)
    for name, module in model.named_modules():
        if module is layer and name:
            return name, module
    raise UserError(f"{type(model).__name__} has no Conv/Linear output layer: it has no head to replace or keep")


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _names(names, shown: int = SHOWN) -> str:
    names = list(names)
    if not names:
        return "-"
    more = f" ... ({len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


# --- set up a model for transfer (task=train's setup) ------------------------------------------------------

def prepare(model: nn.Module, model_cfg, data, fresh: bool) -> None:
    """model.pretrained (a fresh start only) then model.freeze, on the built model, before the optimizer."""
    options = _plain(model_cfg)
    if options.get("pretrained") and fresh:
        load_pretrained(model, options["pretrained"], options, data.shape, list(data.classes),
                        getattr(getattr(data, "preprocess", None), "method", None))
    if options.get("freeze"):
        freeze(model, options["freeze"])


# --- model.pretrained ----------------------------------------------------------------------------------------

def load_pretrained(model: nn.Module, source: str, model_options: dict, in_shape, classes=None,
                    preprocess: str | None = None) -> dict:
    """Load the weights of `source` (see the module doc) into `model` by name and shape. Returns the report:
    {"loaded", "replaced", "left_new", "shape_differs", "unused"} (lists of names), also logged."""
    name = model_options["name"]
    state, origin = read_weights(source, model_options)
    in_shape = tuple(in_shape)
    if origin.get("shape") is not None and int(origin["shape"][0]) != in_shape[0]:
        raise UserError(f"model.pretrained={source}: it was trained on images of shape {tuple(origin['shape'])}, this "
                        f"data has {in_shape}: other channels ({origin['shape'][0]} there, {in_shape[0]} here); "
                        "pretrained weights need images with as many channels")
    if origin.get("model") and origin["model"] != name:
        log.warning("model.pretrained=%s holds a model=%s, this run trains model=%s: only the tensors of the same "
                    "name and shape load", source, origin["model"], name)
    if origin.get("preprocess") and preprocess and origin["preprocess"] != preprocess:
        log.warning("model.pretrained=%s was trained with data.preprocess=%s, this run uses %s: its first layer sees "
                    "other inputs than it learned on", source, origin["preprocess"], preprocess)
    target = model.state_dict()
    rename = torchvision_renamer(name, model)
    head, _ = model_head(model)
    mapped, unused = {}, []
    for key, tensor in state.items():
        own = key if key in target else rename(key)
        if own in target and own not in mapped and isinstance(tensor, torch.Tensor):
            mapped[own] = tensor
        else:
            unused.append(key)
    _check_channels(source, target, mapped, in_shape)
    differ = origin.get("classes") is not None and classes is not None and list(origin["classes"]) != list(classes)
    loaded, replaced, shape_differs = {}, [], []
    for key, tensor in mapped.items():
        if _under(key, head) and (differ or tensor.shape != target[key].shape):
            replaced.append(key)
        elif tensor.shape != target[key].shape:
            shape_differs.append(f"{key} {tuple(tensor.shape)}->{tuple(target[key].shape)}")
        else:
            loaded[key] = tensor
    parameters = {key for key, _ in model.named_parameters()}
    if not parameters & set(loaded):
        raise UserError(f"model.pretrained={source}: none of its {len(state)} tensors fits a parameter of model={name} "
                        f"by name and shape (the file has {_names(list(state), 4)}; the model "
                        f"{_names(list(target), 4)}); give weights of the same architecture")
    left_new = [key for key in target if key not in mapped]
    with torch.no_grad():
        model.load_state_dict({**target, **loaded})
    why = ("the classes differ" if differ else "another number of classes") if replaced else ""
    log.info("model.pretrained=%s (%s): loaded %d of the model's %d tensors; replaced (new head %s, %s): %s; left new: "
             "%s; not loaded, shape differs: %s; unused from the file: %s", source, origin["what"], len(loaded),
             len(target), head, why or "-", _names(replaced), _names(left_new), _names(shape_differs), _names(unused))
    if shape_differs:
        log.warning("model.pretrained: %d tensor(s) of another shape were left new (another image size or model "
                    "variant?): %s", len(shape_differs), _names(shape_differs))
    return {"loaded": list(loaded), "replaced": replaced, "left_new": left_new, "shape_differs": shape_differs,
            "unused": unused}


def _check_channels(source, target: dict, mapped: dict, in_shape) -> None:
    """A first conv made for another number of image channels: a UserError (not a silent partial load)."""
    first = next((key for key, t in target.items() if t.ndim == 4), None)
    if first is None or first not in mapped:
        return
    theirs, ours = mapped[first].shape, target[first].shape
    if mapped[first].ndim == 4 and theirs[1] != ours[1] and ours[1] == in_shape[0]:
        raise UserError(f"model.pretrained={source}: its first layer {first} takes {theirs[1]}-channel images, this "
                        f"data has {in_shape[0]} channel(s) (images {tuple(in_shape)}); pretrained weights need "
                        "images with as many channels (ImageNet weights: RGB)")


def _strip_prefixes(state: dict) -> dict:
    """Keys saved from DDP (module.) or torch.compile (_orig_mod.) as the plain model's."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def read_weights(source: str, model_options: dict) -> tuple[dict, dict]:
    """(state dict, origin) of model.pretrained=`source`; origin: what (for the log), and from a cvtrain
    checkpoint its classes, image shape, model name and data.preprocess."""
    if source == TORCHVISION:
        return torchvision_weights(model_options)
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        found = [p for p in (path / "checkpoints" / "best.pt", path / "checkpoints" / "last.pt",
                             path / "best.pt", path / "last.pt") if p.is_file()]
        if not found:
            raise UserError(f"model.pretrained={source} is a directory without checkpoints/best.pt or last.pt; give a "
                            "run dir of a run with checkpoints (trainer.checkpoint=true) or a checkpoint file")
        path = found[0]
    if not path.is_file():
        raise UserError(f"model.pretrained={source}: no such file or directory; give a cvtrain checkpoint "
                        "(outputs/<run>/checkpoints/best.pt) or run dir, a torchvision weights file (.pth), or "
                        "model.pretrained=torchvision")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  refused (needs arbitrary unpickling), damaged, not a torch file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"model.pretrained={source}: cannot read {path} as plain tensors (torch.load with "
                        f"weights_only=True: {first}); give a cvtrain checkpoint or a state dict of tensors") from None
    if isinstance(obj, dict) and "model" in obj and "config" in obj and isinstance(obj["model"], dict):
        config, data = obj.get("config") or {}, obj.get("data") or {}
        origin = {"what": f"cvtrain checkpoint {path}, model={config.get('model', {}).get('name')}, "
                          f"{len(data.get('classes') or [])} classes",
                  "classes": data.get("classes"), "shape": data.get("shape"),
                  "model": config.get("model", {}).get("name"), "preprocess": config.get("data", {}).get("preprocess")}
        return _strip_prefixes(obj["model"]), origin
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not (isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise UserError(f"model.pretrained={source}: {path} is neither a cvtrain checkpoint nor a state dict of "
                        "tensors (a torchvision weights file)")
    return _strip_prefixes(dict(obj)), {"what": f"weights file {path}"}


# --- torchvision's weights and names ---------------------------------------------------------------------------

TORCHVISION_MODELS = ("alexnet", "vgg11", "vgg13", "vgg16", "vgg19", "resnet18", "resnet34", "resnet50",
                      "googlenet", "densenet121")


def torchvision_name(model_options: dict) -> str:
    """torchvision's model name for cvtrain's model (vgg with batch_norm: vgg<n>_bn), or a UserError."""
    name = model_options["name"]
    if name not in TORCHVISION_MODELS:
        raise UserError(f"model.pretrained=torchvision: torchvision has no weights for model={name}; it has them for "
                        f"{', '.join(TORCHVISION_MODELS)} (or pass a checkpoint or weights file)")
    return f"{name}_bn" if name.startswith("vgg") and model_options.get("batch_norm") else name


def torchvision_weights(model_options: dict) -> tuple[dict, dict]:
    """torchvision's default weights for the model (torchvision.models.get_model_weights(name).DEFAULT), from the
    torch hub cache or downloaded; offline without the file: a UserError naming where to place it."""
    tv_name = torchvision_name(model_options)
    weights = torchvision.models.get_model_weights(tv_name).DEFAULT
    file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    try:
        state = weights.get_state_dict(progress=sys.stderr.isatty())
    except OSError as err:  # urllib's URLError / HTTPError (offline, a proxy), a full disk
        reason = getattr(err, "reason", None) or err
        raise UserError(f"model.pretrained=torchvision: cannot download {weights} ({reason}); offline, fetch "
                        f"{weights.url} on a machine with internet and place it at {file} (torch's hub cache; "
                        f"TORCH_HOME moves it), or pass the file: model.pretrained=<path of the .pth>") from None
    except RuntimeError as err:  # a damaged or truncated file in the cache
        raise UserError(f"model.pretrained=torchvision: {file} cannot be read ({str(err).splitlines()[0][:200]}); "
                        "delete it and try again") from None
    return dict(state), {"what": f"torchvision {weights}"}


def _vgg_table(name: str, model: nn.Module) -> dict:
    """torchvision's vgg names (features.<i>: conv, [bn,] relu, pool in one numbered stack; classifier.0/3/6)
    -> cvtrain's (features.conv<n>, features.bn<n>; classifier.fc1/fc2/fc3), from the layer table."""
    batch_norm = any(isinstance(m, BATCH_NORMS) for m in model.modules())
    table, i, n = {}, 0, 0
    for v in cfgs[name]:
        if v == "M":
            i += 1
            continue
        n += 1
        table[f"features.{i}."] = f"features.conv{n}."
        if batch_norm:
            table[f"features.{i + 1}."] = f"features.bn{n}."
        i += 3 if batch_norm else 2
    return {**table, "classifier.0.": "classifier.fc1.", "classifier.3.": "classifier.fc2.",
            "classifier.6.": "classifier.fc3."}


ALEXNET = {"features.0.": "features.conv1.", "features.3.": "features.conv2.", "features.6.": "features.conv3.",
           "features.8.": "features.conv4.", "features.10.": "features.conv5.", "classifier.1.": "classifier.fc1.",
           "classifier.4.": "classifier.fc2.", "classifier.6.": "classifier.fc3."}
# (pattern, replacement) applied in order to a torchvision name
RESNET = [(r"\.downsample\.0\.", ".downsample.conv."), (r"\.downsample\.1\.", ".downsample.bn.")]
GOOGLENET = [(r"^inception(\d)([a-e])\.", r"inception\1.\2."), (r"\.branch([23])\.0\.", r".branch\1.reduce."),
             (r"\.branch([23])\.1\.", r".branch\1.conv3x3."), (r"\.branch4\.1\.", ".branch4.proj.")]
DENSENET = [  # torchvision's weight files still use the old names (norm.1: torchvision's _load_state_dict fixes them)
    (r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$",
     r"\1\2"),
    (r"\.denselayer(\d+)\.", lambda m: f".layers.{int(m.group(1)) - 1}.")]


def torchvision_renamer(name: str, model: nn.Module):
    """A function: torchvision's name of a tensor -> cvtrain's, for model `name` (the identity for the models
    torchvision does not have)."""
    if name.startswith("vgg") or name == "alexnet":
        table = _vgg_table(name, model) if name.startswith("vgg") else ALEXNET

        def by_prefix(key: str) -> str:
            for theirs, ours in table.items():
                if key.startswith(theirs):
                    return ours + key[len(theirs):]
            return key
        return by_prefix
    rules = {"resnet18": RESNET, "resnet34": RESNET, "resnet50": RESNET, "googlenet": GOOGLENET,
             "densenet121": DENSENET}.get(name, [])

    def by_rules(key: str) -> str:
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        return key
    return by_rules


# --- model.freeze ------------------------------------------------------------------------------------------------

def _keep_eval(self, mode: bool = True):
    """A frozen BatchNorm layer's `train`: eval mode whatever is asked (its running statistics stay fixed)."""
    return nn.Module.train(self, False)


def freeze(model: nn.Module, spec) -> dict:
    """model.freeze=`spec` (prefixes, or backbone): requires_grad=False under the prefixes, their BatchNorm layers in
    eval mode for good. Returns {"frozen": parameter names, "trainable": parameter count, "batch_norms": count}."""
    prefixes = [spec] if isinstance(spec, str) else list(spec)
    if not prefixes:
        return {"frozen": [], "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "batch_norms": 0}
    head, _ = model_head(model)
    modules = dict(model.named_modules())
    if prefixes == [BACKBONE] and BACKBONE not in modules:
        def frozen(name):
            return bool(name) and not _under(name, head)
        what = f"backbone (all but the head {head})"
    else:
        unknown = [p for p in prefixes if p not in modules or not p]
        if unknown:
            top = [name for name, _ in model.named_children()]
            raise UserError(f"model.freeze: {', '.join(unknown)} names no module of the model; its top-level modules "
                            f"are {', '.join(top)} (the head: {head}); give module-name prefixes such as "
                            f"{top[0]} or {next(iter(n for n in modules if '.' in n), top[0])}, or backbone (all but "
                            "the head)")

        def frozen(name):
            return any(_under(name, p) for p in prefixes)
        what = ", ".join(prefixes)
    names = [name for name, p in model.named_parameters() if frozen(name)]
    for name, p in model.named_parameters():
        if frozen(name):
            p.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise UserError(f"model.freeze={what} freezes every parameter: nothing would train; leave the head "
                        f"({head}) out of it")
    norms = [m for name, m in model.named_modules() if isinstance(m, BATCH_NORMS) and frozen(name)]
    for module in norms:
        module.train = types.MethodType(_keep_eval, module)
        module.eval()
    frozen_count = sum(p.numel() for name, p in model.named_parameters() if name in set(names))
    log.info("model.freeze=%s: %d parameters in %d tensors frozen, %d trainable (%s)%s", what, frozen_count,
             len(names), trainable, _names([n for n, p in model.named_parameters() if p.requires_grad]),
             f"; {len(norms)} BatchNorm layer(s) keep their running statistics (eval mode)" if norms else "")
    return {"frozen": names, "trainable": trainable, "batch_norms": len(norms)}
