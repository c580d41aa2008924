"""task=ensemble: average the predicted class probabilities of several trained models and report each
member's accuracy, the ensemble's, and the accuracy against the ensemble's size.

    python -m cvtrain task=ensemble task.members=[outputs/<date>/<run1>,outputs/<date>/<run2>]
    python -m cvtrain task=ensemble task.members=[outputs/sweep-0101-120000] task.top_k=3 trainer.test=true
    python -m cvtrain task=ensemble task.members=[<a run of trainer.keep_snapshots=5>]   # a snapshot ensemble

task.members, in any mix (resolved in this order, a file named twice counts once):
  - a checkpoint file (.pt): its "model" weights (best.pt of trainer.select=ema: the moving average's);
  - a run dir (it holds checkpoints/): task.checkpoint=auto (default) takes all its snapshot-<cycle>.pt
    when it has any (trainer.keep_snapshots: one run's snapshot ensemble), else its best.pt;
    best | last | snapshots take that kind only;
  - a sweep or search dir (run dirs below it, up to 3 levels deep): its completed runs (summary.json
    status completed) ranked by summary.json best_val_acc, the best task.top_k of them (0: all), each
    taken as a run dir.

Every member is rebuilt from its checkpoint alone (trained.load_trained: its model config, classes,
image shape and fitted preprocessing), so the members may be any mix of architectures (kNN too: its
vote fractions are its probabilities) trained on the same classes and image size; each applies its
own preprocessing (its own training split's statistics) to the same uint8 images. Other classes (or
class order) or another image shape among the members, or in the data, is an error before anything is
evaluated.

The data: the first member's data config (its source, root, split), with the command line's data
settings on top (data=... replaces it, data.root=... changes that key); members trained on another
split (data.split_seed, val_fraction, ...) get a warning: some of the validation images may be
training images of theirs. trainer.device, trainer.tta (the members' scores averaged over the views
before the softmax, as in training's validation) and trainer.test (the test split too) apply.

The ensemble's prediction is the mean of the members' softmax probabilities, its loss the negative log
of the mean probability of the true class (the members' loss: their cross-entropy, on the same
scale). Accuracy against the ensemble's size: the members sorted by their own validation accuracy
(best first; ties in the order given), the first 1, 2, ..., N of them averaged; the last is the
ensemble of all. The test split uses the same order (chosen on val).

Writes into the run dir: ensemble.json (members, their figures, the ensemble's, the accuracy by size)
and ensemble.png (accuracy against size, val and test, the best single member marked); logs a table.
Returns the ensemble's validation accuracy (Hydra's objective). No summary.json: not a training run.
"""
import json
import logging
import math
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf

from cvtrain import UserError
from cvtrain.data import InMemoryLoader, load_data
from cvtrain.device import resolve_device
from cvtrain.loop import TTA, predict
from cvtrain.resume import command_line_keys
from cvtrain.table import format_table
from cvtrain.trained import TrainedModel, load_trained

log = logging.getLogger("cvtrain")

CHECKPOINT = ("auto", "best", "last", "snapshots")  # task.checkpoint: what a run dir contributes
SEARCH_DEPTH = 3  # a sweep or search dir: run dirs this many levels below it at most
# data keys that decide which images are in which split: members that differ in them saw other splits
SPLIT_KEYS = ("name", "val_fraction", "split_seed", "image_size", "channels", "num_classes", "num_samples",
              "num_test", "noise")


def check_task(task_cfg) -> None:
    """task.members, task.top_k, task.checkpoint: a UserError before any work."""
    members = task_cfg.get("members")
    if not members:
        raise UserError("task.members is empty: list the checkpoints (.pt), run dirs or sweep/search dirs to "
                        "ensemble, e.g. task.members=[outputs/<date>/<run1>,outputs/<date>/<run2>]")
    if not (OmegaConf.is_list(members) or isinstance(members, (list, tuple))):
        raise UserError(f"task.members={members} must be a list, e.g. task.members=[{members}]")
    top_k = task_cfg.get("top_k", 0)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise UserError(f"task.top_k={top_k}: the best runs of a sweep or search dir to take: 0 (all) or more")
    which = task_cfg.get("checkpoint", "auto")
    if which not in CHECKPOINT:
        raise UserError(f"task.checkpoint={which} is unknown; choose one of {', '.join(CHECKPOINT)} (what a run dir "
                        "contributes: auto = its snapshot-*.pt when it has any, else best.pt)")


