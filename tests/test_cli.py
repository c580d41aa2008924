"""The command line end to end: `python -m cvtrain ...` in a subprocess, with tiny synthetic runs."""
import json
import math
import re

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

# 256 synthetic 3x8x8 images: 230 train (3 batches of 64) / 26 val
TINY = ["data=synthetic", "data.num_samples=256", "data.image_size=8"]
MLP_RUN = [*TINY, "model=mlp", "trainer.epochs=2", "trainer.monitor_every=2"]
# for exact resume: a constant lr (see test_resume_is_exact), dropout and flips draw random numbers
EXACT = [*TINY, "model=mlp", "model.dropout=0.3", "aug=flip", "sched=constant", "data.batch_size=32"]


def read_metrics(run_dir) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read_summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def load_events(run_dir) -> EventAccumulator:
    (events,) = run_dir.glob("events.out.tfevents.*")  # directly in the run dir: the run's name in TensorBoard
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def values(events, tag) -> dict:
    return {e.step: e.value for e in events.Scalars(tag)}


def last_checkpoint(run) -> str:
    return str(run.run_dir / "checkpoints" / "last.pt")


def run_dir_ok(run):
    """The run dir of a run that must have succeeded."""
    assert run.proc.returncode == 0, run.output
    return run.run_dir


def user_error(run) -> str:
    """The output of a run that must have stopped on a UserError: status 2, a message, no traceback."""
    assert run.proc.returncode == 2, run.output
    assert "Traceback" not in run.output
    return run.output


# Every training-sized run of this module: fixture name -> its arguments, or (the run it
# continues, a function of that finished run -> its arguments). A run continued from must
# come earlier in the dict (the pool starts runs in this order).
RUNS = {
    "mlp_run": MLP_RUN,
    "half_run": [*EXACT, "trainer.epochs=2"],
    "learn_run": ["data=synthetic", "data.num_samples=512", "data.image_size=8", "data.batch_size=16",
                  "model=linear", "optim.lr=0.01", "trainer.epochs=3", "trainer.test=true"],
    "cuda_run": [*TINY, "trainer.device=cuda"],
    "mnist_run": ["data=mnist", "data.root=.", "data.download=false"],  # the fresh cwd: no dataset there
    "zero_epochs_run": [*TINY, "model=linear", "trainer.epochs=0"],
    "sweep_run": ["-m", *TINY, "trainer.epochs=1", "model=linear,mlp", "optim=sgd,adam"],
    "full_run": [*EXACT, "trainer.epochs=4"],
    "resumed_run": ("mlp_run", lambda mlp: [*MLP_RUN, "trainer.epochs=4", "trainer.log_every=1",
                                            f"trainer.resume={last_checkpoint(mlp)}"]),
    "resume_too_short_run": ("mlp_run", lambda mlp: [*MLP_RUN, f"trainer.resume={last_checkpoint(mlp)}"]),
    "resume_other_model_run": ("mlp_run", lambda mlp: [*TINY, "model=linear", "trainer.epochs=4",
                                                       f"trainer.resume={last_checkpoint(mlp)}"]),
    "resume_other_optim_run": ("mlp_run", lambda mlp: [*MLP_RUN, "optim=sgd", "trainer.epochs=4",
                                                       f"trainer.resume={last_checkpoint(mlp)}"]),
    "resume_new_lr_run": ("mlp_run", lambda mlp: [*MLP_RUN, "trainer.epochs=3", "optim.lr=0.01", "trainer.log_every=1",
                                                  f"trainer.resume={last_checkpoint(mlp)}"]),
    "resume_other_size_run": ("mlp_run", lambda mlp: [*MLP_RUN, "data.image_size=12", "trainer.epochs=4",
                                                      f"trainer.resume={last_checkpoint(mlp)}"]),
    "exact_resumed_run": ("half_run", lambda half: [*EXACT, "trainer.epochs=4",
                                                    f"trainer.resume={last_checkpoint(half)}"]),
}


@pytest.fixture(scope="module")
def started_runs(request, tmp_path_factory, start_cli) -> dict:
    """Futures of the RUNS that this module's selected tests use: all started at once, two at a time."""
    wanted = {name for item in request.session.items if item.module is request.module
              for name in item.fixturenames if name in RUNS}
    wanted |= {RUNS[name][0] for name in wanted if isinstance(RUNS[name], tuple)}
    futures = {}
    for name, spec in RUNS.items():
        if name in wanted:
            after, args = spec if isinstance(spec, tuple) else (None, spec)
            futures[name] = start_cli(args, tmp_path_factory.mktemp(name), after=futures.get(after))
    return futures


