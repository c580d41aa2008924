"""trainer.device -> a torch.device, with a clear error for a device this machine does not have."""
import torch

from cvtrain import UserError


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when available, else the CPU; cpu, cuda, cuda:N as written."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name} but CUDA is not available here; use trainer.device=cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"trainer.device={name} is not a device; use auto, cpu, cuda or cuda:N") from None
