"""Batched data augmentation (`aug=`): tensor ops on a whole float batch (B, C, H, W) on its device.

Every dataset cvtrain reads lives in memory, so a batch is augmented at once on the
training device, with no per-sample PIL work. Per-sample random numbers are drawn on
the CPU from a seeded torch.Generator (the loader's, seeded with (trainer.seed, epoch))
and moved to the device, so an epoch's augmentation is the same whenever it is
replayed (reproducible runs, exact resume). A future streamed dataset (decoded image
by image) would use torchvision.transforms.v2 instead, with the same aug fields.

BatchAugment runs on pixels in [0, 1] before preprocessing, in this order:

    crop_padding                pad (crop_padding_mode: zeros, or reflect: mirrored border) and cut
                                a random window (exact integer shifts)
    resized_crop, rotation_degrees, translate, shear_degrees, stretch
                                one affine warp: per-sample matrices, one F.affine_grid +
                                F.grid_sample (bilinear, 0 outside the image)
    hflip, vflip                exact mirrors, each with probability 1/2; with alternate_flips
                                (airbench's "altflip") the loader decides hflip instead: a random
                                half of the images mirrored in the first epoch, the other half in
                                the next, and so on (see alternate_flips)
    brightness, contrast, saturation, hue
                                color jitter, per sample, in that order (as torchvision's
                                ColorJitter with factors in [1 - a, 1 + a], hue as a rotation
                                of the chroma plane in YIQ space by up to hue * 360 degrees)
    grayscale_p                 luma (ITU-R 601) in all three channels
    pca_color_std               AlexNet's "fancy PCA" lighting noise (see pca_color)
    erasing_p                   random erasing / cutout: a rectangle of the batch's mean color

Saturation, hue, grayscale and PCA color need RGB and are skipped on 1-channel images;
brightness and contrast apply to any image. Every op clamps to [0, 1].

BatchMix (mixup_alpha, cutmix_alpha) changes the targets too, so it runs in the training
loop on the model's input batch: it returns (x, y_a, y_b, lam) and the loss is
lam * loss(out, y_a) + (1 - lam) * loss(out, y_b), which works with every loss.
soft_targets() gives the same as a label distribution.
"""
import logging
import math
import random

import torch
import torch.nn.functional as F

from cvtrain import UserError
from cvtrain.data.loader import epoch_seed

log = logging.getLogger("cvtrain")

# RGB -> luma (ITU-R 601, as torchvision's rgb_to_grayscale) and RGB -> YIQ
LUMA = (0.299, 0.587, 0.114)
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
MIX_SEED_OFFSET = 1 << 40  # mix generators never share a seed with the loader's (data.loader.epoch_seed)
FLIP_SEED_OFFSET = 1 << 41  # nor does the draw of alternate_flips' first epoch


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def _on(x: torch.Tensor, values: torch.Tensor, dtype=None) -> torch.Tensor:
    """CPU draws on x's device (and `dtype`), copied without blocking: on CUDA the loop does not wait
    for the GPU to finish its queued work (a blocking copy would synchronise with it every batch)."""
    return values.to(x.device, dtype or values.dtype, non_blocking=True)


def _per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) CPU values -> (B, 1, 1, 1) on x's device and dtype."""
    return _on(x, values, x.dtype).view(-1, 1, 1, 1)


# --- geometry --------------------------------------------------------------------------

CROP_PADDING_MODES = ("zeros", "reflect")


def _coins(n: int, gen: torch.Generator) -> torch.Tensor:
    """(n,) bool CPU draws, each True with probability 1/2 (which images a flip mirrors)."""
    return torch.rand(n, generator=gen) < 0.5


def _crop_offsets(n: int, padding: int, gen: torch.Generator) -> torch.Tensor:
    """(2, n) CPU draws: each image's window corner (dy, dx) in its padded copy, uniform in [0, 2 * padding]."""
    return torch.randint(0, 2 * padding + 1, (2, n), generator=gen)


