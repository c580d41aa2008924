"""Residual networks, He, Zhang, Ren & Sun 2016, "Deep Residual Learning for Image Recognition".

CIFAR ResNets (resnet20/32/44/56/110, Section 4.2): a 3x3 conv with 16 channels, then three
stages of n BasicBlocks with 16, 32, 64 channels (feature maps 32, 16, 8 on 32x32 inputs),
global average pool, FC: 6n+2 layers. Shortcuts are identities; where a stage halves the map and
doubles the channels the shortcut subsamples by 2 and pads the new channels with zeros
(option A), so they add no parameters: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M as in the paper's Table 6.

ImageNet ResNets (resnet18/34/50, Table 1), as torchvision: 7x7/2 conv + 3x3/2 max-pool stem, four
stages (64, 128, 256, 512 planes) of BasicBlocks (18, 34) or Bottlenecks (50, the stride on the
3x3 conv), 1x1 conv + BN projection shortcuts where the shape changes, global average pool, FC.
variant=small replaces the stem by a 3x3/1 conv without max-pool (32 -> 32, 16, 8, 4 over the
stages), the usual adaptation to CIFAR; variant=auto picks imagenet for inputs of 64 px and up.

Layer names: torchvision's (conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc; in a block conv1, bn1,
relu, conv2, bn2 (, conv3, bn3)), except that a projection shortcut is downsample.conv, downsample.bn
(torchvision: downsample.0, downsample.1). The number after a stage is the block's index in it:
layer2.0.conv1 is the first conv of the first block of stage 2; no other name is a bare number.

Initialization (model.init=native): torchvision's, see native_init.
"""
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from cvtrain.models.registry import pick_variant, register_model


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; relu(F(x) + shortcut(x))."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand to 4x planes, BN after each."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class PadShortcut(nn.Module):
    """Option A shortcut: subsample by `stride`, append zero channels up to `planes`; no parameters."""

    def __init__(self, planes: int, stride: int):
        super().__init__()
        self.planes, self.stride = planes, stride

    def forward(self, x):
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.planes - x.shape[1]))


def native_init(model: nn.Module) -> None:
    """model.init=native, torchvision's resnet.py: convs He normal with fan_out (He et al. 2015,
    nonlinearity relu), BatchNorm weight 1, bias 0; the FC keeps PyTorch's default Linear init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


class CifarResNet(nn.Module):
    """The 6n+2-layer CIFAR network: 16-32-64 channels, n BasicBlocks per stage, option A shortcuts."""

    def __init__(self, depth: int, in_channels: int, num_classes: int):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has 6n+2 layers; {depth} is not of that form")
        n = (depth - 2) // 6
        self.inplanes = 16
        self.conv1 = conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        native_init(self)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = PadShortcut(planes, stride)
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ResNet(nn.Module):
    """The ImageNet network (torchvision's ResNet); small_stem=True for 32x32-class inputs."""

    def __init__(self, block, layers, in_channels: int, num_classes: int, small_stem: bool = False):
        super().__init__()
        self.inplanes = 64
        if small_stem:
            self.conv1 = conv3x3(in_channels, 64)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        native_init(self)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(OrderedDict([
                ("conv", conv1x1(self.inplanes, planes * block.expansion, stride)),
                ("bn", nn.BatchNorm2d(planes * block.expansion)),
            ]))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --- CIFAR ResNets (no options: the network is fixed by the depth) -----------------------

@register_model("resnet20")
def resnet20(in_shape, num_classes):
    return CifarResNet(20, in_shape[0], num_classes)


@register_model("resnet32")
def resnet32(in_shape, num_classes):
    return CifarResNet(32, in_shape[0], num_classes)


@register_model("resnet44")
def resnet44(in_shape, num_classes):
    return CifarResNet(44, in_shape[0], num_classes)


@register_model("resnet56")
def resnet56(in_shape, num_classes):
    return CifarResNet(56, in_shape[0], num_classes)


@register_model("resnet110")
def resnet110(in_shape, num_classes):
    return CifarResNet(110, in_shape[0], num_classes)


# --- ImageNet ResNets ----------------------------------------------------------------------

def _resnet(name, block, layers, in_shape, num_classes, variant):
    small_stem = pick_variant(variant, in_shape, name) == "small"
    return ResNet(block, layers, in_shape[0], num_classes, small_stem)


@register_model("resnet18")
def resnet18(in_shape, num_classes, variant="auto"):
    return _resnet("resnet18", BasicBlock, [2, 2, 2, 2], in_shape, num_classes, variant)


@register_model("resnet34")
def resnet34(in_shape, num_classes, variant="auto"):
    return _resnet("resnet34", BasicBlock, [3, 4, 6, 3], in_shape, num_classes, variant)


@register_model("resnet50")
def resnet50(in_shape, num_classes, variant="auto"):
    return _resnet("resnet50", Bottleneck, [3, 4, 6, 3], in_shape, num_classes, variant)
