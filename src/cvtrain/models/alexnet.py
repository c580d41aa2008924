"""AlexNet, Krizhevsky, Sutskever & Hinton 2012, "ImageNet Classification with Deep
Convolutional Neural Networks".

variant=imagenet: torchvision's single-GPU form (the channel counts of Krizhevsky 2014,
"One weird trick"): conv 64@11x11/4 -> pool -> 192@5x5 -> pool -> 384, 256, 256 @3x3 -> pool
-> AdaptiveAvgPool 6x6 -> FC 9216-4096-4096-classes with dropout. Needs inputs of >= 63x63.

variant=small: the same five convolutions for 32x32 (and 28x28, down to 8x8) images, at the
per-GPU widths of the 2012 network (48-128-192-192-128), 5x5/5x5/3x3/3x3/3x3 kernels, stride 1,
three 2x2 max-pools, FC 512-512-classes with dropout.

variant=auto picks imagenet for inputs of 64 px and up, small below.

Layer names, both forms (the scheme of models/names.py: <kind><n>, n counting that kind across the
model): features.conv1, relu1, pool1, conv2, relu2, pool2, conv3, relu3, conv4, relu4, conv5, relu5,
pool3; avgpool (imagenet form); classifier.dropout1, fc1, relu6, dropout2, fc2, relu7, fc3.

Initialization (model.init=native): the ImageNet form keeps PyTorch's default layer init, as
torchvision does (the paper's N(0, 0.01^2) weights with biases of 1 in conv2, conv4, conv5 and the
hidden FCs were tuned to its own data scale and learning-rate schedule); the small form uses He
normal (fan_in, relu) with biases 0, like the other small forms, see native_init_small.
"""
from collections import OrderedDict

import torch
import torch.nn as nn

from cvtrain import UserError
from cvtrain.models.registry import pick_variant, register_model


def native_init_small(model: nn.Module) -> None:
    """model.init=native for the small form: He normal (fan_in, relu) weights, biases 0. (With
    PyTorch's defaults a batch of 8 took 33 Adam steps to fit instead of 7.)"""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.constant_(m.bias, 0)


class AlexNet(nn.Module):
    """The ImageNet network, layer for layer as torchvision.models.alexnet; PyTorch's default init."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2)),
            ("relu1", nn.ReLU(inplace=True)),
            ("pool1", nn.MaxPool2d(kernel_size=3, stride=2)),
            ("conv2", nn.Conv2d(64, 192, kernel_size=5, padding=2)),
            ("relu2", nn.ReLU(inplace=True)),
            ("pool2", nn.MaxPool2d(kernel_size=3, stride=2)),
            ("conv3", nn.Conv2d(192, 384, kernel_size=3, padding=1)),
            ("relu3", nn.ReLU(inplace=True)),
            ("conv4", nn.Conv2d(384, 256, kernel_size=3, padding=1)),
            ("relu4", nn.ReLU(inplace=True)),
            ("conv5", nn.Conv2d(256, 256, kernel_size=3, padding=1)),
            ("relu5", nn.ReLU(inplace=True)),
            ("pool3", nn.MaxPool2d(kernel_size=3, stride=2)),
        ]))
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(OrderedDict([
            ("dropout1", nn.Dropout(p=dropout)),
            ("fc1", nn.Linear(256 * 6 * 6, 4096)),
            ("relu6", nn.ReLU(inplace=True)),
            ("dropout2", nn.Dropout(p=dropout)),
            ("fc2", nn.Linear(4096, 4096)),
            ("relu7", nn.ReLU(inplace=True)),
            ("fc3", nn.Linear(4096, num_classes)),
        ]))

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class AlexNetSmall(nn.Module):
    """AlexNet for small images: five stride-1 convs, three 2x2 pools (32 -> 4, 28 -> 3), FC 512-512."""

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, 48, kernel_size=5, padding=2)),
            ("relu1", nn.ReLU(inplace=True)),
            ("pool1", nn.MaxPool2d(2)),
            ("conv2", nn.Conv2d(48, 128, kernel_size=5, padding=2)),
            ("relu2", nn.ReLU(inplace=True)),
            ("pool2", nn.MaxPool2d(2)),
            ("conv3", nn.Conv2d(128, 192, kernel_size=3, padding=1)),
            ("relu3", nn.ReLU(inplace=True)),
            ("conv4", nn.Conv2d(192, 192, kernel_size=3, padding=1)),
            ("relu4", nn.ReLU(inplace=True)),
            ("conv5", nn.Conv2d(192, 128, kernel_size=3, padding=1)),
            ("relu5", nn.ReLU(inplace=True)),
            ("pool3", nn.MaxPool2d(2)),
        ]))
        self.classifier = nn.Sequential(OrderedDict([
            ("dropout1", nn.Dropout(p=dropout)),
            ("fc1", nn.Linear(128 * (height // 8) * (width // 8), 512)),
            ("relu6", nn.ReLU(inplace=True)),
            ("dropout2", nn.Dropout(p=dropout)),
            ("fc2", nn.Linear(512, 512)),
            ("relu7", nn.ReLU(inplace=True)),
            ("fc3", nn.Linear(512, num_classes)),
        ]))
        native_init_small(self)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model("alexnet")
def alexnet(in_shape, num_classes, variant="auto", dropout=0.5):
    c, h, w = in_shape
    variant = pick_variant(variant, in_shape, "alexnet")
    if variant == "imagenet":
        if min(h, w) < 63:
            raise UserError(f"AlexNet's ImageNet form (11x11/4 stem, three 3x3/2 pools) needs images of at "
                            f"least 63x63; got {h}x{w}. Use model.variant=small (or auto) for 32x32 and 28x28 "
                            "inputs.")
        return AlexNet(c, num_classes, dropout)
    if min(h, w) < 8:
        raise UserError(f"AlexNet's small form (three 2x2 pools) needs images of at least 8x8; got {h}x{w}. "
                        "Use model=mlp or model=linear for smaller inputs.")
    return AlexNetSmall(c, h, w, num_classes, dropout)
