"""Data sources, splits, statistics, the in-memory loader and batched augmentation (in process)."""
from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import cvtrain.data.decode as decode
import cvtrain.data.sources as sources
from cvtrain import UserError
from cvtrain.config import AugConfig, DataConfig
from cvtrain.data import (BatchAugment, InMemoryLoader, Split, channel_stats, epoch_seed, load_data,
                          stratified_split)
from cvtrain.data.augment import random_crop, random_hflip


def data_config(**fields):
    return OmegaConf.structured(DataConfig(**fields))


def counts(labels: torch.Tensor) -> dict:
    return dict(Counter(labels.tolist()))


# --- stratified_split / channel_stats --------------------------------------------------

def test_stratified_split_keeps_class_proportions():
    labels = torch.tensor([0] * 100 + [1] * 50 + [2] * 30)[torch.randperm(180, generator=torch.Generator().manual_seed(1))]
    train, val = stratified_split(labels, 0.2, seed=0)
    assert counts(labels[val]) == {0: 20, 1: 10, 2: 6}
    assert counts(labels[train]) == {0: 80, 1: 40, 2: 24}
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(180))


def test_stratified_split_is_deterministic_per_seed():
    labels = torch.arange(200) % 4
    train_a, val_a = stratified_split(labels, 0.25, seed=7)
    train_b, val_b = stratified_split(labels, 0.25, seed=7)
    _, val_c = stratified_split(labels, 0.25, seed=8)
    assert torch.equal(train_a, train_b) and torch.equal(val_a, val_b)
    assert not torch.equal(val_a, val_c)


def test_channel_stats_match_torch():
    images = torch.randint(0, 256, (37, 3, 5, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = channel_stats(images, chunk=10)  # several chunks, a ragged last one
    as_float = images.double() / 255
    assert mean.dtype == std.dtype == torch.float32
    torch.testing.assert_close(mean, as_float.mean((0, 2, 3)).float())
    torch.testing.assert_close(std, as_float.std((0, 2, 3), unbiased=False).float())


# --- InMemoryLoader ----------------------------------------------------------------------

@pytest.fixture
def split():
    gen = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 256, (50, 3, 4, 4), dtype=torch.uint8, generator=gen), torch.arange(50))


def make_loader(split, **kwargs):
    mean, std = channel_stats(split.images)
    return InMemoryLoader(split, 16, mean, std, torch.device("cpu"), **kwargs)


def test_epoch_seed_is_the_loaders():
    assert epoch_seed(3, 2) == 3 * 100_003 + 2
    assert len({epoch_seed(seed, epoch) for seed in range(10) for epoch in range(1000)}) == 10_000


def epoch_labels(loader, epoch):
    loader.set_epoch(epoch)
    return torch.cat([y for _, y in loader]).tolist()


def test_loader_batch_count(split):
    assert len(make_loader(split)) == 4  # 16 + 16 + 16 + 2
    assert [len(y) for _, y in make_loader(split)] == [16, 16, 16, 2]
    assert len(make_loader(split, drop_last=True)) == 3
    assert [len(y) for _, y in make_loader(split, drop_last=True)] == [16, 16, 16]


def test_loader_normalizes(split):
    loader = make_loader(split)
    x = torch.cat([x for x, _ in loader])
    assert x.dtype == torch.float32 and x.shape == (50, 3, 4, 4)
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    # unshuffled: batch i holds images i*16.. in order, each (pixel/255 - mean) / std
    mean, std = channel_stats(split.images)
    expected = (split.images.float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    torch.testing.assert_close(x, expected)


def test_loader_order_depends_on_seed_and_epoch(split):
    loader = make_loader(split, shuffle=True, seed=3)
    first = epoch_labels(loader, 0)
    assert sorted(first) == list(range(50)) and first != list(range(50))
    assert epoch_labels(loader, 0) == first
    assert epoch_labels(make_loader(split, shuffle=True, seed=3), 0) == first
    assert epoch_labels(loader, 1) != first
    assert epoch_labels(make_loader(split, shuffle=True, seed=4), 0) != first
    assert epoch_labels(make_loader(split), 5) == list(range(50))  # no shuffle: always in order


# --- augmentation --------------------------------------------------------------------

@pytest.fixture
def batch():
    return torch.rand(64, 3, 6, 5, generator=torch.Generator().manual_seed(0))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("aug", [dict(hflip=True), dict(crop_padding=2), dict(hflip=True, crop_padding=3)],
                         ids=["flip", "crop", "both"])
def test_augment_preserves_shape_dtype_and_is_seeded(batch, aug):
    augment = BatchAugment(OmegaConf.structured(AugConfig(**aug)))
    assert augment
    out = augment(batch, gen(1))
    assert out.shape == batch.shape and out.dtype == batch.dtype
    assert torch.equal(out, augment(batch, gen(1)))
    assert not torch.equal(out, augment(batch, gen(2)))


def test_no_augmentation_is_falsy():
    assert not BatchAugment(OmegaConf.structured(AugConfig()))


def test_hflip_mirrors_some_images_and_keeps_the_rest(batch):
    out = random_hflip(batch, gen())
    flipped = [torch.equal(o, x.flip(2)) for o, x in zip(out, batch)]
    kept = [torch.equal(o, x) for o, x in zip(out, batch)]
    assert all(f != k for f, k in zip(flipped, kept))  # each image is exactly one of the two
    assert 10 < sum(flipped) < 54
    assert torch.equal(out[flipped.index(True)][..., 0], batch[flipped.index(True)][..., -1])


def test_random_crop_cuts_a_window_of_the_padded_image(batch):
    pad = 2
    out = random_crop(batch, pad, gen())
    padded = torch.nn.functional.pad(batch, (pad,) * 4)
    h, w = batch.shape[2:]
    offsets = set()
    for o, p in zip(out, padded):
        matches = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                   if torch.equal(o, p[:, dy:dy + h, dx:dx + w])]
        assert matches, "crop is not a window of the zero-padded image"
        offsets.update(matches)
    assert len(offsets) > 5  # the offsets really vary


