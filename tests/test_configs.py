"""Every config group option composes and builds; typed groups reject typos; schedules have the right shape."""
import importlib.resources
import math

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from cvtrain import UserError
from cvtrain.optim import Schedule, build_optimizer, build_scheduler
from cvtrain.train import build_model

CONFIG_DIR = importlib.resources.files("cvtrain.configs")
GROUPS = sorted(d.name for d in CONFIG_DIR.iterdir() if d.is_dir() and not d.name.startswith("__"))
OPTIONS = {group: sorted(f.name.removesuffix(".yaml") for f in (CONFIG_DIR / group).iterdir()
                         if f.name.endswith(".yaml"))
           for group in GROUPS}
GEOMETRIES = [(1, 28, 28), (3, 32, 32)]
NOT_MODULES = {"knn"}  # non-parametric models: no nn.Module, train() runs them apart


def options_of(*groups):
    return [pytest.param(group, option, id=f"{group}={option}") for group in groups for option in OPTIONS[group]]


def load_option(group, option):
    """The option's own YAML: (is it a `@package _global_` preset, its defaults list, the rest of its keys)."""
    path = CONFIG_DIR / group / f"{option}.yaml"
    node = OmegaConf.load(str(path))
    defaults = node.pop("defaults", [])
    return "@package _global_" in path.read_text(), list(defaults), node


def leaves(node, prefix=""):
    """(dotted key, value) of every non-dict value of a nested dict."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_groups_are_all_covered():
    assert {"data", "model", "loss", "optim", "sched", "aug", "trainer", "experiment"} <= set(GROUPS)
    assert all(OPTIONS[group] for group in GROUPS), OPTIONS


@pytest.mark.parametrize("group,option", options_of(*GROUPS))
def test_option_composes_with_its_values(compose_config, group, option):
    """Selecting GROUP=OPTION gives the option's values; a preset (experiment, model=svm, ...)
    also gives exactly the group options its defaults list picks."""
    cfg = compose_config([f"{group}={option}"])
    preset, defaults, own = load_option(group, option)
    own = OmegaConf.to_container(own)
    if preset:
        for entry in defaults:  # {"override /data": "cifar10"}
            ((key, choice),) = entry.items()
            other = key.removeprefix("override").strip().lstrip("/")
            expected = OmegaConf.merge(compose_config([f"{other}={choice}"])[other], own.get(other, {}))
            assert cfg[other] == expected, f"{group}={option} should pick {other}={choice}"
    node = cfg if preset else cfg[group]
    for key, value in leaves(own):
        if value == "???":
            continue  # a required value: nothing to compare
        composed = OmegaConf.select(node, key)
        assert (OmegaConf.to_container(composed) if OmegaConf.is_config(composed) else composed) == value, key


@pytest.mark.parametrize("shape", GEOMETRIES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("group,option", options_of("model"))
def test_model_builds_and_runs_forward(compose_config, group, option, shape):
    cfg = compose_config([f"model={option}"])
    if cfg.model.name in NOT_MODULES:
        pytest.skip(f"model.name={cfg.model.name} is not an nn.Module")
    model = build_model(cfg, shape, num_classes=7)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(5, *shape))
    assert out.shape == (5, 7)
    assert torch.isfinite(out).all()


def test_model_builder_rejects_unknown_option(compose_config):
    cfg = compose_config(["model=linear", "+model.depth=3"])
    with pytest.raises(UserError, match="depth"):
        build_model(cfg, (1, 28, 28), 10)


@pytest.mark.parametrize("group,option", options_of("optim"))
def test_optimizer_builds_and_steps(compose_config, group, option):
    cfg = compose_config([f"optim={option}"])
    model = build_model(compose_config(["model=linear"]), (1, 28, 28), 10)
    optimizer = build_optimizer(cfg.optim, model)
    assert type(optimizer).__name__.lower() == {"momentum": "sgd", "nesterov": "sgd"}.get(option, option)
    assert optimizer.param_groups[0]["lr"] == cfg.optim.lr
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 1, 28, 28)).logsumexp(1).mean().backward()
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("group,option", options_of("sched"))
def test_scheduler_builds(compose_config, group, option):
    cfg = compose_config([f"sched={option}"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = build_scheduler(cfg.sched, optimizer, epochs=3, steps_per_epoch=4)
    assert isinstance(scheduler, Schedule)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    for _ in range(4):
        optimizer.step()
        scheduler.step_batch()
    scheduler.step_epoch(val_loss=1.0, val_acc=0.5)
    assert 0 < optimizer.param_groups[0]["lr"] <= 0.1


# --- typed groups reject mistakes ------------------------------------------------------

def test_misspelled_key_in_typed_group_is_rejected(compose_config):
    with pytest.raises((ConfigCompositionException, ConfigKeyError), match="epoch"):
        compose_config(["trainer.epoch=3"])


def test_wrong_type_in_typed_group_is_rejected(compose_config):
    with pytest.raises((ConfigCompositionException, ValidationError), match="trainer.epochs"):
        compose_config(["trainer.epochs=abc"])


def test_misspelled_key_in_untyped_group_is_rejected(compose_config):
    with pytest.raises((ConfigCompositionException, ConfigKeyError), match="hidden_size"):
        compose_config(["model=mlp", "model.hidden_size=[64]"])


# --- learning-rate schedules -----------------------------------------------------------

LR, EPOCHS, STEPS = 0.1, 3, 4
TOTAL = EPOCHS * STEPS


def lr_trace(compose_config, overrides):
    """The lr each of the run's optimizer steps uses, and the lr after the last one."""
    cfg = compose_config(overrides)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = build_scheduler(cfg.sched, optimizer, epochs=EPOCHS, steps_per_epoch=STEPS)
    used = []
    for step in range(TOTAL):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step_batch()
        if (step + 1) % STEPS == 0:
            scheduler.step_epoch(val_loss=1.0, val_acc=0.5)
    return used, optimizer.param_groups[0]["lr"]


