"""Ensembles and weight averaging: task=ensemble against hand-averaged probabilities, trainer.ema against
the hand-computed average (warm-up, batch-norm buffers), trainer.select=ema, an exact resume of the
average, sched=cosine_restarts and trainer.keep_snapshots, and their errors.

A few tiny runs on synthetic data, trained in process once for the module (train.train)."""
import json
import math
import shutil

import pytest
import torch

from cvtrain import UserError
from cvtrain.data import Preprocessor, load_data
from cvtrain.ema import EMA, ema_decay
from cvtrain.models import build_model
from cvtrain.optim import build_scheduler
from cvtrain.tasks import ensemble, train
from cvtrain.validate import check_config

DATA = ["data=synthetic", "data.num_samples=256", "data.image_size=8", "data.batch_size=32"]
TINY = [*DATA, "trainer.viz=false", "trainer.progress=false", "trainer.epochs=2"]
# an MLP with batch norm and the moving average, best.pt by the average's val acc; step checkpoints to resume from
EMA_RUN = [*TINY, "model=mlp", "model.batch_norm=true", "trainer.ema=0.9", "trainer.select=ema",
           "trainer.checkpoint_every_steps=3", "trainer.keep_checkpoints=100"]
# a linear classifier, another seed, 3 cycles of 1 epoch: snapshots at the ends of the last two
SNAPSHOT_RUN = [*TINY, "model=linear", "trainer.seed=1", "trainer.epochs=3", "sched=cosine_restarts",
                "sched.cycle_epochs=1", "trainer.keep_snapshots=2"]
OTHER_CLASSES = [*TINY, "model=linear", "data.num_classes=4", "trainer.epochs=1"]


