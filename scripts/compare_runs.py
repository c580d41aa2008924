"""Compare cvtrain runs: one row per run directory, read from the files each run writes.

    python scripts/compare_runs.py outputs/                      # every run under outputs/, oldest first
    python scripts/compare_runs.py outputs/ --sort best_val_acc --desc
    python scripts/compare_runs.py outputs/sweep-1201-150000/ --filter model=lenet --filter status=completed
    python scripts/compare_runs.py outputs/ --columns run model optim.lr best_val_acc --csv > runs.csv
    python scripts/compare_runs.py outputs/ --wide                # every choice, key and metric that differs

A run directory is one with a summary.json (written when a run ends: completed, diverged, or a kNN
run) or with a metrics.jsonl but no summary.json yet (status "running": still training, or killed).
The default table is narrow, only what tells the listed runs apart:
  run       the path under the given directory, less the directories all listed runs share (a line
            above the table names them: "runs in outputs/sweep-1201-150000/")
  choices   model always; data, optim, sched, aug, loss, reg, experiment, trainer (from
            .hydra/hydra.yaml) when they differ between the listed runs
  keys      the keys of .hydra/config.yaml whose values differ between runs with the same choice of
            the key's group: optim.lr when two adam runs have different lrs, not optim.betas when it
            differs only because the optimizer does (adam vs sgd); a key only some runs have
            (model.hidden_sizes of an mlp) is no difference by itself
  results   status, best_val_acc, test_acc (when a run has one), epochs (completed epochs for
            diverged and running runs), train_time_s
--wide shows the whole run path, the choices data, model, optim, sched, aug (and the others when they
differ), every key whose values differ, and every numeric summary.json value (final_val_acc, params,
update_ratio_log10, ...). Any config key (optim.lr), summary.json key and `overrides` (what was typed)
can be shown with --columns, sorted on or filtered on too. A missing value (a key a run does not have,
null, none yet) is "-" in the table and empty in --csv.
A bad argument prints `error: ...` and exits with status 2.
"""
import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path

import yaml

from cvtrain import UserError
from cvtrain.config import NOT_HPARAMS, SYNTHETIC_ONLY
from cvtrain.hparams import differing, flatten_config
from cvtrain.table import format_table

CHOICES = ["data", "model", "optim", "sched", "aug"]  # --wide: always
OTHER_CHOICES = ["loss", "reg", "experiment", "trainer"]  # --wide: when they differ
ALWAYS = ["model"]  # by default only the choices that differ, and these, so a one-model table says what it is
MISSING = "-"  # a missing value in the table (--csv: empty)
RESULTS = ["status", "best_val_acc", "test_acc", "epochs", "train_time_s"]
PERCENT = {"best_val_acc", "test_acc", "final_val_acc"}
SKIP_DIRS = {"tb", "checkpoints", "viz", ".hydra"}


def find_runs(root: Path) -> list[Path]:
    """Every run directory under `root` (itself included), sorted by path."""
    runs = []
    for dirpath, dirnames, filenames in os.walk(root):
        if "summary.json" in filenames or ("metrics.jsonl" in filenames and Path(dirpath, ".hydra").is_dir()):
            runs.append(Path(dirpath))
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
    return sorted(runs)


