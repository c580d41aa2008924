"""task=summary: per-layer output shapes, parameters and multiply-adds (in process and on the command line)."""
import re

import torch.nn as nn

from cvtrain.models import create_model
from cvtrain.tasks.summary import data_geometry, layer_table, summarize


def test_lecture_worked_check_single_conv():
    # input 3x32x32, 10 filters 5x5, stride 1, pad 2 -> 10x32x32, 760 parameters, 768,000 multiply-adds
    rows, totals = summarize(nn.Conv2d(3, 10, 5, padding=2), (3, 32, 32))
    assert totals == {"input": (3, 32, 32), "output": (10, 32, 32), "params": 760, "macs": 768_000}
    (row,) = rows
    assert (row["output"], row["weight"], row["params"], row["macs"]) == ((10, 32, 32), (10, 3, 5, 5), 760, 768_000)


def test_lenet_on_28x28_matches_the_hand_computation():
    model = create_model("lenet", (1, 28, 28), 10)
    rows, totals = summarize(model, (1, 28, 28))
    assert totals["params"] == sum(p.numel() for p in model.parameters()) == sum(r["params"] for r in rows)
    by_name = {r["name"]: r for r in rows}
    expected = {"features.conv1": 20 * 28 * 28 * 25, "features.conv2": 50 * 14 * 14 * 20 * 25,
                "classifier.fc1": 2450 * 500, "classifier.fc2": 500 * 10}
    assert {name: by_name[name]["macs"] for name in expected} == expected
    assert totals["macs"] == sum(expected.values())
    assert [by_name[n]["output"] for n in ("features.conv1", "features.pool1", "features.pool2",
                                           "classifier.flatten")] == \
        [(20, 28, 28), (20, 14, 14), (50, 7, 7), (2450,)]
    assert by_name["classifier.fc1"]["weight"] == (500, 2450)
    assert model.training  # summarize restores the mode it found


def test_table_ends_with_the_machine_readable_line():
    rows, totals = summarize(create_model("mlp", (1, 8, 8), 4, hidden_sizes=(16,), batch_norm=True), (1, 8, 8))
    lines = layer_table(rows, totals).splitlines()
    assert lines[-1] == f"params={totals['params']} macs={totals['macs']}"
    assert any("BatchNorm1d" in line for line in lines)


def test_known_geometries_need_no_data(compose_config):
    assert data_geometry(compose_config(["data=cifar100"]).data) == ((3, 32, 32), 100)
    assert data_geometry(compose_config(["data=digits"]).data) == ((1, 28, 28), 10)
    synthetic = compose_config(["data=synthetic", "data.channels=2", "data.image_size=12", "data.num_classes=7"])
    assert data_geometry(synthetic.data) == ((2, 12, 12), 7)


def test_cli_summary_prints_the_totals_and_writes_no_run_artifacts(run_cli, run_dir_of, tmp_path):
    result = run_cli(["task=summary", "model=lenet", "data=synthetic", "data.channels=3", "data.image_size=32",
                      "data.num_classes=10"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"params=\d+ macs=\d+", last), last
    params = (3 * 25 * 20 + 20) + (20 * 25 * 50 + 50) + (3200 * 500 + 500) + (500 * 10 + 10)
    macs = 20 * 32 * 32 * 75 + 50 * 16 * 16 * 500 + 3200 * 500 + 500 * 10
    assert last == f"params={params} macs={macs}"
    assert "features.conv1" in result.stdout and "20x32x32" in result.stdout
    run_dir = run_dir_of(tmp_path)
    assert {p.name for p in run_dir.iterdir()} <= {".hydra", "cvtrain.log"}
    assert run_dir.name.endswith("_summary_synthetic_lenet")  # not mistaken for a training run
