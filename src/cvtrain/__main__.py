"""Command line: python -m cvtrain [GROUP=OPTION ...] [KEY=VALUE ...] (also the `cvtrain` script).

    command line -> Hydra composes the config (configs/, schemas in config.py) -> the run dir
    -> TASKS[task.name](cfg, run_dir) -> its objective, returned to Hydra (a sweeper optimizes it)

Errors map to exit statuses: 2 bad input (UserError), 1 a failed check (ChecksFailed),
3 a diverged run (TrainingDiverged), 130 / 143 a run stopped by SIGINT / SIGTERM (Interrupted).
In a sweep a failed trial (a UserError, a diverged run, any exception) is recorded in its run dir
(summary.json status "failed", or "diverged") and the sweep goes on; at its end a line says how many
of how many trials failed and the exit status is 1.

Run dirs never collide: the default ones are claimed with an atomic os.mkdir (${unique_dir:...} in
configs/config.yaml: <time>_<name>, <time>_<name>-2, ...), and a run dir holding a completed run is
written into only by a resume (trainer.resume).

Several processes (torchrun --nproc_per_node=N -m cvtrain ..., cvtrain/distributed.py): main() joins
the process group before Hydra starts. Rank 0 runs Hydra as a single process does and, as soon as the
task function runs in the run dir Hydra made, sends that dir to the others; they wait for it in main(),
then start Hydra pointed at it (hydra.run.dir) with Hydra writing nothing there for them (no .hydra/,
no log file; their errors go to stderr marked with their rank). So there is exactly one run dir. A
sweep (-m) under torchrun is an error before any work; so is any task but train.
"""
import os
import signal
import sys


def _interrupted_at_start(signum, frame):
    """Ctrl-C while Python imports torch and Hydra (a few seconds): one line, no traceback."""
    print("interrupted during start-up; nothing was written", file=sys.stderr)
    os._exit(130)


# before the heavy imports below, so a Ctrl-C during them is one line (main() restores Python's handler);
# only when this is the command (python -m cvtrain, the cvtrain script), not when a test imports the module
if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "cvtrain":
    signal.signal(signal.SIGINT, _interrupted_at_start)

import logging  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from cvtrain import ChecksFailed, Interrupted, TrainingDiverged, UserError, distributed  # noqa: E402
from cvtrain.config import register_configs  # noqa: E402
from cvtrain.models import model_kind  # noqa: E402
from cvtrain.monitor import write_summary  # noqa: E402
from cvtrain.resume import completed  # noqa: E402
from cvtrain.validate import check_config  # noqa: E402
from cvtrain.tasks import augviz, gradcheck, lr_find, sanity, summary, train  # noqa: E402

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


_CLAIMED: dict = {}  # path asked for -> the dir claimed for it, in this process


def unique_dir(path: str, mode: str = "", for_mode: str = "") -> str:
    """A run dir no other run has: `path`, or `path`-2, -3, ... when it exists, claimed with os.mkdir
    (atomic: of two processes asking at once, one gets each name). The same answer for the same
    `path` within a process (Hydra resolves its run dir more than once). The resolver
    ${unique_dir:<path>,${hydra.mode},RUN|MULTIRUN}: only the dir of the mode that runs is claimed
    (a single run resolves the sweep dir too, and the other way round); `path` as is for the other."""
    if mode and for_mode and str(mode).split(".")[-1] != for_mode:
        return path
    if path not in _CLAIMED:
        base = Path(path)
        base.parent.mkdir(parents=True, exist_ok=True)
        n = 1
        while True:
            candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
            try:
                os.mkdir(candidate)
                break
            except FileExistsError:
                n += 1
        _CLAIMED[path] = str(candidate)
    return _CLAIMED[path]


register_configs()
OmegaConf.register_new_resolver("run_name", run_name)
OmegaConf.register_new_resolver("unique_dir", unique_dir, use_cache=True)

TRIALS: list = []  # a sweep's trials in this process: (run dir, status, reason)
SHARED: list = []  # rank 0 of several processes: the run dir once sent to the others


@hydra.main(version_base="1.3", config_path="pkg://cvtrain.configs", config_name="config")
def hydra_main(cfg: DictConfig):
    """Run the configured task in Hydra's run dir; return its objective (train: the best validation
    accuracy; lr_find: the suggested lr; the other tasks: None)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    _share_run_dir(run_dir)
    try:
        if distributed.world_size() > 1 and cfg.task.name != "train":
            raise UserError(f"task={cfg.task.name} runs in one process; start it without torchrun")
        check_config(cfg)  # bad values, unknown keys, keys the chosen options ignore: before any work
        objective = TASKS[cfg.task.name](cfg, run_dir)
    except UserError as err:
        log.error("error: %s", err)
        if not sweep:
            sys.exit(2)
        return _failed(run_dir, f"error: {err}")
    except ChecksFailed:
        if not sweep:
            sys.exit(1)
        return _failed(run_dir, "a check failed (see the log)")
    except TrainingDiverged as err:
        log.error("training diverged: %s (summary.json has status 'diverged')", err)
        if not sweep:
            sys.exit(3)
        TRIALS.append((run_dir, "diverged", str(err)))
        return DIVERGED  # in a sweep: record the trial as diverged and go on with the next one
    except Interrupted as err:
        log.error("%s (summary.json has status 'interrupted'); exit status %d", err, err.exit_status)
        sys.exit(err.exit_status)
    except Exception as err:  # noqa: BLE001  in a sweep, any failure of one trial: record it, go on
        if not sweep:
            raise
        log.exception("trial failed: %s: %s", type(err).__name__, err)
        return _failed(run_dir, f"{type(err).__name__}: {err}")
    if sweep:
        TRIALS.append((run_dir, "completed", None))
    return objective


def _failed(run_dir: Path, reason: str):
    """A failed sweep trial: summary.json status "failed" with the reason (kept when the task already
    wrote its own, e.g. "diverged"), recorded for the sweep's final line; its objective is None."""
    if not (run_dir / "summary.json").is_file():
        write_summary(run_dir, {"status": "failed", "reason": reason})
    TRIALS.append((run_dir, "failed", reason))
    return None


