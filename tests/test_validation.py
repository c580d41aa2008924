"""Bad input gets a clear, one-line error before work starts (README "Bad input").

In process: compose the config as the command line would, then check_config (the whole config, no data)
or the builder that reads the key raises a UserError whose message names the key and the bad value.
End to end: a few commands exit with status 2, print `error:` and no traceback, and leave no run files.
"""
import logging

import pytest
import torch
from PIL import Image

from cvtrain import UserError
from cvtrain.data import load_data
from cvtrain.device import resolve_device
from cvtrain.losses import build_loss
from cvtrain.models import build_model, list_models
from cvtrain.optim import build_optimizer, build_scheduler
from cvtrain.checks import check_types
from cvtrain.validate import check_config

TINY = ["data=synthetic", "data.num_samples=100", "data.image_size=4", "trainer.device=cpu"]


def fails(compose_config, overrides, *needles):
    """check_config(compose(overrides)) raises a UserError whose message holds every needle."""
    cfg = compose_config(overrides)
    with pytest.raises(UserError) as err:
        check_config(cfg)
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def optimizer_for(cfg):
    return build_optimizer(cfg.optim, torch.nn.Linear(2, 2))


def test_the_default_config_and_every_option_pass(compose_config):
    check_config(compose_config([]))
    for overrides in (["optim=sgd"], ["optim=momentum"], ["optim=nesterov"], ["optim=rmsprop"], ["optim=adagrad"],
                      ["optim=adamw"], ["sched=multistep", "trainer.epochs=10"], ["sched=step"], ["sched=plateau"],
                      ["sched=exponential"], ["sched=inverse_time"], ["sched=constant"], ["loss=hinge"],
                      ["loss=mse"], ["model=knn"], ["model=mlp"], ["model=svm"], ["model=resnet18"],
                      ["data=imagefolder", "data.root=/x"], ["data=mnist", "data.root=/x"], TINY):
        check_config(compose_config(overrides))


# --- learning rate ----------------------------------------------------------------------------------

@pytest.mark.parametrize("lr", ["0", "-1", "nan", "inf"])
def test_learning_rate_must_be_positive_and_finite(compose_config, lr):
    fails(compose_config, [f"optim.lr={lr}"], f"optim.lr={lr}", "positive finite")
    with pytest.raises(UserError, match="optim.lr"):
        optimizer_for(compose_config([f"optim.lr={lr}"]))


# --- ranges -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,needle", [
    (["optim=momentum", "optim.momentum=1.5"], "optim.momentum=1.5"),
    (["optim=rmsprop", "optim.alpha=-0.1"], "optim.alpha=-0.1"),
    (["optim.betas=[0.9,1.0]"], "optim.betas=[0.9,1.0]"),
    (["optim.betas=[0.9]"], "optim.betas=[0.9]"),
    (["optim.weight_decay=-1"], "optim.weight_decay=-1"),
    (["optim=sgd", "optim.nesterov=true"], "optim.nesterov=true"),
    (["model=mlp", "model.dropout=1.0"], "model.dropout=1.0"),
    (["model=alexnet", "model.dropout=-0.5"], "model.dropout=-0.5"),
    (["model=mlp", "model.hidden_sizes=[0]"], "model.hidden_sizes=[0]"),
    (["loss.label_smoothing=1.2"], "loss.label_smoothing=1.2"),
    (["loss=hinge", "loss.margin=-1"], "loss.margin=-1"),
    (["data.val_fraction=0"], "data.val_fraction=0"),
    (["data.val_fraction=1.5"], "data.val_fraction=1.5"),
])
def test_values_out_of_range(compose_config, overrides, needle):
    fails(compose_config, overrides, needle)


def test_builders_check_their_ranges_too(compose_config):
    with pytest.raises(UserError, match="optim.momentum=1.5"):
        optimizer_for(compose_config(["optim=momentum", "optim.momentum=1.5"]))
    with pytest.raises(UserError, match="loss.label_smoothing=1.2"):
        build_loss(compose_config(["loss.label_smoothing=1.2"]).loss)
    with pytest.raises(UserError, match="model.dropout=1.0"):
        build_model(compose_config(["model=mlp", "model.dropout=1.0"]).model, (1, 4, 4), 3)


@pytest.mark.parametrize("key,value", [("batch_size", 0), ("batch_size", -4), ("eval_batch_size", 0)])
def test_batch_size_at_least_one(compose_config, key, value):
    fails(compose_config, [f"data.{key}={value}"], f"data.{key}={value}", "at least 1")
    with pytest.raises(UserError, match=f"data.{key}={value}"):  # load_data checks before it loads anything
        load_data(compose_config([*TINY, f"data.{key}={value}"]).data)


# --- epochs, kNN's k --------------------------------------------------------------------------------

