"""Linear classifier: the score function f(x) = W x + b on flattened pixels.

Layer names (the scheme of models/names.py): flatten, fc; W is fc.weight, b fc.bias.

Initialization: its one layer is the output layer, so every scheme but zeros ends at weights of
root-mean-square at most 0.1 / sqrt(pixels) and bias 0 (models/init.py): small random numbers.
"""
from collections import OrderedDict

import torch.nn as nn

from cvtrain.models.registry import register_model


@register_model("linear")
def linear(in_shape, num_classes):
    c, h, w = in_shape
    return nn.Sequential(OrderedDict([("flatten", nn.Flatten()), ("fc", nn.Linear(c * h * w, num_classes))]))
