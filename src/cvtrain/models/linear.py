"""Linear classifier: the score function f(x) = W x + b on flattened pixels."""
import torch.nn as nn

from cvtrain.models.registry import register_model


@register_model("linear")
def linear(in_shape, num_classes):
    c, h, w = in_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, num_classes))
