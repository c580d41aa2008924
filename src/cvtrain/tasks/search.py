"""task=search: hyperparameter search, the course's way, on Optuna (the extra [search]).

    python -m cvtrain task=search search=lr_reg search.n_trials=20 model=mlp trainer.epochs=5
    python -m cvtrain task=search search=lr_reg search.stages='[{trials:12,epochs:2},{trials:6,epochs:8}]'

The search's run dir (outputs/<date>/<time>_search_<data>_<model>, or hydra.run.dir) is its home:

    study.log        the Optuna study (a journal file; search.storage: another file, or a database URL)
    trials/<n>_<params>/   one cvtrain run dir per trial (TensorBoard, metrics.jsonl, summary.json,
                     .hydra/ with the trial's config); with search.stages: trials/s<stage>-<n>_<params>/
    results.csv      every trial, best first (stage, trial, status, each parameter, val_acc, epochs, run_dir)
    best.yaml        the best trial's full config: python -m cvtrain --config-dir <search dir> --config-name best
    search.json      the search's summary: the best trial, each stage's ranges and counts, edge warnings
    plots/           history.png, importances.png, params.png (each parameter against val acc, log axis)

The space (search.space, the config group `search`) maps config keys to ranges: [low, high] uniform,
[low, high, log] log-uniform (learning rates, regularization strengths), {low, high, log, step, type}
or {choices: [...]}; integers when both ends are integers and the key holds an integer. It is checked
before any trial: unknown keys, low >= high, log with low <= 0, and both ends of every range through
the config checks (check_config).

Each trial is cvtrain's train task, run in this process on the search's config with the sampled values
(task=train, trainer.epochs of its stage, trainer.test off: the test split stays out of the choice). It
reports the validation accuracy after every epoch (train.train's on_epoch), where the pruner (median:
below the median of the completed trials at the same epoch; halving: successive halving) may stop it:
status "pruned", its summary.json says so. A diverged trial is FAIL, never NaN; so is a trial with a
bad config (an error line) or any other exception: the search goes on. Ctrl-C stops the search after
the running trial's current step (it is marked failed, "interrupted").

The study lives in the storage, so an interrupted search resumes with the same command and
hydra.run.dir=<search dir>, and N workers (the same command, same hydra.run.dir or search.storage, in N
processes, on one machine or several sharing the file system or a database) run one study:
search.n_trials counts the trials of all workers. A trial left RUNNING by a worker that died (killed,
the machine lost) is marked failed (status "interrupted") when a worker sees it: its process is gone
(same machine), or its heartbeat (each epoch) is older than search.stale_after_s; it does not count
towards n_trials, and its values are queued to run again first (those of a trial stopped by Ctrl-C too). Trials are drawn per trial number (the random sampler: seeded by search.seed, the
stage and the trial number), so the values do not depend on which worker runs which trial.

Coarse-to-fine (search.stages: a list of {trials, epochs}): each stage is a study of its own
(<study_name>-stage<k>) in the same storage; after stage k every worker waits for its last trials, then
each range of stage k+1 spans the values of the best search.top_fraction of stage k's completed trials,
widened on each side by search.margin of stage k's range (on the log axis for log ranges), within
stage k's range; choices keep those the best trials used. The ranges go to the log and search.json.

At the end (each worker, from the storage: the last one to finish sees every trial): results.csv and
the table, best.yaml (the best trial of the last stage), plots, search.json, and a warning for every
parameter whose best value lies in the outer search.edge_fraction of its range ("is the best value at
the edge of the range?": widen it). The task returns the best validation accuracy.
"""
import copy
import csv
import importlib.resources
import io
import json
import logging
import math
import os
import re
import socket
import time
import warnings
import zlib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from cvtrain import Interrupted, TrainingDiverged, UserError
from cvtrain.checkpoint import process_alive, write_text_atomic
from cvtrain.config import SearchConfig
from cvtrain.models import model_kind
from cvtrain.monitor import write_summary
from cvtrain.table import format_table
from cvtrain.tasks import knn, train as train_task
from cvtrain.validate import check_config

log = logging.getLogger("cvtrain")

SAMPLERS = ("random", "tpe", "grid")
PRUNERS = ("median", "halving", "none")
SETTINGS = {f.name: f for f in fields(SearchConfig)}  # search.*: the schema holds every default
SPEC_KEYS = {"low", "high", "log", "step", "type", "choices"}
SEARCHABLE = ("data", "aug", "reg", "trainer", "model", "loss", "optim", "sched")  # nodes a space may set
CHOICE_GROUPS = ("data", "model", "loss", "reg", "optim", "sched", "aug", "trainer")  # best.yaml's overrides
NOT_COUNTED = ("interrupted", "surplus")  # FAIL trials that do not count towards n_trials
POLL_S = 2.0  # waiting for other workers' trials at the end of a stage


def _require_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("task=search needs Optuna, which is not installed: pip install -e \".[search]\" (in cvtrain's "
                        "checkout; or pip install optuna)") from None
    return optuna


# --- the space -------------------------------------------------------------------------------------

