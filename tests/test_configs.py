"""Every config group option composes and builds; the groups follow one convention (`name:` picks,
typed schemas hold every default once, no `_target_`); typed groups reject typos; schedules have
the right shape."""
import dataclasses
import importlib.resources
import math

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from cvtrain import UserError
from cvtrain.config import AugConfig, DataConfig, RegConfig, TrainerConfig
from cvtrain.losses import LOSSES, build_loss
from cvtrain.models import build_model, list_models, model_kind
from cvtrain.optim import OPTIMIZERS, SCHEDULES, Schedule, build_optimizer, build_scheduler

CONFIG_DIR = importlib.resources.files("cvtrain.configs")
# cvtrain's groups; hydra/ holds options of Hydra's own groups (hydra/launcher/slurm.yaml)
GROUPS = sorted(d.name for d in CONFIG_DIR.iterdir()
                if d.is_dir() and not d.name.startswith("__") and d.name != "hydra")
OPTIONS = {group: sorted(f.name.removesuffix(".yaml") for f in (CONFIG_DIR / group).iterdir()
                         if f.name.endswith(".yaml"))
           for group in GROUPS}
GEOMETRIES = [(1, 28, 28), (3, 32, 32)]
CHOICE_GROUPS = ("model", "loss", "optim", "sched", "data")  # `name:` picks one of several things
SCHEMAS = {"data": DataConfig, "aug": AugConfig, "reg": RegConfig, "trainer": TrainerConfig}  # typed settings


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


# --- one convention ------------------------------------------------------------------------------

def config_files():
    """Every YAML file under configs/, at any depth."""
    def walk(node):
        for child in node.iterdir():
            if child.is_dir():
                yield from walk(child)
            elif child.name.endswith(".yaml"):
                yield child
    return sorted(walk(CONFIG_DIR), key=str)


def test_no_config_has_a_target():
    """Nothing is instantiated by Hydra: no `_target_` (nor `_partial_`) anywhere under configs/."""
    files = config_files()
    assert len(files) > 20
    offenders = [str(f) for f in files if "_target_" in f.read_text() or "_partial_" in f.read_text()]
    assert not offenders


REGISTRIES = {"loss": LOSSES, "optim": OPTIMIZERS, "sched": SCHEDULES}


@pytest.mark.parametrize("group,option", options_of(*CHOICE_GROUPS))
def test_choice_option_names_what_it_picks(group, option):
    preset, _, own = load_option(group, option)
    own = own[group] if preset else own  # model=svm: `@package _global_`, its model node under model:
    assert "name" in own, f"{group}/{option}.yaml has no name:"
    known = list_models() if group == "model" else REGISTRIES.get(group)
    if known is not None:
        assert own.name in known


@pytest.mark.parametrize("group,option", options_of(*SCHEMAS))
def test_option_sets_only_what_differs_from_the_schema(group, option):
    """One copy of every default: the schema's. An option file of a typed group sets a key only to
    change it, and every key it sets is a schema field."""
    _, defaults, own = load_option(group, option)
    assert not defaults, f"{group}/{option}.yaml: the schema is the base, no defaults list needed"
    schema = OmegaConf.to_container(OmegaConf.structured(SCHEMAS[group]))  # a required field: "???"
    for key, value in OmegaConf.to_container(own).items():
        assert key in schema, f"{group}.{key} is not a field of {SCHEMAS[group].__name__}"
        assert schema[key] != value, f"{group}/{option}.yaml repeats the schema's default {group}.{key}={value}"


@pytest.mark.parametrize("group", ["aug", "reg", "trainer"])
def test_default_options_are_the_schema(compose_config, group):
    """aug=none, reg=none and trainer=default add nothing to their schema."""
    default = {"aug": "none", "reg": "none", "trainer": "default"}[group]
    assert compose_config([f"{group}={default}"])[group] == OmegaConf.structured(SCHEMAS[group])