@pytest.fixture(scope="module")
def runs(compose_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    dirs = {"ema": root / "ema", "snap": root / "snap", "other": root / "other"}
    train.train(compose_config(EMA_RUN), dirs["ema"])
    train.train(compose_config(SNAPSHOT_RUN), dirs["snap"])
    train.train(compose_config(OTHER_CLASSES), dirs["other"])
    # the EMA run again, resumed from its mid-epoch step-3 checkpoint (batch 3 of 7) in a new run dir
    resume_from = root / "resume_from" / "checkpoints" / "step-3.pt"
    resume_from.parent.mkdir(parents=True)
    shutil.copy(dirs["ema"] / "checkpoints" / "step-3.pt", resume_from)
    dirs["resumed"] = root / "resumed"
    train.train(compose_config([*EMA_RUN, f"trainer.resume={resume_from}"]), dirs["resumed"])
    dirs["root"] = root
    return dirs


def checkpoint(run_dir, name="best.pt"):
    return torch.load(run_dir / "checkpoints" / name, weights_only=True)


def run_ensemble(compose_config, out_dir, members, *overrides):
    cfg = compose_config(["task=ensemble", *DATA, f"task.members=[{','.join(map(str, members))}]", *overrides])
    out_dir.mkdir(parents=True, exist_ok=True)
    objective = ensemble.run(cfg, out_dir)
    result = json.loads((out_dir / "ensemble.json").read_text())
    assert objective == result["ensemble"]["val_acc"]
    return result


def hand_probabilities(compose_config, path, tta="none", split="val"):
    """Softmax probabilities of a checkpoint's model on the split, computed here from the checkpoint alone."""
    saved = torch.load(path, weights_only=True)
    model = build_model(saved["config"]["model"], saved["data"]["shape"], len(saved["data"]["classes"]))
    model.load_state_dict(saved["model"])
    model.eval()
    preprocess = Preprocessor.from_state_dict(saved["data"]["preprocess"])
    data = load_data(compose_config(DATA).data, need_test=split == "test")
    images, labels = getattr(data, split).images, getattr(data, split).labels
    x = preprocess(images.float() / 255)
    with torch.no_grad():
        scores = model(x) if tta == "none" else 0.5 * model(x) + 0.5 * model(x.flip(-1))
    return torch.softmax(scores, dim=1), labels


# --- task=ensemble ---------------------------------------------------------------------------------

@pytest.mark.parametrize("tta", ["none", "flip"])
def test_ensemble_accuracy_is_that_of_hand_averaged_probabilities(compose_config, runs, tmp_path, tta):
    """Mixed architectures (an MLP with batch norm, a linear classifier), each with its own preprocessing."""
    members = [runs["ema"] / "checkpoints" / "best.pt", runs["snap"] / "checkpoints" / "last.pt"]
    result = run_ensemble(compose_config, tmp_path, members, f"trainer.tta={tta}", "trainer.test=true")
    assert [m["model"] for m in result["members"]] == ["mlp", "linear"]
    assert [m["weights"] for m in result["members"]] == ["ema", "raw"]  # trainer.select=ema's best.pt
    probs = [hand_probabilities(compose_config, m, tta, split) for split in ("val", "test") for m in members]
    for split, (a, b) in (("val", probs[:2]), ("test", probs[2:])):
        (pa, labels), (pb, _) = a, b
        for row, (p, _) in zip(result["members"], (a, b)):
            assert row[f"{split}_acc"] == pytest.approx((p.argmax(1) == labels).float().mean().item())
        mean = (pa + pb) / 2
        assert result["ensemble"][f"{split}_acc"] == pytest.approx((mean.argmax(1) == labels).float().mean().item())
        nll = -mean.gather(1, labels[:, None]).log().mean().item()
        assert result["ensemble"][f"{split}_loss"] == pytest.approx(nll, rel=1e-5)
    assert result["tta"] == tta
    assert (tmp_path / "ensemble.png").stat().st_size > 1000


def test_accuracy_by_size_adds_members_by_their_val_accuracy(compose_config, runs, tmp_path):
    members = [runs["ema"], *sorted((runs["snap"] / "checkpoints").glob("snapshot-*.pt")),
               runs["snap"] / "checkpoints" / "last.pt"]
    result = run_ensemble(compose_config, tmp_path, members)
    accs = [m["val_acc"] for m in result["members"]]
    assert len(result["members"]) == len(result["val_acc_by_size"]) == 4
    assert [accs[i] for i in result["order"]] == sorted(accs, reverse=True)
    assert result["val_acc_by_size"][0] == max(accs)
    assert result["val_acc_by_size"][-1] == result["ensemble"]["val_acc"]


def test_a_run_dir_contributes_its_snapshots_or_its_best_checkpoint(compose_config, runs, tmp_path):
    snaps = sorted(p.name for p in (runs["snap"] / "checkpoints").glob("snapshot-*.pt"))
    assert snaps == ["snapshot-2.pt", "snapshot-3.pt"]  # the last 2 of 3 cycles
    assert [checkpoint(runs["snap"], name)["epoch"] for name in snaps] == [2, 3]
    summary = json.loads((runs["snap"] / "summary.json").read_text())
    assert summary["snapshots"] == [2, 3]
    result = run_ensemble(compose_config, tmp_path / "auto", [runs["snap"], runs["ema"]])
    assert [m["checkpoint"].rsplit("/", 1)[1] for m in result["members"]] == [*snaps, "best.pt"]
    result = run_ensemble(compose_config, tmp_path / "best", [runs["snap"]], "task.checkpoint=best")
    assert [m["checkpoint"].rsplit("/", 1)[1] for m in result["members"]] == ["best.pt"]


def test_a_sweep_dir_contributes_its_top_k_runs(compose_config, runs, tmp_path):
    sweep = tmp_path / "sweep"
    (sweep / "2_broken").mkdir(parents=True)  # no checkpoints: not a run
    for n, name in enumerate(("ema", "snap")):
        (sweep / f"{n}_{name}").symlink_to(runs[name], target_is_directory=True)
    accs = {name: json.loads((runs[name] / "summary.json").read_text())["best_val_acc"] for name in ("ema", "snap")}
    best = max(accs, key=accs.get)
    result = run_ensemble(compose_config, tmp_path / "out", [sweep], "task.top_k=1", "task.checkpoint=best")
    (member,) = result["members"]
    assert f"_{best}/checkpoints/best.pt" in member["checkpoint"]


def test_members_of_other_classes_are_a_clear_error(compose_config, runs, tmp_path):
    with pytest.raises(UserError, match="trained on other classes") as err:
        run_ensemble(compose_config, tmp_path, [runs["ema"], runs["other"]])
    assert "only there" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides,needle", [
    (["task.members=[]"], "task.members is empty"),
    (["task.members=[/no/such/run]"], "/no/such/run does not exist"),
    (["task.members=[x]", "task.top_k=-1"], "task.top_k=-1"),
    (["task.members=[x]", "task.checkpoint=newest"], "task.checkpoint=newest is unknown"),
])
def test_bad_members_are_errors_before_any_work(compose_config, tmp_path, overrides, needle):
    with pytest.raises(UserError) as err:
        ensemble.run(compose_config(["task=ensemble", *DATA, *overrides]), tmp_path)
    assert needle in str(err.value)
    assert not list(tmp_path.iterdir())


