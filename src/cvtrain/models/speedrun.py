"""The CIFAR-10 speedrun network of airbench94 (Keller Jordan 2024, "94% on CIFAR-10 in 3.29 seconds on a
single GPU", arXiv:2404.00498; github.com/KellerJordan/cifar10-airbench, airbench 0.1.8 lib_airbench94.py).

    whiten   conv k x k (k = 2), no padding, 2*C*k*k outputs (24 for RGB): FROZEN weights, the PCA
             whitening of the k x k patches of the training images (init_from_data), trainable bias
    act      GELU
    block1..block3 (widths 64, 256, 256), each:
             conv1 3x3 pad 1 no bias -> pool (max 2) -> bn1 -> act1 (GELU) -> conv2 3x3 -> bn2 -> act2
    pool     global max pool (airbench's MaxPool2d(3) on the 3x3 map of a 32x32 input; adaptive here,
             so any image size works), flatten
    fc       linear, no bias; scale: the scores times 1/9

1,972,792 parameters at the defaults on RGB, 1,971,352 of them trainable: airbench94's exact count. The
frozen ones are the whitening weights (288) and every BatchNorm weight (airbench's BatchNorm(weight=False):
the scale stays 1, only the shift learns). BatchNorm: eps 1e-12, torch momentum 0.4 (airbench writes 0.6
for the weight of the old running value: torch's momentum is 1 - that).

Whitening (init_from_data). For the k x k patches p (flattened C*k*k vectors, every position, stride 1) of
a batch of preprocessed training images, the uncentered second moment S = E[p p^T] = V diag(lambda) V^T
(airbench does not subtract the mean either: standardized images have mean about 0, and the whitening
bias learns what is left). Each output channel of the first half is v_i / sqrt(lambda_i + eps), the
largest lambda first; the second half is its negative, so that GELU(z) and GELU(-z) together keep all of
z. The whitened outputs z = V^T p / sqrt(lambda + eps) have E[z z^T] = diag(lambda / (lambda + eps)): the
identity wherever lambda >> eps. eps = model.whiten_eps = 5e-4 (airbench's), in the units of the
preprocessed pixels (standardized: variance 1), so directions with less than about 1/2000 of a pixel's
variance are damped rather than blown up. Until init_from_data is called the whitening is that of an
identity covariance (+-e_i / sqrt(1 + eps): each output a signed copy of one input pixel), so the model
trains without it, only worse. model.whiten_width below 2*C*k*k keeps the width/2 leading directions.

Layer names: whiten, act, block<n>.{conv1, pool, bn1, act1, conv2, bn2, act2}, pool, flatten, fc, scale.
The GELUs are separate modules (airbench shares one per block), so each has its own activation tag.

Initialization (model.init=native): airbench's, see native_init. The output-layer rule of models/init.py
bounds fc times the score scale (the model's `score_scale`, 1/9): fc may start at rms 9 * 0.1/sqrt(256) =
0.056, so PyTorch's default Linear init (rms 0.036) stays as in airbench, and the first loss is ln C as for
every model. An explicit model.init (kaiming: rms 0.088, shrunk to 0.056) also re-draws the whitening
weights; init_from_data sets them again.

The training recipe that goes with it (batch 1024, Nesterov SGD, 64x the lr on the BatchNorm biases,
label smoothing 0.2, lookahead, test-time flips and shifts) is the trainer's and the
experiment=cifar10_speedrun preset's; the whitening bias trains for model.whiten_bias_epochs (the preset: 3, airbench's)
and then freezes (its own param group, lr 0 from then on: optim.param_groups); the optimizer option for the bias lr is
optim.norm_and_bias_lr_scale (src/cvtrain/optim.py), and the whitening layer's bias keeps the base lr
(`keep_base_lr`, as in airbench, whose scaled group holds the BatchNorm biases only).
"""
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from cvtrain import UserError
from cvtrain.models.registry import register_model

BN_EPS = 1e-12  # airbench's BatchNorm eps
BN_MOMENTUM = 0.4  # torch convention (weight of the new batch statistics); airbench writes 1 - 0.4 = 0.6
SCORE_SCALE = 1 / 9  # airbench's fixed scale of the scores
PATCH_CHUNK = 1 << 18  # init_from_data: patches per float64 chunk of the second-moment sum (~26 MB for C*k*k=12)


