"""Batched augmentation (src/cvtrain/data/augment.py), the aug presets and task=augviz.

Each op is checked for what it does to the pixels (an exact mirror, an integer shift, a
rectangle of one color, a per-image constant color shift...), not only for shapes; every op
and preset keeps shape, dtype and the [0, 1] range and is reproducible under a seed. The two
command-line runs (task=augviz, a bad aug value) start together, in the background.
"""
import logging
import math

import numpy
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from cvtrain import UserError
from cvtrain.config import AugConfig
from cvtrain.data import BatchAugment, InMemoryLoader, Split
from cvtrain.data.augment import (LUMA, BatchMix, color_jitter, cutmix, mix_generator, mixup, pca_color,
                                  random_affine, random_crop, random_erasing, random_grayscale, random_hflip,
                                  random_vflip, rgb_pca, soft_targets)
from cvtrain.tasks.augviz import augmented_grid

PRESETS = ["none", "flip", "cifar", "alexnet", "strong"]
AUGVIZ_ARGS = ["task=augviz", "aug=cifar", "data=synthetic", "data.image_size=16", "data.num_samples=64"]
BAD_CLI_ARGS = ["data=synthetic", "data.num_samples=64", "data.image_size=8", "model=linear", "trainer.epochs=1",
                "aug=strong", "aug.hue=0.7"]


def gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def aug(**fields):
    return OmegaConf.structured(AugConfig(**fields))


def rand(*shape, seed=0, low=0.0, high=1.0, dtype=torch.float32):
    return low + (high - low) * torch.rand(*shape, generator=gen(seed), dtype=dtype)


def luma(x):
    return sum(w * c for w, c in zip(LUMA, x.unbind(1))).unsqueeze(1)


def blobs(b, size, cx, cy, sigma=1.5):
    """(b, 3, size, size) Gaussian blobs centered (cx, cy) pixels from the image center (x right, y down)."""
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    blob = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma ** 2))
    return blob.expand(b, 3, size, size).clone()


def center_of_mass(x):
    """(B, 2) x, y of each image's first channel, in pixels from the image center."""
    h, w = x.shape[2:]
    m = x[:, 0]
    ys = torch.arange(h, dtype=x.dtype) - (h - 1) / 2
    xs = torch.arange(w, dtype=x.dtype) - (w - 1) / 2
    total = m.sum((1, 2))
    return torch.stack([(m.sum(1) * xs).sum(1) / total, (m.sum(2) * ys).sum(1) / total], 1)


# --- every op: shape, dtype, range, seeding ------------------------------------------------------

LABELS = torch.arange(24) % 10
ERASING_SCALE, ERASING_RATIO = tuple(AugConfig().erasing_scale), tuple(AugConfig().erasing_ratio)
OPS = {
    "hflip": lambda x, g: random_hflip(x, g),
    "vflip": lambda x, g: random_vflip(x, g),
    "crop": lambda x, g: random_crop(x, 3, g),
    "resized_crop": lambda x, g: random_affine(x, g, crop_scale=(0.08, 1.0), crop_ratio=(0.75, 1.3333)),
    "rotation": lambda x, g: random_affine(x, g, degrees=30),
    "translate": lambda x, g: random_affine(x, g, translate=0.2),
    "shear": lambda x, g: random_affine(x, g, shear=20),
    "stretch": lambda x, g: random_affine(x, g, stretch=(0.7, 1.3)),
    "brightness": lambda x, g: color_jitter(x, g, brightness=0.8),
    "contrast": lambda x, g: color_jitter(x, g, contrast=0.8),
    "saturation": lambda x, g: color_jitter(x, g, saturation=0.8),
    "hue": lambda x, g: color_jitter(x, g, hue=0.5),
    "grayscale": lambda x, g: random_grayscale(x, g, 0.5),
    "pca_color": lambda x, g: pca_color(x, g, 1.0),
    "erasing": lambda x, g: random_erasing(x, g, 0.5, ERASING_SCALE, ERASING_RATIO),
    "mixup": lambda x, g: mixup(x, LABELS, g, 1.0)[0],
    "cutmix": lambda x, g: cutmix(x, LABELS, g, 1.0)[0],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("op", OPS)
def test_op_keeps_shape_dtype_range_and_is_seeded(op, dtype):
    x = rand(24, 3, 10, 12, dtype=dtype)
    out = OPS[op](x, gen(1))
    assert out.shape == x.shape and out.dtype == dtype
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x)
    assert torch.equal(out, OPS[op](x, gen(1)))
    assert not torch.equal(out, OPS[op](x, gen(2)))