def finished(name):
    """A module fixture: the finished CliRun RUNS[name]."""
    @pytest.fixture(scope="module", name=name)
    def fixture(started_runs):
        return started_runs[name].result()
    return fixture


mlp_run = finished("mlp_run")
learn_run = finished("learn_run")
cuda_run = finished("cuda_run")
mnist_run = finished("mnist_run")
zero_epochs_run = finished("zero_epochs_run")
sweep_run = finished("sweep_run")
full_run = finished("full_run")
resumed_run = finished("resumed_run")
resume_too_short_run = finished("resume_too_short_run")
resume_other_model_run = finished("resume_other_model_run")
resume_new_lr_run = finished("resume_new_lr_run")
resume_other_size_run = finished("resume_other_size_run")
resume_other_optim_run = finished("resume_other_optim_run")
exact_resumed_run = finished("exact_resumed_run")


# --- one small MLP run, inspected from every side -----------------------------------------------

@pytest.fixture(scope="module")
def mlp_dir(mlp_run):
    return run_dir_ok(mlp_run)


def test_run_dir_layout(mlp_dir):
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", mlp_dir.parent.name)
    assert re.fullmatch(r"\d{2}-\d{2}-\d{2}_synthetic_mlp_adam", mlp_dir.name)
    assert "name: mlp" in (mlp_dir / ".hydra" / "config.yaml").read_text()
    assert (mlp_dir / "cvtrain.log").is_file()
    tb = list(mlp_dir.glob("events.out.tfevents.*"))
    assert len(tb) == 1 and tb[0].is_file() and not (mlp_dir / "tb").exists()
    assert (mlp_dir / "viz" / "confusion_matrix.png").is_file()
    assert {p.name for p in (mlp_dir / "checkpoints").iterdir()} == {"last.pt", "best.pt"}


def test_metrics_jsonl(mlp_dir):
    records = read_metrics(mlp_dir)
    assert [r["epoch"] for r in records] == [1, 2]
    assert [r["step"] for r in records] == [3, 6]
    for r in records:
        for key in ("train_loss", "val_loss"):
            assert math.isfinite(r[key]) and r[key] > 0
        for key in ("train_acc", "val_acc"):
            assert 0 <= r[key] <= 1


def test_summary_json(mlp_dir):
    summary = read_summary(mlp_dir)
    assert summary["epochs"] == 2
    assert summary["best_val_acc"] == max(r["val_acc"] for r in read_metrics(mlp_dir))
    assert summary["train_time_s"] > 0 and summary["train_images_per_s"] > 0
    assert summary["params"] == (3 * 8 * 8 + 1) * 256 + (256 + 1) * 10
    assert "test_acc" not in summary


def test_tensorboard_scalars(mlp_dir):
    events = load_events(mlp_dir)
    tags = set(events.Tags()["scalars"])
    assert values(events, "train/acc").keys() == values(events, "val/loss").keys() == {3, 6}
    assert [r["val_acc"] for r in read_metrics(mlp_dir)] == pytest.approx(list(values(events, "val/acc").values()))

    ratio_tags = {t for t in tags if t.startswith("update_ratio/")} - {"update_ratio/median"}
    assert ratio_tags == {"update_ratio/fc1.weight", "update_ratio/fc2.weight"}  # weight matrices, not biases
    medians = values(events, "update_ratio/median")
    for step, median in medians.items():  # the upper median of the two tensors' ratios
        assert median == pytest.approx(max(values(events, t)[step] for t in ratio_tags))
    assert read_summary(mlp_dir)["update_ratio_log10"] == pytest.approx(sorted(medians.values())[1], abs=1e-3)
    for tag in ratio_tags:
        ratios = values(events, tag)
        assert ratios.keys() == {0, 2, 4}  # trainer.monitor_every=2
        assert all(-8 < r < 0 for r in ratios.values()), ratios  # log10(|dW| / |W|) of an adam step at 1e-3
        grad_norms = values(events, tag.replace("update_ratio/", "grad_norm/"))
        assert grad_norms.keys() == {0, 2, 4}
        assert all(math.isfinite(g) and g > 0 for g in grad_norms.values())

    (best,) = events.Scalars("summary/best_val_acc")
    assert best.value == pytest.approx(read_summary(mlp_dir)["best_val_acc"])


def test_tensorboard_per_step_series(mlp_dir):
    events = load_events(mlp_dir)
    steps = set(range(read_metrics(mlp_dir)[-1]["step"]))
    assert values(events, "train/loss").keys() == steps
    lr = values(events, "opt/lr")
    assert lr.keys() == steps
    for step, value in lr.items():  # the lr each step used: cosine from 1e-3 over the 6 steps
        assert value == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * step / len(steps)))), step


