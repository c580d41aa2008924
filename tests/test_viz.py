"""Visualizations (src/cvtrain/viz.py): each function on tiny models, the wiring into train(), and one
command-line run on the default digits data whose run dir and event file must hold them."""
import json

import pytest
import torch
import torch.nn as nn
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from cvtrain.data import DataBundle, InMemoryLoader, Split
from cvtrain.tasks.train import run as train
from cvtrain.viz import (confusion_counts, confusion_figure, first_layer_filters, image_grid, linear_templates,
                         misclassified, misclassified_grid, predict, write_visualizations)

SHAPE = (3, 4, 4)


def conv_net(in_channels=3):
    return nn.Sequential(nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_filters_are_the_first_convs_weights_each_scaled_to_0_1():
    model = conv_net()
    filters = first_layer_filters(model)
    assert filters.shape == (6, 3, 5, 5)
    for f, w in zip(filters, model[0].weight.detach()):
        assert f.min() == 0 and f.max() == 1
        assert torch.allclose(f, (w - w.min()) / (w.max() - w.min()), atol=1e-6)
    # 5x5 tiles enlarged 7x to 35 px, 3 per row (ceil(sqrt(6))), 2 px padding: 2 rows x 3 columns
    assert image_grid(filters).shape == (3, 2 * 37 + 2, 3 * 37 + 2)


def test_filters_of_other_than_1_or_3_channels_are_shown_gray_and_no_conv_means_none():
    assert first_layer_filters(conv_net(in_channels=4)).shape == (6, 1, 5, 5)
    assert first_layer_filters(nn.Sequential(nn.Flatten(), nn.Linear(48, 3))) is None


def test_linear_templates_are_the_rows_of_W_reshaped():
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 5))
    templates = linear_templates(model, SHAPE)
    assert templates.shape == (5, *SHAPE)
    for t, row in zip(templates, model[1].weight.detach()):
        assert torch.allclose(t.flatten(), (row - row.min()) / (row.max() - row.min()), atol=1e-6)


def test_mlp_templates_come_from_its_first_layer_capped():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(48, 30), nn.ReLU(), nn.Linear(30, 5))
    templates = linear_templates(mlp, SHAPE, limit=20)
    assert templates.shape == (20, *SHAPE)
    row = mlp[1].weight.detach()[7]
    assert torch.allclose(templates[7].flatten(), (row - row.min()) / (row.max() - row.min()), atol=1e-6)


def test_no_templates_for_a_conv_net_even_if_a_layer_has_as_many_inputs_as_pixels():
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Flatten(), nn.Linear(48, 5))
    assert linear_templates(model, SHAPE) is None


def test_confusion_counts_rows_are_true_columns_predicted():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    preds = torch.tensor([0, 1, 1, 2, 0, 2])
    assert confusion_counts(labels, preds, 3).tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    image = confusion_figure(confusion_counts(labels, preds, 3), ["a", "b", "c"])
    assert image.shape[0] == 3 and 0 <= image.min() and image.max() <= 1


def test_misclassified_picks_exactly_the_wrong_ones_in_order():
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    preds = torch.tensor([0, 2, 2, 0, 0, 1, 1, 3])
    assert misclassified(labels, preds).tolist() == [1, 3, 6]
    assert misclassified(labels, preds, limit=2).tolist() == [1, 3]
    images = torch.arange(8, dtype=torch.uint8).view(8, 1, 1, 1).expand(8, 1, 2, 2) * 30
    grid, text = misclassified_grid(images, labels, preds, ["zero", "one", "two", "three"])
    assert text.splitlines()[1:] == ["1,1\t1\tone\ttwo", "1,2\t3\tthree\tzero", "2,1\t6\ttwo\tone"]
    # 2x2 images enlarged to 32 px, 2 per row: the tiles are images 1, 3, 6 in reading order
    assert grid.shape == (3, 2 * 34 + 2, 2 * 34 + 2)
    assert [round(grid[0, 2 + r * 34, 2 + c * 34].item() * 255) for r, c in [(0, 0), (0, 1), (1, 0)]] == [30, 90, 180]
    assert misclassified_grid(images, labels, labels, ["a"] * 4) == (None, None)


