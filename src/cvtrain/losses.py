"""Data losses (the `loss` config group) and the regularization loss (the `reg` group).

The multiclass SVM losses follow the course's definition,
    L_i = sum_{j != y_i} max(0, s_j - s_{y_i} + delta)        (squared: the terms squared),
averaged over the batch. torch.nn.MultiMarginLoss computes the same sum divided
by the number of classes C; at small weights our hinge loss is C - 1.
"""
import torch
import torch.nn as nn

from cvtrain import UserError


class MulticlassHingeLoss(nn.Module):
    def __init__(self, margin: float = 1.0, squared: bool = False):
        super().__init__()
        self.margin, self.squared = margin, squared

    def forward(self, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        correct = scores.gather(1, target[:, None])
        margins = (scores - correct + self.margin).clamp_min(0)
        margins = margins.scatter(1, target[:, None], 0.0)  # j != y_i
        if self.squared:
            margins = margins * margins
        return margins.sum(1).mean()


LOSSES = {
    "cross_entropy": nn.CrossEntropyLoss,  # softmax classifier; options: label_smoothing
    "hinge": MulticlassHingeLoss,  # multiclass SVM; options: margin
    "squared_hinge": lambda **kw: MulticlassHingeLoss(squared=True, **kw),
}


def build_loss(loss_cfg) -> nn.Module:
    options = {k: v for k, v in dict(loss_cfg).items() if k != "name"}
    if loss_cfg.name not in LOSSES:
        raise UserError(f"loss '{loss_cfg.name}' is unknown; choose one of {', '.join(LOSSES)}")
    return LOSSES[loss_cfg.name](**options)


class Regularizer:
    """reg.l2 * 0.5 * sum(w^2) + reg.l1 * sum(|w|) over the weight tensors (not biases or norm layers)."""

    def __init__(self, reg_cfg, model: nn.Module):
        self.l2, self.l1 = reg_cfg.l2, reg_cfg.l1
        self.weights = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]

    def __bool__(self) -> bool:
        return self.l2 > 0 or self.l1 > 0

    def __call__(self) -> torch.Tensor:
        total = torch.zeros((), device=self.weights[0].device) if self.weights else torch.zeros(())
        for w in self.weights:
            if self.l2 > 0:
                total = total + 0.5 * self.l2 * (w * w).sum()
            if self.l1 > 0:
                total = total + self.l1 * w.abs().sum()
        return total