# --- trainer.ema -----------------------------------------------------------------------------------

def test_ema_equals_the_hand_computed_average_with_warmup_and_copied_buffers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    decay = 0.8
    ema = EMA(model, decay)
    hand = [p.detach().clone() for p in model.parameters()]
    for n in range(6):
        x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        d = min(decay, (1 + n) / (10 + n))  # TensorFlow's num_updates warm-up
        assert ema_decay(decay, n) == d
        hand = [d * h + (1 - d) * p.detach() for h, p in zip(hand, model.parameters())]
        ema.update()
    assert ema.updates == 6 and min(decay, 6 / 15) < decay  # the warm-up was still on
    for averaged, expected in zip(ema.module.parameters(), hand):
        assert torch.allclose(averaged, expected, atol=1e-6)
        assert not averaged.requires_grad
    assert not torch.allclose(ema.module[0].weight, model[0].weight)  # (the bias before batch norm gets no gradient)
    for averaged, raw in zip(ema.module.buffers(), model.buffers()):  # batch norm: copied, not averaged
        assert torch.equal(averaged, raw)
    assert int(dict(ema.module.named_buffers())["1.num_batches_tracked"]) == 6


def test_select_ema_keeps_the_averaged_weights_in_best_pt(runs):
    best, last = checkpoint(runs["ema"]), checkpoint(runs["ema"], "last.pt")
    assert best["weights"] == "ema"
    for key, value in best["model"].items():
        assert torch.equal(value, best["ema"]["model"][key]), key  # the average at the best epoch ...
    assert any(not torch.equal(value, best["raw_model"][key]) for key, value in best["model"].items())  # ... not raw
    assert "weights" not in last and "raw_model" not in last  # last.pt: the trained weights, the average beside them
    buffers = [k for k in last["model"] if "running_" in k]
    assert buffers and all(torch.equal(last["ema"]["model"][k], last["model"][k]) for k in buffers)
    metrics = [json.loads(line) for line in (runs["ema"] / "metrics.jsonl").read_text().splitlines()]
    assert all({"ema_val_acc", "ema_val_loss", "val_acc"} <= m.keys() for m in metrics)
    summary = json.loads((runs["ema"] / "summary.json").read_text())
    assert summary["select"] == "ema" and summary["best_weights"] == "ema" and summary["ema_decay"] == 0.9
    assert summary["best_val_acc"] == max(m["ema_val_acc"] for m in metrics) == summary["best_ema_val_acc"]
    assert last["ema"]["updates"] == last["step"] == 14


def test_a_resumed_run_continues_the_average_exactly(runs):
    full, resumed = checkpoint(runs["ema"], "last.pt"), checkpoint(runs["resumed"], "last.pt")
    assert resumed["ema"]["updates"] == full["ema"]["updates"] == 14
    for part in (resumed["ema"]["model"], resumed["model"]):
        reference = full["ema"]["model"] if part is resumed["ema"]["model"] else full["model"]
        for key in reference:
            assert torch.equal(part[key], reference[key]), key  # bit-identical


def test_without_ema_nothing_changes(runs):
    last = checkpoint(runs["other"], "last.pt")
    assert not {"ema", "best_ema_val_acc", "best_weights"} & last.keys()
    metrics = json.loads((runs["other"] / "metrics.jsonl").read_text().splitlines()[0])
    assert "ema_val_acc" not in metrics
    assert "ema_decay" not in json.loads((runs["other"] / "summary.json").read_text())


# --- sched=cosine_restarts, trainer.keep_snapshots ---------------------------------------------------

