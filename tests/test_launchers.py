"""Hydra launchers that run a sweep's trials in other processes (src/cvtrain/__main__.py, distributed.py,
configs/hydra/launcher/slurm.yaml): hydra/launcher=submitit_local (parallel local jobs; several tasks = one
DDP run; a requeued job continues its checkpoints) and joblib (parallel trials on one machine); the sweep's
final line about failed trials; the SLURM configs compose and make the expected sbatch script (no cluster
here: the SLURM side is tested through its variables and submitit's sbatch text)."""
import importlib.util
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from cvtrain import UserError, distributed

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason='the slurm extra: pip install -e ".[slurm]"')
pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason='the joblib extra: pip install -e ".[joblib]"')

import cvtrain.__main__ as cli  # noqa: E402  (after the skips: it needs nothing of them, the tests do)
from test_distributed import env, single, summary  # noqa: E402

TINY = ["data=synthetic", "data.num_samples=256", "data.image_size=8", "trainer.epochs=1", "trainer.viz=false"]
SUBMITIT = ["-m", "hydra/launcher=submitit_local"]
JOBLIB = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]


def the_sweep_dir(cwd) -> Path:
    """The one sweep dir under cwd/outputs, and nothing else there but TensorBoard's reference/: no stray
    dirs claimed by the sweep's process or its trials'."""
    entries = sorted(p.name for p in (Path(cwd) / "outputs").iterdir())
    assert len(entries) == 2 and entries[0] == "reference" and entries[1].startswith("sweep-"), entries
    return Path(cwd) / "outputs" / entries[1]


def trial_dirs(sweep_dir) -> list:
    """The trials' run dirs: the sweep dir's folders but the launchers' own (.submitit, .trials)."""
    return sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir() and not p.name.startswith("."))


def submitit_results(sweep_dir) -> dict:
    """{(job id, task): (status, JobReturn)}: what each task of each submitit job returned."""
    results = {}
    for path in Path(sweep_dir, ".submitit").glob("*/*_result.pkl"):
        job, task, _ = path.name.split("_", 2)
        results[job, int(task)] = pickle.loads(path.read_bytes())
    return results


# --- sweeps of two trials, in other processes ---------------------------------------------------------

SWEEPS = {"submitit": (SUBMITIT, ["model=linear,mlp"]),
          "joblib": (JOBLIB, ["model=linear,mlp"]),
          "submitit_failing": (SUBMITIT, ["model=linear", "trainer.epochs=1,0"]),
          "joblib_failing": (JOBLIB, ["model=linear", "trainer.epochs=1,0"]),
          "ddp": (SUBMITIT, ["hydra.launcher.tasks_per_node=2", "model=mlp", "data.num_samples=512",
                             "data.batch_size=32", "trainer.epochs=2"])}


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """sweeps(*names) -> their runs (.proc, .cwd): the sweeps of SWEEPS, each run once, those asked for
    together two at a time. "submitit" and "joblib" claim their sweep dir (outputs/sweep-<time>); the others are
    given one (hydra.sweep.dir=<cwd>/sweep)."""
    done = {}

    def start(name):
        cwd = tmp_path_factory.mktemp(name)
        launcher, args = SWEEPS[name]
        sweep_dir = [] if name in ("submitit", "joblib") else [f"hydra.sweep.dir={cwd / 'sweep'}"]
        return SimpleNamespace(proc=single([*launcher, *TINY, *args, *sweep_dir], cwd, timeout=240), cwd=cwd)

    def get(*names):
        todo = [name for name in names if name not in done]
        with ThreadPoolExecutor(2) as pool:
            done.update(zip(todo, pool.map(start, todo)))
        return [done[name] for name in names]

    return get


