"""The HPARAMS rows and the log dir's experiment (src/cvtrain/hparams.py), in process."""
import json

import pytest
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from cvtrain.hparams import differing, hparams_of, write_experiment


def row(compose_config, *overrides, choices=None):
    cfg = compose_config(list(overrides))
    return hparams_of(OmegaConf.to_container(cfg, resolve=True), choices or {})


def test_a_row_leaves_out_what_the_run_does_not_use(compose_config):
    plain = row(compose_config, choices={"model": "lenet", "optim": "adam", "aug": "none"})
    assert plain["model"] == "lenet" and plain["optim.lr"] == pytest.approx(1e-3)
    assert not any(k.startswith(("aug.", "reg.")) for k in plain)  # aug=none, reg=none: nothing used
    assert "model.activation" not in plain  # null: LeNet's own default
    assert "model.name" not in plain and "optim.name" not in plain  # the choices say it
    assert "data.num_samples" not in plain  # synthetic-data keys, for real data
    assert "trainer.progress" not in plain and "task.name" not in plain  # settings, not hyperparameters
    flipped = row(compose_config, "aug=cifar", choices={"aug": "cifar"})
    assert flipped["aug.crop_padding"] == 4 and flipped["aug.hflip"] == "True"  # bools as text
    assert "aug.vflip" not in flipped


def test_a_key_differs_only_within_the_same_choice():
    rows = [{"model": "lenet", "optim": "sgd", "optim.lr": 0.1, "optim.momentum": 0.0},
            {"model": "lenet", "optim": "adam", "optim.lr": 0.001, "optim.betas": "[0.9, 0.999]"},
            {"model": "mlp", "optim": "sgd", "optim.lr": 0.1, "model.hidden_sizes": "[100]"},
            {"model": "mlp", "optim": "adam", "optim.lr": 0.001}]
    # lr follows the optimizer here: implied by the choice; betas and hidden_sizes only some runs have
    assert differing(rows) == {"model", "optim"}
    rows.append({"model": "mlp", "optim": "adam", "optim.lr": 0.003})
    assert differing(rows) == {"model", "optim", "optim.lr"}  # two Adam runs with different lr
    assert differing(rows[:1]) == set()


def experiment_of(root):
    (events,) = (root / "reference").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/experiment"]
    return plugin_data_pb2.HParamsPluginData.FromString(content).experiment, acc


def fake_run(root, name, config, choices, steps):
    import yaml

    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "step": steps, "val_acc": 0.5}) + "\n")


def test_the_experiment_covers_every_run_and_is_rewritten_when_runs_are_added(tmp_path):
    base = {"task": {"name": "train"}, "data": {"name": "digits", "batch_size": 64},
            "optim": {"name": "adam", "lr": 0.001}, "model": {"name": "lenet"}}
    fake_run(tmp_path, "a/0_lenet_adam", base, {"model": "lenet", "optim": "adam"}, 56)
    mlp = {**base, "model": {"name": "mlp", "hidden_sizes": [100]}}
    fake_run(tmp_path, "a/1_mlp_adam", mlp, {"model": "mlp", "optim": "adam"}, 56)
    summary = {**base, "task": {"name": "summary"}}
    fake_run(tmp_path, "2026-01-01/summary_digits_lenet", summary, {"model": "lenet", "optim": "adam"}, 0)
    write_experiment(tmp_path)
    experiment, acc = experiment_of(tmp_path)
    infos = {h.name: h.differs for h in experiment.hparam_infos}
    assert infos["model"] and not infos["optim"] and not infos["optim.lr"]
    assert "model.hidden_sizes" in infos  # only one run has it: still a column
    assert {m.name.tag for m in experiment.metric_infos} >= {"summary/best_val_acc", "summary/train_time_s"}
    reference = acc.Scalars("update_ratio/reference_1e-3")
    assert {e.value for e in reference} == {-3.0} and reference[-1].step == 56 and len(reference) > 50

    fake_run(tmp_path, "b/0_lenet_adam", {**base, "optim": {"name": "adam", "lr": 0.01}},
             {"model": "lenet", "optim": "adam"}, 112)
    write_experiment(tmp_path)
    experiment, acc = experiment_of(tmp_path)  # one experiment, rewritten: the new sweep is in it
    assert {h.name: h.differs for h in experiment.hparam_infos}["optim.lr"]
    assert acc.Scalars("update_ratio/reference_1e-3")[-1].step == 112
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2026-01-01", "a", "b", "reference"]  # no leftovers


def test_a_reference_folder_cvtrain_did_not_write_is_left_alone(tmp_path):
    mine = tmp_path / "reference"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's own")
    with pytest.raises(ValueError, match="not written by cvtrain"):
        write_experiment(tmp_path)
    assert (mine / "notes.txt").read_text() == "the user's own" and len(list(tmp_path.iterdir())) == 1
    # a folder of an earlier cvtrain (event files only, no marker) is replaced, and then carries the marker
    (tmp_path / "logs").mkdir()
    old = tmp_path / "logs" / "reference"
    old.mkdir()
    (old / "events.out.tfevents.1.host.1.0").write_bytes(b"")
    write_experiment(tmp_path / "logs")
    assert (old / ".cvtrain-experiment").is_file() and len(list(old.glob("events.out.tfevents.*"))) == 1


def test_a_run_dir_moved_out_of_outputs_writes_no_experiment_above_the_working_dir(tmp_path, run_cli):
    """hydra.run.dir=<elsewhere> beside the default sweep dir (outputs/sweep-...): the two meet only above the
    working directory, which is no folder of runs: no experiment is searched for or written there."""
    project = tmp_path / "project"
    project.mkdir()
    proc = run_cli(["data=synthetic", "data.num_samples=64", "data.image_size=8", "model=linear", "trainer.epochs=1",
                    "trainer.viz=false", f"hydra.run.dir={tmp_path / 'elsewhere' / 'run'}"], project)
    assert proc.returncode == 0, proc.stdout
    assert (tmp_path / "elsewhere" / "run" / "metrics.jsonl").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "project"]  # no tmp_path/reference
    assert "HPARAMS" not in proc.stdout
