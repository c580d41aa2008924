"""Command line: python -m cvtrain [GROUP=OPTION ...] [KEY=VALUE ...] (also the `cvtrain` script)."""
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cvtrain import UserError
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


TASKS = {"train": run_train, "summary": run_summary}


@hydra.main(version_base="1.3", config_path="pkg://cvtrain.configs", config_name="config")
def main(cfg: DictConfig):
    try:
        if cfg.task not in TASKS:
            raise UserError(f"task={cfg.task} is unknown; choose one of {', '.join(TASKS)}")
        return TASKS[cfg.task](cfg)
    except UserError as err:
        log.error("error: %s", err)
        sys.exit(2)


if __name__ == "__main__":
    main()
