"""A sweep's results table: when a sweep (python -m cvtrain -m ...) ends, <sweep dir>/results.csv and a
printed table of its trials, best validation accuracy first.

    write_sweep_results(sweep_dir) -> (results.csv, the table)   from each trial's summary.json and
                                                                 .hydra/overrides.yaml
    report_sweep(argv, claimed)                                  main()'s hook at a sweep's end

A trial is a folder directly under the sweep dir with a summary.json or a .hydra/ folder (a trial that
never wrote its summary.json, killed, shows status "running"). The columns: run (the trial's folder),
the overridden keys whose values differ between the trials (the swept ones: model, optim.lr, ...; every
override when there is one trial), status, best_val_acc, epochs, train_time_s, run_dir. A sweep into a
hydra.sweep.dir that already held trials lists those too.
"""
import csv
import io
import json
import logging
from pathlib import Path
from typing import Optional

import yaml

from cvtrain.checkpoint import write_text_atomic
from cvtrain.table import format_table

log = logging.getLogger("cvtrain")
RESULTS = ["status", "best_val_acc", "epochs", "train_time_s"]


def _overrides(run_dir: Path) -> dict:
    """{key: value} of a trial's .hydra/overrides.yaml (model=mlp -> {"model": "mlp"}); {} without one."""
    try:
        items = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
    except (OSError, yaml.YAMLError):
        return {}
    out = {}
    for item in items:
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if not key.startswith("hydra"):
            out[key] = value
    return out


def _summary(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def sweep_rows(sweep_dir) -> tuple:
    """(columns, rows) of the sweep's trials, best validation accuracy first (trials without one last)."""
    sweep_dir = Path(sweep_dir)
    trials = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
                    and ((p / "summary.json").is_file() or (p / ".hydra").is_dir()))
    rows = []
    for run_dir in trials:
        summary = _summary(run_dir)
        rows.append({"run": run_dir.name, **_overrides(run_dir),
                     "status": summary.get("status", "running"), "best_val_acc": summary.get("best_val_acc"),
                     "epochs": summary.get("epochs"), "train_time_s": summary.get("train_time_s"),
                     "run_dir": str(run_dir)})
    keys = list(dict.fromkeys(k for row in rows for k in row if k not in ("run", *RESULTS, "run_dir")))
    swept = [k for k in keys if len({row.get(k) for row in rows}) > 1] if len(rows) > 1 else keys
    columns = ["run", *swept, *RESULTS, "run_dir"]

    def rank(row):
        acc = row["best_val_acc"]
        ok = isinstance(acc, (int, float)) and acc == acc and acc >= 0  # NaN or -1 (no epoch): no accuracy
        return (not ok, -(acc if ok else 0), row["run"])

    return columns, sorted(rows, key=rank)


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "best_val_acc" and isinstance(value, (int, float)):
        return f"{100 * value:.2f}%"
    return str(value)


def write_sweep_results(sweep_dir) -> tuple:
    """Write <sweep dir>/results.csv (one row per trial, best first); returns (its path, the table as text)."""
    sweep_dir = Path(sweep_dir)
    columns, rows = sweep_rows(sweep_dir)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(k) is None else row.get(k) for k in columns])
    path = sweep_dir / "results.csv"
    write_text_atomic(path, buffer.getvalue())
    right = {i for i, k in enumerate(columns) if k in ("best_val_acc", "epochs", "train_time_s")}
    shown = [[_cell(k, row.get(k)) for k in columns if k != "run_dir"] for row in rows]
    return path, format_table([k for k in columns if k != "run_dir"], shown, right=right)


def is_sweep(argv: list) -> bool:
    """Whether a command line runs a sweep (-m, --multirun, hydra.mode=MULTIRUN)."""
    return any(a in ("-m", "--multirun") or a.startswith("hydra.mode=MULTIRUN") for a in argv)


def sweep_dir_of(argv: list, claimed=()) -> Optional[Path]:
    """The sweep dir of a command line with -m: hydra.sweep.dir when given, else the one this process
    claimed (__main__.SWEEP_DIRS); None for a command that is not a sweep."""
    if not is_sweep(argv):
        return None
    given = [a.lstrip("+").split("=", 1)[1] for a in argv if a.lstrip("+").startswith("hydra.sweep.dir=")]
    if given:
        return Path(given[-1].strip("'\""))
    return Path(claimed[-1]) if claimed else None


def report_sweep(argv: list, claimed=()) -> Optional[Path]:
    """At a sweep's end (main(), after hydra_main): results.csv in the sweep dir and the table on stdout.
    Does nothing for a command that is not a sweep or ran no trial; never raises (a warning instead)."""
    try:
        sweep_dir = sweep_dir_of(argv, claimed)
        if sweep_dir is None or not sweep_dir.is_dir():
            return None
        columns, rows = sweep_rows(sweep_dir)
        if not rows:
            return None
        path, table = write_sweep_results(sweep_dir)
        print(f"sweep: {len(rows)} trial(s), best validation accuracy first ({path}):\n{table}", flush=True)
        return path
    except Exception as err:  # noqa: BLE001  the trials' own files are complete without the table
        log.warning("could not write the sweep's results table: %s: %s", type(err).__name__, err)
        print(f"warning: could not write the sweep's results table: {err}")
        return None
