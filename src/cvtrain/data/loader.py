"""Batching: uint8 images stay on the training device (or, when they do not fit there, in the host's
pinned memory, each batch copied ahead on a side stream), or, memory-mapped (data.in_memory=false), on
disk, each batch read by a DataLoader's workers; each batch is indexed, converted to float, augmented and
preprocessed with tensor ops on the training device."""
import logging

import torch
from torch.utils.data import DataLoader

from cvtrain import UserError

from cvtrain.data.preprocess import Preprocessor
from cvtrain.data.mapped import MappedImages
from cvtrain.data.sources import Split


log = logging.getLogger("cvtrain")

PLACEMENTS = ("auto", "device", "host")
DEVICE_SHARE = 0.5  # placement=auto: on the GPU when the images take at most this share of its free memory


def resolve_placement(placement: str, nbytes: int, device: torch.device) -> str:
    """data.placement for images of `nbytes` on `device`: "device" or "host" (always "device" on the CPU)."""
    if placement not in PLACEMENTS:
        raise UserError(f"data.placement={placement} is unknown; choose one of {', '.join(PLACEMENTS)}")
    if device is None or device.type != "cuda":
        if placement == "host":
            log.info("note: data.placement=host is the same as device on the CPU")
        return "device"
    if placement == "auto":
        free, _ = torch.cuda.mem_get_info(device)
        placement = "device" if nbytes <= DEVICE_SHARE * free else "host"
        log.info("data.placement=auto: %.2f GB of images %s (%.1f GB free on %s)", nbytes / 1e9,
                 "on the GPU" if placement == "device" else "in pinned host memory", free / 1e9, device)
    return placement


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch `epoch`'s generator (batch order and augmentation) in a run with `seed`."""
    return seed * 100_003 + epoch


