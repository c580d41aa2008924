"""Command line: python -m cvtrain [GROUP=OPTION ...] [KEY=VALUE ...] (also the `cvtrain` script).

    command line -> Hydra composes the config (configs/, schemas in config.py) -> the run dir
    -> TASKS[task.name](cfg, run_dir) -> its objective, returned to Hydra (a sweeper optimizes it)

Errors map to exit statuses: 2 bad input (UserError), 1 a failed check (ChecksFailed),
3 a diverged run (TrainingDiverged; in a sweep the trial returns DIVERGED and the sweep goes on).
"""
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cvtrain import ChecksFailed, TrainingDiverged, UserError
from cvtrain.config import register_configs
from cvtrain.models import model_kind
from cvtrain.tasks import augviz, gradcheck, lr_find, sanity, summary, train

log = logging.getLogger("cvtrain")

TASKS = {"train": train.run, "summary": summary.run, "sanity": sanity.run, "gradcheck": gradcheck.run,
         "lr_find": lr_find.run, "augviz": augviz.run}
DIVERGED = 0.0  # the objective of a diverged trial: below any accuracy a real run reaches, and not NaN


def run_name(task: str, data: str, model_option: str, model_name: str, optim: str, aug: str, in_sweep: str = "") -> str:
    """The run dir's name after its time: what the run is, e.g. digits_lenet_adam (train),
    digits_knn (a fitted model: no optimizer), summary_digits_lenet, lr_find_digits_lenet_adam,
    augviz_digits_cifar. In a sweep (in_sweep="sweep") the data is left out, to keep TensorBoard's
    run names short: <sweep dir>/<n>_lenet_adam. Registered as the resolver ${run_name:...} of
    configs/config.yaml."""
    try:
        trained = model_kind(model_name) == "trained"
    except UserError:  # an unknown model.name: the task reports it, with the list of models
        trained = True
    data = [] if in_sweep else [data]
    optim = [optim] if trained else []
    parts = {"train": [*data, model_option, *optim],
             "lr_find": [task, *data, model_option, *optim],
             "sanity": [task, *data, model_option, *optim],
             "augviz": [task, *data, aug]}.get(task, [task, *data, model_option])
    return "_".join(parts)


register_configs()
OmegaConf.register_new_resolver("run_name", run_name)


@hydra.main(version_base="1.3", config_path="pkg://cvtrain.configs", config_name="config")
def main(cfg: DictConfig):
    """Run the configured task in Hydra's run dir; return its objective (train: the best validation
    accuracy; lr_find: the suggested lr; the other tasks: None)."""
    try:
        return TASKS[cfg.task.name](cfg, Path(HydraConfig.get().runtime.output_dir))
    except UserError as err:
        log.error("error: %s", err)
        sys.exit(2)
    except ChecksFailed:
        sys.exit(1)
    except TrainingDiverged as err:
        log.error("training diverged: %s (summary.json has status 'diverged')", err)
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            sys.exit(3)
        return DIVERGED  # in a sweep: record the trial as diverged and go on with the next one


if __name__ == "__main__":
    main()
