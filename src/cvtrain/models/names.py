"""Readable module names for the layer stacks of the model zoo, so TensorBoard tags say what they show
(act/features.relu3/mean, grad_norm/classifier.fc1.weight) instead of act/2 or features.3.weight.

The scheme, the same in every family built as a stack of layers (linear, mlp, lenet, alexnet, vgg, nin):
a layer is named <kind><n>, n counting the layers of that kind from the input across the whole model
(not per container), so a name is unique in its model and says where the layer sits:

    conv   nn.Conv2d                  fc       nn.Linear (or a Maxout unit, a Linear with a max)
    bn     BatchNorm                  pool     max- or average-pool
    relu   a ReLU the architecture fixes         act      the activation a model option chooses
    dropout nn.Dropout                (LeNet's and the MLP's `activation`: one tag for relu and tanh runs)

A layer the architecture always has exactly one of keeps the bare kind: flatten, avgpool (the global
pool before the classifier), the linear classifier's fc. LeNet on 28x28: features.conv1, features.act1,
features.pool1, features.conv2, features.act2, features.pool2, classifier.flatten, classifier.fc1,
classifier.act3, classifier.fc2.

The block-structured families (resnet, googlenet, densenet) keep torchvision's names inside a block
(layer1.0.conv1, branch1.conv, denseblock1.layers.0.norm1), with names where torchvision has numbered
parts (downsample.conv / downsample.bn, branch2.reduce / branch2.conv3x3, features.conv0 ...). A number
alone is left only for the index of a repeated block in a stage (layer1.0, layer1.1: the block number).
"""
import re
from collections import Counter

import torch.nn as nn


class LayerNames:
    """Hands out <kind><n> names, n counting each kind from 1 across the model:

        name = LayerNames()
        nn.Sequential(OrderedDict([(name("conv"), nn.Conv2d(...)), (name("relu"), nn.ReLU()), ...]))

    LayerNames(features) continues the counts of the <kind><n> children already named in `features`.
    """

    def __init__(self, *named: nn.Module):
        self.counts = Counter()
        for module in named:
            for child, _ in module.named_children():
                match = re.fullmatch(r"([a-z_]+?)(\d+)", child)
                if match:
                    kind, n = match.group(1), int(match.group(2))
                    self.counts[kind] = max(self.counts[kind], n)

    def __call__(self, kind: str) -> str:
        self.counts[kind] += 1
        return f"{kind}{self.counts[kind]}"
