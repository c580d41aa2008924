"""Learning-rate schedules: each sched= config's lr sequence against its formula (and torch's own
scheduler where there is one), per-step and per-epoch intervals, warmup, reduce-on-plateau, and
a state_dict round trip in the middle of a run.

The schedules are driven as train() drives them: step_batch() after every optimizer step,
step_epoch(val_loss, val_acc) after every epoch.
"""
import importlib.resources
import io
import math

import pytest
import torch

from cvtrain import UserError
from cvtrain.optim import build_scheduler

LR, EPOCHS, STEPS = 0.1, 8, 3  # STEPS: optimizer steps per epoch
TOTAL = EPOCHS * STEPS
SCHED_OPTIONS = sorted(f.name.removesuffix(".yaml") for f in (importlib.resources.files("cvtrain.configs") / "sched")
                       .iterdir() if f.name.endswith(".yaml"))
# val (loss, acc) per epoch: improves, stalls, improves, stalls long
METRICS = [(1.0, 0.5), (0.8, 0.6), (0.8, 0.6), (0.85, 0.55), (0.9, 0.6), (0.7, 0.7), (0.75, 0.7), (0.75, 0.65),
           (0.76, 0.7), (0.8, 0.7), (0.8, 0.7), (0.8, 0.7)]
# a few small values per schedule, so that the short test runs see several changes of the lr
SMALL = {"step": ["sched.every_epochs=2"], "multistep": ["sched.milestones=[2,5]"], "exponential": ["sched.k=0.3"],
         "inverse_time": ["sched.k=0.5"], "plateau": ["sched.patience=1"]}


def build(compose_config, overrides, epochs=EPOCHS, lr=LR):
    cfg = compose_config(overrides)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    return optimizer, build_scheduler(cfg.sched, optimizer, epochs=epochs, steps_per_epoch=STEPS)


def drive(optimizer, scheduler, stop, start=0, metrics=METRICS):
    """Steps start..stop-1 of a run as train() takes them; the lr each of them used."""
    used = []
    for step in range(start, stop):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step_batch()
        if (step + 1) % STEPS == 0:
            scheduler.step_epoch(*metrics[step // STEPS])
    return used


def trace(compose_config, overrides, epochs=EPOCHS):
    optimizer, scheduler = build(compose_config, overrides, epochs)
    return drive(optimizer, scheduler, epochs * STEPS)


def per_step(per_epoch):
    """An lr per epoch as the lr of each step."""
    return [lr for lr in per_epoch for _ in range(STEPS)]


def torch_per_epoch(make, epochs=EPOCHS, metrics=None):
    """The lr of each epoch with torch's scheduler `make(optimizer)`, stepped once per epoch."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler, lrs = make(optimizer), []
    for epoch in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step(*([metrics[epoch]] if metrics else []))
    return lrs


def at_steps(fn):
    """fn(t) at each step's time in epochs, t = step / STEPS (interval: step)."""
    return [fn(s / STEPS) for s in range(TOTAL)]


def at_epochs(fn):
    """fn(e) at each step's epoch (interval: epoch)."""
    return per_step([fn(e) for e in range(EPOCHS)])


# --- each schedule against its formula ----------------------------------------------------------

@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_constant(compose_config, interval):
    assert trace(compose_config, ["sched=constant", f"sched.interval={interval}"]) == pytest.approx([LR] * TOTAL)


def test_step_decay(compose_config):
    step = ["sched=step", "sched.every_epochs=3", "sched.factor=0.5"]
    expected = at_epochs(lambda e: LR * 0.5 ** (e // 3))
    assert trace(compose_config, [*step, "sched.interval=epoch"]) == pytest.approx(expected)
    assert trace(compose_config, [*step, "sched.interval=step"]) == pytest.approx(expected)  # drops at epoch 3, 6
    torch_lrs = torch_per_epoch(lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5))
    assert expected == pytest.approx(per_step(torch_lrs))


def test_step_decay_every_fractional_epochs(compose_config):
    used = trace(compose_config, ["sched=step", "sched.every_epochs=1.5", "sched.factor=0.5", "sched.interval=step"])
    assert used == pytest.approx(at_steps(lambda t: LR * 0.5 ** math.floor(t / 1.5 + 1e-9)))
    assert used[4] == pytest.approx(LR) and used[5] == pytest.approx(LR / 2)  # t = 1.5 at step 4.5


def test_multistep(compose_config):
    multistep = ["sched=multistep", "sched.milestones=[2,5]", "sched.factor=0.1"]
    expected = at_epochs(lambda e: LR * 0.1 ** ((e >= 2) + (e >= 5)))
    assert trace(compose_config, [*multistep, "sched.interval=epoch"]) == pytest.approx(expected)
    assert trace(compose_config, [*multistep, "sched.interval=step"]) == pytest.approx(expected)
    torch_lrs = torch_per_epoch(lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 5], gamma=0.1))
    assert expected == pytest.approx(per_step(torch_lrs))


def test_exponential(compose_config):
    exponential = ["sched=exponential", "sched.k=0.3"]
    assert trace(compose_config, [*exponential, "sched.interval=step"]) == pytest.approx(
        at_steps(lambda t: LR * math.exp(-0.3 * t)))
    by_epoch = trace(compose_config, [*exponential, "sched.interval=epoch"])
    assert by_epoch == pytest.approx(at_epochs(lambda e: LR * math.exp(-0.3 * e)))
    torch_lrs = torch_per_epoch(lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=math.exp(-0.3)))
    assert by_epoch == pytest.approx(per_step(torch_lrs))


