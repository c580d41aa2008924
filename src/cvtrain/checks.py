"""The value checks of the config, one group at a time: bad input is a one-line UserError that names
the key, the bad value and what to do, raised before any work starts. cvtrain/validate.py's
check_config(cfg) runs them all on the composed config; the builders run their group's part.

    check_top_level(cfg)                 a top-level key nothing reads (`+modle=mlp`) names the closest group
    check_data(data_cfg)                 data.*: ranges, and keys the chosen source does not use
    check_types(group, name, options)    argument types against the option files' (configs/<group>/*.yaml)
    check_optim / check_sched / check_loss / check_model_values
                                         value ranges of one group's options (a plain dict without `name`)
    check_averaging(trainer_cfg)         trainer.ema, trainer.select, trainer.keep_snapshots

The builders (build_optimizer, build_scheduler, build_loss, build_model, load_data) call their group's
checks first thing, so code that does not go through check_config still fails before building. A leaf:
the builders import it, so it imports none of them (validate.py, which knows their registries, does).
"""
import difflib
import functools
import importlib.resources
import inspect
import logging
import math
from collections.abc import Sequence
from dataclasses import fields
from typing import Callable, Optional

from omegaconf import OmegaConf

from cvtrain import UserError
from cvtrain.config import Config, DataConfig

log = logging.getLogger("cvtrain")

# --- top-level keys ---------------------------------------------------------------------------------

TOP_LEVEL = tuple(f.name for f in fields(Config))  # task, data, aug, reg, trainer, model, loss, optim, sched
ALSO_ALLOWED = ("experiment", "hydra")  # a preset group (its keys land at the top) and Hydra's own node


def check_top_level(cfg) -> None:
    """A UserError for a top-level key that nothing reads (`+modle=mlp` trains LeNet otherwise)."""
    unknown = [key for key in cfg.keys() if key not in TOP_LEVEL and key not in ALSO_ALLOWED]
    for key in unknown:
        close = difflib.get_close_matches(str(key), TOP_LEVEL, n=1, cutoff=0.5)
        hint = (f"did you mean {close[0]}? Pick an option with {close[0]}=<option> (no +), change a value "
                f"with {close[0]}.<key>=<value>" if close else "drop it")
        raise UserError(f"{key}={_show(cfg[key])}: '{key}' is not a config group or key of cvtrain (its groups: "
                        f"{', '.join(TOP_LEVEL)}); nothing would read it; {hint}")


# --- types of the `name:` groups' arguments --------------------------------------------------------

NAMED_GROUPS = ("optim", "sched", "loss", "model")


@functools.lru_cache(maxsize=None)
def option_samples(group: str) -> dict:
    """{name: {key: the value an option file of `group` gives it}} from configs/<group>/*.yaml; an option
    file that sets other groups too (model=svm) holds its own group's node under the group's key."""
    samples: dict = {}
    folder = importlib.resources.files("cvtrain.configs") / group
    for file in sorted(folder.iterdir(), key=lambda f: f.name):
        if not file.name.endswith(".yaml"):
            continue
        node = OmegaConf.to_container(OmegaConf.create(file.read_text()))
        node = node.get(group, node) if "name" not in node else node
        if not isinstance(node, dict) or "name" not in node:
            continue
        known = samples.setdefault(node["name"], {})
        for key, value in node.items():
            if key != "name" and (known.get(key) is None):
                known[key] = value
    return samples


def _kind(sample) -> Optional[str]:
    if sample is None:
        return None
    if isinstance(sample, bool):
        return "bool"
    if isinstance(sample, int):
        return "int"
    if isinstance(sample, float):
        return "number"
    if isinstance(sample, str):
        return "str"
    if isinstance(sample, (list, tuple)):
        return "list"
    return None


KIND_WORDS = {"bool": "true or false", "int": "an integer", "number": "a number", "str": "a string",
              "list": "a list"}