def test_epochs_and_k(compose_config):
    fails(compose_config, ["trainer.epochs=0"], "trainer.epochs=0")
    fails(compose_config, ["model=knn", "model.k=0"], "model.k=0")


def test_k_larger_than_the_training_set(compose_config, tmp_path):
    from cvtrain.tasks import knn

    cfg = compose_config([*TINY, "model=knn", "model.k=200"])
    check_config(cfg)  # needs the data: found once it is loaded
    with pytest.raises(UserError, match=r"model.k=200 is more than the 90 training images"):
        knn.run(cfg, tmp_path)
    assert not list(tmp_path.iterdir())  # no event file, no summary


# --- schedules ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,needle", [
    (["sched=multistep", "sched.milestones=[8,5]", "trainer.epochs=10"], "must be increasing"),
    (["sched=multistep", "sched.milestones=[0,5]", "trainer.epochs=10"], "positive"),
    (["sched=step", "sched.factor=0"], "sched.factor=0"),
    (["sched=step", "sched.factor=1.5"], "sched.factor=1.5"),
    (["sched=multistep", "sched.factor=-0.1"], "sched.factor=-0.1"),
    (["sched=plateau", "sched.factor=1.0"], "sched.factor=1.0"),
    (["sched=cosine", "sched.warmup_epochs=3", "trainer.epochs=3"], "sched.warmup_epochs=3"),
    (["sched=exponential", "sched.k=-0.2"], "sched.k=-0.2"),
    (["sched=inverse_time", "sched.k=-1"], "sched.k=-1"),
    (["sched=cosine", "sched.min_lr_ratio=2"], "sched.min_lr_ratio=2"),
])
def test_schedule_parameters(compose_config, overrides, needle):
    fails(compose_config, overrides, needle)
    cfg = compose_config(overrides)
    with pytest.raises(UserError, match="sched."):
        build_scheduler(cfg.sched, optimizer_for(cfg), cfg.trainer.epochs, 4)


def test_milestones_beyond_the_run_warn(compose_config, caplog):
    cfg = compose_config(["sched=multistep", "sched.milestones=[2,5]", "trainer.epochs=3"])
    check_config(cfg)  # a short trial of a multistep config is legitimate: a warning, not an error
    with caplog.at_level(logging.WARNING, logger="cvtrain"):
        build_scheduler(cfg.sched, optimizer_for(cfg), cfg.trainer.epochs, 4)
    assert "sched.milestones=[2,5]: 5 never take(s) effect" in caplog.text


# --- names --------------------------------------------------------------------------------------------

def test_unknown_activation_init_and_names(compose_config):
    with pytest.raises(UserError, match="model.activation='swish' is unknown; choose one of relu"):
        build_model(compose_config(["model=mlp", "model.activation=swish"]).model, (1, 4, 4), 3)
    with pytest.raises(UserError, match="model.activation='swish' is unknown"):
        build_model(compose_config(["model.activation=swish"]).model, (1, 28, 28), 3)
    with pytest.raises(UserError, match="model.init='he' is unknown"):
        build_model(compose_config(["model=mlp", "model.init=he"]).model, (1, 4, 4), 3)
    fails(compose_config, ["optim.name=adamax"], "optim.name=adamax is unknown")
    fails(compose_config, ["model.name=lenet6"], "unknown model 'lenet6'")


# --- devices, input sizes --------------------------------------------------------------------------

