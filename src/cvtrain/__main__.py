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

Other launchers (-m hydra/launcher=joblib | submitit_local | submitit_slurm | slurm, the extras [joblib] and
[slurm]) run a sweep's trials in other processes, each with the sweep's config: the sweep dir this process
claimed travels with it (Hydra copies its resolver cache), so a trial claims nothing. Rank 0 of each trial
writes its outcome to <sweep dir>/.trials/<job num>.json (_record_trial), and this process's main() reads
those for the sweep's final line (TRIALS stays empty here). A submitit job of several tasks
(hydra.launcher.tasks_per_node x nodes > 1) is one DDP run: every task runs the trial, joins the others as
one rank in the task function (_join_job_tasks) and takes rank 0's run dir; only rank 0 writes there (the
others log only their errors; Hydra wrote the same .hydra/ files for each before the trial). A requeued
submitit job (pre-empted, timed out) runs again in its run dir and continues its checkpoints
(trainer.resume=auto, _continue_requeued).
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

import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from cvtrain import ChecksFailed, Interrupted, TrainingDiverged, UserError, distributed, elastic, sweeps  # noqa: E402
from cvtrain.checkpoint import write_text_atomic  # noqa: E402
from cvtrain.config import register_configs  # noqa: E402
from cvtrain.models import model_kind  # noqa: E402
from cvtrain.monitor import write_summary  # noqa: E402
from cvtrain.resume import checkpoint_candidates, completed  # noqa: E402
from cvtrain.validate import check_config  # noqa: E402
from cvtrain.tasks import (augviz, ensemble, evaluate, export, gradcheck, lr_find, predict, sanity, search,  # noqa: E402
                           summary, train)

log = logging.getLogger("cvtrain")

TASKS = {"train": train.run, "summary": summary.run, "sanity": sanity.run, "gradcheck": gradcheck.run,
         "lr_find": lr_find.run, "augviz": augviz.run, "ensemble": ensemble.run,
         "evaluate": evaluate.run, "predict": predict.run, "export": export.run,
         "search": search.run}
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
             "augviz": [task, *data, aug],
             # a checkpoint's task: the data and model are the checkpoint's, not the composed config's
             "evaluate": [task], "predict": [task], "export": [task], "ensemble": [task]}.get(task, [task, *data, model_option])
    return "_".join(parts)


_CLAIMED: dict = {}  # path asked for -> the dir claimed for it, in this process
SWEEP_DIRS: list = []  # the sweep dirs claimed in this process (main() reads the trials' records there)


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
        if for_mode == "MULTIRUN":
            SWEEP_DIRS.append(str(candidate))
    return _CLAIMED[path]


register_configs()
OmegaConf.register_new_resolver("run_name", run_name)
OmegaConf.register_new_resolver("unique_dir", unique_dir, use_cache=True)

TRIALS: list = []  # a sweep's trials in this process: (run dir, status, reason)
SHARED: list = []  # rank 0 of several processes: the run dir once sent to the others
ADDED: list = []  # rank 0 of a torchrun restart: the overrides that continue the run (the others add them too)


@hydra.main(version_base="1.3", config_path="pkg://cvtrain.configs", config_name="config")
def hydra_main(cfg: DictConfig):
    """Run the configured task in Hydra's run dir; return its objective (train: the best validation
    accuracy; lr_find: the suggested lr; the other tasks: None)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    job_tasks = _join_job_tasks()  # a task of a submitit job of several tasks: one rank of the run
    if job_tasks:
        run_dir = _same_run_dir(run_dir)
    else:
        _share_run_dir(run_dir)
    if distributed.is_main() and not sweep:
        elastic.remember(run_dir, sys.argv[1:])  # torchrun --max-restarts: where a restart continues
    try:
        if distributed.world_size() > 1 and cfg.task.name != "train":
            how = "with hydra.launcher.tasks_per_node=1 and nodes=1" if job_tasks else "without torchrun"
            raise UserError(f"task={cfg.task.name} runs in one process; start it {how}")
        _continue_requeued(cfg, run_dir)
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
        _record_trial(run_dir, "diverged", str(err))
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
        _record_trial(run_dir, "completed", None)
    return objective


def _failed(run_dir: Path, reason: str):
    """A failed sweep trial: summary.json status "failed" with the reason (kept when the task already
    wrote its own, e.g. "diverged"), recorded for the sweep's final line; its objective is None."""
    if distributed.is_main() and not (run_dir / "summary.json").is_file():
        write_summary(run_dir, {"status": "failed", "reason": reason})
    _record_trial(run_dir, "failed", reason)
    return None


BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"  # runs the trials in this process
TRIAL_RECORDS = ".trials"  # <sweep dir>/.trials/<job num>.json: the outcome of a trial run in another process