def test_tensorboard_hparams(mlp_dir):
    content = load_events(mlp_dir).PluginTagToContent("hparams")
    # the run is a session; the experiment (the columns) is the log dir's, in outputs/reference/
    assert set(content) == {"_hparams_/session_start_info", "_hparams_/session_end_info"}
    (reference,) = (mlp_dir.parents[1] / "reference").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(reference))
    acc.Reload()
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/experiment"]).experiment
    assert "summary/best_val_acc" in {m.name.tag for m in experiment.metric_infos}
    assert {"model", "optim", "optim.lr", "model.hidden_sizes"} <= {h.name for h in experiment.hparam_infos}
    assert not any(h.name.startswith("aug.") for h in experiment.hparam_infos)  # aug=none: unused keys left out
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = session.session_start_info.hparams
    assert hparams["model"].string_value == "mlp"
    assert hparams["optim"].string_value == "adam"
    assert hparams["optim.lr"].number_value == pytest.approx(1e-3)
    assert hparams["trainer.epochs"].number_value == 2


def test_checkpoints_are_plain_and_complete(mlp_dir):
    for name, epoch in (("last.pt", 2), ("best.pt", read_summary(mlp_dir)["best_epoch"])):
        state = torch.load(mlp_dir / "checkpoints" / name, weights_only=True)
        assert {"model", "optimizer", "scheduler", "epoch", "step", "rng", "config", "data"} <= state.keys()
        assert state["epoch"] == epoch and state["step"] == 3 * epoch
        assert type(state["config"]) is dict
        assert state["config"]["model"]["name"] == "mlp" and state["config"]["trainer"]["epochs"] == 2
        data = state["data"]
        assert data["shape"] == [3, 8, 8]
        assert data["classes"] == [f"class{i}" for i in range(10)]
        assert data["mean"].shape == data["std"].shape == (3,)
        assert state["model"]["fc1.weight"].shape == (256, 192)


# --- learning, and the test split --------------------------------------------------------------------

def test_linear_model_learns_synthetic_data_and_reports_test_acc(learn_run):
    summary = read_summary(run_dir_ok(learn_run))
    assert summary["best_val_acc"] > 0.5  # chance: 0.1
    assert 0.5 < summary["test_acc"] <= 1


# --- mistakes the user makes -------------------------------------------------------------------

def test_misspelled_key_fails(tmp_path, run_cli):
    proc = run_cli([*TINY, "trainer.epoch=3"], tmp_path)
    assert proc.returncode != 0
    assert "trainer.epoch" in proc.stdout
    assert not (tmp_path / "outputs").exists()


def test_unknown_option_lists_the_available_ones(tmp_path, run_cli):
    proc = run_cli([*TINY, "model=lenett"], tmp_path)
    assert proc.returncode != 0
    assert "Could not find 'model/lenett'" in proc.stdout
    listed = proc.stdout.split("Available options in 'model':")[1].split("\n\n")[0].split()
    assert {"lenet", "linear", "mlp"} <= set(listed), proc.stdout


