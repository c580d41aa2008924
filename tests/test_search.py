"""Hyperparameter search (task=search, src/cvtrain/tasks/search.py), a sweep's results table
(src/cvtrain/sweeps.py) and kNN's model.k=auto / model.distance=auto (src/cvtrain/tasks/knn.py).

The searches run on 256 tiny synthetic images (3x8x8, 230 train / 26 val) with a linear model, a few
epochs each: a trial takes well under a second, a `python -m cvtrain` about 5 s to start."""
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hydra.errors import ConfigCompositionException

optuna = pytest.importorskip("optuna")

from cvtrain import UserError  # noqa: E402
from cvtrain.tasks import knn as knn_task, search  # noqa: E402
from cvtrain.sweeps import report_sweep, write_sweep_results  # noqa: E402
from cvtrain.validate import check_config  # noqa: E402

TINY = ["data=synthetic", "data.num_samples=256", "data.image_size=8", "model=linear", "trainer.viz=false",
        "trainer.checkpoint=false"]
# a deliberately bad range: below ~1e-4 a linear model learns nothing in 2 epochs (3 steps each); seed 0
# draws trial 2 there, after two good trials completed: the median pruner stops it after its first epoch
SEARCH = ["task=search", *TINY, "trainer.epochs=2", "search=none", "+search.space.optim.lr=[1e-7,1e-1,log]",
          "+search.space.reg.l2=[1e-6,1e-1,log]", "search.n_trials=4"]


def read_results(search_dir) -> list:
    with open(Path(search_dir) / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def cli(args, cwd, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "cvtrain", *map(str, args)], cwd=cwd, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)


def start(args, cwd, log_file) -> subprocess.Popen:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "cvtrain", *map(str, args)], cwd=cwd, env=env,
                            stdout=open(log_file, "w"), stderr=subprocess.STDOUT)


def study_trials(search_dir, name="search") -> list:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(search_dir / "study.log")))
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


# --- the space -------------------------------------------------------------------------------------

def test_space_formats(compose_config):
    cfg = compose_config(["task=search", "model=mlp"])
    params = search.parse_space({"optim": {"lr": [1e-4, 1e-1, "log"]}, "model.dropout": [0, 0.5],
                                 "data": {"batch_size": {"low": 16, "high": 256, "log": True}},
                                 "model.activation": {"choices": ["relu", "tanh"]},
                                 "trainer.seed": {"low": 0, "high": 10, "type": "float"}}, cfg)
    by = {p.key: p for p in params}
    assert by["optim.lr"].log and by["optim.lr"].low == 1e-4 and not by["optim.lr"].integer
    assert not by["model.dropout"].log and by["model.dropout"].low == 0.0 and not by["model.dropout"].integer
    assert by["data.batch_size"].integer and by["data.batch_size"].log  # integer ends, an integer key
    assert by["model.activation"].choices == ["relu", "tanh"]
    assert not by["trainer.seed"].integer  # type: float says so
    assert by["optim.lr"].grid(3) == pytest.approx([1e-4, 10 ** -2.5, 1e-1])


@pytest.mark.parametrize("space,message", [
    ({}, "search.space is empty"),
    ({"optim.lr": [1e-1, 1e-4, "log"]}, "low must be below high"),
    ({"optim.lr": [0, 1e-1, "log"]}, "a log range needs low > 0"),
    ({"optim.lr": [1e-4, 1e-1, "loglog"]}, "a range is \\[low, high\\] or \\[low, high, log\\]"),
    ({"optim.lr": {"low": 1e-4, "high": 1e-1, "scale": "log"}}, "unknown key\\(s\\) scale"),
    ({"optim.lr": {"choices": []}}, "a non-empty list"),
    ({"optim.lr": ["a", "b"]}, "low and high must be finite numbers"),
])
def test_malformed_spaces_are_user_errors(space, message):
    with pytest.raises(UserError, match=message):
        search.parse_space(space)


def test_space_keys_and_ends_are_checked_against_the_config(compose_config):
    cfg = compose_config(["task=search", "model=mlp"])
    with pytest.raises(UserError, match="optim.lrr is not a key of this config; optim has name, lr"):
        search.check_space(cfg, search.parse_space({"optim.lrr": [1e-4, 1e-1, "log"]}, cfg))
    with pytest.raises(UserError, match="the high end of the ranges is not a valid config: model.dropout=1.5"):
        search.check_space(cfg, search.parse_space({"model.dropout": [0.0, 1.5]}, cfg))
    with pytest.raises(UserError, match="a space sets keys of"):
        search.check_space(cfg, search.parse_space({"search.n_trials": [1, 5]}, cfg))
    search.check_space(cfg, search.parse_space({"optim.lr": [1e-4, 1e-1, "log"], "model.dropout": [0, 0.6]}, cfg))