def _record_trial(run_dir: Path, status: str, reason) -> None:
    """A sweep trial's outcome, for the sweep's final line (main()): in TRIALS, and when a launcher runs the
    trials in other processes (joblib, submitit), from rank 0 in <sweep dir>/.trials/<job num>.json too,
    stamped with the sweep's multirun.yaml (written when the sweep starts), so main() of the sweep reads
    this sweep's trials only, not those of an earlier sweep in the same hydra.sweep.dir."""
    TRIALS.append((run_dir, status, reason))
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.launcher.get("_target_") == BASIC_LAUNCHER or not distributed.is_main():
        return
    try:
        sweep_dir = Path(hydra_cfg.sweep.dir)
        folder = sweep_dir / TRIAL_RECORDS
        folder.mkdir(exist_ok=True)
        record = {"run_dir": str(run_dir), "status": status, "reason": reason, "sweep": _sweep_stamp(sweep_dir)}
        write_text_atomic(folder / f"{hydra_cfg.job.num}.json", json.dumps(record))
    except OSError as err:  # the trial's own summary.json still says it
        log.warning("could not record the trial for the sweep's final line: %s", err)


def _sweep_stamp(sweep_dir: Path):
    """The sweep's stamp: its multirun.yaml's modification time (None without one)."""
    try:
        return (Path(sweep_dir) / "multirun.yaml").stat().st_mtime_ns
    except OSError:
        return None