# one aug key at a time, through BatchAugment: each key is wired to its op
SINGLE_KEYS = [dict(hflip=True), dict(vflip=True), dict(crop_padding=3), dict(resized_crop=True),
               dict(rotation_degrees=20.0), dict(translate=0.2), dict(shear_degrees=10.0), dict(stretch=[0.8, 1.2]),
               dict(brightness=0.4), dict(contrast=0.4), dict(saturation=0.4), dict(hue=0.2),
               dict(grayscale_p=0.5), dict(pca_color_std=0.5), dict(erasing_p=0.5)]


@pytest.mark.parametrize("fields", SINGLE_KEYS, ids=lambda f: next(iter(f)))
def test_each_aug_key_turns_batch_augment_on(fields):
    augment = BatchAugment(aug(**fields))
    assert augment
    x = rand(16, 3, 9, 9)
    out = augment(x, gen(1))
    assert out.shape == x.shape and out.dtype == x.dtype and 0 <= out.min() and out.max() <= 1
    assert not torch.equal(out, x)
    assert torch.equal(out, augment(x, gen(1))) and not torch.equal(out, augment(x, gen(2)))


# --- the presets -------------------------------------------------------------------------

@pytest.mark.parametrize("preset", PRESETS)
def test_preset(preset, compose_config):
    cfg = compose_config([f"aug={preset}"]).aug
    augment, mix = BatchAugment(cfg), BatchMix(cfg)
    assert bool(augment) == (preset != "none")
    assert bool(mix) == (preset == "strong")
    x = rand(32, 3, 16, 16)
    out = augment(x, gen(1)) if augment else x
    assert out.shape == x.shape and out.dtype == x.dtype and 0 <= out.min() and out.max() <= 1
    if augment:
        assert torch.equal(out, augment(x, gen(1))) and not torch.equal(out, augment(x, gen(2)))
    if mix:
        mixed, y_a, y_b, lam = mix(out, LABELS[:8].repeat(4), mix_generator(0, 0))
        assert mixed.shape == x.shape and 0 <= mixed.min() and mixed.max() <= 1 and 0 <= lam <= 1


def test_cifar_preset_is_pad4_crop_and_hflip(compose_config):
    augment = BatchAugment(compose_config(["aug=cifar"]).aug)
    x = rand(64, 3, 8, 8)
    out = augment(x, gen(3))
    padded = F.pad(x, (4,) * 4)
    seen = set()
    for o, p in zip(out, padded):
        matches = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (0, 1)
                   if torch.equal(o.flip(2) if flip else o, p[:, dy:dy + 8, dx:dx + 8])]
        assert matches, "not a (mirrored) window of the 4-padded image"
        seen.update(matches)
    assert {m[2] for m in seen} == {0, 1} and len({m[:2] for m in seen}) > 10


def test_alexnet_preset_zooms_by_7_8_flips_and_shifts_colors(compose_config):
    cfg = compose_config(["aug=alexnet"]).aug
    geometry = BatchAugment(OmegaConf.merge(cfg, {"pca_color_std": 0.0, "hflip": False}))
    ramp = (torch.arange(32.0) / 31).expand(8, 3, 32, 32)
    diffs = geometry(ramp, gen())[..., 1:-1, 1:-1].diff(dim=3)
    assert torch.allclose(diffs, torch.full_like(diffs, 0.875 / 31), atol=1e-4)  # a 224/256 window, scaled up
    x = rand(64, 3, 32, 32, low=0.3, high=0.7)
    crops, out = geometry(x, gen()), BatchAugment(cfg)(x, gen())  # the crop draws come first in both
    flips = []
    for o, c in zip(out, crops):  # (mirrored) crop + one color per image
        shifts = [(o - view).flatten(1) for view in (c, c.flip(2))]
        const = [torch.allclose(d, d[:, :1].expand_as(d), rtol=0, atol=2e-7) for d in shifts]
        assert any(const)
        flips.append(const[1])
        assert shifts[const.index(True)].abs().max() > 1e-6  # small: these images have little color variance
    assert 16 < sum(flips) < 48


# --- geometry ---------------------------------------------------------------------------------

