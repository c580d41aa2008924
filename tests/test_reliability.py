"""Reliability: durable and safe checkpoints, trainer.resume=auto, mid-epoch step checkpoints that
resume at the exact batch, SIGINT / SIGTERM, run dirs that never collide, failed sweep trials, and
(marked slow) SIGKILL fault injection."""
import json
import os
import pickle
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cvtrain import UserError
from cvtrain.checkpoint import load_checkpoint, save_checkpoint
from cvtrain.monitor import drop_records_after

TINY = ["data=synthetic", "data.num_samples=256", "data.image_size=8", "trainer.viz=false"]
# exact: a constant lr, dropout and flips draw random numbers; 7 batches of 32 per epoch
EXACT = [*TINY, "model=mlp", "model.dropout=0.3", "aug=flip", "sched=constant", "data.batch_size=32",
         "trainer.log_every=1"]
# a longer run to interrupt: 2048 images (1843 train), 57 batches per epoch
LONG = ["data=synthetic", "data.num_samples=2048", "data.image_size=8", "trainer.viz=false", "model=mlp",
        "model.dropout=0.3", "aug=flip", "sched=constant", "data.batch_size=32", "trainer.epochs=12"]


def cli_env():
    return {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}


def weights(run_dir, name="last.pt"):
    return torch.load(Path(run_dir) / "checkpoints" / name, weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit-identical


def read_summary(run_dir):
    return json.loads((Path(run_dir) / "summary.json").read_text())


def step_losses(run_dir) -> dict:
    out = {}
    for events in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            out.update({e.step: e.value for e in acc.Scalars("train/loss")})
    return out


# --- checkpoints: durable, damaged ones named, unsafe ones refused ---------------------------------

def test_save_checkpoint_fsyncs_the_file_and_the_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.path.realpath(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd)))
    save_checkpoint(tmp_path / "ck" / "last.pt", {"x": torch.ones(3)})
    assert len(synced) == 2 and synced[1] == str((tmp_path / "ck").resolve())  # the file, then its directory
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["last.pt"]  # no temporary file left
    assert torch.equal(torch.load(tmp_path / "ck" / "last.pt", weights_only=True)["x"], torch.ones(3))


def test_truncated_checkpoint_is_named_in_one_line(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(1000)}, "optimizer": {}, "scheduler": {}, "epoch": 1,
                           "step": 1, "rng": {}, "config": {}})
    assert load_checkpoint(path)["epoch"] == 1
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    assert "damaged or truncated" in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)


