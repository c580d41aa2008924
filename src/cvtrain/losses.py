"""Data losses (the `loss` config group) and regularization (the `reg` group).

Every loss takes the raw class scores s (N, C) of any model and averages a
per-example loss L_i over the batch:

    cross_entropy   L_i = -log softmax(s_i)_{y_i}    (label_smoothing: torch's mixing with uniform targets)
    hinge           L_i = sum_{j != y_i} max(0, s_j - s_{y_i} + delta)      (multiclass SVM, delta = margin)
    squared_hinge   L_i = sum_{j != y_i} max(0, s_j - s_{y_i} + delta)^2
    mse             L_i = sum_j (s_j - 1[j = y_i])^2     (squared error to the one-hot target)

torch.nn.MultiMarginLoss computes the hinge sums divided by the number of classes C
(at small weights our hinge loss is C - 1), and torch.nn.MSELoss (mean over all
elements) is our mse divided by C: summing over classes keeps the loss of one
example independent of how the batch is averaged, like the hinge losses.

Regularization: a loss term 0.5 * l2 * sum(w^2) + l1 * sum(|w|) over the weight
tensors (l1 and l2 together: elastic net), a max-norm constraint applied after each
optimizer step, and clipping of the global gradient norm before it.
"""
import torch
import torch.nn as nn

from cvtrain import UserError
from cvtrain.config import check_arguments, named_choice
from cvtrain.checks import check_loss, check_types


class MulticlassHingeLoss(nn.Module):
    def __init__(self, margin: float, squared: bool = False):
        super().__init__()
        self.margin, self.squared = margin, squared

    def forward(self, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        correct = scores.gather(1, target[:, None])
        margins = (scores - correct + self.margin).clamp_min(0)
        margins = margins.scatter(1, target[:, None], 0.0)  # j != y_i
        if self.squared:
            margins = margins * margins
        return margins.sum(1).mean()


class SquaredHingeLoss(MulticlassHingeLoss):
    def __init__(self, margin: float):
        super().__init__(margin, squared=True)


class OneHotMSELoss(nn.Module):
    """Squared error between the scores and the one-hot targets: sum over classes, mean over the batch."""

    def forward(self, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        one_hot = nn.functional.one_hot(target, scores.shape[1]).to(scores.dtype)
        return (scores - one_hot).pow(2).sum(1).mean()


LOSSES = {
    "cross_entropy": nn.CrossEntropyLoss,  # softmax classifier; options: label_smoothing
    "hinge": MulticlassHingeLoss,  # multiclass SVM; options: margin
    "squared_hinge": SquaredHingeLoss,  # options: margin
    "mse": OneHotMSELoss,  # squared error to one-hot targets
}


def build_loss(loss_cfg) -> nn.Module:
    """LOSSES[loss.name](**the other loss keys)."""
    name, cls, options = named_choice("loss", loss_cfg, LOSSES)
    check_arguments("loss", name, cls, options, passed=("squared",))
    check_types("loss", name, options, cls)
    check_loss(name, options)
    return cls(**options)


class Regularizer:
    """The `reg` group on a model's weight tensors (dim > 1: linear rows, conv filters; not
    biases or normalization layers).

    ``regularizer()`` is the loss term reg.l2 * 0.5 * sum(w^2) + reg.l1 * sum(|w|) (truthy
    when there is one), ``clip_grad_()`` clips the global gradient norm of all parameters
    to reg.grad_clip before the optimizer step, ``project_()`` rescales each unit's incoming
    weights (each dim-0 slice w[k]) into the ball ||w[k]||_2 <= reg.max_norm after it.
    """

    def __init__(self, reg_cfg, model: nn.Module):
        self.l2, self.l1, self.max_norm, self.grad_clip = reg_cfg.l2, reg_cfg.l1, reg_cfg.max_norm, reg_cfg.grad_clip
        for name in ("l2", "l1", "max_norm", "grad_clip"):
            if getattr(self, name) < 0:
                raise UserError(f"reg.{name}={getattr(self, name)} must be >= 0 (0 turns it off)")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.weights = [p for p in self.params if p.dim() > 1]

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

    def clip_grad_(self) -> None:
        """Scale all gradients by min(1, grad_clip / ||g||) (||g||: the norm of all of them together)."""
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.params, self.grad_clip)

    @torch.no_grad()
    def project_(self) -> None:
        """w[k] <- w[k] * min(1, max_norm / ||w[k]||_2) for every unit k of every weight tensor."""
        if self.max_norm > 0:
            for w in self.weights:
                norms = w.flatten(1).norm(dim=1).clamp_min(1e-12)
                w.mul_((self.max_norm / norms).clamp(max=1).view(-1, *[1] * (w.dim() - 1)))