def test_inverse_time(compose_config):
    inverse = ["sched=inverse_time", "sched.k=0.5"]
    assert trace(compose_config, [*inverse, "sched.interval=step"]) == pytest.approx(
        at_steps(lambda t: LR / (1 + 0.5 * t)))
    assert trace(compose_config, [*inverse, "sched.interval=epoch"]) == pytest.approx(
        at_epochs(lambda e: LR / (1 + 0.5 * e)))


def test_cosine(compose_config):
    cosine = ["sched=cosine", "sched.min_lr_ratio=0.1"]
    formula = lambda t: LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / EPOCHS)))  # noqa: E731
    assert trace(compose_config, [*cosine, "sched.interval=step"]) == pytest.approx(at_steps(formula))
    by_epoch = trace(compose_config, [*cosine, "sched.interval=epoch"])
    assert by_epoch == pytest.approx(at_epochs(formula))
    torch_lrs = torch_per_epoch(lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS, eta_min=0.1 * LR))
    assert by_epoch == pytest.approx(per_step(torch_lrs))


@pytest.mark.parametrize("option", ["exponential", "inverse_time", "cosine", "step"])
def test_rates_are_per_epoch_whatever_the_interval(compose_config, option):
    """At the first step of every epoch, interval=step and interval=epoch give the same lr."""
    by_step = trace(compose_config, [f"sched={option}", *SMALL.get(option, []), "sched.interval=step"])
    by_epoch = trace(compose_config, [f"sched={option}", *SMALL.get(option, []), "sched.interval=epoch"])
    assert by_step[::STEPS] == pytest.approx(by_epoch[::STEPS])
    assert by_step != pytest.approx(by_epoch) or option == "step"


@pytest.mark.parametrize("option", SCHED_OPTIONS)
def test_interval_epoch_changes_the_lr_only_at_epoch_boundaries(compose_config, option):
    used = trace(compose_config, [f"sched={option}", *SMALL.get(option, []), "sched.interval=epoch"])
    per_epoch = [used[e * STEPS:(e + 1) * STEPS] for e in range(EPOCHS)]
    assert all(lrs == [lrs[0]] * STEPS for lrs in per_epoch), per_epoch
    assert option == "constant" or len({lrs[0] for lrs in per_epoch}) > 1


# --- warmup, composed with the decays ------------------------------------------------------------

WARMUP = [LR * (s + 1) / (2 * STEPS) for s in range(2 * STEPS)]  # 2 epochs of linear warmup, per step


@pytest.mark.parametrize("option,decay", [
    ("constant", lambda t: 1.0),
    ("step", lambda t: 0.5 ** math.floor(t / 2 + 1e-9)),
    ("exponential", lambda t: math.exp(-0.3 * t)),
    ("cosine", lambda t: 0.5 * (1 + math.cos(math.pi * t / (EPOCHS - 2)))),
    ("plateau", lambda t: 1.0 if t < 3 else 0.1),  # METRICS: the third epoch in a row without a new best is epoch 5
])
def test_warmup_then_decay_from_the_end_of_warmup(compose_config, option, decay):
    overrides = [f"sched={option}", "sched.warmup_epochs=2", "sched.interval=step"]
    overrides += {"step": ["sched.every_epochs=2", "sched.factor=0.5"], "exponential": ["sched.k=0.3"]}.get(option, [])
    used = trace(compose_config, overrides)
    assert used == pytest.approx(WARMUP + [LR * decay(s / STEPS) for s in range(TOTAL - 2 * STEPS)])


