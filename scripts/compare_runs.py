"""Compare cvtrain runs: one row per run directory, read from the files each run writes.

    python scripts/compare_runs.py outputs/                      # every run under outputs/, oldest first
    python scripts/compare_runs.py outputs/ --sort best_val_acc --desc
    python scripts/compare_runs.py outputs/multirun/ --filter model=lenet --filter status=completed
    python scripts/compare_runs.py outputs/ --columns run model optim.lr best_val_acc --csv > runs.csv

A run directory is one with a summary.json (written when a run ends: completed, diverged, or a kNN
run) or with a metrics.jsonl but no summary.json yet (status "running": still training, or killed).
Columns: run (the path under the given directory); the choices data, model, optim, sched, aug (from
.hydra/hydra.yaml) and loss, reg, experiment, trainer when they differ between the listed runs;
the hyperparameters (keys of .hydra/config.yaml) whose values differ between the listed runs,
so the table stays narrow; then status, best_val_acc, test_acc (when a run has one), epochs
(completed epochs for diverged and running runs) and train_time_s. Any config key (optim.lr) and
`overrides` (what was typed) can be shown with --columns, sorted on or filtered on too.
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
from cvtrain.monitor import flatten_config
from cvtrain.table import format_table

CHOICES = ["data", "model", "optim", "sched", "aug"]
OTHER_CHOICES = ["loss", "reg", "experiment", "trainer"]  # shown when they differ
RESULTS = ["status", "best_val_acc", "test_acc", "epochs", "train_time_s"]
PERCENT = {"best_val_acc", "test_acc"}
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


def read_run(run_dir: Path, root: Path) -> dict:
    """One run as a flat dict: run, overrides, its choices, its config keys, its results."""
    hydra_dir = run_dir / ".hydra"
    config = flatten_config({k: v for k, v in (_yaml(hydra_dir / "config.yaml") or {}).items() if k != "hydra"})
    if "data.source" in config:  # a run of cvtrain before data.source was renamed data.name
        config["data.name"] = config.pop("data.source")
    config = {k: v for k, v in config.items() if not k.startswith("task.")}  # what the command did, not how
    if config.get("data.name") != "synthetic":  # these keys mean nothing for real data
        config = {k: v for k, v in config.items() if k not in SYNTHETIC_ONLY}
    hydra = (_yaml(hydra_dir / "hydra.yaml") or {}).get("hydra", {})
    choices = {group: str(choice) for group, choice in hydra.get("runtime", {}).get("choices", {}).items()
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
    overrides = _yaml(hydra_dir / "overrides.yaml") or []
    return {"run": name, "overrides": " ".join(map(str, overrides)), **config, **choices, **results}


def _differs(runs: list, key: str) -> bool:
    """Whether the runs that have `key` do not all have the same value (a missing key is no difference)."""
    return len({json.dumps(r[key], sort_keys=True, default=str) for r in runs if key in r}) > 1


def default_columns(runs: list) -> list[str]:
    hparams = []
    for run in runs:  # config order, as first seen
        for key in run:
            if "." in key and key not in hparams and key not in NOT_HPARAMS and key.rsplit(".", 1)[-1] != "name" \
                    and not key.rsplit(".", 1)[-1].startswith("_") and _differs(runs, key):
                hparams.append(key)
    extra = [g for g in OTHER_CHOICES if _differs(runs, g)]
    results = [c for c in RESULTS if c != "test_acc" or any(r.get("test_acc") is not None for r in runs)]
    return ["run", *CHOICES, *extra, *hparams, *results]


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
    if value is None:
        return "" if raw else "-"
    if raw:
        return json.dumps(value) if isinstance(value, (list, bool)) else str(value)
    if column in PERCENT and isinstance(value, (int, float)):
        return f"{100 * value:.2f}%"
    if column == "train_time_s" and isinstance(value, (int, float)):
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, bool)):
        return json.dumps(value)
    return str(value)


def runs_table(columns: list, runs: list) -> str:
    """The table: numeric columns right-aligned."""
    numeric = [i for i, c in enumerate(columns) if c != "run" and all(
        isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) for r in runs if r.get(c) is not None)]
    return format_table(columns, [[format_value(c, r.get(c)) for c in columns] for r in runs], right=numeric)


def compare(roots: list, sort: str = "run", descending: bool = False, columns: list = None, filters=(),
            as_csv: bool = False) -> str:
    runs = []
    for root in map(Path, roots):
        if not root.is_dir():
            raise UserError(f"{root} is not a directory; pass the directory that holds the runs, e.g. outputs/")
        runs += [read_run(d, root) for d in find_runs(root)]
    if not runs:
        raise UserError(f"no runs under {', '.join(map(str, roots))} (no directory with a summary.json or "
                        "metrics.jsonl); pass the directory that holds the runs, e.g. outputs/")
    runs = apply_filters(runs, list(filters), default_columns(runs))
    if not runs:
        raise UserError(f"no run matches --filter {' '.join(filters)}")
    table_columns = default_columns(runs)
    for column in columns or []:
        check_column(column, table_columns, runs, "--columns")
    check_column(sort, table_columns, runs, "--sort")
    columns = columns or table_columns
    runs = sort_runs(runs, sort, descending)
    if as_csv:
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(
            [columns] + [[format_value(c, r.get(c), raw=True) for c in columns] for r in runs])
        return out.getvalue().rstrip("\n")
    return runs_table(columns, runs)


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
    args = parser.parse_args(argv)
    try:
        columns = [c for arg in args.columns for c in arg.split(",") if c] if args.columns else None
        print(compare(args.dirs, args.sort, args.desc, columns, args.filter, args.csv))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
