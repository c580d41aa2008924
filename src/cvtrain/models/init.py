"""Weight initialization schemes (model.init, model.bias_init) for any nn.Module.

    default       kaiming for ReLU-family networks; xavier when the only nonlinearities are sigmoid/tanh
    torch         PyTorch's own per-layer init, left untouched (bias_init too)
    zeros         all weights 0: every unit of a layer computes the same thing, so symmetry is never broken
    small_random  N(0, 0.01^2), the course's "small random numbers"
    xavier        Glorot normal, std = sqrt(2 / (fan_in + fan_out))
    kaiming       He normal, std = sqrt(2 / fan_in)
    sparse        90% of each column zero, the rest N(0, 0.01^2); conv weights as (out, in*kh*kw)

Conv and Linear weights follow the scheme and their biases become bias_init;
normalization layers (BatchNorm, GroupNorm, LayerNorm) get weight 1, bias 0.
"""
import logging

import torch
import torch.nn as nn

from cvtrain import UserError

log = logging.getLogger("cvtrain")

SCHEMES = {
    "zeros": nn.init.zeros_,
    "small_random": lambda w: nn.init.normal_(w, 0.0, 0.01),
    "xavier": nn.init.xavier_normal_,
    "kaiming": lambda w: nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu"),
    "sparse": lambda w: nn.init.sparse_(w.view(w.shape[0], -1), sparsity=0.9),
}
CHOICES = ["default", "torch", *SCHEMES]
WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
RELU_FAMILY = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.GELU, nn.SiLU)
SATURATING = (nn.Sigmoid, nn.Tanh)


def default_scheme(model: nn.Module) -> str:
    """'xavier' when the model's activation modules are only sigmoid/tanh, else 'kaiming'.

    Activations called functionally (F.relu) are invisible here; kaiming is the fallback for them.
    """
    kinds = [m for m in model.modules() if isinstance(m, RELU_FAMILY + SATURATING)]
    saturating_only = kinds and all(isinstance(m, SATURATING) for m in kinds)
    return "xavier" if saturating_only else "kaiming"


@torch.no_grad()
def init_weights(model: nn.Module, scheme: str = "default", bias_init: float = 0.0) -> None:
    """Initialize `model` in place with `scheme` (see the module docstring)."""
    if scheme not in CHOICES:
        raise UserError(f"model.init='{scheme}' is unknown; choose one of {', '.join(CHOICES)}")
    if scheme == "torch":
        if bias_init:
            log.warning("model.init=torch keeps PyTorch's own biases; model.bias_init=%s is ignored", bias_init)
        return
    if scheme == "default":
        scheme = default_scheme(model)
    if scheme == "zeros":
        log.warning("model.init=zeros cannot break symmetry: every unit in a layer computes the same thing "
                    "and receives the same gradient, so the units never differ")
    for module in model.modules():
        if isinstance(module, WEIGHTED):
            SCHEMES[scheme](module.weight)
            if module.bias is not None:
                nn.init.constant_(module.bias, bias_init)
        elif isinstance(module, NORMS):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
