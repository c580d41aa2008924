"""check_config(cfg): every check of the composed config that needs no data, before any work starts.

Bad input is a one-line UserError that names the key, the bad value and what to do (README "Bad input").
The command line calls check_config before the task runs, so no run file exists yet; the checks of one
group live in cvtrain/checks.py, which the builders call too. Found only with the data: kNN's k against
the training set (tasks/knn.py), the image folder's layout and images (data/sources.py).
"""
import torch
from omegaconf import OmegaConf

from cvtrain import UserError
from cvtrain.checks import (check_averaging, check_data, check_loss, check_model_values, check_optim, check_sched,
                            check_top_level, check_types, config_value)
from cvtrain.config import check_arguments, named_choice
from cvtrain.device import resolve_device
from cvtrain.losses import LOSSES
from cvtrain.models.registry import check_model_options, model_builder, model_kind
from cvtrain.models.transfer import check_options as check_transfer_options, split_options as split_transfer_options
from cvtrain.optim import OPTIMIZERS, OWN_KEYS, SCHEDULES, check_lr_factor, check_scale_lr, snapshot_epochs
from cvtrain.trained import CHECKPOINT_TASKS


def _options(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def check_task_keys(cfg) -> None:
    """checkpoint= and inputs= only with the tasks that read them (a train run would ignore them)."""
    task = config_value(cfg.task, "name") if config_value(cfg, "task") is not None else None
    checkpoint, inputs = config_value(cfg, "checkpoint"), config_value(cfg, "inputs")
    if checkpoint is not None and task not in CHECKPOINT_TASKS:
        resume = " (to train on from a checkpoint: trainer.resume=<run dir>/checkpoints/last.pt)" if task == "train" else ""
        raise UserError(f"checkpoint={checkpoint} is read by task={', '.join(CHECKPOINT_TASKS)}, not by task={task}; "
                        f"add task=evaluate, predict or export, or drop it{resume}")
    if inputs is not None and task != "predict":
        raise UserError(f"inputs={_options(inputs) if OmegaConf.is_config(inputs) else inputs} is read by task=predict "
                        f"only, not by task={task}; add task=predict (with checkpoint=<run dir>), or drop inputs=")


def check_config(cfg) -> None:
    """Every check that needs no data, for the composed config: a UserError at the first problem.

    Call it before the task runs (no run files exist yet); the builders repeat their group's part."""
    check_top_level(cfg)
    check_task_keys(cfg)
    task = config_value(cfg.task, "name") if config_value(cfg, "task") is not None else None
    if config_value(cfg, "search") is not None and task != "search":  # configs/search/, search.*: task=search's
        raise UserError(f"search=<space> and search.* are read by task=search only, not by task={task}; add "
                        "task=search, or drop them")
    epochs = config_value(cfg.trainer, "epochs") if "trainer" in cfg else None
    if epochs is not None and epochs < 1:
        raise UserError(f"trainer.epochs={epochs}: train for at least 1 epoch")
    device = config_value(cfg.trainer, "device") if "trainer" in cfg else None
    if isinstance(device, str):
        resolve_device(device)  # a device this machine does not have
    if isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit():
        count = torch.cuda.device_count()
        if torch.cuda.is_available() and int(device[5:]) >= count:
            raise UserError(f"trainer.device={device}: this machine has {count} CUDA device(s), cuda:0 to "
                            f"cuda:{count - 1}; use one of them, or trainer.device=auto")
    if "data" in cfg:
        check_data(cfg.data)
    if config_value(cfg, "optim") is not None:
        name, cls, options = named_choice("optim", cfg.optim, OPTIMIZERS)
        check_scale_lr(options.get("scale_lr", "none"))
        check_lr_factor("head_lr_mult", options.get("head_lr_mult", 1.0), "the lr factor of the head")
        for key in OWN_KEYS:  # decay_norm_and_bias, norm_and_bias_lr_scale, scale_lr: build_optimizer checks them
            options.pop(key, None)
        check_arguments("optim", name, cls, options, passed=("params",), own=OWN_KEYS)
        check_types("optim", name, options, cls)
        check_optim(name, options)
    if config_value(cfg, "sched") is not None:
        name, factory, options = named_choice("sched", cfg.sched, SCHEDULES)
        check_arguments("sched", name, factory, options, passed=("optimizer", "epochs", "steps_per_epoch"))
        check_types("sched", name, options, factory)
        check_sched(name, options, epochs, warn=False)  # build_scheduler warns
    if "trainer" in cfg:
        check_averaging(cfg.trainer)  # trainer.ema, select, keep_snapshots
        if config_value(cfg, "sched") is not None and epochs is not None:
            snapshot_epochs(cfg.sched, epochs, config_value(cfg.trainer, "keep_snapshots", 0))
    if config_value(cfg, "loss") is not None:
        name, cls, options = named_choice("loss", cfg.loss, LOSSES)
        check_arguments("loss", name, cls, options, passed=("squared",))
        check_types("loss", name, options, cls)
        check_loss(name, options)
    if config_value(cfg, "model") is not None:
        options = _options(cfg.model)
        name = options.pop("name", None)
        model_kind(name)  # an unknown name lists the registered models
        check_types("model", name, options, model_builder(name))
        check_transfer_options(name, split_transfer_options(options))  # model.pretrained, model.freeze
        own = {} if model_kind(name) == "fitted" else {k: options.pop(k) for k in ("init", "bias_init") if k in options}
        check_model_options(name, options)
        check_model_values(name, {**options, **own})
