"""Loss functions, chosen by the `loss` config group (`name` + its options)."""
import torch.nn as nn

from cvtrain import UserError


def build_loss(loss_cfg) -> nn.Module:
    kwargs = {k: v for k, v in dict(loss_cfg).items() if k != "name"}
    name = loss_cfg.name
    if name == "cross_entropy":
        return nn.CrossEntropyLoss(**kwargs)
    raise UserError(f"unknown loss '{name}'; available: cross_entropy")
