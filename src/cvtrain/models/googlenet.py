"""GoogLeNet (Inception v1), Szegedy et al. 2015, "Going Deeper with Convolutions", in
torchvision's form: every conv is conv (no bias) + BatchNorm + ReLU, no auxiliary classifiers,
dropout 0.2 before the classifier, and the "5x5" branch is a 3x3 conv as in torchvision
(pytorch/vision#906), so the parameter count equals torchvision.models.googlenet(aux_logits=False).

variant=imagenet: stem conv 7x7/2 64 -> maxpool 3x3/2 -> conv 1x1 64 -> conv 3x3 192 -> maxpool
3x3/2 (224 -> 28), then inception 3a-3b, maxpool, 4a-4e, maxpool, 5a-5b (28 -> 14 -> 7), global
average pool, dropout, FC 1024 -> classes. Needs inputs of at least 15x15.
variant=small: the stem's first conv is 3x3/1 and its first max-pool is dropped, so 32x32 inputs
reach the inception stages at 16, 8, 4 pixels (28x28: 14, 7, 4). Needs at least 4x4.
variant=auto picks imagenet for inputs of 64 px and up, small below.

Layer names: torchvision's (conv1, maxpool1, conv2, conv3, maxpool2, inception3, ..., avgpool, dropout, fc;
every BasicConv2d is .conv, .bn, .relu), with names where torchvision numbers: an inception module is
named by its letter in the paper (inception4.e, not inception4.4), and its branches' parts are
branch2.reduce, branch2.conv3x3, branch3.reduce, branch3.conv3x3, branch4.pool, branch4.proj; e.g.
inception3.a.branch2.conv3x3.conv.weight. No name has a bare number.

Initialization (model.init=native): torchvision's, see native_init.
"""
from collections import OrderedDict
from string import ascii_lowercase

import torch
import torch.nn as nn

from cvtrain.models.registry import pick_variant, require_min_side, register_model

# Inception modules, the paper's Table 1: (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj),
# grouped by stage; a max-pool halves the map between stages.
INCEPTION_STAGES = {
    "inception3": [(64, 96, 128, 16, 32, 32),       # 3a
                   (128, 128, 192, 32, 96, 64)],    # 3b
    "inception4": [(192, 96, 208, 16, 48, 64),      # 4a
                   (160, 112, 224, 24, 64, 64),     # 4b
                   (128, 128, 256, 24, 64, 64),     # 4c
                   (112, 144, 288, 32, 64, 64),     # 4d
                   (256, 160, 320, 32, 128, 128)],  # 4e
    "inception5": [(256, 160, 320, 32, 128, 128),   # 5a
                   (384, 192, 384, 48, 128, 128)],  # 5b
}


def native_init(model: nn.Module) -> None:
    """model.init=native, torchvision's googlenet.py (init_weights=True): conv and Linear weights
    truncated normal, std 0.01, cut at +-2; BatchNorm weight 1, bias 0 (the convs have no bias; the
    FC's keeps PyTorch's default until the output-layer rule zeroes it)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 0.001) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class Inception(nn.Module):
    """Four parallel branches concatenated along channels: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 | maxpool -> 1x1."""

    def __init__(self, in_channels: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int, ch5x5: int,
                 pool_proj: int):
        super().__init__()
        self.branch1 = BasicConv2d(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(OrderedDict([
            ("reduce", BasicConv2d(in_channels, ch3x3red, kernel_size=1)),
            ("conv3x3", BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1))]))
        self.branch3 = nn.Sequential(OrderedDict([
            ("reduce", BasicConv2d(in_channels, ch5x5red, kernel_size=1)),
            ("conv3x3", BasicConv2d(ch5x5red, ch5x5, kernel_size=3, padding=1))]))  # 3x3: see above
        self.branch4 = nn.Sequential(OrderedDict([
            ("pool", nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True)),
            ("proj", BasicConv2d(in_channels, pool_proj, kernel_size=1))]))
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


def make_stage(configs, in_channels: int) -> nn.Sequential:
    """A stage's inception modules, named a, b, c, ... as in the paper (3a, 3b, 4a, ...)."""
    modules = OrderedDict()
    for letter, cfg in zip(ascii_lowercase, configs):
        modules[letter] = Inception(in_channels, *cfg)
        in_channels = modules[letter].out_channels
    return nn.Sequential(modules)


class GoogLeNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, small_stem: bool = False, dropout: float = 0.2):
        super().__init__()
        if small_stem:
            self.conv1 = BasicConv2d(in_channels, 64, kernel_size=3, padding=1)
            self.maxpool1 = nn.Identity()
        else:
            self.conv1 = BasicConv2d(in_channels, 64, kernel_size=7, stride=2, padding=3)
            self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(64, 64, kernel_size=1)
        self.conv3 = BasicConv2d(64, 192, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception3 = make_stage(INCEPTION_STAGES["inception3"], 192)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception4 = make_stage(INCEPTION_STAGES["inception4"], self.inception3[-1].out_channels)
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.inception5 = make_stage(INCEPTION_STAGES["inception5"], self.inception4[-1].out_channels)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(self.inception5[-1].out_channels, num_classes)
        native_init(self)

    def forward(self, x):
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.maxpool3(self.inception3(x))
        x = self.maxpool4(self.inception4(x))
        x = self.avgpool(self.inception5(x))
        return self.fc(self.dropout(torch.flatten(x, 1)))


# Smallest input side: the ceil-mode max-pools (3x3/2, 3x3/2, 2x2/2 after the stem) turn 4 pixels
# into 2, 1, 1; the ImageNet stem (conv 7x7/2, maxpool 3x3/2) turns 15 into 8, 4.
MIN_SIDE = {"small": 4, "imagenet": 15}


@register_model("googlenet")
def googlenet(in_shape, num_classes, variant="auto", dropout=0.2):
    variant = pick_variant(variant, in_shape, "googlenet")
    require_min_side("GoogLeNet", variant, in_shape, MIN_SIDE[variant])
    c = in_shape[0]
    return GoogLeNet(c, num_classes, small_stem=variant == "small", dropout=dropout)
