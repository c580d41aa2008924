"""data.in_memory=false: data=imagefolder's memory-mapped cache (src/cvtrain/data/mapped.py) and the loader's
batches read from it, which are those of the same images in memory."""
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import cvtrain.data.mapped as mapped
import cvtrain.data.decode as decode_module
from cvtrain import UserError
from cvtrain.config import AugConfig, DataConfig
from cvtrain.data import BatchAugment, InMemoryLoader, MappedImages, load_data
from cvtrain.data.preprocess import METHODS, Preprocessor

CLASSES = ("ant", "bee", "cow")


def write_tree(root, per_class=7, test_per_class=2, size=(12, 12), seed=0):
    """root/train/<class>/*.{png,jpg} and root/test/<class>/*: noise images (PNG and JPG alternating), so that
    every image, crop and statistic differs."""
    gen = torch.Generator().manual_seed(seed)
    for split, n in (("train", per_class), ("test", test_per_class)):
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (*size, 3), dtype=torch.uint8, generator=gen).numpy()
                Image.fromarray(pixels).save(root / split / cls / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture
def tree(tmp_path):
    return write_tree(tmp_path / "zoo")


def config(tmp_path, root, **fields):
    fields = {"cache_dir": str(tmp_path / "cache"), "val_fraction": 0.3, "num_workers": 0, **fields}
    return OmegaConf.structured(DataConfig(name="imagefolder", root=str(root), **fields))


def caches(tmp_path):
    folder = tmp_path / "cache"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture
def both(tmp_path, tree):
    """The same tree loaded in memory and memory-mapped (from one cache)."""
    return load_data(config(tmp_path, tree, in_memory="true")), load_data(config(tmp_path, tree, in_memory="false"))


# --- the splits ---------------------------------------------------------------------------------------------

def test_mapped_splits_hold_the_images_in_memory_ones_do(tmp_path, both):
    memory, disk = both
    assert len(caches(tmp_path)) == 1  # one cache serves both
    for name in ("train", "val", "test"):
        a, b = getattr(memory, name), getattr(disk, name)
        assert isinstance(a.images, torch.Tensor) and isinstance(b.images, MappedImages)
        assert b.images.shape == a.images.shape and b.images.dtype == torch.uint8 and len(b.images) == len(a)
        assert torch.equal(b.images[:], a.images) and torch.equal(b.labels, a.labels)
        assert torch.equal(b.images.to("cpu"), a.images)
        idx = torch.tensor([4, 0, 2, 2])  # any order, repeats: read in the file's order, returned as asked
        assert torch.equal(b.images[idx], a.images[idx]) and torch.equal(b.images[3], a.images[3])
        assert torch.equal(torch.cat(list(b.images.split(4))), a.images)
    assert disk.shape == memory.shape == (3, 12, 12) and disk.classes == list(CLASSES)
    # the validation split carved from train is a view of the same file: nothing was read into memory
    assert disk.val.images.path == disk.train.images.path
    assert torch.equal(memory.mean, disk.mean) and torch.equal(memory.std, disk.std)


@pytest.mark.parametrize("method", METHODS)
def test_preprocess_fits_the_same_on_mapped_images(both, method):
    memory, disk = both
    a = Preprocessor(method).fit(memory.train.images)
    b = Preprocessor(method).fit(disk.train.images)
    assert a.stats.keys() == b.stats.keys()
    for key in a.stats:
        assert torch.equal(a.stats[key], b.stats[key]), key


# --- the batches --------------------------------------------------------------------------------------------

AUG = BatchAugment(OmegaConf.structured(AugConfig(hflip=True, crop_padding=3)))


@pytest.mark.parametrize("shuffle", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("rank,world_size", [(0, 1), (0, 2), (1, 2)])
@pytest.mark.parametrize("readers", [0, 2])
def test_mapped_batches_are_the_in_memory_ones(both, shuffle, rank, world_size, readers):
    memory, disk = both

    def batches(data, epoch, **extra):
        loader = InMemoryLoader(data.train, 4, shuffle=shuffle, augment=AUG if shuffle else None, seed=7,
                                preprocess=data.preprocess, drop_last=shuffle, rank=rank, world_size=world_size,
                                **extra)
        loader.set_epoch(epoch)
        return len(loader), list(loader)

    for epoch in (0, 1):
        torch.manual_seed(0)
        n, expected = batches(memory, epoch)
        rng = torch.get_rng_state()
        torch.manual_seed(0)
        m, got = batches(disk, epoch, num_workers=readers)
        assert torch.equal(torch.get_rng_state(), rng)  # the DataLoader draws nothing from the global generator
        assert n == m == len(got) == len(expected) > 0
        for (x, y), (x2, y2) in zip(expected, got):
            assert torch.equal(x, x2) and torch.equal(y, y2)


def test_each_rank_reads_only_its_shard(both, monkeypatch):
    _, disk = both
    read = []
    original = MappedImages.__getitem__

    def recording(self, key):
        read.append(self.rows[key].tolist())
        return original(self, key)

    monkeypatch.setattr(MappedImages, "__getitem__", recording)
    shards = []
    for rank in (0, 1):
        read.clear()
        loader = InMemoryLoader(disk.train, 3, shuffle=True, seed=1, preprocess=disk.preprocess, rank=rank,
                                world_size=2, num_workers=0)
        labels = torch.cat([y for _, y in loader])
        rows = [r for batch in read for r in batch]
        assert len(rows) == len(labels) == len(disk.train) // 2
        shards.append(set(rows))
    assert not shards[0] & shards[1]  # disjoint: no rank reads another's images


# --- the cache ------------------------------------------------------------------------------------------------

def test_cache_is_reused_and_rebuilt_when_the_tree_or_size_changes(tmp_path, tree, monkeypatch):
    first = load_data(config(tmp_path, tree, in_memory="false"))
    (name,) = caches(tmp_path)
    assert name.startswith("imagefolder-zoo-") and sorted(os.listdir(tmp_path / "cache" / name)) == \
        ["images.npy", "index.pt"]

    def no_build(*args, **kwargs):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(mapped, "build", no_build)
    again = load_data(config(tmp_path, tree, in_memory="false"))
    assert torch.equal(again.train.images[:], first.train.images[:])
    monkeypatch.undo()

    changed = tree / "train" / "bee" / "3.png"  # the same size, new pixels and mtime
    Image.new("RGB", (12, 12), (1, 2, 3)).save(changed)
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    rebuilt = load_data(config(tmp_path, tree, in_memory="false"))
    assert len(caches(tmp_path)) == 2
    everything = torch.cat([rebuilt.train.images[:], rebuilt.val.images[:]])
    assert (everything.flatten(1) == torch.tensor([1, 2, 3]).repeat_interleave(144)).all(1).sum() == 1

    resized = load_data(config(tmp_path, tree, in_memory="false", image_size=8))
    assert len(caches(tmp_path)) == 3 and resized.shape == (3, 8, 8)


def test_an_interrupted_build_leaves_no_cache(tmp_path, tree, monkeypatch):
    decode = decode_module.decode
    calls = []

    def killed_after_one_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return decode(*args, **kwargs)

    monkeypatch.setattr(mapped, "CHUNK", 4)
    monkeypatch.setattr(decode_module, "decode", killed_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        load_data(config(tmp_path, tree))
    assert caches(tmp_path) == []  # neither a cache nor its temporary folder
    monkeypatch.undo()
    assert len(load_data(config(tmp_path, tree)).test) == 6


def test_a_killed_builds_temporary_folder_is_never_used(tmp_path, tree):
    good = load_data(config(tmp_path, tree, in_memory="true"))
    (name,) = caches(tmp_path)
    final = tmp_path / "cache" / name
    (final / "index.pt").unlink()  # a cache folder without its index (half removed) is not a cache
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], stdout=subprocess.PIPE, text=True)
    abandoned = final.with_name(f"{name}.tmp-{mapped.socket.gethostname()}-{int(dead.stdout)}")
    abandoned.mkdir()
    (abandoned / "images.npy").write_bytes(b"half written")
    (abandoned / "index.pt").write_bytes(b"half written")
    again = load_data(config(tmp_path, tree, in_memory="true"))
    assert caches(tmp_path) == [name]  # rebuilt under the final name; the killed build's folder removed
    assert torch.equal(again.train.images, good.train.images) and torch.equal(again.test.images, good.test.images)


def test_parallel_build_writes_the_same_bytes(tmp_path, tree, monkeypatch):
    (tree / "train" / "ant" / "junk.png").write_bytes(b"not an image")  # skipped: an unused row
    monkeypatch.setattr(mapped, "CHUNK", 4)  # several chunks per worker
    folders = {}
    for workers in (0, 2):
        cache = tmp_path / f"cache{workers}"
        load_data(config(tmp_path, tree, cache_dir=str(cache), num_workers=workers, on_bad_image="skip"))
        (folders[workers],) = cache.iterdir()
    assert folders[0].name == folders[2].name
    assert (folders[0] / "images.npy").read_bytes() == (folders[2] / "images.npy").read_bytes()
    index = [torch.load(folders[w] / "index.pt", weights_only=True) for w in (0, 2)]
    assert index[0]["skipped"] == index[1]["skipped"] == 1
    for name in ("train", "test"):
        for key in ("rows", "labels"):
            assert torch.equal(index[0]["splits"][name][key], index[1]["splits"][name][key])


def test_bad_images_are_skipped_alike_on_both_paths(tmp_path, tree, caplog):
    (tree / "train" / "cow" / "junk.png").write_bytes(b"not an image")
    good = tree / "train" / "bee" / "0.jpg"
    (tree / "train" / "bee" / "cut.jpg").write_bytes(good.read_bytes()[:-60])  # opens, fails to decode
    with caplog.at_level(logging.WARNING, logger="cvtrain"):
        disk = load_data(config(tmp_path, tree, in_memory="false", on_bad_image="skip", num_workers=2))
    assert "skipped 2 unreadable image(s)" in caplog.text
    memory = load_data(config(tmp_path, tree, in_memory="true", on_bad_image="skip"))
    assert len(disk.train) + len(disk.val) == 21
    assert torch.equal(disk.train.images[:], memory.train.images)
    assert torch.equal(disk.val.labels, memory.val.labels)
    with pytest.raises(UserError, match=r"cannot read image .*junk.png"):
        load_data(config(tmp_path, tree, in_memory="false", num_workers=2))


# --- data.in_memory and data.num_workers ----------------------------------------------------------------------

@pytest.mark.parametrize("available,mapped_expected", [(10**12, False), (10**3, True), (None, False)])
def test_in_memory_auto_by_size(tmp_path, tree, monkeypatch, caplog, available, mapped_expected):
    monkeypatch.setattr(mapped, "available_memory", lambda: available)
    with caplog.at_level(logging.INFO, logger="cvtrain"):
        data = load_data(config(tmp_path, tree))  # in_memory=auto, the default
    assert isinstance(data.train.images, MappedImages) == mapped_expected
    assert "data.in_memory=auto" in caplog.text


def test_available_memory_is_a_positive_number():
    assert mapped.available_memory() > 0


def test_in_memory_values(compose_config, tmp_path, tree):
    base = ["data=imagefolder", f"data.root={tree}", f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0"]
    assert isinstance(load_data(compose_config([*base, "data.in_memory=true"]).data).train.images, torch.Tensor)
    assert isinstance(load_data(compose_config([*base, "data.in_memory=false"]).data).train.images, MappedImages)
    with pytest.raises(UserError, match=r"data.in_memory=maybe: choose one of auto .*true .*false"):
        load_data(compose_config([*base, "data.in_memory=maybe"]).data)
    with pytest.raises(UserError, match=r"data.num_workers=-1: worker processes"):
        load_data(compose_config([*base, "data.num_workers=-1"]).data)
    with pytest.raises(UserError, match="data.num_workers=2 is not used by data=digits"):
        load_data(compose_config(["data.num_workers=2"]).data)


def test_other_sources_say_they_stay_in_memory(compose_config, caplog):
    with caplog.at_level(logging.INFO, logger="cvtrain"):
        data = load_data(compose_config(["data=synthetic", "data.num_samples=100", "data.image_size=4",
                                         "data.in_memory=false"]).data)
    assert isinstance(data.train.images, torch.Tensor)
    assert "data.in_memory=false: data=synthetic is always held in memory" in caplog.text


def test_worker_count_default():
    assert mapped.worker_count(None) == min(8, os.cpu_count()) and mapped.worker_count(0) == 0


# --- end to end -------------------------------------------------------------------------------------------------

def test_training_from_the_map_is_training_in_memory(start_cli, tmp_path, tree, run_dir_of):
    """Two runs, the same seed, one memory-mapped: the same losses and accuracies, epoch by epoch."""
    common = ["data=imagefolder", f"data.root={tree}", f"data.cache_dir={tmp_path / 'cache'}", "data.batch_size=4",
              "data.val_fraction=0.3", "model=mlp", "aug=flip", "trainer.epochs=2", "trainer.test=true"]
    runs = {}
    for in_memory in ("true", "false"):
        (tmp_path / in_memory).mkdir()
        runs[in_memory] = start_cli([*common, f"data.in_memory={in_memory}", "data.num_workers=1"], tmp_path / in_memory)
    metrics = {}
    for in_memory, future in runs.items():
        run = future.result()
        assert run.proc.returncode == 0, run.output
        assert (run.run_dir / "checkpoints" / "best.pt").is_file()
        lines = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
        metrics[in_memory] = [{k: v for k, v in r.items() if "loss" in k or "acc" in k} for r in lines]
        summary = json.loads((run.run_dir / "summary.json").read_text())
        metrics[in_memory].append({k: v for k, v in summary.items() if "test" in k and "acc" in k})
    assert "memory-mapped" in runs["false"].result().output
    assert metrics["true"] == metrics["false"] and len(metrics["true"]) == 3
    assert metrics["true"][-1]  # a test accuracy
