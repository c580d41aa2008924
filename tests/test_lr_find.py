"""task=lr_find (src/cvtrain/tasks/lr_find.py): the lr sequence, early stopping, the suggestion, the command line."""
import csv
import math
import re

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cvtrain import UserError
from cvtrain.tasks.lr_find import lr_sequence, range_test, run, suggest_lr


def test_lr_sequence_is_exponential_from_start_to_end():
    lrs = lr_sequence(1e-7, 10.0, 100)
    assert len(lrs) == 100
    assert lrs[0] == pytest.approx(1e-7) and lrs[-1] == pytest.approx(10.0)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert ratios == pytest.approx([10 ** (8 / 99)] * 99)  # 8 decades in 99 equal steps of log10(lr)


@pytest.mark.parametrize("start, end, steps", [(1e-3, 1e-5, 100), (0.0, 1.0, 100), (1e-7, 10.0, 3)])
def test_bad_settings_are_user_errors(start, end, steps):
    with pytest.raises(UserError, match="task.st"):
        lr_sequence(start, end, steps)


def test_range_test_stops_when_the_smoothed_loss_exceeds_4x_its_best():
    lrs = lr_sequence(1e-6, 1.0, 61)  # 10 steps per decade
    calls = []

    def step(lr):
        calls.append(lr)
        return 1.0 if lr < 1e-2 else 1000.0

    result = range_test(step, lrs, smoothing=0.0)  # no smoothing: the smoothed loss is the loss
    first_bad = next(i for i, lr in enumerate(lrs) if lr >= 1e-2)
    assert calls == lrs[:first_bad + 1]  # no step after the explosion
    assert result.lrs == lrs[:first_bad + 1] and result.losses[-1] == 1000.0
    assert "exceeded 4x its best" in result.stopped


def test_range_test_smooths_with_a_bias_corrected_moving_average():
    result = range_test(lambda lr: 2.0, lr_sequence(1e-3, 1e-1, 10), smoothing=0.9)
    assert result.smoothed == pytest.approx([2.0] * 10)  # bias correction: no ramp up from 0
    assert result.stopped is None


def test_range_test_stops_on_a_non_finite_loss_without_recording_it():
    lrs = lr_sequence(1e-4, 1.0, 20)
    result = range_test(lambda lr: math.nan if lr > 1e-2 else 1.0, lrs)
    assert len(result.lrs) == sum(lr <= 1e-2 for lr in lrs)
    assert all(math.isfinite(x) for x in result.losses) and "nan" in result.stopped


def test_suggestion_is_the_steepest_descent_before_the_minimum():
    lrs = lr_sequence(1e-6, 1.0, 61)
    # falls fastest at 1e-3 (a tanh step in log10 lr), lowest near 1e-1, then a steep rise (not a descent)
    smoothed = [2 - math.tanh(2 * (math.log10(lr) + 3)) + (100 * (lr - 0.1) if lr > 0.1 else 0) for lr in lrs]
    assert suggest_lr(lrs, smoothed) == pytest.approx(1e-3)


def test_knn_has_no_learning_rate(compose_config, tmp_path):
    with pytest.raises(UserError, match="model=knn has no learning rate"):
        run(compose_config(["task=lr_find", "model=knn"]), tmp_path)


def test_no_suggestion_from_too_few_points():
    with pytest.raises(UserError, match="lower task.start"):
        suggest_lr([1e-3, 1e-2], [1.0, 5.0])


# --- the command line: LeNet (the classic variant, for speed) + Adam on the embedded digits ------------

@pytest.fixture(scope="module", autouse=True)
def started_run(request, tmp_path_factory, start_cli):
    """Started with the module when a selected test needs it, so the unit tests run meanwhile."""
    if any(item.module is request.module and "lr_find_run" in item.fixturenames for item in request.session.items):
        return start_cli(["task=lr_find", "model.variant=classic"], tmp_path_factory.mktemp("lr_find"))


@pytest.fixture(scope="module")
def lr_find_run(started_run):
    run = started_run.result()
    assert run.proc.returncode == 0, run.output
    return run


def test_cli_prints_a_sensible_suggested_lr_last(lr_find_run):
    last = lr_find_run.output.strip().splitlines()[-1]
    match = re.fullmatch(r"suggested_lr=(\S+)", last)
    assert match, lr_find_run.output
    assert 1e-5 < float(match.group(1)) < 1e-1  # Adam on LeNet: about 1e-3 is the usual advice
    assert "lr range test: lenet + adam on digits" in lr_find_run.output


def test_cli_writes_the_plot_the_csv_and_tensorboard(lr_find_run):
    run_dir = lr_find_run.run_dir
    assert (run_dir / "lr_find.png").stat().st_size > 10_000
    with open(run_dir / "lr_find.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "lr", "loss", "smoothed"]
    lrs = [float(r["lr"]) for r in rows]
    assert run_dir.name.endswith("_lr_find_digits_lenet_adam")  # the task names its run dir
    assert lrs[0] == pytest.approx(1e-7) and lrs == sorted(lrs) and 10 <= len(rows) <= 100
    (events,) = run_dir.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("lr_find/loss")] == list(range(len(rows)))
    assert [e.value for e in acc.Scalars("lr_find/smoothed_loss")] == pytest.approx([float(r["smoothed"]) for r in rows],
                                                                                    rel=1e-4)
    assert "lr_find/plot" in acc.Tags()["images"]