@pytest.mark.parametrize("op, dim", [(random_hflip, 3), (random_vflip, 2)], ids=["hflip", "vflip"])
def test_flip_mirrors_about_half_exactly_and_keeps_the_rest(op, dim):
    x = rand(1000, 3, 5, 4)
    out = op(x, gen())
    flipped = (out == x.flip(dim)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert torch.all(flipped ^ kept)  # each image is exactly one of the two
    assert 400 < flipped.sum() < 600


def test_random_crop_is_an_exact_integer_shift():
    pad = 3
    x = rand(64, 2, 7, 6)
    out = random_crop(x, pad, gen())
    padded = F.pad(x, (pad,) * 4)
    offsets = []
    for o, p in zip(out, padded):
        matches = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                   if torch.equal(o, p[:, dy:dy + 7, dx:dx + 6])]
        assert len(matches) == 1, "each crop is one window of the zero-padded image"
        offsets += matches
    assert len(set(offsets)) > 20 and {0, 2 * pad} <= {dy for dy, _ in offsets}


@pytest.mark.parametrize("h, w", [(12, 12), (9, 15)])
def test_resized_crop_of_the_whole_image_is_the_identity(h, w):
    x = rand(8, 3, h, w)
    out = random_affine(x, gen(), crop_scale=(1.0, 1.0), crop_ratio=(w / h, w / h))
    assert torch.allclose(out, x, atol=1e-5)


def test_resized_crop_scales_a_window_up():
    size, b = 24, 16
    ramps = torch.stack([(torch.arange(size * 1.0) / (size - 1)).expand(size, size)] * 2)  # x ramp, y ramp
    x = torch.cat([ramps[:1], ramps[1:].transpose(1, 2), torch.full((1, size, size), 0.5)]).expand(b, 3, size, size)
    out = random_affine(x, gen(), crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0))  # a half-side window
    inner = out[..., 1:-1, 1:-1]  # the outer ring may sample between the last pixel center and the edge
    slope = 0.5 / (size - 1)
    assert torch.allclose(inner[:, 0].diff(dim=2), torch.full((b, size - 2, size - 3), slope), atol=1e-4)
    assert torch.allclose(inner[:, 1].diff(dim=1), torch.full((b, size - 3, size - 2), slope), atol=1e-4)
    assert torch.allclose(out[:, 2], torch.full((b, size, size), 0.5), atol=1e-5)  # no dark rim at the border
    starts = inner[:, 0, 0, 0] * (size - 1)  # output column 1 samples 1/4 pixel past each window's left edge
    assert starts.min() >= 0.25 - 1e-3 and starts.max() <= size / 2 + 0.25 + 1e-3  # windows inside the image
    assert starts.max() - starts.min() > size / 4  # at varying places


def test_rotation_turns_about_the_center_within_the_range():
    degrees, radius = 30.0, 9.0
    x = blobs(64, 33, radius, 0.0)
    com = center_of_mass(random_affine(x, gen(), degrees=degrees))
    assert torch.allclose(com.norm(dim=1), torch.full((64,), radius), atol=0.05)  # same distance from the center
    angles = torch.rad2deg(torch.atan2(com[:, 1], com[:, 0]))
    assert angles.abs().max() <= degrees + 0.2
    assert angles.max() - angles.min() > degrees  # spread over the range, both ways
    centered = blobs(8, 33, 0.0, 0.0, sigma=3.0)  # a centered round blob does not move
    assert torch.allclose(random_affine(centered, gen(), degrees=180.0), centered, atol=0.04)  # bilinear error


def test_translate_shifts_the_content():
    size, t = 33, 0.25
    x = blobs(64, size, 0.0, 0.0, sigma=2.0)
    out = random_affine(x, gen(), translate=t)
    com = center_of_mass(out)
    assert com.abs().max() <= t * size + 0.05
    assert (com.max(0).values - com.min(0).values > 0.5 * t * size).all()  # shifts vary in both directions
    for o, (cx, cy) in zip(out, com.tolist()):  # the same blob, moved
        assert torch.allclose(o, blobs(1, size, cx, cy, sigma=2.0)[0], atol=0.08)  # bilinear error: ~0.05
    assert torch.allclose(out.sum((1, 2, 3)), x.sum((1, 2, 3)), rtol=1e-3)


def test_shear_moves_points_along_x_by_their_height():
    shear, r = 20.0, 8.0
    on_axis = center_of_mass(random_affine(blobs(32, 33, r, 0.0), gen(), shear=shear))
    assert torch.allclose(on_axis, torch.tensor([r, 0.0]).expand(32, 2), atol=0.02)
    below = center_of_mass(random_affine(blobs(32, 33, 0.0, r), gen(), shear=shear))
    assert torch.allclose(below[:, 1], torch.full((32,), r), atol=0.02)
    assert below[:, 0].abs().max() <= math.tan(math.radians(shear)) * r + 0.05
    assert below[:, 0].min() < -1 and below[:, 0].max() > 1