@pytest.mark.parametrize("launcher", ["submitit", "joblib"])
def test_a_sweep_runs_its_trials_in_other_processes(sweeps, launcher):
    run = dict(zip(["submitit", "joblib"], sweeps("submitit", "joblib")))[launcher]
    assert run.proc.returncode == 0, run.proc.stdout[-3000:]
    assert "trials failed" not in run.proc.stdout
    sweep_dir = the_sweep_dir(run.cwd)  # claimed once, by the sweep's process: the trials claimed nothing
    trials = trial_dirs(sweep_dir)
    assert [t.name for t in trials] == ["0_linear_adam", "1_mlp_adam"]
    for trial in trials:
        assert summary(trial)["status"] == "completed"
        assert (trial / ".hydra" / "config.yaml").is_file()
        assert "done: best val acc" in (trial / "cvtrain.log").read_text()  # each trial logs into its run dir
        assert len(list(trial.glob("events.out.tfevents.*"))) == 1
    records = [json.loads(p.read_text()) for p in sorted((sweep_dir / ".trials").glob("*.json"))]
    assert [(Path(r["run_dir"]), r["status"]) for r in records] == [(t.resolve(), "completed") for t in trials]
    if launcher == "joblib":
        assert "Joblib.Parallel(n_jobs=2,backend=loky" in run.proc.stdout
    else:  # two local jobs; each returned its trial's objective, the best validation accuracy
        results = submitit_results(sweep_dir)
        assert len({job for job, _ in results}) == 2
        objectives = sorted((Path(ret.hydra_cfg.hydra.runtime.output_dir).name, ret.return_value)
                            for status, ret in results.values())
        assert objectives == [(t.name, summary(t)["best_val_acc"]) for t in trials]


@pytest.mark.parametrize("launcher", ["submitit", "joblib"])
def test_a_failed_trial_is_reported_at_the_sweeps_end(sweeps, launcher):
    names = ["submitit_failing", "joblib_failing"]
    run = dict(zip(names, sweeps(*names)))[f"{launcher}_failing"]
    assert run.proc.returncode == 1, run.proc.stdout[-3000:]
    failed = run.cwd / "sweep" / "1_linear_adam"
    assert (f"sweep: 1 of 2 trials failed:\n  {failed}: error: trainer.epochs=0: train for at least 1 epoch"
            in run.proc.stdout), run.proc.stdout[-3000:]
    assert summary(run.cwd / "sweep" / "0_linear_adam")["status"] == "completed"
    assert summary(failed)["status"] == "failed"


def test_submitit_tasks_train_as_ddp_ranks_in_one_run_dir(sweeps):
    """tasks_per_node=2: the job's two tasks are ranks 0 and 1 of one run; rank 0 alone writes the run dir."""
    (run,) = sweeps("ddp")
    assert run.proc.returncode == 0, run.proc.stdout[-3000:]
    (trial,) = trial_dirs(run.cwd / "sweep")
    s = summary(trial)
    assert s["status"] == "completed" and s["world_size"] == 2 and s["global_batch_size"] == 64
    assert len(list(trial.glob("events.out.tfevents.*"))) == 1
    log = (trial / "cvtrain.log").read_text()  # rank 0's lines only, once each
    assert log.count("2 processes, global batch 64") == 1 and log.count("done: best val acc") == 1
    results = submitit_results(run.cwd / "sweep")
    assert sorted(task for _, task in results) == [0, 1]  # one job, two tasks
    assert all(status == "success" for status, _ in results.values())
    (job,) = {job for job, _ in results}
    rank_1_log = "".join(p.read_text() for p in (run.cwd / "sweep" / ".submitit" / job).glob(f"{job}_1_log.*"))
    assert "[cvtrain]" not in rank_1_log  # rank 1 logs only its errors, and had none


# --- a requeued job continues its checkpoints ---------------------------------------------------------

