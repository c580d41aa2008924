"""Checkpoints: plain dicts of tensors and Python values, written durably and read back with
torch.load(weights_only=True).

Contents: model, optimizer, scheduler, epoch (completed), step, best_val_acc, RNG states, the
position inside the epoch (batch, the epoch's running totals, the mixing generator's state: a
mid-epoch checkpoint resumes at the exact batch), the resolved config as a plain dict, and the
data's normalization statistics, class names and image shape.

Durable: written to a temporary file in the same directory, flushed and fsynced, renamed over the
old file (os.replace, atomic), then the directory is fsynced, so after a crash or a power cut the
path holds either the old or the new checkpoint, complete. Safe: torch.load(weights_only=True)
refuses a file that needs arbitrary unpickling (a pickle that could run code) before running any
of it; a damaged or truncated file is named in a one-line UserError.
"""
import os
import pickle
import re
from pathlib import Path

import torch

from cvtrain import UserError

REQUIRED = ("model", "optimizer", "scheduler", "epoch", "step", "rng", "config")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in directory `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (signal 0 checks without sending anything): the
    clean-ups after killed processes use it (data/mapped.py's builds, task=search's trials)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a hidden temporary file beside `path` and os.replace it over `path`: a reader (or a
    crash) sees the old file or the new one, never half of it. Small records and tables (metrics.jsonl on a
    resume, results.csv, trial and restart records, the search's files); checkpoints: save_checkpoint."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(path: Path, state: dict, durable: bool = True) -> None:
    """Write to a temporary file in the same directory, flush + fsync it, os.replace it over `path`,
    fsync the directory: a crash never leaves a half-written or lost checkpoint at `path`.
    durable=False skips the two fsyncs (still atomic against a crash of the process, not of the machine)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:  # a full disk, lost permissions, a read-only file system
        tmp.unlink(missing_ok=True)
        kept = f"the previous {path.name} is intact" if path.is_file() else f"no {path.name} was written"
        raise UserError(f"cannot write checkpoint {path} ({err.strerror or err}); {kept}. Free space or fix the "
                        "folder's permissions, then continue with trainer.resume=auto "
                        f"hydra.run.dir={path.parent.parent}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def load_checkpoint(path, map_location="cpu") -> dict:
    """The checkpoint at `path`, or a one-line UserError: missing, refused (it would need arbitrary
    unpickling: nothing in it is run), damaged or truncated, or not a cvtrain checkpoint."""
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a directory, not a checkpoint file; trainer.resume takes a file such as "
                        f"{path}/checkpoints/last.pt (or trainer.resume=auto with hydra.run.dir={path})")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; trainer.resume takes a file such as "
                        "outputs/<run>/checkpoints/last.pt (or trainer.resume=auto with hydra.run.dir=<run dir>)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Weights only load failed" in text or "Unsupported global" in text or "weights_only" in text:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"GLOBAL ([\w.]+)", text)
            what = f" (it references {found.group(1)})" if found else ""
            raise UserError(f"refused to load {path}: it is not a plain checkpoint of tensors and Python values "
                            f"but a pickle that needs arbitrary unpickling{what}, which could run code; "
                            "cvtrain loads checkpoints with weights_only=True and ran nothing from it. "
                            "Use a checkpoint that cvtrain wrote") from None
        raise UserError(f"checkpoint {path} is damaged or truncated ({_first_line(err)}); "
                        "use another checkpoint (trainer.resume=auto falls back to the newest good one)") from None
    except Exception as err:  # noqa: BLE001  a truncated zip, a bad record, garbage
        raise UserError(f"checkpoint {path} is damaged or truncated ({type(err).__name__}: {_first_line(err)}); "
                        "use another checkpoint (trainer.resume=auto falls back to the newest good one)") from None
    missing = [key for key in REQUIRED if not isinstance(state, dict) or key not in state]
    if missing:
        raise UserError(f"{path} is not a cvtrain checkpoint (it lacks {', '.join(missing)}); "
                        "trainer.resume takes a checkpoints/last.pt, best.pt or step-<step>.pt that cvtrain wrote")
    return state


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0].split(". ")[0].rstrip(".") if lines else type(err).__name__
