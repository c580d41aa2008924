"""Several processes (torchrun, DistributedDataParallel) on the CPU over gloo: one run dir, the same
training as one process at the same global batch, evaluation summed over the processes, checkpoints
that resume in any number of processes, stops that reach every process (src/cvtrain/distributed.py,
tasks/train.py, data/loader.py's shards, loop.evaluate)."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from cvtrain import TrainingDiverged, UserError, distributed
from cvtrain.__main__ import _follow
from cvtrain.checkpoint import load_checkpoint
from cvtrain import data
from cvtrain.data import Split, load_data
from cvtrain.loop import evaluate
from cvtrain.losses import build_loss
from cvtrain.models import build_model
from cvtrain.optim import build_optimizer, lr_factor
from cvtrain.validate import check_config

# 512 images: 462 train / 50 val; global batch 64: 7 steps per epoch; no augmentation, no dropout
TINY = ["data=synthetic", "data.num_samples=512", "data.image_size=8", "model=mlp", "trainer.epochs=2",
        "trainer.viz=false"]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                 "SLURM_LOCALID")


def env() -> dict:
    """This process's environment without a launcher's variables around it (a CI job under torchrun, SLURM or
    submitit): the runs started here see only their own. Also used by test_launchers.py and test_elastic.py."""
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS
             and not k.startswith(("SLURM_", "SUBMITIT_", "TORCHELASTIC_", "TORCH_DISABLE_SHARE_RDZV"))}
    return {**clean, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}


def torchrun_args(args, nproc=2) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
            "cvtrain", *map(str, args)]


def torchrun(args, cwd, nproc=2, timeout=180) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=<nproc> -m cvtrain *args` in cwd; stderr merged into stdout."""
    return subprocess.run(torchrun_args(args, nproc), cwd=cwd, env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def single(args, cwd, timeout=180) -> subprocess.CompletedProcess:
    """`python -m cvtrain *args` in cwd (one process)."""
    return subprocess.run([sys.executable, "-m", "cvtrain", *map(str, args)], cwd=cwd, env=env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


def summary(run_dir) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def metrics(run_dir) -> list:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# --- end to end: 2 processes x batch 32 beside 1 process x batch 64 ---------------------------------

BATCH_NORM = ["model.batch_norm=true", "model.dropout=0.2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, run_dir_of):
    """The runs, two at a time: 2 processes with step checkpoints every 3 steps, 1 process, and 2 processes
    of an MLP with batch norm (each process's running statistics drift apart between forwards)."""
    two, one, two_bn = (tmp_path_factory.mktemp(name) for name in ("two", "one", "two_bn"))
    with ThreadPoolExecutor(2) as pool:
        ddp = pool.submit(torchrun, [*TINY, "data.batch_size=32", "trainer.checkpoint_every_steps=3"], two)
        alone = pool.submit(single, [*TINY, "data.batch_size=64"], one)
        ddp_bn = pool.submit(torchrun, [*TINY, "data.batch_size=32", *BATCH_NORM], two_bn)
        for proc in (ddp.result(), alone.result(), ddp_bn.result()):
            assert proc.returncode == 0, proc.stdout[-3000:]
    # run_dir_of: exactly one run dir each
    return SimpleNamespace(ddp=ddp.result(), two=run_dir_of(two), one=run_dir_of(one), two_bn=run_dir_of(two_bn))


def test_two_processes_make_one_run_dir(runs):
    run_dir = runs.two
    assert len(list(run_dir.parent.iterdir())) == 1  # outputs/<date>/ holds one run dir
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1  # rank 0 writes, the other nothing
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "cvtrain.log").is_file()
    assert len(metrics(run_dir)) == 2
    s = summary(run_dir)
    assert s["status"] == "completed" and s["world_size"] == 2 and s["global_batch_size"] == 64
    assert "2 processes, global batch 64" in runs.ddp.stdout


def test_same_global_batch_trains_as_one_process(runs):
    """Same permutation, global batch k = the single process's batch k, no batch norm: the same gradient
    up to float rounding, so the same epoch losses (not bit-identical: summed in another order)."""
    two, one = metrics(runs.two), metrics(runs.one)
    assert [m["step"] for m in two] == [m["step"] for m in one] == [7, 14]
    for a, b in zip(two, one):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)
        assert a["train_acc"] == pytest.approx(b["train_acc"], abs=1.5 / 448)  # at most one image flips
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-4)
        assert a["lr"] == pytest.approx(b["lr"])
    assert summary(runs.two)["world_size"] == 1 + summary(runs.one)["world_size"]


