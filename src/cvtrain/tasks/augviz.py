"""task=augviz: what the configured augmentation does, as a grid of training images.

    python -m cvtrain task=augviz aug=strong data=cifar10 data.root=...

Row r of the grid is training image r (of the first task.images) as stored (first column) followed by task.views
augmented copies of it, drawn as training would draw them: the aug group's per-image
ops (BatchAugment, seeded with trainer.seed like the loader's first epoch), then mixup /
cutmix when they are on (BatchMix, mixing the views with each other). Pixels are shown
before preprocessing (data.preprocess), on [0, 1]. The grid goes to TensorBoard as the
image `augviz/<aug choice>` in <run dir> (its event file) and to <run dir>/augviz.png.
"""
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid, save_image

from cvtrain.data import BatchAugment, load_data
from cvtrain.data.augment import BatchMix, mix_generator
from cvtrain.data.loader import epoch_seed
from cvtrain.device import resolve_device
from cvtrain.hparams import group_choices


@torch.no_grad()
def augmented_grid(images: torch.Tensor, labels: torch.Tensor, aug_cfg, seed: int, views: int) -> torch.Tensor:
    """(N * (views + 1), C, H, W) on [0, 1]: for each image, itself and `views` augmented copies."""
    n = len(images)
    x = images.float().div(255).repeat(views, 1, 1, 1)  # view-major: view v of image i at v * n + i
    y = labels.repeat(views)
    augment = BatchAugment(aug_cfg)
    if augment:
        x = augment(x, torch.Generator().manual_seed(epoch_seed(seed, 0)))  # as the loader's first epoch
    mix = BatchMix(aug_cfg)
    if mix:
        x, *_ = mix(x, y, mix_generator(seed, 0))
    x = x.view(views, n, *x.shape[1:]).transpose(0, 1)  # n, views, C, H, W
    tiles = torch.cat([images.float().div(255).unsqueeze(1).to(x.device), x], 1)
    return tiles.flatten(0, 1)


def run(cfg, run_dir: Path, emit=print) -> None:
    """The task: write the grid of the first task.images training images, each with task.views augmented
    views, to TensorBoard and augviz.png; print the PNG's path."""
    run_dir = Path(run_dir)
    device = resolve_device(cfg.trainer.device)
    data = load_data(cfg.data)
    count = min(cfg.task.images, len(data.train))
    tiles = augmented_grid(data.train.images[:count].to(device), data.train.labels[:count].to(device), cfg.aug,
                           cfg.trainer.seed, cfg.task.views)
    grid = make_grid(tiles.clamp(0, 1).cpu(), nrow=cfg.task.views + 1, padding=2, pad_value=1.0)
    run_dir.mkdir(parents=True, exist_ok=True)
    png = run_dir / "augviz.png"
    save_image(grid, png)
    writer = SummaryWriter(str(run_dir))
    writer.add_image(f"augviz/{group_choices().get('aug', 'custom')}", grid, 0)
    writer.close()
    emit(str(png))