def _yaml(path: Path):
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def read_run(run_dir: Path, root: Path, prefix_root: bool = False) -> dict:
    """One run as a flat dict: run, overrides, its choices, its config keys, its results."""
    hydra_dir = run_dir / ".hydra"
    config = flatten_config({k: v for k, v in (_yaml(hydra_dir / "config.yaml") or {}).items() if k != "hydra"})
    if "data.source" in config:  # a run of cvtrain before data.source was renamed data.name
        config["data.name"] = config.pop("data.source")
    config = {k: v for k, v in config.items() if not k.startswith("task.")}  # what the command did, not how
    if config.get("data.name") != "synthetic":  # these keys mean nothing for real data
        config = {k: v for k, v in config.items() if k not in SYNTHETIC_ONLY}
    hydra = (_yaml(hydra_dir / "hydra.yaml") or {}).get("hydra", {})
    choices = {group: None if choice is None else str(choice)  # experiment: null, not "None"
               for group, choice in hydra.get("runtime", {}).get("choices", {}).items()
               if not group.startswith("hydra") and group != "task"}
    choices.setdefault("data", config.get("data.name"))  # a run dir without hydra.yaml: what the config says
    choices.setdefault("model", config.get("model.name"))
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else None
    metrics_file = run_dir / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()] \
        if metrics_file.is_file() else []
    val_accs = [m["val_acc"] for m in metrics if m.get("val_acc") is not None]
    if summary is None:  # no summary yet: still training (or killed); what metrics.jsonl says so far
        summary = {"status": "running", "best_val_acc": max(val_accs) if val_accs else None,
                   "epochs_completed": len(metrics)}
    results = {
        "status": summary.get("status", "completed"),  # kNN summaries have no status: they always complete
        "best_val_acc": summary.get("best_val_acc"),
        "test_acc": summary.get("test_acc"),
        "epochs": summary.get("epochs_completed", summary.get("epochs")),
        "train_time_s": summary.get("train_time_s",
                                    round(sum(m.get("epoch_time_s", 0) for m in metrics), 3) if metrics else None),
    }
    # the rest of summary.json (update_ratio_log10, train_images_per_s, params, reason, ...): --columns / --sort
    results.update({k: v for k, v in summary.items() if k not in results and k != "epochs_completed"
                    and isinstance(v, (int, float, str))})
    name = run_dir.relative_to(root).as_posix() if run_dir != root else run_dir.name
    if prefix_root:  # several directories were given: which one the run is under
        name = (root / name).as_posix() if run_dir != root else run_dir.as_posix()
    overrides = _yaml(hydra_dir / "overrides.yaml") or []
    return {"run": name, "overrides": " ".join(map(str, overrides)), **config, **choices, **results}


def _differs(runs: list, key: str) -> bool:
    """Whether the runs that have `key` do not all have the same value (a missing key is no difference)."""
    return len({json.dumps(r[key], sort_keys=True, default=str) for r in runs if key in r}) > 1


def _hparams(runs: list) -> list[str]:
    """The config keys that are hyperparameters and differ between the runs, in config order, as first seen."""
    keys = []
    for run in runs:
        for key in run:
            if "." in key and key not in keys and key not in NOT_HPARAMS and key.rsplit(".", 1)[-1] != "name" \
                    and not key.rsplit(".", 1)[-1].startswith("_") and _differs(runs, key):
                keys.append(key)
    return keys


def _has(runs: list, column: str) -> bool:
    return any(r.get(column) is not None for r in runs)


def default_columns(runs: list, wide: bool = False) -> list[str]:
    """The columns of the table: narrow (what tells the runs apart), or with `wide` every choice, every
    differing key and every numeric summary value."""
    results = [c for c in RESULTS if c != "test_acc" or _has(runs, "test_acc")]
    if wide:
        choices = [*CHOICES, *(g for g in OTHER_CHOICES if _differs(runs, g))]
        metrics = []  # the rest of summary.json: keys without a dot (config keys have one) with numbers
        for run in runs:
            for key, value in run.items():
                if "." not in key and key not in metrics and key not in results and key not in choices \
                        and isinstance(value, (int, float)) and not isinstance(value, bool):
                    metrics.append(key)
        return ["run", *choices, *_hparams(runs), *results, *metrics]
    choices = [g for g in [*CHOICES, *OTHER_CHOICES] if g in ALWAYS or _differs(runs, g)]
    within_choice = differing(runs)  # optim.lr between two adam runs, not optim.betas between adam and sgd
    return ["run", *choices, *(k for k in _hparams(runs) if k in within_choice), *results]


def check_column(column: str, columns: list, runs: list, what: str) -> None:
    if column not in columns and column != "overrides" and not any(column in r for r in runs):
        raise UserError(f"{what} {column!r} is not a column; valid columns: {', '.join(columns)} "
                        "(or any config key, e.g. optim.lr, any summary.json key, e.g. update_ratio_log10, "
                        "or overrides)")


def _matches(value, wanted: str) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(wanted) == float(value)
        except ValueError:
            return False
    text = json.dumps(value) if isinstance(value, (list, bool)) or value is None else str(value)
    return text == wanted or (value is None and wanted in ("", "-", "null", "None"))


def apply_filters(runs: list, filters: list, columns: list) -> list:
    for item in filters:
        key, sep, wanted = item.partition("=")
        if not sep or not key:
            raise UserError(f"--filter {item!r}: write KEY=VALUE, e.g. --filter model=lenet")
        check_column(key, columns, runs, "--filter key")
        runs = [r for r in runs if _matches(r.get(key), wanted)]
    return runs