@dataclass
class Param:
    """One dimension of the space: a range (low, high; log; step; integer) or a list of choices."""
    key: str
    low: Any = None
    high: Any = None
    log: bool = False
    step: Any = None
    integer: bool = False
    choices: Optional[list] = None

    def suggest(self, trial):
        if self.choices is not None:
            return trial.suggest_categorical(self.key, self.choices)
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)

    def grid(self, points: int) -> list:
        """sampler=grid: the choices, or `points` values from low to high (log-spaced for a log range)."""
        if self.choices is not None:
            return list(self.choices)
        lo, hi = self.axis(self.low), self.axis(self.high)
        values = [self.unaxis(lo + (hi - lo) * i / max(points - 1, 1)) for i in range(points)]
        if self.step:
            values = [self.low + round((v - self.low) / self.step) * self.step for v in values]
        if self.integer:
            values = [int(round(v)) for v in values]
        else:
            values = [float(f"{v:.6g}") for v in values]
        return sorted(set(min(max(v, self.low), self.high) for v in values))

    def axis(self, value) -> float:
        """The value on the range's axis: log10 for a log range."""
        return math.log10(value) if self.log else float(value)

    def unaxis(self, x: float):
        return 10 ** x if self.log else x

    def position(self, value) -> Optional[float]:
        """Where `value` lies in the range, 0 (low) to 1 (high), on the range's axis; None for choices."""
        if self.choices is not None:
            return None
        return (self.axis(value) - self.axis(self.low)) / (self.axis(self.high) - self.axis(self.low))

    def describe(self) -> str:
        if self.choices is not None:
            return "{" + ", ".join(map(str, self.choices)) + "}"
        return f"[{_num(self.low)}, {_num(self.high)}]{' log' if self.log else ''}{' int' if self.integer else ''}"

    def spec(self) -> dict:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, "log": self.log, **({"step": self.step} if self.step else {}),
                "type": "int" if self.integer else "float"}


def _num(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if 1e-3 <= abs(value) < 1e4 or value == 0 else f"{value:.2e}"
    return str(value)


def _leaves(node: dict, prefix: str = ""):
    """(dotted key, spec) of a space written nested ({optim: {lr: [...]}}) or dotted ({optim.lr: [...]})."""
    for key, value in node.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and not set(value) & SPEC_KEYS:
            yield from _leaves(value, f"{full}.")
        else:
            yield full, value


def _scalar(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_space(space, cfg=None) -> list:
    """The Params of a space (search.space); a UserError naming the key for a malformed range. `cfg`: the
    config the space applies to (a range of integers is an integer range when the key holds an integer)."""
    plain = OmegaConf.to_container(space, resolve=True) if OmegaConf.is_config(space) else space
    if not plain:
        raise UserError("search.space is empty: pick a space (search=lr_reg, lr, lr_dropout) or write one, e.g. "
                        "+search.space.optim.lr=[1e-4,1e-1,log] (README: Hyperparameter search)")
    if not isinstance(plain, dict):
        raise UserError(f"search.space={plain}: must map config keys to ranges, like {{optim.lr: [1e-4, 1e-1, log]}}")
    params = [_param(key, spec, cfg) for key, spec in _leaves(plain)]
    keys = [p.key for p in params]
    duplicate = sorted({k for k in keys if keys.count(k) > 1})
    if duplicate:
        raise UserError(f"search.space: {', '.join(duplicate)} given twice (nested and dotted); keep one")
    return params


def _param(key: str, spec, cfg) -> Param:
    where = f"search.space.{key}"
    like = f"(like {where}=[1e-4,1e-1,log], [0,0.5], or {{choices: [a, b]}})"
    if isinstance(spec, (list, tuple)):
        if len(spec) == 3 and spec[2] == "log":
            spec = {"low": spec[0], "high": spec[1], "log": True}
        elif len(spec) == 2:
            spec = {"low": spec[0], "high": spec[1]}
        else:
            raise UserError(f"{where}={_show(spec)}: a range is [low, high] or [low, high, log] {like}")
    if not isinstance(spec, dict):
        raise UserError(f"{where}={_show(spec)} is not a range {like}")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; a range takes {', '.join(sorted(SPEC_KEYS))}")
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) != {"choices"}:
            raise UserError(f"{where}: choices take no low, high, log, step or type")
        if not isinstance(choices, (list, tuple)) or not choices or not all(_scalar(c) for c in choices):
            raise UserError(f"{where}.choices={_show(choices)}: a non-empty list of numbers, strings, booleans or null")
        return Param(key, choices=list(choices))
    low, high, use_log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
    if not (_number(low) and _number(high)):
        raise UserError(f"{where}: low and high must be finite numbers (got low={_show(low)}, high={_show(high)}) {like}")
    if not low < high:
        raise UserError(f"{where}=[{_show(low)}, {_show(high)}]: low must be below high")
    if not isinstance(use_log, bool):
        raise UserError(f"{where}.log={_show(use_log)}: true or false")
    if use_log and low <= 0:
        raise UserError(f"{where}=[{_show(low)}, {_show(high)}, log]: a log range needs low > 0 (like [1e-5, 1e-1, log]); "
                        "use a linear range [low, high] to include 0")
    if step is not None and (not _number(step) or step <= 0 or use_log):
        raise UserError(f"{where}.step={_show(step)}: a positive number, and only for a linear range")
    kind = spec.get("type")
    if kind not in (None, "int", "float"):
        raise UserError(f"{where}.type={_show(kind)}: int or float")
    both_int = all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high, *([step] if step else [])))
    current = OmegaConf.select(cfg, key, default=None) if cfg is not None else None
    integer = kind == "int" or (kind is None and both_int and (current is None or isinstance(current, int)
                                                              and not isinstance(current, bool)))
    if integer and not both_int:
        raise UserError(f"{where}: type int needs integer low, high (and step)")
    if not integer:
        low, high = float(low), float(high)
    return Param(key, low=low, high=high, log=use_log, step=step, integer=integer)