def alternate_flips(seed: int, n: int, epoch: int) -> torch.Tensor:
    """aug.alternate_flips: which of the `n` images of a training split are mirrored in epoch `epoch`,
    (n,) bool on the CPU. Epoch 0 mirrors a random half (drawn from `seed` alone: the same on every
    process and after a resume), and each later epoch mirrors exactly the images the epoch before did
    not. Every two epochs show each image both ways; with random flips half of the images are seen the
    same way in two epochs in a row (Jordan 2024, airbench's "alternating flip")."""
    first = _coins(n, torch.Generator().manual_seed(seed + FLIP_SEED_OFFSET))
    return first ^ bool(epoch % 2)


def _flip_some(x: torch.Tensor, flip: torch.Tensor, dim: int) -> torch.Tensor:
    """x with the images where `flip` (a (B,) bool CPU tensor) is True mirrored along `dim`: only
    those are flipped, the others are copied as they are (a new tensor; x is left alone)."""
    chosen = _on(x, flip.nonzero().squeeze(1))
    return x.index_copy(0, chosen, x.index_select(0, chosen).flip(dim))


def random_hflip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return _flip_some(x, _coins(len(x), gen), 3)


def random_vflip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return _flip_some(x, _coins(len(x), gen), 2)


def _crop(x: torch.Tensor, padding: int, mode: str, offsets: torch.Tensor, flip: torch.Tensor = None) -> torch.Tensor:
    """Window `offsets` (dy, dx per image, (2, B) on the CPU) of each image padded by `padding`
    (mode zeros or reflect), mirrored left-right where `flip` ((B,) bool on the CPU) is True.

    One gather of whole rows, with no per-image work: the padded images (and, after them, mirrors
    of the padded images to flip) lie in one buffer, a strided view of it holds every run of w
    consecutive values as a row, and index_select picks each output row (image, channel, line) by
    the flat position of its first value. A mirrored window of a padded image is the window at the
    mirrored column of its mirror, so crop + flip is the same single gather."""
    b, c, h, w = x.shape
    if x.numel() == 0:
        return x.clone()
    p = padding
    hp, wp = h + 2 * p, w + 2 * p
    chosen = flip.nonzero().squeeze(1) if flip is not None else torch.zeros(0, dtype=torch.long)
    nf = len(chosen)
    chosen_dev = _on(x, chosen)
    if mode == "zeros":
        buf = x.new_zeros(b + nf, c, hp, wp)
        buf[:b, :, p:p + h, p:p + w] = x
        if nf:
            buf[b:, :, p:p + h, p:p + w] = x.index_select(0, chosen_dev).flip(3)
    else:  # reflect
        if p >= h or p >= w:
            raise UserError(f"aug.crop_padding={p} with aug.crop_padding_mode={mode} must be smaller than "
                            f"the image's height and width ({h}x{w})")
        padded = F.pad(x, (p,) * 4, mode=mode).contiguous()  # contiguous: a channels-last input stays flat
        buf = torch.cat([padded, padded.index_select(0, chosen_dev).flip(3)]) if nf else padded
    dy, dx = offsets
    slot = torch.arange(b)  # where each image's source lies in buf: itself, or its mirror
    col = dx.clone()
    if nf:
        slot[chosen] = torch.arange(b, b + nf)
        col[chosen] = 2 * p - dx[chosen]
    first = _on(x, slot * (c * hp * wp) + dy * wp + col)  # B: the window's first value
    lines = (torch.arange(c, device=x.device)[:, None] * (hp * wp)
             + torch.arange(h, device=x.device)[None, :] * wp).flatten()  # C*H: each line's offset in an image
    flat = buf.view(-1)
    runs = flat.as_strided((flat.numel() - w + 1, w), (1, 1))  # row k: flat[k:k + w]
    return runs.index_select(0, (first[:, None] + lines).flatten()).view(b, c, h, w)


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator, mode: str = "zeros") -> torch.Tensor:
    """Pad by `padding` (mode "zeros", or "reflect": mirror the border pixels) and cut a random window
    of the original size from each image (corner uniform in [0, 2 * padding] on each axis)."""
    if mode not in CROP_PADDING_MODES:
        raise UserError(f"aug.crop_padding_mode={mode} must be one of: {', '.join(CROP_PADDING_MODES)}")
    return _crop(x, padding, mode, _crop_offsets(len(x), padding, gen))