def test_a_requeued_job_continues_from_its_checkpoint(tmp_path):
    """SIGUSR2 to a submitit_local job's task, as SLURM's pre-emption / time-limit signal: submitit requeues
    it (the same job, the same run dir), and cvtrain continues from the newest checkpoint."""
    args = [*SUBMITIT, "data=synthetic", "data.num_samples=2000", "data.image_size=8", "model=mlp",
            "data.batch_size=32", "trainer.epochs=40", "trainer.viz=false", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = subprocess.Popen([sys.executable, "-m", "cvtrain", *args], cwd=tmp_path, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("sweep/0_*/checkpoints/last.pt")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.1)
        (job,) = [p.name for p in (tmp_path / "sweep" / ".submitit").iterdir() if p.name.isdigit()]
        (task,) = Path(f"/proc/{job}/task/{job}/children").read_text().split()  # the controller's task
        os.kill(int(task), signal.SIGUSR2)
        out = proc.communicate(timeout=180)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    (trial,) = trial_dirs(tmp_path / "sweep")
    task_log = "".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit" / job).glob(f"{job}_0_log.*"))
    assert "this job is preempted" in task_log and f"Requeued job {job}" in task_log
    log = (trial / "cvtrain.log").read_text()
    assert "(a requeued job): continuing with trainer.resume=auto" in log
    assert "trainer.resume=auto: resuming from" in log
    epochs = [json.loads(line)["epoch"] for line in (trial / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 41))  # each epoch once: the requeued job went on where the checkpoint was
    assert summary(trial)["status"] == "completed"


def test_only_a_submitit_train_run_with_checkpoints_continues(tmp_path, monkeypatch, compose_config):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)

    def resume_after(overrides=(), executor="slurm"):
        if executor:
            monkeypatch.setenv("SUBMITIT_EXECUTOR", executor)
        else:
            monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
        cfg = compose_config(list(overrides))
        cli._continue_requeued(cfg, run_dir)
        return cfg.trainer.resume

    assert resume_after() is None  # no checkpoint yet: a fresh job
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"")
    assert resume_after() == "auto" and resume_after(executor="local") == "auto"
    assert resume_after(executor=None) is None  # not a submitit job: the basic launcher's rules
    assert resume_after(["trainer.resume=/elsewhere/last.pt"]) == "/elsewhere/last.pt"  # the command line's
    assert resume_after(["task=summary"]) is None


# --- the sweep's final line: the trials' records ------------------------------------------------------

def test_the_sweep_reads_its_own_trials_records(tmp_path, monkeypatch):
    sweep_dir = tmp_path / "sweep"
    (sweep_dir / ".trials").mkdir(parents=True)
    (sweep_dir / "multirun.yaml").write_text("{}")
    stamp = cli._sweep_stamp(sweep_dir)
    records = {10: ("a", "completed", None, stamp), 2: ("b", "failed", "error: x", stamp),
               3: ("old", "failed", "an earlier sweep in this dir", stamp - 1)}
    for num, (run_dir, status, reason, sweep) in records.items():
        record = {"run_dir": run_dir, "status": status, "reason": reason, "sweep": sweep}
        (sweep_dir / ".trials" / f"{num}.json").write_text(json.dumps(record))
    (sweep_dir / ".trials" / ".7.json.tmp").write_text("{")  # a record being written: not one yet
    argv = ["-m", f"hydra.sweep.dir={sweep_dir}"]
    assert cli._launched_trials(argv) == [("b", "failed", "error: x"), ("a", "completed", None)]
    assert cli._launched_trials(argv[1:]) == []  # not a sweep
    monkeypatch.setattr(cli, "SWEEP_DIRS", [str(sweep_dir)])  # the sweep dir claimed in this process
    assert len(cli._launched_trials(["--multirun"])) == 2
    monkeypatch.setattr(cli, "TRIALS", [])
    with pytest.raises(SystemExit) as stop:
        cli._sweep_verdict(["-m"])
    assert stop.value.code == 1


# --- the world of a submitit job's task ---------------------------------------------------------------

