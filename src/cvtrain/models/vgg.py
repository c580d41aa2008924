"""VGG, Simonyan & Zisserman 2015, "Very Deep Convolutional Networks for Large-Scale Image
Recognition": stacks of 3x3 convolutions (pad 1, ReLU, optionally BatchNorm) and 2x2 max-pools.

One layer table per depth (configurations A, B, D, E of the paper's Table 1); numbers are conv
output channels, "M" a 2x2/2 max-pool. A pool is skipped where the map is already 1 pixel high or
wide, so small inputs keep what fits: 32x32 keeps all five (32 -> 1), 28x28 keeps four
(28 -> 14 -> 7 -> 3 -> 1), 8x8 three.

variant=imagenet: AdaptiveAvgPool 7x7 -> FC 25088-4096-4096-classes with dropout (torchvision's head).
variant=small: the head of the common CIFAR VGGs: the 512-channel 1x1 map (global average pool on
larger inputs) -> FC 512-512-classes with dropout.
variant=auto picks imagenet for inputs of 64 px and up, small below.

Layer names (the scheme of models/names.py: <kind><n>, n counting that kind across the model), generated
from the layer table: features.conv1, (bn1,) relu1, pool1, conv2, ...; avgpool; classifier.fc1, relu<k+1>,
dropout1, fc2, relu<k+2>, dropout2, fc3 for k convs. vgg11 on 32x32: features.conv1, relu1, pool1, conv2,
relu2, pool2, conv3, relu3, conv4, relu4, pool3, ..., conv8, relu8, pool5; classifier.fc1, relu9, dropout1,
fc2, relu10, dropout2, fc3.

Initialization (model.init=native): torchvision's, see native_init.
"""
from collections import OrderedDict

import torch
import torch.nn as nn

from cvtrain.models.names import LayerNames
from cvtrain.models.registry import pick_variant, register_model

cfgs = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def make_layers(cfg, in_channels: int, height: int, width: int, batch_norm: bool = False) -> nn.Sequential:
    """The convolutional part from a layer table; a pool is left out once the map is 1 pixel high or wide."""
    name, layers = LayerNames(), []
    for v in cfg:
        if v == "M":
            if min(height, width) >= 2:
                layers.append((name("pool"), nn.MaxPool2d(kernel_size=2, stride=2)))
                height, width = height // 2, width // 2
        else:
            layers.append((name("conv"), nn.Conv2d(in_channels, v, kernel_size=3, padding=1)))
            if batch_norm:
                layers.append((name("bn"), nn.BatchNorm2d(v)))
            layers.append((name("relu"), nn.ReLU(inplace=True)))
            in_channels = v
    return nn.Sequential(OrderedDict(layers))


def native_init(model: nn.Module, variant: str) -> None:
    """model.init=native, torchvision's vgg.py: convs He normal with fan_out (relu), bias 0; BatchNorm
    weight 1, bias 0; Linear N(0, 0.01^2), bias 0. The small head's hidden Linears get He normal
    (fan_in) instead: N(0, 0.01^2) scales a 512-wide layer's signal by ~0.2, and a plain VGG then
    barely learns."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            if variant == "imagenet":
                nn.init.normal_(m.weight, 0, 0.01)
            else:
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.constant_(m.bias, 0)


class VGG(nn.Module):
    def __init__(self, features: nn.Module, num_classes: int, variant: str = "imagenet", dropout: float = 0.5):
        super().__init__()
        self.features = features
        side, hidden = (7, 4096) if variant == "imagenet" else (1, 512)
        self.avgpool = nn.AdaptiveAvgPool2d((side, side))
        name = LayerNames(features)  # the classifier's relus count on from the features'
        self.classifier = nn.Sequential(OrderedDict([
            (name("fc"), nn.Linear(512 * side * side, hidden)),
            (name("relu"), nn.ReLU(inplace=True)),
            (name("dropout"), nn.Dropout(p=dropout)),
            (name("fc"), nn.Linear(hidden, hidden)),
            (name("relu"), nn.ReLU(inplace=True)),
            (name("dropout"), nn.Dropout(p=dropout)),
            (name("fc"), nn.Linear(hidden, num_classes)),
        ]))
        native_init(self, variant)

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _vgg(name, in_shape, num_classes, variant, batch_norm, dropout):
    c, h, w = in_shape
    variant = pick_variant(variant, in_shape, name)
    return VGG(make_layers(cfgs[name], c, h, w, batch_norm), num_classes, variant, dropout)


@register_model("vgg11")
def vgg11(in_shape, num_classes, variant="auto", batch_norm=False, dropout=0.5):
    return _vgg("vgg11", in_shape, num_classes, variant, batch_norm, dropout)


@register_model("vgg13")
def vgg13(in_shape, num_classes, variant="auto", batch_norm=False, dropout=0.5):
    return _vgg("vgg13", in_shape, num_classes, variant, batch_norm, dropout)


@register_model("vgg16")
def vgg16(in_shape, num_classes, variant="auto", batch_norm=False, dropout=0.5):
    return _vgg("vgg16", in_shape, num_classes, variant, batch_norm, dropout)


@register_model("vgg19")
def vgg19(in_shape, num_classes, variant="auto", batch_norm=False, dropout=0.5):
    return _vgg("vgg19", in_shape, num_classes, variant, batch_norm, dropout)