def sort_runs(runs: list, column: str, descending: bool = False) -> list:
    """Sorted on `column`: numbers by value, then text; runs without a value last in either direction."""
    def key(run):
        value = run.get(column)
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return (0, value) if is_number else (1, str(value))

    present = [r for r in runs if r.get(column) is not None]
    return sorted(present, key=key, reverse=descending) + [r for r in runs if r.get(column) is None]


def format_value(column: str, value, raw: bool = False) -> str:
    if value is None or value == "":  # missing, null, none yet: one way in every column
        return "" if raw else MISSING
    if raw:
        return json.dumps(value) if isinstance(value, (list, bool)) else str(value)
    if column in PERCENT and isinstance(value, (int, float)):
        return f"{100 * value:.2f}%"
    if column == "train_time_s" and isinstance(value, (int, float)):
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"  # 85780 images/s, not 8.578e+04
    if isinstance(value, (list, bool)):
        return json.dumps(value)
    return str(value)


def runs_table(columns: list, runs: list) -> str:
    """The table: numeric columns right-aligned."""
    numeric = [i for i, c in enumerate(columns) if c != "run" and all(
        isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) for r in runs if r.get(c) is not None)]
    return format_table(columns, [[format_value(c, r.get(c)) for c in columns] for r in runs], right=numeric)


def common_dirs(names: list) -> list[str]:
    """The leading directories that all run paths share (never a run's own last part)."""
    parents = [name.split("/")[:-1] for name in names]
    shared = []
    for parts in zip(*parents):
        if len(set(parts)) > 1:
            break
        shared.append(parts[0])
    return shared


def shorten_runs(runs: list, roots: list) -> tuple[list, str]:
    """`runs` with the directories all their paths share dropped from `run`, and the line that names them
    ("" when nothing was dropped)."""
    shared = common_dirs([r["run"] for r in runs])
    if not shared:
        return runs, ""
    cut = len("/".join(shared)) + 1
    where = "/".join(shared) if len(roots) > 1 else (Path(roots[0]) / "/".join(shared)).as_posix()
    return [{**r, "run": r["run"][cut:]} for r in runs], f"runs in {where}/"


def compare(roots: list, sort: str = "run", descending: bool = False, columns: list = None, filters=(),
            as_csv: bool = False, wide: bool = False) -> str:
    runs = []
    for root in map(Path, roots):
        if not root.is_dir():
            raise UserError(f"{root} is not a directory; pass the directory that holds the runs, e.g. outputs/")
        runs += [read_run(d, root, prefix_root=len(roots) > 1) for d in find_runs(root)]
    if not runs:
        raise UserError(f"no runs under {', '.join(map(str, roots))} (no directory with a summary.json or "
                        "metrics.jsonl); pass the directory that holds the runs, e.g. outputs/")
    runs = apply_filters(runs, list(filters), default_columns(runs, wide=True))
    if not runs:
        raise UserError(f"no run matches --filter {' '.join(filters)}")
    valid = default_columns(runs, wide=True)  # what an error lists
    for column in columns or []:
        check_column(column, valid, runs, "--columns")
    check_column(sort, valid, runs, "--sort")
    columns = columns or default_columns(runs, wide)
    runs = sort_runs(runs, sort, descending)
    if as_csv:  # whole run paths and raw values, for a spreadsheet
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(
            [columns] + [[format_value(c, r.get(c), raw=True) for c in columns] for r in runs])
        return out.getvalue().rstrip("\n")
    above = ""
    if "run" in columns and not wide:
        runs, above = shorten_runs(runs, roots)
    return (above + "\n" if above else "") + runs_table(columns, runs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Compare cvtrain runs: one row per run directory.")
    parser.add_argument("dirs", nargs="*", default=["outputs"], help="directories holding runs (default: outputs)")
    parser.add_argument("--sort", default="run", metavar="COLUMN", help="column to sort on (default: run)")
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--desc", action="store_true", help="largest first")
    order.add_argument("--asc", action="store_true", help="smallest first (the default)")
    parser.add_argument("--columns", nargs="+", metavar="COLUMN",
                        help="show these columns, in this order (space- or comma-separated)")
    parser.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                        help="keep runs whose KEY (a column or config key) equals VALUE; repeatable")
    parser.add_argument("--csv", action="store_true", help="comma-separated values with raw numbers")
    parser.add_argument("--wide", action="store_true",
                        help="whole run paths, every choice, every key that differs, every summary number")
    args = parser.parse_args(argv)
    try:
        columns = [c for arg in args.columns for c in arg.split(",") if c] if args.columns else None
        print(compare(args.dirs, args.sort, args.desc, columns, args.filter, args.csv, args.wide))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