def test_bad_settings_are_user_errors(compose_config):
    for override, message in [("search.sampler=sobol", "choose random, tpe, grid"),
                              ("search.n_trials=0", "an integer >= 1"),
                              ("search.stages=[{trials:2}]", "trials and epochs must be integers"),
                              ("search.top_fraction=0", "a fraction in \\(0, 1\\]")]:
        with pytest.raises(UserError, match=message):
            search.settings(compose_config(["task=search", override]))
    with pytest.raises(ConfigCompositionException):  # a typed schema (SearchConfig): Hydra's own error
        compose_config(["task=search", "search.n_trial=3"])
    with pytest.raises(UserError, match="read by task=search only, not by task=train"):
        check_config(compose_config(["search=lr"]))


def test_random_draws_are_log_uniform_and_fixed_per_trial_number():
    """The course's random search: a log range is sampled uniformly in log10, each decade equally often;
    a trial's values depend on its number only (which worker runs it does not matter)."""
    stage = search.Stage(1, 400, 1, "search", "")
    params = search.parse_space({"optim.lr": [1e-5, 1e-1, "log"], "model.dropout": [0.0, 0.5]})

    def draws():
        study = optuna.create_study(study_name="search", sampler=search.make_sampler("random", 0, stage, params, 3),
                                    direction="maximize")
        out = []
        for _ in range(400):
            trial = study.ask()
            out.append({p.key: p.suggest(trial) for p in params})
            study.tell(trial, 0.5)
        return out

    first, second = draws(), draws()
    assert first == second
    lrs = [d["optim.lr"] for d in first]
    assert all(1e-5 <= lr <= 1e-1 for lr in lrs)
    per_decade = [sum(10 ** (-5 + i) <= lr < 10 ** (-4 + i) for lr in lrs) for i in range(4)]
    assert all(60 <= n <= 140 for n in per_decade), per_decade  # 100 each expected
    drops = [d["model.dropout"] for d in first]
    assert all(0 <= x <= 0.5 for x in drops) and 150 <= sum(x < 0.25 for x in drops) <= 250  # uniform


def _trial(lr, dropout, value):
    return optuna.trial.create_trial(
        params={"optim.lr": lr, "model.dropout": dropout}, value=value,
        distributions={"optim.lr": optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True),
                       "model.dropout": optuna.distributions.FloatDistribution(0.0, 0.8)})


def test_narrow_spans_the_best_trials_widened_within_the_range():
    params = search.parse_space({"optim.lr": [1e-5, 1e-1, "log"], "model.dropout": [0.0, 0.8]})
    trials = [_trial(lr, d, v) for lr, d, v in (
        [(1e-3, 0.2, 0.9), (3e-3, 0.4, 0.85), (1e-5, 0.7, 0.1), (1e-1, 0.0, 0.2), (2e-4, 0.5, 0.5),
         (5e-2, 0.1, 0.3), (1e-4, 0.3, 0.4), (7e-5, 0.6, 0.35)])]
    lr, dropout = search.narrow(params, trials, top_fraction=0.25, margin=0.1)
    # the best 2 of 8: lr 1e-3..3e-3, dropout 0.2..0.4; widened by 10% of the range: 0.4 decades, 0.08
    assert lr.log and lr.low == pytest.approx(10 ** -3.4, rel=1e-3) and lr.high == pytest.approx(3e-3 * 10 ** 0.4, rel=1e-3)
    assert dropout.low == pytest.approx(0.12) and dropout.high == pytest.approx(0.48)
    # at the range's edge: it stays inside the range
    (edge,) = search.narrow(search.parse_space({"optim.lr": [1e-5, 1e-1, "log"]}), [_trial(9e-2, 0.1, 1.0)], 0.25, 0.1)
    assert edge.high == 1e-1 and edge.low == pytest.approx(9e-2 / 10 ** 0.4, rel=1e-3)


def test_edge_warning_names_the_parameter_at_the_edge():
    params = search.parse_space({"optim.lr": [1e-5, 1e-1, "log"], "model.dropout": [0.0, 0.8]})
    lines = search.edge_warnings(params, _trial(8e-2, 0.4, 0.9), 0.1)
    assert len(lines) == 1 and "optim.lr=0.08 lies at the upper edge" in lines[0] and "widen" in lines[0]
    assert search.edge_warnings(params, _trial(1e-3, 0.4, 0.9), 0.1) == []


