"""The CNN families: parameter counts equal torchvision's and the papers', every model gives
(N, classes) logits on each geometry it supports, each can fit a small batch, and inputs that do
not fit fail before training with a message that names what fits.

The heavy cases (224x224 forwards of the big networks, fitting the big networks) are marked slow:
    pytest -m slow tests/test_model_zoo.py
"""
import importlib.resources
import inspect

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from omegaconf import OmegaConf

from cvtrain import UserError
from cvtrain.models import build_model, create_model, list_models, model_kind
from cvtrain.models.registry import _MODELS

ZOO = ["alexnet", "vgg11", "vgg13", "vgg16", "vgg19", "nin",
       "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet18", "resnet34", "resnet50",
       "googlenet", "densenet121"]
IMAGENET_FORMS = ["alexnet", "vgg11", "vgg13", "vgg16", "vgg19", "resnet18", "resnet34", "resnet50",
                  "googlenet", "densenet121"]
CHEAP_AT_224 = {"alexnet", "resnet18", "googlenet", "resnet20"}
SMALL_GEOMETRIES = [(1, 28, 28), (3, 32, 32), (2, 20, 36)]  # digits, CIFAR, any channels / non-square
CONFIG_DIR = importlib.resources.files("cvtrain.configs") / "model"


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


# --- parameter counts ----------------------------------------------------------------

TORCHVISION = [  # (our name, our options, torchvision's builder)
    ("alexnet", {}, lambda: tvm.alexnet(weights=None, num_classes=1000)),
    ("vgg11", {}, lambda: tvm.vgg11(weights=None)),
    ("vgg13", {}, lambda: tvm.vgg13(weights=None)),
    ("vgg16", {}, lambda: tvm.vgg16(weights=None)),
    ("vgg19", {}, lambda: tvm.vgg19(weights=None)),
    ("vgg11", {"batch_norm": True}, lambda: tvm.vgg11_bn(weights=None)),
    ("vgg16", {"batch_norm": True}, lambda: tvm.vgg16_bn(weights=None)),
    ("resnet18", {}, lambda: tvm.resnet18(weights=None)),
    ("resnet34", {}, lambda: tvm.resnet34(weights=None)),
    ("resnet50", {}, lambda: tvm.resnet50(weights=None)),
    ("googlenet", {}, lambda: tvm.googlenet(weights=None, aux_logits=False, init_weights=True)),
    ("densenet121", {}, lambda: tvm.densenet121(weights=None)),
]


@pytest.mark.parametrize("name,options,reference", [
    pytest.param(name, options, ref, id=name + ("_bn" if options else "")) for name, options, ref in TORCHVISION])
def test_imagenet_parameter_count_equals_torchvision(name, options, reference):
    with torch.device("meta"):  # shapes only: no memory for VGG's 138M weights, no init time
        ours = create_model(name, (3, 224, 224), 1000, **options)
        theirs = reference()
    assert n_params(ours) == n_params(theirs)


@pytest.mark.parametrize("depth,millions", [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7)])
def test_cifar_resnet_parameter_count_matches_the_paper(depth, millions):
    model = create_model(f"resnet{depth}", (3, 32, 32), 10)
    assert float(f"{n_params(model) / 1e6:.2g}") == millions  # He et al. 2016, Table 6
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) + 1 == depth  # 6n+1 convs + FC


# --- shapes ----------------------------------------------------------------------------

def forward_shape(name, shape, num_classes=7, **options):
    model = create_model(name, shape, num_classes, **options).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert torch.isfinite(out).all()
    return tuple(out.shape)


@pytest.mark.parametrize("shape", SMALL_GEOMETRIES, ids=shape_id)
@pytest.mark.parametrize("name", ZOO)
def test_forward_shape_small_images(name, shape):
    assert forward_shape(name, shape) == (2, 7)


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=() if name in CHEAP_AT_224 else pytest.mark.slow) for name in ZOO])
def test_forward_shape_224(name):
    assert forward_shape(name, (3, 224, 224)) == (2, 7)


@pytest.mark.parametrize("name", IMAGENET_FORMS)
def test_variant_auto_picks_by_image_size(name):
    """auto = the ImageNet form from 64 px up, the small form below (the forms differ in parameters)."""
    def count(side, **options):
        with torch.device("meta"):
            return n_params(create_model(name, (3, side, side), 10, **options))

    assert count(64) == count(64, variant="imagenet") != count(64, variant="small")
    assert count(63) == count(63, variant="small") != count(63, variant="imagenet")
    assert count(32) == count(32, variant="small")


def test_vgg_skips_the_pools_that_do_not_fit():
    pools = lambda shape: sum(isinstance(m, torch.nn.MaxPool2d)  # noqa: E731
                              for m in create_model("vgg11", shape, 10).features)
    assert [pools((3, 32, 32)), pools((1, 28, 28)), pools((1, 8, 8)), pools((3, 1, 1))] == [5, 4, 3, 0]


