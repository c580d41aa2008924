"""Readable module names (src/cvtrain/models/names.py): TensorBoard tags are built from them
(act/<module>/mean, grad_norm/<param>, weights/<param>), so every model of the zoo names its layers
from its own structure, never by a bare position (act/2, features.3.weight).

The one number allowed alone in a path is a repeated block's index: the child of an nn.Sequential or
nn.ModuleList whose children are all of one class that is not a torch.nn layer (a ResNet stage's
BasicBlocks, layer1.0; a dense block's DenseLayers, layers.0). Every other component is a lowercase
identifier that starts with a letter (conv1, fc, inception3, a, conv3x3).
"""
import inspect
import re

import pytest
import torch
import torch.nn as nn

from cvtrain.models import create_model, list_models
from cvtrain.models.mlp import Maxout
from cvtrain.models.names import LayerNames
from cvtrain.models.registry import _MODELS

IDENTIFIER = re.compile(r"[a-z][a-z0-9_]*")
PLAIN_STACKS = ["linear", "mlp", "lenet", "alexnet", "vgg11", "vgg13", "vgg16", "vgg19", "nin"]

CASES = [  # (name, shape, options): every trained model on a small geometry, the ImageNet forms, the options
    *[(name, (3, 32, 32), {}) for name in list_models("trained")],
    *[(name, (3, 64, 64), {}) for name in list_models("trained") if name != "lenet"
      and "variant" in inspect.signature(_MODELS[name]).parameters],
    ("lenet", (1, 28, 28), {"variant": "classic"}),
    ("mlp", (3, 8, 8), {"hidden_sizes": [32, 16], "batch_norm": True, "dropout": 0.2}),
    ("mlp", (3, 8, 8), {"hidden_sizes": [32, 16], "activation": "maxout", "batch_norm": True, "dropout": 0.2}),
    ("mlp", (1, 8, 8), {"hidden_sizes": []}),
    ("vgg11", (3, 32, 32), {"batch_norm": True}),
    ("vgg11", (1, 8, 8), {}),
]
IDS = [f"{n}-{'x'.join(map(str, s))}" + "".join(f"-{k}={v}" for k, v in o.items()) for n, s, o in CASES]


def build(name, shape, options):
    with torch.device("meta"):  # names only: no memory, no init time
        return create_model(name, shape, 10, **options)


def is_repeated_block_index(parent: nn.Module) -> bool:
    """A numbered child is allowed only in a container of repeated blocks of one non-torch.nn class."""
    kinds = {type(child) for child in parent.children()}
    return (isinstance(parent, (nn.Sequential, nn.ModuleList)) and len(kinds) == 1
            and not next(iter(kinds)).__module__.startswith("torch."))


def bad_components(model: nn.Module, path: str) -> list[str]:
    """The components of the dotted `path` (a module's or a parameter's) that break the naming rule."""
    bad, module = [], model
    for part in path.split("."):
        if part.isdigit():
            if not is_repeated_block_index(module):
                bad.append(f"{path}: '{part}' numbers a child of {type(module).__name__}")
        elif not IDENTIFIER.fullmatch(part):
            bad.append(f"{path}: '{part}' is not a lowercase identifier")
        module = getattr(module, part, None) if isinstance(module, nn.Module) else None
    return bad


@pytest.mark.parametrize("name,shape,options", CASES, ids=IDS)
def test_no_module_or_parameter_is_named_by_its_position_alone(name, shape, options):
    model = build(name, shape, options)
    paths = [n for n, _ in model.named_modules() if n] + [n for n, _ in model.named_parameters()] + \
        [n for n, _ in model.named_buffers()]
    assert [problem for path in paths for problem in bad_components(model, path)] == []


@pytest.mark.parametrize("name,shape,options", CASES, ids=IDS)
def test_two_builds_have_the_same_names(name, shape, options):
    a, b = build(name, shape, options), build(name, shape, options)
    assert [n for n, _ in a.named_modules()] == [n for n, _ in b.named_modules()]
    assert list(a.state_dict()) == list(b.state_dict())


KIND = [(nn.Conv2d, "conv"), ((nn.Linear, Maxout), "fc"), (nn.modules.batchnorm._BatchNorm, "bn"),
        ((nn.MaxPool2d, nn.AvgPool2d), "pool"), (nn.Dropout, "dropout"), (nn.Flatten, "flatten"),
        (nn.AdaptiveAvgPool2d, "avgpool"), (nn.ReLU, ("relu", "act")),
        ((nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.PReLU, nn.ELU), "act")]


@pytest.mark.parametrize("name,shape,options", [c for c in CASES if c[0] in PLAIN_STACKS],
                         ids=[i for i, c in zip(IDS, CASES) if c[0] in PLAIN_STACKS])
def test_plain_stacks_name_each_layer_kind_and_count_the_kind_from_the_input(name, shape, options):
    """<kind><n>: n = 1, 2, ... in forward order across the model; a kind the model has one of by
    construction (flatten, avgpool, the linear classifier's fc) may go unnumbered."""
    model = build(name, shape, options)
    leaves = [(path, m) for path, m in model.named_modules() if path and (not any(m.children()) or
                                                                          isinstance(m, Maxout))]
    leaves = [(path, m) for path, m in leaves if not path.endswith(".linear")]  # inside a Maxout
    seen = {}
    for path, module in leaves:
        kind, n = re.fullmatch(r"([a-z]+?)(\d*)", path.rsplit(".", 1)[-1]).groups()
        expected = next(k for cls, k in KIND if isinstance(module, cls))
        assert kind in (expected if isinstance(expected, tuple) else (expected,)), (path, type(module))
        seen.setdefault(kind, []).append(int(n) if n else None)
    for kind, numbers in seen.items():
        assert numbers in ([None], list(range(1, len(numbers) + 1))), (kind, numbers)
    last = [path.rsplit(".", 1)[-1] for path, _ in leaves]
    assert len(set(last)) == len(last)  # each name is unique in its model, whatever the container