def test_stretch_scales_x_and_y_independently():
    r = 8.0
    com = center_of_mass(random_affine(blobs(64, 33, r, r), gen(), stretch=(0.8, 1.2)))
    factors = com / r
    assert factors.min() >= 0.8 - 0.01 and factors.max() <= 1.2 + 0.01
    assert (factors[:, 0] - factors[:, 1]).abs().max() > 0.1  # not one factor for both axes


# --- color -----------------------------------------------------------------------------------

def test_brightness_scales_each_image_by_a_factor_in_range():
    x = rand(200, 3, 4, 4, low=0.1, high=0.5)
    ratio = color_jitter(x, gen(), brightness=0.5) / x
    per_image = ratio.flatten(1)
    assert torch.allclose(per_image, per_image[:, :1].expand_as(per_image), atol=1e-5)  # one factor per image
    assert per_image.min() >= 0.5 - 1e-5 and per_image.max() <= 1.5 + 1e-5
    assert per_image.min() < 0.6 and per_image.max() > 1.4


def test_brightness_above_one_has_factors_from_zero_not_below():
    x = rand(400, 3, 4, 4, low=0.01, high=0.25)
    ratio = (color_jitter(x, gen(), brightness=3.0) / x).flatten(1)  # factors in [max(0, 1 - 3), 4]
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-4)
    assert ratio.min() > 0 and ratio.max() <= 4 + 1e-4  # a negative factor would clamp images to black
    assert ratio.min() < 0.2 and ratio.max() > 3.5


def test_contrast_blends_with_the_mean_luma():
    x = rand(100, 3, 5, 5, low=0.3, high=0.7)
    out = color_jitter(x, gen(), contrast=0.5)
    mean = luma(x).mean((1, 2, 3), keepdim=True)
    assert torch.allclose(luma(out).mean((1, 2, 3), keepdim=True), mean, atol=1e-5)
    dev_in, dev_out = x - mean, out - mean
    factor = (dev_in * dev_out).sum((1, 2, 3), keepdim=True) / (dev_in ** 2).sum((1, 2, 3), keepdim=True)
    assert torch.allclose(dev_out, factor * dev_in, atol=1e-5)  # one factor per image
    assert factor.min() >= 0.5 - 1e-5 and factor.max() <= 1.5 + 1e-5 and factor.max() - factor.min() > 0.5


@pytest.mark.parametrize("key, amount", [("saturation", 0.8), ("hue", 0.5)])
def test_saturation_and_hue_keep_luma_and_gray_pixels(key, amount):
    x = rand(64, 3, 6, 6, low=0.4, high=0.6)
    out = color_jitter(x, gen(), **{key: amount})
    assert not torch.allclose(out, x, atol=1e-3)
    assert torch.allclose(luma(out), luma(x), atol=1e-5)
    gray = rand(8, 1, 6, 6).expand(8, 3, 6, 6)
    assert torch.allclose(color_jitter(gray, gen(), **{key: amount}), gray, atol=1e-5)


def test_hue_rotates_the_chroma_plane():
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    x = rand(64, 3, 6, 6, low=0.4, high=0.6)
    out = color_jitter(x, gen(), hue=0.25)
    iq_in, iq_out = (torch.einsum("ij,bjhw->bihw", yiq, t)[:, 1:] for t in (x, out))
    assert torch.allclose(iq_out.norm(dim=1), iq_in.norm(dim=1), atol=1e-5)  # chroma magnitude kept
    cos = (iq_in * iq_out).sum(1) / (iq_in.norm(dim=1) * iq_out.norm(dim=1))
    per_image = cos.flatten(1)
    assert torch.allclose(per_image, per_image[:, :1].expand_as(per_image), atol=1e-3)  # one angle per image
    assert per_image.min() >= math.cos(math.pi / 2) - 1e-3 and per_image.min() < math.cos(math.pi / 3)


def test_grayscale():
    x = rand(16, 3, 5, 5)
    out = random_grayscale(x, gen(), 1.0)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    assert torch.allclose(out[:, :1], luma(x), atol=1e-6)
    assert torch.equal(random_grayscale(x, gen(), 0.0), x)
    half = random_grayscale(rand(400, 3, 2, 2), gen(), 0.5)
    gray = (half[:, 0] == half[:, 1]).flatten(1).all(1)
    assert 150 < gray.sum() < 250


