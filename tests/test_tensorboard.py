"""What a user sees in TensorBoard, asked of a real TensorBoard server on loopback through its HTTP API
(the same requests its web pages make): run names, the HPARAMS experiment, histograms.

A 2x2 sweep (model=linear,mlp x optim=sgd,adam) and one single run, 3 epochs each on tiny synthetic
data, then `tensorboard --logdir outputs`; then a second sweep into the same log dir."""
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.slow

TINY = ["data=synthetic", "data.num_samples=256", "data.image_size=8", "trainer.epochs=3", "trainer.viz=false",
        "trainer.histogram_every=1000"]  # more than a run's steps: the epoch ends give the histograms


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Board:
    """A TensorBoard server on 127.0.0.1 for `logdir`, stopped by stop()."""

    def __init__(self, logdir):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
             "--port", str(self.port), "--reload_interval", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def get(self, path: str, body: dict | None = None, timeout: float = 60.0):
        """GET (or POST `body` as JSON) path; retried until the server answers, within `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                data = None if body is None else json.dumps(body).encode()
                request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=10) as response:
                    return json.loads(response.read())
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.5)

    def wait_for(self, predicate, fetch, timeout: float = 60.0):
        """fetch() until predicate(value) holds (the server loads event files in the background)."""
        deadline = time.monotonic() + timeout
        while True:
            value = fetch()
            if predicate(value) or time.monotonic() > deadline:
                return value
            time.sleep(1.0)

    def experiment(self) -> dict:
        return self.get("/data/plugin/hparams/experiment", {"experimentName": ""})

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def logdir(tmp_path_factory, run_cli):
    cwd = tmp_path_factory.mktemp("board")
    sweep = run_cli(["-m", *TINY, "model=linear,mlp", "optim=sgd,adam"], cwd, timeout=600)
    assert sweep.returncode == 0, sweep.stdout
    single = run_cli([*TINY, "model=mlp", "optim.lr=0.003"], cwd)
    assert single.returncode == 0, single.stdout
    return cwd


@pytest.fixture(scope="module")
def board(logdir):
    server = Board(logdir / "outputs")
    yield server
    server.stop()


def hparam_infos(experiment) -> dict:
    return {h["name"]: h for h in experiment.get("hparamInfos", [])}


def test_run_names_are_distinct_short_and_free_of_tb(board):
    runs = board.wait_for(lambda r: len(r) >= 6, lambda: board.get("/data/runs"))
    training = [r for r in runs if r != "reference"]
    assert len(training) == 5 and len(set(training)) == 5, runs
    assert not any(r.endswith("/tb") or "/tb/" in r for r in runs)
    sweep_runs = sorted(r for r in training if r.startswith("sweep-"))
    assert [r.split("/")[1] for r in sweep_runs] == ["0_linear_sgd", "1_linear_adam", "2_mlp_sgd", "3_mlp_adam"]
    assert all(len(r) <= 40 for r in sweep_runs)


def test_hparams_marks_the_choices_and_swept_values_as_differing(board):
    experiment = board.wait_for(lambda e: "model" in hparam_infos(e), board.experiment)
    infos = hparam_infos(experiment)
    assert infos["model"]["differs"] and infos["optim"]["differs"]
    assert infos["optim.lr"]["differs"]  # sgd 0.1 / adam 0.001 / 0.003
    assert not any(name.startswith("aug.") for name in infos)  # aug=none: none of its keys is used
    assert not infos["aug"]["differs"]
    assert "model.hidden_sizes" in infos  # only the MLP runs have it: still a column
    assert not infos["data.batch_size"]["differs"]
    names = [h["name"] for h in experiment["hparamInfos"]]
    differing = [h["name"] for h in experiment["hparamInfos"] if h.get("differs")]
    assert names[:len(differing)] == differing  # the differing keys come first: the default columns
    metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
    assert {"summary/best_val_acc", "summary/final_val_acc", "summary/train_time_s"} <= metrics


def test_histograms_have_a_step_per_epoch(board):
    run = next(r for r in board.get("/data/runs") if r.endswith("3_mlp_adam"))
    tags = board.wait_for(lambda t: run in t, lambda: board.get("/data/plugin/histograms/tags"))[run]
    weight_tag = next(t for t in tags if t.startswith("weights/"))
    points = board.get(f"/data/plugin/histograms/histograms?run={run}&tag={weight_tag}")
    assert len({p[1] for p in points}) >= 3, points  # one per epoch end (histogram_every is beyond the run)


def test_a_new_sweep_into_the_same_log_dir_joins_the_experiment(board, logdir, run_cli):
    more = run_cli(["-m", *TINY, "model=linear", "optim=sgd", "optim.lr=0.05,0.2"], logdir, timeout=600)
    assert more.returncode == 0, more.stdout
    experiment = board.wait_for(lambda e: len(board.get("/data/runs")) >= 8 and "0.05" in json.dumps(e),
                                board.experiment, timeout=90)
    sessions = board.get("/data/plugin/hparams/session_groups",
                         {"experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS",
                                                                    "STATUS_FAILURE", "STATUS_RUNNING"],
                          "colParams": [], "startIndex": 0, "sliceSize": 100})
    assert sessions.get("totalSize", len(sessions.get("sessionGroups", []))) >= 7, sessions
    assert hparam_infos(experiment)["optim.lr"]["differs"]