class _CreatesAFile:
    """A pickle whose unpickling would create a file (calls open(path, "w"))."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_checkpoint_that_needs_arbitrary_unpickling_is_refused_and_nothing_runs(tmp_path, writer):
    marker, path = tmp_path / "created-by-unpickling", tmp_path / "evil.pt"
    payload = {"model": _CreatesAFile(marker), "epoch": 1}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    assert not marker.exists()  # nothing in it ran
    message = str(err.value)
    assert "refused" in message and "arbitrary unpickling" in message and "could run code" in message
    assert "\n" not in message


def test_unique_dir_claims_a_new_name_when_the_dir_exists(tmp_path, monkeypatch):
    from cvtrain import __main__ as cli

    base = str(tmp_path / "outputs" / "day" / "12-00-00_digits_lenet_adam")
    monkeypatch.setattr(cli, "_CLAIMED", {})
    assert cli.unique_dir(base, "RUN", "RUN") == base and Path(base).is_dir()
    assert cli.unique_dir(base, "RUN", "RUN") == base  # the same answer within a process
    monkeypatch.setattr(cli, "_CLAIMED", {})  # another process asking for the same name
    assert cli.unique_dir(base, "RUN", "RUN") == base + "-2"
    monkeypatch.setattr(cli, "_CLAIMED", {})
    assert cli.unique_dir(base, "RUN", "RUN") == base + "-3"
    assert cli.unique_dir(str(tmp_path / "sweep"), "RUN", "MULTIRUN") == str(tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()  # the other mode's dir is not claimed


# --- command-line runs ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_run(tmp_path_factory, start_cli):
    """EXACT for 3 epochs (21 steps) with step checkpoints every 5 steps, keeping 3."""
    cwd = tmp_path_factory.mktemp("full")
    run = start_cli([*EXACT, "trainer.epochs=3", "trainer.checkpoint_every_steps=5", "trainer.keep_checkpoints=3",
                     "hydra.run.dir=full"], cwd).result()
    assert run.proc.returncode == 0, run.output
    return cwd / "full"


def test_step_checkpoints_keep_the_newest(full_run):
    names = {p.name for p in (full_run / "checkpoints").iterdir()}
    assert names == {"last.pt", "best.pt", "step-10.pt", "step-15.pt", "step-20.pt"}
    mid = torch.load(full_run / "checkpoints" / "step-15.pt", weights_only=True)
    assert (mid["epoch"], mid["batch"], mid["step"]) == (2, 1, 15)  # 7 batches per epoch: epoch 3, after batch 1


def test_resume_from_a_mid_epoch_checkpoint_is_exact(full_run, tmp_path, run_cli):
    """Resume a finished run's step-15.pt (epoch 3, after its first batch) in a new run dir: the same
    per-step losses and epoch metrics from there on, and bit-identical final weights."""
    proc = run_cli([*EXACT, "trainer.epochs=3", f"trainer.resume={full_run / 'checkpoints' / 'step-15.pt'}",
                    "hydra.run.dir=resumed"], tmp_path)
    assert proc.returncode == 0, proc.stdout
    resumed = tmp_path / "resumed"
    assert_same_weights(weights(full_run), weights(resumed))
    full_losses, resumed_losses = step_losses(full_run), step_losses(resumed)
    assert sorted(resumed_losses) == list(range(15, 21))
    assert {s: full_losses[s] for s in resumed_losses} == resumed_losses
    full_metrics = [json.loads(line) for line in (full_run / "metrics.jsonl").read_text().splitlines()]
    resumed_metrics = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert len(resumed_metrics) == 1
    for key in ("epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc"):
        assert resumed_metrics[0][key] == full_metrics[-1][key], key


def test_resume_auto_falls_back_past_a_damaged_checkpoint_and_takes_the_checkpoints_settings(full_run, tmp_path,
                                                                                             run_cli):
    run_dir = tmp_path / "copy"
    shutil.copytree(full_run, run_dir)
    (run_dir / "summary.json").unlink()
    for name in ("last.pt", "best.pt"):  # both at step 21 (the last epoch was the best)
        path = run_dir / "checkpoints" / name
        path.write_bytes(path.read_bytes()[:1000])  # truncated, as by a crash of a non-atomic writer
    # only two settings on the command line: the rest (synthetic data, the MLP, ...) come from the checkpoint
    proc = run_cli(["trainer.resume=auto", f"hydra.run.dir={run_dir}", "trainer.log_every=2"], tmp_path)
    assert proc.returncode == 0, proc.stdout
    damaged = [line for line in proc.stdout.splitlines() if "damaged or truncated" in line]
    assert len(damaged) == 2 and "last.pt" in damaged[0] and "best.pt" in damaged[1]
    assert "step-20.pt" in proc.stdout  # the newest good one
    (warning,) = [line for line in proc.stdout.splitlines() if "differ from the checkpoint's" in line]
    assert "trainer.log_every 1 -> 2" in warning and "1 setting(s)" in warning
    assert_same_weights(weights(full_run), weights(run_dir))
    assert read_summary(run_dir)["status"] == "completed"
    records = (run_dir / "metrics.jsonl").read_text().splitlines()
    # epoch 3's record of the first run came after step-20.pt: dropped on the resume, then written again
    assert [json.loads(line)["epoch"] for line in records] == [1, 2, 3]
    assert "dropped 1 record(s) written after epoch 2" in proc.stdout
    # and TensorBoard hides the first run's events after step 20: one val/acc point per epoch
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("val/acc")] == [7, 14, 21]
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 2  # a second event file in the same dir


def test_drop_records_after_keeps_earlier_epochs_and_drops_a_half_written_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "val_acc": 0.5}\n{"epoch": 2, "val_acc": 0.6}\n{"epoch": 3, "val_acc": 0.7}\n'
                    '{"epoch": 4, "va')
    drop_records_after(path, 2)
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [1, 2]
    drop_records_after(path, 5)  # nothing to drop: left as it is
    assert path.read_text().count("\n") == 2 and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    drop_records_after(tmp_path / "missing.jsonl", 1)  # a run dir without records yet


def test_resume_auto_without_a_checkpoint_starts_fresh_with_a_note(tmp_path, run_cli):
    proc = run_cli([*TINY, "model=linear", "trainer.epochs=1", "trainer.resume=auto", "hydra.run.dir=fresh"], tmp_path)
    assert proc.returncode == 0, proc.stdout
    assert "no checkpoint in" in proc.stdout and "starting a fresh run" in proc.stdout
    assert read_summary(tmp_path / "fresh")["status"] == "completed"


def test_resume_with_another_architecture_names_the_difference(full_run, tmp_path, run_cli):
    proc = run_cli([*EXACT, "trainer.epochs=4", "model.hidden_sizes=[64]",
                    f"trainer.resume={full_run / 'checkpoints' / 'last.pt'}"], tmp_path)
    assert proc.returncode == 2, proc.stdout
    assert "model.hidden_sizes [256] -> [64]" in proc.stdout and "same model" in proc.stdout


def test_a_completed_run_dir_is_not_written_into_without_a_resume(full_run, tmp_path, run_cli):
    before = {p: p.stat().st_mtime_ns for p in full_run.rglob("*")}
    proc = run_cli([*EXACT, "trainer.epochs=3", f"hydra.run.dir={full_run}"], tmp_path)
    assert proc.returncode == 2, proc.stdout
    assert str(full_run) in proc.stdout and "completed run" in proc.stdout and "trainer.resume=auto" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in full_run.rglob("*")} == before


def test_two_runs_started_at_once_get_two_dirs(tmp_path, start_cli):
    args = [*TINY, "model=linear", "trainer.epochs=1", "trainer.checkpoint=false"]
    runs = [start_cli(args, tmp_path) for _ in range(2)]
    for run in runs:
        assert run.result().proc.returncode == 0, run.result().output
    dirs = [p for p in (tmp_path / "outputs").glob("2*/*") if p.is_dir()]
    assert len(dirs) == 2
    assert all((d / "summary.json").is_file() for d in dirs)


def test_a_failed_sweep_trial_is_recorded_and_the_sweep_goes_on(tmp_path, run_cli):
    proc = run_cli(["-m", *TINY, "model=linear", "trainer.epochs=1,0,1", "trainer.checkpoint=false"], tmp_path)
    assert proc.returncode == 1, proc.stdout
    assert "sweep: 1 of 3 trials failed" in proc.stdout
    (sweep,) = (tmp_path / "outputs").glob("sweep-*")
    statuses = {d.name: read_summary(d) for d in sweep.iterdir() if d.is_dir()}
    assert sorted(s["status"] for s in statuses.values()) == ["completed", "completed", "failed"]
    (failed,) = [s for s in statuses.values() if s["status"] == "failed"]
    assert "trainer.epochs=0" in failed["reason"]


# --- SIGTERM / SIGINT ---------------------------------------------------------------------------

def start_long(args, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cvtrain", *args], cwd=cwd, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_sigterm_checkpoints_prints_the_resume_command_and_the_resume_is_exact(tmp_path, start_cli):
    uninterrupted = start_cli([*LONG, "hydra.run.dir=straight"], tmp_path)
    run_dir = tmp_path / "stopped"
    proc = start_long([*LONG, f"hydra.run.dir={run_dir}"], tmp_path)
    wait_for(run_dir / "checkpoints" / "last.pt", proc)  # the first epoch's checkpoint
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, output
    summary = read_summary(run_dir)
    assert summary["status"] == "interrupted" and summary["step"] >= 57  # 57 batches an epoch
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert saved["step"] == summary["step"]  # the checkpoint is at the step reached (mid-epoch, as a rule)
    (command,) = [line for line in output.splitlines() if line.startswith("python -m cvtrain ")]
    assert command == summary["resume_command"]
    assert command.endswith(f"trainer.resume=auto hydra.run.dir={run_dir.resolve()}")
    argv = shlex.split(command)
    resumed = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stdout
    assert read_summary(run_dir)["status"] == "completed"
    straight = uninterrupted.result()
    assert straight.proc.returncode == 0, straight.output
    assert_same_weights(weights(tmp_path / "straight"), weights(run_dir))


def test_sigint_stops_with_status_130(tmp_path):
    run_dir = tmp_path / "ctrl-c"
    proc = start_long([*LONG, f"hydra.run.dir={run_dir}"], tmp_path)
    wait_for(run_dir / "checkpoints" / "last.pt", proc)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert read_summary(run_dir)["status"] == "interrupted"
    assert "Traceback" not in output


# --- SIGKILL at random instants (slow) -------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_at_random_instants_never_loses_a_checkpoint(tmp_path, run_cli):
    """Kill a run with SIGKILL at random instants (many during checkpoint writes: one every step),
    >= 10 times: after each kill every checkpoint on disk loads, and trainer.resume=auto finishes the
    run with the final weights of an uninterrupted run."""
    args = [*LONG, "trainer.epochs=16", "trainer.checkpoint_every_steps=1", "trainer.keep_checkpoints=3",
            "trainer.log_every=1"]
    straight = run_cli([*args, "hydra.run.dir=straight"], tmp_path, timeout=600)
    assert straight.returncode == 0, straight.stdout
    run_dir = tmp_path / "killed"
    rng = random.Random(0)
    kills = survived = mid_write = 0
    for attempt in range(40):
        if kills >= 12:
            break
        started = time.time()
        proc = start_long([*args, "trainer.resume=auto", f"hydra.run.dir={run_dir}"], tmp_path)
        # once this process writes checkpoints (after the imports and the data), at a random instant:
        # with a checkpoint every step, often in the middle of writing one
        while proc.poll() is None and not any(p.stat().st_mtime > started for p in
                                              (run_dir / "checkpoints").glob("*") if p.exists()):
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is not None:  # finished before the kill
            assert proc.returncode == 0, proc.communicate()[0]
            break
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        kills += 1
        mid_write += any((run_dir / "checkpoints").glob("*.tmp"))  # killed while writing a checkpoint
        ok = True
        for path in (run_dir / "checkpoints").glob("*.pt"):
            try:
                load_checkpoint(path)
            except UserError as err:
                ok = False
                print("after kill", kills, err)
        survived += ok
    final = subprocess.run([sys.executable, "-m", "cvtrain", *args, "trainer.resume=auto",
                            f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=600)
    print(f"SIGKILL fault injection: {survived} kills survived / {kills} kills tried, {mid_write} of them during "
          "a checkpoint write (every checkpoint on disk loads after the kill)")
    assert final.returncode == 0, final.stdout
    assert_same_weights(weights(tmp_path / "straight"), weights(run_dir))
    assert kills >= 10 and survived == kills


def test_a_full_disk_keeps_the_last_good_checkpoint_and_says_so(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "run" / "checkpoints" / "last.pt"
    save_checkpoint(path, {"step": 1, "weights": torch.ones(3)})
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match="No space left on device.*the previous last.pt is intact.*trainer.resume=auto"):
        save_checkpoint(path, {"step": 2, "weights": torch.zeros(3)})
    monkeypatch.setattr(torch, "save", real_save)
    kept = torch.load(path, weights_only=True)  # the first checkpoint, whole
    assert kept["step"] == 1 and torch.equal(kept["weights"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left