def test_pca_color_shifts_each_image_by_a_constant_color():
    x = rand(32, 3, 6, 6, low=0.3, high=0.7)
    shift = (pca_color(x, gen(), 0.5) - x).flatten(2)  # B, 3, pixels
    assert torch.allclose(shift, shift[:, :, :1].expand_as(shift), atol=1e-6)
    per_image = shift[:, :, 0]
    assert per_image.abs().max() > 1e-3 and not torch.allclose(per_image, per_image[:1].expand_as(per_image))


def test_pca_color_uses_the_given_eigen_decomposition():
    x = torch.full((4000, 3, 1, 1), 0.5)
    eig = (torch.tensor([1.0, 0.0, 0.0]), torch.eye(3))  # all the variance along red
    shift = (pca_color(x, gen(), 0.1, eig) - x)[:, :, 0, 0]
    assert torch.equal(shift[:, 1:], torch.zeros(4000, 2))
    assert 0.09 < shift[:, 0].std() < 0.11 and abs(shift[:, 0].mean()) < 0.01  # alpha ~ N(0, 0.1)


def test_rgb_pca_is_the_pixel_covariance():
    mix = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.2, 0.0], [0.1, 0.1, 0.3]])
    images = (torch.einsum("ij,bjhw->bihw", mix, rand(50, 3, 8, 8)) * 255).round().to(torch.uint8)
    eigval, eigvec = rgb_pca(images, chunk=7)
    pixels = images.double().div(255).transpose(0, 1).reshape(3, -1)
    cov = torch.cov(pixels, correction=0).float()
    assert torch.allclose(cov @ eigvec, eigvec * eigval, atol=1e-5)
    assert torch.allclose(eigvec.T @ eigvec, torch.eye(3), atol=1e-5)
    as_float = rgb_pca(images.float() / 255)
    assert torch.allclose(as_float[0], eigval, atol=1e-6)


# --- erasing ----------------------------------------------------------------------------------

def _erased_box(changed):
    """(top, bottom, left, right) of the one full rectangle `changed` (H, W) holds, else None."""
    rows, cols = changed.any(1).nonzero()[:, 0], changed.any(0).nonzero()[:, 0]
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    box = torch.zeros_like(changed)
    box[top:bottom, left:right] = True
    return (int(top), int(bottom), int(left), int(right)) if torch.equal(box, changed) else None


def test_random_erasing_fills_one_rectangle_and_leaves_the_rest():
    x = rand(64, 3, 32, 32)
    out = random_erasing(x, gen(), 1.0, ERASING_SCALE, ERASING_RATIO, value=0.25)
    for o, xi in zip(out, x):
        changed = (o != xi).any(0)
        assert torch.equal((o != xi).all(0), changed)  # all channels, or none
        box = _erased_box(changed)
        assert box is not None, "the erased pixels are not one rectangle"
        assert torch.all(o[:, changed] == 0.25) and torch.equal(o[:, ~changed], xi[:, ~changed])
        area = (box[1] - box[0]) * (box[3] - box[2]) / 32 ** 2
        assert 0.01 <= area <= 0.4  # scale (0.02, 0.33), up to rounding the sides


def test_random_erasing_fills_with_the_batch_mean_color_by_default():
    x = rand(16, 3, 16, 16)
    out = random_erasing(x, gen(), 1.0, ERASING_SCALE, ERASING_RATIO)
    mean = x.mean((0, 2, 3))
    for o, xi in zip(out, x):
        changed = (o != xi).any(0)
        assert changed.any() and torch.equal(o[:, changed], mean[:, None].expand(3, int(changed.sum())))


def test_random_erasing_probability():
    x = rand(400, 3, 8, 8)
    assert torch.equal(random_erasing(x, gen(), 0.0, ERASING_SCALE, ERASING_RATIO), x)
    erased = (random_erasing(x, gen(), 0.5, ERASING_SCALE, ERASING_RATIO) != x).flatten(1).any(1)
    assert 150 < erased.sum() < 250


# --- mixup / cutmix ---------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(8))
def test_mixup_is_a_convex_combination_with_a_permutation(seed):
    x, y = rand(32, 3, 5, 5, seed=seed), torch.arange(32)  # labels name the images
    out, y_a, y_b, lam = mixup(x, y, gen(seed), alpha=0.4)
    assert y_a is y and 0 <= lam <= 1
    assert sorted(y_b.tolist()) == list(range(32))  # a permutation
    assert torch.allclose(out, lam * x + (1 - lam) * x[y_b], atol=1e-6)
    targets = soft_targets(y_a, y_b, lam, 32)
    assert torch.allclose(targets.sum(1), torch.ones(32))
    differ = y_a != y_b
    assert torch.allclose(targets[differ, y_a[differ]], torch.full((int(differ.sum()),), lam))