@pytest.mark.parametrize("run, options", [("two", []), ("two_bn", BATCH_NORM)])
def test_validation_is_a_single_process_evaluation(runs, compose_config, run, options):
    """The best checkpoint's weights, evaluated in this one process on the whole validation split, give
    the validation accuracy the 2 processes reported (each evaluated its part, summed); with batch norm
    too (every process evaluates with rank 0's running statistics, those of the checkpoint)."""
    run_dir = getattr(runs, run)
    saved = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert saved["world_size"] == 2
    assert not any(key.startswith(("module.", "_orig_mod.")) for key in saved["model"])
    cfg = compose_config([*TINY, "data.batch_size=32", *options])
    bundle = load_data(cfg.data, torch.device("cpu"))
    model = build_model(cfg.model, bundle.shape, bundle.num_classes)
    model.load_state_dict(saved["model"])
    loader = data.InMemoryLoader(bundle.val, cfg.data.eval_batch_size, preprocess=bundle.preprocess)
    loss, acc = evaluate(model, loader, build_loss(cfg.loss))
    best = summary(run_dir)
    assert acc == best["best_val_acc"]
    assert loss == pytest.approx(metrics(run_dir)[best["best_epoch"] - 1]["val_loss"], rel=1e-5)


def test_checkpoints_resume_in_another_number_of_processes(runs, tmp_path, run_dir_of):
    """2 -> 1 (the epoch's end and a mid-epoch step checkpoint) and 1 -> 2 processes."""
    mid = runs.two / "checkpoints" / "step-9.pt"  # epoch 2, batch 2 of 2 processes
    assert load_checkpoint(mid)["batch"] == 2
    for name in ("to_one", "mid_to_one", "to_two"):
        (tmp_path / name).mkdir()
    with ThreadPoolExecutor(2) as pool:
        to_one = pool.submit(single, ["trainer.resume=" + str(runs.two / "checkpoints" / "last.pt"),
                                      "trainer.epochs=3"], tmp_path / "to_one")
        mid_to_one = pool.submit(single, [f"trainer.resume={mid}", "trainer.checkpoint_every_steps=0"],
                                 tmp_path / "mid_to_one")
        to_two = pool.submit(torchrun, ["trainer.resume=" + str(runs.one / "checkpoints" / "last.pt"),
                                        "trainer.epochs=3", "data.batch_size=32"], tmp_path / "to_two")
        to_one, mid_to_one, to_two = to_one.result(), mid_to_one.result(), to_two.result()
    for proc in (to_one, mid_to_one, to_two):
        assert proc.returncode == 0, proc.stdout[-3000:]
    one, two = run_dir_of(tmp_path / "to_one"), run_dir_of(tmp_path / "to_two")
    assert summary(one)["world_size"] == 1 and summary(one)["epochs"] == 3
    assert [m["epoch"] for m in metrics(one)] == [3]
    assert summary(two)["world_size"] == 2 and summary(two)["epochs"] == 3
    assert [m["epoch"] for m in metrics(two)] == [3]
    # batch 2 of 2 processes x 32 images = batch 4 of 1 process x 32 images (the checkpoint's batch size)
    assert "stopped at batch 2 of epoch 2 in 2 process(es); in 1 that is batch 4" in mid_to_one.stdout
    mid_dir = run_dir_of(tmp_path / "mid_to_one")
    assert summary(mid_dir)["status"] == "completed" and metrics(mid_dir)[-1]["step"] == 9 + (14 - 4)


# --- stops: a diverged loss, a signal, a killed process, bad input -----------------------------------

def test_diverged_loss_stops_every_process_at_one_step(tmp_path, run_dir_of):
    proc = torchrun([*TINY, "optim=sgd", "optim.lr=1e4", "data.batch_size=16", "trainer.log_every=2"], tmp_path)
    assert proc.returncode != 0
    assert re.search(r"exitcode\s*:\s*3\b", proc.stdout), proc.stdout[-3000:]
    steps = re.findall(r"training diverged: .* at step (\d+)", proc.stdout)
    assert len(steps) == 2 and len(set(steps)) == 1, proc.stdout[-3000:]  # rank 0 and "[rank 1] ..."
    assert summary(run_dir_of(tmp_path))["status"] == "diverged"


