"""data=imagefolder's cache: the images decoded once into a memory-mapped uint8 file under data.cache_dir.

One folder per tree, <data.cache_dir>/imagefolder-<root name>-<key>/:

    images.npy  uint8 (N, C, H, W), the images of every split one after the other (numpy's .npy: a short
                header, then the raw bytes, so np.load(mmap_mode=...) maps the file without reading it)
    index.pt    {"key", "shape", "skipped", "splits": {name: {"rows", "labels"}}}: the rows of images.npy
                that hold each split's images (an image left out as unreadable leaves its row unused), and
                their labels

The key hashes the root, every file's path, size and mtime, data.image_size and data.on_bad_image=skip: a
changed tree or image size is another folder, decoded anew (an old folder stays until removed by hand). A
build writes a temporary folder and renames it when complete, so a killed build never leaves a cache that
looks valid; the next build removes what a killed one left. Decoding runs in data.num_workers processes
(forked where the system can), a chunk of files each, written straight into the map; a progress bar shows
on a terminal. Every split is decoded alike: grayscale when every image of the tree is, else RGB.

data.in_memory chooses what the splits hold: true, the images read into memory (tensors, as every other
source gives); false, MappedImages (rows of the map, which the loader reads a batch at a time: through a
DataLoader with data.num_workers workers, or by index in the training process with 0); auto, in memory when
they take at most MEMORY_SHARE of the available memory.
"""
import hashlib
import logging
import math
import multiprocessing
import os
import shutil
import socket
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from cvtrain import UserError
from cvtrain.checkpoint import process_alive
from cvtrain.checks import IN_MEMORY
from cvtrain.data import decode

log = logging.getLogger("cvtrain")

MEMORY_SHARE = 0.5  # data.in_memory=auto: in memory when the images take at most this share of the available memory
CHUNK = 256  # files per task of a worker process
IMAGES, INDEX = "images.npy", "index.pt"


def worker_count(num_workers: Optional[int]) -> int:
    """data.num_workers: null is min(8, the CPUs); 0 decodes and reads in the main process."""
    return min(8, os.cpu_count() or 1) if num_workers is None else int(num_workers)


def available_memory() -> Optional[int]:
    """Bytes that can be allocated without swapping: MemAvailable of /proc/meminfo, else the free physical
    pages (os.sysconf); None when neither says."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def resolve_in_memory(setting, nbytes: int, where) -> bool:
    """data.in_memory for `nbytes` of decoded images: True (read into memory) or False (memory-mapped)."""
    value = str(setting).lower()  # Hydra turns data.in_memory=true into the string "True"
    if value not in IN_MEMORY:
        raise UserError(f"data.in_memory={setting} is unknown; choose one of {', '.join(IN_MEMORY)}")
    if value != "auto":
        in_memory = value == "true"
    else:
        available = available_memory()
        in_memory = available is None or nbytes <= MEMORY_SHARE * available
        log.info("data.in_memory=auto: %.2f GB of decoded images, %s available", nbytes / 1e9,
                 "unknown memory" if available is None else f"{available / 1e9:.1f} GB")
    if not in_memory:
        log.info("data.in_memory=%s: the images stay memory-mapped in %s, read a batch at a time", value, where)
    return in_memory


class MappedImages:
    """uint8 images (N, C, H, W) that stay on disk: rows `rows` of the memory-mapped .npy file `path`
    (data/mapped.py writes it), read only when asked for.

    To the code that uses split.images it is a read-only CPU tensor: shape, dtype, device, len, numel, dim,
    indexing (a tensor of the rows asked for, read from the map), split(n) (chunks, read one at a time) and
    to()/cpu() (all of it, read into memory: for small splits). subset(index) is a smaller view: nothing is
    read. The loader reads it in batches through a DataLoader with `num_workers` processes (data.num_workers):
    a worker gets the path, not the pages, and maps the file itself.
    """

    dtype = torch.uint8
    device = torch.device("cpu")

    def __init__(self, path, rows: torch.Tensor, image_shape, num_workers: int = 0):
        self.path, self.rows, self.num_workers = str(path), rows, num_workers
        self.shape = torch.Size((len(rows), *image_shape))
        self._map = None

    @property
    def file(self) -> torch.Tensor:
        """Every image of the file, memory-mapped (copy-on-write: nothing is ever written back)."""
        if self._map is None:
            self._map = torch.from_numpy(np.load(self.path, mmap_mode="c"))
        return self._map

    def __getstate__(self) -> dict:  # to a worker process: the path, not the map
        return {**self.__dict__, "_map": None}

    def __len__(self) -> int:
        return len(self.rows)

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return self.shape.numel()

    def __getitem__(self, key) -> torch.Tensor:
        """The images at `key` (an int, a slice or an index tensor into this split), read from the map in the
        file's order (for locality) and returned in the order asked for."""
        rows = self.rows[key]
        if rows.dim() == 0:
            return self.file[rows].clone()
        ordered, where = rows.sort()
        images = torch.index_select(self.file, 0, ordered)  # row by row, one memcpy each
        return images if torch.equal(ordered, rows) else images.index_select(0, where.argsort())

    def split(self, size: int):
        return (self[i:i + size] for i in range(0, len(self), size))

    def to(self, *args, **kwargs) -> torch.Tensor:
        return self[:].to(*args, **kwargs)

    def cpu(self) -> torch.Tensor:
        return self[:]

    def subset(self, index: torch.Tensor) -> "MappedImages":
        return MappedImages(self.path, self.rows[index], self.shape[1:], self.num_workers)

    def __repr__(self) -> str:
        return f"MappedImages({tuple(self.shape)}, {self.path})"