def test_fractional_warmup_per_step(compose_config):
    used = trace(compose_config, ["sched=exponential", "sched.k=0.3", "sched.warmup_epochs=0.5"])
    warmup = round(0.5 * STEPS)  # 2 steps
    assert used[:warmup] == pytest.approx([LR * (s + 1) / warmup for s in range(warmup)])
    assert used[warmup:] == pytest.approx([LR * math.exp(-0.3 * s / STEPS) for s in range(TOTAL - warmup)])


def test_warmup_per_epoch(compose_config):
    used = trace(compose_config, ["sched=exponential", "sched.k=0.3", "sched.warmup_epochs=2", "sched.interval=epoch"])
    assert used == pytest.approx(per_step([LR / 2, LR] + [LR * math.exp(-0.3 * e) for e in range(EPOCHS - 2)]))


def test_warmup_per_epoch_takes_whole_epochs(compose_config):
    with pytest.raises(UserError, match="warmup_epochs"):
        build(compose_config, ["sched=cosine", "sched.warmup_epochs=0.5", "sched.interval=epoch"])


def test_unknown_interval_or_monitor_is_a_user_error(compose_config):
    with pytest.raises(UserError, match="sched.interval"):
        build(compose_config, ["sched=cosine", "sched.interval=iteration"])
    with pytest.raises(UserError, match="sched.monitor"):
        build(compose_config, ["sched=plateau", "sched.monitor=train_loss"])


# --- reduce on plateau ----------------------------------------------------------------------------

def test_plateau_reduces_after_patience_epochs_without_improvement(compose_config):
    """val loss 1.0, 0.8, then 0.8 / 0.85 / 0.9: not better. patience=2 tolerates two such epochs;
    the third (epoch 5) drops the lr, from epoch 6 on."""
    used = trace(compose_config, ["sched=plateau", "sched.patience=2", "sched.factor=0.1"], epochs=6)
    assert used == pytest.approx(per_step([LR] * 5 + [LR * 0.1]))


def test_plateau_on_val_acc_watches_for_a_maximum(compose_config):
    """val acc 0.5, 0.6 (best), 0.6, 0.55, 0.6: no new best, drop after epoch 5; 0.7 (best), 0.7, 0.65, 0.7:
    drop after epoch 9."""
    used = trace(compose_config, ["sched=plateau", "sched.monitor=val_acc", "sched.patience=2",
                                  "sched.factor=0.5", "sched.interval=epoch"], epochs=10)
    assert used == pytest.approx(per_step([LR] * 5 + [LR / 2] * 4 + [LR / 4]))


@pytest.mark.parametrize("monitor,mode", [("val_loss", "min"), ("val_acc", "max")])
@pytest.mark.parametrize("patience,cooldown,min_lr_ratio", [(0, 0, 0.0), (2, 1, 0.0), (1, 2, 0.05)])
def test_plateau_agrees_with_torch(compose_config, monitor, mode, patience, cooldown, min_lr_ratio):
    """60 epochs of a noisy, rounded (so ties happen) metric: the same lr as torch's ReduceLROnPlateau
    (with eps=0: torch's default skips reductions smaller than 1e-8, which patience=0 reaches here)."""
    epochs = 60
    gen = torch.Generator().manual_seed(patience * 10 + cooldown)
    trend = torch.linspace(2.0, 0.5, epochs) + 0.3 * torch.rand(epochs, generator=gen)
    values = [round(v, 1) for v in trend.tolist()]
    metrics = [(v, 1 - v / 3) for v in values]
    watched = [m[0] if monitor == "val_loss" else m[1] for m in metrics]

    optimizer, scheduler = build(compose_config, [
        "sched=plateau", f"sched.monitor={monitor}", f"sched.patience={patience}", f"sched.cooldown={cooldown}",
        f"sched.min_lr_ratio={min_lr_ratio}", "sched.factor=0.5", "sched.threshold=0.01"], epochs=epochs)
    used = drive(optimizer, scheduler, epochs * STEPS, metrics=metrics)
    torch_lrs = torch_per_epoch(lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode=mode, factor=0.5, patience=patience, threshold=0.01, cooldown=cooldown,
        min_lr=min_lr_ratio * LR, eps=0.0), epochs=epochs, metrics=watched)
    assert used == pytest.approx(per_step(torch_lrs))
    assert len(set(torch_lrs)) > 2  # several reductions happened


