"""The cost of durable checkpoints: save_checkpoint of a LeNet-on-CIFAR-10 checkpoint (model, Adam
state, the rest as a training run writes it) with and without the two fsyncs, median of --rounds.

    python scripts/bench_checkpoint.py [--rounds 20] [--dir outputs/bench_checkpoint]

A training run writes last.pt every epoch (and best.pt on a new best), so the per-epoch overhead
is the fsync cost of one or two such saves.
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cvtrain.checkpoint import rng_state, save_checkpoint
from cvtrain.models import build_model
from omegaconf import OmegaConf


def lenet_checkpoint() -> dict:
    model = build_model(OmegaConf.create({"name": "lenet", "variant": "modern", "activation": None}), (3, 32, 32), 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(8, 3, 32, 32)).sum().backward()
    optimizer.step()  # Adam's moments exist
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": {"steps": 352, "epochs": 1},
            "epoch": 1, "step": 352, "best_val_acc": 0.5, "best_epoch": 1, "rng": rng_state(), "config": {},
            "data": {"mean": torch.zeros(3), "std": torch.ones(3)}}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary dir under outputs/)")
    args = parser.parse_args()
    state = lenet_checkpoint()
    folder = Path(args.dir or tempfile.mkdtemp(prefix="bench_checkpoint_", dir=Path("outputs").resolve()
                                               if Path("outputs").is_dir() else None))
    times = {True: [], False: []}
    for _ in range(args.rounds):
        for durable in (False, True):  # alternating
            t0 = time.perf_counter()
            save_checkpoint(folder / "last.pt", state, durable=durable)
            times[durable].append(time.perf_counter() - t0)
    size = (folder / "last.pt").stat().st_size
    plain, durable = statistics.median(times[False]), statistics.median(times[True])
    print(f"LeNet on CIFAR-10 checkpoint, {size / 1e6:.1f} MB, in {folder}, median of {args.rounds}: "
          f"without fsync {plain * 1e3:.1f} ms, with fsync {durable * 1e3:.1f} ms, "
          f"overhead {(durable - plain) * 1e3:.1f} ms per save (last.pt: one per epoch; best.pt: one more)")


if __name__ == "__main__":
    main()