@pytest.mark.parametrize("seed", range(8))
def test_cutmix_lam_is_the_unpasted_area(seed):
    h, w = 12, 10
    x, y = rand(32, 3, h, w, seed=seed), torch.arange(32)
    out, y_a, y_b, lam = cutmix(x, y, gen(seed), alpha=1.0)
    assert y_a is y and 0 <= lam <= 1
    pasted = (out != x).any(1).any(0)  # one box for the whole batch
    if pasted.any():
        assert _erased_box(pasted) is not None
    assert lam == pytest.approx(1 - pasted.float().mean().item())
    inside = pasted.expand_as(out)
    assert torch.equal(out[inside], x[y_b][inside]) and torch.equal(out[~inside], x[~inside])
    assert torch.allclose(soft_targets(y_a, y_b, lam, 32).sum(1), torch.ones(32))


def test_mix_alpha_shapes_lam():
    lams = [mixup(rand(4, 1, 2, 2), torch.arange(4), gen(s), alpha=0.1)[3] for s in range(200)]
    assert sum(min(lam, 1 - lam) < 0.1 for lam in lams) > 100  # small alpha: mostly near 0 or 1
    lams = [mixup(rand(4, 1, 2, 2), torch.arange(4), gen(s), alpha=20.0)[3] for s in range(200)]
    assert all(0.2 < lam < 0.8 for lam in lams)


def test_batch_mix_picks_both_modes_with_both_alphas():
    mix = BatchMix(aug(mixup_alpha=1.0, cutmix_alpha=1.0))
    assert mix
    x, y = rand(16, 3, 8, 8), torch.arange(16)
    modes = []
    for seed in range(40):
        out, y_a, y_b, lam = mix(x, y, gen(seed))
        assert y_a is y
        if torch.allclose(out, lam * x + (1 - lam) * x[y_b], atol=1e-6) and 0.01 < lam < 0.99:
            modes.append("mixup")
        elif ((out == x) | (out == x[y_b])).all():
            modes.append("cutmix")
    assert 10 < modes.count("mixup") < 30 and 10 < modes.count("cutmix") < 30


def test_batch_mix_single_modes_and_off():
    x, y = rand(16, 3, 8, 8), torch.arange(16)
    out, _, y_b, lam = BatchMix(aug(mixup_alpha=0.5))(x, y, gen())
    assert torch.allclose(out, lam * x + (1 - lam) * x[y_b], atol=1e-6)
    out, _, y_b, lam = BatchMix(aug(cutmix_alpha=0.5))(x, y, gen())
    assert ((out == x) | (out == x[y_b])).all()
    off = BatchMix(aug())
    assert not off
    out, y_a, y_b, lam = off(x, y, gen())
    assert out is x and y_a is y and y_b is y and lam == 1.0


def test_mix_generator_replays():
    x, y = rand(16, 3, 8, 8), torch.arange(16)
    mix = BatchMix(aug(mixup_alpha=1.0, cutmix_alpha=1.0))
    first = [mix(x, y, g) for g in [mix_generator(3, 10)] * 3]
    again = [mix(x, y, g) for g in [mix_generator(3, 10)] * 3]
    for (a, _, ya, la), (b, _, yb, lb) in zip(first, again):
        assert torch.equal(a, b) and torch.equal(ya, yb) and la == lb
    other = mix(x, y, mix_generator(3, 11))
    assert not torch.equal(other[0], first[0][0])


# --- validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("override", [
    "aug.hue=0.7", "aug.hue=-0.1", "aug.erasing_p=2", "aug.grayscale_p=-0.5", "aug.resized_crop_scale=[0.5,0.1]",
    "aug.resized_crop_scale=[0.5,1.5]", "aug.resized_crop_ratio=[0,1]", "aug.stretch=[1.2]", "aug.translate=1.0",
    "aug.brightness=-0.1", "aug.crop_padding=-1", "aug.erasing_ratio=[3,0.3]", "aug.mixup_alpha=-1",
    "aug.cutmix_alpha=-1", "aug.rotation_degrees=-5", "aug.pca_color_std=-0.1"])
def test_invalid_values_name_the_key(override, compose_config):
    cfg = OmegaConf.merge(compose_config(["aug=strong"]).aug, OmegaConf.from_dotlist([override[len("aug."):]]))
    key = override.split("=")[0]
    for build in (BatchAugment, BatchMix):
        with pytest.raises(UserError, match=rf"^{key}="):
            build(cfg)


