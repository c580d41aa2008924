"""Training-health monitors: activation statistics, the learning-rate watch, the loss guard."""
import json
import math

import pytest
import torch
import torch.nn as nn

from cvtrain import TrainingDiverged
from cvtrain.monitor import ActivationMonitor, LearningRateWatch, LossGuard, UpdateRatioMonitor


def test_dead_relu_fraction_is_exact_on_a_layer_built_to_be_dead():
    model = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 2))
    with torch.no_grad():
        model[0].weight.mul_(0.01)
        model[0].bias[:7] = -100.0  # 7 of 10 units can never be positive
        model[0].bias[7:] = 100.0
    monitor = ActivationMonitor(model)
    monitor.attach()
    model(torch.randn(32, 4))
    stats = monitor.collect()
    assert stats["act/1/dead_fraction"] == pytest.approx(0.7)


def test_dead_units_of_a_conv_layer_are_channels():
    conv = nn.Conv2d(1, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([-1.0, 1.0, -1.0, 1.0]))
    model = nn.Sequential(conv, nn.ReLU())
    monitor = ActivationMonitor(model)
    monitor.attach()
    model(torch.randn(2, 1, 5, 5))
    assert monitor.collect()["act/1/dead_fraction"] == pytest.approx(0.5)


def test_saturation_of_sigmoid_and_tanh():
    model = nn.Sequential(nn.Linear(3, 6), nn.Sigmoid(), nn.Linear(6, 6), nn.Tanh())
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([50.0, -50.0, 0.0, 0.0, 0.0, 0.0]))  # 2 of 6 saturated
        model[2].weight.zero_()
        model[2].bias.fill_(10.0)  # all saturated
    monitor = ActivationMonitor(model)
    monitor.attach()
    model(torch.randn(8, 3))
    stats = monitor.collect()
    assert stats["act/1/saturated_fraction"] == pytest.approx(2 / 6)
    assert stats["act/3/saturated_fraction"] == pytest.approx(1.0)


def test_hooks_are_removed_after_collect():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    monitor = ActivationMonitor(model)
    monitor.attach()
    monitor.collect()
    model(torch.randn(1, 2))
    assert monitor.collect() == {} and not model[1]._forward_hooks


def test_update_ratio_is_the_real_step_not_lr_times_grad():
    model = nn.Linear(10, 10, bias=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 10)).pow(2).sum().backward()
    monitor = UpdateRatioMonitor(model)
    before = model.weight.detach().clone()
    monitor.before_step()
    optimizer.step()
    ratio = monitor.after_step()["update_ratio/weight"]
    expected = math.log10(((model.weight - before).norm() / before.norm()).item())
    assert ratio == pytest.approx(expected, abs=1e-6)
    # Adam's first step moves every weight by ~lr, whatever the gradient's size
    assert ratio == pytest.approx(math.log10(1e-3 * 10 / before.norm().item()), abs=0.05)


def test_learning_rate_watch_warns_once_after_patience():
    watch = LearningRateWatch(patience=3)
    high = {"update_ratio/a": -1.0, "update_ratio/b": -1.5, "update_ratio/median": -1.0}
    assert watch.update(high) is None and watch.update(high) is None
    message = watch.update(high)
    assert "too high" in message and "lower optim.lr" in message
    assert watch.update(high) is None  # once
    watch = LearningRateWatch(patience=2)
    low = {"update_ratio/a": -6.0}
    assert watch.update(low) is None and "too low" in watch.update(low)
    healthy = LearningRateWatch(patience=1)
    assert healthy.update({"update_ratio/a": -3.1}) is None


def test_loss_guard_stops_on_non_finite_and_sustained_explosion_not_on_a_spike():
    guard = LossGuard(factor=3.0, window=4)
    guard.check([2.0, 5.0, 5.0], first_step=0)  # initial = the first loss, 2.0; the window is not full yet
    guard.check([2.0, 2.0, 2.0, 2.0], first_step=3)
    guard.check([14.0, 2.0, 2.0, 2.0, 2.0], first_step=7)  # a one-batch spike: window mean 5 < 3 x 2
    with pytest.raises(TrainingDiverged, match="exploded at step 14"):
        guard.check([9.0, 9.0, 9.0], first_step=12)  # window means 3.75, 5.5, then 7.25 > 6
    guard = LossGuard(factor=3.0, window=2)
    guard.check([1.0, 1.0, 5.0], first_step=0)  # window mean 3.0 = 3 x 1: not above
    with pytest.raises(TrainingDiverged, match="exploded at step 3: its mean over the last 2 steps is 5.5"):
        guard.check([6.0], first_step=3)
    with pytest.raises(TrainingDiverged, match="nan"):
        LossGuard().check([1.0, float("nan")], first_step=0)  # non-finite: at once, even before the window fills
    LossGuard(factor=0, window=1).check([1.0, 100.0, 1e6], first_step=0)  # factor 0: only non-finite stops


