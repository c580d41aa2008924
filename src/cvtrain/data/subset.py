"""data.classes and data.max_per_class: a subset of the data, taken after the validation split.

    data.classes=[5,6,7,8,9]          (or names: [dog,frog,horse,ship,truck]) keeps those classes in every split,
                                      labeled 0..k-1 in the order given; the class names are kept
    data.max_per_class=100            at most 100 training images per class: a random choice seeded by
                                      data.split_seed, in the split's order; val and test are not capped

Taken after the validation split is carved, so the validation images of a class are the same whatever
subset is chosen (and whatever the cap): classes 5-9 of CIFAR-10 get all 500 of their validation images
each, while training on 100 per class. The transfer-learning example of the README uses both.
"""
import logging

import torch

from cvtrain import UserError

log = logging.getLogger("cvtrain")


def class_indices(wanted, classes: list) -> list[int]:
    """The source's indices of `wanted` (indices or names), or a UserError naming the classes."""
    indices = []
    for entry in wanted:
        if isinstance(entry, int) and not isinstance(entry, bool):
            if not 0 <= entry < len(classes):
                raise UserError(f"data.classes: {entry} is no class index of this data: it has {len(classes)} "
                                f"classes, 0..{len(classes) - 1}")
            indices.append(entry)
        elif isinstance(entry, str) and entry in classes:
            indices.append(classes.index(entry))
        else:
            shown = ", ".join(map(str, classes[:20])) + (" ..." if len(classes) > 20 else "")
            raise UserError(f"data.classes: {entry!r} is no class of this data; its classes are {shown} (names or "
                            "indices)")
    if len(set(indices)) != len(indices):
        raise UserError(f"data.classes={list(wanted)} names a class twice")
    return indices


def _relabel(split, lut: torch.Tensor):
    """The images of `split` whose class `lut` keeps (lut[label] >= 0), relabeled to lut[label]."""
    keep = torch.nonzero(lut[split.labels] >= 0).flatten()
    part = split.subset(keep)
    part.labels = lut[part.labels]
    return part


def cap_per_class(split, most: int, seed: int):
    """At most `most` images per class of `split`: a random choice (a generator seeded with `seed`), in order."""
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in split.labels.unique():
        members = torch.nonzero(split.labels == c).flatten()
        if len(members) > most:
            members = members[torch.randperm(len(members), generator=gen)[:most]]
        keep.append(members)
    return split.subset(torch.cat(keep).sort().values)


def take_subset(data_cfg, train, val, source):
    """(train, val, source with its test split and classes replaced) for data.classes / data.max_per_class."""
    wanted, most = getattr(data_cfg, "classes", None), getattr(data_cfg, "max_per_class", None)
    test, classes = source.test, list(source.classes)
    if wanted is not None:
        indices = class_indices(list(wanted), classes)
        lut = torch.full((len(classes),), -1, dtype=torch.long)
        lut[torch.tensor(indices)] = torch.arange(len(indices))
        train, val = _relabel(train, lut), _relabel(val, lut)
        test = _relabel(test, lut) if test is not None else None
        classes = [classes[i] for i in indices]
        log.info("data.classes: %d of %d classes (%s), labeled 0..%d: %d train / %d val images", len(classes),
                 len(source.classes), ", ".join(map(str, classes[:10])) + (" ..." if len(classes) > 10 else ""),
                 len(classes) - 1, len(train), len(val))
    if most is not None:
        before = len(train)
        train = cap_per_class(train, most, data_cfg.split_seed)
        log.info("data.max_per_class=%d: %d of %d training images kept (seed data.split_seed=%d); the %d validation "
                 "images are all kept", most, len(train), before, data_cfg.split_seed, len(val))
    if wanted is None and most is None:
        return train, val, source
    return train, val, type(source)(train, val, test, classes)
