"""Several processes, one model (DistributedDataParallel): the world this process belongs to.

    torchrun --nproc_per_node=N -m cvtrain ...   sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
    srun python -m cvtrain ...                   (SLURM) sets SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the job
                                                 script sets MASTER_ADDR (the first node) and MASTER_PORT
    python -m cvtrain -m hydra/launcher=slurm hydra.launcher.tasks_per_node=N ...
                                                 (hydra-submitit-launcher; submitit_local too) each task of the
                                                 job runs the trial: from_submitit() gives it its rank, and
                                                 MASTER_ADDR / MASTER_PORT when the job sets none (first node,
                                                 a port from the job id)

init() reads them (torchrun's first, SLURM's when those are absent) and joins the process group:
backend "cpu:gloo,cuda:nccl" where CUDA is available (CPU tensors over gloo, so trainer.device=cpu
works on a GPU machine too; each process on cuda:<LOCAL_RANK>), "gloo" elsewhere; a collective waits
at most CVTRAIN_DIST_TIMEOUT_S seconds (default 600) for the others, then fails. Without WORLD_SIZE
(or with 1) nothing happens: a single process is a world of one, and every helper below is a no-op.
"""
import atexit
import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cvtrain import UserError, elastic

DEFAULT_TIMEOUT_S = 600


@dataclass(frozen=True)
class World:
    """This process's place: rank (0 writes the run's files), size (processes), local_rank (its GPU)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0


_JOINED = World()  # what init() joined


def from_env(env=None) -> World:
    """The world the launcher describes in the environment (torchrun's variables, else SLURM's); World()
    when there is none. Reads only: joins nothing."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env:
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    elif "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        names = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    else:
        return World()
    try:
        rank, size, local_rank = (int(env.get(name, 0)) for name in names)
    except ValueError:
        raise UserError(f"{', '.join(f'{n}={env.get(n)}' for n in names)}: the launcher's rank and world "
                        "size must be integers") from None
    if size > 1 and ("MASTER_ADDR" not in env or "MASTER_PORT" not in env):
        raise UserError(f"{names[1]}={size} but MASTER_ADDR / MASTER_PORT are not set: the processes cannot find "
                        "each other. Under SLURM export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST "
                        "| head -n 1) and MASTER_PORT=29500 in the job script, or launch with torchrun (one process "
                        f"in a job of {size} tasks: srun -n 1 python -m cvtrain ...)")
    return World(rank, size, local_rank)


# a submitit job's variables (SUBMITIT_EXECUTOR says which): rank, tasks, rank on the node, job id
SUBMITIT_VARS = {"slurm": ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID"),
                 "local": ("SUBMITIT_LOCAL_GLOBALID", "SUBMITIT_LOCAL_NTASKS", "SUBMITIT_LOCAL_LOCALID",
                           "SUBMITIT_LOCAL_JOB_ID")}


def from_submitit(env=None) -> dict:
    """In a task of a submitit job of several tasks (hydra/launcher=submitit_slurm, slurm or submitit_local
    with tasks_per_node x nodes > 1; every task runs the trial): the variables init() reads, RANK,
    WORLD_SIZE and LOCAL_RANK from the job's, and MASTER_ADDR (the job's first node; 127.0.0.1 for a local
    job) and MASTER_PORT (20000 + the job id mod 12000: jobs sharing a node differ) unless the job sets
    them. {} elsewhere: outside a submitit job, in a job of one task, or under torchrun (its variables win)."""
    env = os.environ if env is None else env
    names = SUBMITIT_VARS.get(env.get("SUBMITIT_EXECUTOR", ""))
    if names is None or "WORLD_SIZE" in env:
        return {}
    rank, size, local_rank, job_id = (env.get(name, "") for name in names)
    try:
        if int(size or 1) <= 1:
            return {}
        int(rank), int(local_rank or 0)
    except ValueError:
        raise UserError(f"{', '.join(f'{n}={env.get(n)}' for n in names[:3])}: the job's rank and number of "
                        "tasks must be integers") from None
    first = first_node(env.get("SLURM_JOB_NODELIST", "")) if names is SUBMITIT_VARS["slurm"] else ""
    digits = re.sub(r"\D", "", job_id)
    return {"RANK": rank, "WORLD_SIZE": size, "LOCAL_RANK": local_rank or "0",
            "MASTER_ADDR": env.get("MASTER_ADDR", first or "127.0.0.1"),
            "MASTER_PORT": env.get("MASTER_PORT", str(20000 + int(digits or 0) % 12000))}


def first_node(nodelist: str) -> str:
    """The first host of a SLURM node list: gpu[003-004,010],cpu1 -> gpu003; node[1-2]-ib -> node1-ib; "" -> ""."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    prefix, ranges, suffix = match.groups()
    first = re.split(r"[-,]", ranges)[0] if ranges else ""
    return f"{prefix}{first}{suffix}"


def timeout_s(env=None) -> float:
    """CVTRAIN_DIST_TIMEOUT_S: how long a collective waits for the other processes (default 600 s)."""
    value = (os.environ if env is None else env).get("CVTRAIN_DIST_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UserError(f"CVTRAIN_DIST_TIMEOUT_S={value}: seconds a process waits for the others; use a "
                        f"positive number (default {DEFAULT_TIMEOUT_S})")
    return seconds


def init(env=None) -> World:
    """Join the process group of the world in the environment (once; destroyed at exit). A world of
    one joins nothing."""
    world = from_env(env)
    if world.size == 1 or dist.is_initialized():
        return world
    global _JOINED
    timeout = datetime.timedelta(seconds=timeout_s(env))
    if torch.cuda.is_available():
        if world.local_rank < torch.cuda.device_count():
            torch.cuda.set_device(world.local_rank)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    store = elastic.attempt_store(world, timeout, env)  # torchrun --max-restarts: this attempt's own store
    dist.init_process_group(backend, init_method=None if store else "env://", store=store, rank=world.rank,
                            world_size=world.size, timeout=timeout)
    atexit.register(destroy)
    _JOINED = world
    return world


def destroy() -> None:
    """Leave the process group (at exit; local, waits for nobody)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process writes the run's files (rank 0; the only process of a single run)."""
    return rank() == 0


def current() -> World:
    """The world this process has joined (World() when it has joined none)."""
    return _JOINED if dist.is_initialized() else World()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the processes, in place (returned); as it is in a single process."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`'s elementwise maximum over the processes, in place (returned)."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_(tensors) -> None:
    """Rank 0's values of `tensors`, copied into every process's tensors of the same shapes (in place)."""
    if world_size() > 1:
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


def wait_for_rank_0() -> None:
    """A barrier (over gloo, whatever the device): the other processes call it before some work, rank 0
    after it, so rank 0 does that work first."""
    broadcast_object(None)


def broadcast_object(obj):
    """Rank 0's `obj` (picklable), on every process; the others pass anything (None) and wait for it."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