def test_missing_optuna_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    with pytest.raises(UserError, match=r'pip install -e "\.\[search\]"'):
        search._require_optuna()


# --- searches --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def search_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("search")
    proc = cli([*SEARCH, f"hydra.run.dir={cwd / 'run'}"], cwd)
    return proc, cwd / "run"


def test_random_search_samples_inside_the_ranges_on_a_log_scale(search_run):
    proc, run = search_run
    assert proc.returncode == 0, proc.stdout
    rows = read_results(run)
    assert len(rows) == 4 and {r["trial"] for r in rows} == {"0", "1", "2", "3"}
    lrs, l2s = [float(r["optim.lr"]) for r in rows], [float(r["reg.l2"]) for r in rows]
    assert all(1e-7 <= v <= 1e-1 for v in lrs) and all(1e-6 <= v <= 1e-1 for v in l2s)
    assert max(lrs) / min(lrs) > 1e3 and max(l2s) / min(l2s) > 1e2  # spread over decades: a log scale
    accs = [float(r["val_acc"]) for r in rows if r["val_acc"]]
    assert accs == sorted(accs, reverse=True) and all(math.isfinite(a) for a in accs)  # best first, no NaN


def test_each_trial_is_a_run_dir_named_by_trial(search_run):
    _, run = search_run
    for row in read_results(run):
        trial_dir = run / row["run_dir"]
        assert trial_dir.name.startswith(f"{int(row['trial']):03d}_lr=")
        summary = json.loads((trial_dir / "summary.json").read_text())
        assert summary["status"] == row["status"]
        assert list(trial_dir.glob("events.out.tfevents.*")) and (trial_dir / "metrics.jsonl").is_file()
        config = yaml.safe_load((trial_dir / ".hydra" / "config.yaml").read_text())
        assert config["task"]["name"] == "train" and config["optim"]["lr"] == pytest.approx(float(row["optim.lr"]))
        assert config["trainer"]["epochs"] == 2 and config["search"] is None


def test_a_hopeless_trial_is_pruned_after_an_epoch(search_run):
    proc, run = search_run
    pruned = [r for r in read_results(run) if r["status"] == "pruned"]
    assert pruned, proc.stdout
    assert all(r["status"] == "pruned" for r in read_results(run) if float(r["optim.lr"]) < 1e-4)
    for row in pruned:
        assert row["epochs"] == "1"
        summary = json.loads((run / row["run_dir"] / "summary.json").read_text())
        assert summary["status"] == "pruned" and "pruned by the median pruner after epoch 1" in summary["reason"]
    assert {t.state.name for t in study_trials(run)} == {"COMPLETE", "PRUNED"}


def test_search_writes_summary_table_and_plots(search_run):
    proc, run = search_run
    summary = json.loads((run / "search.json").read_text())
    best = max((r for r in read_results(run) if r["status"] == "completed"), key=lambda r: float(r["val_acc"]))
    assert summary["best"]["val_acc"] == pytest.approx(float(best["val_acc"]))
    assert "trial  status" in proc.stdout and "results.csv" in proc.stdout
    for name in ("history.png", "params.png", "importances.png"):
        assert (run / "plots" / name).stat().st_size > 1000


def test_best_yaml_reruns_the_best_trial(search_run, tmp_path):
    _, run = search_run
    best = json.loads((run / "search.json").read_text())["best"]
    proc = cli(["--config-dir", run, "--config-name", "best"], tmp_path)
    assert proc.returncode == 0, proc.stdout
    (rerun,) = [p for p in (tmp_path / "outputs").glob("*/*") if (p / "summary.json").is_file()]
    assert rerun.name.endswith("_synthetic_linear_adam")
    summary = json.loads((rerun / "summary.json").read_text())
    assert summary["best_val_acc"] == pytest.approx(best["val_acc"])  # the same run: same seed, same values
    config = yaml.safe_load((rerun / ".hydra" / "config.yaml").read_text())
    assert config["optim"]["lr"] == pytest.approx(best["params"]["optim.lr"])


def test_a_diverged_trial_is_failed_never_nan(tmp_path):
    """lr 1e2..1e3 with SGD: the loss becomes nan within the first epoch; the trials are FAIL, status diverged."""
    args = ["task=search", "data=synthetic", "data.num_samples=1024", "data.image_size=8", "model=mlp", "optim=sgd",
            "trainer.epochs=2", "trainer.log_every=1", "trainer.viz=false", "trainer.checkpoint=false", "search=none",
            "+search.space.optim.lr=[1e2,1e3,log]", "search.n_trials=2", "search.plots=false",
            f"hydra.run.dir={tmp_path / 'run'}"]
    proc = cli(args, tmp_path)
    assert proc.returncode == 0, proc.stdout
    rows = read_results(tmp_path / "run")
    assert [r["status"] for r in rows] == ["diverged", "diverged"] and all(r["val_acc"] == "" for r in rows)
    assert "nan" not in (tmp_path / "run" / "results.csv").read_text().lower().replace("trials/", "")
    assert {t.state.name for t in study_trials(tmp_path / "run")} == {"FAIL"}
    assert json.loads((tmp_path / "run" / "search.json").read_text())["best"] is None