def test_device_that_does_not_exist(compose_config):
    with pytest.raises(UserError, match="trainer.device=tpu"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda")
    fails(compose_config, [f"trainer.device=cuda:{max(torch.cuda.device_count(), 1) + 7}"], "trainer.device=cuda:")


@pytest.mark.parametrize("name", list_models())
def test_every_model_takes_a_tiny_input_or_says_so(name):
    try:
        model = build_model({"name": name}, (1, 1, 1), 3)
    except UserError as err:
        assert "needs images of at least" in str(err) and "model=mlp" in str(err)
        return
    if isinstance(model, torch.nn.Module):
        with torch.no_grad():
            assert model.eval()(torch.zeros(1, 1, 1, 1)).shape == (1, 3)


# --- types in the groups without a schema ---------------------------------------------------------------

@pytest.mark.parametrize("overrides,needle", [
    (["optim.lr=abc"], "optim.lr=abc is a string; optim=adam expects a number here (like optim.lr=0.001)"),
    (["model=mlp", "model.hidden_sizes=512"], "model.hidden_sizes=512 is an integer; model=mlp expects a list"),
    (["model=mlp", "model.hidden_sizes=[a]"], "model.hidden_sizes=[a] is a list; model=mlp expects a list of integers"),
    (["model=mlp", "model.dropout=x"], "model.dropout=x is a string; model=mlp expects a number"),
    (["model=mlp", "model.batch_norm=3"], "model.batch_norm=3 is an integer; model=mlp expects true or false"),
    (["model=knn", "model.k=2.5"], "model.k=2.5 is a number; model=knn expects an integer"),
    (["optim=sgd", "optim.nesterov=yes"], "optim.nesterov=yes is a string"),
    (["optim.betas=0.9"], "optim.betas=0.9 is a number; optim=adam expects a list"),
    (["+optim.amsgrad=maybe"], "optim.amsgrad=maybe is a string; optim=adam expects true or false"),
    (["sched=step", "sched.every_epochs=two"], "sched.every_epochs=two is a string"),
    (["loss.label_smoothing=[0.1]"], "loss.label_smoothing=[0.1] is a list"),
])
def test_wrong_types_name_key_value_and_type(compose_config, overrides, needle):
    fails(compose_config, overrides, needle)


def test_builders_check_types_too(compose_config):
    with pytest.raises(UserError, match="optim.lr=abc is a string"):
        optimizer_for(compose_config(["optim.lr=abc"]))
    with pytest.raises(UserError, match="model.hidden_sizes=512 is an integer"):
        build_model(compose_config(["model=mlp", "model.hidden_sizes=512"]).model, (1, 4, 4), 3)
    check_types("sched", "step", {"every_epochs": 1.5})  # an integer in the option file, but epochs may be fractional


# --- keys nothing reads ---------------------------------------------------------------------------------

def test_unknown_top_level_key_suggests_the_group(compose_config):
    fails(compose_config, ["+modle=mlp"], "modle=mlp", "did you mean model?", "model=<option> (no +)")
    fails(compose_config, ["+optimizer.lr=0.1"], "'optimizer' is not a config group", "did you mean optim?")
    fails(compose_config, ["+zzz=1"], "'zzz' is not a config group", "drop it")


@pytest.mark.parametrize("overrides,needle", [
    (["data.root=/somewhere"], "data.root=/somewhere is not used by data=digits; it is read by data=mnist"),
    (["data=mnist", "data.channels=1"], "data.channels=1 is not used by data=mnist; it is read by data=synthetic"),
    (["data=cifar10", "data.image_size=64"], "data.image_size=64 is not used by data=cifar10"),
    (["data=synthetic", "data.download=false"], "data.download=false is not used by data=synthetic"),
    (["data=digits", "data.on_bad_image=skip"], "data.on_bad_image=skip is not used by data=digits"),
])
def test_keys_the_source_does_not_read(compose_config, overrides, needle):
    fails(compose_config, overrides, needle)
    with pytest.raises(UserError, match="is not used by"):
        load_data(compose_config(overrides).data)


def test_on_bad_image_values(compose_config):
    fails(compose_config, ["data=imagefolder", "data.root=/x", "data.on_bad_image=ignore"], "data.on_bad_image=ignore")


# --- imagefolder ------------------------------------------------------------------------------------------

def write_tree(root, classes=("cat", "dog"), splits=("train",), per_class=3):
    for split in splits:
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (6, 6), (40 * i, 80, 0)).save(root / split / cls / f"{i}.png")
    return root


def folder(compose_config, tmp_path, root, *overrides):
    return compose_config(["data=imagefolder", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}",
                           "data.val_fraction=0.34", *overrides]).data


def test_imagefolder_root_and_layout(compose_config, tmp_path):
    with pytest.raises(UserError, match=r"does not exist .*root/train/<class>/\*\.jpg"):
        load_data(folder(compose_config, tmp_path, tmp_path / "nowhere"))
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (6, 6)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(UserError, match=r"has no train/ folder; data=imagefolder expects root/train/<class>/\*\.jpg"):
        load_data(folder(compose_config, tmp_path, tmp_path / "flat"))
    (tmp_path / "noclass" / "train").mkdir(parents=True)
    Image.new("RGB", (6, 6)).save(tmp_path / "noclass" / "train" / "a.png")
    with pytest.raises(UserError, match=r"no images found under .*root/train/<class>/\*\.jpg"):
        load_data(folder(compose_config, tmp_path, tmp_path / "noclass"))


def test_imagefolder_class_without_images(compose_config, tmp_path):
    root = write_tree(tmp_path / "pets")
    (root / "train" / "fish").mkdir()
    with pytest.raises(UserError, match=r"class folder\(s\) fish under .*train hold no images"):
        load_data(folder(compose_config, tmp_path, root))


def test_imagefolder_val_classes_must_match_train(compose_config, tmp_path):
    root = write_tree(tmp_path / "pets")
    write_tree(root, classes=("cat", "cow"), splits=("val",))
    with pytest.raises(UserError, match=r"val/ and train/ must hold the same class folders \(only in val/: cow; "
                                        r"only in train/: dog\)"):
        load_data(folder(compose_config, tmp_path, root))


