"""Multi-layer perceptron: fully connected layers with a nonlinearity between them.

Layer names (the scheme of models/names.py, numbered per kind from the input): flatten, then per hidden
layer i fc<i> (a Maxout unit under activation=maxout: fc<i>.linear), bn<i>, act<i> (whatever
model.activation is, so runs that differ in it share their tags), dropout<i>; the output layer
fc<len(hidden_sizes) + 1>. hidden_sizes=[256]: flatten, fc1, act1, fc2.

Initialization (model.init=native): PyTorch's default layer init, left as the layers set it.
"""
from collections import OrderedDict

import torch
import torch.nn as nn

from cvtrain import UserError
from cvtrain.models.names import LayerNames
from cvtrain.models.registry import register_model


class Maxout(nn.Module):
    """Maxout unit (Goodfellow et al. 2013): the max over `pieces` linear functions of the input."""

    def __init__(self, in_features: int, out_features: int, pieces: int = 2):
        super().__init__()
        self.out_features, self.pieces = out_features, pieces
        self.linear = nn.Linear(in_features, out_features * pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).view(-1, self.out_features, self.pieces).amax(-1)


ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
    "prelu": nn.PReLU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "maxout": None,  # replaces the Linear + activation pair
}


@register_model("mlp")
def mlp(in_shape, num_classes, hidden_sizes=(256,), activation="relu", dropout=0.0, batch_norm=False,
        maxout_pieces: int = 2):
    if activation not in ACTIVATIONS:
        raise UserError(f"model.activation='{activation}' is unknown; choose one of {', '.join(ACTIVATIONS)}")
    c, h, w = in_shape
    name = LayerNames()
    layers, width = [("flatten", nn.Flatten())], c * h * w
    for hidden in hidden_sizes:
        if activation == "maxout":
            layers.append((name("fc"), Maxout(width, hidden, maxout_pieces)))
        else:
            layers.append((name("fc"), nn.Linear(width, hidden)))
        if batch_norm:
            layers.append((name("bn"), nn.BatchNorm1d(hidden)))
        if activation != "maxout":
            layers.append((name("act"), ACTIVATIONS[activation]()))
        if dropout > 0:
            layers.append((name("dropout"), nn.Dropout(dropout)))
        width = hidden
    layers.append((name("fc"), nn.Linear(width, num_classes)))
    return nn.Sequential(OrderedDict(layers))