def random_affine(x: torch.Tensor, gen: torch.Generator, degrees: float = 0.0, translate: float = 0.0,
                  shear: float = 0.0, stretch=(1.0, 1.0), crop_scale=None, crop_ratio=None):
    """One bilinear warp per image, all in one F.affine_grid + F.grid_sample call.

    With `crop_scale` (min, max area fraction), a random resized crop comes first: a window
    of that area and aspect ratio in `crop_ratio` (min, max width/height, log-uniform; required
    with crop_scale), inside the image (its sides
    clamped to the image's), scaled to the full size. The crop is then rotated by up to
    +-`degrees`, sheared parallel to x by up to +-`shear` degrees, stretched by independent
    factors in `stretch` along x and y, and shifted by up to +-`translate` of the size.
    Everything is about the image center, in pixel units (no skew on non-square images);
    outside the image is 0, and a window inside it has no dark rim (the edge pixels extend over
    the half-pixel rim past the outer pixel centers).
    """
    b, _, h, w = x.shape
    angle = torch.deg2rad(_uniform(b, -degrees, degrees, gen))
    shear_t = torch.tan(torch.deg2rad(_uniform(b, -shear, shear, gen)))
    sx, sy = _uniform(b, *stretch, gen), _uniform(b, *stretch, gen)
    tx, ty = _uniform(b, -translate, translate, gen) * w, _uniform(b, -translate, translate, gen) * h
    # forward map of centered pixel coordinates: translate @ rotate @ shear @ stretch
    cos, sin = angle.cos(), angle.sin()
    fwd = torch.zeros(b, 3, 3)
    fwd[:, 0, 0], fwd[:, 0, 1], fwd[:, 0, 2] = cos * sx, (cos * shear_t - sin) * sy, tx
    fwd[:, 1, 0], fwd[:, 1, 1], fwd[:, 1, 2] = sin * sx, (sin * shear_t + cos) * sy, ty
    fwd[:, 2, 2] = 1
    to_norm = torch.diag(torch.tensor([2 / w, 2 / h, 1.0]))  # centered pixels -> grid_sample's [-1, 1]
    theta = to_norm @ torch.linalg.inv(fwd) @ torch.linalg.inv(to_norm)  # output -> input coordinates
    if crop_scale is not None:
        area = _uniform(b, *crop_scale, gen)
        ratio = _uniform(b, math.log(crop_ratio[0]), math.log(crop_ratio[1]), gen).exp()
        fw = (area * ratio * h / w).sqrt().clamp(max=1.0)  # window sides as fractions of the image's
        fh = (area / ratio * w / h).sqrt().clamp(max=1.0)
        cx, cy = (2 * torch.rand(b, generator=gen) - 1) * (1 - fw), (2 * torch.rand(b, generator=gen) - 1) * (1 - fh)
        crop = torch.zeros(b, 3, 3)
        crop[:, 0, 0], crop[:, 0, 2], crop[:, 1, 1], crop[:, 1, 2], crop[:, 2, 2] = fw, cx, fh, cy, 1
        theta = crop @ theta
    grid = F.affine_grid(_on(x, theta[:, :2], x.dtype), list(x.shape), align_corners=False)
    # Points inside the image but past its outer pixel centers (a half-pixel rim) take the edge pixels
    # (padding "zeros" would blend them with black: a dark rim on every crop touching the border);
    # points outside the image are 0.
    inside = (grid.abs() <= 1).all(3, keepdim=True).movedim(3, 1)  # B, 1, H, W
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return warped * inside


