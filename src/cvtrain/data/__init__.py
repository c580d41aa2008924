"""Data: sources -> splits (train / val carved from train / test) -> preprocessing fitted on train."""
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from cvtrain import UserError
from cvtrain.data.augment import BatchAugment
from cvtrain.data.loader import InMemoryLoader, epoch_seed
from cvtrain.data.preprocess import Preprocessor, channel_stats
from cvtrain.data.mapped import MappedImages
from cvtrain.data.sources import SOURCES, Source, Split
from cvtrain.data.subset import take_subset
from cvtrain.checks import check_data

__all__ = ["BatchAugment", "DataBundle", "InMemoryLoader", "MappedImages", "Preprocessor", "Split", "channel_stats",
           "epoch_seed", "load_data", "stratified_split"]

log = logging.getLogger("cvtrain")


@dataclass
class DataBundle:
    train: Split
    val: Split
    test: Optional[Split]
    classes: list
    mean: Optional[torch.Tensor]  # per channel, on [0, 1] pixels, from the training split only (None: fit=False)
    std: Optional[torch.Tensor]
    preprocess: Optional[Preprocessor] = None  # data.preprocess, fitted on the training split only

    def __post_init__(self):
        if self.preprocess is None and self.mean is not None:
            self.preprocess = Preprocessor.standardize(self.mean, self.std)

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


def load_data(data_cfg, device=None, need_test: bool = False, fit: bool = True) -> DataBundle:
    """The configured splits, with data.preprocess fitted on the training split (on `device`, default CPU).
    `need_test` (trainer.test=true): a source without a test split is an error now, before any training.
    fit=False: the splits only (preprocess, mean and std None), for the tasks that apply a checkpoint's own
    fitted preprocessing (evaluate, ensemble, export): no pass over the training images."""
    check_data(data_cfg)  # batch sizes, val_fraction, keys the source does not read: before any loading
    preprocess = Preprocessor(data_cfg.preprocess, data_cfg.whiten_eps)
    if data_cfg.name not in SOURCES:
        raise UserError(f"data.name={data_cfg.name} is unknown; choose one of {', '.join(SOURCES)}")
    if data_cfg.name != "imagefolder" and str(getattr(data_cfg, "in_memory", "auto")).lower() == "false":
        log.info("note: data.in_memory=false: data=%s is always held in memory (only data=imagefolder has the "
                 "memory-mapped cache)", data_cfg.name)
    source: Source = SOURCES[data_cfg.name](data_cfg)
    if need_test and source.test is None:
        raise UserError(f"data={data_cfg.name} has no test split; set trainer.test=false")
    train, val = source.train, source.val
    if val is None:
        if not 0 < data_cfg.val_fraction < 1:
            raise UserError(f"data.val_fraction={data_cfg.val_fraction} must be between 0 and 1 "
                            "(the source has no val split, so one is carved from train)")
        train_idx, val_idx = stratified_split(train.labels, data_cfg.val_fraction, data_cfg.split_seed)
        if len(val_idx) == 0:
            raise UserError(f"data.val_fraction={data_cfg.val_fraction} leaves no validation images; raise it")
        train, val = train.subset(train_idx), train.subset(val_idx)  # memory-mapped: views of the map, no copy
    train, val, source = take_subset(data_cfg, train, val, source)  # data.classes, data.max_per_class
    if not fit:
        return DataBundle(train, val, source.test, source.classes, None, None, None)
    preprocess.fit(train.images, device=device)
    # per-channel mean/std always: checkpoints and scripts/benchmark.py's plain loop read them
    mean, std = (preprocess.stats["mean"], preprocess.stats["std"]) if preprocess.method == "standardize" \
        else channel_stats(train.images)
    return DataBundle(train, val, source.test, source.classes, mean, std, preprocess)
