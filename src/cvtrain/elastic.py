"""torchrun's elastic restarts (--max-restarts=K): a restarted job continues its run dir from the newest checkpoint.

When a process of a torchrun job dies (killed, out of memory, a node lost), torchrun stops the others and,
while restarts are left, starts all of them again with the same command line and
TORCHELASTIC_RESTART_COUNT raised by one. Left alone, that command would start a fresh run in a new run
dir. Instead:

    remember(run_dir)     rank 0 of a job that may restart (TORCHELASTIC_MAX_RESTARTS > 0) records its run
                          dir in outputs/.torchrun/<run id>.json (the run id is torchrun's rendezvous id:
                          --rdzv-id, or a fresh one with --standalone)
    restarted_argv(argv)  in a restart (TORCHELASTIC_RESTART_COUNT > 0), rank 0's command line pointed at
                          the recorded run dir with trainer.resume=auto: the run continues from its newest
                          good checkpoint (with the number of processes it now has)

The record sits under outputs/ of the working directory, which every node of a multi-node job must share
(as it shares the checkpoints). Without --rdzv-id a multi-node job's run id is "none": the record is
then used only by a command line equal to the one that wrote it.
"""
import json
import os
from pathlib import Path

import torch.distributed as dist

from cvtrain import UserError
from cvtrain.checkpoint import write_text_atomic
from cvtrain.resume import completed


RECORDS = Path("outputs") / ".torchrun"


def _count(name: str, env) -> int:
    try:
        return int(env.get(name, 0))
    except ValueError:
        return 0


def _record(env) -> Path:
    run_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in env.get("TORCHELASTIC_RUN_ID", "none"))
    return RECORDS / f"{run_id}.json"


def remember(run_dir: Path, argv: list, env=None) -> None:
    """Rank 0 of a torchrun job that may restart: record the run dir a restart continues (once: a restart
    that continues it leaves the first attempt's record as it is)."""
    env = os.environ if env is None else env
    if _count("TORCHELASTIC_MAX_RESTARTS", env) <= 0:
        return
    record = _record(env)
    run_dir = str(Path(run_dir).absolute())
    try:
        if json.loads(record.read_text())["run_dir"] == run_dir:
            return
    except (OSError, ValueError, KeyError, TypeError):
        pass
    record.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(record, json.dumps({"run_dir": run_dir, "argv": list(argv)}))


def continued_run(argv: list, env=None):
    """The run dir this attempt of a torchrun job continues (rank 0 decides), or None for a fresh run.

    A job may restart (TORCHELASTIC_MAX_RESTARTS > 0) and an earlier attempt of it recorded its run dir:
    with a run id of its own (torchrun --standalone, or --rdzv-id), the record is this job's; with the
    default id "none", only a restart (TORCHELASTIC_RESTART_COUNT > 0) of the same command line uses it."""
    env = os.environ if env is None else env
    if _count("TORCHELASTIC_MAX_RESTARTS", env) <= 0:
        return None
    record = _record(env)
    try:
        saved = json.loads(record.read_text())
        run_dir = saved["run_dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if env.get("TORCHELASTIC_RUN_ID", "none") == "none" and (
            _count("TORCHELASTIC_RESTART_COUNT", env) <= 0 or saved.get("argv") != list(argv)):
        return None
    if not Path(run_dir).is_dir() or completed(Path(run_dir)):
        return None
    return run_dir


def continuing(run_dir: str) -> list:
    """The overrides that continue `run_dir` from its newest good checkpoint."""
    quoted = run_dir.replace("'", "\\'")
    return [f"hydra.run.dir='{quoted}'", "trainer.resume=auto"]


def restarted_argv(argv: list, env=None) -> tuple:
    """(rank 0's command line, the overrides added to it): `argv` as given, or in a restart of the job,
    `argv` continuing the recorded run dir (hydra.run.dir=<it>, trainer.resume=auto, replacing the command
    line's own settings of both)."""
    run_dir = continued_run(argv, env)
    if run_dir is None:
        return argv, []
    print(f"torchrun restart: continuing {run_dir} from its newest checkpoint (trainer.resume=auto)", flush=True)
    kept = [a for a in argv if not a.lstrip("+~").startswith(("hydra.run.dir=", "trainer.resume="))]
    return [*kept, *continuing(run_dir)], ["trainer.resume=auto"]


def attempt_store(world, timeout, env=None):
    """The store the processes of this attempt meet in, or None for the usual env:// rendezvous.

    torchrun (PyTorch >= 2.5) lets the processes share its rendezvous store, and that store outlives a
    restart: the processes of a restart would read the addresses the dead ones left there and fail to
    connect (PyTorch issue #135712). On one machine every process knows the attempt (its
    TORCHELASTIC_RESTART_COUNT), so each attempt meets under a prefix of its own. Several machines do not
    agree on that count (a machine whose processes did not fail restarts without raising it): a job of
    several machines that may restart needs torchrun's own opt-out, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1,
    which is an error to leave out (before any work, not as a hang at the first restart)."""
    env = os.environ if env is None else env
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or _count("TORCHELASTIC_MAX_RESTARTS", env) <= 0:
        return None
    if _count("GROUP_WORLD_SIZE", env) > 1:
        raise UserError("torchrun --max-restarts with several machines (--nnodes > 1): export "
                        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun on every machine, or a restart "
                        "cannot connect its processes (PyTorch issue #135712)")
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world.size, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"cvtrain/attempt-{_count('TORCHELASTIC_RESTART_COUNT', env)}", store)
