"""Checkpoints: plain dicts of tensors and Python values, written atomically and
read back with torch.load(weights_only=True).

Contents: model, optimizer, scheduler, epoch (completed), step, best_val_acc,
RNG states, the resolved config as a plain dict, and the data's normalization
statistics, class names and image shape.
"""
import os
from pathlib import Path

import torch

from cvtrain import UserError


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; trainer.resume takes a file such as "
                        "outputs/<run>/checkpoints/last.pt")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise UserError(f"{path} is not a cvtrain checkpoint ({type(err).__name__}: {err})") from None