# --- color -----------------------------------------------------------------------------

def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma of RGB images; the image itself when it has one channel."""
    if x.shape[1] != 3:
        return x.mean(1, keepdim=True)
    r, g, b = x.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * x + (1 - factor) * other).clamp(0, 1)


def color_jitter(x: torch.Tensor, gen: torch.Generator, brightness: float = 0.0, contrast: float = 0.0,
                 saturation: float = 0.0, hue: float = 0.0) -> torch.Tensor:
    """Per-sample brightness, contrast, saturation (factors in [max(0, 1 - a), 1 + a]) and hue
    (a shift in [-hue, hue] of a full turn, hue <= 0.5), in that order, as torchvision's ColorJitter
    with a fixed order. Brightness scales the pixels, contrast blends with the image's mean luma,
    saturation with its luma, hue rotates the I/Q chroma plane of YIQ (close to an HSV hue shift).
    Saturation and hue need RGB and leave other images alone."""
    b = len(x)

    def factors(amount):
        return _per_sample(_uniform(b, max(0.0, 1 - amount), 1 + amount, gen), x)

    rgb = x.shape[1] == 3
    if brightness > 0:
        x = (x * factors(brightness)).clamp(0, 1)
    if contrast > 0:
        x = _blend(x, _gray(x).mean((1, 2, 3), keepdim=True), factors(contrast))
    if saturation > 0 and rgb:
        x = _blend(x, _gray(x), factors(saturation))
    if hue > 0 and rgb:
        angle = 2 * math.pi * _uniform(b, -hue, hue, gen)
        rot = torch.zeros(b, 3, 3)
        rot[:, 0, 0], rot[:, 1, 1], rot[:, 2, 2] = 1, angle.cos(), angle.cos()
        rot[:, 1, 2], rot[:, 2, 1] = -angle.sin(), angle.sin()
        matrix = _on(x, torch.linalg.inv(_YIQ) @ rot @ _YIQ, x.dtype)  # B, 3, 3
        x = torch.einsum("bij,bjhw->bihw", matrix, x).clamp(0, 1)
    return x


def random_grayscale(x: torch.Tensor, gen: torch.Generator, p: float) -> torch.Tensor:
    """Each RGB image becomes its luma (in all three channels) with probability p."""
    chosen = _per_sample(torch.rand(len(x), generator=gen) < p, x).bool()
    if x.shape[1] != 3:
        return x
    return torch.where(chosen, _gray(x).expand_as(x), x)


def rgb_pca(images: torch.Tensor, chunk: int = 10_000):
    """(eigenvalues (3,), eigenvectors (3, 3) as columns) of the covariance of RGB pixel values
    on [0, 1], over all pixels of `images` (N, 3, H, W): uint8 (a whole split, in chunks, on CPU)
    or float on [0, 1] (a batch, on its device). Accumulated in float64."""
    total = torch.zeros(3, dtype=torch.float64, device=images.device)
    outer = torch.zeros(3, 3, dtype=torch.float64, device=images.device)
    for i in range(0, len(images), chunk):
        part = images[i:i + chunk].double()
        if images.dtype == torch.uint8:
            part = part / 255
        pixels = part.transpose(0, 1).reshape(3, -1)
        total += pixels.sum(1)
        outer += pixels @ pixels.T
    n = images.numel() / 3
    mean = total / n
    cov = outer / n - torch.outer(mean, mean)
    eigval, eigvec = torch.linalg.eigh(cov)
    return eigval.clamp_min(0).float(), eigvec.float()


def pca_color(x: torch.Tensor, gen: torch.Generator, std: float, eig=None) -> torch.Tensor:
    """AlexNet's "fancy PCA" (Krizhevsky et al. 2012, sec. 4.1): add sum_k alpha_k lambda_k p_k to
    every pixel of an image, alpha_k ~ N(0, std) drawn per image, (lambda_k, p_k) the eigenvalues
    and eigenvectors of the RGB covariance (pixels on [0, 1], as fb.resnet.torch's Lighting).

    `eig` = rgb_pca(training images) gives the paper's training-set statistics; without it they
    come from the batch itself (B*H*W pixels: a stable 3x3 estimate, with no state to carry
    across batches, so a resumed run replays exactly). 1-channel images are left alone."""
    alpha = torch.randn(len(x), 3, generator=gen) * std
    if x.shape[1] != 3:
        return x
    eigval, eigvec = eig if eig is not None else rgb_pca(x)
    shift = (_on(x, alpha) * eigval.to(x.device)) @ eigvec.to(x.device).T  # B, 3
    return (x + shift.to(x.dtype)[:, :, None, None]).clamp(0, 1)


# --- erasing ---------------------------------------------------------------------------

def random_erasing(x: torch.Tensor, gen: torch.Generator, p: float, scale, ratio, value=None) -> torch.Tensor:
    """Random erasing (Zhong et al. 2020) / cutout (DeVries & Taylor 2017): with probability p,
    a rectangle of `scale` of the image area and aspect ratio (h/w) in `ratio` (log-uniform),
    sides clamped to the image, at a uniform position, is filled with `value` (default: the
    batch's per-channel mean color, which preprocessing maps to about 0, as cutout does)."""
    b, c, h, w = x.shape
    chosen = torch.rand(b, generator=gen) < p
    area = _uniform(b, *scale, gen) * h * w
    aspect = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), gen).exp()
    eh = (area * aspect).sqrt().round().clamp(1, h)
    ew = (area / aspect).sqrt().round().clamp(1, w)
    top = (torch.rand(b, generator=gen) * (h - eh + 1)).floor()
    left = (torch.rand(b, generator=gen) * (w - ew + 1)).floor()
    box = _on(x, torch.stack([top, top + eh, left, left + ew, chosen.float()], 1))  # one transfer
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_rows = (rows >= box[:, 0:1]) & (rows < box[:, 1:2])  # B, H
    in_cols = (cols >= box[:, 2:3]) & (cols < box[:, 3:4])  # B, W
    mask = (in_rows[:, None, :, None] & in_cols[:, None, None, :]) & (box[:, 4] > 0)[:, None, None, None]
    fill = x.mean((0, 2, 3), keepdim=True) if value is None else torch.as_tensor(value, dtype=x.dtype,
                                                                                 device=x.device)
    return torch.where(mask, fill, x)