def _launched_trials(argv: list) -> list:
    """The trials of this process's sweep (-m) that a launcher ran in other processes: the records in its
    sweep dir (hydra.sweep.dir on the command line, or the one claimed here) with this sweep's stamp,
    in job order, as (run dir, status, reason)."""
    sweep_dir = sweeps.sweep_dir_of(argv, SWEEP_DIRS)
    if sweep_dir is None:
        return []
    stamp, trials = _sweep_stamp(Path(sweep_dir)), []
    for path in (Path(sweep_dir) / TRIAL_RECORDS).glob("*.json"):
        try:
            record = json.loads(path.read_text())
            if record["sweep"] == stamp:
                trials.append((int(path.stem), (record["run_dir"], record["status"], record["reason"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return [trial for _, trial in sorted(trials)]


def _join_job_tasks() -> bool:
    """In a task of a submitit job of several tasks (hydra.launcher.tasks_per_node x nodes > 1; every task
    runs the trial): join the job's other tasks, one DDP rank each (distributed.from_submitit: SLURM's or
    submitit's variables, MASTER_ADDR / MASTER_PORT from the job when it sets none). Whether this process
    is such a task."""
    env = distributed.from_submitit()
    if not env:
        return False
    if distributed.world_size() == 1:
        os.environ.setdefault("MASTER_ADDR", env["MASTER_ADDR"])  # torch's env:// rendezvous reads these two
        os.environ.setdefault("MASTER_PORT", env["MASTER_PORT"])
        distributed.init({**os.environ, **env})
    return True


def _same_run_dir(run_dir: Path) -> Path:
    """The tasks of a submitit job each ran Hydra, in the same trial dir: rank 0's is the run dir of all of
    them; the others log only their errors (not in the run dir's cvtrain.log) and write nothing there
    (Hydra wrote its .hydra/ files for each task before the trial: the same files, before the tasks met)."""
    run_dir = Path(distributed.broadcast_object(str(run_dir)))
    if not distributed.is_main():
        _log_errors_only()
    return run_dir


def _continue_requeued(cfg: DictConfig, run_dir: Path) -> None:
    """A train trial of a submitit job whose run dir already holds checkpoints: the job was requeued
    (pre-empted, or timed out with hydra.launcher.max_num_timeout > 0) and runs again in the same run dir,
    so it continues from the newest good checkpoint (trainer.resume=auto) unless the command line chose
    trainer.resume. (A hydra.sweep.dir given again continues its trials' checkpoints the same way.)"""
    if not os.environ.get("SUBMITIT_EXECUTOR") or cfg.task.name != "train" or cfg.trainer.resume:
        return
    if checkpoint_candidates(run_dir):
        log.info("submitit: %s holds checkpoints (a requeued job): continuing with trainer.resume=auto", run_dir)
        cfg.trainer.resume = "auto"


def _share_run_dir(run_dir: Path) -> None:
    """Several processes: rank 0 sends the run dir Hydra just made to the others (waiting in main()); they
    log only their errors, to stderr, marked with their rank (Hydra configures no log for them)."""
    if distributed.world_size() == 1:
        return
    if distributed.is_main():
        if not SHARED:
            distributed.broadcast_object((str(run_dir), ADDED))  # and the overrides main() added for rank 0
            SHARED.append(run_dir)
        return
    _log_errors_only()


def _log_errors_only() -> None:
    """A process other than rank 0 logs only its errors, to stderr, marked with its rank; the log handlers
    Hydra set up (a submitit task's: the run dir's cvtrain.log) are removed."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"[rank {distributed.rank()}] %(message)s"))
    log.disabled = False
    log.setLevel(logging.ERROR)
    log.addHandler(handler)


FOLLOWER_OVERRIDES = ("hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled")


def _follow(argv: list, run_dir: str, added: list = ()) -> list:
    """The command line of a process other than rank 0: `argv` run in rank 0's run dir, Hydra writing
    nothing there (its own settings of those keys replaced), with the overrides rank 0 `added` (a torchrun
    restart's trainer.resume=auto)."""
    keys = ("hydra.run.dir=", "hydra.output_subdir=", "hydra/job_logging=", "hydra/hydra_logging=",
            *(a.split("=", 1)[0] + "=" for a in added))
    kept = [a for a in argv if not a.lstrip("+~").startswith(keys)]
    quoted = run_dir.replace("'", "\\'")  # Hydra's quoted value: any character but an unescaped quote
    return [*kept, *added, f"hydra.run.dir='{quoted}'", *FOLLOWER_OVERRIDES]


def _join_processes(argv: list) -> distributed.World:
    """Join the process group of torchrun's (or SLURM's) processes; a single process joins nothing. A sweep
    (-m) under torchrun is an error (exit status 2) before any work: each trial would be a run of all of them."""
    try:
        world = distributed.from_env()
        if world.size > 1 and sweeps.is_sweep(argv):
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
            shared = distributed.broadcast_object(None)  # rank 0's run dir, once Hydra made it
            if shared is None:  # rank 0 ran no task (--help, --cfg, bad input): it says why
                sys.exit(0)
            run_dir, added = shared
            sys.argv = [sys.argv[0], *_follow(sys.argv[1:], run_dir, added)]
        else:
            argv, ADDED[:] = elastic.restarted_argv(sys.argv[1:])  # a torchrun restart: continue its run
            sys.argv = [sys.argv[0], *argv]
            _refuse_missing_launcher(sys.argv[1:])
            _refuse_unwritable_output(sys.argv[1:])
            _refuse_completed_run_dir(sys.argv[1:])
        hydra_main()
    except KeyboardInterrupt:  # a Ctrl-C outside the training loop's handler (setup, a non-train task)
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if world.size > 1 and world.rank == 0 and not SHARED:  # no run dir made: the others may stop
            _release_others()
    sweeps.report_sweep(sys.argv[1:], SWEEP_DIRS)  # a sweep's results.csv and table (before its verdict)
    _sweep_verdict(sys.argv[1:])


def _sweep_verdict(argv: list) -> None:
    """A sweep's end: when trials failed, one line saying how many of how many, with their run dirs and
    reasons, and exit status 1. The trials this process ran (TRIALS), or those a launcher ran elsewhere."""
    trials = TRIALS or _launched_trials(argv)
    failed = [(run_dir, reason) for run_dir, status, reason in trials if status != "completed"]
    if failed:
        lines = "".join(f"\n  {run_dir}: {reason.splitlines()[0] if reason else ''}" for run_dir, reason in failed)
        print(f"sweep: {len(failed)} of {len(trials)} trials failed:{lines}", file=sys.stderr)
        sys.exit(1)


# hydra/launcher=<option> -> (the extra, the plugin's module, its package)
LAUNCHER_EXTRAS = {name: ("slurm", "hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher")
                   for name in ("submitit_slurm", "submitit_local", "slurm")}
LAUNCHER_EXTRAS["joblib"] = ("joblib", "hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher")


def _refuse_missing_launcher(argv: list) -> None:
    """hydra/launcher=submitit_* | slurm | joblib without its plugin installed: one error line naming the
    extra (exit status 2), not Hydra's "Could not find 'hydra/launcher/...'"."""
    chosen = [a.lstrip("+").split("=", 1)[1] for a in argv if a.lstrip("+").startswith("hydra/launcher=")]
    if not chosen or chosen[-1] not in LAUNCHER_EXTRAS:
        return
    extra, module, package = LAUNCHER_EXTRAS[chosen[-1]]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        print(f"error: hydra/launcher={chosen[-1]} needs {package}, which is not installed: pip install -e "
              f"\".[{extra}]\" (in cvtrain's checkout; or pip install {package})", file=sys.stderr)
        sys.exit(2)


def _release_others() -> None:
    """Rank 0 leaves before any run dir was made: tell the others waiting for one (they exit quietly)."""
    try:
        distributed.broadcast_object(None)
    except Exception:  # noqa: BLE001  the others are gone already (a Ctrl-C reached them too)
        pass


if __name__ == "__main__":
    main()
