"""torchrun's multi-node rendezvous and elastic restarts (src/cvtrain/elastic.py): several torchrun agents
on one machine stand in for several machines; a restart after a killed process continues the run dir
from its newest checkpoint."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cvtrain import UserError, elastic
from cvtrain.__main__ import _follow
from test_distributed import env, free_port, summary

TINY = ["data=synthetic", "data.num_samples=512", "data.image_size=8", "model=mlp", "trainer.viz=false",
        "data.batch_size=32"]
MAY_RESTART = {"TORCHELASTIC_MAX_RESTARTS": "1", "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_RUN_ID": "job-7"}


# --- the record of the run dir and the command line of a restart ---------------------------------

def test_a_restart_continues_the_recorded_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "outputs" / "day" / "run"
    run_dir.mkdir(parents=True)
    argv = ["model=mlp", "trainer.resume=null", "hydra.run.dir=elsewhere"]
    assert elastic.restarted_argv(argv, MAY_RESTART) == (argv, [])  # first attempt: nothing recorded yet
    elastic.remember(run_dir, argv, MAY_RESTART)
    assert json.loads((tmp_path / "outputs/.torchrun/job-7.json").read_text())["run_dir"] == str(run_dir)
    restart = {**MAY_RESTART, "TORCHELASTIC_RESTART_COUNT": "1"}
    new_argv, added = elastic.restarted_argv(argv, restart)
    assert new_argv == ["model=mlp", f"hydra.run.dir='{run_dir}'", "trainer.resume=auto"]
    assert added == ["trainer.resume=auto"]
    # the other processes get rank 0's addition, replacing their own setting of the key
    assert _follow(argv, str(run_dir), added) == ["model=mlp", "trainer.resume=auto", f"hydra.run.dir='{run_dir}'",
                                                  "hydra.output_subdir=null", "hydra/job_logging=disabled",
                                                  "hydra/hydra_logging=disabled"]


def test_no_record_without_restarts_and_no_continuing_a_completed_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    elastic.remember(run_dir, [], {**MAY_RESTART, "TORCHELASTIC_MAX_RESTARTS": "0"})
    assert not (tmp_path / "outputs").exists()  # torchrun without --max-restarts: nothing to continue
    elastic.remember(run_dir, [], MAY_RESTART)
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed"}))
    assert elastic.continued_run([], {**MAY_RESTART, "TORCHELASTIC_RESTART_COUNT": "1"}) is None


def test_the_default_run_id_needs_a_restart_of_the_same_command(tmp_path, monkeypatch):
    """Without --rdzv-id every job's run id is "none": a record is used only by a restart of its command."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    shared = {**MAY_RESTART, "TORCHELASTIC_RUN_ID": "none"}
    elastic.remember(tmp_path / "run", ["model=mlp"], shared)
    assert elastic.continued_run(["model=mlp"], shared) is None  # a new job's first attempt
    restart = {**shared, "TORCHELASTIC_RESTART_COUNT": "1"}
    assert elastic.continued_run(["model=linear"], restart) is None  # another command
    assert elastic.continued_run(["model=mlp"], restart) == str(tmp_path / "run")


def test_several_machines_that_may_restart_need_torchruns_opt_out():
    agent_store = {**MAY_RESTART, "TORCHELASTIC_USE_AGENT_STORE": "True", "GROUP_WORLD_SIZE": "2"}
    world = OmegaConf.create({"size": 4})
    with pytest.raises(UserError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        elastic.attempt_store(world, None, agent_store)
    opted_out = {**agent_store, "TORCHELASTIC_USE_AGENT_STORE": "False"}
    assert elastic.attempt_store(world, None, opted_out) is None  # torchrun's own env:// rendezvous
    assert elastic.attempt_store(world, None, {**agent_store, "TORCHELASTIC_MAX_RESTARTS": "0"}) is None


# --- end to end: torchrun agents on this machine ----------------------------------------------------

def agent(cwd, args, *torchrun_flags, env_extra=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *torchrun_flags, "-m", "cvtrain", *args],
                            cwd=cwd, env={**env(), **(env_extra or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def kill_a_worker_after_a_checkpoint(cwd, agent_proc) -> None:
    deadline = time.monotonic() + 120
    while not list(cwd.glob("outputs/*/*/checkpoints/step-*.pt")):
        assert agent_proc.poll() is None and time.monotonic() < deadline, agent_proc.communicate()[0][-3000:]
        time.sleep(0.05)
    workers = Path(f"/proc/{agent_proc.pid}/task/{agent_proc.pid}/children").read_text().split()
    subprocess.run(["kill", "-9", workers[-1]], check=True)


def the_run_dir(cwd) -> Path:
    (run_dir,) = [p for p in (cwd / "outputs").glob("*/*") if p.parent.name != ".torchrun" and p.is_dir()
                  and (p / ".hydra").is_dir()]
    return run_dir


def test_two_machines_rendezvous_into_one_run(tmp_path):
    """Two torchrun agents (--nnodes=2, c10d rendezvous), one process each: one job, one run dir."""
    flags = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
             "--rdzv-id=two-machines"]
    agents = [agent(tmp_path, [*TINY, "trainer.epochs=2"], *flags) for _ in range(2)]
    outs = [a.communicate(timeout=180)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    s = summary(the_run_dir(tmp_path))
    assert s["status"] == "completed" and s["world_size"] == 2 and s["global_batch_size"] == 64


def test_a_killed_process_restarts_and_continues_the_run(tmp_path):
    """--max-restarts=1 on one machine: SIGKILL to a process after a step checkpoint; torchrun restarts both,
    which continue the same run dir from its newest checkpoint and complete it."""
    proc = agent(tmp_path, [*TINY, "trainer.epochs=60", "trainer.checkpoint_every_steps=20"], "--standalone",
                 "--nproc_per_node=2", "--max-restarts=1")
    kill_a_worker_after_a_checkpoint(tmp_path, proc)
    out = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, out[-3000:]
    run_dir = the_run_dir(tmp_path)
    assert f"torchrun restart: continuing {run_dir}" in out and "trainer.resume=auto: resuming from" in out
    s = summary(run_dir)
    assert s["status"] == "completed" and s["epochs"] == 60 and s["world_size"] == 2
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"val_acc"' in line]
    assert epochs[-1] == 60


@pytest.mark.slow
def test_two_machines_restart_with_torchruns_opt_out(tmp_path):
    """--nnodes=2 --max-restarts=1 with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: a process killed on one
    'machine' restarts both, and the run continues in its run dir."""
    flags = ["--nnodes=2", "--nproc_per_node=1", "--max-restarts=1", "--rdzv-backend=c10d",
             f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=two-machines-restart"]
    args = [*TINY, "trainer.epochs=60", "trainer.checkpoint_every_steps=20"]
    agents = [agent(tmp_path, args, *flags, env_extra={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}) for _ in range(2)]
    kill_a_worker_after_a_checkpoint(tmp_path, agents[1])
    outs = [a.communicate(timeout=240)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert summary(the_run_dir(tmp_path))["status"] == "completed"
    assert "torchrun restart: continuing" in "".join(outs)
