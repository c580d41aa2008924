"""Visualizations (src/cvtrain/viz.py): each function on tiny models, the wiring into train(), and one
command-line run on the default digits data whose run dir and event file must hold them."""
import json

import pytest
import torch
import torch.nn as nn
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from cvtrain.data import DataBundle, InMemoryLoader, Split
from cvtrain.tasks.train import run as train
from cvtrain.viz import (FILTER_TILE, FONT, GAP, TEMPLATE_TILE, confusion_counts, confusion_figure,
                         first_layer_filters, labelled_grid, linear_templates, misclassified, misclassified_grid,
                         predict, write_visualizations)

SHAPE = (3, 4, 4)


def conv_net(in_channels=3):
    return nn.Sequential(nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3))


def tile(grid, box):
    top, left, height, width = box
    return grid.image[:, top:top + height, left:left + width]


def has_text_under(grid, box):
    """Dark pixels in the label strip under a tile (the text drawn there)."""
    top, left, height, width = box
    return bool((grid.image[:, top + height + 2:top + height + 2 + FONT + 4, left:left + width] < 0.5).any())


def test_filters_are_the_first_convs_weights_each_scaled_to_0_1():
    model = conv_net()
    filters = first_layer_filters(model)
    assert filters.images.shape == (6, 3, 5, 5)
    for f, w in zip(filters.images, model[0].weight.detach()):
        assert f.min() == 0 and f.max() == 1
        assert torch.allclose(f, (w - w.min()) / (w.max() - w.min()), atol=1e-6)
    assert filters.labels == ["0", "1", "2", "3", "4", "5"]
    assert "6 filters, 3x5x5" in filters.title and "12x12 px" in filters.title


def test_filter_tiles_are_enlarged_with_nearest_neighbour_in_a_labelled_grid_with_gaps():
    filters = first_layer_filters(conv_net())
    grid = labelled_grid(filters.images, filters.labels, filters.title, min_side=FILTER_TILE)
    assert grid.scale == 12 and grid.columns == 3  # 5x5 -> 60 px; 6 tiles: 2 rows of 3
    assert [box[2:] for box in grid.boxes] == [(60, 60)] * 6
    (t0, l0, _, _), (t1, l1, _, _), (t3, l3, _, _) = grid.boxes[0], grid.boxes[1], grid.boxes[3]
    assert t1 == t0 and l1 >= l0 + 60 + GAP and l3 == l0 and t3 >= t0 + 60 + GAP + FONT
    for box, f in zip(grid.boxes, filters.images):
        pixels = tile(grid, box)
        blocks = pixels.reshape(3, 5, 12, 5, 12)  # every filter weight a constant 12x12 block ...
        assert (blocks == blocks[:, :, :1, :, :1]).all()
        assert torch.allclose(blocks[:, :, 0, :, 0], (f * 255).round() / 255, atol=1e-6)  # ... of its value
        assert has_text_under(grid, box)
    assert grid.image.shape[0] == 3 and 0 <= grid.image.min() and grid.image.max() <= 1
    assert (grid.image[:, :grid.boxes[0][0] - 1] < 0.5).any()  # the title above the tiles


def test_filters_of_other_than_1_or_3_channels_are_shown_gray_and_no_conv_means_none():
    assert first_layer_filters(conv_net(in_channels=4)).images.shape == (6, 1, 5, 5)
    assert first_layer_filters(nn.Sequential(nn.Flatten(), nn.Linear(48, 3))) is None


def test_the_first_layers_are_found_by_type_not_by_name():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)  # registered first, but not called first: still the order of modules()
            self.stem = nn.ModuleDict({"conv_a": nn.Conv2d(1, 4, 3), "conv_b": nn.Conv2d(4, 8, 3)})

    net = Net()
    filters = first_layer_filters(net)
    assert filters.images.shape == (4, 1, 3, 3) and "'stem.conv_a'" in filters.title


def test_linear_templates_are_the_rows_of_W_reshaped_one_per_class_labelled_with_its_name():
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 5))
    names = ["cat", "dog", "ship", "frog", "car"]
    templates = linear_templates(model, SHAPE, names)
    assert templates.images.shape == (5, *SHAPE)
    assert templates.labels == names  # row c is class c's template
    for t, row in zip(templates.images, model[1].weight.detach()):
        # min-max over all pixels and channels together (RGB colors keep their meaning)
        assert torch.allclose(t.flatten(), (row - row.min()) / (row.max() - row.min()), atol=1e-6)
    assert linear_templates(model, SHAPE).labels == ["0", "1", "2", "3", "4"]  # no names: the indices
    grid = labelled_grid(templates.images, templates.labels, templates.title, min_side=TEMPLATE_TILE)
    assert grid.scale == 28 and [box[2:] for box in grid.boxes] == [(112, 112)] * 5  # 4x4 -> 112 px
    assert all(has_text_under(grid, box) for box in grid.boxes)
    for box, t in zip(grid.boxes, templates.images):
        assert torch.allclose(tile(grid, box)[:, ::28, ::28], (t * 255).round() / 255, atol=1e-6)