# --- state_dict round trip --------------------------------------------------------------------------

def saved_and_loaded(state):
    """Through torch.save / torch.load(weights_only=True), as checkpoints are."""
    buffer = io.BytesIO()
    torch.save({"scheduler": state}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)["scheduler"]


@pytest.mark.parametrize("stop", [STEPS + 1, 3 * STEPS, 4 * STEPS + 1], ids=["in_warmup", "epoch_end", "mid_epoch"])
@pytest.mark.parametrize("interval", ["step", "epoch"])
@pytest.mark.parametrize("option", SCHED_OPTIONS)
def test_state_dict_round_trip_reproduces_the_rest_of_the_run(compose_config, option, interval, stop):
    overrides = [f"sched={option}", *SMALL.get(option, []), f"sched.interval={interval}", "sched.warmup_epochs=2"]
    full = trace(compose_config, overrides)

    optimizer, scheduler = build(compose_config, overrides)
    first = drive(optimizer, scheduler, stop)
    state = saved_and_loaded(scheduler.state_dict())
    optimizer, scheduler = build(compose_config, overrides)  # a fresh run, as on resume
    scheduler.load_state_dict(state)
    rest = drive(optimizer, scheduler, TOTAL, start=stop)
    assert first + rest == pytest.approx(full)
    assert len(set(full)) > 1  # the lr changes during the run


def test_loaded_state_follows_this_runs_lr_and_length(compose_config):
    """Resume semantics: the saved counters, this run's optim.lr and trainer.epochs (cosine stretches)."""
    optimizer, scheduler = build(compose_config, ["sched=cosine"], epochs=4)
    drive(optimizer, scheduler, 2 * STEPS)
    optimizer, longer = build(compose_config, ["sched=cosine"], epochs=EPOCHS, lr=0.01)
    longer.load_state_dict(saved_and_loaded(scheduler.state_dict()))
    rest = drive(optimizer, longer, TOTAL, start=2 * STEPS)
    assert rest == pytest.approx([0.01 * 0.5 * (1 + math.cos(math.pi * s / TOTAL)) for s in range(2 * STEPS, TOTAL)])


def test_plateau_state_survives_the_round_trip(compose_config):
    optimizer, scheduler = build(compose_config, ["sched=plateau", "sched.patience=2"])
    drive(optimizer, scheduler, 5 * STEPS)
    state = saved_and_loaded(scheduler.state_dict())
    assert state["plateau"]["scale"] == pytest.approx(0.1) and state["plateau"]["best"] == 0.8


def test_state_of_a_lambda_lr_checkpoint_continues_at_its_step(compose_config):
    """Checkpoints from before the Schedule class hold a LambdaLR state, stepped every iteration."""
    optimizer, scheduler = build(compose_config, ["sched=cosine"])
    scheduler.load_state_dict({"last_epoch": 2 * STEPS, "base_lrs": [LR], "_step_count": 2 * STEPS + 1,
                               "lr_lambdas": [None]})
    rest = drive(optimizer, scheduler, TOTAL, start=2 * STEPS)
    assert rest == pytest.approx(trace(compose_config, ["sched=cosine"])[2 * STEPS:])


def test_triangle_rises_from_start_to_the_peak_then_falls_to_end(compose_config):
    used = trace(compose_config, ["sched=triangle", "sched.start=0.2", "sched.peak_at=0.25", "sched.end=0.1"])
    peak = round(0.25 * TOTAL)
    assert used[0] == pytest.approx(0.2 * LR)
    assert max(used) == pytest.approx(LR) and used.index(max(used)) == peak
    assert used[peak // 2] == pytest.approx(LR * (0.2 + 0.8 * (peak // 2) / peak))
    assert all(a >= b for a, b in zip(used[peak:], used[peak + 1:]))  # straight down after the peak
    assert used[-1] == pytest.approx(LR * (1 - 0.9 * (TOTAL - 1 - peak) / (TOTAL - peak)))


def test_triangle_checks_its_values(compose_config):
    with pytest.raises(UserError, match="sched.peak_at=1.5"):
        build(compose_config, ["sched=triangle", "sched.peak_at=1.5"])