def _cycle(path: Path) -> int:
    number = path.stem.removeprefix("snapshot-")
    return int(number) if number.isdigit() else -1


def run_dir_checkpoints(run_dir: Path, which: str) -> list[Path]:
    """The checkpoints a run dir contributes (task.checkpoint; see the module doc)."""
    folder = run_dir / "checkpoints"
    snapshots = sorted(folder.glob("snapshot-*.pt"), key=_cycle)
    if which in ("auto", "snapshots") and snapshots:
        return snapshots
    if which == "snapshots":
        raise UserError(f"task.members: {run_dir} holds no checkpoints/snapshot-*.pt (trained without "
                        "trainer.keep_snapshots); use task.checkpoint=auto or best")
    name = "last.pt" if which == "last" else "best.pt"
    if not (folder / name).is_file():
        raise UserError(f"task.members: {run_dir} holds no checkpoints/{name} (trained with trainer.checkpoint=false, "
                        "or not finished?); name a checkpoint file instead")
    return [folder / name]


def _is_run_dir(path: Path) -> bool:
    return (path / "checkpoints").is_dir()


def runs_below(folder: Path, depth: int = 1) -> list[Path]:
    """The run dirs (with checkpoints/) below `folder`, up to SEARCH_DEPTH levels down, in name order."""
    found = []
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if _is_run_dir(child):
            found.append(child)
        elif depth < SEARCH_DEPTH:
            found += runs_below(child, depth + 1)
    return found


def ranked_runs(folder: Path, top_k: int) -> list[Path]:
    """A sweep or search dir's completed runs, best summary.json best_val_acc first, the first top_k (0: all)."""
    scored, skipped = [], []
    for run in runs_below(folder):
        try:
            summary = json.loads((run / "summary.json").read_text())
        except (OSError, ValueError):
            summary = {}
        acc = summary.get("best_val_acc") if isinstance(summary, dict) else None
        if summary.get("status") == "completed" and isinstance(acc, (int, float)) and math.isfinite(acc):
            scored.append((acc, run))
        else:
            skipped.append(run.name)
    if not scored:
        raise UserError(f"task.members: {folder} is neither a checkpoint, a run dir (with checkpoints/) nor a dir of "
                        "completed runs (run dirs with checkpoints/ and a summary.json of status completed, "
                        f"up to {SEARCH_DEPTH} levels down)")
    if skipped:
        log.info("%s: %d run(s) not completed, left out: %s", folder, len(skipped), ", ".join(skipped[:5]))
    scored.sort(key=lambda pair: -pair[0])
    chosen = scored[:top_k] if top_k else scored
    log.info("%s: %d of %d completed runs by best_val_acc: %s", folder, len(chosen), len(scored),
             ", ".join(f"{run.name} ({100 * acc:.2f}%)" for acc, run in chosen))
    return [run for _, run in chosen]


def resolve_members(task_cfg) -> list[Path]:
    """The checkpoint files of task.members (module doc), each once, in order."""
    which, top_k = task_cfg.get("checkpoint", "auto"), task_cfg.get("top_k", 0)
    paths = []
    for entry in task_cfg.members:
        path = Path(os.path.expanduser(str(entry)))
        if not path.exists():
            raise UserError(f"task.members: {path} does not exist; list checkpoint files, run dirs or sweep/search "
                            "dirs")
        if path.is_file():
            paths.append(path)
        elif _is_run_dir(path):
            paths += run_dir_checkpoints(path, which)
        else:
            for run in ranked_runs(path, top_k):
                paths += run_dir_checkpoints(run, which)
    unique, seen = [], set()
    for path in paths:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    return unique


def _differ(a: list, b: list) -> str:
    only_a, only_b = [c for c in a if c not in b][:5], [c for c in b if c not in a][:5]
    order = "; same names, another order" if not only_a and not only_b else ""
    return f"{len(a)} classes, only there {only_a or '-'}; {len(b)} here, only here {only_b or '-'}{order}"


