"""Every trained model, built from its configs/model YAML at the default init (native), starts at a
cross-entropy loss within 10% of ln(classes) on its natural geometry: the output layer starts small
(models/init.py), so the scores are about 0 and the softmax about uniform.

Inputs are standard normal, as data.preprocess=standardize makes real images; the forward runs in
train mode (dropout on, BatchNorm on batch statistics), as the first training step does. Models are
enumerated from the registry: a new trained model is covered on CIFAR geometry (and also on ImageNet
geometry when it has a variant option), or on the geometries listed for it here.
All cases together take ~20 s on one thread (VGG's 224x224 forms mostly for initializing 138M weights).
"""
import inspect
import math
import time

import pytest
import torch
import torch.nn.functional as F

from cvtrain.models import build_model, list_models
from cvtrain.models.registry import _MODELS

DIGITS, CIFAR, IMAGENET = (1, 28, 28, 10), (3, 32, 32, 10), (3, 224, 224, 1000)
NATURAL = {  # name -> [(geometry, overrides)]; unlisted trained models: see geometries()
    "linear": [(DIGITS, [])],
    "mlp": [(DIGITS, [])],
    "lenet": [(DIGITS, []), (DIGITS, ["model.variant=classic"])],
}
BATCH = {DIGITS: 8, CIFAR: 8, IMAGENET: 4}
LOSSES = {}  # test id -> initial loss, printed at the end with -s


def geometries(name):
    if name in NATURAL:
        return NATURAL[name]
    forms = [(CIFAR, [])]
    if inspect.signature(_MODELS[name]).parameters.get("variant") is not None:
        forms.append((IMAGENET, []))  # variant=auto: the ImageNet form at 224x224
    return forms


CASES = [pytest.param(name, geometry, overrides,
                      id="-".join([name, *[o.split("=")[1] for o in overrides], "x".join(map(str, geometry[:3]))]))
         for name in list_models("trained") for geometry, overrides in geometries(name)]


@pytest.fixture(autouse=True, scope="module")
def report_losses():
    """After the module (pytest -s shows it): every model's initial loss beside ln C (one thread: conftest)."""
    yield
    if LOSSES:
        print("\ninitial loss / ln(C):", *(f"  {k}: {v[0]:.3f} / {v[1]:.3f} ({v[2]:.1f} s)"
                                         for k, v in LOSSES.items()), sep="\n")


@pytest.mark.parametrize("name,geometry,overrides", CASES)
def test_initial_loss_is_ln_classes(name, geometry, overrides, compose_config, request):
    *shape, classes = geometry
    cfg = compose_config([f"model={name}", *overrides])
    assert cfg.model.init == "native"
    start = time.perf_counter()
    torch.manual_seed(0)
    model = build_model(cfg.model, shape, classes).train()
    x, y = torch.randn(BATCH[geometry], *shape), torch.randint(0, classes, (BATCH[geometry],))
    with torch.no_grad():
        loss = F.cross_entropy(model(x), y).item()
    LOSSES[request.node.callspec.id] = (loss, math.log(classes), time.perf_counter() - start)
    assert loss == pytest.approx(math.log(classes), rel=0.1)
