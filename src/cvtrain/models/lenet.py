"""LeNet-5 in two forms.

modern (the lecture table): conv 20@5x5 pad 2 -> ReLU -> maxpool 2 -> conv 50@5x5 pad 2
  -> ReLU -> maxpool 2 -> FC 50*(H/4)*(W/4) -> 500 (2450 -> 500 on 28x28) -> ReLU -> FC 500 -> classes.
classic (LeCun et al. 1998, on 32x32 input; 28x28 digits are padded by 2 as in the paper):
  conv 6@5x5 -> tanh -> avgpool 2 -> conv 16@5x5 -> tanh -> avgpool 2 -> FC 120 -> tanh -> FC 84 -> tanh
  -> FC classes (the paper's RBF output layer is replaced by a linear one, as is usual).

Layer names (the scheme of models/names.py: <kind><n>, n counting that kind across the model; act is
whatever model.activation chooses, so relu and tanh runs share their tags):
  modern   features.conv1, act1, pool1, conv2, act2, pool2; classifier.flatten, fc1, act3, fc2
  classic  features.conv1, act1, pool1, conv2, act2, pool2; classifier.flatten, fc1, act3, fc2, act4, fc3

Initialization (model.init=native): PyTorch's default layer init, left as the layers set it.
"""
from collections import OrderedDict

import torch.nn as nn

from cvtrain import UserError
from cvtrain.models.registry import register_model

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def _modern(c, h, w, num_classes, act):
    features = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(c, 20, kernel_size=5, padding=2)), ("act1", act()), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(20, 50, kernel_size=5, padding=2)), ("act2", act()), ("pool2", nn.MaxPool2d(2)),
    ]))
    classifier = nn.Sequential(OrderedDict([
        ("flatten", nn.Flatten()), ("fc1", nn.Linear(50 * (h // 4) * (w // 4), 500)), ("act3", act()),
        ("fc2", nn.Linear(500, num_classes)),
    ]))
    return features, classifier


def _classic(c, h, w, num_classes, act):
    pad = 2 if min(h, w) < 32 else 0  # the paper pads 28x28 digits to 32x32
    h2, w2 = ((h + 2 * pad - 4) // 2 - 4) // 2, ((w + 2 * pad - 4) // 2 - 4) // 2
    features = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(c, 6, kernel_size=5, padding=pad)), ("act1", act()), ("pool1", nn.AvgPool2d(2)),
        ("conv2", nn.Conv2d(6, 16, kernel_size=5)), ("act2", act()), ("pool2", nn.AvgPool2d(2)),
    ]))
    classifier = nn.Sequential(OrderedDict([
        ("flatten", nn.Flatten()), ("fc1", nn.Linear(16 * h2 * w2, 120)), ("act3", act()),
        ("fc2", nn.Linear(120, 84)), ("act4", act()), ("fc3", nn.Linear(84, num_classes)),
    ]))
    return features, classifier


class LeNet5(nn.Module):
    def __init__(self, features: nn.Module, classifier: nn.Module):
        super().__init__()
        self.features, self.classifier = features, classifier

    def forward(self, x):
        return self.classifier(self.features(x))


@register_model("lenet")
def lenet(in_shape, num_classes, variant="modern", activation=None):
    c, h, w = in_shape
    if variant not in ("modern", "classic"):
        raise UserError(f"model.variant='{variant}' is unknown; choose modern or classic")
    activation = activation or ("relu" if variant == "modern" else "tanh")
    if activation not in _ACTIVATIONS:
        raise UserError(f"model.activation='{activation}' is unknown; choose one of {', '.join(_ACTIVATIONS)}")
    smallest = 4 if variant == "modern" else 12
    if h < smallest or w < smallest:
        raise UserError(f"LeNet ({variant}) needs images of at least {smallest}x{smallest}; got {h}x{w}. "
                        "Use model=mlp or model=linear for smaller inputs"
                        + (", or model.variant=modern" if variant == "classic" else "") + ".")
    build = _modern if variant == "modern" else _classic
    return LeNet5(*build(c, h, w, num_classes, _ACTIVATIONS[activation]))
