"""Network in Network, Lin, Chen & Yan 2014, CIFAR-10 form.

Three mlpconv blocks (a spatial conv followed by two 1x1 convs, the "micro network"), ReLU after
every conv but the last; the last 1x1 conv outputs one map per class and global average pooling
turns the maps into logits, with no fully connected layer. Reference implementations often put a
ReLU on the class maps too; it is left out here, since it clamps the logits at 0 and a class
whose map dies gets no gradient.

Initialization (model.init=native, see native_init): He et al. 2015 normal (fan_in, relu), biases 0,
not the N(0, 0.05^2) Gaussians of the authors' Caffe model and its common ports: those shrink the
signal about 2x per layer, so a nine-conv ReLU stack without BatchNorm starts slowly (fitting one
batch of 8 with Adam took 31 steps against He's 16).

    conv 5x5 192 -> 1x1 160 -> 1x1 96,  maxpool 3x3/2, dropout
    conv 5x5 192 -> 1x1 192 -> 1x1 192, avgpool 3x3/2, dropout
    conv 3x3 192 -> 1x1 192 -> 1x1 classes, global average pool

The pools are padded by 1 (32 -> 16 -> 8, 28 -> 14 -> 7), so any input size fits.

Layer names (the scheme of models/names.py: <kind><n>, n counting that kind across the model):
features.conv1, relu1, conv2, relu2, conv3, relu3, pool1, dropout1, conv4, relu4, conv5, relu5, conv6,
relu6, pool2, dropout2, conv7, relu7, conv8, relu8, conv9 (the class maps: the output layer); avgpool.
"""
from collections import OrderedDict

import torch
import torch.nn as nn

from cvtrain.models.names import LayerNames
from cvtrain.models.registry import register_model


def mlpconv(name: LayerNames, in_channels: int, channels, kernel_size: int,
            last_relu: bool = True) -> list[tuple[str, nn.Module]]:
    """One mlpconv block as (name, layer) pairs, named by `name`: a kxk conv, then 1x1 convs, each
    followed by ReLU (but the last when last_relu=False); `channels` lists the output widths."""
    layers = []
    for i, out_channels in enumerate(channels):
        k = kernel_size if i == 0 else 1
        layers.append((name("conv"), nn.Conv2d(in_channels, out_channels, kernel_size=k, padding=k // 2)))
        if last_relu or i < len(channels) - 1:
            layers.append((name("relu"), nn.ReLU(inplace=True)))
        in_channels = out_channels
    return layers


def native_init(model: nn.Module) -> None:
    """model.init=native: every conv He normal (fan_in, relu), bias 0 (see the module docstring)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.constant_(m.bias, 0)


class NIN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.5):
        super().__init__()
        name = LayerNames()
        self.features = nn.Sequential(OrderedDict([
            *mlpconv(name, in_channels, (192, 160, 96), kernel_size=5),
            (name("pool"), nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            (name("dropout"), nn.Dropout(p=dropout)),
            *mlpconv(name, 96, (192, 192, 192), kernel_size=5),
            (name("pool"), nn.AvgPool2d(kernel_size=3, stride=2, padding=1)),
            (name("dropout"), nn.Dropout(p=dropout)),
            *mlpconv(name, 192, (192, 192, num_classes), kernel_size=3, last_relu=False),
        ]))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        native_init(self)

    def forward(self, x):
        return torch.flatten(self.avgpool(self.features(x)), 1)


@register_model("nin")
def nin(in_shape, num_classes, dropout=0.5):
    return NIN(in_shape[0], num_classes, dropout)
