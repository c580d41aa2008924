"""task=evaluate: a trained model's figures on a data split, from its checkpoint alone.

    python -m cvtrain task=evaluate checkpoint=<run dir or .pt file>                  # its validation split
    python -m cvtrain task=evaluate checkpoint=<...> trainer.test=true                # its test split
    python -m cvtrain task=evaluate checkpoint=<...> data=imagefolder data.root=...   # other data, same classes

The model, the preprocessing, the class names and the image shape come from the checkpoint
(cvtrain/trained.py); nothing is re-fitted. The data is the checkpoint's own data config unless the command
line chooses another source (data=...): the same source, split_seed and val_fraction, so the validation
split is the run's own and its figures reproduce the run's val_acc / test_acc. data.<key>=... on the command
line changes that key of the checkpoint's data config (data.root=<where the data is now>). Another source
must have the same classes (the same names; another order is mapped by name) and the same image shape.
The evaluation settings trainer.tta, trainer.precision and trainer.channels_last are the run's unless the
command line sets them.

One pass of scores gives (cvtrain/metrics.py): accuracy, top-5 (more than 5 classes), the run's loss (its
loss= config) and the cross-entropy, per-class precision / recall / F1 / support, the confusion matrix and
the expected calibration error (task.bins equal-width bins) with a reliability diagram. Writes into the run
dir eval.json (split, accuracy, loss, top5, per_class, ece, and the rest), confusion_matrix.png,
reliability.png and an event file (scalars eval/*, images eval/confusion_matrix and eval/reliability, the
per-class table as text). kNN runs (checkpoints/best.pt holds their training images) have no loss: null.
Returns the accuracy (the objective).
"""
import json
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf, open_dict
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import save_image

from cvtrain import UserError
from cvtrain.config import DataConfig
from cvtrain.data import InMemoryLoader, Split, load_data
from cvtrain.device import resolve_device
from cvtrain.loop import TTA, predict
from cvtrain.losses import build_loss
from cvtrain.metrics import report
from cvtrain.resume import command_line_keys
from cvtrain.speed import resolve_speed
from cvtrain.table import format_table
from cvtrain.trained import TrainedModel, load_trained, require_checkpoint

log = logging.getLogger("cvtrain")
SPLITS = ("val", "test", "train")
EVAL_SETTINGS = ("tta", "precision", "channels_last")  # the run's own unless the command line sets them


def data_config(cfg, trained: TrainedModel, keys) -> tuple:
    """(the data config to evaluate on, whether it is the checkpoint's own): cfg.data when the command line
    chose a source (data=...), else the checkpoint's data config with the command line's data.<key> values."""
    keys = keys or []
    if "data" in keys:
        return cfg.data, False
    saved = OmegaConf.to_container(trained.config.data, resolve=True)
    node = OmegaConf.structured(DataConfig)
    dropped = [key for key in saved if key not in DataConfig.__dataclass_fields__]
    if dropped:
        log.info("note: the checkpoint's data config has keys this cvtrain does not know (%s); left out",
                 ", ".join(dropped))
    node = OmegaConf.merge(node, {k: v for k, v in saved.items() if k not in dropped})
    for key in keys:
        if key.startswith("data."):
            OmegaConf.update(node, key[len("data."):], OmegaConf.select(cfg, key), merge=False)
    return node, True


def eval_trainer(cfg, trained: TrainedModel, keys):
    """cfg.trainer with the run's own tta / precision / channels_last unless the command line set them;
    never compiled."""
    node = OmegaConf.create(OmegaConf.to_container(cfg.trainer, resolve=True))
    saved = trained.config.get("trainer") or {}
    for key in EVAL_SETTINGS:
        if f"trainer.{key}" not in (keys or []) and key in saved:
            node[key] = saved[key]
    with open_dict(node):
        node.compile = False
    return node


