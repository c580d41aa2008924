"""Command line: python -m cvtrain [GROUP=OPTION ...] [KEY=VALUE ...] (also the `cvtrain` script)."""
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from cvtrain import TrainingDiverged, UserError
from cvtrain.config import register_configs

log = logging.getLogger("cvtrain")
register_configs()


def run_train(cfg: DictConfig):
    from cvtrain.train import train

    hydra_cfg = HydraConfig.get()
    choices = {group: str(choice) for group, choice in hydra_cfg.runtime.choices.items()
               if not group.startswith("hydra") and group != "trainer"}
    return train(cfg, Path(hydra_cfg.runtime.output_dir), choices)


def run_summary(cfg: DictConfig):
    from cvtrain.summary import model_summary

    print(model_summary(cfg))


def run_augviz(cfg: DictConfig):
    from cvtrain.augviz import augviz
    from cvtrain.train import resolve_device

    hydra_cfg = HydraConfig.get()
    png = augviz(cfg, Path(hydra_cfg.runtime.output_dir), str(hydra_cfg.runtime.choices.get("aug", "custom")),
                 resolve_device(cfg.trainer.device))
    print(png)


def run_sanity(cfg: DictConfig):
    from cvtrain.diagnostics import sanity_task

    if not sanity_task(cfg):
        sys.exit(1)


def run_gradcheck(cfg: DictConfig):
    from cvtrain.diagnostics import gradcheck_task

    if not gradcheck_task(cfg):
        sys.exit(1)


def run_lr_find(cfg: DictConfig):
    from cvtrain.lr_find import lr_find_task

    lr_find_task(cfg, Path(HydraConfig.get().runtime.output_dir))  # prints; last line suggested_lr=<lr>


TASKS = {"train": run_train, "summary": run_summary, "augviz": run_augviz, "sanity": run_sanity,
         "gradcheck": run_gradcheck, "lr_find": run_lr_find}


@hydra.main(version_base="1.3", config_path="pkg://cvtrain.configs", config_name="config")
def main(cfg: DictConfig):
    try:
        if cfg.task not in TASKS:
            raise UserError(f"task={cfg.task} is unknown; choose one of {', '.join(TASKS)}")
        return TASKS[cfg.task](cfg)
    except UserError as err:
        log.error("error: %s", err)
        sys.exit(2)
    except TrainingDiverged as err:
        log.error("training diverged: %s (summary.json has status 'diverged')", err)
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            sys.exit(3)
        return None  # in a sweep: record the trial as diverged and go on with the next one


if __name__ == "__main__":
    main()
