"""LeNet-5, modern form, as in the lecture table.

conv 20@5x5 pad 2 -> ReLU -> maxpool 2 -> conv 50@5x5 pad 2 -> ReLU -> maxpool 2
-> FC 50*(H/4)*(W/4) -> 500 (2450 -> 500 on 28x28) -> ReLU -> FC 500 -> classes.
"""
import torch.nn as nn

from cvtrain import UserError
from cvtrain.models.registry import register_model


class LeNet5(nn.Module):
    def __init__(self, in_channels: int, height: int, width: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(50 * (height // 4) * (width // 4), 500),
            nn.ReLU(inplace=True),
            nn.Linear(500, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@register_model("lenet")
def lenet(in_shape, num_classes):
    c, h, w = in_shape
    if h < 4 or w < 4:
        raise UserError(f"LeNet needs images of at least 4x4 (two 2x2 poolings); got {h}x{w}. "
                        "Use model=mlp or model=linear for smaller inputs.")
    return LeNet5(c, h, w, num_classes)
