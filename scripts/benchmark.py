"""Framework overhead: cvtrain's training throughput beside a plain hand-written loop.

Both train the same model (same init), on the same in-memory data, with the
same optimizer and batch size, for one epoch each, alternating rounds so that
machine noise hits both alike. cvtrain's figure is the `train_images_per_s` it
writes to summary.json (monitoring and TensorBoard logging on, as configured).

    python scripts/benchmark.py data=mnist data.root=../shared/data data.download=false
    python scripts/benchmark.py                      # embedded digits, quick
Extra arguments are cvtrain config overrides.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from cvtrain.config import register_configs
from cvtrain.data import load_data
from cvtrain.device import resolve_device
from cvtrain.models import build_model
from cvtrain.optim import build_optimizer
from cvtrain.tasks.train import train


def plain_loop_images_per_s(cfg, data, device) -> float:
    """What one would write by hand: shuffle, slice, normalize, forward, backward, step."""
    torch.manual_seed(cfg.trainer.seed)
    model = build_model(cfg.model, data.shape, data.num_classes).to(device)
    optimizer = build_optimizer(cfg.optim, model)
    loss_fn = torch.nn.CrossEntropyLoss()
    images, labels = data.train.images.to(device), data.train.labels.to(device)
    mean, std = data.mean.to(device).view(1, -1, 1, 1), data.std.to(device).view(1, -1, 1, 1)
    bs, steps = cfg.data.batch_size, len(labels) // cfg.data.batch_size
    model.train()
    start = time.perf_counter()
    order = torch.randperm(len(labels), device=device)
    for i in range(steps):
        idx = order[i * bs:(i + 1) * bs]
        x = (images[idx].float() / 255 - mean) / std
        loss = loss_fn(model(x), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * bs / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median reported)")
    args, overrides = parser.parse_known_args()
    register_configs()
    with initialize_config_module(config_module="cvtrain.configs", version_base="1.3"):
        cfg = compose("config", overrides=["trainer.epochs=1", "trainer.checkpoint=false",
                                           "trainer.progress=false", *overrides])
    device = resolve_device(cfg.trainer.device)
    data = load_data(cfg.data)
    print(f"model={cfg.model.name} data={cfg.data.name} {len(data.train)} train images, "
          f"batch {cfg.data.batch_size}, device {device}, monitor_every={cfg.trainer.monitor_every}, "
          f"torch threads {torch.get_num_threads()}")
    plain_loop_images_per_s(cfg, data, device)  # warm-up: allocator, kernels, caches
    plain, framework = [], []
    for r in range(args.rounds):
        plain.append(plain_loop_images_per_s(cfg, data, device))
        with tempfile.TemporaryDirectory() as run_dir:
            framework.append(train(cfg, Path(run_dir))["train_images_per_s"])
        print(f"round {r + 1}: plain {plain[-1]:,.0f} img/s | cvtrain {framework[-1]:,.0f} img/s", flush=True)
    p, f = statistics.median(plain), statistics.median(framework)
    print(f"median: plain {p:,.0f} img/s | cvtrain {f:,.0f} img/s | overhead ratio (plain/cvtrain) {p / f:.3f}")
    return 0 if p / f < 1.10 else 1


if __name__ == "__main__":
    sys.exit(main())