def test_learning_rate_watch_ignores_small_updates_while_the_schedule_anneals():
    watch = LearningRateWatch(patience=2)
    low = {"update_ratio/a": -6.0}
    assert watch.update(low, lr=1.0) is None
    assert watch.update(low, lr=0.4) is None and watch.update(low, lr=0.1) is None  # annealed: not counted
    assert watch.update(low, lr=0.6) is None and "too low" in watch.update(low, lr=0.6)


# --- in a real run ---------------------------------------------------------------------------------

TINY = ["data=synthetic", "data.num_samples=256", "data.image_size=8", "model=mlp", "trainer.epochs=1"]


def test_run_logs_activations_and_histograms(run_cli, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run_cli([*TINY, "model.activation=tanh", "trainer.monitor_every=1", "trainer.histogram_every=2"],
                     tmp_path)
    assert result.returncode == 0, result.stdout
    (run_dir,) = (tmp_path / "outputs").glob("2*/*")
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    scalars, histograms = set(events.Tags()["scalars"]), set(events.Tags()["histograms"])
    assert {"act/act1/mean", "act/act1/std", "act/act1/saturated_fraction"} <= scalars  # the module's own name
    assert {"weights/fc1.weight", "grads/fc1.weight"} <= histograms
    # every histogram_every steps, and at the end of every epoch (3 steps): a short run shows movement
    assert [e.step for e in events.Histograms("weights/fc1.weight")] == [0, 2, 3]


def test_exploding_loss_stops_with_status_3_and_a_summary(run_cli, tmp_path):
    result = run_cli([*TINY, "data.batch_size=8", "optim.lr=5"], tmp_path)
    assert result.returncode == 3, result.stdout
    assert "exploded" in result.stdout and "lower optim.lr" in result.stdout
    (summary,) = (tmp_path / "outputs").glob("*/*/summary.json")
    assert json.loads(summary.read_text())["status"] == "diverged"


def test_a_sweep_records_a_diverged_trial_and_goes_on(run_cli, tmp_path):
    result = run_cli(["-m", *TINY, "data.batch_size=8", "optim.lr=5,0.001"], tmp_path)
    assert result.returncode == 1, result.stdout  # the sweep goes on; at its end: failed trials, status 1
    assert "sweep: 1 of 2 trials failed" in result.stdout
    statuses = sorted(json.loads(p.read_text())["status"] for p in (tmp_path / "outputs").glob("sweep-*/*/summary.json"))
    assert statuses == ["completed", "diverged"]


def test_monitor_warns_about_a_dead_layer_and_summarizes_the_update_ratio(caplog):
    from types import SimpleNamespace

    from cvtrain.monitor import TrainingMonitor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every unit of layer 1 is dead
    logged = {}
    logger = SimpleNamespace(scalars=lambda values, step: logged.update(values))
    cfg = SimpleNamespace(monitor_every=1, histogram_every=0, explode_factor=3.0)
    monitor = TrainingMonitor(model, cfg, logger)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        monitor.before_forward(step)
        loss = model(torch.randn(16, 6)).logsumexp(1).mean()
        optimizer.zero_grad()
        loss.backward()
        monitor.before_step(step)
        optimizer.step()
        with caplog.at_level("WARNING", logger="cvtrain"):
            monitor.after_step(step, lr=0.1)
    assert logged["act/1/dead_fraction"] == 1.0
    warnings = [r.getMessage() for r in caplog.records if "dead ReLUs" in r.getMessage()]
    assert len(warnings) == 1 and "100% of the units of layer 1" in warnings[0]  # once, not at step 0
    assert "update_ratio/median" in logged
    assert monitor.summary()["update_ratio_log10"] == pytest.approx(sorted(monitor.median_ratios)[1], abs=1e-3)