def start_long_run(cwd) -> subprocess.Popen:
    """A 2-process run of 500 epochs (28 steps each), once its first checkpoint is on disk."""
    args = ["data=synthetic", "data.num_samples=2000", "data.image_size=8", "model=mlp", "trainer.epochs=500",
            "trainer.viz=false", "data.batch_size=32"]
    proc = subprocess.Popen(torchrun_args(args), cwd=cwd, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not list(cwd.glob("outputs/*/*/checkpoints/last.pt")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    return proc


def test_sigterm_stops_every_process_at_one_step_with_a_checkpoint(tmp_path, run_dir_of):
    """SIGTERM to torchrun: it passes it on; the processes agree at the next loss flush and stop there."""
    proc = start_long_run(tmp_path)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode != 0
    stops = re.findall(r"stopped by SIGTERM at step (\d+) \(epoch (\d+), batch (\d+)\) \(summary", out)
    assert len(stops) == 2 and len(set(stops)) == 1, out[-3000:]  # rank 0's and rank 1's: the same step
    run_dir = run_dir_of(tmp_path)
    s = summary(run_dir)
    assert s["status"] == "interrupted" and s["resume_command"].startswith("torchrun --nproc_per_node=2 -m cvtrain")
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert (saved["step"], saved["epoch"] + 1, saved["batch"]) == tuple(map(int, stops[0]))
    assert saved["epoch_totals"]["seen"] == saved["batch"] * 64  # both processes' images


@pytest.mark.slow
def test_killed_process_ends_the_job(tmp_path):
    """SIGKILL to one of the 2 processes: the other fails (its collective's peer is gone), torchrun stops."""
    proc = start_long_run(tmp_path)
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(workers) == 2
    os.kill(int(workers[-1]), signal.SIGKILL)
    start = time.monotonic()
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode != 0 and time.monotonic() - start < 60
    assert re.search(r"exitcode\s*:\s*-9\b", out), out[-3000:]


def test_sweep_under_torchrun_is_an_error(tmp_path):
    """Exit status 2 before any work, in the environment torchrun gives its processes (torchrun itself
    exits 1 when a process fails: test_sweep_under_real_torchrun)."""
    world = {"WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-m", "cvtrain", "-m", "model=mlp,linear"], cwd=tmp_path,
                          env={**env(), **world, "RANK": "0"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert proc.stdout.strip() == ("error: a sweep (-m / --multirun) cannot run under torchrun: run the sweep "
                                   "without torchrun, or start one torchrun per setting")
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_sweep_under_real_torchrun(tmp_path):
    proc = torchrun(["-m", "model=mlp,linear", "data=synthetic"], tmp_path)
    assert proc.returncode == 1  # torchrun's own status when a process failed
    assert re.search(r"exitcode\s*:\s*2\b", proc.stdout), proc.stdout[-3000:]
    assert proc.stdout.count("error: a sweep (-m / --multirun) cannot run under torchrun") == 1  # rank 0's
    assert not (tmp_path / "outputs").exists()


def test_bad_input_under_torchrun_ends_at_once(tmp_path):
    """Rank 0 fails in Hydra before making a run dir: the others, waiting for it, are let go."""
    start = time.monotonic()
    proc = torchrun(["model=lenett"], tmp_path, timeout=90)
    assert proc.returncode != 0 and time.monotonic() - start < 60
    assert "Could not find 'model/lenett'" in proc.stdout


@pytest.mark.slow
def test_other_tasks_refuse_torchrun(tmp_path):
    proc = torchrun(["task=summary"], tmp_path, timeout=90)
    assert proc.returncode != 0
    assert "error: task=summary runs in one process; start it without torchrun" in proc.stdout
    assert "[rank 1] error: task=summary runs in one process" in proc.stdout  # the other's error, marked


# --- collectives in two spawned processes: evaluate's sum, the stop agreement ----------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    """In each of 2 processes: the evaluation of its part of a split, and _flush's agreements."""
    from cvtrain.tasks.train import _flush

    torch.set_num_threads(1)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    world = distributed.init({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "CVTRAIN_DIST_TIMEOUT_S": "30"})
    split, model, loss_fn = eval_problem()
    part = InMemoryLoader(split, 8, rank=rank, world_size=2)
    result = {"evaluate": evaluate(model, part, loss_fn, across_ranks=True), "part": len(part.labels)}
    mine = torch.full((3,), float(rank))
    distributed.broadcast_([mine])
    result["broadcast"] = mine.tolist()  # rank 0's

    class Pending:  # rank 0's loss guard fires at the second flush
        last_loss = 1.0

        def flush(self, logger, monitor, step, final):
            if rank == 0 and step == 20:
                raise TrainingDiverged("the loss became nan at step 20")

    state = SimpleNamespace(world=world, step=10, logger=None, monitor=None, stop_signal=None,
                            signal_received=signal.SIGTERM if rank else None)
    _flush(state, Pending())
    result["stop_signal"] = state.stop_signal  # rank 1's signal reaches rank 0
    state.step = 20
    try:
        _flush(state, Pending())
    except TrainingDiverged as err:
        result["diverged"] = str(err)
    Path(out, f"{rank}.json").write_text(json.dumps(result))


def eval_problem():
    """A split of 37 images, a fixed linear model, its loss."""
    gen = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (37, 1, 4, 4), generator=gen, dtype=torch.uint8),
                  torch.randint(0, 3, (37,), generator=gen))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return split, model, torch.nn.CrossEntropyLoss()


def test_collectives_of_two_processes(tmp_path):
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="fork")  # no re-imports
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    split, model, loss_fn = eval_problem()
    whole = evaluate(model, InMemoryLoader(split, 8), loss_fn)
    assert [r["part"] for r in results] == [18, 19]  # contiguous parts, sizes differing by one
    for r in results:
        assert r["evaluate"][1] == whole[1]  # the same correct count over the same 37 images
        assert r["evaluate"][0] == pytest.approx(whole[0], rel=1e-6)  # summed in another order
        assert r["stop_signal"] == signal.SIGTERM  # on both: the stop is agreed
        assert r["broadcast"] == [0.0, 0.0, 0.0]
    assert "at step 20" in results[0]["diverged"]
    assert "diverged in another process by step 20" in results[1]["diverged"]