# --- the embedded digits -------------------------------------------------------------------

def test_embedded_digits():
    source = sources.load_digits(data_config(name="digits"))
    assert source.val is None
    assert source.classes == [str(c) for c in range(10)]
    for split, n in ((source.train, 4000), (source.test, 1000)):
        assert split.images.shape == (n, 1, 28, 28) and split.images.dtype == torch.uint8
        assert split.labels.dtype == torch.int64
        assert counts(split.labels) == {c: n // 10 for c in range(10)}
    assert source.train.images.float().mean() > 10  # real digits, not blank images


# --- imagefolder -----------------------------------------------------------------------------

COLORS = {"cat": (255, 0, 0), "dog": (0, 0, 255)}


def write_tree(root, sizes=None, per_class=4):
    """root/train/{cat,dog}/*.png (solid red cats, blue dogs) and root/test/{cat,dog}/0.png."""
    sizes = sizes or {}
    for split, n in (("train", per_class), ("test", 1)):
        for cls, color in COLORS.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                size = sizes.get((split, cls, i), (10, 10))
                Image.new("RGB", size, color).save(root / split / cls / f"{i}.png")
    return root


def imagefolder_config(tmp_path, root, **fields):
    return data_config(name="imagefolder", root=str(root), cache_dir=str(tmp_path / "cache"),
                       val_fraction=0.25, **fields)


def test_imagefolder_loads_splits_and_labels(tmp_path):
    data = load_data(imagefolder_config(tmp_path, write_tree(tmp_path / "pets")))
    assert data.classes == ["cat", "dog"]
    assert data.shape == (3, 10, 10)
    assert counts(data.train.labels) == {0: 3, 1: 3}
    assert counts(data.val.labels) == {0: 1, 1: 1}
    assert data.test.labels.tolist() == [0, 1]
    for split in (data.train, data.val, data.test):
        assert split.images.dtype == torch.uint8
        red = split.images[:, 0].flatten(1).float().mean(1)
        assert (red == 255).tolist() == (split.labels == 0).tolist()  # cats are the red ones


def test_imagefolder_cache_is_written_and_reused(tmp_path, monkeypatch):
    root = write_tree(tmp_path / "pets")
    first = load_data(imagefolder_config(tmp_path, root))
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("imagefolder-pets-")

    def no_decoding(*args):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(decode, "decode", no_decoding)
    again = load_data(imagefolder_config(tmp_path, root))
    assert torch.equal(again.train.images, first.train.images)
    assert torch.equal(again.test.labels, first.test.labels)

    monkeypatch.undo()
    Image.new("RGB", (10, 10), COLORS["dog"]).save(root / "train" / "dog" / "new.png")
    assert len(load_data(imagefolder_config(tmp_path, root)).train) == 7  # a changed tree is decoded anew
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_imagefolder_differing_sizes_need_image_size(tmp_path):
    root = write_tree(tmp_path / "pets", sizes={("train", "dog", 2): (14, 12)})
    with pytest.raises(UserError, match="data.image_size"):
        load_data(imagefolder_config(tmp_path, root))
    data = load_data(imagefolder_config(tmp_path, root, image_size=6))
    assert data.shape == (3, 6, 6)
    assert data.test.images.shape == (2, 3, 6, 6)


def test_imagefolder_grayscale_tree_has_one_channel(tmp_path):
    root = tmp_path / "gray"
    for cls in ("a", "b"):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (8, 8), 40 * i).save(root / "train" / cls / f"{i}.png")
    data = load_data(imagefolder_config(tmp_path, root))
    assert data.shape == (1, 8, 8) and data.test is None


def test_imagefolder_missing_root(tmp_path):
    with pytest.raises(UserError, match="data.root"):
        load_data(imagefolder_config(tmp_path, tmp_path / "nowhere"))


def test_imagefolder_root_is_required(compose_config):
    with pytest.raises(UserError, match="data.root"):
        load_data(compose_config(["data=imagefolder"]).data)


# --- torchvision datasets offline ----------------------------------------------------------

def test_unknown_source_and_missing_test_split_are_user_errors(compose_config):
    with pytest.raises(UserError, match="data.name=celeba is unknown; choose one of digits, synthetic"):
        load_data(compose_config(["data.name=celeba"]).data)
    with pytest.raises(UserError, match="data=synthetic has no test split; set trainer.test=false"):
        load_data(compose_config(["data=synthetic", "data.num_test=0", "data.num_samples=40"]).data, need_test=True)


def test_torchvision_source_needs_a_root(compose_config):
    with pytest.raises(UserError, match="data=mnist needs data.root"):
        load_data(compose_config(["data=mnist", "data.root=null"]).data)


def test_torchvision_source_lists_missing_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").touch()
    (raw / "t10k-images-idx3-ubyte.gz").touch()  # the compressed file counts too
    with pytest.raises(UserError) as err:
        sources.load_torchvision(data_config(name="mnist", root=str(tmp_path), download=False))
    message = str(err.value)
    assert "train-labels-idx1-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert "train-images-idx3-ubyte" not in message and "t10k-images-idx3-ubyte" not in message
    assert "data.download" in message and str(raw) in message
