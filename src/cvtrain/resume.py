"""Resuming a run (trainer.resume): which checkpoint, with which settings, and the command that resumes.

    find_resume(cfg, run_dir)       trainer.resume=<path>: that file; =auto: the newest good checkpoint of
                                    the run dir (past damaged ones), or a fresh start with a note
    resumed_config(cfg, saved, keys)  the checkpoint's settings, except the keys the command line set;
                                    one warning lists what differs, another model is an error
    resume_command(run_dir)         the command line that continues this run in its own dir
    completed(run_dir)              whether the dir holds a completed run (written into only by a resume)
"""
import copy
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from cvtrain import UserError
from cvtrain.checkpoint import load_checkpoint
from cvtrain.hparams import flatten_config

log = logging.getLogger("cvtrain")


def completed(run_dir: Path) -> bool:
    """Whether run_dir's summary.json says the run completed."""
    try:
        return json.loads((Path(run_dir) / "summary.json").read_text()).get("status") == "completed"
    except (OSError, ValueError, AttributeError):
        return False


def _leaves(node, prefix: str) -> dict:
    """{dotted key: value} of a config value: flatten_config of a dict, {prefix: node} of a leaf."""
    return flatten_config(node, prefix + ".") if isinstance(node, dict) else {prefix: node}


def checkpoint_candidates(run_dir: Path) -> list[Path]:
    """The checkpoints a run dir holds: last.pt, step-<step>.pt, best.pt (not temporary files)."""
    folder = Path(run_dir) / "checkpoints"
    return [p for p in [folder / "last.pt", *sorted(folder.glob("step-*.pt")), folder / "best.pt"] if p.is_file()]


def find_resume(cfg, run_dir: Path) -> tuple[Any, Any]:
    """(path, checkpoint) to resume from, or (None, None) for a fresh start.

    trainer.resume=<path>: that file (an error when it is missing or damaged). trainer.resume=auto:
    the newest good checkpoint of this run dir (the most steps; at equal steps one written after
    validation), past damaged ones (a warning each), or a fresh start with a note when there is none.
    A run dir whose summary.json says completed is written into only by a resume."""
    resume = cfg.trainer.resume
    if not resume:
        _refuse_completed(run_dir)
        return None, None
    if str(resume) != "auto":
        return Path(resume), load_checkpoint(resume)
    for stale in (Path(run_dir) / "checkpoints").glob("*.tmp"):  # left by a killed writer: never a checkpoint
        stale.unlink(missing_ok=True)
    best = None
    for path in checkpoint_candidates(run_dir):
        try:
            saved = load_checkpoint(path)
        except UserError as err:
            log.warning("trainer.resume=auto: skipping a damaged checkpoint, falling back to an older one: %s", err)
            continue
        key = (saved["step"], saved.get("batch", 0) == 0, path.name != "best.pt")
        if best is None or key > best[0]:
            best = (key, path, saved)
    if best is None:
        log.info("trainer.resume=auto: no checkpoint in %s; starting a fresh run there", Path(run_dir) / "checkpoints")
        return None, None
    _, path, saved = best
    log.info("trainer.resume=auto: resuming from %s (step %d, epoch %d%s)", path, saved["step"], saved["epoch"],
             f" + {saved['batch']} batches" if saved.get("batch") else "")
    return path, saved


def _refuse_completed(run_dir: Path) -> None:
    if completed(run_dir):
        raise UserError(f"{run_dir} holds a completed run (summary.json); choose another hydra.run.dir, or "
                        "continue that run with trainer.resume=auto and a larger trainer.epochs")


def command_line_keys():
    """The config keys set on the command line (a group choice such as model=mlp: the group's key),
    or None outside a Hydra run (then every setting of the composed config counts as set)."""
    if not HydraConfig.initialized():
        return None
    keys = []
    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]
        keys.append(key)
    return keys


def resumed_config(cfg, saved: dict, keys) -> Any:
    """The resumed run's config: the checkpoint's, except what the command line set (`keys`, None: all of
    it). Every setting that differs from the checkpoint's is listed in one warning; another model is an
    error naming the difference."""
    now = OmegaConf.to_container(cfg, resolve=True)
    before = saved["config"]
    merged = copy.deepcopy(cfg)
    if keys is not None:
        overridden = set(keys)
        with open_dict(merged):
            for group, value in before.items():
                if group in ("task", "hydra") or group not in now or group in overridden:
                    continue
                if isinstance(value, dict) and isinstance(now[group], dict) and OmegaConf.is_config(merged[group]) \
                        and OmegaConf.get_type(merged[group]) is not dict:  # a typed group: key by key
                    for key, leaf in _leaves(value, group).items():
                        if key not in overridden and not any(key.startswith(k + ".") for k in overridden) \
                                and OmegaConf.select(merged, key, default="<missing>") != "<missing>":
                            OmegaConf.update(merged, key, leaf, merge=False)
                else:  # a `name:` group (model, optim, ...): the checkpoint's node, with this command line's keys
                    merged[group] = value
                    for key in overridden:
                        if key.startswith(group + "."):
                            OmegaConf.update(merged, key, OmegaConf.select(cfg, key), merge=False)
    after = OmegaConf.to_container(merged, resolve=True)
    _check_model(before.get("model"), after.get("model"))
    old = flatten_config({k: v for k, v in before.items() if k != "task"})
    new = flatten_config({k: v for k, v in after.items() if k != "task"})
    changed = [f"{key} {old.get(key, '(unset)')} -> {new.get(key, '(unset)')}"
               for key in sorted(set(old) | set(new))
               if key != "trainer.resume" and old.get(key, "(unset)") != new.get(key, "(unset)")]
    if changed:
        log.warning("resuming with %d setting(s) that differ from the checkpoint's: %s", len(changed), "; ".join(changed))
    return merged


def _check_model(before, now) -> None:
    if before is None or before == now:
        return
    old, new = _leaves(before, "model"), _leaves(now, "model")
    diff = [f"{key} {old.get(key, '(unset)')} -> {new.get(key, '(unset)')}"
            for key in sorted(set(old) | set(new)) if old.get(key, "(unset)") != new.get(key, "(unset)")]
    raise UserError(f"trainer.resume: the checkpoint was trained with another model ({'; '.join(diff)}); "
                    "resume with the same model settings")


def resume_command(run_dir: Path) -> str:
    """The command that continues this run in its run dir: this command line (a sweep trial: its own
    overrides) with trainer.resume=auto hydra.run.dir=<run dir>."""
    if HydraConfig.initialized():
        args = list(HydraConfig.get().overrides.task)
    else:
        args = [a for a in sys.argv[1:] if not a.startswith("-")]
    args = [a for a in args if not a.lstrip("+~").startswith(("trainer.resume=", "hydra.run.dir="))]
    return " ".join(["python -m cvtrain", *map(shlex.quote, args), "trainer.resume=auto",
                     shlex.quote(f"hydra.run.dir={Path(run_dir).resolve()}")])