# --- in one process: the shards, evaluate, the environment, optim.scale_lr ---------------------------

def numbered(n: int) -> Split:
    """n images whose labels are their indices: a batch's labels say which images it holds."""
    return Split(torch.zeros((n, 1, 2, 2), dtype=torch.uint8), torch.arange(n))


def InMemoryLoader(split, batch_size, **kwargs):  # noqa: N802  cvtrain's, standardizing 1-channel images by 0 and 1
    return data.InMemoryLoader(split, batch_size, kwargs.pop("mean", torch.zeros(1)), kwargs.pop("std", torch.ones(1)),
                               **kwargs)


def batches(loader, epoch=0) -> list:
    loader.set_epoch(epoch)
    return [y.tolist() for _, y in loader]


@pytest.mark.parametrize("world", [2, 3])
def test_training_shards_are_equal_disjoint_parts_of_one_permutation(world):
    n, batch = 103, 8
    alone = InMemoryLoader(numbered(n), batch * world, shuffle=True, seed=5, drop_last=True)
    parts = [InMemoryLoader(numbered(n), batch, shuffle=True, seed=5, drop_last=True, rank=r, world_size=world)
             for r in range(world)]
    for epoch in (0, 1):
        permutation = torch.randperm(n, generator=torch.Generator().manual_seed(5 * 100_003 + epoch)).tolist()
        shares = [batches(part, epoch) for part in parts]
        assert len({len(part) for part in parts}) == 1 and len(parts[0]) == n // (batch * world)
        seen = [sum(share, []) for share in shares]
        assert all(len(s) == len(seen[0]) for s in seen)  # equal shares: no process waits
        assert sum(len(s) for s in seen) == len(set(sum(seen, [])))  # disjoint
        assert set(sum(seen, [])) <= set(permutation[:n // world * world])
        for k, global_batch in enumerate(batches(alone, epoch)):  # global batch k = one process's batch k
            assert sorted(sum((share[k] for share in shares), [])) == sorted(global_batch)


def test_a_single_process_loader_is_unchanged():
    """rank 0 of 1 (the defaults): the same batches as ever, and rank 0 of 2 augments with the same draws."""
    draws = {}

    def augment(key):
        def record(x, gen):
            draws.setdefault(key, []).append(torch.rand(1, generator=gen).item())
            return x
        return record

    loaders = {"default": InMemoryLoader(numbered(50), 8, shuffle=True, seed=1, augment=augment("default")),
               "explicit": InMemoryLoader(numbered(50), 8, shuffle=True, seed=1, augment=augment("explicit"),
                                          rank=0, world_size=1),
               "rank0": InMemoryLoader(numbered(50), 4, shuffle=True, seed=1, augment=augment("rank0"), world_size=2),
               "rank1": InMemoryLoader(numbered(50), 4, shuffle=True, seed=1, augment=augment("rank1"), rank=1,
                                       world_size=2)}
    got = {key: batches(loader) for key, loader in loaders.items()}
    assert got["default"] == got["explicit"] and draws["default"] == draws["explicit"]
    assert draws["rank0"][0] == draws["default"][0]  # rank 0 goes on with the epoch's generator
    assert draws["rank1"][0] != draws["rank0"][0]  # the others draw their own


@pytest.mark.parametrize("n, world", [(10, 3), (7, 2), (2, 3), (50, 1)])
def test_evaluation_shards_cover_the_split_once(n, world):
    parts = [InMemoryLoader(numbered(n), 4, rank=r, world_size=world) for r in range(world)]
    sizes = [len(part.labels) for part in parts]
    assert max(sizes) - min(sizes) <= 1
    assert [i for part in parts for batch in batches(part) for i in batch] == list(range(n))


def test_evaluate_in_one_process_is_unchanged():
    split, model, loss_fn = eval_problem()
    loader = InMemoryLoader(split, 8)
    with torch.no_grad():
        scores = model(loader.preprocess(split.images.float() / 255))
    expected = (loss_fn(scores, split.labels).item(), (scores.argmax(1) == split.labels).float().mean().item())
    for across_ranks in (False, True):  # outside a process group the sum is over this one process
        loss, acc = evaluate(model, loader, loss_fn, across_ranks=across_ranks)
        assert loss == pytest.approx(expected[0], rel=1e-6) and acc == pytest.approx(expected[1])


def test_the_world_comes_from_the_environment():
    assert distributed.from_env({}) == distributed.World()
    assert distributed.from_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}).size == 1
    master = {"MASTER_ADDR": "node1", "MASTER_PORT": "29500"}
    assert distributed.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", **master}) == \
        distributed.World(3, 4, 1)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}
    assert distributed.from_env({**slurm, **master}) == distributed.World(5, 8, 1)
    assert distributed.from_env({**slurm, "RANK": "0", "WORLD_SIZE": "1"}).size == 1  # torchrun's first
    with pytest.raises(UserError, match="MASTER_ADDR / MASTER_PORT are not set"):
        distributed.from_env(slurm)
    assert distributed.timeout_s({}) == 600 and distributed.timeout_s({"CVTRAIN_DIST_TIMEOUT_S": "30"}) == 30
    with pytest.raises(UserError, match="CVTRAIN_DIST_TIMEOUT_S=soon"):
        distributed.timeout_s({"CVTRAIN_DIST_TIMEOUT_S": "soon"})
    assert distributed.init({}) == distributed.World() and not torch.distributed.is_initialized()
    assert distributed.world_size() == 1 and distributed.is_main() and distributed.broadcast_object("x") == "x"


