"""Data: sources -> splits (train / val carved from train / test) -> normalization stats."""
from dataclasses import dataclass
from typing import Optional

import torch

from cvtrain import UserError
from cvtrain.data.augment import BatchAugment
from cvtrain.data.loader import InMemoryLoader
from cvtrain.data.sources import SOURCES, Source, Split

__all__ = ["BatchAugment", "DataBundle", "InMemoryLoader", "Split", "load_data", "stratified_split"]


@dataclass
class DataBundle:
    train: Split
    val: Split
    test: Optional[Split]
    classes: list
    mean: torch.Tensor  # per channel, on [0, 1] pixels, from the training split only
    std: torch.Tensor

    @property
    def shape(self) -> tuple:
        return tuple(self.train.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def stratified_split(labels: torch.Tensor, fraction: float, seed: int):
    """Indices (train, val): `fraction` of every class goes to val, chosen with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    val = []
    for c in labels.unique():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        val.append(members[: round(fraction * len(members))])
    val = torch.cat(val).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val] = False
    return torch.nonzero(keep).flatten(), val


def channel_stats(images: torch.Tensor, chunk: int = 10_000):
    """Per-channel mean and std of uint8 images (N, C, H, W), as floats on [0, 1]."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].double().div_(255)
        total += x.sum((0, 2, 3))
        total_sq += (x * x).sum((0, 2, 3))
    count = images.numel() / images.shape[1]
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(1e-12).sqrt()
    return mean.float(), std.float()


def load_data(data_cfg) -> DataBundle:
    if data_cfg.source not in SOURCES:
        raise UserError(f"data.source='{data_cfg.source}' is unknown; choose one of {sorted(SOURCES)}")
    source: Source = SOURCES[data_cfg.source](data_cfg)
    train, val = source.train, source.val
    if val is None:
        if not 0 < data_cfg.val_fraction < 1:
            raise UserError(f"data.val_fraction={data_cfg.val_fraction} must be between 0 and 1 "
                            "(the source has no val split, so one is carved from train)")
        train_idx, val_idx = stratified_split(train.labels, data_cfg.val_fraction, data_cfg.split_seed)
        if len(val_idx) == 0:
            raise UserError(f"data.val_fraction={data_cfg.val_fraction} leaves no validation images; raise it")
        train, val = train.subset(train_idx), train.subset(val_idx)
    mean, std = channel_stats(train.images)
    return DataBundle(train, val, source.test, source.classes, mean, std)