def test_mlp_templates_come_from_its_first_layer_capped_and_are_labelled_by_unit():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(48, 30), nn.ReLU(), nn.Linear(30, 5))
    templates = linear_templates(mlp, SHAPE, ["a", "b", "c", "d", "e"], limit=20)
    assert templates.images.shape == (20, *SHAPE)
    assert templates.labels == [f"unit {i}" for i in range(20)] and "first 20 of 30" in templates.title
    row = mlp[1].weight.detach()[7]
    assert torch.allclose(templates.images[7].flatten(), (row - row.min()) / (row.max() - row.min()), atol=1e-6)


def test_no_templates_for_a_conv_net_even_if_a_layer_has_as_many_inputs_as_pixels():
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Flatten(), nn.Linear(48, 5))
    assert linear_templates(model, SHAPE) is None


def test_confusion_counts_rows_are_true_columns_predicted():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    preds = torch.tensor([0, 1, 1, 2, 0, 2])
    assert confusion_counts(labels, preds, 3).tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    image = confusion_figure(confusion_counts(labels, preds, 3), ["a", "b", "c"])
    assert image.shape[0] == 3 and 0 <= image.min() and image.max() <= 1


def test_misclassified_picks_only_wrong_ones_grouped_by_true_class():
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    preds = torch.tensor([0, 2, 2, 0, 0, 1, 1, 3])
    assert misclassified(labels, preds).tolist() == [1, 6, 3]  # true classes 1, 2, 3
    assert misclassified(labels, preds, limit=2).tolist() == [1, 6]
    images = torch.arange(8, dtype=torch.uint8).view(8, 1, 1, 1).expand(8, 1, 2, 2) * 30
    grid, text = misclassified_grid(images, labels, preds, ["zero", "one", "two", "three"])
    assert text.splitlines()[1:] == ["1,1\t1\tone\ttwo", "1,2\t6\ttwo\tone", "1,3\t3\tthree\tzero"]
    # 2x2 images enlarged 42x to 84 px, in one row: the tiles are images 1, 6, 3, each labelled
    assert grid.scale == 42 and grid.columns == 3 and [box[2:] for box in grid.boxes] == [(84, 84)] * 3
    assert [round(tile(grid, box)[0, 0, 0].item() * 255) for box in grid.boxes] == [30, 180, 90]
    assert all(has_text_under(grid, box) for box in grid.boxes)
    assert misclassified_grid(images, labels, labels, ["a"] * 4) == (None, None)


def errors_per_class(counts, seed=0):
    """labels and preds where class c has counts[c] errors (and as many correct images), shuffled."""
    labels = torch.cat([torch.full((2 * n,), c) for c, n in enumerate(counts)])
    preds = labels.clone()
    first = 0
    for c, n in enumerate(counts):
        preds[first:first + n] = (c + 1) % len(counts)
        first += 2 * n
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    return labels[order], preds[order]


def test_misclassified_covers_every_class_with_errors_round_robin():
    counts = [60, 0, 1, 3, 9, 40, 2, 0, 25, 12]  # class 0 alone has more errors than the grid holds
    labels, preds = errors_per_class(counts)
    picked = misclassified(labels, preds, limit=30)
    assert len(picked) == 30 and (labels[picked] != preds[picked]).all() and len(set(picked.tolist())) == 30
    per_class = torch.bincount(labels[picked], minlength=10).tolist()
    assert {c for c, n in enumerate(per_class) if n} == {c for c, n in enumerate(counts) if n}
    # classes with few errors show them all; the other 5 share what is left evenly: 30 - 6 = 24 -> 5, 5, 5, 5
    # and 4 (the last round is cut short: the classes with the most errors come first)
    assert per_class == [5, 0, 1, 3, 4, 5, 2, 0, 5, 5]
    # grouped by true class, in index order within a class
    keys = [(labels[i].item(), i) for i in picked.tolist()]
    assert keys == sorted(keys)
    # every class has >= limit / 8 errors: each gets at most ceil(64 / 8) = 8
    labels, preds = errors_per_class([30, 9, 8, 20, 10, 11, 12, 15])
    assert torch.bincount(labels[misclassified(labels, preds)]).tolist() == [8] * 8
    # at most per_class=k
    labels, preds = errors_per_class(counts)
    assert max(torch.bincount(labels[misclassified(labels, preds, per_class=2)]).tolist()) == 2
    # fewer errors than the grid holds: all of them
    assert len(misclassified(labels, preds, limit=1000)) == sum(counts)