def tiny_data(n=30, shape=SHAPE, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    split = Split(torch.randint(0, 256, (n, *shape), generator=gen, dtype=torch.uint8), torch.arange(n) % classes)
    return DataBundle(split, split, None, [f"c{i}" for i in range(classes)], torch.full((shape[0],), 0.5),
                      torch.full((shape[0],), 0.25))


def test_predict_returns_predictions_labels_and_penultimate_features_and_keeps_the_mode():
    data, model = tiny_data(), conv_net()
    loader = InMemoryLoader(data.val, 7, preprocess=data.preprocess)
    preds, labels, features = predict(model, loader, features=10)
    assert model.training
    assert labels.tolist() == data.val.labels.tolist()
    with torch.no_grad():
        model.eval()
        x = torch.cat([x for x, _ in loader])
        assert preds.tolist() == model(x).argmax(1).tolist()
        assert torch.allclose(features, model[:5](x[:10]), atol=1e-6)  # the input of the last Linear


@pytest.mark.parametrize("model, pictures", [
    (nn.Sequential(nn.Flatten(), nn.Linear(48, 3)), "templates"),
    (conv_net(), "filters"),
])
def test_write_visualizations(tmp_path, model, pictures):
    data = tiny_data()
    writer = SummaryWriter(str(tmp_path / "tb"))
    files = write_visualizations(model, InMemoryLoader(data.val, 16, preprocess=data.preprocess), data, writer,
                                 tmp_path, step=5)
    writer.close()
    assert set(files) == {f"{pictures}.png", "confusion_matrix.png", "misclassified.png"}
    assert {p.name for p in (tmp_path / "viz").iterdir()} == set(files) | {"misclassified.tsv"}
    assert (tmp_path / "tb" / "projector_config.pbtxt").is_file()
    metadata = (tmp_path / "tb" / "00005" / "penultimate" / "metadata.tsv").read_text().split()
    assert metadata == [f"c{i % 3}" for i in range(30)]


# --- the wiring into train(), in process, on tiny synthetic data ------------------------------------

TINY = ["data=synthetic", "data.num_samples=120", "data.image_size=8", "trainer.epochs=1", "trainer.progress=false",
        "trainer.monitor_every=0", "trainer.histogram_every=0"]


@pytest.mark.parametrize("model, expected", [
    ("linear", "templates.png"), ("svm", "templates.png"), ("mlp", "templates.png"), ("knn", None),
])
def test_train_writes_visualizations_per_model(tmp_path, compose_config, model, expected):
    train(compose_config([*TINY, f"model={model}"]), tmp_path)
    if expected is None:  # kNN has no weights to draw: no viz/
        assert not (tmp_path / "viz").exists()
    else:
        assert expected in {p.name for p in (tmp_path / "viz").iterdir()}


def test_trainer_viz_false_writes_none(tmp_path, compose_config):
    train(compose_config([*TINY, "model=linear", "trainer.viz=false"]), tmp_path)
    assert not (tmp_path / "viz").exists()
    assert not (tmp_path / "tb" / "projector_config.pbtxt").exists()


# --- one command-line run on the default digits data -------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def started_run(request, tmp_path_factory, start_cli):
    """Started with the module when a selected test needs it, so the tests above run meanwhile:
    LeNet (the small classic variant) for 1 epoch on the embedded digits."""
    if any(item.module is request.module and "digits_run" in item.fixturenames for item in request.session.items):
        return start_cli(["trainer.epochs=1", "model.variant=classic", "trainer.progress=false"],
                         tmp_path_factory.mktemp("viz_run"))


@pytest.fixture(scope="module")
def digits_run(started_run):
    run = started_run.result()
    assert run.proc.returncode == 0, run.output
    return run.run_dir, run.output


def test_cli_run_writes_the_pngs(digits_run):
    run_dir, output = digits_run
    assert "visualizations of the best model: filters.png, confusion_matrix.png, misclassified.png" in output
    assert {"filters.png", "confusion_matrix.png", "misclassified.png", "misclassified.tsv"} <= \
        {p.name for p in (run_dir / "viz").iterdir()}
    wrong = len((run_dir / "viz" / "misclassified.tsv").read_text().splitlines()) - 1
    best = json.loads((run_dir / "summary.json").read_text())["best_val_acc"]
    assert wrong == min(64, round((1 - best) * 400))  # 400 validation digits


def test_cli_run_event_file_has_the_images_and_the_projector(digits_run):
    run_dir, _ = digits_run
    (events,) = (run_dir / "tb").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"images": 0})
    acc.Reload()
    assert {"viz/filters", "viz/confusion_matrix", "viz/misclassified"} <= set(acc.Tags()["images"])
    (filters,) = acc.Images("viz/filters")
    assert (filters.width, filters.height) == (3 * 37 + 2, 2 * 37 + 2)  # 6 classic-LeNet filters 5x5 -> 35 px
    config = (run_dir / "tb" / "projector_config.pbtxt").read_text()
    assert "penultimate" in config and "sprite" in config
    (tensors,) = (run_dir / "tb").glob("*/penultimate/tensors.tsv")
    rows = tensors.read_text().splitlines()
    assert len(rows) == 400 and len(rows[0].split("\t")) == 84  # classic LeNet: FC 120-84, then the classifier
