"""Weight initialization (model.init, model.bias_init) for any nn.Module.

    native        the architecture's published init: whatever its constructor does (the default). ResNet,
                  VGG, DenseNet, GoogLeNet as torchvision; AlexNet's ImageNet form PyTorch's layer defaults
                  (as torchvision), its small form He; NiN He; LeNet, MLP, linear PyTorch's layer defaults.
                  Each model file says which, in the function its constructor calls.
    zeros         all weights 0: every unit of a layer computes the same thing, so symmetry is never broken
    small_random  N(0, 0.01^2), the course's "small random numbers"
    xavier        Glorot normal, std = sqrt(2 / (fan_in + fan_out))
    kaiming       He normal, std = sqrt(2 / fan_in)
    sparse        90% of each column zero, the rest N(0, 0.01^2); conv weights as (out, in*kh*kw)

An explicit scheme (any but native) overrides the constructor: every Conv and Linear weight follows
the scheme, their biases become bias_init, and normalization layers (BatchNorm, GroupNorm, LayerNorm)
get weight 1, bias 0. With native, bias_init=0 keeps the constructor's biases; a nonzero bias_init
sets every Conv/Linear bias to it (say 0.01, to keep ReLUs alive) and nothing else changes.

The output layer, whatever the scheme. The final classifier layer (the last Conv/Linear the forward
pass calls: the FC of most networks, NiN's last 1x1 conv) gets bias 0, and its weight is scaled down,
never up, to a root-mean-square of at most OUTPUT_GAIN / sqrt(fan_in) = 0.1 / sqrt(fan_in): a tenth of
the variance-preserving (LeCun) scale. zeros stays zeros; a weight already that small is left as is.
Why: at initialization the scores should be about 0 for every class, so the softmax is uniform and the
first loss is ln C (2.30 for 10 classes), the course's first sanity check. Hidden-layer inits (He,
Xavier, PyTorch's) keep the activations O(1) from layer to layer; on the output layer they give scores
as large as the features, and the expected cross-entropy exceeds ln C by about half the scores'
variance (LeNet under He init started at 5.0 instead of 2.3): the first steps then only undo random
scores. With rms(w) <= 0.1 / sqrt(fan_in) the scores' std is at most 0.1 * rms(h) for the penultimate
features h, so the excess is about 0.005 * rms(h)^2: under 10% of ln C while rms(h) < 6. The bound
is relative to fan_in because ||h|| grows with the width (a fixed 0.01 gives ResNet-50's 2048 features
five times the scores of LeNet's 500). The small layer still learns from the first step: its own
gradient (p - y) h^T does not depend on its weights. The final layer is found by a shape-only forward
pass on the meta device (no compute, no memory) when the input shape is known, otherwise as the last
Conv/Linear registered in the model (the same layer for every model in the registry).
A model whose scores are the output layer's times a fixed factor (attribute `score_scale`: airbench's
1/9) has the bound on the product: the weight may be 1/score_scale times larger, so such a model keeps
its own output init when that already gives small scores (airbench's PyTorch-default FC times 1/9).
"""
import logging

import torch
import torch.nn as nn
from torch.func import functional_call

from cvtrain import UserError

log = logging.getLogger("cvtrain")

SCHEMES = {
    "zeros": nn.init.zeros_,
    "small_random": lambda w: nn.init.normal_(w, 0.0, 0.01),
    "xavier": nn.init.xavier_normal_,
    "kaiming": lambda w: nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu"),
    "sparse": lambda w: nn.init.sparse_(w.view(w.shape[0], -1), sparsity=0.9),
}
CHOICES = ["native", *SCHEMES]
WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
OUTPUT_GAIN = 0.1  # the output layer's weights start at rms <= OUTPUT_GAIN / sqrt(fan_in)


def final_layer(model: nn.Module, in_shape=None) -> nn.Module | None:
    """The last Conv/Linear module the forward pass calls on a (2, *in_shape) input; None if it has none.

    The pass runs on the meta device (shapes only) in eval mode. Without in_shape, or if the model
    cannot run on meta tensors, the last Conv/Linear in model.modules() order is taken instead.
    """
    layers = [m for m in model.modules() if isinstance(m, WEIGHTED)]
    if not layers:
        return None
    if in_shape is None:
        return layers[-1]
    called = []
    hooks = [m.register_forward_hook(lambda module, inputs, output: called.append(module)) for m in layers]
    meta = {name: torch.empty_like(t, device="meta")
            for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]}
    was_training = model.training
    try:
        model.eval()
        functional_call(model, meta, (torch.empty(2, *in_shape, device="meta"),))
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
        log.debug("shape-only pass failed (%s); taking the last registered Conv/Linear as the output layer", e)
        called = layers[-1:]
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return called[-1] if called else layers[-1]


def output_rms(layer: nn.Module, score_scale: float = 1.0) -> float:
    """The largest root-mean-square the output layer's weight starts with: OUTPUT_GAIN / sqrt(fan_in), divided
    by the fixed factor `score_scale` the model multiplies the layer's outputs by (see the module docstring)."""
    return OUTPUT_GAIN / layer.weight[0].numel() ** 0.5 / score_scale


@torch.no_grad()
def shrink_output_layer(layer: nn.Module, score_scale: float = 1.0) -> None:
    """Bias 0; the weight scaled down (never up) to a root-mean-square of at most output_rms(layer, score_scale)."""
    rms, current = output_rms(layer, score_scale), layer.weight.square().mean().sqrt().item()
    if current > rms:
        layer.weight.mul_(rms / current)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


@torch.no_grad()
def init_weights(model: nn.Module, scheme: str = "native", bias_init: float = 0.0, in_shape=None) -> None:
    """Initialize `model` in place with `scheme`, then apply the output-layer rule (see the module
    docstring); `in_shape` (C, H, W) lets a shape-only pass find the output layer."""
    if scheme not in CHOICES:
        raise UserError(f"model.init='{scheme}' is unknown; choose one of {', '.join(CHOICES)}")
    if scheme == "zeros":
        log.warning("model.init=zeros cannot break symmetry: every unit in a layer computes the same thing "
                    "and receives the same gradient, so the units never differ")
    explicit = scheme != "native"
    output = final_layer(model, in_shape)
    for module in model.modules():
        if isinstance(module, WEIGHTED):
            if explicit:
                SCHEMES[scheme](module.weight)
            if module.bias is not None and (explicit or bias_init):
                nn.init.constant_(module.bias, bias_init)
        elif isinstance(module, NORMS) and explicit:
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    if output is not None:
        shrink_output_layer(output, float(getattr(model, "score_scale", 1.0)))