# --- mixup / cutmix ----------------------------------------------------------------------

def _beta(alpha: float, gen: torch.Generator) -> float:
    """A Beta(alpha, alpha) draw, seeded from `gen` (torch's Beta sampler takes no generator)."""
    return random.Random(int(torch.randint(0, 2**62, (1,), generator=gen))).betavariate(alpha, alpha)


def mixup(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, alpha: float):
    """Mixup (Zhang et al. 2018): x_i <- lam x_i + (1 - lam) x_perm(i), lam ~ Beta(alpha, alpha)
    for the batch, perm a random permutation. Returns (x, y, y[perm], lam)."""
    lam = _beta(alpha, gen)
    perm = _on(x, torch.randperm(len(x), generator=gen))
    return lam * x + (1 - lam) * x[perm], y, y[perm], lam


def cutmix(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, alpha: float):
    """CutMix (Yun et al. 2019): one box per batch, of area (1 - lam) with lam ~ Beta(alpha, alpha),
    centered uniformly and clipped to the image, is pasted from x[perm] into x. lam becomes the
    fraction of each image left unpasted. Returns (x, y, y[perm], lam)."""
    b, _, h, w = x.shape
    lam = _beta(alpha, gen)
    perm = _on(x, torch.randperm(b, generator=gen))
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = int(torch.randint(0, h, (1,), generator=gen)), int(torch.randint(0, w, (1,), generator=gen))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    x = x.clone()
    x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    return x, y, y[perm], 1 - (y1 - y0) * (x1 - x0) / (h * w)