def class_mapping(data_classes, trained: TrainedModel, data_name: str):
    """None when the data's classes are the checkpoint's, in its order; an index tensor data label ->
    model label when they are the same names in another order; an error naming the differences otherwise."""
    data_classes, classes = [str(c) for c in data_classes], list(trained.classes)
    if data_classes == classes:
        return None
    only_model = [c for c in classes if c not in data_classes]
    only_data = [c for c in data_classes if c not in classes]
    if not only_model and not only_data and len(data_classes) == len(classes):
        log.info("note: data=%s lists the checkpoint's classes in another order; labels mapped by class name",
                 data_name)
        return torch.tensor([classes.index(c) for c in data_classes])
    raise UserError(f"data={data_name} has other classes than the checkpoint: {len(classes)} in the checkpoint "
                    f"(only there: {_few(only_model)}), {len(data_classes)} in data={data_name} (only here: "
                    f"{_few(only_data)}); evaluate on data with the checkpoint's classes: {_few(classes)}")


def _few(names, limit: int = 8) -> str:
    names = list(names)
    if not names:
        return "-"
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def check_shape(data_shape, trained: TrainedModel, data_name: str) -> None:
    if tuple(data_shape) != tuple(trained.shape):
        have, want = "x".join(map(str, data_shape)), "x".join(map(str, trained.shape))
        raise UserError(f"data={data_name} has images of {have} (channels x height x width); the checkpoint was "
                        f"trained on {want}. Evaluate on images of that shape (data.image_size=<side> resizes an "
                        "image folder), or classify files of any size with task=predict")


def collect_scores(trained: TrainedModel, split: Split, batch_size: int, device, speed, tta: str,
                   placement: str = "auto") -> torch.Tensor:
    """The scores (N, classes) of every image of `split`, in order, on the CPU: the checkpoint's
    preprocessing, then the model under `speed`'s precision and layout, the views of `tta` averaged
    (as loop.evaluate does during training)."""
    loader = InMemoryLoader(split, batch_size, device=device, preprocess=trained.preprocess, placement=placement)
    if not len(loader):
        return torch.empty(0, trained.num_classes)
    return predict(speed.prepare(trained.model), loader, speed, tta).cpu()