# --- the cache folder ------------------------------------------------------------------------------------------

@dataclass
class ImageCache:
    path: Path  # the folder
    shape: tuple  # (C, H, W)
    splits: dict  # name -> {"rows": int64 rows of images.npy, "labels": int64}
    num_workers: int  # data.num_workers: the loader's reader processes for MappedImages

    @property
    def nbytes(self) -> int:
        """The bytes of every split's images."""
        return sum(len(s["rows"]) for s in self.splits.values()) * math.prod(self.shape)

    def split(self, name: str, in_memory: bool) -> Optional[tuple]:
        """(images, labels) of split `name` (None when the tree has none): read into memory, or left in the map."""
        if name not in self.splits:
            return None
        images = MappedImages(self.path / IMAGES, self.splits[name]["rows"], self.shape, self.num_workers)
        return images[:] if in_memory else images, self.splits[name]["labels"]


def cache_key(root: Path, splits: dict, image_size, on_bad_image: str) -> str:
    """The tree's files, their sizes and mtimes, the image size (and skip: a cache of a tree with bad images
    left out must not serve error mode)."""
    files = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for fs in splits.values() for p, _ in fs]
    skip = ["skip"] if on_bad_image == "skip" else []
    return hashlib.sha1(repr((str(root), image_size, files, *skip)).encode()).hexdigest()[:16]


def open_or_build(root: Path, splits: dict, image_size: Optional[int], on_bad_image: str, cache_dir: Path,
                  num_workers: int) -> ImageCache:
    """The cache of `splits` ({name: [(path, label)]} under `root`): the complete one, else built now."""
    path = cache_dir / f"imagefolder-{root.name}-{cache_key(root, splits, image_size, on_bad_image)}"
    built = not (path / INDEX).exists()
    if built:
        build(path, splits, image_size, on_bad_image, num_workers, root)
    index = torch.load(path / INDEX, weights_only=True)
    if index["skipped"] and not built:
        log.warning("data.on_bad_image=skip: skipped %d unreadable image(s) under %s (as cached)",
                    index["skipped"], root)
    return ImageCache(path, tuple(index["shape"]), index["splits"], num_workers)