def test_imagefolder_bad_image_is_named_or_skipped(compose_config, tmp_path, caplog):
    root = write_tree(tmp_path / "pets")
    (root / "train" / "cat" / "junk.png").write_bytes(b"not an image")
    good = root / "train" / "dog" / "0.png"
    truncated = root / "train" / "dog" / "cut.png"
    truncated.write_bytes(good.read_bytes()[:-30])
    with pytest.raises(UserError, match=r"cannot read image .*junk.png .*data.on_bad_image=skip"):
        load_data(folder(compose_config, tmp_path, root))
    (root / "train" / "cat" / "junk.png").unlink()
    with pytest.raises(UserError, match=r"cannot read image .*cut.png"):
        load_data(folder(compose_config, tmp_path, root))
    (root / "train" / "cat" / "junk.png").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING, logger="cvtrain"):
        data = load_data(folder(compose_config, tmp_path, root, "data.on_bad_image=skip"))
    assert len(data.train) + len(data.val) == 6
    assert "data.on_bad_image=skip: skipped 2 unreadable image(s)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cvtrain"):  # from the cache: the warning again
        load_data(folder(compose_config, tmp_path, root, "data.on_bad_image=skip"))
    assert "skipped 2 unreadable image(s)" in caplog.text
    with pytest.raises(UserError, match="cannot read image"):  # the skip cache does not serve error mode
        load_data(folder(compose_config, tmp_path, root))


# --- end to end -------------------------------------------------------------------------------------------

CLI = {
    "lr": (["optim.lr=abc"], "error: optim.lr=abc is a string"),
    "zero_lr": ([*TINY, "model=linear", "optim.lr=0"], "error: optim.lr=0: the learning rate must be"),
    "root": (["data.root=/nowhere"], "error: data.root=/nowhere is not used by data=digits"),
    "hidden": ([*TINY, "model=mlp", "model.hidden_sizes=512"], "error: model.hidden_sizes=512 is an integer"),
    "folder": (["data=imagefolder", "data.root=/nowhere/at/all"], "root/train/<class>/*.jpg"),
    "batch": (["data.batch_size=0"], "error: data.batch_size=0"),
}


def test_cli_bad_input_exits_2_with_one_error_line(start_cli, tmp_path):
    runs = {}
    for name, (args, _) in CLI.items():
        (tmp_path / name).mkdir()
        runs[name] = start_cli(args, tmp_path / name)
    for name, (args, needle) in CLI.items():
        run = runs[name].result()
        assert run.proc.returncode == 2, run.output
        assert needle in run.output and "Traceback" not in run.output, run.output
        assert sum("error:" in line for line in run.output.splitlines()) == 1, run.output
        made = [p.name for p in (tmp_path / name).rglob("*") if p.is_file()]
        assert not [m for m in made if m.startswith("events.") or m.endswith(".pt") or m.startswith("metrics")
                    or m == "summary.json"], made


# --- the command line around the run: start-up, the output folder, a resume ---------------------------

def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "cvtrain", "trainer.epochs=1"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(0.5)  # importing torch and Hydra takes seconds
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in out, out
    assert out.strip() == "interrupted during start-up; nothing was written"


def test_an_output_folder_that_cannot_be_written_is_one_error_line(run_cli, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = run_cli(["trainer.epochs=1", f"hydra.run.dir={blocker}/run"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout, proc.stdout
    assert f"error: cannot write run directories under {blocker}/run" in proc.stdout
    assert "set hydra.run.dir to a folder you can write" in proc.stdout


def test_a_resume_path_that_is_a_folder_says_which_file_to_give(run_cli, tmp_path):
    proc = run_cli(["data=synthetic", "data.image_size=8", "trainer.epochs=1", f"trainer.resume={tmp_path}"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout, proc.stdout
    assert f"error: checkpoint {tmp_path} is a directory, not a checkpoint file" in proc.stdout
    assert f"{tmp_path}/checkpoints/last.pt" in proc.stdout


def test_a_checkpoint_of_other_classes_is_refused_naming_them(run_cli, tmp_path):
    tiny = ["data=synthetic", "data.num_samples=128", "data.image_size=8", "model=linear", "trainer.epochs=1"]
    first = run_cli([*tiny, "data.num_classes=10", "hydra.run.dir=first"], tmp_path)
    assert first.returncode == 0, first.stdout
    proc = run_cli([*tiny, "data.num_classes=4", "trainer.epochs=2",
                    f"trainer.resume={tmp_path}/first/checkpoints/last.pt"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout, proc.stdout
    assert "the checkpoint was trained on other classes (10: only there ['class4'" in proc.stdout