def test_constant_schedule_is_constant(compose_config):
    used, final = lr_trace(compose_config, ["sched=constant"])
    assert used == pytest.approx([LR] * TOTAL)
    assert final == pytest.approx(LR)


def test_cosine_schedule_decays_from_lr_to_zero(compose_config):
    used, final = lr_trace(compose_config, ["sched=cosine"])
    assert used[0] == pytest.approx(LR)
    assert used == pytest.approx([LR * 0.5 * (1 + math.cos(math.pi * s / TOTAL)) for s in range(TOTAL)])
    assert used[TOTAL // 2] == pytest.approx(LR / 2)
    assert all(a > b for a, b in zip(used, used[1:]))
    assert final == pytest.approx(0.0, abs=1e-12)


def test_cosine_schedule_floor(compose_config):
    used, final = lr_trace(compose_config, ["sched=cosine", "sched.min_lr_ratio=0.1"])
    assert used[0] == pytest.approx(LR)
    assert min(used) > 0.1 * LR
    assert final == pytest.approx(0.1 * LR)


def test_constant_schedule_warmup_ramps_linearly(compose_config):
    used, _ = lr_trace(compose_config, ["sched=constant", "sched.warmup_epochs=1"])
    assert used[:STEPS] == pytest.approx([LR * (s + 1) / STEPS for s in range(STEPS)])
    assert used[STEPS:] == pytest.approx([LR] * (TOTAL - STEPS))


def test_cosine_schedule_warmup_then_decay(compose_config):
    used, final = lr_trace(compose_config, ["sched=cosine", "sched.warmup_epochs=1"])
    assert used[:STEPS] == pytest.approx([LR * (s + 1) / STEPS for s in range(STEPS)])
    span = TOTAL - STEPS
    assert used[STEPS:] == pytest.approx(
        [LR * 0.5 * (1 + math.cos(math.pi * s / span)) for s in range(span)])
    assert final == pytest.approx(0.0, abs=1e-12)
