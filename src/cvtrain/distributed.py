"""Several processes, one model (DistributedDataParallel): the world this process belongs to.

    torchrun --nproc_per_node=N -m cvtrain ...   sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
    srun python -m cvtrain ...                   (SLURM) sets SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the job
                                                 script sets MASTER_ADDR (the first node) and MASTER_PORT

init() reads them (torchrun's first, SLURM's when those are absent) and joins the process group:
backend "cpu:gloo,cuda:nccl" where CUDA is available (CPU tensors over gloo, so trainer.device=cpu
works on a GPU machine too; each process on cuda:<LOCAL_RANK>), "gloo" elsewhere; a collective waits
at most CVTRAIN_DIST_TIMEOUT_S seconds (default 600) for the others, then fails. Without WORLD_SIZE
(or with 1) nothing happens: a single process is a world of one, and every helper below is a no-op.
"""
import atexit
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cvtrain import UserError

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
    dist.init_process_group(backend, init_method="env://", rank=world.rank, world_size=world.size, timeout=timeout)
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