class Scale(nn.Module):
    """x * factor (a fixed number, no parameter)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor:.6g}"


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """airbench's BatchNorm: eps 1e-12, momentum 0.4 (torch's sense), the weight frozen at 1, the bias trained."""
    bn = nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)
    bn.weight.requires_grad_(False)
    return bn


class ConvGroup(nn.Module):
    """conv1 3x3 -> max-pool 2 -> bn1 -> GELU -> conv2 3x3 -> bn2 -> GELU (airbench's ConvGroup)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = batch_norm(out_channels)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = batch_norm(out_channels)
        self.act2 = nn.GELU()

    def forward(self, x):
        x = self.act1(self.bn1(self.pool(self.conv1(x))))
        return self.act2(self.bn2(self.conv2(x)))


@torch.no_grad()
def dirac_conv_init(conv: nn.Conv2d) -> None:
    """airbench's Conv.reset_parameters: PyTorch's default draw (the layer's own), bias 0, and the first
    in_channels filters the identity (dirac: 1 at the kernel centre of their own input channel). A conv
    with as many outputs as inputs (every conv2, and block3's conv1) thus starts as an exact identity."""
    conv.reset_parameters()
    if conv.bias is not None:
        conv.bias.zero_()
    nn.init.dirac_(conv.weight[:conv.in_channels])


def native_init(model: "AirbenchNet") -> None:
    """model.init=native, airbench94's: every conv by dirac_conv_init (whose draw and identity filters the
    whitening weights then replace: identity-covariance whitening until init_from_data), BatchNorm weight 1
    (frozen) and bias 0, fc PyTorch's default Linear init (within the output-layer rule's bound on fc x 1/9)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            dirac_conv_init(module)
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_parameters()
    model.reset_whitening()


class AirbenchNet(nn.Sequential):
    """whiten, act, block1..blockN, pool, flatten, fc, scale; see the module docstring."""

    def __init__(self, in_channels: int, num_classes: int, widths, whiten_kernel_size: int, whiten_width: int,
                 whiten_eps: float, whiten_bias_epochs: int | None = None):
        layers = OrderedDict([
            ("whiten", nn.Conv2d(in_channels, whiten_width, kernel_size=whiten_kernel_size, padding=0, bias=True)),
            ("act", nn.GELU()),
        ])
        channels = whiten_width
        for i, width in enumerate(widths, 1):
            layers[f"block{i}"] = ConvGroup(channels, width)
            channels = width
        layers.update([("pool", nn.AdaptiveMaxPool2d(1)), ("flatten", nn.Flatten()),
                       ("fc", nn.Linear(channels, num_classes, bias=False)), ("scale", Scale(SCORE_SCALE))])
        super().__init__(layers)
        self.score_scale = SCORE_SCALE  # the output-layer rule of models/init.py bounds fc times this
        self.whiten_eps = whiten_eps
        self.whiten.weight.requires_grad_(False)  # frozen: set from the data, never trained
        self.whiten.keep_base_lr = True  # optim.norm_and_bias_lr_scale leaves its bias at the base lr (airbench)
        if whiten_bias_epochs is not None:  # optim.param_groups: its bias frozen (lr 0) after that many epochs
            self.whiten.train_for_epochs = whiten_bias_epochs
        native_init(self)

    @torch.no_grad()
    def reset_whitening(self) -> None:
        """The whitening of an identity patch covariance: output i and i + width/2 are +-e_i / sqrt(1 + eps)."""
        weight = self.whiten.weight
        half, dim = weight.shape[0] // 2, weight[0].numel()
        basis = torch.eye(dim, device=weight.device, dtype=weight.dtype)[:half] / (1.0 + self.whiten_eps) ** 0.5
        weight.copy_(torch.cat([basis, -basis]).view_as(weight))

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """Set the frozen whitening weights from the k x k patches of `x` (see the module docstring).

        x: (N, C, H, W), N >= 1, floating point, training images after the run's preprocessing (the model's
        input as the trainer feeds it, without augmentation; airbench takes the first 5,000), on any device
        (the model's is fastest). The second moment is summed in float64 by chunks, the eigendecomposition
        runs in float64 on the CPU; the weights keep their dtype and device. The bias and every other
        parameter are left as they are. Deterministic: each eigenvector's sign is fixed (its largest entry
        positive)."""
        weight = self.whiten.weight
        c, k = weight.shape[1], weight.shape[-1]
        if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != c or not x.is_floating_point():
            got = f"{tuple(x.shape)} {x.dtype}" if torch.is_tensor(x) else type(x).__name__
            raise UserError(f"init_from_data needs a float batch (N, {c}, H, W) of preprocessed training images; "
                            f"got {got}")
        n, _, h, w = x.shape
        if n < 1 or h < k or w < k:
            raise UserError(f"init_from_data needs at least one image of at least {k}x{k}; got {tuple(x.shape)}")
        device = x.device if x.device.type in ("cpu", "cuda") else torch.device("cpu")  # float64 support
        dim = c * k * k
        moment = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        per_image = (h - k + 1) * (w - k + 1)
        step = max(1, PATCH_CHUNK // per_image)
        for start in range(0, n, step):
            chunk = x[start:start + step].to(device=device, dtype=torch.float64)
            patches = F.unfold(chunk, kernel_size=k).transpose(1, 2).reshape(-1, dim)  # (C, kh, kw) order
            moment += patches.T @ patches
        moment = (moment / (n * per_image)).cpu()
        if not torch.isfinite(moment).all():
            raise UserError("init_from_data: the images hold NaN or infinite values")
        eigenvalues, eigenvectors = torch.linalg.eigh(moment)  # ascending
        eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0.0), eigenvectors.flip(1)
        signs = torch.sign(eigenvectors.gather(0, eigenvectors.abs().argmax(0, keepdim=True)))
        eigenvectors = eigenvectors * signs
        half = weight.shape[0] // 2
        filters = (eigenvectors[:, :half] / torch.sqrt(eigenvalues[:half] + self.whiten_eps)).T
        weight.copy_(torch.cat([filters, -filters]).view_as(weight).to(weight))


def _positive_int(value, key: str, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"model.{key}={value!r}: {hint}")


@register_model("airbench")
def airbench(in_shape, num_classes, widths=(64, 256, 256), whiten_kernel_size: int = 2, whiten_width=None,
             whiten_eps: float = 5e-4, whiten_bias_epochs=None):
    """airbench94's network; whiten_width None: 2 * C * k * k (every eigenvector with both signs);
    whiten_bias_epochs N: the whitening bias trains for the first N epochs only (None: throughout)."""
    c, h, w = in_shape
    if not isinstance(widths, (list, tuple)) or not widths:
        raise UserError(f"model.widths={widths!r}: the blocks' channel counts, a nonempty list (like [64,256,256])")
    for width in widths:
        _positive_int(width, "widths", "the blocks' channel counts must be integers >= 1 (like [64,256,256])")
    _positive_int(whiten_kernel_size, "whiten_kernel_size", "the whitening patch side, an integer >= 1 (like 2)")
    full = 2 * c * whiten_kernel_size ** 2
    if whiten_width is None:
        whiten_width = full
    _positive_int(whiten_width, "whiten_width", f"an even integer from 2 to {full}, or null for {full}")
    if whiten_width % 2 or whiten_width > full:
        raise UserError(f"model.whiten_width={whiten_width}: the whitening layer has two filters (+v, -v) per "
                        f"direction of the {c}*{whiten_kernel_size}*{whiten_kernel_size}-pixel patches: an even "
                        f"number up to {full}, or null for {full}")
    if isinstance(whiten_eps, bool) or not isinstance(whiten_eps, (int, float)) or not whiten_eps > 0:
        raise UserError(f"model.whiten_eps={whiten_eps!r}: added to the patch eigenvalues, a positive number "
                        "(like 5e-4)")
    if whiten_bias_epochs is not None:
        _positive_int(whiten_bias_epochs, "whiten_bias_epochs", "the epochs the whitening bias trains before it "
                      "freezes, an integer >= 1 (airbench: 3), or null to train it throughout")
    need = 2 ** len(widths) + whiten_kernel_size - 1  # each block halves the whitened map
    if min(h, w) < need:
        raise UserError(f"airbench with {len(widths)} blocks and {whiten_kernel_size}x{whiten_kernel_size} "
                        f"whitening needs images of at least {need}x{need}; got {h}x{w}. Use model=mlp or "
                        "model=linear for smaller inputs.")
    return AirbenchNet(c, num_classes, list(widths), whiten_kernel_size, whiten_width, float(whiten_eps),
                       whiten_bias_epochs)
