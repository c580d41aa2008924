"""airbench94 itself on the CPU, on cvtrain's 45,000 / 5,000 split of the CIFAR-10 JPGs: the reference for
experiment=cifar10_speedrun when no GPU is at hand (scripts/benchmark.py's speedrun section races the two on
CUDA, where airbench is meant to run).

    pip install airbench==0.1.8        # offline: pip install --no-deps ./airbench-0.1.8.tar.gz
    python scripts/airbench_cpu.py --cifar-root /tmp/cifar10 [--seed 0] [--epochs 9.9]

airbench's own code runs unchanged (make_net94, CifarLoader, train94, evaluate); only its device and dtype
choices are redirected for the CPU: .cuda() and .half() on its network leave it where it is, in float32;
its loaders read onto the CPU and keep float32 images; its CUDA timing events and synchronize do nothing
(the wall clock around the call is reported instead). Float32 only: under bfloat16 autocast airbench's
network did not learn on the CPU (20% validation accuracy after 7 epochs; not investigated further).
The data are cvtrain's load_data of `data=imagefolder data.root=<root>` (data.val_fraction 0.1,
data.split_seed 0), written in the format airbench's CifarLoader reads (benchmark.write_airbench_data):
test.pt holds the validation split. It prints airbench's per-epoch table and the validation accuracy
with its test-time augmentation (level 2, its published figure) and without.
"""
import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import AIRBENCH_INSTALL, compose_cfg, write_airbench_data  # noqa: E402
from cvtrain.config import register_configs  # noqa: E402
from cvtrain.data import load_data  # noqa: E402


class NoEvent:
    """torch.cuda.Event's stand-in: airbench times its epochs with CUDA events."""

    def __init__(self, **_):
        pass

    def record(self, *_):
        pass

    def elapsed_time(self, _) -> float:
        return 0.0


def on_the_cpu(utils) -> type:
    """Redirect airbench's device and dtype choices to the CPU in float32; returns the CPU CifarLoader."""
    torch.cuda.Event = NoEvent
    torch.cuda.synchronize = lambda *_, **__: None
    nn.Module.cuda = lambda self, *_, **__: self
    nn.Module.half = lambda self: self

    class CpuCifarLoader(utils.CifarLoader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "gpu": "cpu"})
            self.images = self.images.float()  # it stores float16 images for its float16 network

    utils.CifarLoader = CpuCifarLoader  # train94 builds its own test loader through this name
    return CpuCifarLoader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cifar-root", required=True, help="the CIFAR-10 JPGs: a folder with train/<class>/*.jpg")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=float, default=None, help="airbench's train_epochs (default: its 9.9)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    try:
        import airbench.utils as utils
        from airbench import lib_airbench94
    except ImportError as err:
        sys.exit(f"error: airbench is not importable ({err}); install it: {AIRBENCH_INSTALL}")
    if args.threads:
        torch.set_num_threads(args.threads)
    loader_cls = on_the_cpu(utils)
    register_configs()
    data = load_data(compose_cfg(["data=imagefolder", f"data.root={args.cifar_root}", "data.val_fraction=0.1",
                                  "data.split_seed=0"]).data)
    hyp = lib_airbench94.hyp
    epochs = hyp["opt"]["train_epochs"] if args.epochs is None else args.epochs
    print(f"airbench94 on the CPU, float32: {len(data.train.labels):,} training images, "
          f"{len(data.val.labels):,} validation images, {epochs} epochs, seed {args.seed}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_airbench_data(data.train, data.val, data.classes, Path(tmp) / "cifar10")
        torch.manual_seed(args.seed)
        with contextlib.chdir(folder.parent):  # train94 reads ./cifar10/test.pt for its per-epoch table
            t0 = time.perf_counter()
            train = loader_cls(str(folder), train=True, batch_size=hyp["opt"]["batch_size"], aug=hyp["aug"],
                               altflip=True)
            model = lib_airbench94.train94(train, epochs=epochs, verbose=True)
            seconds = time.perf_counter() - t0
            val = loader_cls(str(folder), train=False, batch_size=2000)
            tta = utils.evaluate(model, val, tta_level=hyp["net"]["tta_level"])
            plain = utils.evaluate(model, val, tta_level=0)
    print(f"airbench94 seed {args.seed}: validation accuracy {100 * tta:.2f}% with its TTA, {100 * plain:.2f}% "
          f"without | {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