class InMemoryLoader:
    """Iterates over (images, labels) batches of a Split that lives on `device`.

    The order (and augmentation) of epoch e is drawn from a generator seeded with
    epoch_seed(seed, e), so any epoch can be replayed exactly, e.g. after a resume.
    Each float batch on [0, 1] goes through `preprocess` (a fitted Preprocessor, data.preprocess)
    after augmentation; without one, it is standardized with the per-channel `mean` and `std`.
    placement (data.placement, resolve_placement): "device" keeps the uint8 images on `device`; "host"
    keeps them in pinned host memory and copies each batch to `device` one batch ahead, on a side CUDA
    stream, into the loop's stream without a host synchronisation.

    rank, world_size (several processes, cvtrain/distributed.py): each process iterates over its own
    share of the split. Shuffled (training): every process draws the same permutation of the epoch and
    takes every world_size-th image of it from position `rank` on, n // world_size images each (equal
    shares: no process waits for another), so global batch k (batch k of every process) holds exactly
    the images of a single process's batch k at batch_size x world_size. Rank 0 augments with the
    epoch's generator as a single process does, the others each with a generator of their own. In
    order (evaluation): a contiguous part of the split, sizes differing by at most one, together every
    image once. The defaults 0 and 1 are a single process: the whole split, the same draws.

    A memory-mapped split (split.images is MappedImages, data.in_memory=false) stays on disk: each batch's
    uint8 images are read from the map by a DataLoader with `num_workers` processes (default: the split's,
    data.num_workers), into pinned memory on CUDA, and copied to `device`; only the rows of this process's
    batches are read. Everything else (the order, the spans, the generator's draws) is the same, so the
    batches are those of the same split in memory. data.placement does not apply to it.
    """

    def __init__(self, split: Split, batch_size: int, mean: torch.Tensor = None, std: torch.Tensor = None,
                 device: torch.device = None, shuffle: bool = False, augment=None, seed: int = 0,
                 drop_last: bool = False, preprocess: Preprocessor = None, placement: str = "device",
                 rank: int = 0, world_size: int = 1, num_workers: int = None):
        device = torch.device("cpu") if device is None else torch.device(device)
        self.device = device
        self.rank, self.world_size = rank, world_size
        if world_size > 1 and not shuffle:  # evaluation: this process's contiguous part of the split
            n = len(split.labels)
            split = split.subset(torch.arange(n * rank // world_size, n * (rank + 1) // world_size))
        self.mapped = isinstance(split.images, MappedImages)
        if self.mapped:  # stays on disk: read a batch at a time (_read)
            self.on_host, self.images = False, split.images
            self.num_workers = split.images.num_workers if num_workers is None else num_workers
        else:
            self.on_host = resolve_placement(placement, split.images.numel(), device) == "host"
            self.images = split.images.pin_memory() if self.on_host else split.images.to(device)
        self.labels = split.labels.to(device)
        self.batch_size, self.shuffle, self.augment, self.seed = batch_size, shuffle, augment, seed
        # drop a ragged last batch only when there is a full one (batch norm needs > 1 sample)
        self.drop_last = drop_last and self.images_per_epoch >= batch_size
        if preprocess is None:
            preprocess = Preprocessor.standardize(mean, std)
        self.preprocess = preprocess.to(device)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def images_per_epoch(self) -> int:
        """The images this process iterates over in an epoch (before dropping a ragged last batch)."""
        return len(self.labels) // self.world_size if self.shuffle else len(self.labels)

    def __len__(self) -> int:
        n = self.images_per_epoch
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        n = len(self.labels)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        if self.shuffle and self.world_size > 1:  # this process's share of the epoch's permutation
            order = order[self.rank:self.images_per_epoch * self.world_size:self.world_size]
            if self.rank > 0:  # its own augmentation draws (rank 0 goes on with the epoch's generator)
                gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch) * 1000 + self.rank)
        order_on_device = order.to(self.device)  # one copy per epoch
        spans = [slice(i * self.batch_size, (i + 1) * self.batch_size) for i in range(len(self))]

        def rows(span):  # in order (evaluation): a view of the stored images, no gather
            return order_on_device[span] if self.shuffle else span
        if self.mapped:
            images = self._read(order, spans)
        elif self.on_host:
            images = self._copied_ahead(order, spans)
        else:
            images = (self.images[rows(s)] for s in spans)
        # aug.alternate_flips: the epoch's mirror of each image of the split, indexed by each batch's images
        alternate = self.shuffle and hasattr(self.augment, "epoch_flips")
        flips = self.augment.epoch_flips(self.seed, n, self.epoch) if alternate else None
        for span, x in zip(spans, images):
            x = x.float().div_(255)
            if self.augment:
                x = self.augment(x, gen) if flips is None else self.augment(x, gen, hflip=flips[order[span]])
            yield self.preprocess(x), self.labels[rows(span)]

    def _copied_ahead(self, order: torch.Tensor, spans: list):
        """placement=host: the uint8 batches on the device, each gathered into one of two pinned buffers
        and copied on a side stream while the loop works on the batch before."""
        stream = torch.cuda.Stream(self.device)
        buffers = [torch.empty((self.batch_size, *self.images.shape[1:]), dtype=self.images.dtype).pin_memory()
                   for _ in range(2)]
        copied = [None, None]  # each buffer's last copy (an event): the buffer is refilled only after it

        def copy(i):
            idx, k = order[spans[i]], i % 2
            if copied[k] is not None:
                copied[k].synchronize()  # long done: it is two batches old
            buf = buffers[k][:len(idx)]
            torch.index_select(self.images, 0, idx, out=buf)
            with torch.cuda.stream(stream):
                on_device = buf.to(self.device, non_blocking=True)
                copied[k] = torch.cuda.Event()
                copied[k].record(stream)
            return on_device

        ahead = copy(0) if spans else None
        for i in range(len(spans)):
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(stream)
            x = ahead
            x.record_stream(current)  # its memory is not reused before the loop is done with it
            ahead = copy(i + 1) if i + 1 < len(spans) else None
            yield x

    def _read(self, order: torch.Tensor, spans: list):
        """A memory-mapped split: the uint8 batches read from the map by a DataLoader (self.num_workers
        processes, pinned memory on CUDA), on the device."""
        reader = DataLoader(
            self.images, batch_size=None, sampler=[order[span].tolist() for span in spans], num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator())  # its workers' seed from its own generator: the global RNG is untouched
        for x in reader:
            yield x.to(self.device, non_blocking=True)