def leaf_names(model):
    return [path for path, m in model.named_modules() if path and not any(m.children())]


def test_lenet_names():
    assert leaf_names(build("lenet", (1, 28, 28), {})) == [
        "features.conv1", "features.act1", "features.pool1", "features.conv2", "features.act2", "features.pool2",
        "classifier.flatten", "classifier.fc1", "classifier.act3", "classifier.fc2"]
    assert leaf_names(build("lenet", (1, 28, 28), {"variant": "classic"})) == [
        "features.conv1", "features.act1", "features.pool1", "features.conv2", "features.act2", "features.pool2",
        "classifier.flatten", "classifier.fc1", "classifier.act3", "classifier.fc2", "classifier.act4",
        "classifier.fc3"]
    tanh = build("lenet", (1, 28, 28), {"activation": "tanh"})  # the activation option keeps the names
    assert leaf_names(tanh) == leaf_names(build("lenet", (1, 28, 28), {}))
    assert isinstance(tanh.features.act1, nn.Tanh)
    assert [n for n, _ in tanh.named_parameters()] == [
        "features.conv1.weight", "features.conv1.bias", "features.conv2.weight", "features.conv2.bias",
        "classifier.fc1.weight", "classifier.fc1.bias", "classifier.fc2.weight", "classifier.fc2.bias"]


def test_linear_and_mlp_names():
    assert leaf_names(build("linear", (3, 32, 32), {})) == ["flatten", "fc"]
    assert leaf_names(build("mlp", (3, 32, 32), {})) == ["flatten", "fc1", "act1", "fc2"]
    options = {"hidden_sizes": [32, 16], "batch_norm": True, "dropout": 0.2}
    assert leaf_names(build("mlp", (3, 8, 8), options)) == [
        "flatten", "fc1", "bn1", "act1", "dropout1", "fc2", "bn2", "act2", "dropout2", "fc3"]
    maxout = build("mlp", (3, 8, 8), {**options, "activation": "maxout"})
    assert leaf_names(maxout) == ["flatten", "fc1.linear", "bn1", "dropout1", "fc2.linear", "bn2", "dropout2", "fc3"]


def test_vgg11_names():
    assert leaf_names(build("vgg11", (3, 32, 32), {})) == [
        *[f"features.{n}" for n in ("conv1 relu1 pool1 conv2 relu2 pool2 conv3 relu3 conv4 relu4 pool3 conv5 "
                                    "relu5 conv6 relu6 pool4 conv7 relu7 conv8 relu8 pool5").split()],
        "avgpool", *[f"classifier.{n}" for n in "fc1 relu9 dropout1 fc2 relu10 dropout2 fc3".split()]]
    assert "features.bn8" in dict(build("vgg11", (3, 32, 32), {"batch_norm": True}).named_modules())


def test_block_families_name_their_parts():
    resnet = dict(build("resnet18", (3, 224, 224), {}).named_modules())
    assert {"layer2.0.downsample.conv", "layer2.0.downsample.bn", "layer4.1.conv2"} <= resnet.keys()
    assert "fc" in dict(build("resnet20", (3, 32, 32), {}).named_modules())
    googlenet = dict(build("googlenet", (3, 64, 64), {}).named_parameters())
    assert {"inception3.a.branch2.reduce.conv.weight", "inception4.e.branch3.conv3x3.conv.weight",
            "inception5.b.branch4.proj.bn.bias", "fc.weight"} <= googlenet.keys()
    densenet = build("densenet121", (3, 64, 64), {})
    assert [n for n, _ in densenet.features.named_children()] == [
        "conv0", "norm0", "relu0", "pool0", "denseblock1", "transition1", "denseblock2", "transition2",
        "denseblock3", "transition3", "denseblock4", "norm5", "relu5"]
    assert "features.transition1.conv.weight" in dict(densenet.named_parameters())


def test_layer_names_count_each_kind_and_continue_after_a_stack():
    name = LayerNames()
    assert [name("conv"), name("relu"), name("conv"), name("relu")] == ["conv1", "relu1", "conv2", "relu2"]
    stack = nn.Sequential()
    stack.add_module("conv1", nn.Identity())
    stack.add_module("relu3", nn.Identity())
    stack.add_module("flatten", nn.Identity())
    more = LayerNames(stack)
    assert [more("relu"), more("fc"), more("conv")] == ["relu4", "fc1", "conv2"]


def test_the_rule_flags_positions_and_allows_block_indices():
    old_style = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))  # what linear was: tags grad_norm/1.weight
    assert bad_components(old_style, "1.weight") == ["1.weight: '1' numbers a child of Sequential"]
    resnet = build("resnet18", (3, 224, 224), {})
    assert bad_components(resnet, "layer2.0.conv1.weight") == []  # a BasicBlock's index in its stage
    resnet.layer2[0].downsample = nn.Sequential(nn.Conv2d(64, 128, 1), nn.BatchNorm2d(128))  # torchvision's
    assert len(bad_components(resnet, "layer2.0.downsample.1.bias")) == 1
    assert len(bad_components(resnet, "layer2.0.Conv")) == 1
