"""Batched data augmentation: tensor ops on a whole float batch (B, C, H, W) on its device.

Random draws come from the loader's seeded generator, so an epoch's augmentation
is the same whenever it is replayed (reproducible runs, exact resume).
"""
import torch
import torch.nn.functional as F


def random_hflip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(len(x), generator=gen) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by `padding` and cut a random window of the original size from each image."""
    b, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy, dx = (torch.randint(0, 2 * padding + 1, (2, b), generator=gen)).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # B,1,H,1
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # B,1,1,W
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


class BatchAugment:
    """The `aug` config group as a callable on float batches in [0, 1]."""

    def __init__(self, aug_cfg):
        self.hflip = aug_cfg.hflip
        self.crop_padding = aug_cfg.crop_padding

    def __bool__(self) -> bool:
        return self.hflip or self.crop_padding > 0

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.crop_padding > 0:
            x = random_crop(x, self.crop_padding, gen)
        if self.hflip:
            x = random_hflip(x, gen)
        return x