def _share_run_dir(run_dir: Path) -> None:
    """Several processes: rank 0 sends the run dir Hydra just made to the others (waiting in main()); they
    log only their errors, to stderr, marked with their rank (Hydra configures no log for them)."""
    if distributed.world_size() == 1:
        return
    if distributed.is_main():
        if not SHARED:
            distributed.broadcast_object(str(run_dir))
            SHARED.append(run_dir)
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"[rank {distributed.rank()}] %(message)s"))
    log.disabled = False
    log.setLevel(logging.ERROR)
    log.addHandler(handler)


FOLLOWER_OVERRIDES = ("hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled")


def _follow(argv: list, run_dir: str) -> list:
    """The command line of a process other than rank 0: `argv` run in rank 0's run dir, Hydra writing
    nothing there (its own settings of those keys replaced)."""
    keys = ("hydra.run.dir=", "hydra.output_subdir=", "hydra/job_logging=", "hydra/hydra_logging=")
    kept = [a for a in argv if not a.lstrip("+~").startswith(keys)]
    quoted = run_dir.replace("'", "\\'")  # Hydra's quoted value: any character but an unescaped quote
    return [*kept, f"hydra.run.dir='{quoted}'", *FOLLOWER_OVERRIDES]


def _join_processes(argv: list) -> distributed.World:
    """Join the process group of torchrun's (or SLURM's) processes; a single process joins nothing. A sweep
    (-m) under torchrun is an error (exit status 2) before any work: each trial would be a run of all of them."""
    try:
        world = distributed.from_env()
        if world.size > 1 and any(a in ("-m", "--multirun") or a.startswith("hydra.mode=MULTIRUN") for a in argv):
            if world.rank == 0:  # one line, not one per process
                print("error: a sweep (-m / --multirun) cannot run under torchrun: run the sweep without torchrun, "
                      "or start one torchrun per setting", file=sys.stderr)
            sys.exit(2)
        return distributed.init()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def _refuse_completed_run_dir(argv: list) -> None:
    """hydra.run.dir=<a dir with a completed run> without trainer.resume: an error before Hydra writes there."""
    given = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("hydra.run.dir=")]
    if not given or any(a.lstrip("+").startswith("trainer.resume=") for a in argv):
        return
    if completed(Path(given[-1])):
        print(f"error: {given[-1]} holds a completed run (summary.json); choose another hydra.run.dir, or continue "
              "that run with trainer.resume=auto and a larger trainer.epochs", file=sys.stderr)
        sys.exit(2)


def _refuse_unwritable_output(argv: list) -> None:
    """An output folder that cannot be written (permissions, a read-only or full disk, no such place): one
    error line before Hydra tries to make the run dir there: a probe file in the nearest existing folder on
    the way, removed at once."""
    given = [a.lstrip("+").split("=", 1) for a in argv if a.lstrip("+").startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
    target = Path(given[-1][1] if given else "outputs").absolute()
    existing = next(p for p in [target, *target.parents] if p.exists())  # makes nothing: a probe file, removed
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, f"{existing} is a file")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        key = given[-1][0] if given else "hydra.run.dir"
        print(f"error: cannot write run directories under {target} ({err.strerror or err}); set {key} to a "
              f"folder you can write, e.g. {key}=$HOME/cvtrain-runs/run1", file=sys.stderr)
        sys.exit(2)


def main():
    """The command line (python -m cvtrain, the cvtrain script): Hydra's main, then a sweep's verdict.
    Under torchrun, each process: rank 0 as above, the others in rank 0's run dir (module doc)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, Ctrl-C is KeyboardInterrupt
    world = _join_processes(sys.argv[1:])
    try:
        if world.rank > 0:
            run_dir = distributed.broadcast_object(None)  # rank 0's, once Hydra made it
            if run_dir is None:  # rank 0 ran no task (--help, --cfg, bad input): it says why
                sys.exit(0)
            sys.argv = [sys.argv[0], *_follow(sys.argv[1:], run_dir)]
        else:
            _refuse_unwritable_output(sys.argv[1:])
            _refuse_completed_run_dir(sys.argv[1:])
        hydra_main()
    except KeyboardInterrupt:  # a Ctrl-C outside the training loop's handler (setup, a non-train task)
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if world.size > 1 and world.rank == 0 and not SHARED:  # no run dir made: the others may stop
            _release_others()
    failed = [(run_dir, reason) for run_dir, status, reason in TRIALS if status != "completed"]
    if failed:
        lines = "".join(f"\n  {run_dir}: {reason.splitlines()[0] if reason else ''}" for run_dir, reason in failed)
        print(f"sweep: {len(failed)} of {len(TRIALS)} trials failed:{lines}", file=sys.stderr)
        sys.exit(1)


def _release_others() -> None:
    """Rank 0 leaves before any run dir was made: tell the others waiting for one (they exit quietly)."""
    try:
        distributed.broadcast_object(None)
    except Exception:  # noqa: BLE001  the others are gone already (a Ctrl-C reached them too)
        pass


if __name__ == "__main__":
    main()
