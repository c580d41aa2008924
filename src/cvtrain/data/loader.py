"""In-memory batching: uint8 images stay on the training device; each batch is
indexed, converted to float, augmented and preprocessed with tensor ops."""
import torch

from cvtrain.data.preprocess import Preprocessor
from cvtrain.data.sources import Split


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch `epoch`'s generator (batch order and augmentation) in a run with `seed`."""
    return seed * 100_003 + epoch


class InMemoryLoader:
    """Iterates over (images, labels) batches of a Split that lives on `device`.

    The order (and augmentation) of epoch e is drawn from a generator seeded with
    epoch_seed(seed, e), so any epoch can be replayed exactly, e.g. after a resume.
    Each float batch on [0, 1] goes through `preprocess` (a fitted Preprocessor, data.preprocess)
    after augmentation; without one, it is standardized with the per-channel `mean` and `std`.
    """

    def __init__(self, split: Split, batch_size: int, mean: torch.Tensor = None, std: torch.Tensor = None,
                 device: torch.device = None, shuffle: bool = False, augment=None, seed: int = 0,
                 drop_last: bool = False, preprocess: Preprocessor = None):
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.batch_size, self.shuffle, self.augment, self.seed = batch_size, shuffle, augment, seed
        # drop a ragged last batch only when there is a full one (batch norm needs > 1 sample)
        self.drop_last = drop_last and len(self.labels) >= batch_size
        if preprocess is None:
            preprocess = Preprocessor.standardize(mean, std)
        self.preprocess = preprocess.to(device)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        n = len(self.labels)
        order = torch.randperm(n, generator=gen).to(self.images.device) if self.shuffle else None
        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            idx = order[sl] if order is not None else sl
            x = self.images[idx].float().div_(255)
            if self.augment:
                x = self.augment(x, gen)
            yield self.preprocess(x), self.labels[idx]