def test_one_channel_images_skip_the_rgb_ops(caplog):
    x = rand(8, 1, 6, 6)
    rgb_only = BatchAugment(aug(saturation=0.5, hue=0.2, grayscale_p=1.0, pca_color_std=0.5))
    assert rgb_only
    with caplog.at_level(logging.WARNING, logger="cvtrain"):
        assert torch.equal(rgb_only(x, gen()), x)
        assert torch.equal(rgb_only(x, gen()), x)
    assert sum("need RGB" in r.getMessage() for r in caplog.records) == 1  # warned once
    everything = BatchAugment(aug(hflip=True, crop_padding=1, brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1,
                                  grayscale_p=0.5, pca_color_std=0.1, erasing_p=0.5, rotation_degrees=10.0))
    out = everything(x, gen())
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1 and not torch.equal(out, x)


# --- the loader: labels and exact replay ---------------------------------------------------------

def _epochs(augment, seed=3, epochs=(0, 1), n=40):
    images = (rand(n, 3, 8, 8, seed=9) * 255).to(torch.uint8)
    loader = InMemoryLoader(Split(images, torch.arange(n)), 16, mean=torch.zeros(3), std=torch.ones(3),
                            device=torch.device("cpu"), shuffle=True, augment=augment, seed=seed, drop_last=True)
    result = {}
    for epoch in epochs:
        loader.set_epoch(epoch)
        result[epoch] = list(loader)
    return result


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_loader_epochs_with_strong_aug_are_reproducible(compose_config):
    augment = BatchAugment(compose_config(["aug=strong"]).aug)
    run = _epochs(augment)
    assert _same(run[0], _epochs(augment)[0]) and _same(run[1], _epochs(augment)[1])
    assert _same(run[1], _epochs(augment, epochs=(1,))[1])  # epoch 1 alone, as after a resume
    assert not _same(run[0], run[1]) and not _same(run[0], _epochs(augment, seed=4)[0])
    plain = _epochs(None)  # augmentation keeps each image's label, and draws after the order
    for (xa, ya), (xp, yp) in zip(run[0], plain[0]):
        assert torch.equal(ya, yp) and not torch.equal(xa, xp)
    # and the step-seeded mixing on top replays too
    mix = BatchMix(compose_config(["aug=strong"]).aug)
    mixed = [[mix(x, y, g) for g in [mix_generator(3, 0)] for x, y in run[0]] for _ in range(2)]
    assert all(torch.equal(a[0], b[0]) and a[3] == b[3] for a, b in zip(*mixed))


def _mirrored(run, images):
    """{image index: True if the loader gave it mirrored, False if as it is} over one epoch's batches."""
    seen = {}
    for x, y in run:
        for image, i in zip(x, y.tolist()):
            original = images[i].float() / 255
            assert torch.equal(image, original) or torch.equal(image, original.flip(-1))
            seen[i] = not torch.equal(image, original)
    return seen


def test_alternate_flips_mirror_each_image_in_every_other_epoch():
    n = 40
    images = (rand(n, 3, 8, 8, seed=9) * 255).to(torch.uint8)  # random pixels: no image is its own mirror
    run = _epochs(BatchAugment(aug(hflip=True, alternate_flips=True)), epochs=(0, 1, 2, 3), n=n)
    flips = [_mirrored(run[e], images) for e in range(4)]
    common = set.intersection(*(set(f) for f in flips))  # images in all four epochs (drop_last drops 8 a time)
    assert len(common) >= 10
    assert all(flips[1][i] != flips[0][i] and flips[2][i] == flips[0][i] != flips[3][i] for i in common)
    assert 10 <= sum(flips[0].values()) <= 22  # epoch 0: a random half (of 32)
    again = _epochs(BatchAugment(aug(hflip=True, alternate_flips=True)), epochs=(3,), n=n)  # resumed at epoch 3
    assert _same(again[3], run[3])
    # random flips: some images are seen the same way in two epochs in a row
    plain = _epochs(BatchAugment(aug(hflip=True)), epochs=(0, 1), n=n)
    random_flips = [_mirrored(plain[e], images) for e in (0, 1)]
    assert any(random_flips[0][i] == random_flips[1][i] for i in set(random_flips[0]) & set(random_flips[1]))


