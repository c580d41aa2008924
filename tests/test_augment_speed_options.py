"""The pad-and-crop and flip ops of augment.py as one gather (aug=cifar nearly free), and
aug.crop_padding_mode (zeros | reflect).

The fast ops are checked against plain per-image references (pad, slice, mirror) drawing the
same random numbers in the same order, so they cut exactly the windows the draws name.
"""
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from cvtrain import UserError
from cvtrain.config import AugConfig
from cvtrain.data import BatchAugment
from cvtrain.data.augment import random_crop, random_hflip, random_vflip


def gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def aug(**fields):
    return OmegaConf.structured(AugConfig(**fields))


def reference_crop(x, padding, mode, g, flip=False):
    """Per image: pad, slice the window the draws name, mirror it if its coin says so."""
    b, _, h, w = x.shape
    dy, dx = torch.randint(0, 2 * padding + 1, (2, b), generator=g)
    coins = torch.rand(b, generator=g) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
    padded = F.pad(x, (padding,) * 4, mode="constant" if mode == "zeros" else mode)
    out = []
    for i in range(b):
        window = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out.append(window.flip(2) if coins[i] else window)
    return torch.stack(out)


SHAPES = [(64, 3, 32, 32), (9, 1, 7, 11), (5, 2, 6, 5)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", ["zeros", "reflect"])
@pytest.mark.parametrize("padding", [1, 4])
def test_random_crop_cuts_the_drawn_windows(shape, mode, padding):
    x = torch.rand(*shape, generator=gen(7))
    if mode == "reflect" and padding >= min(shape[2:]):
        pytest.skip("reflect needs padding < image side")
    for seed in range(3):
        assert torch.equal(random_crop(x, padding, gen(seed), mode=mode), reference_crop(x, padding, mode, gen(seed)))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_batch_augment_crop_and_flip_in_one_gather_matches_the_two_steps(shape, mode):
    x = torch.rand(*shape, generator=gen(3))
    augment = BatchAugment(aug(crop_padding=2, crop_padding_mode=mode, hflip=True))
    for seed in range(3):
        out = augment(x, gen(seed))
        assert torch.equal(out, reference_crop(x, 2, mode, gen(seed), flip=True))
        assert torch.equal(out, augment(x, gen(seed)))  # same generator state, same batch
        # the fused path equals the ops one after the other, with the same draws
        g = gen(seed)
        assert torch.equal(out, random_hflip(random_crop(x, 2, g, mode=mode), g))


def test_flips_mirror_about_half_and_leave_the_input_alone():
    x = torch.rand(400, 2, 3, 4, generator=gen(1))
    before = x.clone()
    for flip, dim in ((random_hflip, 3), (random_vflip, 2)):
        out = flip(x, gen(5))
        mirrored = torch.tensor([torch.equal(o, i.flip(dim - 1)) for o, i in zip(out, x)])
        kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
        assert (mirrored | kept).all() and 150 < int(mirrored.sum()) < 250
        assert torch.equal(x, before)


def test_crop_offsets_are_uniform_over_the_padded_range():
    # one bright pixel in the corner of a zero image: where it lands gives the offset of each image
    p, n = 2, 4000
    x = torch.zeros(n, 1, 8, 8)
    x[:, :, 3, 3] = 1
    out = random_crop(x, p, gen(11))
    ys, xs = (out[:, 0] == 1).nonzero()[:, 1:].T
    assert len(ys) == n  # the pixel stays inside (|shift| <= p < 3)
    shifts = torch.stack([3 - ys, 3 - xs])  # = offset - p, in [-p, p]
    assert shifts.min() == -p and shifts.max() == p
    counts = torch.bincount((shifts[0] + p) * (2 * p + 1) + shifts[1] + p, minlength=(2 * p + 1) ** 2)
    assert counts.min() > 0.7 * n / 25 and counts.max() < 1.3 * n / 25
    assert out.sum() == n  # zero padding: nothing else lights up


def test_reflect_padding_mirrors_the_border_instead_of_black():
    x = torch.rand(256, 3, 8, 8, generator=gen(2)) * 0.5 + 0.5  # no pixel is dark
    zeros = random_crop(x, 3, gen(4))
    reflect = random_crop(x, 3, gen(4), mode="reflect")
    assert (zeros == 0).any() and not (reflect == 0).any()
    assert reflect.min() >= 0.5
    both = BatchAugment(aug(crop_padding=3, crop_padding_mode="reflect", hflip=True))(x, gen(4))
    assert both.min() >= 0.5 and both.shape == x.shape


def test_crop_padding_mode_default_and_preset(compose_config):
    assert AugConfig().crop_padding_mode == "zeros"
    assert compose_config(["aug=cifar"]).aug.crop_padding_mode == "zeros"
    assert compose_config(["aug=cifar", "aug.crop_padding_mode=reflect"]).aug.crop_padding_mode == "reflect"


def test_bad_crop_padding_mode_names_the_key_and_the_valid_values():
    with pytest.raises(UserError, match=r"^aug\.crop_padding_mode=wrap .*zeros, reflect"):
        BatchAugment(aug(crop_padding=4, crop_padding_mode="wrap"))
    with pytest.raises(UserError, match=r"crop_padding_mode=wrap .*zeros, reflect"):
        random_crop(torch.rand(2, 3, 8, 8), 2, gen(), mode="wrap")


def test_reflect_padding_must_be_smaller_than_the_image():
    augment = BatchAugment(aug(crop_padding=4, crop_padding_mode="reflect"))
    with pytest.raises(UserError, match=r"aug\.crop_padding=4 .*reflect.*smaller"):
        augment(torch.rand(2, 3, 4, 4), gen())


def test_crop_and_flip_give_the_same_on_any_thread_count_and_restore_it():
    """The same pixels whatever the number of threads, and the thread count is left as it was."""
    x = torch.rand(32, 3, 16, 16, generator=gen(8))
    augment = BatchAugment(aug(crop_padding=4, hflip=True, vflip=True))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(augment(x, gen(3)))
            assert torch.get_num_threads() == n
        assert torch.equal(*results)
    finally:
        torch.set_num_threads(threads)
