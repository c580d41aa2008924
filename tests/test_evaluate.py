"""task=evaluate (README "Using a trained model"): a checkpoint's figures from the checkpoint alone. On a tiny
trained run it reproduces the run's own test_acc and best val acc; eval.json holds the documented keys;
another data source with other classes is a clear error; kNN runs evaluate from their stored training
images; the metrics agree with scikit-learn."""
import json
from types import SimpleNamespace

import pytest
import torch
from sklearn.metrics import f1_score, precision_score, recall_score

from cvtrain import UserError
from cvtrain.metrics import calibration, per_class, report, topk_accuracy
from cvtrain.tasks import evaluate
from cvtrain.trained import load_trained
from cvtrain.validate import check_config

DATA = ["data=synthetic", "data.channels=3", "data.image_size=16", "data.num_classes=4", "data.num_samples=240",
        "data.num_test=80", "data.noise=0.5"]
TRAIN = [*DATA, "model=lenet", "optim.lr=3e-3", "trainer.epochs=3", "trainer.test=true", "trainer.viz=false",
         "trainer.progress=false"]
KNN = [*DATA, "model=knn", "model.k=3", "model.chunk_size=32", "trainer.test=true"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, start_cli):
    """The LeNet run and the kNN run (trained once, via the command line, two at a time)."""
    lenet = start_cli(TRAIN, tmp_path_factory.mktemp("lenet"))
    knn = start_cli(KNN, tmp_path_factory.mktemp("knn"))
    out = {}
    for name, future in (("lenet", lenet), ("knn", knn)):
        run = future.result()
        assert run.proc.returncode == 0, run.output
        out[name] = SimpleNamespace(dir=run.run_dir, summary=json.loads((run.run_dir / "summary.json").read_text()))
    return out


def _evaluate(compose_config, tmp_path, run_dir, *overrides) -> dict:
    accuracy = evaluate.run(compose_config(["task=evaluate", f"checkpoint={run_dir}", *overrides]), tmp_path)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["accuracy"] == accuracy
    return result


def test_the_command_reproduces_the_runs_test_accuracy(runs, run_cli, tmp_path):
    run = runs["lenet"]
    proc = run_cli(["task=evaluate", f"checkpoint={run.dir}", "trainer.test=true"], tmp_path)
    assert proc.returncode == 0, proc.stdout
    (eval_dir,) = (tmp_path / "outputs").glob("*/*_evaluate")
    result = json.loads((eval_dir / "eval.json").read_text())
    assert result["split"] == "test" and result["images"] == 80
    assert result["accuracy"] == pytest.approx(run.summary["test_acc"], abs=1e-12)
    assert 0.3 < result["accuracy"] < 1.0  # a figure worth reproducing: neither chance (0.25) nor perfect
    assert {"split", "accuracy", "loss", "top5", "per_class", "ece"} <= set(result)
    assert result["top5"] is None  # 4 classes: no top-5
    assert set(result["per_class"]) == {"class0", "class1", "class2", "class3"}
    assert set(result["per_class"]["class0"]) == {"precision", "recall", "f1", "support"}
    assert sum(v["support"] for v in result["per_class"].values()) == 80
    assert 0 <= result["ece"] <= 1 and len(result["ece_bins"]) == 15
    for name in ("confusion_matrix.png", "reliability.png"):
        assert (eval_dir / name).stat().st_size > 1000
    assert list(eval_dir.glob("events.out.tfevents.*"))
    assert "accuracy" in proc.stdout and "ECE" in proc.stdout and "macro avg" in proc.stdout


def test_the_validation_split_is_the_runs_own(runs, compose_config, tmp_path):
    run = runs["lenet"]
    result = _evaluate(compose_config, tmp_path, run.dir)  # the default split
    assert result["split"] == "val" and result["own_data"]
    assert result["images"] == 24  # data.val_fraction=0.1 of 240, carved with the run's data.split_seed
    assert result["accuracy"] == pytest.approx(run.summary["best_val_acc"], abs=1e-12)
    assert result["loss_name"] == "cross_entropy" and result["loss"] == pytest.approx(result["nll"], rel=1e-5)


def test_a_checkpoint_file_works_as_the_run_dir(runs, compose_config, tmp_path):
    run = runs["lenet"]
    result = _evaluate(compose_config, tmp_path, run.dir / "checkpoints" / "best.pt", "trainer.test=true")
    assert result["accuracy"] == pytest.approx(run.summary["test_acc"], abs=1e-12)


def test_other_data_is_the_command_lines_and_other_classes_are_a_clear_error(runs, compose_config, tmp_path,
                                                                               monkeypatch):
    run = runs["lenet"]
    given = ["data", "data.image_size", "data.num_classes", "data.noise", "data.num_test", "data.num_samples"]
    monkeypatch.setattr(evaluate, "command_line_keys", lambda: ["task", "checkpoint", *given])  # as typed
    other = ["data=synthetic", "data.image_size=16", "data.noise=0.5", "data.num_test=80", "data.num_samples=240"]
    with pytest.raises(UserError, match="data=synthetic has other classes than the checkpoint: 4 in the checkpoint "
                                        r"\(only there: class3\), 3 in data=synthetic"):
        _evaluate(compose_config, tmp_path, run.dir, *other, "data.num_classes=3")
    result = _evaluate(compose_config, tmp_path, run.dir, *other, "data.num_classes=4", "trainer.test=true")
    assert not result["own_data"] and result["images"] == 80  # data.channels=3 is the schema's default
    assert result["accuracy"] == pytest.approx(run.summary["test_acc"], abs=1e-12)  # the same synthetic images