def check_members(members: list) -> None:
    """Every member has the first one's classes (in the same order) and image shape; warns when their splits differ."""
    first = members[0]
    for member in members[1:]:
        if member.classes != first.classes:
            raise UserError(f"task.members: {member.path} was trained on other classes than {first.path} "
                            f"({_differ(member.classes, first.classes)}); an ensemble averages the probabilities of "
                            "the same classes: use members trained on the same data")
        if member.shape != first.shape:
            raise UserError(f"task.members: {member.path} takes images {member.shape}, {first.path} takes "
                            f"{first.shape}; the members must take images of the same shape (data.image_size)")
    datas = [OmegaConf.to_container(m.config, resolve=True).get("data", {}) for m in members]
    differ = [f"data.{k}" for k in SPLIT_KEYS if len({json.dumps(d.get(k)) for d in datas}) > 1]
    if differ:
        log.warning("the members were trained on differently split data (%s differ): some validation images may be "
                    "training images of some members", ", ".join(differ))


def data_config(cfg, saved_data: dict):
    """The members' data: the first member's data config with the command line's data settings on top
    (data=<option>: the command line's data config as composed); outside a Hydra run, cfg.data."""
    keys = command_line_keys()
    if keys is None or "data" in keys:
        return cfg.data
    data = cfg.data.copy()
    for key, value in saved_data.items():
        if key in data and f"data.{key}" not in keys:
            data[key] = value
    return data


def log_probabilities(member: TrainedModel, split, data_cfg, device, tta: str) -> torch.Tensor:
    """The member's log-softmax of its scores (averaged over the tta views) for every image of `split`,
    the member's own preprocessing applied to the uint8 images."""
    loader = InMemoryLoader(split, data_cfg.eval_batch_size, device=device, preprocess=member.preprocess,
                            placement=data_cfg.placement)
    return torch.log_softmax(predict(member.model, loader, None, tta), dim=1)


def figures(log_probs: torch.Tensor, labels: torch.Tensor) -> dict:
    """{"acc", "loss"}: accuracy and mean negative log-probability of the true class."""
    labels = labels.to(log_probs.device)
    return {"acc": (log_probs.argmax(1) == labels).float().mean().item(),
            "loss": -log_probs.gather(1, labels[:, None]).mean().item()}


def by_size(members: list, order: list, labels: torch.Tensor) -> list:
    """Figures of the ensembles of the first 1, 2, ..., N members of `order`: log of the mean probability
    = logsumexp of the members' log-probabilities - log(size), accumulated in that order."""
    out, total = [], None
    for size, i in enumerate(order, start=1):
        total = members[i] if total is None else torch.logaddexp(total, members[i])
        out.append(figures(total - math.log(size), labels))
    return out


