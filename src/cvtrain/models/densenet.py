"""DenseNet-121, Huang, Liu, van der Maaten & Weinberger 2017, "Densely Connected Convolutional
Networks", the DenseNet-BC form as in torchvision.

Each dense layer sees the concatenation of all earlier maps in its block and adds `growth_rate`
new ones: BN-ReLU-conv 1x1 (bn_size * growth_rate) -> BN-ReLU-conv 3x3 (growth_rate). Blocks of
6, 12, 24, 16 layers (growth 32, bn_size 4); between blocks a transition BN-ReLU-conv 1x1 halves
the channels (compression 0.5) and a 2x2 average pool halves the map; final BN-ReLU, global
average pool, FC 1024 -> classes.

variant=imagenet: stem conv 7x7/2 64 -> BN-ReLU -> maxpool 3x3/2 (224 -> 56 -> 28, 14, 7). Needs
inputs of at least 29x29.
variant=small: stem a single conv 3x3/1 with 2 * growth_rate = 64 channels, as the paper's CIFAR
networks (32 -> 32, 16, 8, 4 over the blocks; 28 -> 28, 14, 7, 3). Needs at least 8x8.
variant=auto picks imagenet for inputs of 64 px and up, small below.

Layer names: torchvision's for the stack in `features` (conv0, norm0, relu0, pool0 (the imagenet stem;
the small stem is conv0 alone), denseblock1, transition1, ..., denseblock4, norm5, relu5), in a
transition norm, relu, conv, pool, in a dense layer norm1, relu1, conv1, norm2, relu2, conv2; then
avgpool, classifier. The number after `layers` is the dense layer's index in its block:
features.denseblock2.layers.0.conv1 is the first conv of the first layer of block 2; no other name is
a bare number.

Initialization (model.init=native): torchvision's, see native_init.
"""
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from cvtrain.models.registry import pick_variant, require_min_side, register_model

GROWTH_RATE, BLOCK_CONFIG, BN_SIZE, COMPRESSION = 32, (6, 12, 24, 16), 4, 0.5


class DenseLayer(nn.Module):
    """BN-ReLU-conv 1x1 -> BN-ReLU-conv 3x3: `growth_rate` new maps from all earlier ones."""

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, bn_size * growth_rate, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, padding=1, bias=False)
        self.dropout = dropout

    def forward(self, x):
        out = self.conv1(self.relu1(self.norm1(x)))
        out = self.conv2(self.relu2(self.norm2(out)))
        return F.dropout(out, p=self.dropout, training=self.training) if self.dropout > 0 else out


class DenseBlock(nn.Module):
    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bn_size: int, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size, dropout) for i in range(num_layers))
        self.out_channels = in_channels + num_layers * growth_rate

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-conv 1x1 to `out_channels`, then a 2x2 average pool."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(OrderedDict([
            ("norm", nn.BatchNorm2d(in_channels)),
            ("relu", nn.ReLU(inplace=True)),
            ("conv", nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)),
            ("pool", nn.AvgPool2d(kernel_size=2, stride=2)),
        ]))


def native_init(model: nn.Module) -> None:
    """model.init=native, torchvision's densenet.py: convs He normal (fan_in, gain sqrt(2)), BatchNorm
    weight 1, bias 0, the classifier's bias 0 (its weight keeps PyTorch's default)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.constant_(m.bias, 0)


class DenseNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, small_stem: bool = False, dropout: float = 0.0,
                 growth_rate: int = GROWTH_RATE, block_config=BLOCK_CONFIG, bn_size: int = BN_SIZE,
                 compression: float = COMPRESSION):
        super().__init__()
        channels = 2 * growth_rate
        if small_stem:
            stem = [("conv0", nn.Conv2d(in_channels, channels, kernel_size=3, padding=1, bias=False))]
        else:
            stem = [("conv0", nn.Conv2d(in_channels, channels, kernel_size=7, stride=2, padding=3, bias=False)),
                    ("norm0", nn.BatchNorm2d(channels)),
                    ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))]
        layers = stem
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers, channels, growth_rate, bn_size, dropout)
            layers.append((f"denseblock{i + 1}", block))
            channels = block.out_channels
            if i != len(block_config) - 1:
                layers.append((f"transition{i + 1}", Transition(channels, int(channels * compression))))
                channels = int(channels * compression)
        n = len(block_config) + 1  # torchvision's norm5, relu5 after four blocks
        layers += [(f"norm{n}", nn.BatchNorm2d(channels)), (f"relu{n}", nn.ReLU(inplace=True))]
        self.features = nn.Sequential(OrderedDict(layers))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(channels, num_classes)
        native_init(self)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# Smallest input side: three 2x2 average pools need an 8x8 map after the stem; the ImageNet stem
# (conv 7x7/2 pad 3, maxpool 3x3/2 pad 1) gives 8 from 29.
MIN_SIDE = {"small": 8, "imagenet": 29}


@register_model("densenet121")
def densenet121(in_shape, num_classes, variant="auto", dropout=0.0):
    variant = pick_variant(variant, in_shape, "densenet121")
    require_min_side("DenseNet-121", variant, in_shape, MIN_SIDE[variant])
    c = in_shape[0]
    return DenseNet(c, num_classes, small_stem=variant == "small", dropout=dropout)
