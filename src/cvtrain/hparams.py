"""TensorBoard's HPARAMS tab: one experiment for a whole log dir, one row (session) per run.

Every training run writes into its own event file a session start (its hyperparameters: the
config-group choices and the config values that shape training, leaving out the keys of options
it does not use, e.g. every aug.* key under aug=none) and, at the end, a session end with its
status. The experiment, the list of columns, is written once for the log dir into
<log root>/reference/ (the folder TensorBoard is pointed at, `outputs`: the common parent of
hydra.run.dir and hydra.sweep.dir), rebuilt from every run's .hydra/ files at the start and at
the end of each run: the union of all runs' keys, each marked as differing when the runs that
have it do not all share one value (the choices and the swept values), and the summary metrics.
TensorBoard shows the differing keys first and as the default columns, and a new sweep into the
same log dir rewrites the experiment to cover it.

The same folder holds the one neutral reference line of the update/weight-ratio chart,
update_ratio/reference_1e-3 = -3 from step 0 to the last step of any run.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.plugins.hparams import api_pb2, metadata as hp_metadata, plugin_data_pb2
from torch.utils.tensorboard import SummaryWriter

from cvtrain.config import NOT_HPARAMS, SYNTHETIC_ONLY, AugConfig, RegConfig

# the final figures shown beside the hyperparameters (scalars summary/<metric> at the end of a run)
SUMMARY_METRICS = ["best_val_acc", "final_val_acc", "test_acc", "train_time_s", "train_images_per_s",
                   "update_ratio_log10"]
GROUPS = ("model", "loss", "reg", "optim", "sched", "aug", "data", "trainer")
EXPERIMENT_DIR = "reference"  # under the log root: the experiment and the update-ratio reference line
EXPERIMENT_MARKER = ".cvtrain-experiment"  # in EXPERIMENT_DIR: write_experiment replaces only folders with it
UPDATE_RATIO_REFERENCE = -3.0  # log10(1e-3): the course's rule of thumb for a healthy learning rate
REFERENCE_POINTS = 100  # the reference line: -3 at 101 steps evenly spaced from 0 to the last step of any run
OFF = {**{f"aug.{k}": v for k, v in vars(AugConfig()).items()}, **{f"reg.{k}": v for k, v in vars(RegConfig()).items()}}


def flatten_config(node, prefix: str = "") -> dict:
    """A nested config (plain dicts) as {"optim.lr": 0.001, "model.hidden_sizes": [512], ...}: one key per
    leaf, values as they are. Also what scripts/compare_runs.py reads a run's .hydra/config.yaml with."""
    out = {}
    for key, value in (node or {}).items():
        if isinstance(value, dict):
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def hparams_of(plain_cfg: dict, choices: dict) -> dict:
    """A run's row: its choices ({"model": "lenet", ...}) and the config values that shape training,
    without what adds nothing: the keys of options it does not use (aug and reg keys left at their
    "off" value, the synthetic-data keys for real data), null values (a builder's own default, e.g.
    LeNet's activation) and a group's `name` when the row has the group's choice. Values TensorBoard
    takes: numbers and strings (bools and lists as text)."""
    values = flatten_config({k: plain_cfg[k] for k in GROUPS if k in plain_cfg})
    skip = NOT_HPARAMS | (SYNTHETIC_ONLY if values.get("data.name") != "synthetic" else set())
    skip |= {f"{group}.name" for group in choices}
    row = {k: v for k, v in values.items()
           if k not in skip and v is not None and not (k in OFF and v == OFF[k])}
    row = {**choices, **row}
    return {k: v if isinstance(v, (int, float, str)) and not isinstance(v, bool) else str(v) for k, v in row.items()}


def group_choices() -> dict:
    """{group: option} as chosen on the command line or by the defaults (data, model, optim, ...),
    from Hydra's runtime; {} outside a Hydra run (a test or script that composed the config itself)."""
    if not HydraConfig.initialized():
        return {}
    return _choices(HydraConfig.get().runtime.choices)


def _choices(choices) -> dict:
    return {group: str(choice) for group, choice in choices.items()
            if not group.startswith("hydra") and group not in ("trainer", "task") and choice is not None}


def run_hparams(cfg) -> dict:
    """The HPARAMS row of the running run."""
    return hparams_of(OmegaConf.to_container(cfg, resolve=True), group_choices())


def log_root(run_dir: Path):
    """The folder TensorBoard is pointed at: the common parent of hydra.run.dir and hydra.sweep.dir
    (`outputs`), when run_dir is below it; None outside a Hydra run, and None when that parent is the
    working directory or above it: a hydra.run.dir moved elsewhere (/tmp/runs/a beside the default
    outputs/sweep-...) meets the sweep dir only at / or /tmp, which are no folder of runs (the experiment
    would search the whole tree for runs and write a `reference` folder there)."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    try:
        root = Path(os.path.commonpath([os.path.abspath(hydra_cfg.run.dir), os.path.abspath(hydra_cfg.sweep.dir)]))
    except ValueError:
        return None
    root, run_dir, cwd = root.resolve(), Path(run_dir).resolve(), Path.cwd().resolve()
    if root == cwd or root in cwd.parents:
        return None
    return root if root != run_dir and root in run_dir.parents else None


def session_start(hparams: dict) -> Summary:
    """The session start of a run: its hyperparameter values (TensorBoard's SessionStartInfo)."""
    info = plugin_data_pb2.SessionStartInfo()
    for key, value in hparams.items():
        if isinstance(value, str):
            info.hparams[key].string_value = value
        else:
            info.hparams[key].number_value = value
    return _summary(hp_metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=info))