def test_a_killed_search_resumes_with_the_same_command(tmp_path):
    run = tmp_path / "run"
    args = [*SEARCH, "data.num_samples=1024", "search.plots=false", f"hydra.run.dir={run}"]
    worker = start(args, tmp_path, tmp_path / "first.log")
    try:
        deadline = time.time() + 240
        while time.time() < deadline and worker.poll() is None:  # trial 0 done, trial 1 started: kill
            done = [json.loads(p.read_text()).get("status") for p in run.glob("trials/000_*/summary.json")]
            if done == ["completed"] and list(run.glob("trials/001_*/.hydra")):
                break
            time.sleep(0.05)
        assert worker.poll() is None, (tmp_path / "first.log").read_text()
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    finally:
        if worker.poll() is None:
            worker.kill()
    proc = cli(args, tmp_path)
    assert proc.returncode == 0, proc.stdout
    assert "trial 1 was left running" in proc.stdout and "marked failed (interrupted)" in proc.stdout
    trials = study_trials(run)
    states = [search._state(t) for t in trials]
    assert states[1] == "interrupted" and len(search.counted(trials)) == 4 and len(trials) == 5
    (redo,) = [t for t in trials if t.user_attrs.get("redo_of") == 1]  # its values, redone first (trial 2)
    assert redo.number == 2 and redo.params == trials[1].params and search._state(redo) != "interrupted"
    assert json.loads(next(run.glob("trials/001_*/summary.json")).read_text())["status"] == "interrupted"
    assert len(read_results(run)) == 5


def test_two_workers_share_one_study(tmp_path):
    run = tmp_path / "run"
    args = [*SEARCH, "search.n_trials=6", "data.num_samples=512", "search.plots=false", f"hydra.run.dir={run}"]
    workers = [start(args, tmp_path, tmp_path / f"worker{i}.log") for i in range(2)]
    for worker in workers:
        assert worker.wait(timeout=300) == 0
    trials = study_trials(run)
    assert sorted(t.number for t in trials) == list(range(6))  # n_trials in all, each number once
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert {t.user_attrs["pid"] for t in trials} <= {w.pid for w in workers}
    assert sorted(p.name[:3] for p in (run / "trials").iterdir()) == [f"{i:03d}" for i in range(6)]
    assert len(read_results(run)) == 6


def test_coarse_to_fine_narrows_the_ranges(tmp_path):
    run = tmp_path / "run"
    args = ["task=search", *TINY, "search=none", "+search.space.optim.lr=[1e-6,1e-1,log]",
            "search.stages=[{trials:4,epochs:1},{trials:2,epochs:2}]", "search.top_fraction=0.5",
            "search.pruner=none", "search.plots=false", f"hydra.run.dir={run}"]
    proc = cli(args, tmp_path)
    assert proc.returncode == 0, proc.stdout
    summary = json.loads((run / "search.json").read_text())
    coarse, fine = summary["stages"]
    assert (coarse["epochs"], fine["epochs"], coarse["completed"], fine["completed"]) == (1, 2, 4, 2)
    top = sorted((r for r in read_results(run) if r["stage"] == "1"), key=lambda r: -float(r["val_acc"]))[:2]
    low, high = fine["space"]["optim.lr"]["low"], fine["space"]["optim.lr"]["high"]
    assert 1e-6 <= low < high <= 1e-1 and (low, high) != (1e-6, 1e-1)
    assert all(low <= float(r["optim.lr"]) <= high for r in top)
    assert "stage 2's ranges, narrowed around the best 50% of stage 1's trials: optim.lr" in proc.stdout
    assert sorted(p.name[:6] for p in (run / "trials").iterdir()) == ["s1-000", "s1-001", "s1-002", "s1-003",
                                                                      "s2-000", "s2-001"]
    best = yaml.safe_load((run / "best.yaml").read_text())
    assert best["trainer"]["epochs"] == 2 and summary["best"]["trial"].startswith("s2-")