def _show(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


_ABSENT = object()


def trial_config(cfg, values: dict, epochs: Optional[int] = None):
    """The config of a trial: the search's, as task=train, with `values` ({dotted key: value}) set and
    trainer.epochs = `epochs` (when given)."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.task = {"name": "train"}
        out.search = None
        if epochs is not None:
            out.trainer.epochs = int(epochs)
    for key, value in values.items():
        OmegaConf.update(out, key, value, merge=False)
    return out


def check_space(cfg, params: list) -> None:
    """Every key of the space is a key of the config (under a node a space may set), and a config with
    every range at its low end, and one with every range at its high end, pass the config checks."""
    for p in params:
        top = p.key.split(".")[0]
        if top not in SEARCHABLE:
            raise UserError(f"search.space.{p.key}: a space sets keys of {', '.join(SEARCHABLE)}, not {top}.*")
        if OmegaConf.select(cfg, p.key, default=_ABSENT) is _ABSENT:
            parent = p.key.rsplit(".", 1)[0]
            node = OmegaConf.select(cfg, parent, default=None)
            keys = (f"; {parent} has {', '.join(map(str, node.keys()))}" if OmegaConf.is_dict(node) else "")
            raise UserError(f"search.space.{p.key}: {p.key} is not a key of this config{keys} (see python -m cvtrain "
                            "... --cfg job)")
    for end, index in (("low", 0), ("high", -1)):
        values = {p.key: (p.choices[index] if p.choices is not None else getattr(p, end)) for p in params}
        try:
            check_config(trial_config(cfg, values))
        except UserError as err:
            raise UserError(f"search.space: the {end} end of the ranges is not a valid config: {err}") from None


# --- the settings ----------------------------------------------------------------------------------

@dataclass
class Stage:
    index: int  # 1, 2, ...
    trials: int
    epochs: int
    study_name: str
    label: str  # "" (one stage) or "s1-", "s2-": the trial dirs' prefix
    space: list = field(default_factory=list)


def settings(cfg) -> dict:
    """search.* as a plain dict, checked: a UserError for an unknown key or a bad value."""
    node = cfg.get("search") if hasattr(cfg, "get") else None
    s = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})
    unknown = sorted(set(s) - set(SETTINGS))
    if unknown:
        raise UserError(f"search.{unknown[0]}: not a key of task=search; its keys are {', '.join(sorted(SETTINGS))}")
    defaults = {name: f.default if f.default is not MISSING else f.default_factory() for name, f in SETTINGS.items()}
    s = {**defaults, **s}

    def need(ok, key, what):
        if not ok:
            raise UserError(f"search.{key}={_show(s[key])}: {what}")

    need(isinstance(s["n_trials"], int) and s["n_trials"] >= 1, "n_trials", "trials in all: an integer >= 1")
    need(s["sampler"] in SAMPLERS, "sampler", f"choose {', '.join(SAMPLERS)}")
    need(s["pruner"] in PRUNERS, "pruner", f"choose {', '.join(PRUNERS)}")
    for key in ("prune_startup_trials", "prune_warmup_epochs"):
        need(isinstance(s[key], int) and s[key] >= 0, key, "an integer >= 0")
    need(isinstance(s["grid_points"], int) and s["grid_points"] >= 2, "grid_points", "values per range: an integer >= 2")
    need(_number(s["top_fraction"]) and 0 < s["top_fraction"] <= 1, "top_fraction", "a fraction in (0, 1] (like 0.25)")
    need(_number(s["margin"]) and s["margin"] >= 0, "margin", "a fraction of the range >= 0 (like 0.1)")
    need(_number(s["edge_fraction"]) and 0 <= s["edge_fraction"] < 0.5, "edge_fraction", "a fraction in [0, 0.5)")
    need(_number(s["stale_after_s"]) and s["stale_after_s"] > 0, "stale_after_s", "seconds > 0")
    need(s["seed"] is None or isinstance(s["seed"], int), "seed", "an integer, or null (a different draw each time)")
    stages = s["stages"]
    if stages:
        need(isinstance(stages, list) and all(isinstance(st, dict) for st in stages), "stages",
             "a list of {trials, epochs}, like [{trials:12,epochs:2},{trials:6,epochs:8}]")
        for i, st in enumerate(stages):
            bad = sorted(set(st) - {"trials", "epochs"})
            need(not bad, "stages", f"stage {i + 1}: unknown key(s) {', '.join(bad)}; a stage has trials and epochs")
            need(all(isinstance(st.get(k), int) and st.get(k) >= 1 for k in ("trials", "epochs")), "stages",
                 f"stage {i + 1}: trials and epochs must be integers >= 1")
    return s


def plan_stages(s: dict, epochs: int) -> list:
    name = s["study_name"] or "search"
    if not s["stages"]:
        return [Stage(1, s["n_trials"], epochs, name, "")]
    return [Stage(i + 1, st["trials"], st["epochs"], f"{name}-stage{i + 1}", f"s{i + 1}-")
            for i, st in enumerate(s["stages"])]


# --- Optuna: storage, samplers, pruners ------------------------------------------------------------

def open_storage(spec: Optional[str], search_dir: Path):
    """The study's storage: <search dir>/study.log (a journal file) by default; a path (a journal file,
    or SQLite for .db / .sqlite / .sqlite3), or a database URL (sqlite:///..., postgresql://..., mysql://...)."""
    optuna = _require_optuna()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if spec and "://" in str(spec):
        return optuna.storages.RDBStorage(str(spec)), str(spec)
    path = Path(spec).expanduser().absolute() if spec else search_dir / "study.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".db", ".sqlite", ".sqlite3"):
        url = f"sqlite:///{path}"
        return optuna.storages.RDBStorage(url), url
    return JournalStorage(JournalFileBackend(str(path))), str(path)


def _trial_seed(seed, study_name: str, number: int, name: str) -> Optional[int]:
    if seed is None:
        return None
    return zlib.crc32(f"{seed}/{study_name}/{number}/{name}".encode())


def make_sampler(kind: str, seed, stage: Stage, params: list, grid_points: int):
    optuna = _require_optuna()

    class TrialSeededRandomSampler(optuna.samplers.BaseSampler):
        """Random search whose draws depend on (seed, study, trial number, parameter) only: the same values
        whichever worker runs a trial, and whatever ran before (a resumed search draws what it would have)."""

        def infer_relative_search_space(self, study, trial):
            return {}

        def sample_relative(self, study, trial, search_space):
            return {}

        def sample_independent(self, study, trial, param_name, param_distribution):
            sampler = optuna.samplers.RandomSampler(seed=_trial_seed(seed, study.study_name, trial.number, param_name))
            return sampler.sample_independent(study, trial, param_name, param_distribution)

    if kind == "random":
        return TrialSeededRandomSampler()
    if kind == "tpe":
        startup = max(2, min(10, stage.trials // 4))
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)
        if hasattr(sampler, "_random_sampler"):  # its random start: drawn per trial number, as above
            sampler._random_sampler = TrialSeededRandomSampler()
        return sampler
    class Grid(optuna.samplers.GridSampler):
        def after_trial(self, study, trial, state, values):  # its study.stop() is for study.optimize's loop:
            pass  # the search counts its trials itself (run_stage caps them at the grid's size)

    return Grid({p.key: p.grid(grid_points) for p in params}, seed=seed)


def make_pruner(s: dict):
    optuna = _require_optuna()
    if s["pruner"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=s["prune_startup_trials"],
                                           n_warmup_steps=s["prune_warmup_epochs"])
    if s["pruner"] == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


# --- the study's trials: counting, stale ones -------------------------------------------------------

def _state(trial) -> str:
    """cvtrain's status of a trial: completed, pruned, diverged, failed, interrupted, running."""
    name = trial.state.name
    if name == "COMPLETE":
        return "completed"
    if name == "PRUNED":
        return "pruned"
    if name == "RUNNING":
        return "running"
    if name == "WAITING":
        return "waiting"
    return trial.user_attrs.get("status", "failed")


def counted(trials) -> list:
    """The trials that count towards n_trials: finished ones (completed, pruned, diverged, failed) and
    running ones; not those a dead worker left (interrupted) nor surplus ones."""
    return [t for t in trials if t.state.name in ("COMPLETE", "PRUNED", "RUNNING")
            or (t.state.name == "FAIL" and t.user_attrs.get("status") not in NOT_COUNTED)]


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid == os.getpid():  # our own pid on a trial we do not run: reused
        return False
    return process_alive(pid)


def fail_stale(study, search_dir: Path, stale_after_s: float) -> list:
    """Mark the RUNNING trials of workers that died as failed (status "interrupted"): a worker on this
    machine whose process is gone, or any whose heartbeat is older than stale_after_s. Their numbers."""
    from optuna.trial import TrialState

    host, now, failed = socket.gethostname(), time.time(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = t.user_attrs
        beat = attrs.get("heartbeat") or (t.datetime_start.timestamp() if t.datetime_start else now)
        dead = attrs.get("host") == host and "pid" in attrs and not _alive(attrs["pid"])
        if not (dead or now - beat > stale_after_s):
            continue
        why = (f"its worker {attrs.get('host')}:{attrs.get('pid')} stopped" if dead else
               f"no heartbeat for {now - beat:.0f} s (search.stale_after_s={stale_after_s:g})")
        try:
            study._storage.set_trial_user_attr(t._trial_id, "status", "interrupted")
            study._storage.set_trial_user_attr(t._trial_id, "reason", why)
            study.tell(t.number, state=TrialState.FAIL)
        except Exception as err:  # noqa: BLE001  another worker finished or marked it meanwhile
            log.debug("trial %d: %s", t.number, err)
            continue
        _redo(study, t)
        run_dir = _trial_dir(search_dir, attrs.get("run_dir"))
        if run_dir is not None and run_dir.is_dir() and not (run_dir / "summary.json").is_file():
            write_summary(run_dir, {"status": "interrupted", "reason": f"search: {why}"})
        log.warning("search: trial %d was left running (%s): marked failed (interrupted); a new trial redoes its "
                    "values", t.number, why)
        failed.append(t.number)
    return failed


def _redo(study, trial) -> None:
    """An interrupted trial's values come back as the next trial (Optuna's queue), so a resumed search runs
    what the interrupted one would have."""
    if trial.params:
        study.enqueue_trial(dict(trial.params), user_attrs={"redo_of": trial.number})


def _trial_dir(search_dir: Path, recorded) -> Optional[Path]:
    if not recorded:
        return None
    path = Path(recorded)
    return path if path.is_absolute() else search_dir / path


# --- running trials --------------------------------------------------------------------------------

@dataclass
class Search:
    cfg: Any
    dir: Path
    s: dict
    choices: dict
    storage: Any = None
    storage_name: str = ""
    fitted: bool = False


def _short(params: list, values: dict) -> str:
    """The trial dir's name after its number: lr=3.1e-04_l2=2.0e-05 (the last part of each key, or the
    whole key when two share it)."""
    last = [p.key.split(".")[-1] for p in params]
    parts = []
    for p, name in zip(params, last):
        name = name if last.count(name) == 1 else p.key
        value = values[p.key]
        text = (f"{value:.1e}" if p.log else _num(value)) if isinstance(value, float) else str(value)
        parts.append(f"{name}={text}")
    return re.sub(r"[^A-Za-z0-9=._+-]", "-", "_".join(parts))[:120]


def _write_trial_files(run_dir: Path, trial_cfg, values: dict, choices: dict) -> None:
    """<trial>/.hydra/: config.yaml (the trial's config), overrides.yaml (the sampled values) and hydra.yaml
    (the group choices): what the HPARAMS tab and scripts/compare_runs.py read of a run."""
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(trial_cfg, hydra_dir / "config.yaml", resolve=True)
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump([f"{k}={v}" for k, v in values.items()]))
    (hydra_dir / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))


def run_trial(search: Search, study, stage: Stage, trial) -> str:
    """Run one trial of `stage` and tell the study its outcome; returns its status."""
    from optuna.trial import TrialState

    values = {p.key: p.suggest(trial) for p in stage.space}
    run_dir = search.dir / "trials" / f"{stage.label}{trial.number:03d}_{_short(stage.space, values)}"
    trial.set_user_attr("run_dir", os.path.relpath(run_dir, search.dir))
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("heartbeat", time.time())
    trial_cfg = trial_config(search.cfg, values, stage.epochs)
    with open_dict(trial_cfg):
        trial_cfg.trainer.test = False  # the test split stays out of the choice: best.yaml keeps trainer.test
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_trial_files(run_dir, trial_cfg, values, search.choices)
    handler = logging.FileHandler(run_dir / "cvtrain.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    shown = ", ".join(f"{k}={_num(v)}" for k, v in values.items())
    log.info("search: trial %s%d (stage %d, %s): %s", stage.label, trial.number, stage.index,
             "fitted" if search.fitted else _epochs(stage.epochs), shown)

    def on_epoch(epoch: int, val_acc: float) -> None:
        trial.report(val_acc, epoch)
        trial.set_user_attr("heartbeat", time.time())
        trial.set_user_attr("epochs", epoch)
        if epoch < stage.epochs and trial.should_prune():
            raise train_task.StopRun(f"pruned by the {search.s['pruner']} pruner after epoch {epoch}: val acc "
                                     f"{100 * val_acc:.2f}%", status="pruned")

    def finish(status: str, reason: Optional[str], state, value=None) -> str:
        trial.set_user_attr("status", status)
        if reason:
            trial.set_user_attr("reason", reason.splitlines()[0][:500])
        summary = _read_json(run_dir / "summary.json")
        if summary.get("best_val_acc") is not None and math.isfinite(summary["best_val_acc"]):
            trial.set_user_attr("val_acc", summary["best_val_acc"])
        if "epochs" in summary:
            trial.set_user_attr("epochs", summary["epochs"])
        study.tell(trial, value, state=state) if state == TrialState.COMPLETE else study.tell(trial, state=state)
        return status

    try:
        try:
            check_config(trial_cfg)
            if search.fitted:
                value = knn.run(trial_cfg, run_dir)
            else:
                value = train_task.train(trial_cfg, run_dir, on_epoch=on_epoch)["best_val_acc"]
        except train_task.StopRun as err:
            log.info("search: trial %s%d %s", stage.label, trial.number, err)
            return finish("pruned", str(err), TrialState.PRUNED)
        except TrainingDiverged as err:
            log.warning("search: trial %s%d diverged: %s", stage.label, trial.number, err)
            return finish("diverged", str(err), TrialState.FAIL)
        except UserError as err:
            log.error("search: trial %s%d: error: %s", stage.label, trial.number, err)
            write_summary(run_dir, {"status": "failed", "reason": f"error: {err}"})
            return finish("failed", f"error: {err}", TrialState.FAIL)
        except (Interrupted, KeyboardInterrupt) as err:
            finish("interrupted", str(err) or "interrupted", TrialState.FAIL)
            _redo(study, study.get_trials(deepcopy=False)[trial.number])
            log.warning("search: stopped during trial %s%d (marked failed, interrupted: its values are redone first); "
                        "resume the search with the same command and hydra.run.dir=%s", stage.label, trial.number,
                        search.dir)
            raise
        except Exception as err:  # noqa: BLE001  one trial's failure: recorded, the search goes on
            log.exception("search: trial %s%d failed: %s: %s", stage.label, trial.number, type(err).__name__, err)
            if not (run_dir / "summary.json").is_file():
                write_summary(run_dir, {"status": "failed", "reason": f"{type(err).__name__}: {err}"})
            return finish("failed", f"{type(err).__name__}: {err}", TrialState.FAIL)
        if value is None or not math.isfinite(value) or value < 0:
            return finish("failed", f"no validation accuracy (got {value})", TrialState.FAIL)
        return finish("completed", None, TrialState.COMPLETE, float(value))
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _epochs(n: int) -> str:
    return f"{n} epoch{'s' if n != 1 else ''}"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def run_stage(search: Search, stage: Stage, last: bool):
    """This worker's trials of `stage`, until the study holds stage.trials counted trials; then (unless
    it is the last stage) wait for the other workers' running trials. Returns the study."""
    optuna = _require_optuna()
    s = search.s
    study = optuna.create_study(study_name=stage.study_name, storage=search.storage, direction="maximize",
                                sampler=make_sampler(s["sampler"], s["seed"], stage, stage.space, s["grid_points"]),
                                pruner=make_pruner(s), load_if_exists=True)
    recorded = study.user_attrs.get("space")
    ours = [p.spec() | {"key": p.key} for p in stage.space]
    if recorded is None:
        study.set_user_attr("space", ours)
        study.set_user_attr("epochs", stage.epochs)
    elif recorded != ours:
        log.warning("search: study %s was started with another space (%s); its earlier trials stay in the results",
                    stage.study_name, "; ".join(f"{r['key']}" for r in recorded))
    target = stage.trials
    if s["sampler"] == "grid":
        size = math.prod(len(p.grid(s["grid_points"])) for p in stage.space)
        if size < target:
            log.info("search: the grid has %d points (search.grid_points=%d per range): %d trials, not %d", size,
                     s["grid_points"], size, target)
            target = size
    done = len(counted(study.get_trials(deepcopy=False)))
    log.info("search: stage %d (%s): %d trials of %s%s; space: %s", stage.index, stage.study_name, target,
             _epochs(stage.epochs), f", {done} already in the study" if done else "",
             "; ".join(f"{p.key} {p.describe()}" for p in stage.space))
    while True:
        fail_stale(study, search.dir, s["stale_after_s"])
        if len(counted(study.get_trials(deepcopy=False))) >= target:
            break
        trial = study.ask()
        before = [t for t in counted(study.get_trials(deepcopy=False)) if t.number < trial.number]
        if len(before) >= target:  # another worker took the last place between our count and ask
            trial.set_user_attr("status", "surplus")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            break
        status = run_trial(search, study, stage, trial)
        best = _best(study)
        log.info("search: trial %s%d %s%s | best so far: %s", stage.label, trial.number, status,
                 f" val acc {100 * study.trials[trial.number].value:.2f}%" if status == "completed" else "",
                 f"trial {stage.label}{best.number} {100 * best.value:.2f}%" if best else "none completed")
    if not last:
        _wait_for_others(study, search, stage)
    return study


def _wait_for_others(study, search: Search, stage: Stage) -> None:
    from optuna.trial import TrialState

    said = False
    while True:
        fail_stale(study, search.dir, search.s["stale_after_s"])
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return
        if not said:
            log.info("search: waiting for %d trial(s) of stage %d that other workers run (%s)", len(running),
                     stage.index, ", ".join(str(t.number) for t in running))
            said = True
        time.sleep(POLL_S)


def _best(study):
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE" and t.value is not None]
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


# --- coarse to fine --------------------------------------------------------------------------------

def narrow(params: list, trials: list, top_fraction: float, margin: float) -> list:
    """The next stage's space: each range spans the values of the best `top_fraction` of the completed
    `trials`, widened on each side by `margin` of the range (on its axis), within the range; choices keep
    those the best trials used. Without a completed trial the space stays as it is."""
    done = sorted([t for t in trials if t.state.name == "COMPLETE" and t.value is not None],
                  key=lambda t: (-t.value, t.number))
    if not done:
        log.warning("search: no trial of the stage completed; the next stage searches the same ranges")
        return list(params)
    top = done[:max(1, math.ceil(len(done) * top_fraction))]
    out = []
    for p in params:
        used = [t.params[p.key] for t in top if p.key in t.params]
        if not used:
            out.append(p)
            continue
        if p.choices is not None:
            out.append(Param(p.key, choices=[c for c in p.choices if c in used]))
            continue
        lo_axis, hi_axis = p.axis(p.low), p.axis(p.high)
        pad = margin * (hi_axis - lo_axis)
        low = p.unaxis(max(lo_axis, min(p.axis(v) for v in used) - pad))
        high = p.unaxis(min(hi_axis, max(p.axis(v) for v in used) + pad))
        if p.integer:
            low, high = max(p.low, math.floor(low + 1e-9)), min(p.high, math.ceil(high - 1e-9))
            if low >= high:
                low, high = (low - 1, high) if low > p.low else (low, high + 1)
        else:
            low, high = float(f"{max(low, p.low):.4g}"), float(f"{min(high, p.high):.4g}")
            if not low < high:
                low, high = p.low, p.high
        out.append(Param(p.key, low=low, high=high, log=p.log, step=p.step, integer=p.integer))
    return out


def edge_warnings(params: list, best, edge_fraction: float) -> list:
    """The course's check: is the best value at the edge of its range? One line per parameter whose best
    value lies in the outer `edge_fraction` of the range (on its axis)."""
    lines = []
    if best is None or edge_fraction <= 0:
        return lines
    for p in params:
        position = p.position(best.params[p.key]) if p.key in best.params else None
        if position is None or edge_fraction <= position <= 1 - edge_fraction:
            continue
        side, towards = ("lower", "lower") if position < edge_fraction else ("upper", "higher")
        lines.append(f"the best {p.key}={_num(best.params[p.key])} lies at the {side} edge of its range "
                     f"{p.describe()} ({100 * position:.0f}% along{' the log axis' if p.log else ''}): the best value "
                     f"may lie outside; widen the range towards {towards} values")
    return lines


# --- the results -----------------------------------------------------------------------------------

def result_rows(stages: list, studies: list) -> list:
    """One row per trial of every stage (surplus trials left out), best first: the finished trials'
    best val acc, descending; those without one after them."""
    rows = []
    for stage, study in zip(stages, studies):
        for t in study.get_trials(deepcopy=False):
            status = _state(t)
            if status == "surplus":
                continue
            acc = t.value if t.state.name == "COMPLETE" else t.user_attrs.get("val_acc")
            rows.append({"stage": stage.index, "trial": f"{stage.label}{t.number}", "status": status,
                         **{p.key: t.params.get(p.key) for p in stage.space}, "val_acc": acc,
                         "epochs": t.user_attrs.get("epochs"), "run_dir": t.user_attrs.get("run_dir")})
    rows.sort(key=lambda r: (r["val_acc"] is None, -(r["val_acc"] or 0), r["stage"]))
    return rows


def write_results(search_dir: Path, stages: list, studies: list) -> tuple:
    """results.csv (every trial, best first) and its table as text."""
    rows = result_rows(stages, studies)
    keys = list(dict.fromkeys(p.key for stage in stages for p in stage.space))
    header = (["stage"] if len(stages) > 1 else []) + ["trial", "status", *keys, "val_acc", "epochs", "run_dir"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if row.get(k) is None else row.get(k) for k in header])
    write_text_atomic(search_dir / "results.csv", buffer.getvalue())
    shown = [[(f"{100 * row[k]:.2f}%" if k == "val_acc" and row[k] is not None else
               _num(row[k]) if isinstance(row.get(k), float) else "-" if row.get(k) is None else row[k])
              for k in header] for row in rows]
    right = {i for i, k in enumerate(header) if k in ("stage", "val_acc", "epochs") or k in keys}
    return search_dir / "results.csv", format_table(header, shown, right=right)


def write_best(search: Search, stage: Stage, best) -> Path:
    """best.yaml: the best trial's full config (task=train, its stage's epochs), on top of cvtrain's main
    config with the search's group choices, so `python -m cvtrain --config-dir <search dir> --config-name
    best` re-runs it (trainer.test as the search had it)."""
    cfg = trial_config(search.cfg, dict(best.params), stage.epochs)
    plain = OmegaConf.to_container(cfg, resolve=True)
    defaults = ["config", {"override task": "train"},
                *({f"override {g}": search.choices[g]} for g in CHOICE_GROUPS if search.choices.get(g)), "_self_"]
    head = (f"# The best trial of the search in {search.dir}: trial {stage.label}{best.number}, val acc "
            f"{100 * best.value:.2f}%\n#   {', '.join(f'{k}={_num(v)}' for k, v in best.params.items())}\n"
            f"# Re-run it:  python -m cvtrain --config-dir {search.dir} --config-name best [KEY=VALUE ...]\n")
    text = head + yaml.safe_dump({"defaults": defaults}, sort_keys=False) + yaml.safe_dump(plain, sort_keys=False)
    write_text_atomic(search.dir / "best.yaml", text)
    return search.dir / "best.yaml"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def write_plots(search_dir: Path, stage: Stage, study, prefix: str, edge_fraction: float) -> list:
    """plots/<prefix>history.png, importances.png, params.png; the files written (a plot that cannot be
    drawn is left out with a note in the log)."""
    folder = search_dir / "plots"
    folder.mkdir(exist_ok=True)
    trials = [t for t in study.get_trials(deepcopy=False) if _state(t) not in ("surplus", "running", "waiting")]
    if not trials:
        return []
    written = []

    def acc(t):
        return t.value if t.state.name == "COMPLETE" else t.user_attrs.get("val_acc")

    styles = {"completed": ("tab:blue", "o"), "pruned": ("tab:orange", "v"), "diverged": ("tab:red", "x"),
              "failed": ("tab:red", "x"), "interrupted": ("tab:gray", "x")}
    # optimization history: every trial's val acc, the best so far
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    for status, (color, marker) in styles.items():
        points = [(t.number, acc(t) or 0.0) for t in trials if _state(t) == status]
        if points:
            ax.scatter(*zip(*points), c=color, marker=marker, label=status)
    best, line = -1.0, []
    for t in sorted(trials, key=lambda t: t.number):
        if t.state.name == "COMPLETE":
            best = max(best, t.value)
        line.append((t.number, best if best >= 0 else math.nan))
    ax.step(*zip(*line), where="post", c="k", lw=1, label="best so far")
    ax.set(xlabel="trial", ylabel="best val acc", title=f"optimization history ({stage.study_name})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / f"{prefix}history.png")
    written.append(f"{prefix}history.png")
    # parameter importances
    done = [t for t in trials if t.state.name == "COMPLETE"]
    if len(stage.space) < 2 or len(done) < 2:
        log.info("search: no importance plot (needs 2 or more parameters and 2 or more completed trials)")
    else:
        try:
            import optuna

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importances = optuna.importance.get_param_importances(study)
            fig = _figure(7, 1 + 0.5 * len(importances))
            ax = fig.add_subplot()
            names = list(importances)[::-1]
            ax.barh(names, [importances[n] for n in names], color="tab:blue")
            ax.set(xlabel="importance (share of the variance of val acc)", title=f"parameter importances ({stage.study_name})")
            fig.tight_layout()
            fig.savefig(folder / f"{prefix}importances.png")
            written.append(f"{prefix}importances.png")
        except Exception as err:  # noqa: BLE001  too few distinct results, a constant objective, ...
            log.info("search: no importance plot: %s: %s", type(err).__name__, err)
    # each parameter against val acc: the "is the best value at the edge of the range?" check
    n = len(stage.space)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = _figure(4.2 * cols, 3.4 * rows)
    top = max(done, key=lambda t: t.value) if done else None
    for i, p in enumerate(stage.space):
        ax = fig.add_subplot(rows, cols, i + 1)
        for status, (color, marker) in styles.items():
            points = [(t.params[p.key], acc(t) or 0.0) for t in trials if _state(t) == status and p.key in t.params]
            if points:
                xs, ys = zip(*points)
                xs = [str(x) for x in xs] if p.choices is not None else xs
                ax.scatter(xs, ys, c=color, marker=marker, label=status, alpha=0.8)
        if top is not None and p.key in top.params:
            x = str(top.params[p.key]) if p.choices is not None else top.params[p.key]
            ax.scatter([x], [top.value], s=160, facecolors="none", edgecolors="k", label="best")
        if p.choices is None:
            if p.log:
                ax.set_xscale("log")
            lo, hi = p.axis(p.low), p.axis(p.high)
            for a, b in ((lo, lo + edge_fraction * (hi - lo)), (hi - edge_fraction * (hi - lo), hi)):
                ax.axvspan(p.unaxis(a), p.unaxis(b), color="tab:red", alpha=0.08, lw=0)
            ax.set_xlim(p.low, p.high)
        ax.set(xlabel=p.key + (" (log)" if p.log else ""), ylabel="val acc")
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle(f"val acc against each parameter ({stage.study_name}); shaded: the edges of the range")
    fig.tight_layout()
    fig.savefig(folder / f"{prefix}params.png")
    written.append(f"{prefix}params.png")
    return written


# --- the task --------------------------------------------------------------------------------------

def _choices(cfg) -> dict:
    """The search's group choices (data, model, optim, ...): Hydra's; outside a Hydra run (a test, a script),
    the option named after each `name:` group's name where there is one (the values in best.yaml and the
    trials' configs are complete either way: the choices only pick which keys exist)."""
    if HydraConfig.initialized():
        return {str(k): str(v) for k, v in HydraConfig.get().runtime.choices.items()
                if v is not None and not str(k).startswith("hydra") and k not in ("task", "search", "experiment")}
    folder = importlib.resources.files("cvtrain.configs")
    found = {}
    for group in CHOICE_GROUPS:
        name = OmegaConf.select(cfg, f"{group}.name", default=None)
        if isinstance(name, str) and (folder / group / f"{name}.yaml").is_file():
            found[group] = name
    return found


def run(cfg, run_dir: Path) -> float:
    """The task function: the search in run_dir; returns the best validation accuracy of its last stage."""
    optuna = _require_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search_dir = Path(run_dir).absolute()
    s = settings(cfg)
    if cfg.trainer.resume:
        raise UserError("trainer.resume does not apply to task=search: resume a search with the same command and "
                        "hydra.run.dir=<search dir>")
    stages = plan_stages(s, cfg.trainer.epochs)
    params = parse_space(s.get("space"), cfg)
    if len(stages) > 1 and any(p.key == "trainer.epochs" for p in params):
        raise UserError("search.space.trainer.epochs: with search.stages each stage sets the epochs; leave it out")
    check_space(cfg, params)
    fitted = model_kind(cfg.model.name) == "fitted"
    if fitted and s["pruner"] != "none":
        log.info("search: model=%s is fitted, not trained: no epochs to prune", cfg.model.name)
    storage, storage_name = open_storage(s["storage"], search_dir)
    search = Search(cfg=cfg, dir=search_dir, s=s, choices=_choices(cfg), storage=storage, storage_name=storage_name,
                    fitted=fitted)
    log.info("search: %s sampler, %s pruner, study %s in %s (worker %s:%d); resume or add a worker: the same "
             "command with hydra.run.dir=%s", s["sampler"], s["pruner"], stages[0].study_name if len(stages) == 1
             else f"{stages[0].study_name.rsplit('-', 1)[0]}-stage<k>", storage_name, socket.gethostname(), os.getpid(),
             search_dir)
    studies, records, warnings_found = [], [], []
    space = params
    for stage in stages:
        if studies:
            previous = studies[-1]
            optuna_study = optuna.load_study(study_name=stage.study_name, storage=storage) \
                if stage.study_name in optuna.study.get_all_study_names(storage) else None
            recorded = optuna_study.user_attrs.get("space") if optuna_study is not None else None
            if recorded:  # the stage's ranges as first narrowed (by this worker or another)
                space = [Param(r["key"], **({"choices": r["choices"]} if "choices" in r else
                                            {"low": r["low"], "high": r["high"], "log": r["log"], "step": r.get("step"),
                                             "integer": r["type"] == "int"})) for r in recorded]
            else:
                space = narrow(stages[stage.index - 2].space, previous.get_trials(deepcopy=False), s["top_fraction"],
                               s["margin"])
            log.info("search: stage %d's ranges, narrowed around the best %d%% of stage %d's trials: %s", stage.index,
                     round(100 * s["top_fraction"]), stage.index - 1,
                     "; ".join(f"{p.key} {p.describe()}" for p in space))
        stage.space = space
        study = run_stage(search, stage, last=stage is stages[-1])
        studies.append(study)
        best = _best(study)
        found = edge_warnings(stage.space, best, s["edge_fraction"])
        for line in found:
            log.warning("search: stage %d: %s", stage.index, line)
        warnings_found += [f"stage {stage.index}: {line}" for line in found]
        states = [_state(t) for t in study.get_trials(deepcopy=False)]
        records.append({"stage": stage.index, "study_name": stage.study_name, "trials": stage.trials,
                        "epochs": stage.epochs, "space": {p.key: p.spec() for p in stage.space},
                        **{k: states.count(k) for k in ("completed", "pruned", "diverged", "failed", "interrupted",
                                                         "running")},
                        "best": None if best is None else {"trial": f"{stage.label}{best.number}", "val_acc": best.value,
                                                           "params": best.params,
                                                           "run_dir": best.user_attrs.get("run_dir")}})
    return _report(search, stages, studies, records, warnings_found)


def _report(search: Search, stages: list, studies: list, records: list, warnings_found: list) -> float:
    results, table = write_results(search.dir, stages, studies)
    log.info("search: %d trials, best first (%s):\n%s", sum(len(st.get_trials(deepcopy=False)) for st in studies),
             results, table)
    stage, study = stages[-1], studies[-1]
    best = _best(study)
    files = [results.name]
    if best is not None:
        files.append(write_best(search, stage, best).name)
    if search.s["plots"]:
        for st, sd in zip(stages, studies):
            try:
                files += [f"plots/{name}" for name in
                          write_plots(search.dir, st, sd, f"stage{st.index}_" if len(stages) > 1 else "",
                                      search.s["edge_fraction"])]
            except Exception as err:  # noqa: BLE001  the results are complete without the plots
                log.warning("search: the plots failed: %s: %s", type(err).__name__, err, exc_info=True)
    summary = {"status": "completed" if best is not None else "no trial completed", "storage": search.storage_name,
               "sampler": search.s["sampler"], "pruner": search.s["pruner"], "seed": search.s["seed"],
               "best": records[-1]["best"], "stages": records, "edge_warnings": warnings_found}
    write_text_atomic(search.dir / "search.json", json.dumps(summary, indent=2, default=str) + "\n")
    files.append("search.json")
    if best is None:
        log.warning("search: no trial completed; see results.csv for why (%s)", search.dir)
        return 0.0
    log.info("search: best trial %s%d: val acc %.2f%% with %s | %s in %s", stage.label, best.number, 100 * best.value,
             ", ".join(f"{k}={_num(v)}" for k, v in best.params.items()), ", ".join(files), search.dir)
    log.info("search: re-run the best trial: python -m cvtrain --config-dir %s --config-name best", search.dir)
    return float(best.value)