def test_other_processes_follow_rank_0s_run_dir():
    argv = ["model=mlp", "hydra.run.dir=mine", "hydra/job_logging=default", "trainer.epochs=2"]
    assert _follow(argv, "/runs/it's here") == ["model=mlp", "trainer.epochs=2", "hydra.run.dir='/runs/it\\'s here'",
                                                "hydra.output_subdir=null", "hydra/job_logging=disabled",
                                                "hydra/hydra_logging=disabled"]


def test_scale_lr(compose_config):
    cfg = compose_config(["optim=nesterov", "++optim.norm_and_bias_lr_scale=64"])
    assert cfg.optim.scale_lr == "none" and lr_factor(cfg.optim, 4) == 1.0
    cfg = compose_config(["optim=nesterov", "++optim.norm_and_bias_lr_scale=64", "optim.scale_lr=linear"])
    assert lr_factor(cfg.optim, 4) == 4.0 and lr_factor(cfg.optim, 1) == 1.0
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    base, scaled = build_optimizer(cfg.optim, net), build_optimizer(cfg.optim, net, lr_factor(cfg.optim, 4))
    assert [g["lr"] for g in scaled.param_groups] == [4 * g["lr"] for g in base.param_groups]  # the bias group too
    with pytest.raises(UserError, match="optim.scale_lr=sqrt: choose none"):
        check_config(compose_config(["optim.scale_lr=sqrt"]))
    for option in ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw"):
        check_config(compose_config([f"optim={option}", "optim.scale_lr=linear"]))