def test_every_data_option_sets_its_source():
    assert dataclasses.fields(DataConfig)[0].name == "name"
    assert OmegaConf.is_missing(OmegaConf.structured(DataConfig), "name")
    for option in OPTIONS["data"]:
        assert load_option("data", option)[2].name == option


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
    if model_kind(cfg.model.name) == "fitted":
        pytest.skip(f"model.name={cfg.model.name} is not an nn.Module")
    model = build_model(cfg.model, shape, num_classes=7)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(5, *shape))
    assert out.shape == (5, 7)
    assert torch.isfinite(out).all()


def test_model_builder_rejects_unknown_option(compose_config):
    cfg = compose_config(["model=linear", "+model.depth=3"])
    with pytest.raises(UserError, match="depth"):
        build_model(cfg.model, (1, 28, 28), 10)


@pytest.mark.parametrize("group,option", options_of("optim"))
def test_optimizer_builds_and_steps(compose_config, group, option):
    cfg = compose_config([f"optim={option}"])
    model = build_model(compose_config(["model=linear"]).model, (1, 28, 28), 10)
    optimizer = build_optimizer(cfg.optim, model)
    assert type(optimizer) is OPTIMIZERS[cfg.optim.name]
    assert cfg.optim.name == {"momentum": "sgd", "nesterov": "sgd"}.get(option, option)
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
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * cfg.sched.get("start", 1.0))  # triangle: start
    for _ in range(4):
        optimizer.step()
        scheduler.step_batch()
    scheduler.step_epoch(val_loss=1.0, val_acc=0.5)
    assert 0 < optimizer.param_groups[0]["lr"] <= 0.1


@pytest.mark.parametrize("group,option", options_of("loss"))
def test_loss_builds(compose_config, group, option):
    loss = build_loss(compose_config([f"loss={option}"]).loss)
    value = loss(torch.randn(4, 3, requires_grad=True), torch.tensor([0, 1, 2, 0]))
    assert value.shape == () and torch.isfinite(value)


# --- `name:` groups reject what their target does not take -------------------------------------

def a_model():
    return torch.nn.Linear(2, 2)


def an_optimizer():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)


@pytest.mark.parametrize("build,override,match", [
    (lambda cfg: build_optimizer(cfg.optim, a_model()), "+optim.momentun=0.9",
     r"optim.momentun: not an argument of optim=adam; its keys are lr, betas, .*decay_norm_and_bias"),
    (lambda cfg: build_scheduler(cfg.sched, an_optimizer(), 3, 4), "+sched.gamma=0.1",
     r"sched.gamma: not an argument of sched=cosine; its keys are warmup_epochs, min_lr_ratio, interval$"),
    (lambda cfg: build_loss(cfg.loss), "+loss.margin=1.0",
     r"loss.margin: not an argument of loss=cross_entropy; its keys are .*label_smoothing"),
], ids=["optim", "sched", "loss"])
def test_unknown_key_is_a_user_error_naming_the_valid_ones(compose_config, build, override, match):
    with pytest.raises(UserError, match=match):
        build(compose_config([override]))


@pytest.mark.parametrize("build,group,registry", [
    (lambda node: build_optimizer(node, a_model()), "optim", OPTIMIZERS),
    (lambda node: build_scheduler(node, an_optimizer(), 3, 4), "sched", SCHEDULES),
    (build_loss, "loss", LOSSES),
], ids=["optim", "sched", "loss"])
def test_unknown_name_is_a_user_error_listing_the_names(compose_config, build, group, registry):
    node = compose_config([])[group]
    node.name = "nadam"
    with pytest.raises(UserError, match=f"{group}.name=nadam is unknown; choose one of {', '.join(registry)}$"):
        build(node)


def test_missing_argument_is_a_user_error(compose_config):
    with pytest.raises(UserError, match="sched=step needs sched.every_epochs"):
        build_scheduler(compose_config(["sched=step", "~sched.every_epochs"]).sched, an_optimizer(), 3, 4)
    with pytest.raises(UserError, match="optim=sgd needs optim.decay_norm_and_bias"):
        build_optimizer(compose_config(["optim=sgd", "~optim.decay_norm_and_bias"]).optim, a_model())


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