def test_cosine_restarts_restart_at_the_cycle_ends(compose_config):
    steps, epochs, lr = 3, 14, 0.1
    cfg = compose_config(["sched=cosine_restarts", "sched.cycle_epochs=2", "sched.cycle_mult=2"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = build_scheduler(cfg.sched, optimizer, epochs=epochs, steps_per_epoch=steps)
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    warm_restarts = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(reference, T_0=2 * steps, T_mult=2)
    used, expected = [], []
    for step in range(epochs * steps):
        used.append(optimizer.param_groups[0]["lr"])
        expected.append(reference.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
        scheduler.step_batch()
        warm_restarts.step()
        if (step + 1) % steps == 0:
            scheduler.step_epoch(1.0, 0.5)
    assert used == pytest.approx(expected)
    restarts = [s for s in range(1, len(used)) if used[s] > used[s - 1]]
    assert restarts == [2 * steps, 6 * steps]  # cycles of 2, 4, 8 epochs
    assert [used[s] for s in (0, *restarts)] == pytest.approx([lr] * 3)
    assert used[2 * steps - 1] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 5 / 6)))


def test_cosine_restarts_with_a_floor_and_a_warmup(compose_config):
    cfg = compose_config(["sched=cosine_restarts", "sched.cycle_epochs=1", "sched.min_lr_ratio=0.1",
                          "sched.warmup_epochs=1", "sched.interval=epoch"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(cfg.sched, optimizer, epochs=4, steps_per_epoch=2)
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step_epoch(1.0, 0.5)
    assert lrs == pytest.approx([1.0, 1.0, 1.0, 1.0])  # per epoch: each 1-epoch cycle starts at the peak
    cfg = compose_config(["sched=cosine_restarts", "sched.cycle_epochs=2", "sched.min_lr_ratio=0.1",
                          "sched.interval=epoch"])
    scheduler = build_scheduler(cfg.sched, optimizer, epochs=4, steps_per_epoch=2)
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step_epoch(1.0, 0.5)
    assert lrs == pytest.approx([1.0, 0.55, 1.0, 0.55])


@pytest.mark.parametrize("overrides,needle", [
    (["trainer.keep_snapshots=2"], "sched=cosine has no cycles; use sched=cosine_restarts"),
    (["trainer.keep_snapshots=3", "sched=cosine_restarts", "sched.cycle_epochs=4"],
     "trainer.epochs=10 holds 2 complete cycle(s)"),
    (["trainer.keep_snapshots=2", "sched=cosine_restarts", "sched.cycle_epochs=2.5"], "inside an epoch"),
    (["sched=cosine_restarts", "sched.cycle_mult=0.5"], "sched.cycle_mult=0.5"),
    (["sched=cosine_restarts", "sched.cycle_epochs=0"], "sched.cycle_epochs=0"),
    (["trainer.ema=1.0"], "trainer.ema=1.0: the decay"),
    (["trainer.ema=-0.1"], "trainer.ema=-0.1"),
    (["trainer.select=ema"], "trainer.select=ema: needs the moving average"),
    (["trainer.select=newest", "trainer.ema=0.9"], "trainer.select=newest: choose raw"),
    (["trainer.keep_snapshots=-1"], "trainer.keep_snapshots=-1"),
])
def test_bad_averaging_settings_are_errors_before_any_work(compose_config, overrides, needle):
    with pytest.raises(UserError) as err:
        check_config(compose_config(overrides))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_keep_snapshots_fits_the_cycles(compose_config):
    check_config(compose_config(["trainer.keep_snapshots=2", "sched=cosine_restarts"]))  # 10 epochs: 2 of 5
    check_config(compose_config(["trainer.ema=0.999", "trainer.select=best"]))


def test_ensemble_from_the_command_line(run_cli, runs, tmp_path):
    proc = run_cli(["task=ensemble", f"task.members=[{runs['ema']},{runs['snap']}]", "hydra.run.dir=out"], tmp_path)
    assert proc.returncode == 0, proc.stdout
    result = json.loads((tmp_path / "out" / "ensemble.json").read_text())
    assert len(result["members"]) == 3 and "ensemble of 3 (mean probability)" in proc.stdout
    assert result["data"] == "synthetic"  # the first member's data config, none given on the command line