def run(cfg, run_dir: Path) -> float:
    """Evaluate every member and the ensemble; write ensemble.json and ensemble.png; returns the ensemble's
    validation accuracy."""
    run_dir = Path(run_dir)
    check_task(cfg.task)
    if cfg.trainer.tta not in TTA:
        raise UserError(f"trainer.tta={cfg.trainer.tta} is unknown; choose one of {', '.join(TTA)}")
    device = resolve_device(cfg.trainer.device)
    paths = resolve_members(cfg.task)
    members = [load_trained(path, "cpu") for path in paths]  # on the device one at a time, when evaluated
    check_members(members)
    data_cfg = data_config(cfg, OmegaConf.to_container(members[0].config.data, resolve=True))
    data = load_data(data_cfg, device, need_test=cfg.trainer.test, fit=False)  # each member's own preprocessing
    classes, shape = members[0].classes, members[0].shape
    if [str(c) for c in data.classes] != classes:
        raise UserError(f"task.members: data={data_cfg.name} has other classes than the members "
                        f"({_differ([str(c) for c in data.classes], classes)}); evaluate them on the data they were "
                        "trained on (leave data= out: the first member's data config is used)")
    if tuple(data.shape) != shape:
        raise UserError(f"task.members: data={data_cfg.name} has images {tuple(data.shape)}, the members take "
                        f"{shape}; evaluate them on the data they were trained on (data.image_size)")
    splits = {"val": data.val, **({"test": data.test} if cfg.trainer.test else {})}
    log.info("ensemble of %d member(s) on data=%s (%s), %s | tta %s | device %s", len(paths), data_cfg.name,
             ", ".join(f"{len(split)} {name}" for name, split in splits.items()), shape, cfg.trainer.tta, device)
    log_probs = {name: [] for name in splits}
    rows = []
    for member in members:
        member.to(device)
        row = {"checkpoint": str(member.path), "model": member.name, "weights": member.info.get("weights") or "raw",
               "params": sum(p.numel() for p in member.model.parameters())}
        for name, split in splits.items():
            lp = log_probabilities(member, split, data_cfg, device, cfg.trainer.tta)
            log_probs[name].append(lp)
            stats = figures(lp, split.labels)
            row.update({f"{name}_acc": stats["acc"], f"{name}_loss": stats["loss"]})
        rows.append(row)
        member.to("cpu")
    order = sorted(range(len(rows)), key=lambda i: -rows[i]["val_acc"])  # stable: ties in the given order
    result = {"members": rows, "order": order, "tta": cfg.trainer.tta, "data": data_cfg.name}
    ensemble = {"size": len(rows)}
    for name, split in splits.items():
        sizes = by_size(log_probs[name], order, split.labels)
        result[f"{name}_acc_by_size"] = [s["acc"] for s in sizes]
        result[f"{name}_loss_by_size"] = [s["loss"] for s in sizes]
        ensemble.update({f"{name}_acc": sizes[-1]["acc"], f"{name}_loss": sizes[-1]["loss"]})
    result["ensemble"] = ensemble
    best = rows[order[0]]
    result["best_member_val_acc"] = best["val_acc"]
    (run_dir / "ensemble.json").write_text(json.dumps(result, indent=2) + "\n")
    _log_table(result, list(splits))
    _plot(result, list(splits), run_dir / "ensemble.png")
    log.info("done: ensemble of %d: val acc %.2f%% (best member %.2f%%, %+.2f points)%s | %s", len(rows),
             100 * ensemble["val_acc"], 100 * best["val_acc"], 100 * (ensemble["val_acc"] - best["val_acc"]),
             f" | test acc {100 * ensemble['test_acc']:.2f}%" if "test_acc" in ensemble else "", run_dir)
    return ensemble["val_acc"]


def _log_table(result: dict, splits: list) -> None:
    header = ["#", "member", "model", "weights", *[f"{s} {what}" for s in splits for what in ("acc", "loss")]]

    def cells(row):
        return [f"{100 * row[f'{s}_{w}']:.2f}%" if w == "acc" else f"{row[f'{s}_{w}']:.4f}"
                for s in splits for w in ("acc", "loss")]
    rows = [[i + 1, row["checkpoint"], row["model"], row["weights"], *cells(row)]
            for i, row in enumerate(result["members"])]
    ensemble = result["ensemble"]
    footer = [" ", f"ensemble of {ensemble['size']} (mean probability)", "", "", *cells(ensemble)]
    log.info("members and ensemble (tta %s):\n%s", result["tta"],
             format_table(header, rows, right=range(4, 4 + 2 * len(splits)), footer=footer))
    for s in splits:
        log.info("%s accuracy by ensemble size (members by val accuracy: %s): %s", s,
                 ", ".join(str(i + 1) for i in result["order"]),
                 ", ".join(f"{k}: {100 * a:.2f}%" for k, a in enumerate(result[f"{s}_acc_by_size"], start=1)))


def _plot(result: dict, splits: list, path: Path) -> None:
    """ensemble.png: accuracy against ensemble size per split, each member's own accuracy as dots."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    sizes = list(range(1, len(result["members"]) + 1))
    for s, color in zip(splits, ("C0", "C1")):
        ax.plot(sizes, [100 * a for a in result[f"{s}_acc_by_size"]], "o-", color=color, label=f"ensemble ({s})")
        ax.plot(sizes, [100 * result["members"][i][f"{s}_acc"] for i in result["order"]], "x", color=color,
                alpha=0.6, label=f"the member added, alone ({s})")
    ax.set_xticks(sizes)
    ax.set_xlabel("ensemble size (members by val accuracy, best first)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"ensemble accuracy against size (tta {result['tta']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