def _is(value, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "list":
        return isinstance(value, (list, tuple))
    return True


def _value_word(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            tuple: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def _show(value) -> str:
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


AUTO_KEYS = {("model", "knn", "k"), ("model", "knn", "distance")}  # may be `auto`: chosen on val (tasks/knn.py)


def check_types(group: str, name: str, options: dict, target: Optional[Callable] = None) -> None:
    """A UserError for an argument whose value is not of the type its option file gives it (or, for an
    argument no option file sets, the type of `target`'s default): `optim.lr=abc`, `model.hidden_sizes=512`.
    Integers: an option file's 5 also admits 1.5 unless `target` annotates the argument `int`."""
    samples = dict(option_samples(group).get(name, {}))
    params = {}
    if target is not None:
        try:
            params = inspect.signature(target).parameters
        except (TypeError, ValueError):
            params = {}
        for key, param in params.items():
            if samples.get(key) is None and param.default is not inspect.Parameter.empty:
                default = param.default
                # torch writes float defaults as ints (weight_decay=0): any number will do
                samples[key] = float(default) if type(default) is int else default
    for key, value in options.items():
        sample = samples.get(key)
        kind = _kind(sample)
        if kind is None or (value == "auto" and (group, name, key) in AUTO_KEYS):
            continue
        if kind == "int" and (key not in params or params[key].annotation is not int):
            kind = "number"  # an integer in the option file, but only an `int` annotation insists on one
        ok, what = _is(value, kind), KIND_WORDS[kind]
        if ok and kind == "list" and sample and value:
            element = _kind(sample[0])
            if element == "int" and group == "sched":
                element = "number"  # milestones: epochs may be fractional
            ok = element is None or all(_is(v, element) for v in value)
            what = f"a list of {KIND_WORDS.get(element, '')}s".replace(" an ", " ").replace(" a ", " ")
        if not ok:
            raise UserError(f"{group}.{key}={_show(value)} is {_value_word(value)}; {group}={name} expects "
                            f"{what} here (like {group}.{key}={_show(sample)})")


# --- value ranges -----------------------------------------------------------------------------------

def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(ok: bool, key: str, value, what: str) -> None:
    if not ok:
        raise UserError(f"{key}={_show(value)}: {what}")


def _finite(options: dict, group: str) -> None:
    for key, value in options.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if _number(v) and not math.isfinite(v):
                raise UserError(f"{group}.{key}={_show(value)}: must be a finite number")


def check_optim(name: str, options: dict) -> None:
    """optim.*: lr > 0; momentum, dampening, alpha, betas in [0, 1); eps, weight decay >= 0; nesterov needs
    momentum. `options`: the node without name (and without decay_norm_and_bias)."""
    if "lr" in options and _number(options["lr"]):
        lr = options["lr"]
        _require(math.isfinite(lr) and lr > 0, "optim.lr", lr,
                 "the learning rate must be a positive finite number (like 1e-3; task=lr_find suggests one)")
    _finite(options, "optim")
    for key in ("momentum", "alpha"):
        if _number(options.get(key)):
            _require(0 <= options[key] < 1, f"optim.{key}", options[key], "must be in [0, 1) (like 0.9)")
    if _number(options.get("dampening")):
        _require(0 <= options["dampening"] <= 1, "optim.dampening", options["dampening"], "must be in [0, 1]")
    if "betas" in options and isinstance(options["betas"], (list, tuple)):
        betas = options["betas"]
        _require(len(betas) == 2 and all(_number(b) and 0 <= b < 1 for b in betas), "optim.betas", betas,
                 "needs two numbers in [0, 1) (like [0.9,0.999])")
    for key in ("eps", "weight_decay", "lr_decay", "initial_accumulator_value"):
        if _number(options.get(key)):
            _require(options[key] >= 0, f"optim.{key}", options[key], "must be >= 0")
    if options.get("nesterov") is True:
        _require(_number(options.get("momentum", 0)) and options.get("momentum", 0) > 0
                 and options.get("dampening", 0) == 0, "optim.nesterov", True,
                 f"Nesterov momentum needs optim.momentum > 0 and optim.dampening=0 (optim={name} has momentum "
                 f"{options.get('momentum', 0)}, dampening {options.get('dampening', 0)}); use optim=nesterov")


def check_sched(name: str, options: dict, epochs: Optional[int] = None, warn: bool = True) -> None:
    """sched.*: warmup in [0, epochs), factors in (0, 1], k >= 0, milestones increasing (and, `warn`: a warning
    for milestones the run never reaches)."""
    _finite(options, "sched")
    warmup = options.get("warmup_epochs", 0)
    if _number(warmup):
        _require(warmup >= 0, "sched.warmup_epochs", warmup, "must be >= 0")
        if epochs is not None and warmup > 0:
            _require(warmup < epochs, "sched.warmup_epochs", warmup,
                     f"the warmup must end before the run does (trainer.epochs={epochs}); lower it or raise "
                     "trainer.epochs")
    if _number(options.get("factor")):
        factor = options["factor"]
        upper = "< 1" if name == "plateau" else "<= 1"
        _require(0 < factor < 1 if name == "plateau" else 0 < factor <= 1, "sched.factor", factor,
                 f"the lr is multiplied by it to shrink: use 0 < factor {upper} (like 0.1)")
    if _number(options.get("k")):
        _require(options["k"] >= 0, "sched.k", options["k"], "the decay rate must be >= 0 (0: no decay)")
    if _number(options.get("every_epochs")):
        _require(options["every_epochs"] > 0, "sched.every_epochs", options["every_epochs"], "must be positive")
    if _number(options.get("min_lr_ratio")):
        _require(0 <= options["min_lr_ratio"] <= 1, "sched.min_lr_ratio", options["min_lr_ratio"],
                 "a fraction of optim.lr: must be in [0, 1]")
    for key in ("patience", "cooldown", "threshold"):
        if _number(options.get(key)):
            _require(options[key] >= 0, f"sched.{key}", options[key], "must be >= 0")
    if _number(options.get("cycle_epochs")):  # cosine_restarts
        _require(options["cycle_epochs"] > 0, "sched.cycle_epochs", options["cycle_epochs"],
                 "the epochs of the first cycle: must be positive (like 5)")
    if _number(options.get("cycle_mult")):
        _require(options["cycle_mult"] >= 1, "sched.cycle_mult", options["cycle_mult"],
                 "each cycle is this many times as long as the one before: must be >= 1 (1: equal cycles; SGDR: 2)")
    milestones = options.get("milestones")
    if isinstance(milestones, (list, tuple)):
        _require(all(_number(m) and m > 0 for m in milestones), "sched.milestones", milestones,
                 "epochs after the warmup at which the lr drops: positive numbers")
        _require(all(a < b for a, b in zip(milestones, milestones[1:])), "sched.milestones", milestones,
                 "must be increasing (like [5,8])")
        span = epochs - (warmup if _number(warmup) else 0) if epochs is not None else None
        if warn and span is not None and milestones and milestones[-1] >= span:
            # a warning, not an error: a short trial run (trainer=quick) of a multistep config is legitimate
            log.warning("sched.milestones=%s: %s never take(s) effect: the milestones count epochs after the warmup "
                        "and the run has %s (trainer.epochs=%s%s); lower them or raise trainer.epochs",
                        _show(milestones), ", ".join(_show(m) for m in milestones if m >= span), _show(span), epochs,
                        f" - sched.warmup_epochs={_show(warmup)}" if warmup else "")


def check_loss(name: str, options: dict) -> None:
    """loss.*: label_smoothing in [0, 1), margin >= 0."""
    _finite(options, "loss")
    if _number(options.get("label_smoothing")):
        _require(0 <= options["label_smoothing"] < 1, "loss.label_smoothing", options["label_smoothing"],
                 "must be in [0, 1) (like 0.1; 0: off)")
    if _number(options.get("margin")):
        _require(options["margin"] >= 0, "loss.margin", options["margin"], "must be >= 0 (like 1.0)")


def check_model_values(name: str, options: dict) -> None:
    """model.*: dropout in [0, 1), hidden sizes and counts >= 1 (activation, init, variant: their builders)."""
    _finite(options, "model")
    if _number(options.get("dropout")):
        _require(0 <= options["dropout"] < 1, "model.dropout", options["dropout"],
                 "the probability of dropping a unit: must be in [0, 1) (like 0.5; 0: off)")
    sizes = options.get("hidden_sizes")
    if isinstance(sizes, (list, tuple)):
        _require(all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes),
                 "model.hidden_sizes", sizes, "layer widths: integers >= 1 (like [512,256])")
    for key, least in (("k", 1), ("chunk_size", 1), ("maxout_pieces", 1)):
        if _number(options.get(key)):
            _require(options[key] >= least, f"model.{key}", options[key], f"must be at least {least}")


SELECT = ("raw", "ema", "best")  # trainer.select


def check_averaging(trainer_cfg) -> None:
    """trainer.ema in [0, 1) (0: off), trainer.select raw | ema | best (ema and best need trainer.ema),
    trainer.keep_snapshots >= 0 (whether the schedule has that many cycles: optim.snapshot_epochs)."""
    ema = config_value(trainer_cfg, "ema", 0.0)
    _require(_number(ema) and math.isfinite(ema) and 0 <= ema < 1, "trainer.ema", ema,
             "the decay of the moving average of the weights: must be in [0, 1) (like 0.999; 0: off)")
    select = config_value(trainer_cfg, "select", "raw")
    _require(select in SELECT, "trainer.select", select,
             "choose raw (best.pt keeps the trained weights), ema (the moving average's) or best (the better of "
             "the two at each epoch)")
    _require(select == "raw" or ema > 0, "trainer.select", select,
             "needs the moving average of the weights: set trainer.ema (like trainer.ema=0.999)")
    keep = config_value(trainer_cfg, "keep_snapshots", 0)
    _require(isinstance(keep, int) and keep >= 0, "trainer.keep_snapshots", keep,
             "the schedule cycles whose ends are kept as checkpoints/snapshot-<cycle>.pt: 0 (none) or more")


# --- data -------------------------------------------------------------------------------------------

TORCHVISION_SOURCES = ("mnist", "fashion_mnist", "cifar10", "cifar100", "svhn")
# data keys read only by some sources: key -> the sources that read it
SOURCE_KEYS = {
    "root": (*TORCHVISION_SOURCES, "imagefolder"),
    "download": TORCHVISION_SOURCES,
    "image_size": ("imagefolder", "synthetic"),
    "cache_dir": ("imagefolder",),
    "on_bad_image": ("imagefolder",),
    "num_workers": ("imagefolder",),
    **{key: ("synthetic",) for key in ("channels", "num_classes", "num_samples", "num_test", "noise")},
}
KNOWN_SOURCES = ("digits", "synthetic", "imagefolder", *TORCHVISION_SOURCES)
BAD_IMAGE = ("error", "skip")
IN_MEMORY = ("auto", "true", "false")  # data/mapped.py resolves them


def config_value(node, key, default=None):
    try:
        return node[key] if key in node else default
    except Exception:  # noqa: BLE001
        return getattr(node, key, default)


def check_data(data_cfg) -> None:
    """data.*: batch sizes >= 1, val_fraction in (0, 1), on_bad_image, in_memory, num_workers >= 0, and a key
    the chosen source does not read set away from its default (`data.root=... data=digits` would train on the
    digits silently)."""
    for key in ("batch_size", "eval_batch_size"):
        value = config_value(data_cfg, key)
        if value is not None:
            _require(value >= 1, f"data.{key}", value, "images per batch: must be at least 1 (like 128)")
    source = config_value(data_cfg, "name")
    fraction = config_value(data_cfg, "val_fraction")
    if fraction is not None and source != "imagefolder":  # an imagefolder with val/ does not use it
        _require(math.isfinite(fraction) and 0 < fraction < 1, "data.val_fraction", fraction,
                 "the share of the training images held out for validation: must be between 0 and 1 (like 0.1)")
    bad = config_value(data_cfg, "on_bad_image", "error")
    _require(bad in BAD_IMAGE, "data.on_bad_image", bad, "use error (stop at the first unreadable image) or skip")
    in_memory = config_value(data_cfg, "in_memory", "auto")
    _require(str(in_memory).lower() in IN_MEMORY, "data.in_memory", in_memory,
             "choose one of auto (in memory when the decoded images take at most half the available memory), "
             "true (in memory) or false (memory-mapped in data.cache_dir, read a batch at a time)")
    workers = config_value(data_cfg, "num_workers")
    if workers is not None:
        _require(workers >= 0, "data.num_workers", workers,
                 "worker processes that decode and read the images: 0 (none: the main process) or more, "
                 "or null (min(8, CPUs))")
    most = config_value(data_cfg, "max_per_class")
    if most is not None:
        _require(isinstance(most, int) and most >= 1, "data.max_per_class", most,
                 "training images per class: an integer >= 1 (like 100), or null (all)")
    kept = config_value(data_cfg, "classes")
    if kept is not None:  # the names and indices themselves are checked against the data (data/subset.py)
        _require(isinstance(kept, Sequence) and not isinstance(kept, str) and len(kept) >= 1, "data.classes", kept,
                 "the classes to keep: a list of class names or indices (like [5,6,7,8,9]), or null (all)")
    noise = config_value(data_cfg, "noise")
    if source == "synthetic" and noise is not None:
        _require(math.isfinite(noise) and noise >= 0, "data.noise", noise, "must be a finite number >= 0")
    defaults = DataConfig()
    for key, users in SOURCE_KEYS.items():
        if source in users or source not in KNOWN_SOURCES or not hasattr(defaults, key):
            continue
        value = config_value(data_cfg, key, getattr(defaults, key))
        if value != getattr(defaults, key):
            raise UserError(f"data.{key}={_show(value)} is not used by data={source}; it is read by "
                            f"data={', '.join(users)}. Choose one of those, or leave data.{key} out")