def soft_targets(y_a: torch.Tensor, y_b: torch.Tensor, lam: float, num_classes: int) -> torch.Tensor:
    """The mixed labels as a distribution: lam * onehot(y_a) + (1 - lam) * onehot(y_b); rows sum to 1."""
    return lam * F.one_hot(y_a, num_classes).float() + (1 - lam) * F.one_hot(y_b, num_classes).float()


def mix_generator(seed: int, step: int) -> torch.Generator:
    """The generator of the mixing from training step `step` on (a resumed run replays it): the
    loader's seed formula with the step for the epoch, offset by MIX_SEED_OFFSET."""
    return torch.Generator().manual_seed(MIX_SEED_OFFSET + epoch_seed(seed, step))


class BatchMix:
    """aug.mixup_alpha / aug.cutmix_alpha (0 = off) as a callable (x, y, gen) -> (x, y_a, y_b, lam).

    y_a is y itself (each image keeps its own label as the main one, so training accuracy counts
    against y), y_b the labels of the images mixed in. With both alphas set, each batch is
    mixed by one of the two, chosen with probability 1/2 (as timm's Mixup)."""

    def __init__(self, aug_cfg):
        _check(aug_cfg)
        self.mixup_alpha, self.cutmix_alpha = float(aug_cfg.mixup_alpha), float(aug_cfg.cutmix_alpha)

    def __bool__(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
        use_cutmix = self.cutmix_alpha > 0
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(torch.rand(1, generator=gen) < 0.5)
        if use_cutmix:
            return cutmix(x, y, gen, self.cutmix_alpha)
        if self.mixup_alpha > 0:
            return mixup(x, y, gen, self.mixup_alpha)
        return x, y, y, 1.0


# --- the aug group ---------------------------------------------------------------------------

def _check(aug_cfg) -> None:
    """Raise UserError on values no op can use, naming the key."""
    def value(key):
        return getattr(aug_cfg, key)

    def bad(key, why):
        raise UserError(f"aug.{key}={value(key)} {why}")

    if aug_cfg.crop_padding < 0:
        bad("crop_padding", "must be >= 0")
    if getattr(aug_cfg, "crop_padding_mode", "zeros") not in CROP_PADDING_MODES:
        bad("crop_padding_mode", f"must be one of: {', '.join(CROP_PADDING_MODES)} (how the crop pads the image)")
    for key in ("brightness", "contrast", "saturation", "rotation_degrees", "shear_degrees", "pca_color_std",
                "mixup_alpha", "cutmix_alpha"):
        if value(key) < 0:
            bad(key, "must be >= 0 (0 turns it off)")
    if getattr(aug_cfg, "alternate_flips", False) and not aug_cfg.hflip:
        bad("alternate_flips", "alternates the horizontal flips: it needs aug.hflip=true")
    if not 0 <= aug_cfg.hue <= 0.5:
        bad("hue", "must be in [0, 0.5] (a fraction of a full turn of hue)")
    if not 0 <= aug_cfg.translate < 1:
        bad("translate", "must be in [0, 1) (a fraction of the image size)")
    for key in ("grayscale_p", "erasing_p"):
        if not 0 <= value(key) <= 1:
            bad(key, "must be a probability in [0, 1]")
    ranges = {"resized_crop_scale": (0, 1), "resized_crop_ratio": (0, None), "stretch": (0, None),
              "erasing_scale": (0, 1), "erasing_ratio": (0, None)}
    for key, (low, high) in ranges.items():
        pair = list(value(key))
        if len(pair) != 2 or not low < pair[0] <= pair[1] or (high is not None and pair[1] > high):
            bad(key, f"must be [min, max] with {low} < min <= max" + (f" <= {high}" if high else ""))


class BatchAugment:
    """The `aug` config group's per-image ops as a callable on float batches in [0, 1] (see the
    module docstring for the order). Falsy when it would change nothing (the loader skips it);
    mixup/cutmix are BatchMix's. pca_color_std uses each batch's own RGB covariance."""

    def __init__(self, aug_cfg):
        _check(aug_cfg)
        self.cfg = aug_cfg
        self.crop_mode = getattr(aug_cfg, "crop_padding_mode", "zeros")
        self.affine = aug_cfg.resized_crop or aug_cfg.rotation_degrees > 0 or aug_cfg.translate > 0 or \
            aug_cfg.shear_degrees > 0 or list(aug_cfg.stretch) != [1, 1]
        self.jitter = any(getattr(aug_cfg, k) > 0 for k in ("brightness", "contrast", "saturation", "hue"))
        # the loader passes each batch's hflip decisions (alternate_flips(seed, n, epoch)[batch's images])
        self.alternate_flips = bool(aug_cfg.hflip and getattr(aug_cfg, "alternate_flips", False))
        self._warned = False

    def __bool__(self) -> bool:
        c = self.cfg
        return bool(c.hflip or c.vflip or c.crop_padding > 0 or self.affine or self.jitter or c.grayscale_p > 0
                    or c.pca_color_std > 0 or c.erasing_p > 0)

    def epoch_flips(self, seed: int, n: int, epoch: int) -> torch.Tensor | None:
        """With alternate_flips, the (n,) hflip decisions of epoch `epoch` for the images of an n-image
        training split (the loader indexes them with each batch's images); otherwise None."""
        return alternate_flips(seed, n, epoch) if self.alternate_flips else None

    def __call__(self, x: torch.Tensor, gen: torch.Generator, hflip: torch.Tensor = None) -> torch.Tensor:
        """`hflip`: (B,) bool on the CPU, the images to mirror (alternate_flips); None: drawn from `gen`."""
        c = self.cfg
        hflip_done = False

        def flips():
            return hflip if hflip is not None else _coins(len(x), gen)
        if c.crop_padding > 0:
            offsets = _crop_offsets(len(x), c.crop_padding, gen)
            # with no warp in between, the flip joins the crop's gather (the same draws, in the same order)
            flip = flips() if c.hflip and not self.affine else None
            x = _crop(x, c.crop_padding, self.crop_mode, offsets, flip)
            hflip_done = flip is not None
        if self.affine:
            x = random_affine(x, gen, c.rotation_degrees, c.translate, c.shear_degrees, tuple(c.stretch),
                              tuple(c.resized_crop_scale) if c.resized_crop else None, tuple(c.resized_crop_ratio))
        if c.hflip and not hflip_done:
            x = _flip_some(x, flips(), 3)
        if c.vflip:
            x = random_vflip(x, gen)
        if x.shape[1] != 3 and not self._warned and (
                c.saturation > 0 or c.hue > 0 or c.grayscale_p > 0 or c.pca_color_std > 0):
            log.warning("aug: saturation, hue, grayscale_p and pca_color_std need RGB images; "
                        "skipped on these %d-channel images", x.shape[1])
            self._warned = True
        if self.jitter:
            x = color_jitter(x, gen, c.brightness, c.contrast, c.saturation, c.hue)
        if c.grayscale_p > 0:
            x = random_grayscale(x, gen, c.grayscale_p)
        if c.pca_color_std > 0:
            x = pca_color(x, gen, c.pca_color_std)
        if c.erasing_p > 0:
            x = random_erasing(x, gen, c.erasing_p, tuple(c.erasing_scale), tuple(c.erasing_ratio))
        return x
