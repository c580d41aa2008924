"""Multi-layer perceptron: fully connected layers with a nonlinearity between them."""
import torch.nn as nn

from cvtrain import UserError
from cvtrain.models.registry import register_model

ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
}


@register_model("mlp")
def mlp(in_shape, num_classes, hidden_sizes=(256,), activation="relu", dropout=0.0, batch_norm=False):
    if activation not in ACTIVATIONS:
        raise UserError(f"model.activation='{activation}' is unknown; choose one of {sorted(ACTIVATIONS)}")
    c, h, w = in_shape
    layers, width = [nn.Flatten()], c * h * w
    for hidden in hidden_sizes:
        layers.append(nn.Linear(width, hidden))
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(ACTIVATIONS[activation]())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