def test_misclassified_with_more_classes_than_tiles_shows_those_with_the_most_errors():
    labels, preds = errors_per_class([1, 3, 2, 5, 1])
    assert sorted(set(labels[misclassified(labels, preds, limit=3)].tolist())) == [1, 2, 3]


def test_misclassified_tsv_lists_true_and_predicted_in_grid_order():
    counts = [5, 0, 3, 9, 1, 7]
    labels, preds = errors_per_class(counts, seed=3)
    classes = ["zero", "one", "two", "three", "four", "five"]
    images = (torch.arange(len(labels)) % 256).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 3, 3)
    grid, text = misclassified_grid(images, labels, preds, classes, limit=12)
    header, *rows = [line.split("\t") for line in text.splitlines()]
    assert header == ["position", "index", "true", "predicted"] and len(rows) == len(grid.boxes) == 12
    assert [int(r[1]) for r in rows] == misclassified(labels, preds, limit=12).tolist()
    for p, ((position, index, true, predicted), box) in enumerate(zip(rows, grid.boxes)):
        i = int(index)
        assert position == f"{p // grid.columns + 1},{p % grid.columns + 1}"
        assert (true, predicted) == (classes[labels[i]], classes[preds[i]]) and true != predicted
        assert round(tile(grid, box)[0, 0, 0].item() * 255) == i % 256  # the tile at that position is image i
    assert {r[2] for r in rows} == {"zero", "two", "three", "four", "five"}  # every class with errors


def test_long_labels_wrap_to_two_lines_and_are_cut_to_the_tile():
    images = torch.rand(4, 3, 32, 32)
    labels = ["cat", "automobile \u2192\u00a0airplane", "x" * 200, "a\nb\nc"]
    grid = labelled_grid(images, labels, "title", min_side=64)
    one_line = labelled_grid(images, ["cat"] * 4, "title", min_side=64)
    assert grid.image.shape[1] == one_line.image.shape[1] + FONT + 4  # two lines under every tile
    assert grid.image.shape[2] == one_line.image.shape[2]  # no label widens the grid


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
    assert not list(tmp_path.rglob("projector_config.pbtxt"))


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
    rows = [line.split("\t") for line in (run_dir / "viz" / "misclassified.tsv").read_text().splitlines()[1:]]
    assert [int(r[2]) for r in rows] == sorted(int(r[2]) for r in rows)  # grouped by true class
    assert all(r[2] != r[3] for r in rows)


def test_cli_run_event_file_has_the_images_and_the_projector(digits_run):
    run_dir, _ = digits_run
    (events,) = run_dir.glob("events.out.tfevents.*")  # directly in the run dir
    tb = events.parent
    acc = EventAccumulator(str(events), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert {"viz/filters", "viz/confusion_matrix", "viz/misclassified"} <= set(acc.Tags()["images"])
    (filters,) = acc.Images("viz/filters")
    # 6 classic-LeNet filters 5x5 enlarged 12x to 60 px, 3 a row; the PNG in viz/ is the same picture
    assert filters.width >= 3 * 60 + 4 * GAP and filters.height >= 2 * (60 + FONT) + GAP
    assert Image.open(run_dir / "viz" / "filters.png").size == (filters.width, filters.height)
    # the TEXT tab lists the misclassified images in the TSV's (grid) order
    (text,) = acc.Tensors("viz/misclassified/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    tsv = (run_dir / "viz" / "misclassified.tsv").read_text().splitlines()
    assert [line.replace("\t", " | ") for line in tsv[1:]] == [line.strip("| ") for line in table.splitlines()[2:]]
    config = (tb / "projector_config.pbtxt").read_text()
    assert "penultimate" in config and "sprite" in config
    (tensors,) = tb.glob("*/penultimate/tensors.tsv")
    rows = tensors.read_text().splitlines()
    assert len(rows) == 400 and len(rows[0].split("\t")) == 84  # classic LeNet: FC 120-84, then the classifier