def test_a_bad_space_fails_before_any_trial(run_cli, tmp_path):
    proc = run_cli(["task=search", *TINY, "+search.space.optim.lrr=[1e-4,1e-1,log]"], tmp_path)
    assert proc.returncode == 2, proc.stdout
    assert "error: search.space.optim.lrr: optim.lrr is not a key of this config" in proc.stdout
    assert "Traceback" not in proc.stdout and not list(tmp_path.glob("outputs/*/*/trials"))


@pytest.mark.parametrize("sampler", ["grid", "tpe"])
def test_search_task_returns_the_best_val_acc(sampler, compose_config, tmp_path):
    """In-process, as Hydra calls it: the objective is the best completed trial's val acc. sampler=grid: the
    grid's 3 values of the log range, n_trials capped at the grid's size."""
    cfg = compose_config(["task=search", *TINY, "trainer.epochs=1", f"search.sampler={sampler}", "search=none",
                          "+search.space.optim.lr=[1e-3,1e-1,log]", "search.n_trials=3", "search.plots=false"])
    check_config(cfg)
    best = search.run(cfg, tmp_path)
    rows = read_results(tmp_path)
    assert best == pytest.approx(max(float(r["val_acc"]) for r in rows if r["status"] == "completed"))
    if sampler == "grid":
        assert sorted(float(r["optim.lr"]) for r in rows) == pytest.approx([1e-3, 1e-2, 1e-1])
    assert (tmp_path / "best.yaml").is_file()


# --- a sweep's results table -----------------------------------------------------------------------

def test_grid_sweep_writes_four_run_dirs_and_a_results_table(tmp_path):
    sweep = tmp_path / "sweep"
    argv = ["-m", *TINY, "trainer.epochs=1", "model=linear,mlp", "optim=sgd,adam", f"hydra.sweep.dir={sweep}"]
    proc = cli(argv, tmp_path)
    assert proc.returncode == 0, proc.stdout
    assert len([p for p in sweep.iterdir() if (p / "summary.json").is_file()]) == 4
    path, table = write_sweep_results(sweep)
    rows = list(csv.DictReader(open(path, newline="")))
    assert len(rows) == 4 and list(rows[0])[:3] == ["run", "model", "optim"]
    accs = [float(r["best_val_acc"]) for r in rows]
    assert accs == sorted(accs, reverse=True)
    assert {(r["model"], r["optim"]) for r in rows} == {(m, o) for m in ("linear", "mlp") for o in ("sgd", "adam")}
    assert table.splitlines()[0].split()[:4] == ["run", "model", "optim", "status"]
    assert report_sweep(argv) == path  # main()'s hook: the sweep dir from the command line
    assert report_sweep([a for a in argv if a != "-m"]) is None  # not a sweep


# --- kNN: k and the distance chosen on val ---------------------------------------------------------

def test_knn_auto_picks_the_k_and_distance_with_the_best_val_accuracy(compose_config, tmp_path):
    from cvtrain.data import load_data
    from cvtrain.models.knn import KNNClassifier

    overrides = ["model=knn", "model.k=auto", "model.distance=auto", "data=synthetic", "data.num_samples=300",
                 "data.image_size=8", "data.noise=1.5", "trainer.test=true", "trainer.checkpoint=false"]
    cfg = compose_config(overrides)
    check_config(cfg)  # validation accepts auto
    acc = knn_task.run(cfg, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    # by hand: every k and distance on val, the best (ties: smaller k, then l2), then the test split
    data = load_data(cfg.data, torch.device("cpu"), need_test=True)
    train_x, train_y = knn_task.preprocessed(data.train, data.preprocess, "cpu")
    val_x, val_y = knn_task.preprocessed(data.val, data.preprocess, "cpu")
    test_x, test_y = knn_task.preprocessed(data.test, data.preprocess, "cpu")
    found = []
    for i, distance in enumerate(("l2", "l1")):
        for k in knn_task.K_GRID:
            if k <= len(train_y):
                pred = KNNClassifier(k, distance).fit(train_x, train_y, data.num_classes).predict(val_x)
                found.append(((pred == val_y).float().mean().item(), -k, -i, k, distance))
    best_acc, _, _, k, distance = max(found)
    assert (summary["k"], summary["distance"]) == (k, distance)
    assert acc == summary["best_val_acc"] == pytest.approx(best_acc)
    test = (KNNClassifier(k, distance).fit(train_x, train_y, data.num_classes).predict(test_x) == test_y).float().mean()
    assert summary["test_acc"] == pytest.approx(test.item())
    assert set(summary["val_acc_by_distance_k"]) == {"l1", "l2"} and summary["chosen_on_val"] == ["distance", "k"]