def test_unknown_task_is_hydras_error_before_any_directory(tmp_path, run_cli):
    proc = run_cli(["task=nosuchtask"], tmp_path)
    assert proc.returncode != 0
    assert "Could not find 'task/nosuchtask'" in proc.stdout
    listed = proc.stdout.split("Available options in 'task':")[1].split("Config search path")[0].split()
    assert set(listed) == {"train", "summary", "sanity", "gradcheck", "lr_find", "augviz", "evaluate", "predict",
                           "export", "ensemble", "search"}, proc.stdout
    assert not (tmp_path / "outputs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_user_error(cuda_run):
    output = user_error(cuda_run)
    assert "error: trainer.device=cuda" in output and "trainer.device=cpu" in output


def test_missing_torchvision_dataset_offline(mnist_run):
    output = user_error(mnist_run)
    assert "train-images-idx3-ubyte" in output and "data.download" in output


def test_zero_epochs_is_not_a_crash(zero_epochs_run):
    assert zero_epochs_run.proc.returncode in (0, 2), zero_epochs_run.output
    assert "Traceback" not in zero_epochs_run.output


def test_help_lists_groups_and_options(tmp_path, run_cli):
    proc = run_cli(["--help"], tmp_path)
    assert proc.returncode == 0, proc.stdout
    groups = dict(re.findall(r"^(\w+): (\w+(?:, \w+)*)$", proc.stdout, re.MULTILINE))
    assert {"lenet", "linear", "mlp"} <= set(groups["model"].split(", "))
    assert {"adam", "sgd"} <= set(groups["optim"].split(", "))
    assert {"digits", "synthetic", "mnist", "imagefolder"} <= set(groups["data"].split(", "))
    assert {"train", "summary", "lr_find"} <= set(groups["task"].split(", "))


# --- sweeps ---------------------------------------------------------------------------------------

def test_multirun_makes_one_named_run_per_combination(sweep_run):
    assert sweep_run.proc.returncode == 0, sweep_run.output
    outputs = sweep_run.cwd / "outputs"
    (sweep,) = outputs.glob("sweep-*")
    assert re.fullmatch(r"sweep-\d{4}-\d{6}", sweep.name)
    assert (sweep / "multirun.yaml").is_file()
    names = sorted(d.name for d in sweep.iterdir() if d.is_dir())
    assert len(names) == 4
    for model in ("linear", "mlp"):
        for optim in ("sgd", "adam"):
            (name,) = [n for n in names if n.endswith(f"_{model}_{optim}")]
            assert re.fullmatch(rf"[0-3]_{model}_{optim}", name)  # short: <sweep>/<n>_<model>_<optim>
            assert read_summary(sweep / name)["epochs"] == 1
    assert not list(outputs.glob("2*"))  # nothing outside the sweep dir but the log dir's HPARAMS experiment
    assert {p.name for p in outputs.iterdir()} == {sweep.name, "reference"}
    # the sweep's results table (cvtrain/sweeps.py), written and printed at its end: one row per trial
    rows = (sweep / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and "best_val_acc" in rows[0]
    assert "sweep: 4 trial(s), best validation accuracy first" in sweep_run.output


# --- resume ---------------------------------------------------------------------------------------

def test_resume_trains_the_remaining_epochs(resumed_run):
    run = run_dir_ok(resumed_run)
    assert [r["epoch"] for r in read_metrics(run)] == [3, 4]
    assert [r["step"] for r in read_metrics(run)] == [9, 12]
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 4 and last["step"] == 12


def test_resume_follows_the_stretched_schedule(resumed_run):
    lr = values(load_events(run_dir_ok(resumed_run)), "opt/lr")
    assert sorted(lr) == list(range(6, 12))
    for step, value in lr.items():  # cosine over 4 epochs x 3 steps, from 1e-3
        assert value == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * step / 12))), step


def test_resume_needs_more_epochs_than_the_checkpoint(resume_too_short_run):
    output = user_error(resume_too_short_run)
    assert "already holds 2 epochs" in output and "trainer.epochs" in output


def test_resume_with_another_model_is_refused(resume_other_model_run):
    assert "same model" in user_error(resume_other_model_run)


def test_resume_with_another_optimizer_is_refused(resume_other_optim_run):
    assert "same optim" in user_error(resume_other_optim_run)


def test_resume_is_exact(full_run, exact_resumed_run):
    """4 epochs in one go == 2 epochs + resume to 4: same weights, same val loss.

    With a constant lr: cosine/warmup schedules are stretched to the new trainer.epochs on
    resume (by design), so there a 2-epoch run's first epochs differ from a 4-epoch run's.
    Dropout and flips check that the RNG and the loader's per-epoch order are restored.
    """
    full, resumed = run_dir_ok(full_run), run_dir_ok(exact_resumed_run)
    assert [r["epoch"] for r in read_metrics(resumed)] == [3, 4]
    assert read_metrics(resumed)[-1]["val_loss"] == pytest.approx(read_metrics(full)[-1]["val_loss"], abs=1e-5)
    weights = [torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"] for run in (full, resumed)]
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name])


def test_resume_takes_this_runs_optimizer_settings(resume_new_lr_run):
    lr = values(load_events(run_dir_ok(resume_new_lr_run)), "opt/lr")
    assert sorted(lr) == [6, 7, 8]
    for step, value in lr.items():  # cosine over 3 epochs x 3 steps from the new optim.lr=0.01
        assert value == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * step / 9))), step


def test_resume_on_other_image_size_is_refused(resume_other_size_run):
    assert "do not fit" in user_error(resume_other_size_run)


def test_resumed_run_dir_holds_the_best_checkpoint(resumed_run):
    assert (run_dir_ok(resumed_run) / "checkpoints" / "best.pt").is_file()


def test_test_split_missing_is_an_error_before_training(run_cli, tmp_path):
    train = tmp_path / "images" / "train"
    for label in ("a", "b"):
        (train / label).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(train / label / f"{i}.png")
    result = run_cli(["data=imagefolder", f"data.root={tmp_path / 'images'}", f"data.cache_dir={tmp_path / 'cache'}",
                      "data.val_fraction=0.5", "model=linear", "trainer.test=true"], tmp_path)
    assert result.returncode == 2, result.stdout
    assert "has no test split; set trainer.test=false" in result.stdout
    assert "epoch 1/" not in result.stdout and not list(tmp_path.rglob("last.pt"))