def test_alternate_flips_join_the_crop_and_need_hflip():
    crop = BatchAugment(aug(hflip=True, alternate_flips=True, crop_padding=2, crop_padding_mode="reflect"))
    x = rand(6, 3, 8, 8)
    mirror = torch.tensor([True, False, True, True, False, False])
    # the crop's windows come from the generator alone (the same draws); the mirror follows `hflip`
    flipped, unflipped = crop(x, gen(), hflip=mirror), crop(x, gen(), hflip=torch.zeros(6, dtype=torch.bool))
    assert not torch.equal(unflipped, x)  # cropped
    assert torch.equal(flipped, torch.where(mirror.view(-1, 1, 1, 1), unflipped.flip(-1), unflipped))
    no_crop = BatchAugment(aug(hflip=True, alternate_flips=True))
    assert torch.equal(no_crop(x, gen(), hflip=mirror), torch.where(mirror.view(-1, 1, 1, 1), x.flip(-1), x))
    with pytest.raises(UserError, match=r"^aug.alternate_flips=.*aug.hflip=true"):
        BatchAugment(aug(alternate_flips=True))


# --- task=augviz ----------------------------------------------------------------------------------

def test_augmented_grid(compose_config):
    images = (rand(5, 3, 8, 8) * 255).to(torch.uint8)
    cfg = compose_config(["aug=strong"]).aug
    tiles = augmented_grid(images, torch.arange(5), cfg, seed=0, views=3)
    assert tiles.shape == (20, 3, 8, 8) and 0 <= tiles.min() and tiles.max() <= 1
    grid = tiles.view(5, 4, 3, 8, 8)
    assert torch.equal(grid[:, 0], images.float() / 255)  # first column: the images as stored
    assert not torch.equal(grid[:, 1], grid[:, 2])  # views differ
    assert torch.equal(tiles, augmented_grid(images, torch.arange(5), cfg, seed=0, views=3))
    none = augmented_grid(images, torch.arange(5), compose_config(["aug=none"]).aug, seed=0, views=3)
    assert torch.equal(none.view(5, 4, 3, 8, 8), (images.float() / 255)[:, None].expand(5, 4, 3, 8, 8))


CLI_RUNS = {"augviz": AUGVIZ_ARGS, "bad_aug": BAD_CLI_ARGS}


@pytest.fixture(scope="module", autouse=True)
def _cli_started(request, start_cli, tmp_path_factory) -> dict:
    """Futures of the command-line runs that this module's selected tests use (fixtures <name>_run),
    started in the background with the module's first test, so they overlap the in-process tests."""
    items = [item for item in request.session.items if item.module is request.module]
    return {name: start_cli(args, tmp_path_factory.mktemp(name)) for name, args in CLI_RUNS.items()
            if any(f"{name}_run" in item.fixturenames for item in items)}


@pytest.fixture(scope="module")
def augviz_run(_cli_started):
    return _cli_started["augviz"].result()


@pytest.fixture(scope="module")
def bad_aug_run(_cli_started):
    return _cli_started["bad_aug"].result()


def test_cli_augviz_writes_png_and_tensorboard_image(augviz_run):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = augviz_run
    assert run.proc.returncode == 0, run.output
    png = run.run_dir / "augviz.png"
    assert str(png) in run.output
    # 16 images (rows) x (1 original + 7 views) of 16x16, 2-pixel padding
    height, width = 16 * 18 + 2, 8 * 18 + 2
    with Image.open(png) as file:  # (torchvision.io.read_image is deprecated)
        assert file.mode == "RGB" and file.size == (width, height)
        image = torch.from_numpy(numpy.asarray(file).copy()).float()  # height, width, 3
    tiles = image[2:, 2:].view(16, 18, 8, 18, 3)[:, :16, :, :16]  # row, y, column, x, channel
    padding = image[:2].flatten(0, 1)
    assert padding.min() == 255  # white padding between the tiles
    assert tiles.std() > 10 and not torch.equal(tiles[:, :, 0], tiles[:, :, 1])  # pictures; views differ
    (events,) = run.run_dir.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"images": 0})
    acc.Reload()
    assert acc.Tags()["images"] == ["augviz/cifar"]
    (event,) = acc.Images("augviz/cifar")
    assert (event.width, event.height) == (width, height)


def test_cli_rejects_a_bad_aug_value_before_training(bad_aug_run):
    run = bad_aug_run
    assert run.proc.returncode == 2, run.output
    assert "aug.hue=0.7 must be in [0, 0.5]" in run.output
    assert "Traceback" not in run.output and "epoch 1/1" not in run.output
    assert not (run.run_dir / "metrics.jsonl").exists() and not (run.run_dir / "checkpoints").exists()
