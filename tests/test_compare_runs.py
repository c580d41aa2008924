"""scripts/compare_runs.py on hand-made run directories (summary.json, metrics.jsonl, .hydra/*.yaml)."""
import copy
import csv
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_runs.py"
spec = importlib.util.spec_from_file_location("compare_runs", SCRIPT)
compare_runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_runs)

BASE = {"task": {"name": "train"},
        "data": {"name": "digits", "batch_size": 64, "cache_dir": "~/.cache/cvtrain", "num_samples": 1000},
        "model": {"name": "lenet", "init": "native"},
        "optim": {"name": "adam", "lr": 0.001},
        "trainer": {"epochs": 10, "seed": 0, "progress": True}}


def make_run(root, name, choices, summary=None, metrics=(), groups=None, **changes):
    """A run dir as train() and Hydra leave it; `groups`: whole config groups that replace BASE's
    ({"optim": SGD}), `changes`: {"optim.lr": 0.1, ...} on top."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    config = copy.deepcopy({**BASE, **(groups or {})})
    for key, value in changes.items():
        group, leaf = key.split(".")
        config[group][leaf] = value
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    all_choices = {"data": "digits", "model": "lenet", "optim": "adam", "sched": "cosine", "aug": "none",
                   "loss": "cross_entropy", "reg": "none", "trainer": "default", "task": "train", "hydra/launcher": "basic",
                   "experiment": None,
                   **{k: v for k, v in choices.items() if "." not in k}}  # key=value overrides are no choice
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": all_choices}}}))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"{k}={v}" for k, v in choices.items()]))
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def epoch(n, val_acc):
    return {"epoch": n, "step": 56 * n, "val_acc": val_acc, "epoch_time_s": 2.0}


@pytest.fixture()
def outputs(tmp_path):
    root = tmp_path / "outputs"
    make_run(root, "2026-01-01/10-00-00_digits_lenet_adam", {},
             {"status": "completed", "best_val_acc": 0.975, "best_epoch": 6, "final_val_acc": 0.97, "epochs": 10,
              "train_time_s": 21.4, "test_acc": 0.971, "params": 1256080, "device": "cpu"},
             [epoch(1, 0.9)], **{"trainer.progress": False})  # a setting, not a hyperparameter
    make_run(root, "2026-01-01/11-00-00_digits_mlp_sgd", {"model": "mlp", "optim": "sgd"},
             {"status": "completed", "best_val_acc": 0.93, "epochs": 10, "train_time_s": 8.0},
             **{"model.name": "mlp", "model.hidden_sizes": [100], "optim.lr": 0.1})
    make_run(root, "multirun/2026-01-02_09-00-00/0_digits_lenet_sgd", {"optim": "sgd"},
             {"status": "diverged", "reason": "the loss became nan at step 3", "epochs_completed": 0,
              "best_val_acc": None, "params": 1256080}, **{"optim.lr": 1.0})
    make_run(root, "multirun/2026-01-02_09-00-00/1_digits_knn", {"model": "knn"},
             {"status": "completed", "best_val_acc": 0.91, "k": 5, "epochs": 0, "params": 0, "train_time_s": 0.5, "final_val_acc": 0.91},
             **{"model.name": "knn", "model.k": 5})
    make_run(root, "2026-01-03/08-00-00_digits_lenet_adam", {"trainer.seed": 1},  # no summary yet: running
             None, [epoch(1, 0.5), epoch(2, 0.6)], **{"trainer.seed": 1})
    (root / "2026-01-03" / "08-30-00_summary_digits_lenet" / ".hydra").mkdir(parents=True)  # task=summary: no run
    return root


def table(*args):
    """(header, {run: row}) of the printed table (after the "runs in DIR/" line, if any)."""
    lines = compare_runs.compare(*args).splitlines()
    if lines[0].startswith("runs in "):
        lines = lines[1:]
    header = lines[0].split()
    assert set(lines[1]) <= {"-", " "}
    return header, {line.split()[0]: dict(zip(header, line.split())) for line in lines[2:]}


def test_every_run_is_listed_with_its_status_and_results(outputs):
    header, rows = table([outputs])
    assert list(rows) == sorted(rows)  # default: sorted by path (date and time)
    assert len(rows) == 5
    lenet = rows["2026-01-01/10-00-00_digits_lenet_adam"]
    assert lenet | {"status": "completed", "best_val_acc": "97.50%", "test_acc": "97.10%", "epochs": "10",
                    "train_time_s": "21.4"} == lenet
    diverged = rows["multirun/2026-01-02_09-00-00/0_digits_lenet_sgd"]
    assert (diverged["status"], diverged["best_val_acc"], diverged["epochs"]) == ("diverged", "-", "0")
    knn = rows["multirun/2026-01-02_09-00-00/1_digits_knn"]
    assert (knn["status"], knn["model"], knn["best_val_acc"], knn["epochs"]) == ("completed", "knn", "91.00%", "0")
    running = rows["2026-01-03/08-00-00_digits_lenet_adam"]
    assert (running["status"], running["best_val_acc"], running["epochs"], running["train_time_s"]) == \
        ("running", "60.00%", "2", "4.0")


def test_only_the_hyperparameters_that_differ_are_columns(outputs):
    header, _ = table([outputs])
    assert header == ["run", "model", "optim", "optim.lr", "trainer.seed",
                      "status", "best_val_acc", "test_acc", "epochs", "train_time_s"]
    # not: choices equal everywhere (data, sched, aug), keys equal everywhere (data.batch_size), implied by a
    # choice (model.name), only one run has it (model.hidden_sizes, model.k), not a hyperparameter
    # (trainer.progress), synthetic-only (data.num_samples)
    header, _ = table([outputs], "run", False, None, ["model=lenet", "status=completed"])
    assert header == ["run", "model", "status", "best_val_acc", "test_acc", "epochs", "train_time_s"]
    header, _ = table([outputs], "run", False, None, [], False, True)  # --wide: every choice
    assert header[:8] == ["run", "data", "model", "optim", "sched", "aug", "optim.lr", "trainer.seed"]
    assert {"final_val_acc", "best_epoch", "params"} <= set(header)  # and the summary numbers


def test_sort_by_any_column_either_way_missing_values_last(outputs):
    _, rows = table([outputs], "best_val_acc", True)
    assert [r["best_val_acc"] for r in rows.values()] == ["97.50%", "93.00%", "91.00%", "60.00%", "-"]
    _, rows = table([outputs], "best_val_acc", False)
    assert [r["best_val_acc"] for r in rows.values()] == ["60.00%", "91.00%", "93.00%", "97.50%", "-"]
    _, rows = table([outputs], "optim.lr", True)
    assert [r["optim.lr"] for r in rows.values()] == ["1", "0.1", "0.001", "0.001", "0.001"]


def test_filter_and_columns(outputs):
    _, rows = table([outputs], "run", False, ["run", "optim", "trainer.epochs"], ["optim=sgd"])
    assert rows == {"2026-01-01/11-00-00_digits_mlp_sgd": {"run": "2026-01-01/11-00-00_digits_mlp_sgd", "optim": "sgd",
                                                           "trainer.epochs": "10"},
                    "multirun/2026-01-02_09-00-00/0_digits_lenet_sgd": {
                        "run": "multirun/2026-01-02_09-00-00/0_digits_lenet_sgd", "optim": "sgd",
                        "trainer.epochs": "10"}}
    lines = compare_runs.compare([outputs], "run", False, None, ["optim.lr=0.1"]).splitlines()
    assert lines[0] == f"runs in {outputs.as_posix()}/2026-01-01/"  # one run left: its directory above
    assert lines[3].split()[0] == "11-00-00_digits_mlp_sgd"
    _, rows = table([outputs], "run", False, None, ["run=2026-01-01/11-00-00_digits_mlp_sgd"])  # the whole path
    assert list(rows) == ["11-00-00_digits_mlp_sgd"]


def test_csv_has_raw_values(outputs):
    text = compare_runs.compare([outputs], "run", False, ["run", "best_val_acc", "status"], [], True)
    rows = {row["run"]: row for row in csv.DictReader(io.StringIO(text))}
    assert rows["2026-01-01/10-00-00_digits_lenet_adam"] == {"run": "2026-01-01/10-00-00_digits_lenet_adam",
                                                             "best_val_acc": "0.975", "status": "completed"}
    assert rows["multirun/2026-01-02_09-00-00/0_digits_lenet_sgd"]["best_val_acc"] == ""  # diverged: none


@pytest.mark.parametrize("args, message", [
    (["--sort", "bogus"], "--sort 'bogus' is not a column; valid columns: run, data, model, optim, sched, aug, optim.lr"),
    (["--columns", "run,nope"], "--columns 'nope' is not a column"),
    (["--filter", "modle=lenet"], "--filter key 'modle' is not a column"),
    (["--filter", "lenet"], "write KEY=VALUE"),
    (["--filter", "model=vgg11"], "no run matches --filter model=vgg11"),
])
def test_bad_arguments_are_errors_with_status_2(outputs, capsys, args, message):
    assert compare_runs.main([str(outputs), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_command_line(outputs, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=tmp_path)

    ok = run("outputs", "--sort", "best_val_acc", "--desc")
    assert ok.returncode == 0 and ok.stdout.splitlines()[2].startswith("2026-01-01/10-00-00_digits_lenet_adam")
    missing = run("nowhere")
    assert missing.returncode == 2 and "nowhere is not a directory" in missing.stderr
    assert "Traceback" not in missing.stderr
    empty = run(str(outputs / "2026-01-03" / "08-30-00_summary_digits_lenet"))
    assert empty.returncode == 2 and "no runs under" in empty.stderr


def test_any_summary_key_is_a_column(outputs):
    text = compare_runs.compare([outputs], "params", True, ["run", "params", "reason"], [], True)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows[0]["run"] == "2026-01-01/10-00-00_digits_lenet_adam" and rows[0]["params"] == "1256080"
    diverged = next(r for r in rows if "0_digits_lenet_sgd" in r["run"])
    assert diverged["reason"] == "the loss became nan at step 3"


SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 5.0e-4}
ADAM = {"name": "adam", "lr": 0.001, "betas": [0.9, 0.999], "eps": 1.0e-8, "weight_decay": 0.0}
LENET = {"name": "lenet", "variant": "modern", "activation": None, "init": "native", "bias_init": 0.0}
MLP = {"name": "mlp", "hidden_sizes": [256], "activation": "relu", "dropout": 0.0, "batch_norm": False,
       "init": "native", "bias_init": 0.0}
SWEEP = "multirun/2026-12-01_15-00-00"


def sweep(root, lrs=(None,)):
    """`python -m cvtrain -m model=lenet,mlp optim=sgd,adam [optim.lr=...]` as Hydra leaves it."""
    n = 0
    for model, model_cfg in [("lenet", LENET), ("mlp", MLP)]:
        for optim, optim_cfg in [("sgd", SGD), ("adam", ADAM)]:
            for lr in lrs:
                changes = {} if lr is None else {"optim.lr": lr}
                make_run(root, f"{SWEEP}/{n}_digits_{model}_{optim}", {"model": model, "optim": optim},
                         {"status": "completed", "best_val_acc": 0.9 + n / 100, "best_epoch": 3, "epochs": 3,
                          "train_time_s": 2.5, "params": 1000 + n, "final_val_acc": 0.9},
                         [epoch(1, 0.9)], groups={"model": model_cfg, "optim": optim_cfg}, **changes)
                n += 1
    return root


def test_default_table_of_a_sweep_is_narrow(tmp_path):
    root = sweep(tmp_path / "outputs")
    lines = compare_runs.compare([root]).splitlines()
    assert lines[0] == f"runs in {(root / SWEEP).as_posix()}/"  # what the run column leaves out
    header = lines[1].split()
    # no optim.momentum, optim.betas, optim.weight_decay, optim.lr (sgd 0.1, adam 0.001: the optimizer's),
    # model.activation, model.hidden_sizes: they differ only because the choices do
    assert header == ["run", "model", "optim", "status", "best_val_acc", "epochs", "train_time_s"]
    assert [line.split()[0] for line in lines[3:]] == ["0_digits_lenet_sgd", "1_digits_lenet_adam",
                                                       "2_digits_mlp_sgd", "3_digits_mlp_adam"]
    assert max(map(len, lines)) < 160

    wide = compare_runs.compare([root], wide=True).splitlines()  # --wide: what differs at all, whole paths
    header = wide[0].split()
    assert {"data", "sched", "aug", "optim.lr", "optim.weight_decay", "model.activation", "params",
            "final_val_acc"} <= set(header)
    assert "optim.betas" not in header  # only the adam runs have it: no difference by itself
    assert wide[2].startswith(f"{SWEEP}/0_digits_lenet_sgd ")


def test_wide_on_the_command_line(tmp_path, capsys):
    root = sweep(tmp_path / "outputs")
    assert compare_runs.main([str(root), "--wide", "--sort", "params", "--desc"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "optim.weight_decay" in lines[0].split() and lines[2].startswith(f"{SWEEP}/3_digits_mlp_adam ")


def test_a_key_that_differs_within_one_choice_stays(tmp_path):
    root = sweep(tmp_path / "outputs", lrs=(1e-3, 1e-2))  # model=lenet,mlp optim=sgd,adam optim.lr=1e-3,1e-2
    lines = compare_runs.compare([root], "best_val_acc", True).splitlines()
    header = lines[1].split()
    assert header == ["run", "model", "optim", "optim.lr", "status", "best_val_acc", "epochs", "train_time_s"]
    assert max(map(len, lines)) < 160
    rows = [dict(zip(header, line.split())) for line in lines[3:]]
    assert [r["optim.lr"] for r in rows if r["model"] == "mlp" and r["optim"] == "adam"] == ["0.01", "0.001"]


def test_one_choice_a_one_model_table_says_what_it_is(tmp_path):
    root = tmp_path / "outputs"
    for n, lr in enumerate([1e-3, 3e-3]):
        make_run(root, f"{SWEEP}/{n}_digits_lenet_adam", {}, {"status": "completed", "best_val_acc": 0.9},
                 **{"optim.lr": lr})
    header = compare_runs.compare([root]).splitlines()[1].split()
    assert header[:3] == ["run", "model", "optim.lr"]
    lone = compare_runs.compare([root / SWEEP / "0_digits_lenet_adam"]).splitlines()  # a run dir itself
    assert lone[2].startswith("0_digits_lenet_adam  lenet ")


def test_missing_values_are_shown_one_way(outputs):
    make_run(outputs, "2026-01-04/09-00-00_digits_lenet_adam", {"model.activation": "null"},
             {"status": "completed", "best_val_acc": 0.9, "train_time_s": 3.0}, **{"model.activation": None})
    columns = ["run", "model.activation", "model.k", "best_val_acc", "test_acc", "reason", "overrides",
               "experiment", "train_time_s"]
    lines = compare_runs.compare([outputs], "run", False, columns).splitlines()
    widths = [len(cell) for cell in lines[1].split()]
    cells = []
    for line in lines[2:]:  # fixed-width cells: a missing value may sit between others
        start, row = 0, []
        for w in widths:
            row.append(line[start:start + w].strip())
            start += w + 2
        cells.append(dict(zip(columns, row)))
    running = next(r for r in cells if r["run"] == "2026-01-03/08-00-00_digits_lenet_adam")
    # a key the run lacks (model.k, reason, test_acc), null (model.activation), none yet (train_time_s of a
    # run without metrics), no overrides typed, a choice set to null (experiment)
    assert running["model.k"] == running["reason"] == running["test_acc"] == running["experiment"] == "-"
    lenet = next(r for r in cells if r["run"] == "2026-01-01/10-00-00_digits_lenet_adam")
    assert lenet["overrides"] == "-" and lenet["model.k"] == "-" and lenet["model.activation"] == "-"
    null = next(r for r in cells if r["run"] == "2026-01-04/09-00-00_digits_lenet_adam")
    assert null["model.activation"] == "-" and null["overrides"] == "model.activation=null"
    diverged = next(r for r in cells if r["run"].endswith("0_digits_lenet_sgd"))
    assert diverged["best_val_acc"] == diverged["train_time_s"] == diverged["test_acc"] == "-"
    assert all(cell != "" and cell not in ("None", "null", "nan") for row in cells for cell in row.values())
    text = compare_runs.compare([outputs], "run", False, columns, [], True)  # --csv: empty
    rows = {r["run"]: r for r in csv.DictReader(io.StringIO(text))}
    assert rows["2026-01-01/10-00-00_digits_lenet_adam"]["overrides"] == ""
    assert rows["multirun/2026-01-02_09-00-00/0_digits_lenet_sgd"]["best_val_acc"] == ""
    assert rows["2026-01-03/08-00-00_digits_lenet_adam"]["experiment"] == ""
    assert rows["2026-01-04/09-00-00_digits_lenet_adam"]["model.activation"] == ""