def session_end(status: str) -> Summary:
    """The session end: completed runs are STATUS_SUCCESS, diverged ones STATUS_FAILURE."""
    info = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS if status == "completed"
                                          else api_pb2.STATUS_FAILURE)
    return _summary(hp_metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=info))


def differing(rows: list) -> set:
    """The keys whose values differ between the runs: a choice (`model`) when the runs chose differently;
    a key of a group (`optim.lr`) when it differs between runs that made the same choice for the group,
    not when it differs only because the choice does (`optim.betas` between sgd and adam runs); a key
    only some runs have is no difference by itself."""
    found = set()
    for key in {k for row in rows for k in row}:
        group = key.split(".")[0]
        same_choice = {}
        for row in rows:
            if key in row:
                choice = row.get(group) if "." in key else None
                same_choice.setdefault(choice, set()).add(json.dumps(row[key], default=str))
        if any(len(values) > 1 for values in same_choice.values()):
            found.add(key)
    return found


def experiment(rows: list) -> Summary:
    """The experiment of these runs' rows: every key any run has (see `differing` for which are marked
    as differing: TensorBoard lists those first and shows them by default), and the summary metrics."""
    keys = {}
    for row in rows:
        for key, value in row.items():
            keys.setdefault(key, set()).add(json.dumps(value))
    differs = differing(rows)

    def data_type(values):
        strings = sum(v.startswith('"') for v in values)
        return (api_pb2.DATA_TYPE_STRING if strings == len(values) else
                api_pb2.DATA_TYPE_FLOAT64 if strings == 0 else api_pb2.DATA_TYPE_UNSET)

    infos = [api_pb2.HParamInfo(name=key, differs=key in differs, type=data_type(values))
             for key, values in sorted(keys.items())]
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=f"summary/{m}"), display_name=m) for m in SUMMARY_METRICS]
    return _summary(hp_metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(
        experiment=api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics)))


def _summary(tag: str, content) -> Summary:
    content.version = hp_metadata.PLUGIN_DATA_VERSION
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=hp_metadata.PLUGIN_NAME,
                                                                  content=content.SerializeToString()))
    return Summary(value=[Summary.Value(tag=tag, metadata=meta)])


def logged_runs(root: Path) -> list:
    """(run dir, its row, its last step) of every training run under root: a folder with .hydra/ files of
    task train and a metrics.jsonl or summary.json."""
    runs = []
    for config_file in sorted(Path(root).rglob(".hydra/config.yaml")):
        run_dir = config_file.parent.parent
        if not ((run_dir / "metrics.jsonl").is_file() or (run_dir / "summary.json").is_file()):
            continue
        config = yaml.safe_load(config_file.read_text()) or {}
        if (config.get("task") or {}).get("name", "train") != "train":
            continue
        hydra_file = run_dir / ".hydra" / "hydra.yaml"
        hydra = (yaml.safe_load(hydra_file.read_text()) or {}).get("hydra", {}) if hydra_file.is_file() else {}
        choices = _choices(hydra.get("runtime", {}).get("choices", {}))
        runs.append((run_dir, hparams_of(config, choices), _last_step(run_dir)))
    return runs


def _last_step(run_dir: Path) -> int:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []
    return json.loads(lines[-1]).get("step", 0) if lines else 0


def written_by_cvtrain(folder: Path) -> bool:
    """Whether `folder` is an experiment folder write_experiment made: it holds the marker file, or (as the
    folders of versions before the marker) nothing but TensorBoard event files."""
    entries = list(folder.iterdir())
    return (folder / EXPERIMENT_MARKER).is_file() or all(
        e.is_file() and e.name.startswith("events.out.tfevents.") for e in entries)


def write_experiment(root: Path) -> Path:
    """(Re)write <root>/reference/: the HPARAMS experiment of every training run under root and the
    update-ratio reference line. Written to a new folder, then swapped in, so a reader never sees
    half of it. A `reference` folder that write_experiment did not make (written_by_cvtrain) is left
    as it is: ValueError, and no experiment."""
    target = Path(root) / EXPERIMENT_DIR
    if (target.is_dir() and not written_by_cvtrain(target)) or (target.exists() and not target.is_dir()):
        raise ValueError(f"{target} was not written by cvtrain: left as it is, no HPARAMS experiment there")
    runs = logged_runs(root)
    tmp = Path(tempfile.mkdtemp(prefix=".reference-", dir=root))
    writer = SummaryWriter(str(tmp))
    writer.file_writer.add_summary(experiment([row for _, row, _ in runs]))
    last = max([step for _, _, step in runs] + [1])
    # as many points as a chart of medians has: two points alone are "outliers" TensorBoard's default
    # y-axis scaling leaves out
    for i in range(REFERENCE_POINTS + 1):
        writer.add_scalar("update_ratio/reference_1e-3", UPDATE_RATIO_REFERENCE, round(i * last / REFERENCE_POINTS))
    writer.close()
    (tmp / EXPERIMENT_MARKER).write_text("written by cvtrain (hparams.write_experiment); replaced at every run\n")
    old = target.with_name(f".{EXPERIMENT_DIR}-old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target