def test_a_data_key_changes_the_checkpoints_data_config(runs, compose_config, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "command_line_keys", lambda: ["task", "checkpoint", "data.val_fraction"])
    result = _evaluate(compose_config, tmp_path, runs["lenet"].dir, "data.val_fraction=0.5")
    assert result["own_data"] and result["images"] == 120  # half of 240, the rest of the data the checkpoint's


def test_classes_in_another_order_are_mapped_by_name_and_others_refused():
    trained = SimpleNamespace(classes=["cat", "dog", "fox"])
    assert evaluate.class_mapping(["cat", "dog", "fox"], trained, "x") is None
    assert evaluate.class_mapping(["fox", "cat", "dog"], trained, "x").tolist() == [2, 0, 1]
    with pytest.raises(UserError, match="only there: fox.*only here: cow"):
        evaluate.class_mapping(["cat", "dog", "cow"], trained, "x")
    with pytest.raises(UserError, match="trained on 1x28x28"):
        evaluate.check_shape((3, 32, 32), SimpleNamespace(shape=(1, 28, 28)), "x")


def test_a_knn_run_evaluates_from_its_stored_training_images(runs, compose_config, tmp_path):
    run = runs["knn"]
    assert (run.dir / "checkpoints" / "best.pt").is_file()
    trained = load_trained(run.dir)
    assert trained.kind == "fitted" and len(trained.model.train_y) == 216
    result = _evaluate(compose_config, tmp_path, run.dir, "trainer.test=true")
    assert result["accuracy"] == pytest.approx(run.summary["test_acc"], abs=1e-12)
    assert result["loss"] is None  # votes are no probability model
    probs = torch.tensor([[b["confidence"] for b in result["ece_bins"] if b["count"]]])
    assert ((probs * 3).round() == probs * 3).all()  # confidences are vote fractions of k=3


def test_the_checkpoint_key_is_required_and_only_for_the_checkpoint_tasks(compose_config, tmp_path):
    with pytest.raises(UserError, match="task=evaluate needs checkpoint=<run dir or .pt file>"):
        evaluate.run(compose_config(["task=evaluate"]), tmp_path)
    with pytest.raises(UserError, match="is read by task=evaluate, predict, export, not by task=train"):
        check_config(compose_config(["checkpoint=outputs/x"]))
    with pytest.raises(UserError, match="inputs=a.png is read by task=predict only"):
        check_config(compose_config(["task=evaluate", "checkpoint=outputs/x", "inputs=a.png"]))
    with pytest.raises(UserError, match="no such file or folder"):
        evaluate.run(compose_config(["task=evaluate", f"checkpoint={tmp_path / 'nothing'}"]), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no checkpoints/best.pt or last.pt"):
        evaluate.run(compose_config(["task=evaluate", f"checkpoint={tmp_path / 'empty'}"]), tmp_path)


def test_per_class_figures_agree_with_scikit_learn():
    gen = torch.Generator().manual_seed(0)
    labels, preds = torch.randint(0, 5, (300,), generator=gen), torch.randint(0, 4, (300,), generator=gen)
    counts = torch.bincount(labels * 5 + preds, minlength=25).view(5, 5)
    ours = per_class(counts)  # class 4 is never predicted: precision 0, as zero_division=0
    for key, fn in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score)):
        theirs = fn(labels.numpy(), preds.numpy(), average=None, labels=list(range(5)), zero_division=0)
        assert ours[key] == pytest.approx(theirs.tolist(), abs=1e-12)
    assert ours["support"] == torch.bincount(labels, minlength=5).tolist()


def test_calibration_error_and_top5_by_hand():
    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.65, 0.35], [0.25, 0.75]])
    labels = torch.tensor([0, 1, 0, 1])
    ece, bins = calibration(probs, labels, bins=10)
    # bin [0.9, 1.0]: 2 images, confidence 0.95, accuracy 0.5; bin [0.6, 0.7): 0.65 vs 1; bin [0.7, 0.8): 0.75 vs 1
    assert ece == pytest.approx((2 * 0.45 + 0.35 + 0.25) / 4)
    assert [b["count"] for b in bins] == [0, 0, 0, 0, 0, 0, 1, 1, 0, 2]
    scores = torch.arange(7.0).repeat(3, 1)  # class 6 scores highest, class 0 lowest
    assert topk_accuracy(scores, torch.tensor([6, 2, 0]), 5) == pytest.approx(2 / 3)
    figures = report(scores, torch.tensor([6, 2, 0]), [str(i) for i in range(7)])
    assert figures["top5"] == pytest.approx(2 / 3) and figures["accuracy"] == pytest.approx(1 / 3)
    assert figures["loss"] is None and figures["nll"] > 0