def test_a_submitit_tasks_world():
    local = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_NTASKS": "2",
             "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_JOB_ID": "12345"}
    assert distributed.from_submitit(local) == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                                                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "20345"}
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
             "SLURM_JOB_ID": "987654", "SLURM_JOB_NODELIST": "gpu[003-004]"}
    world = distributed.from_submitit(slurm)
    assert world == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu003",
                     "MASTER_PORT": "23654"}
    assert distributed.from_env({**slurm, **world}) == distributed.World(5, 8, 1)
    assert distributed.from_submitit({**slurm, "MASTER_ADDR": "head", "MASTER_PORT": "29500"})["MASTER_ADDR"] == "head"
    assert distributed.from_submitit({**slurm, "SLURM_NTASKS": "1"}) == {}  # one task: a single process
    assert distributed.from_submitit({**slurm, "WORLD_SIZE": "2"}) == {}  # torchrun inside the job: its world
    assert distributed.from_submitit({k: v for k, v in slurm.items() if k != "SUBMITIT_EXECUTOR"}) == {}
    assert distributed.from_submitit({}) == {}
    with pytest.raises(UserError, match="SLURM_PROCID=x"):
        distributed.from_submitit({**slurm, "SLURM_PROCID": "x"})


@pytest.mark.parametrize("nodelist, first", [("gpu[003-004,010],cpu1", "gpu003"), ("node[1-2]-ib", "node1-ib"),
                                             ("a1,a2", "a1"), ("host", "host"), ("x[7]", "x7"), ("", "")])
def test_the_first_node_of_a_slurm_node_list(nodelist, first):
    assert distributed.first_node(nodelist) == first


# --- the SLURM configs, and the extras --------------------------------------------------------------

def hydra_config(overrides, tmp_path):
    """The composed config with its hydra node; the sweep dir given (resolving the default one claims it)."""
    with initialize_config_module(config_module="cvtrain.configs", version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                       return_hydra_config=True)


def test_the_slurm_launchers_compose(tmp_path):
    plain = hydra_config(["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"], tmp_path).hydra.launcher
    assert plain._target_.endswith("SlurmLauncher") and plain.partition == "gpu"
    ours = hydra_config(["hydra/launcher=slurm", "hydra.launcher.tasks_per_node=4"], tmp_path).hydra.launcher
    assert ours._target_ == plain._target_
    assert (ours.nodes, ours.tasks_per_node, ours.gpus_per_node, ours.max_num_timeout) == (1, 4, 4, 3)


def test_the_slurm_config_makes_the_sbatch_script(tmp_path, monkeypatch):
    """What submitit_slurm's launcher would submit for hydra/launcher=slurm (its executor, made as it makes
    it; submitit wants an srun on the PATH: a stand-in)."""
    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    cfg = hydra_config(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.nodes=2",
                        "hydra.launcher.tasks_per_node=4"], tmp_path)
    params = dict(instantiate(cfg.hydra.launcher, _recursive_=False).params)
    executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    sbatch = executor._executor._make_submission_file_text("python -m submitit.core._submit x", "uid")
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--time=240",
                 "--cpus-per-task=4", "--signal=USR2@120", "--job-name=cvtrain"):
        assert f"#SBATCH {line}\n" in sbatch, sbatch
    assert "\nsrun " in sbatch and "export SUBMITIT_EXECUTOR=slurm" in sbatch


@pytest.mark.parametrize("launcher, extra", [("submitit_slurm", "slurm"), ("slurm", "slurm"),
                                             ("submitit_local", "slurm"), ("joblib", "joblib")])
def test_a_launcher_without_its_extra_is_one_error_line(launcher, extra, monkeypatch, capsys):
    cli._refuse_missing_launcher(["-m", f"hydra/launcher={launcher}"])  # installed: nothing to say
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    cli._refuse_missing_launcher(["-m", "hydra/launcher=basic"])  # Hydra's own
    with pytest.raises(SystemExit) as stop:
        cli._refuse_missing_launcher(["-m", "model=mlp,linear", f"hydra/launcher={launcher}"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: hydra/launcher={launcher} needs ") and f'pip install -e ".[{extra}]"' in err