def reliability_figure(bins: list, ece: float, title: str) -> torch.Tensor:
    """The reliability diagram as an image (3, H, W): per confidence bin the accuracy (bars) against the
    diagonal of perfect calibration, the gap to the bin's mean confidence shaded; below, the images per bin."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from cvtrain.viz import figure_to_tensor

    fig = Figure(figsize=(5.5, 6.5))
    FigureCanvasAgg(fig)
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = bins[0]["high"] - bins[0]["low"]
    lows = [b["low"] for b in bins]
    filled = [b for b in bins if b["count"]]
    ax.bar([b["low"] for b in filled], [b["accuracy"] for b in filled], width, align="edge", color="tab:blue",
           edgecolor="black", linewidth=0.5, label="accuracy")
    ax.bar([b["low"] for b in filled], [b["confidence"] - b["accuracy"] for b in filled], width,
           bottom=[b["accuracy"] for b in filled], align="edge", color="tab:red", alpha=0.35, hatch="//",
           edgecolor="tab:red", linewidth=0.5, label="gap to the mean confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy in the bin",
           title=f"{title}\nECE {100 * ece:.2f}% ({len(bins)} bins)")
    ax.legend(loc="upper left", fontsize=8)
    hist.bar(lows, [b["count"] for b in bins], width, align="edge", color="gray", edgecolor="black", linewidth=0.5)
    hist.set(xlabel="confidence (top-1 probability)", ylabel="images")
    if max(b["count"] for b in bins) > 0:
        hist.set_yscale("symlog", linthresh=1)
    fig.tight_layout()
    return figure_to_tensor(fig)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def run(cfg, run_dir: Path) -> float:
    """The task: evaluate the checkpoint on the chosen split, write eval.json, the figures and TensorBoard;
    returns the accuracy."""
    run_dir = Path(run_dir)
    path = require_checkpoint(cfg)
    split = cfg.task.split or ("test" if cfg.trainer.test else "val")
    if split not in SPLITS:
        raise UserError(f"task.split={split} is unknown; choose val, test or train (null: val, or test with "
                        "trainer.test=true)")
    bins = int(cfg.task.bins)
    if bins < 1:
        raise UserError(f"task.bins={bins}: the calibration error needs at least 1 bin (like 15)")
    device = resolve_device(cfg.trainer.device)
    keys = command_line_keys()
    trained = load_trained(path, device)
    trainer = eval_trainer(cfg, trained, keys)
    if trainer.tta not in TTA:
        raise UserError(f"trainer.tta={trainer.tta} is unknown; choose one of {', '.join(TTA)}")
    speed = resolve_speed(trainer, device)
    log.info("evaluate: %s", trained.describe())
    data_cfg, own = data_config(cfg, trained, keys)
    data = load_data(data_cfg, device, need_test=split == "test", fit=False)  # the checkpoint's preprocessing
    check_shape(data.shape, trained, data_cfg.name)
    mapping = class_mapping(data.classes, trained, data_cfg.name)
    images = {"val": data.val, "test": data.test, "train": data.train}[split]
    if mapping is not None:
        images = Split(images.images, mapping[images.labels])
    where = "the checkpoint's data" if own else "other data"
    log.info("data: %s (%s), %s split: %d images | device %s%s", data_cfg.name, where, split, len(images), device,
             f" | trainer.tta={trainer.tta}" if trainer.tta != "none" else "")
    batch = int(data_cfg.eval_batch_size)
    if trained.kind == "fitted":  # the same query chunks as the fit's predict: the same distances to the bit
        batch = int(trained.config.model.get("chunk_size", batch))
    scores = collect_scores(trained, images, batch, device, speed, trainer.tta, data_cfg.placement)
    loss_fn = build_loss(trained.config.loss) if trained.kind == "trained" and trained.config.get("loss") else None
    figures = report(scores, images.labels, trained.classes, loss_fn, bins)
    result = {"checkpoint": str(path), "model": trained.name, "data": data_cfg.name, "own_data": own,
              "split": split, "images": figures.pop("images"), "accuracy": figures.pop("accuracy"),
              "loss": figures.pop("loss"), "loss_name": trained.config.loss.name if loss_fn else None,
              "top5": figures.pop("top5"), "per_class": figures.pop("per_class"), "ece": figures.pop("ece"),
              **figures, "classes": list(trained.classes), "tta": trainer.tta,
              "device": str(device), "checkpoint_state": trained.info}
    _write(run_dir, result, trained, data_cfg.name, split)
    return result["accuracy"]


def _write(run_dir: Path, result: dict, trained: TrainedModel, data_name: str, split: str) -> None:
    """eval.json, confusion_matrix.png, reliability.png, the event file; the figures to the log."""
    from cvtrain.viz import confusion_figure

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    title = f"{trained.name} on {data_name} {split} ({result['images']} images)"
    confusion = confusion_figure(torch.tensor(result["confusion_matrix"]), trained.classes, split=f"{data_name} {split}")
    reliability = reliability_figure(result["ece_bins"], result["ece"], title)
    save_image(confusion, run_dir / "confusion_matrix.png")
    save_image(reliability, run_dir / "reliability.png")
    rows = [[c, f"{v['precision']:.4f}", f"{v['recall']:.4f}", f"{v['f1']:.4f}", v["support"]]
            for c, v in result["per_class"].items()]
    table = format_table(["class", "precision", "recall", "f1", "support"], rows, right=(1, 2, 3, 4),
                         footer=["macro avg", f"{result['macro_precision']:.4f}", f"{result['macro_recall']:.4f}",
                                 f"{result['macro_f1']:.4f}", result["images"]])
    writer = SummaryWriter(str(run_dir))
    try:
        for key in ("accuracy", "top5", "loss", "nll", "ece", "macro_f1"):
            if result.get(key) is not None:
                writer.add_scalar(f"eval/{key}", result[key], 0)
        writer.add_image("eval/confusion_matrix", confusion, 0)
        writer.add_image("eval/reliability", reliability, 0)
        writer.add_text("eval/per_class", "\n".join("    " + line for line in table.splitlines()), 0)
    finally:
        writer.close()
    loss = (f"loss {result['loss']:.4f} ({result['loss_name']})" if result["loss"] is not None
            else "loss - (kNN votes are not a probability model)")
    top5 = f" | top-5 {_pct(result['top5'])}" if result["top5"] is not None else ""
    log.info("accuracy %s%s | %s | ECE %s (%d bins; mean confidence %s)\n%s", _pct(result["accuracy"]), top5, loss,
             _pct(result["ece"]), len(result["ece_bins"]), _pct(result["mean_confidence"]), table)
    log.info("wrote eval.json, confusion_matrix.png, reliability.png and TensorBoard in %s", run_dir)