@pytest.mark.parametrize("name,variant,side", [
    ("alexnet", "imagenet", 63), ("alexnet", "small", 8),
    ("googlenet", "imagenet", 15), ("googlenet", "small", 4),
    ("densenet121", "imagenet", 29), ("densenet121", "small", 8)])
def test_smallest_input_runs_and_one_less_is_refused(name, variant, side):
    assert forward_shape(name, (3, side, side), variant=variant) == (2, 7)
    with pytest.raises(UserError, match=f"at least {side}x{side}"):
        create_model(name, (3, side - 1, side - 1), 7, variant=variant)


# --- clear errors ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["alexnet", "googlenet", "densenet121"])
def test_imagenet_form_on_digits_names_the_variant_that_fits(name):
    shape = (1, 28, 28) if name == "alexnet" else (1, 8, 8)
    with pytest.raises(UserError, match="model.variant=small"):
        create_model(name, shape, 10, variant="imagenet")


@pytest.mark.parametrize("name", IMAGENET_FORMS)
def test_unknown_variant_is_refused(name):
    with pytest.raises(UserError, match="auto, imagenet, small"):
        create_model(name, (3, 32, 32), 10, variant="cifar10")


# --- configs -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list_models())
def test_config_lists_every_option_with_its_default(name):
    """configs/model/<name>.yaml = name + the builder's options at the builder's defaults
    (+ init: native, bias_init: 0.0, pretrained: null, freeze: null for a trained model; a fitted one has none)."""
    node = OmegaConf.to_container(OmegaConf.load(str(CONFIG_DIR / f"{name}.yaml")))
    assert node.pop("name") == name
    if model_kind(name) == "trained":
        assert (node.pop("init"), node.pop("bias_init")) == ("native", 0.0)  # applied by models.build_model
        assert (node.pop("pretrained"), node.pop("freeze")) == (None, None)  # applied by task=train (models/transfer.py)
    params = inspect.signature(_MODELS[name]).parameters
    defaults = {k: list(p.default) if isinstance(p.default, tuple) else p.default
                for k, p in params.items() if k not in ("in_shape", "num_classes")}
    assert node == defaults


@pytest.mark.parametrize("preset", ["softmax", "svm"])
def test_linear_presets_use_the_native_init(preset):
    node = OmegaConf.load(str(CONFIG_DIR / f"{preset}.yaml")).model
    assert (node.name, node.init, node.bias_init) == ("linear", "native", 0.0)


# --- it can learn --------------------------------------------------------------------------

def fit_one_batch(name, side=32, lr=1e-3, max_steps=40, **options):
    """Adam on one fixed batch of 8 smooth random images with 8 different labels (10 classes).

    The model is built as a run builds it (build_model: init=native and the output-layer rule).
    Returns the training losses; stops once the loss is below 0.05.
    """
    torch.manual_seed(0)
    x = F.interpolate(torch.randn(8, 3, 4, 4), size=(side, side), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.arange(8)
    model = build_model({"name": name, **options}, (3, side, side), 10).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(max_steps):
        loss = F.cross_entropy(model(x), y)
        losses.append(loss.item())
        if losses[-1] < 0.05:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses


FIT = [  # (name, options, lr, image side); dropout off: this checks that gradients reach every layer
    ("linear", {}, 1e-2, 32),
    ("mlp", {"activation": "maxout"}, 1e-3, 32),
    ("mlp", {"activation": "tanh", "batch_norm": True}, 1e-3, 32),
    ("lenet", {}, 1e-3, 32),
    ("lenet", {"variant": "classic"}, 3e-3, 32),
    ("resnet20", {}, 1e-3, 32),
    ("alexnet", {"dropout": 0.0}, 1e-3, 32),
    ("nin", {"dropout": 0.0}, 1e-3, 32),
    ("vgg11", {"dropout": 0.0}, 3e-4, 32),
    ("googlenet", {"dropout": 0.0}, 1e-3, 16),
    ("densenet121", {}, 1e-3, 16),
]
FIT_SLOW = [
    ("vgg11", {"batch_norm": True, "dropout": 0.0}, 1e-3, 32),
    ("vgg19", {"batch_norm": True, "dropout": 0.0}, 1e-3, 32),
    ("resnet56", {}, 1e-3, 32),
    ("resnet110", {}, 1e-3, 32),
    ("resnet18", {}, 1e-3, 32),
    ("resnet50", {}, 1e-3, 32),
    ("googlenet", {"dropout": 0.0}, 1e-3, 32),
    ("densenet121", {}, 1e-3, 32),
]


@pytest.mark.parametrize("name,options,lr,side", [
    *[pytest.param(*case, id=f"{case[0]}-{'-'.join(map(str, case[1].values()))}-{case[3]}px") for case in FIT],
    *[pytest.param(*case, id=f"{case[0]}{'_bn' if case[1].get('batch_norm') else ''}-{case[3]}px",
                   marks=pytest.mark.slow) for case in FIT_SLOW]])
def test_fits_a_small_batch(name, options, lr, side):
    losses = fit_one_batch(name, side, lr, **options)
    assert losses[-1] < 0.1, f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f} after {len(losses)} steps"