def build(path: Path, splits: dict, image_size: Optional[int], on_bad_image: str, num_workers: int,
          root: Path = None) -> None:
    """Decode `splits` into the cache folder `path`, in `num_workers` processes (0: this one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(path)
    if (path / INDEX).exists():  # another process (a DDP rank) has just built it
        return
    if path.exists():  # the folder without its index: not a cache (half removed by hand)
        shutil.rmtree(path)
    tmp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    count = sum(len(files) for files in splits.values())
    log.info("decoding %d images under %s into %s (%d worker process%s)", count, root or path, path, num_workers,
             "" if num_workers == 1 else "es")
    start = time.perf_counter()
    pool = _pool(num_workers)
    try:
        # 1. the headers: the mode every image is decoded as (grayscale when all are), the files that open
        tasks = [(name, files[i:i + CHUNK], on_bad_image) for name, files in splits.items()
                 for i in range(0, len(files), CHUNK)]
        modes, readable, skipped = set(), {name: [] for name in splits}, []
        results = _progress(pool.map(_headers_task, tasks), [len(task[1]) for task in tasks], "headers")
        for (name, _, _), (chunk_modes, ok, bad) in zip(tasks, results):
            modes |= chunk_modes
            readable[name] += ok
            skipped += bad
        mode = decode.mode_of(modes)
        first = next((files[0][0] for files in readable.values() if files), None)
        if first is None:
            raise UserError(f"no readable images among {count} files (data.on_bad_image=skip left them all out)")
        with Image.open(first) as img:
            size = (image_size, image_size) if image_size else img.size[::-1]  # (H, W)
        shape = (1 if mode == "L" else 3, *size)
        # 2. the images: each chunk into its rows of the map (an unreadable one leaves its row unused)
        rows = np.lib.format.open_memmap(tmp / IMAGES, mode="w+", dtype=np.uint8,
                                         shape=(sum(map(len, readable.values())), *shape))
        del rows  # the header is written, the file sized; the workers write the rows
        tasks, start_row = [], 0
        for name, files in readable.items():
            for i in range(0, len(files), CHUNK):
                tasks.append((name, str(tmp / IMAGES), start_row, files[i:i + CHUNK], mode, image_size, size,
                              on_bad_image))
                start_row += len(files[i:i + CHUNK])
        index = {name: {"rows": [], "labels": []} for name in splits}
        results = _progress(pool.map(_decode_task, tasks), [len(task[3]) for task in tasks], "decoding")
        for (name, _, first_row, *_), (labels, bad) in zip(tasks, results):
            index[name]["rows"].append(torch.arange(first_row, first_row + len(labels)))
            index[name]["labels"].append(labels)
            skipped += bad
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pool.shutdown()
    for name, files in splits.items():
        if not sum(map(len, index[name]["labels"])):
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"no readable images among {len(files)} files of the {name} split "
                            "(data.on_bad_image=skip left them all out)")
    if skipped:
        log.warning("data.on_bad_image=skip: skipped %d unreadable image(s) under %s (first: %s)",
                    len(skipped), root or path, skipped[0])
    torch.save({"key": path.name, "shape": list(shape), "skipped": len(skipped),
                "splits": {name: {k: torch.cat(v) for k, v in split.items()} for name, split in index.items()}},
               tmp / INDEX)
    try:
        os.replace(tmp, path)  # complete: from now on the cache is valid
    except OSError:  # another process (a DDP rank) built the same cache first: keep that one
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / INDEX).exists():
            raise
    seconds = time.perf_counter() - start
    log.info("decoded %d images in %.1f s (%.0f images/s)", count, seconds, count / max(seconds, 1e-9))


def _remove_abandoned(path: Path) -> None:
    """The temporary folders of killed builds of `path` on this host (their process is gone)."""
    for tmp in path.parent.glob(f"{path.name}.tmp-{socket.gethostname()}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


# --- the worker processes ------------------------------------------------------------------------------------

class _InProcess:
    """num_workers=0: the tasks run here, one after the other."""

    @staticmethod
    def map(fn, tasks):
        return map(fn, tasks)

    def shutdown(self, wait=True, cancel_futures=False):
        pass


def _pool(num_workers: int):
    if num_workers == 0:
        return _InProcess()
    methods = multiprocessing.get_all_start_methods()  # fork: no re-import of torch in every worker
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    return ProcessPoolExecutor(num_workers, mp_context=context, initializer=torch.set_num_threads, initargs=(1,))


def _progress(results, sizes: list, what: str):
    """The tasks' results in order, with a progress bar (on a terminal) counting their images."""
    with tqdm(total=sum(sizes), desc=f"imagefolder {what}", unit="img", disable=None, leave=False) as bar:
        for size, result in zip(sizes, results):
            bar.update(size)
            yield result


def _headers_task(task):
    _, files, on_bad_image = task
    return decode.read_headers(files, on_bad_image)


def _decode_task(task):
    """Decode a chunk of files into consecutive rows of the map from `start_row`: (their labels, skipped files)."""
    _, npy, start_row, files, mode, image_size, size, on_bad_image = task
    images, labels, skipped = decode.decode(files, image_size, on_bad_image, mode=mode, size=size)
    if len(labels):
        rows = np.load(npy, mmap_mode="r+")
        rows[start_row:start_row + len(labels)] = images.numpy()
        rows.flush()
        del rows
    return labels, skipped
